"""The event hub: order, per-subscriber buffers, overflow, fan-out, closing."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio

from spoold.events import EVENT_KINDS, EventHub, EventKind, SpoolEvent, Subscription
from spoold.message import EnvelopeInfo
from spoold.testing import FakeClock
from spoold.writer import SpoolWriter
from tests.spool_helpers import (
    NO_SUCH_USER,
    START,
    batch,
    intervals,
    next_events,
    open_spool,
    relay_answering,
    settle,
)
from tests.support import WAIT_TIMEOUT

T0 = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)


def event(n: int, kind: str = "spooled") -> SpoolEvent:
    return SpoolEvent(T0 + timedelta(seconds=n), kind, f"msg{n}")


def publish(hub: EventHub, numbers: range) -> None:
    for n in numbers:
        hub.publish(event(n))


async def test_events_come_in_the_order_published() -> None:
    hub = EventHub()
    sub = hub.subscribe()
    publish(hub, range(20))
    assert await next_events(sub, 20) == [event(n) for n in range(20)]


async def test_a_reader_waiting_gets_the_next_event() -> None:
    hub = EventHub()
    sub = hub.subscribe()
    got: list[SpoolEvent] = []

    async def read_one() -> None:
        got.extend(await next_events(sub, 1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_one)
        await settle()
        assert got == []
        hub.publish(event(1))
    assert got == [event(1)]


async def test_overflow_comes_right_after_the_buffered_events() -> None:
    hub = EventHub()
    sub = hub.subscribe(max_buffer=3)
    publish(hub, range(10))

    got = await next_events(sub, 4)
    assert got[:3] == [event(0), event(1), event(2)]
    overflow = got[3]
    assert (overflow.kind, overflow.detail, overflow.id) == ("overflow", "7", None)

    hub.publish(event(10))  # the gap is closed: later events come through
    assert await next_events(sub, 1) == [event(10)]


async def test_events_published_before_the_gap_is_reported_count_as_missed() -> None:
    hub = EventHub()
    sub = hub.subscribe(max_buffer=2)
    publish(hub, range(4))  # 0 and 1 are kept, 2 and 3 missed
    assert await next_events(sub, 1) == [event(0)]
    hub.publish(event(4))  # room in the buffer now, but it would stand after the gap
    got = await next_events(sub, 2)
    assert got[0] == event(1)
    assert (got[1].kind, got[1].detail) == ("overflow", "3")
    hub.publish(event(5))
    assert await next_events(sub, 1) == [event(5)]


async def test_every_subscriber_gets_the_same_events_and_its_own_buffer() -> None:
    hub = EventHub()
    first, second = hub.subscribe(), hub.subscribe()
    small = hub.subscribe(max_buffer=2)
    assert hub.subscriber_count == 3
    publish(hub, range(6))

    expected = [event(n) for n in range(6)]
    assert await next_events(first, 6) == expected
    assert await next_events(second, 6) == expected
    got = await next_events(small, 3)
    assert got[:2] == expected[:2]
    assert (got[2].kind, got[2].detail) == ("overflow", "4")


async def test_closing_the_hub_ends_iteration_after_what_was_buffered() -> None:
    hub = EventHub()
    buffered = hub.subscribe()
    waiting = hub.subscribe()
    publish(hub, range(2))
    assert await next_events(waiting, 2) == [event(0), event(1)]

    seen: list[SpoolEvent] = []
    ended = anyio.Event()

    async def read_all(sub: Subscription) -> None:
        async for ev in sub:
            seen.append(ev)
        ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_all, waiting)
        await settle()
        assert not ended.is_set()  # blocked, waiting for more
        hub.close()
        with anyio.fail_after(WAIT_TIMEOUT):
            await ended.wait()
    assert seen == []
    assert hub.subscriber_count == 0

    hub.publish(event(2))  # nobody listens any more
    with anyio.fail_after(WAIT_TIMEOUT):
        assert [ev async for ev in buffered] == [event(0), event(1)]


async def test_leaving_a_subscription_unsubscribes_it() -> None:
    hub = EventHub()
    async with hub.subscribe() as sub:
        assert hub.subscriber_count == 1
        hub.publish(event(0))
        assert await next_events(sub, 1) == [event(0)]
    assert hub.subscriber_count == 0
    hub.publish(event(1))
    with anyio.fail_after(WAIT_TIMEOUT):
        assert [ev async for ev in sub] == []


async def test_event_as_a_dict() -> None:
    info = EnvelopeInfo(sender="sender@example.org", recipients=["a@example.com"])
    delayed = SpoolEvent(T0, "delayed", "msg1", info, at=T0 + timedelta(minutes=1))
    assert delayed.to_dict() == {
        "time": T0,
        "event": "delayed",
        "id": "msg1",
        "at": T0 + timedelta(minutes=1),
        "sender": "sender@example.org",
        "recipients": ["a@example.com"],
    }
    assert SpoolEvent(T0, "ping").to_dict() == {"time": T0, "event": "ping"}
    assert {"spooled", "delayed_rate_limited", "overflow", "ping"} <= EVENT_KINDS


# -----------------------------------------------------------------------------
# The ordering guarantee of the spool's events: a subscription opened
# before ``add`` sees that message's ``spooled`` event first, then every
# later event of the message, in the order its changes happened.


COUNT = 20


def by_message(events: list[SpoolEvent]) -> dict[str | None, list[str]]:
    out: dict[str | None, list[str]] = defaultdict(list)
    for event in events:
        out[event.id].append(event.kind.value)
    return out


async def test_concurrent_adds_each_show_spooled_before_anything_else(tmp_path: Path) -> None:
    # The relay answers at once and every message may be sent at once: an
    # attempt that overtook its add would publish presend before spooled.
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START), max_concurrent_send_jobs=COUNT) as s:
        stream = s.events()  # subscribed from here on, before any add
        ids: list[str] = []

        async def add_one(n: int) -> None:
            ids.extend(await s.add(batch(f"r{n}@example.com")))

        async with anyio.create_task_group() as tg:
            for n in range(COUNT):
                tg.start_soon(add_one, n)
        events = await next_events(stream, 3 * COUNT)
    seen = by_message(events)
    assert sorted(seen) == sorted(ids)
    for mid in ids:
        assert seen[mid] == ["spooled", "presend", "delivered"], mid


async def test_a_frozen_add_and_its_later_changes_come_in_order(tmp_path: Path) -> None:
    relay = relay_answering({"b@example.com": NO_SUCH_USER})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        stream = spool.events()
        (mid,) = await spool.add(batch("a@example.com", "b@example.com"), frozen=True)
        await spool.send([mid])
        await spool.wait(mid, timeout=WAIT_TIMEOUT)  # frozen again: b failed
        await spool.remove([mid])
        events = await next_events(stream, 6)
    assert [e.kind for e in events] == [
        EventKind.SPOOLED,
        EventKind.FROZEN,
        EventKind.UNFROZEN,
        EventKind.PRESEND,
        EventKind.FROZEN,
        EventKind.REMOVED,
    ]
    assert {e.id for e in events} == {mid}


async def test_a_message_another_process_adds_shows_spooled_first(tmp_path: Path) -> None:
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        stream = spool.events()
        async with SpoolWriter.open(tmp_path, default_retry_intervals=intervals(1)) as writer:
            added = [mid for n in range(5) for mid in await writer.add(batch(f"r{n}@x.org"))]
        events = await next_events(stream, 3 * len(added))
    seen = by_message(events)
    for mid in added:
        assert seen[mid] == ["spooled", "presend", "delivered"], mid


async def test_a_subscription_made_before_start_sees_the_first_attempts(tmp_path: Path) -> None:
    """Messages queued while no spool was open are tried as soon as it
    opens: ``before_start`` subscribes before any of that can happen."""
    async with open_spool(tmp_path, relay_answering({}), FakeClock(START)):
        pass  # makes the spool directory
    async with SpoolWriter.open(tmp_path, default_retry_intervals=intervals(1)) as writer:
        added = [mid for n in range(3) for mid in await writer.add(batch(f"r{n}@x.org"))]
    streams: list[Subscription] = []
    relay = relay_answering({})
    async with open_spool(
        tmp_path, relay, FakeClock(START), before_start=lambda s: streams.append(s.events())
    ):
        (stream,) = streams
        events = await next_events(stream, 2 * len(added))
    seen = by_message(events)
    for mid in added:
        assert seen[mid] == ["presend", "delivered"], mid
