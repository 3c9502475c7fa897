"""The ordering guarantee of the spool's events: a subscription opened
before ``add`` sees that message's ``spooled`` event first, then every
later event of the message, in the order its changes happened."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import anyio

from spoold.events import EventKind, SpoolEvent
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
)
from tests.support import WAIT_TIMEOUT

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
