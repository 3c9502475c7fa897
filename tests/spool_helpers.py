"""Builders, a scripted relay and bounded waits for the spool tests.

Nothing here sleeps in real time: the spool runs on a
:class:`~spoold.testing.FakeClock`, and waits yield to the event loop until
a condition holds (:func:`tests.support.wait_until`) or the next events come,
so a bug makes a test fail with a clear message instead of hanging the suite.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from spoold.body import Body
from spoold.events import SpoolEvent, Subscription
from spoold.message import (
    Message,
    Queue,
    RetryInterval,
    RoutedBatch,
    RoutedEnvelope,
    Status,
    decode_record,
)
from spoold.relay import AttemptFailed, RecipientResult
from spoold.spool import Spool
from spoold.testing import FakeClock, InMemoryRelay
from tests.support import WAIT_TIMEOUT, wait_until

START = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
NEXT_HOP = "mx.example.net:25"
SENDER = "sender@example.org"
BODY = Body.from_content(b"Subject: spool test\r\n\r\nhello\r\n.dot line\r\n")

OK = RecipientResult(250, "ok", "2.0.0")
TRY_LATER = RecipientResult(451, "try again later", "4.3.0")
NO_SUCH_USER = RecipientResult(550, "no such user", "5.1.1")

Answer = RecipientResult | AttemptFailed


def intervals(*minutes: float) -> list[RetryInterval]:
    """Retry intervals without jitter, so schedules are exact."""
    return [RetryInterval(timedelta(minutes=m)) for m in minutes]


def batch(*recipients: str, retry_intervals: Sequence[RetryInterval] = ()) -> RoutedBatch:
    """A submission with one envelope."""
    return RoutedBatch(
        [RoutedEnvelope(SENDER, list(recipients), [NEXT_HOP], retry_intervals)], BODY
    )


def relay_answering(answers: dict[str, Answer], gate: anyio.Event | None = None) -> InMemoryRelay:
    """An in-memory relay whose next hop answers each recipient from
    ``answers`` (250 for anyone not in it). Tests change ``answers`` as they go."""
    return InMemoryRelay(respond=lambda _msg, rcpt: answers.get(rcpt, OK), gate=gate)


def open_spool(
    spool_dir: Path, relay: Any, clock: FakeClock, **options: Any
) -> AbstractAsyncContextManager[Spool]:
    """``Spool.open`` with the schedule pinned down: intervals of 1 and 5
    minutes without jitter, a seeded rng, no pings unless asked for, and a
    short flush timeout so a test that leaves an attempt hanging ends fast."""
    options.setdefault("default_retry_intervals", intervals(1, 5))
    options.setdefault("rng", random.Random(0))
    options.setdefault("ping_interval", 10.0**9)
    options.setdefault("flush_timeout", 0.5)
    return Spool.open(spool_dir, relay=relay, clock=clock, **options)


# ------------------------------------------------------------------ waiting


async def settle(checkpoints: int = 100) -> None:
    """Let every task that is ready run for a while. Bounded: never waits on
    real time. It cannot prove on its own that something does *not* happen
    (a worker thread may take longer); tests follow it with an event that
    does (e.g. :func:`round_trip`)."""
    for _ in range(checkpoints):
        await anyio.sleep(0)


async def next_events(
    stream: Subscription, count: int, timeout: float = WAIT_TIMEOUT
) -> list[SpoolEvent]:
    """The next ``count`` events of ``stream``."""
    out: list[SpoolEvent] = []
    try:
        with anyio.fail_after(timeout):
            while len(out) < count:
                out.append(await anext(stream))
    except TimeoutError:
        raise AssertionError(f"timed out after {len(out)} of {count} events: {out}") from None
    return out


def kinds(events: Sequence[SpoolEvent]) -> list[tuple[str, str | None]]:
    return [(e.kind, e.detail) for e in events]


# ------------------------------------------------------- looking at a spool


def status_of(spool: Spool, message_id: str) -> Status | None:
    """The status ``spool.status()`` shows for a message (None: not there)."""
    for msg in spool.status():
        if msg.id == message_id:
            return msg.status
    return None


def places(root: Path, message_id: str) -> list[str]:
    """Where the record of ``message_id`` is: queue dirs, checkout dirs."""
    found = []
    for queue in Queue:
        for sub in (queue.value, f"{queue.value}/.checkout"):
            if (root / sub / message_id).exists():
                found.append(sub)
    return found


def is_gone(root: Path, message_id: str) -> bool:
    """Delivered: record, body and registry entry are all deleted."""
    return (
        places(root, message_id) == []
        and not (root / "data" / message_id).exists()
        and not (root / ".registry" / message_id).exists()
    )


def is_delivered(spool: Spool, root: Path, message_id: str) -> bool:
    """Gone from disk and from the spool's memory."""
    return is_gone(root, message_id) and status_of(spool, message_id) is None


def read_record(root: Path, queue: str, message_id: str) -> Message:
    """A record as the spool at ``root`` reads it (so it knows its spool_dir)."""
    data = (root / queue / message_id).read_bytes()
    return decode_record(data, expected_id=message_id, spool_dir=str(root))


def attempts_for(relay: InMemoryRelay, message_id: str) -> list[tuple[str, ...]]:
    """The recipient lists of every attempt the relay saw for a message."""
    return [rcpts for mid, rcpts in relay.attempts if mid == message_id]


async def round_trip(spool: Spool, relay: InMemoryRelay, recipient: str) -> str:
    """Spool a probe message and wait until it is delivered: proves the
    scheduler has gone round since the last clock change."""
    (probe,) = await spool.add(batch(recipient))
    await wait_until(
        lambda: (
            any(mid == probe for mid, _, _ in relay.delivered) and status_of(spool, probe) is None
        ),
        f"probe {probe} to be delivered",
    )
    return probe
