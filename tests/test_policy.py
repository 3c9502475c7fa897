"""Destination policies (:mod:`spoold.policy`): the library's source, the
daemon's router as a source, the relay under a policy, and a spool that asks
a source once per attempt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from spoold.connection_cache import RouteSettings
from spoold.daemon.config import parse_config
from spoold.daemon.routing import Router
from spoold.limits import DestinationLimits, Rate
from spoold.message import Message, RoutedBatch, RoutedEnvelope
from spoold.outcome import DeliveryPolicy, RetriesExhausted
from spoold.policy import NO_POLICY, DestinationPolicy, LibraryPolicies, relay_under
from spoold.relay import BodyHandle, RelayOutcome
from spoold.testing import FakeClock, InMemoryRelay
from tests.factories import make_message
from tests.relay_helpers import MakeRelay, delivery, failure, message_to, route
from tests.smtp_server import StartServer
from tests.spool_helpers import (
    BODY,
    MINUTE,
    NEXT_HOP,
    OK,
    SENDER,
    START,
    TRY_LATER,
    intervals,
    open_spool,
)
from tests.support import wait_until

SLOW = DestinationLimits(2, Rate(10, timedelta(minutes=1)))


def routed(message: Message, route: str | None) -> Message:
    message.route = route
    return message


# ----------------------------------------------------------- the value


def test_a_policy_counts_under_its_destination_only_with_limits() -> None:
    assert DestinationPolicy().limited is None
    assert DestinationPolicy(destination="slow").limited is None
    assert DestinationPolicy(destination="slow", limits=SLOW).limited == ("slow", SLOW)


def test_a_hop_the_policy_does_not_name_gets_the_relays_settings() -> None:
    settings = RouteSettings(tls="required")
    policy = DestinationPolicy(sessions={"a.example:25": settings})
    assert policy.session_for("a.example:25") == settings
    assert policy.session_for("b.example:25") is None


# ------------------------------------------------- the library's source


def test_without_parts_every_message_has_no_policy_of_its_own() -> None:
    source = LibraryPolicies()
    assert source.policy_for(make_message("m1")) == NO_POLICY
    assert source.policy_for(routed(make_message("m2"), "smarthost")).limited is None


def test_route_lifetimes_and_rules_override_the_delivery_policy_for_their_route() -> None:
    spool_wide = DeliveryPolicy(max_queue_lifetime=timedelta(days=5))
    source = LibraryPolicies(
        delivery=spool_wide,
        route_lifetimes={"slow": timedelta(hours=6)},
        route_retries_exhausted={"strict": RetriesExhausted.FREEZE},
    )
    slow = source.policy_for(routed(make_message("m1"), "slow")).delivery
    strict = source.policy_for(routed(make_message("m2"), "strict")).delivery
    other = source.policy_for(routed(make_message("m3"), "other")).delivery

    assert slow.max_queue_lifetime == timedelta(hours=6)
    assert slow.retries_exhausted is spool_wide.retries_exhausted
    assert strict.max_queue_lifetime == timedelta(days=5)
    assert strict.retries_exhausted is RetriesExhausted.FREEZE
    assert other == spool_wide


@dataclass
class TableRoutes:
    hops: dict[str, list[str]] = field(default_factory=dict)

    def current_hops(self, message: Message) -> Sequence[str] | None:
        return self.hops.get(message.route or "")

    async def reroute(self, message: Message) -> list[RoutedEnvelope]:
        raise AssertionError("not asked here")


class BrokenParts:
    def current_hops(self, message: Message) -> Sequence[str] | None:
        raise RuntimeError("broken routes")

    async def reroute(self, message: Message) -> list[RoutedEnvelope]:
        raise AssertionError("not asked here")

    def limits_for(self, message: Message) -> tuple[str, DestinationLimits] | None:
        raise RuntimeError("broken limits")


def test_routes_give_the_current_hops_and_a_limits_source_the_destination() -> None:
    source = LibraryPolicies(
        routes=TableRoutes({"smarthost": ["new.example:25"]}),
        limits=type("Limits", (), {"limits_for": lambda self, m: ("pool", SLOW)})(),
    )
    policy = source.policy_for(routed(make_message("m1"), "smarthost"))
    assert policy.next_hops == ("new.example:25",)
    assert policy.limited == ("pool", SLOW)
    unrouted = source.policy_for(make_message("m2"))
    assert unrouted.next_hops is None  # no route: its own hops


def test_a_part_that_raises_is_left_out() -> None:
    parts = BrokenParts()
    source = LibraryPolicies(routes=parts, limits=parts)
    policy = source.policy_for(routed(make_message("m1"), "smarthost"))
    assert policy.next_hops is None
    assert policy.limited is None


# ----------------------------------------------------- the daemon's router


def router(tmp_path: Path) -> Router:
    raw: dict[str, Any] = {
        "hostname": "relay.example.test",
        "spool": {"dir": "spool", "max_queue_lifetime": "5d"},
        "relay": {"default_route": "smarthost"},
        "routes": {
            "smarthost": {
                "next_hops": ["smart.example.net:587"],
                "tls": "required",
                "max_queue_lifetime": "6h",
                "retries_exhausted": "freeze",
                "retry_intervals": ["2m", "10m"],
                "max_connections": 2,
                "rate": "10/m",
            },
            "partners": {
                "domains": ["partner.example"],
                "next_hops": ["mx.partner.example:25"],
                "tls": "none",
                "helo_name": "partner-facing.example.test",
            },
            "direct": {"domains": ["direct.example"], "mx": True, "tls": "none"},
        },
    }
    return Router(parse_config(raw, tmp_path / "spoold.toml"))


def test_a_route_is_one_policy(tmp_path: Path) -> None:
    r = router(tmp_path)
    message = routed(make_message("m1", next_hops=["old.example:25"]), "smarthost")
    policy = r.policy_for(message)

    assert policy.destination == "smarthost"
    assert policy.next_hops == ("smart.example.net:587",)
    assert policy.limited == ("smarthost", DestinationLimits(2, Rate(10, timedelta(minutes=1))))
    assert policy.delivery.max_queue_lifetime == timedelta(hours=6)
    assert policy.delivery.retries_exhausted is RetriesExhausted.FREEZE
    assert [i.span for i in policy.retry_intervals] == [2 * MINUTE, 10 * MINUTE]
    session = policy.session_for("smart.example.net:587")
    assert session is not None
    assert (session.tls, session.helo_name) == ("required", "relay.example.test")


def test_new_messages_of_a_route_start_with_its_policys_retry_intervals(tmp_path: Path) -> None:
    r = router(tmp_path)
    (envelope,) = r.route(SENDER, ["someone@example.com"])
    message = routed(make_message("m1"), envelope.route)
    assert tuple(envelope.retry_intervals) == r.policy_for(message).retry_intervals


def test_a_route_without_rules_of_its_own_has_the_spools(tmp_path: Path) -> None:
    r = router(tmp_path)
    policy = r.policy_for(routed(make_message("m1"), "partners"))
    assert policy.delivery.max_queue_lifetime == timedelta(days=5)
    assert policy.delivery.retries_exhausted is RetriesExhausted.REPEAT_LAST
    assert policy.retry_intervals == ()  # the spool's default intervals
    session = policy.session_for("mx.partner.example:25")
    assert session is not None
    assert (session.tls, session.helo_name) == ("none", "partner-facing.example.test")


@pytest.mark.parametrize("route_name", [None, "gone"])
def test_a_message_without_a_route_keeps_its_hops_and_has_no_limits(
    tmp_path: Path, route_name: str | None
) -> None:
    r = router(tmp_path)
    hops = ["mx.partner.example:25", "elsewhere.example:25"]
    policy = r.policy_for(routed(make_message("m1", next_hops=hops), route_name))

    assert policy.destination is None
    assert policy.next_hops is None
    assert policy.limited is None
    assert policy.delivery.max_queue_lifetime == timedelta(days=5)
    # Each hop is talked to as the route that names it says, else as the defaults.
    assert policy.session_for(hops[0]) == r.settings_for(hops[0])
    assert policy.session_for(hops[1]) == r.default_settings


def test_an_mx_route_keeps_the_messages_hops_with_the_routes_settings(tmp_path: Path) -> None:
    r = router(tmp_path)
    message = routed(
        make_message("m1", recipients=["a@direct.example"], next_hops=["mx1.direct.example:25"]),
        "direct",
    )
    policy = r.policy_for(message)
    assert policy.next_hops is None
    session = policy.session_for("mx1.direct.example:25")
    assert session is not None
    assert session.tls == "none"


# ------------------------------------------------------------ the relay


class PolicyRecordingRelay(InMemoryRelay):
    def __init__(self) -> None:
        super().__init__()
        self.policies: list[DestinationPolicy] = []

    async def relay_with_policy(
        self,
        policy: DestinationPolicy,
        message: Message,
        body: BodyHandle,
        recipients: Sequence[str],
    ) -> RelayOutcome:
        self.policies.append(policy)
        return await self.relay(message, body, recipients)


async def test_a_relay_that_takes_a_policy_gets_it_and_a_plain_one_is_called_without(
    tmp_path: Path,
) -> None:
    message, body = message_to(tmp_path, [NEXT_HOP])
    policy = DestinationPolicy(destination="smarthost")
    plain = InMemoryRelay()
    taking = PolicyRecordingRelay()

    assert delivery(await relay_under(plain, policy, message, body, ["alice@example.com"]))
    assert delivery(await relay_under(taking, policy, message, body, ["alice@example.com"]))
    assert len(plain.attempts) == 1
    assert taking.policies == [policy]


async def test_the_smtp_relay_talks_to_a_hop_as_the_policy_says(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    server = await start_smtp_server()  # offers no STARTTLS
    relay = make_relay(route(tls="required"))
    message, body = message_to(tmp_path, [server.hop])

    recipients = list(message.remaining_recipients)
    assert "STARTTLS" in failure(await relay.relay(message, body, recipients))
    policy = DestinationPolicy(sessions={server.hop: route(tls="none")})
    outcome = await relay.relay_with_policy(policy, message, body, recipients)
    assert delivery(outcome).recipients[recipients[0]].accepted


# --------------------------------------------------- a spool with a source


@dataclass
class CountingSource:
    """Next hops and a lifetime for every message; counts the questions."""

    hops: tuple[str, ...]
    lifetime: timedelta = timedelta(hours=1)
    asked: list[str] = field(default_factory=list)

    def policy_for(self, message: Message) -> DestinationPolicy:
        self.asked.append(message.id)
        return DestinationPolicy(
            destination="all",
            next_hops=self.hops,
            delivery=DeliveryPolicy(max_queue_lifetime=self.lifetime),
        )


class HopsSeen(InMemoryRelay):
    def __init__(self, answers: dict[str, Any]) -> None:
        super().__init__(respond=lambda _m, rcpt: answers.get(rcpt, OK))
        self.hops: list[list[str]] = []

    async def relay(
        self, message: Message, body: BodyHandle, recipients: Sequence[str]
    ) -> RelayOutcome:
        self.hops.append(list(message.next_hop_choices))
        return await super().relay(message, body, recipients)


def one(route: str | None = "any") -> RoutedBatch:
    envelope = RoutedEnvelope(
        SENDER, ["later@example.com"], [NEXT_HOP], intervals(1, 5), route=route
    )
    return RoutedBatch([envelope], BODY)


async def test_a_spool_asks_its_source_once_per_attempt_and_follows_it(tmp_path: Path) -> None:
    clock = FakeClock(START)
    relay = HopsSeen({"later@example.com": TRY_LATER})
    first = CountingSource(("first.example:25",))
    second = CountingSource(("second.example:25",), lifetime=timedelta(hours=2))
    async with open_spool(tmp_path, relay, clock, policies=first) as spool:
        (mid,) = await spool.add(one())
        await wait_until(lambda: len(relay.hops) == 1, "the first attempt")
        await wait_until(lambda: spool.sending == 0, "the first attempt to end")
        assert first.asked == [mid]
        assert spool.retry_plan(mid).expiry == START + timedelta(hours=1)

        spool.policies = second
        assert spool.retry_plan(mid).expiry == START + timedelta(hours=2)
        clock.advance(MINUTE)
        await wait_until(lambda: len(relay.hops) == 2, "the second attempt")
        await wait_until(lambda: spool.sending == 0, "the second attempt to end")
    assert relay.hops == [["first.example:25"], ["second.example:25"]]
    assert len(first.asked) == 2  # the first attempt and the first plan; then no more
    assert second.asked == [mid, mid]  # the second plan and the second attempt


async def test_without_a_source_the_older_arguments_still_rule(tmp_path: Path) -> None:
    clock = FakeClock(START)
    relay = HopsSeen({})
    routes = TableRoutes({"smarthost": ["current.example:25"]})
    async with open_spool(
        tmp_path,
        relay,
        clock,
        routes=routes,
        delivery_policy=DeliveryPolicy(max_queue_lifetime=timedelta(days=1)),
        route_lifetimes={"smarthost": timedelta(hours=3)},
    ) as spool:
        (other,) = await spool.add(one(route=None))
        assert spool.retry_plan(other).expiry == START + timedelta(days=1)
        await wait_until(lambda: len(relay.hops) == 1, "the first message sent")
        await spool.add(one(route="smarthost"))
        await wait_until(lambda: len(relay.hops) == 2, "the second message sent")
    assert relay.hops == [[NEXT_HOP], ["current.example:25"]]


class BrokenSource:
    def policy_for(self, message: Message) -> DestinationPolicy:
        raise RuntimeError("a broken policy source")


async def test_a_source_that_raises_leaves_the_spools_own_delivery_rules(tmp_path: Path) -> None:
    """A bug in the source costs the message its limits and hop settings for
    that attempt, never the spool's lifetime: it is still tried, and its
    plan still ends where ``delivery_policy`` says."""
    clock = FakeClock(START)
    relay = HopsSeen({})
    async with open_spool(
        tmp_path,
        relay,
        clock,
        policies=BrokenSource(),
        delivery_policy=DeliveryPolicy(max_queue_lifetime=timedelta(hours=6)),
    ) as spool:
        (mid,) = await spool.add(one(route=None))
        assert spool.retry_plan(mid).expiry == START + timedelta(hours=6)
        await wait_until(lambda: len(relay.hops) == 1, "the message sent all the same")
    assert relay.hops == [[NEXT_HOP]]
