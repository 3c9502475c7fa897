"""Messages follow their route: new hops after a reload, and reroute.

A small :class:`Routes` of the test's own stands for the daemon's router:
the test changes its hops the way a reload does. The relay is in memory and
the clock fake, so every step is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from spoold.errors import OperationRefusedError
from spoold.message import Frozen, Message, RoutedBatch, RoutedEnvelope, SendAt
from spoold.relay import BodyHandle, RecipientResult, RelayOutcome
from spoold.testing import FakeClock, InMemoryRelay
from spoold.waiting import OutcomeKind
from tests.spool_helpers import (
    BODY,
    OK,
    SENDER,
    START,
    TRY_LATER,
    intervals,
    is_delivered,
    next_events,
    open_spool,
    read_record,
    status_of,
)
from tests.support import WAIT_TIMEOUT, spool_files, wait_until

A, B, C = "a@one.example", "b@two.example", "c@one.example"


@dataclass
class TableRoutes:
    """Routes by recipient domain: name -> (domain, hops)."""

    table: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    def current_hops(self, message: Message) -> Sequence[str] | None:
        route = self.table.get(message.route or "")
        return route[1] if route else None

    async def reroute(self, message: Message) -> list[RoutedEnvelope]:
        self.asked.append(message.id)
        out: dict[str, list[str]] = {}
        for rcpt in message.remaining_recipients:
            domain = rcpt.rpartition("@")[2]
            name = next(n for n, (d, _) in self.table.items() if d == domain)
            out.setdefault(name, []).append(rcpt)
        return [
            RoutedEnvelope(message.envelope_info.sender, rcpts, self.table[n][1], route=n)
            for n, rcpts in out.items()
        ]


def routed(*recipients: str, hops: list[str], route: str | None) -> RoutedBatch:
    return RoutedBatch([RoutedEnvelope(SENDER, list(recipients), hops, route=route)], BODY)


@dataclass
class RecordingRelay(InMemoryRelay):
    """Keeps the message snapshot of every attempt (to see its hops)."""

    snapshots: list[Message] = field(default_factory=list)

    async def relay(
        self, message: Message, body: BodyHandle, recipients: Sequence[str]
    ) -> RelayOutcome:
        self.snapshots.append(message)
        return await super().relay(message, body, recipients)


def answering(answers: dict[str, RecipientResult]) -> RecordingRelay:
    return RecordingRelay(respond=lambda _m, rcpt: answers.get(rcpt, OK))


def hops_tried(relay: RecordingRelay) -> list[list[str]]:
    return [list(m.next_hop_choices) for m in relay.snapshots]


async def test_a_route_with_new_hops_is_used_from_the_next_attempt(tmp_path: Path) -> None:
    routes = TableRoutes({"smarthost": ("one.example", ["old.example:25"])})
    relay = answering({A: TRY_LATER})
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay, clock, routes=routes) as spool:
        async with spool.events() as events:
            (mid,) = await spool.add(routed(A, hops=["old.example:25"], route="smarthost"))
            await wait_until(lambda: isinstance(status_of(spool, mid), SendAt), "1st attempt")
            assert read_record(tmp_path, "active", mid).next_hop_choices == ["old.example:25"]

            routes.table["smarthost"] = ("one.example", ["new.example:25", "new2.example:25"])
            await spool.send([mid])
            await wait_until(lambda: len(relay.attempts) == 2, "2nd attempt")
            await wait_until(lambda: isinstance(status_of(spool, mid), SendAt), "delayed")
            seen = [(e.kind, e.detail) for e in await next_events(events, 5)]
        assert ("rerouted", "old.example:25 -> new.example:25 new2.example:25") in seen
        record = read_record(tmp_path, "active", mid)
        assert record.next_hop_choices == ["new.example:25", "new2.example:25"]
        assert record.route == "smarthost"
        assert hops_tried(relay) == [["old.example:25"], ["new.example:25", "new2.example:25"]]


@pytest.mark.parametrize("route", [None, "gone"])
async def test_explicit_hops_and_unknown_routes_keep_their_hops(
    tmp_path: Path, route: str | None
) -> None:
    routes = TableRoutes({"smarthost": ("one.example", ["new.example:25"])})
    relay = answering({})
    async with open_spool(tmp_path, relay, FakeClock(START), routes=routes) as spool:
        (mid,) = await spool.add(routed(A, hops=["mine.example:25"], route=route))
        await wait_until(lambda: is_delivered(spool, tmp_path, mid), "delivery")
    assert hops_tried(relay) == [["mine.example:25"]]


async def test_reroute_splits_a_message_whose_recipients_now_go_two_ways(tmp_path: Path) -> None:
    routes = TableRoutes({"smarthost": ("one.example", ["smart.example:25"])})
    relay = InMemoryRelay()
    async with open_spool(tmp_path, relay, FakeClock(START), routes=routes) as spool:
        (mid,) = await spool.add(
            routed(A, B, C, hops=["smart.example:25"], route="smarthost"), frozen=True
        )
        original = read_record(tmp_path, "frozen", mid)
        routes.table = {
            "one": ("one.example", ["one.example:25"]),
            "two": ("two.example", ["two.example:25"]),
        }
        ids = await spool.reroute([mid])
        assert ids[0] == mid and len(ids) == 2
        other = ids[1]
        kept = read_record(tmp_path, "frozen", mid)
        part = read_record(tmp_path, "frozen", other)
        assert (kept.remaining_recipients, kept.next_hop_choices, kept.route) == (
            [A, C],
            ["one.example:25"],
            "one",
        )
        assert (part.remaining_recipients, part.next_hop_choices, part.route) == (
            [B],
            ["two.example:25"],
            "two",
        )
        assert part.parent_id == kept.parent_id == original.parent_id
        assert other in kept.related_ids and mid in part.related_ids
        assert part.spool_date == original.spool_date
        assert part.status == kept.status == Frozen()
        body = spool_files(tmp_path)
        assert body[f"data/{other}"] == body[f"data/{mid}"]

        await spool.send(ids)
        await wait_until(
            lambda: all(is_delivered(spool, tmp_path, i) for i in ids), "both delivered"
        )
    assert sorted((m, r) for m, r, _ in relay.delivered) == sorted([(mid, A), (mid, C), (other, B)])


async def test_wait_after_a_split_answers_for_each_part_at_once(tmp_path: Path) -> None:
    """A split keeps the old id (the part on the first way): waiting for it,
    or for a new part, never waits on a message that is gone. Each answers
    at once while frozen, then with its own delivery."""
    routes = TableRoutes({"smarthost": ("one.example", ["smart.example:25"])})
    relay = InMemoryRelay()
    async with open_spool(tmp_path, relay, FakeClock(START), routes=routes) as spool:
        (mid,) = await spool.add(
            routed(A, B, hops=["smart.example:25"], route="smarthost"), frozen=True
        )
        routes.table = {
            "one": ("one.example", ["one.example:25"]),
            "two": ("two.example", ["two.example:25"]),
        }
        old, new = await spool.reroute([mid])
        assert old == mid
        shown = await spool.describe(old)  # what `spoold show` reads
        assert isinstance(shown, Message) and shown.remaining_recipients == [A]
        for part in (old, new):
            frozen = await spool.wait(part, timeout=0)
            assert (frozen.id, frozen.kind) == (part, OutcomeKind.FROZEN)
        assert new in (await spool.get_message(old)).related_ids

        await spool.send([old, new])
        with anyio.fail_after(WAIT_TIMEOUT):
            done = {part: await spool.wait(part) for part in (old, new)}
    assert {p: o.kind for p, o in done.items()} == {
        old: OutcomeKind.DELIVERED,
        new: OutcomeKind.DELIVERED,
    }
    assert sorted((m, r) for m, r, _ in relay.delivered) == [(old, A), (new, B)]
    envelope = done[old].envelope_info
    assert envelope is not None and envelope.recipients == [A, B]  # the submission's


async def test_reroute_all_one_way_keeps_the_id_and_the_status(tmp_path: Path) -> None:
    routes = TableRoutes({"smarthost": ("one.example", ["dead.example:25"])})
    relay = answering({A: TRY_LATER})
    async with open_spool(
        tmp_path, relay, FakeClock(START), routes=routes, default_retry_intervals=intervals(60)
    ) as spool:
        (mid,) = await spool.add(routed(A, hops=["dead.example:25"], route=None))
        await wait_until(lambda: isinstance(status_of(spool, mid), SendAt), "delayed")
        before = status_of(spool, mid)
        routes.table = {"fixed": ("one.example", ["alive.example:25"])}
        assert await spool.reroute(which="all") == [mid]
        record = read_record(tmp_path, "active", mid)
        assert record.next_hop_choices == ["alive.example:25"]
        assert record.route == "fixed"
        assert status_of(spool, mid) == before


async def test_reroute_without_routes_is_refused(tmp_path: Path) -> None:
    async with open_spool(tmp_path, InMemoryRelay(), FakeClock(START)) as spool:
        (mid,) = await spool.add(routed(A, hops=["x.example:25"], route=None), frozen=True)
        with pytest.raises(OperationRefusedError, match="no routes"):
            await spool.reroute([mid])
