"""The event hub: order, per-subscriber buffers, overflow, fan-out, closing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio

from spoold.events import EVENT_KINDS, EventHub, SpoolEvent, Subscription
from spoold.message import EnvelopeInfo
from tests.spool_helpers import next_events, settle
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
