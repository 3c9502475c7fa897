"""The destination gate on its own: rates, connections at once, lines of
waiting messages and hop backoffs, with times given by the test (no clock,
no spool)."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.config import parse_config
from spoold.daemon.routing import Router
from spoold.events import EventKind, Subscription
from spoold.limits import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    DestinationGate,
    DestinationLimits,
    Hold,
    Rate,
    parse_rate,
)
from spoold.message import SEND_NOW, Message, RoutedBatch
from spoold.ondisk import NewMessage
from spoold.smtp_relay import SmtpRelay
from spoold.spool import Spool
from spoold.testing import FakeClock
from tests.daemon_helpers import DaemonFactory, prefill, set_config_value, spooled, write_config
from tests.relay_helpers import MakeRelay, route
from tests.smtp_server import Reply, SmtpTestServer, StartServer
from tests.spool_helpers import BODY, SENDER, START, intervals, next_events, open_spool, settle
from tests.support import wait_until

H1, H2 = "mx1.example:25", "mx2.example:25"


@pytest.mark.parametrize(
    ("text", "count", "per"),
    [
        ("50/s", 50, timedelta(seconds=1)),
        ("1000/h", 1000, timedelta(hours=1)),
        (" 3 / m ", 3, timedelta(minutes=1)),
        ("10/5m", 10, timedelta(minutes=5)),
        ("1/d", 1, timedelta(days=1)),
    ],
)
def test_parse_rate(text: str, count: int, per: timedelta) -> None:
    rate = parse_rate(text)
    assert rate == Rate(count, per)
    assert rate.spacing == per.total_seconds() / count
    assert str(rate) == text.strip()


def test_an_empty_rate_is_no_limit() -> None:
    assert parse_rate("") is None


@pytest.mark.parametrize("text", ["fast", "50", "50/", "0/s", "5/x", "-1/s", "5/0s", 50])
def test_parse_rate_refuses_with_the_expected_form(text: object) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def limited(max_connections: int = 10, rate: str = "") -> tuple[str, DestinationLimits]:
    return "d", DestinationLimits(max_connections, parse_rate(rate))


def test_a_rate_spaces_attempts_evenly() -> None:
    gate: DestinationGate[str] = DestinationGate()
    dest = limited(rate="2/s")
    assert gate.admit(dest, [H1], 100.0) is None
    hold = gate.admit(dest, [H1], 100.0)
    assert hold == Hold("d", None, "rate 2/s")
    gate.wait("d", "m2")
    gate.wait("d", "m3")
    assert gate.next_wake(100.0) == 100.5
    assert list(gate.ready(100.4)) == []
    assert list(gate.ready(100.5)) == [("d", "m2")]
    assert gate.next_wake(100.5) == 101.0
    # Late: one token only (depth one), never a burst to catch up.
    assert list(gate.ready(105.0)) == [("d", "m3")]
    assert gate.admit(dest, [H1], 105.0) == Hold("d", None, "rate 2/s")


def test_in_any_span_of_the_rate_at_most_count_start() -> None:
    gate: DestinationGate[int] = DestinationGate()
    dest = limited(rate="4/s")  # a spacing that floats hold exactly
    starts: list[float] = []
    for i in range(40):
        if gate.admit(dest, [], 0.0) is None:
            starts.append(0.0)
        else:
            gate.wait("d", i)
    t = 0.0
    while gate.waiting("d"):
        wake = gate.next_wake(t)
        assert wake is not None and wake > t
        t = wake
        starts += [t for _ in gate.ready(t)]
        for _ in range(len(starts)):
            gate.done("d")
    assert len(starts) == 40
    for first in starts:
        assert sum(1 for s in starts if first <= s < first + 1.0) <= 4
    assert starts == [i * 0.25 for i in range(40)]  # and the rate is used in full


def test_max_connections_holds_until_one_is_done() -> None:
    gate: DestinationGate[str] = DestinationGate()
    dest = limited(max_connections=2)
    assert gate.admit(dest, [H1], 0.0) is None
    assert gate.admit(dest, [H1], 0.0) is None
    assert gate.admit(dest, [H1], 0.0) == Hold("d", None, "2 connections at once")
    gate.wait("d", "m3")
    assert gate.next_wake(0.0) is None  # the clock cannot help: a connection must end
    assert list(gate.ready(50.0)) == []
    gate.done("d")
    assert list(gate.ready(50.0)) == [("d", "m3")]
    assert gate.running("d") == 2


def test_the_line_is_first_come_first_served() -> None:
    gate: DestinationGate[str] = DestinationGate()
    dest = limited(max_connections=1)
    assert gate.admit(dest, [H1], 0.0) is None
    gate.wait("d", "first")
    gate.done("d")
    # A connection is free, but someone waits already: a newcomer queues behind.
    assert gate.admit(dest, [H1], 0.0) == Hold("d", None, "behind others in the destination's line")
    gate.wait("d", "second")
    assert [item for _, item in gate.ready(0.0)] == ["first"]


def test_a_message_sent_now_goes_to_the_head_of_its_line() -> None:
    gate: DestinationGate[str] = DestinationGate()
    dest = limited(rate="1/s")
    assert gate.admit(dest, [], 0.0) is None
    for name in ("second", "third"):
        assert gate.admit(dest, [], 0.0) is not None
        gate.wait("d", name)
    # an operator's send: ahead of the others, still held by the rate
    hold = gate.admit(dest, [], 0.5, front=True)
    assert hold == Hold("d", None, "rate 1/s", front=True)
    gate.wait("d", "kicked", front=hold.front)
    # another sent now (say `spoold send --all`) goes behind that one
    gate.wait("d", "kicked too", front=True)
    assert [item for _, item in gate.ready(1.0)] == ["kicked"]
    # the head waits for a shared token: still ahead of the second sent now
    gate.defer("d", "kicked", 2.0)
    gate.wait("d", "kicked last", front=True)
    order = [item for t in (2.0, 3.0, 4.0, 5.0, 6.0) for _, item in gate.ready(t)]
    assert order == ["kicked", "kicked too", "kicked last", "second", "third"]


def test_a_deferred_head_holds_its_line_until_its_time_with_or_without_a_rate() -> None:
    for rate in ("", "10/s"):
        gate: DestinationGate[str] = DestinationGate()
        dest = limited(rate=rate)
        assert gate.admit(dest, [], 0.0) is None
        gate.defer("d", "head", 5.0, booked=True)  # a shared token booked for 5.0
        assert gate.admit(dest, [], 0.0) is not None
        gate.wait("d", "next")
        assert list(gate.ready(1.0)) == [] and gate.next_wake(1.0) == 5.0
        assert [item for _, item in gate.ready(5.0)][:1] == ["head"]
        assert gate.take_booking("d") is True
        assert gate.take_booking("d") is False  # used up
    # a booked head found stale with nobody behind it: the booking goes too
    gate = DestinationGate()
    assert gate.admit(limited(rate="10/s"), [], 0.0) is None
    gate.defer("d", "stale head", 5.0, booked=True)
    assert [item for _, item in gate.ready(5.0)] == ["stale head"]
    gate.give_back("d")
    gate.wait("d", "later")  # held (say, by the local rate) and out of the line later
    assert [item for _, item in gate.ready(6.0)] == ["later"]
    assert gate.take_booking("d") is False  # it asks


def test_a_line_waiting_for_a_shared_slot_is_woken_early_and_one_for_a_token_is_not() -> None:
    gate: DestinationGate[str] = DestinationGate()
    dest = limited()
    assert gate.admit(dest, [], 0.0) is None
    gate.defer("d", "head", 5.0, early=True)  # refused a slot: ask again at 5.0
    gate.wait("d", "next")
    assert list(gate.ready(1.0)) == [] and gate.next_wake(1.0) == 5.0
    assert gate.wake("d") is True  # this process gave a slot back
    assert [item for _, item in gate.ready(1.0)] == ["head", "next"]
    gate.defer("d", "head", 5.0, booked=True)  # a token booked for 5.0: not early
    assert gate.wake("d") is False and list(gate.ready(1.0)) == []
    assert gate.wake("nobody") is False


def test_give_back_returns_the_connection_and_the_token() -> None:
    gate: DestinationGate[str] = DestinationGate()
    dest = limited(max_connections=1, rate="1/s")
    assert gate.admit(dest, [], 0.0) is None
    gate.wait("d", "stale")
    gate.wait("d", "live")
    gate.done("d")
    ((_, stale),) = gate.ready(1.0)
    assert stale == "stale"
    gate.give_back("d")
    assert list(gate.ready(1.0)) == [("d", "live")]


def test_new_limits_apply_to_those_waiting() -> None:
    gate: DestinationGate[str] = DestinationGate()
    assert gate.admit(limited(max_connections=1), [], 0.0) is None
    gate.wait("d", "m2")
    assert list(gate.heads()) == [("d", "m2")]
    gate.set_limits("d", DestinationLimits(max_connections=2))
    assert list(gate.ready(0.0)) == [("d", "m2")]


def test_no_destination_means_no_limits() -> None:
    gate: DestinationGate[str] = DestinationGate()
    assert all(gate.admit(None, [H1], 0.0) is None for _ in range(100))


def test_backoff_doubles_up_to_its_cap_and_an_answer_ends_it() -> None:
    gate: DestinationGate[str] = DestinationGate()
    first = BACKOFF_FIRST.total_seconds()
    b = gate.throttled(H1, 1000.0, "421 slow down")
    assert (b.until, b.window, b.reason) == (1000.0 + first, first, "421 slow down")
    assert gate.backoff(H1, 1000.0 + first - 1) is b
    assert gate.backoff(H1, 1000.0 + first) is None  # the window is over
    windows = [gate.throttled(H1, 2000.0, "421").window for _ in range(10)]
    assert windows[:3] == [2 * first, 4 * first, 8 * first]
    assert windows[-1] == BACKOFF_MAX.total_seconds()
    assert gate.answered(H1) is True
    assert gate.backoff(H1, 2000.0) is None
    assert gate.answered(H1) is False
    assert gate.throttled(H1, 3000.0, "421").window == first  # starts over


def test_a_message_waits_only_when_every_hop_is_backed_off() -> None:
    gate: DestinationGate[str] = DestinationGate()
    gate.throttled(H1, 0.0, "421")
    assert gate.admit(None, [H1, H2], 1.0) is None
    assert gate.order_hops([H1, H2], 1.0) == [H2, H1]
    gate.throttled(H2, 30.0, "421")
    hold = gate.admit(limited(), [H1, H2], 31.0)
    assert hold is not None and hold.until == 60.0 and hold.destination is None
    assert gate.running("d") == 0  # held: nothing taken
    assert gate.admit(limited(), [H1, H2], 60.0) is None
    assert gate.order_hops([H1, H2], 60.0) == [H1, H2]


# -----------------------------------------------------------------------------
# Per-destination limits end to end: a spool routing through the daemon's
# :class:`~spoold.daemon.routing.Router` to real SMTP servers on 127.0.0.1,
# counted at the servers. The rate runs on the spool's fake clock, so nothing
# here depends on how fast the machine is.


SECOND = timedelta(seconds=1)


def router_for(tmp_path: Path, routes: dict[str, dict[str, Any]]) -> Router:
    raw = {
        "spool": {"dir": "spool"},
        "relay": {"default_route": "free"},
        "routes": {name: {"tls": "none", **r} for name, r in routes.items()},
    }
    return Router(parse_config(raw, tmp_path / "spoold.toml"))


async def add(spool: Spool, router: Router, rcpt: str) -> str:
    (mid,) = await spool.add(RoutedBatch(router.route(SENDER, [rcpt]), BODY))
    return mid


@asynccontextmanager
async def spool_with(
    tmp_path: Path, relay: SmtpRelay, router: Router, clock: FakeClock, **options: Any
) -> AsyncIterator[tuple[Spool, Subscription]]:
    async with (
        open_spool(tmp_path / "spool", relay, clock, routes=router, limits=router, **options) as s,
        s.events() as stream,
    ):
        yield s, stream


async def delivered_through(spool: Spool, router: Router, server: SmtpTestServer) -> None:
    """A probe through ``server`` (an unlimited route), delivered: the
    scheduler has gone round since anything before it."""
    before = server.transactions
    await add(spool, router, f"probe{before}@free.example")
    await wait_until(lambda: server.transactions == before + 1, "the probe to arrive")


async def test_a_throttling_hop_is_backed_off_and_a_rate_is_kept_while_others_go_at_full_speed(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    throttling = await start_smtp_server()
    throttling.behaviour.mail = Reply("421 4.7.0 too many messages, slow down")
    limited = await start_smtp_server()
    free = await start_smtp_server()
    router = router_for(
        tmp_path,
        {
            # One at a time, so the first 421 is heard before the next attempt.
            "throttled": {
                "domains": ["throttled.example"],
                "next_hops": [throttling.hop],
                "max_connections": 1,
            },
            "limited": {"domains": ["limited.example"], "next_hops": [limited.hop], "rate": "1/s"},
            "free": {"next_hops": [free.hop]},
        },
    )
    clock = FakeClock(START)
    async with spool_with(tmp_path, make_relay(route()), router, clock) as (spool, stream):
        slow = [await add(spool, router, f"t{i}@throttled.example") for i in range(5)]
        rated = [await add(spool, router, f"l{i}@limited.example") for i in range(5)]
        for i in range(5):
            await add(spool, router, f"f{i}@free.example")

        # The free route takes everything at once, the clock standing still.
        await wait_until(lambda: free.transactions == 5, "the free route's messages")
        throttled = [e async for e in _until_kind(stream, EventKind.THROTTLED)]
        assert (throttled[-1].detail, throttled[-1].at) == (throttling.hop, START + BACKOFF_FIRST)
        await delivered_through(spool, router, free)
        await wait_until(lambda: spool.running_sends == 0, "the attempts to end")
        # One attempt reached the throttling hop; the other four are held
        # without an attempt; one message of the limited route went (one token).
        assert throttling.count("MAIL") == 1
        assert limited.transactions == 1
        by_id = {m.id: m for m in spool.status()}
        tried = [mid for mid in slow if by_id[mid].relay_attempts]
        assert len(tried) == 1
        assert by_id[tried[0]].relay_attempts[0].error.startswith("t0@throttled.example: 421 ")
        for mid in [*(m for m in slow if m not in tried), *rated[1:]]:
            held = by_id[mid]
            assert held.relay_attempts == []  # waiting is not a failure...
            assert held.retry_intervals == intervals(1, 5)  # ...and uses no interval
            assert held.status == SEND_NOW

        # Each second of the spool's clock lets exactly one more through the
        # rate; the backed-off hop sees nothing meanwhile.
        for second in range(2, 6):
            clock.advance(SECOND)
            await wait_until(lambda n=second: limited.transactions == n, "the next token")
            await delivered_through(spool, router, free)
            assert limited.transactions == second
        assert throttling.count("MAIL") == 1
        assert {m.rcpt_tos for m in limited.messages} == {
            (f"l{i}@limited.example",) for i in range(5)
        }

        # The window ends: the hop is tried again, throttles again, and the
        # next window is twice as long.
        clock.advance(BACKOFF_FIRST - 4 * SECOND)
        again = [e async for e in _until_kind(stream, EventKind.THROTTLED)]
        assert again[-1].at == clock.now() + 2 * BACKOFF_FIRST
        await delivered_through(spool, router, free)
        await wait_until(lambda: spool.running_sends == 0, "the attempts to end")
        assert throttling.count("MAIL") == 2

        # It answers again: at the end of the window the four held go; the
        # one that was refused twice waits its own retry interval (5m).
        throttling.behaviour.mail = None
        clock.advance(2 * BACKOFF_FIRST)
        await wait_until(lambda: throttling.transactions == 4, "the held messages")
        clock.advance(3 * BACKOFF_FIRST)
        await wait_until(lambda: throttling.transactions == 5, "the last one")
        await wait_until(lambda: spool.status() == [], "the spool to be empty")


async def _until_kind(stream: Subscription, kind: EventKind) -> AsyncIterator[Any]:
    """Events of ``stream`` up to and including the first of ``kind``."""
    while True:
        (event,) = await next_events(stream, 1)
        yield event
        if event.kind == kind:
            return


async def test_max_connections_is_never_exceeded_and_waiting_takes_no_send_job(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    hold_data = asyncio.Event()
    few = await start_smtp_server()
    few.behaviour.data_end = Reply(gate=hold_data)
    free = await start_smtp_server()
    router = router_for(
        tmp_path,
        {
            "few": {"domains": ["few.example"], "next_hops": [few.hop], "max_connections": 2},
            "free": {"next_hops": [free.hop]},
        },
    )
    clock = FakeClock(START)
    async with spool_with(
        tmp_path, make_relay(route()), router, clock, max_concurrent_send_jobs=3
    ) as (spool, _stream):
        for i in range(6):
            await add(spool, router, f"r{i}@few.example")
        await wait_until(lambda: few.count("DATA") == 2, "two transactions to reach DATA")
        # Two send jobs are stuck on the route; the four waiting take none,
        # so the third job still carries the other route's mail.
        for _ in range(3):
            await delivered_through(spool, router, free)
        await wait_until(lambda: spool.running_sends == 2, "the probes' jobs to end")
        await settle()
        assert (few.count("MAIL"), few.max_open_connections, spool.running_sends) == (2, 2, 2)

        hold_data.set()
        await wait_until(lambda: few.transactions == 6, "the route to drain")
        assert few.max_open_connections == 2
        assert few.connections_opened == 2  # the two were reused, never a third


async def one_connection_route(
    start_smtp_server: StartServer, tmp_path: Path, first: str, free_hop: str, refused: int = 1
) -> tuple[SmtpTestServer, Router, asyncio.Event]:
    """Route ``few`` (max_connections = 1) to a server that answers the
    first message's RCPT with ``first`` once the event returned is set, and
    refuses the next ``refused - 1`` (550); route ``free`` to ``free_hop``."""
    rcpt_reply = asyncio.Event()
    few = await start_smtp_server()
    few.behaviour.rcpt["r0@few.example"] = Reply(first, gate=rcpt_reply)
    for i in range(1, refused):
        few.behaviour.rcpt[f"r{i}@few.example"] = Reply("550 5.1.1 no such user")
    router = router_for(
        tmp_path,
        {
            "few": {"domains": ["few.example"], "next_hops": [few.hop], "max_connections": 1},
            "free": {"next_hops": [free_hop]},
        },
    )
    return few, router, rcpt_reply


async def test_a_connection_given_back_frees_the_slot_before_the_outcome_is_written(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    # With max_connections = 1, the first message is refused (550) and its
    # bounce is held in the store's group commit, after the relay: the next
    # of the line goes meanwhile, because the slot is the connection's, not
    # the local work's after it.
    few, router, rcpt_reply = await one_connection_route(
        start_smtp_server, tmp_path, "550 5.1.1 no such user", "127.0.0.1:9"
    )
    hold, held, release = threading.Event(), threading.Event(), threading.Event()

    def hold_the_bounce(step: str) -> None:
        if step == "write_record" and hold.is_set() and not held.is_set():
            held.set()
            release.wait(30)

    async with spool_with(
        tmp_path, make_relay(route()), router, FakeClock(START), on_step=hold_the_bounce
    ) as (spool, _stream):
        try:
            first = await add(spool, router, "r0@few.example")
            await add(spool, router, "r1@few.example")
            await wait_until(lambda: few.count("RCPT") == 1, "the first RCPT")
            hold.set()
            rcpt_reply.set()
            await wait_until(held.is_set, "the bounce to be held")
            # The second is delivered (and gone) while the first is being finished.
            await wait_until(lambda: [m.id for m in spool.status()] == [first], "the second")
            assert (few.transactions, few.max_open_connections) == (1, 1)
        finally:
            release.set()
        await wait_until(lambda: spool.running_sends == 0, "the first attempt to end")


async def test_a_route_takes_at_most_twice_its_connections_in_send_jobs_while_outcomes_wait(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    # max_connections = 1 and three send jobs. Every attempt of the route is
    # refused (550) and its outcome's first write is held: the first
    # attempt finishes without its slot, the second keeps its slot to its
    # end, so no third starts and the third job still carries the other
    # route's mail (a slow disk must not let one route take every job).
    free = await start_smtp_server()
    few, router, rcpt_reply = await one_connection_route(
        start_smtp_server, tmp_path, "550 5.1.1 no such user", free.hop, refused=6
    )
    hold, release = threading.Event(), threading.Event()
    held: list[str] = []
    lock = threading.Lock()

    def hold_two_outcomes(step: str) -> None:
        if step != "write_record" or not hold.is_set():
            return
        with lock:
            if len(held) == 2:
                return
            held.append(step)
        release.wait(30)

    async with spool_with(
        tmp_path,
        make_relay(route()),
        router,
        FakeClock(START),
        on_step=hold_two_outcomes,
        max_concurrent_send_jobs=3,
    ) as (spool, _stream):
        try:
            for i in range(6):
                await add(spool, router, f"r{i}@few.example")
            await wait_until(lambda: few.count("RCPT") == 1, "the first RCPT")
            hold.set()
            rcpt_reply.set()
            await wait_until(lambda: len(held) == 2, "two attempts writing their outcomes")
            await delivered_through(spool, router, free)
            await settle()
            assert (few.count("RCPT"), few.max_open_connections) == (2, 1)
        finally:
            release.set()
        await wait_until(lambda: few.count("RCPT") == 6, "the route to drain")
        assert few.max_open_connections == 1


async def test_a_throttled_attempt_holds_its_slot_until_the_hop_is_backed_off(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    # The same, but the refusal throttles: the next of the line must not go
    # to the hop before the backoff is in place (it waits for the window).
    few, router, rcpt_reply = await one_connection_route(
        start_smtp_server, tmp_path, "450 4.7.1 slow down", "127.0.0.1:9"
    )
    async with spool_with(tmp_path, make_relay(route()), router, FakeClock(START)) as (
        spool,
        stream,
    ):
        await add(spool, router, "r0@few.example")
        await add(spool, router, "r1@few.example")
        await wait_until(lambda: few.count("RCPT") == 1, "the first RCPT")
        rcpt_reply.set()
        [e async for e in _until_kind(stream, EventKind.THROTTLED)]
        await wait_until(lambda: spool.running_sends == 0, "the attempt to end")
        assert few.count("MAIL") == 1


async def test_a_reload_that_lifts_the_limit_frees_those_waiting(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    hold_data = asyncio.Event()
    few = await start_smtp_server()
    few.behaviour.data_end = Reply(gate=hold_data)
    routes: dict[str, dict[str, Any]] = {
        "few": {"domains": ["few.example"], "next_hops": [few.hop], "max_connections": 1},
        "free": {"next_hops": ["127.0.0.1:9"]},
    }
    router = router_for(tmp_path, routes)
    async with spool_with(tmp_path, make_relay(route()), router, FakeClock(START)) as (spool, _s):
        for i in range(3):
            await add(spool, router, f"r{i}@few.example")
        await wait_until(lambda: few.count("DATA") == 1, "one transaction to reach DATA")

        routes["few"]["max_connections"] = 3
        new = router_for(tmp_path, routes)
        spool.routes = new
        spool.limits = new
        await wait_until(lambda: few.count("DATA") == 3, "the two waiting to start")
        hold_data.set()
        await wait_until(lambda: few.transactions == 3, "the route to drain")


def on_route(message: NewMessage, route_name: str) -> NewMessage:
    """``message`` as if the route ``route_name`` had chosen its hops."""

    def build(mid: str, related: list[str]) -> Message:
        msg = message.build(mid, related)
        msg.route = route_name
        return msg

    return NewMessage(message.body, message.status, build)


async def test_the_daemon_applies_a_new_max_connections_at_a_reload(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer
) -> None:
    hold_data = asyncio.Event()
    server = await start_smtp_server()
    server.behaviour.data_end = Reply(gate=hold_data)
    config = write_config(tmp_path, next_hops=[server.hop])
    config.write_text(config.read_text() + "max_connections = 1\n")
    await prefill(
        tmp_path / "spool",
        [
            on_route(spooled(server.hop, recipients=[f"r{i}@x.example"]), "smarthost")
            for i in range(3)
        ],
    )
    daemon = await start_daemon(config)
    await wait_until(lambda: server.count("DATA") == 1, "one transaction at a time")
    await daemon.wait_log(lambda line: line["event"] == "spoold ready")
    assert server.max_open_connections == 1

    set_config_value(config, "max_connections", "3")
    daemon.send_signal(signal.SIGHUP)
    await daemon.wait_log(lambda line: line["event"] == "reloaded")
    await wait_until(lambda: server.count("DATA") == 3, "the two waiting to start")
    hold_data.set()
    await wait_until(lambda: server.transactions == 3, "all three delivered")
    assert server.max_open_connections == 3


async def test_an_operators_send_is_not_held_by_a_hops_backoff(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    throttling = await start_smtp_server()
    throttling.behaviour.mail = Reply("421 4.7.0 slow down")
    free = await start_smtp_server()
    router = router_for(
        tmp_path,
        {
            "throttled": {"domains": ["throttled.example"], "next_hops": [throttling.hop]},
            "free": {"next_hops": [free.hop]},
        },
    )
    clock = FakeClock(START)
    async with spool_with(tmp_path, make_relay(route()), router, clock) as (spool, stream):
        first = await add(spool, router, "a@throttled.example")
        [e async for e in _until_kind(stream, EventKind.THROTTLED)]
        await wait_until(lambda: spool.running_sends == 0, "the attempt to end")
        held = await add(spool, router, "b@throttled.example")
        await delivered_through(spool, router, free)  # the scheduler has seen b
        assert throttling.count("MAIL") == 1  # b is held by the backoff, untried
        assert [m.relay_attempts for m in spool.status() if m.id == held] == [[]]

        # The hop answers again; an operator's kick sends b now, the clock
        # standing still inside the backoff window.
        throttling.behaviour.mail = None
        await spool.send([held])
        await wait_until(lambda: throttling.transactions == 1, "the kicked message")
        assert throttling.messages[0].rcpt_tos == ("b@throttled.example",)
        assert clock.now() == START
        assert first in {m.id for m in spool.status()}  # not kicked: still waiting
