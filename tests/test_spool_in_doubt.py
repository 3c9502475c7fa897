"""A message that was being sent when the process died is in doubt at the
next open: ``in_doubt`` on its record, in ``status()`` and the JSON listing,
and ``after_crash`` decides whether it is sent again or frozen.

The crash is simulated by writing the spool as a dead process leaves it: a
record checked out (``active/.checkout/ID``) by an attempt that never ended,
or (a record written by another tool) stored as ``sending``."""

from __future__ import annotations

import errno
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.control import message_view
from spoold.daemon.metrics import Metrics
from spoold.hooks import ErrorAction
from spoold.kinds import OutcomeKind
from spoold.message import Frozen, SendAt, Sending, encode_record
from spoold.outcome import DeliveryPolicy, OnPermanentFailure
from spoold.relay import RecipientResult
from spoold.spool import AfterCrash
from spoold.testing import FakeClock, Faults, InMemoryRelay
from tests.spool_helpers import (
    MINUTE,
    START,
    TRY_LATER,
    WAIT_TIMEOUT,
    attempts_for,
    batch,
    next_events,
    open_spool,
    places,
    read_record,
    relay_answering,
    status_of,
)
from tests.support import wait_until

RCPT = "rcpt@example.com"


async def crashed_spool(root: Path, how: str) -> tuple[str, str]:
    """A spool with two messages, as a crash mid-send leaves it: the first
    was being sent (``how``: ``checkout`` or ``sending``), the second was
    waiting its turn. Returns their ids."""
    clock = FakeClock(START)
    async with open_spool(root, InMemoryRelay(), clock) as spool:
        (cut,) = await spool.add(batch(RCPT), frozen=True)
        (waiting,) = await spool.add(batch(RCPT), frozen=True)
    for mid, status in ((cut, Sending()), (waiting, SendAt(at=START + MINUTE))):
        record = read_record(root, "frozen", mid)
        record.status = status
        (root / "active" / mid).write_bytes(encode_record(record))
        os.unlink(root / "frozen" / mid)
    if how == "checkout":
        record = read_record(root, "active", cut)
        record.status = SendAt(at=START)  # what it was before the attempt began
        (root / "active" / ".checkout" / cut).write_bytes(encode_record(record))
        os.unlink(root / "active" / cut)
    return cut, waiting


@pytest.mark.parametrize("how", ["checkout", "sending"])
async def test_resend_marks_it_in_doubt_and_sends_it_again(tmp_path: Path, how: str) -> None:
    cut, waiting = await crashed_spool(tmp_path, how)
    relay = relay_answering({RCPT: TRY_LATER})
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay, clock, after_crash="resend") as spool:
        await wait_until(lambda: isinstance(status_of(spool, cut), SendAt), "the resend to end")
        assert attempts_for(relay, cut) == [(RCPT,)]
        (shown,) = [m for m in spool.status() if m.id == cut]
        assert shown.in_doubt is True
        assert message_view(shown)["in_doubt"] is True
        (other,) = [m for m in spool.status() if m.id == waiting]
        assert other.in_doubt is False
        assert message_view(other)["in_doubt"] is False

    record = read_record(tmp_path, "active", cut)
    assert record.in_doubt is True  # on disk: it survives another restart
    assert places(tmp_path, cut) == ["active"]
    assert read_record(tmp_path, "active", waiting).in_doubt is False


@pytest.mark.parametrize("how", ["checkout", "sending"])
async def test_freeze_marks_it_in_doubt_and_holds_it(tmp_path: Path, how: str) -> None:
    cut, waiting = await crashed_spool(tmp_path, how)
    relay = relay_answering({RCPT: TRY_LATER})
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay, clock, after_crash="freeze") as spool:
        assert status_of(spool, cut) == Frozen()
        (shown,) = [m for m in spool.status() if m.id == cut]
        assert message_view(shown)["in_doubt"] is True
        assert message_view(shown)["status"] == "frozen"
        clock.advance(MINUTE)  # the other one's time comes; it is sent as usual
        await wait_until(lambda: attempts_for(relay, waiting) == [(RCPT,)], "the other attempt")
        await wait_until(
            lambda: status_of(spool, waiting) == SendAt(at=START + 2 * MINUTE), "its retry"
        )
        assert attempts_for(relay, cut) == []  # never sent: the operator decides

    assert places(tmp_path, cut) == ["frozen"]
    assert read_record(tmp_path, "frozen", cut).in_doubt is True
    assert read_record(tmp_path, "active", waiting).in_doubt is False


async def test_a_clean_close_leaves_nothing_in_doubt(tmp_path: Path) -> None:
    relay = relay_answering({RCPT: TRY_LATER})
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay, clock) as spool:
        (mid,) = await spool.add(batch(RCPT))
        await wait_until(lambda: isinstance(status_of(spool, mid), SendAt), "first attempt")
    mode: AfterCrash
    for mode in ("freeze", "resend"):
        async with open_spool(tmp_path, relay, clock, after_crash=mode) as spool:
            assert isinstance(status_of(spool, mid), SendAt)
            assert [m.in_doubt for m in spool.status()] == [False]


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("how", ["checkout", "sending"])
@pytest.mark.parametrize("mode", ["freeze", "resend"])
async def test_a_mark_the_disk_refuses_keeps_the_message_in_doubt(
    tmp_path: Path, how: str, mode: AfterCrash
) -> None:
    """The spool opens on a disk that takes no write; the message cut short
    is neither sent nor put back in its queue unmarked, so the next open
    still finds it in doubt and marks it then."""
    cut, waiting = await crashed_spool(tmp_path, how)
    found_as = places(tmp_path, cut)
    relay = relay_answering({RCPT: TRY_LATER})
    clock = FakeClock(START)
    faults = Faults()
    faults.fail("write_record", disk_full())
    async with open_spool(tmp_path, relay, clock, after_crash=mode, on_step=faults) as spool:
        assert spool.unsettled_in_doubt == 1
        metrics = Metrics()
        metrics.update(spool)
        skipped = metrics.registry.get_sample_value
        assert skipped("spoold_spool_skipped", {"kind": "unmarked_in_doubt"}) == 1.0
        assert skipped("spoold_spool_skipped", {"kind": "unusable_dir"}) == 0.0
        assert [m.id for m in spool.status()] == [waiting]  # the queue is served
        clock.advance(MINUTE)
        await wait_until(lambda: attempts_for(relay, waiting) == [(RCPT,)], "the other attempt")
        assert attempts_for(relay, cut) == []
    assert faults.raised["write_record"] >= 1
    assert places(tmp_path, cut) == found_as  # as it was found: still in doubt

    async with open_spool(tmp_path, relay, clock, after_crash=mode) as spool:
        assert spool.unsettled_in_doubt == 0
        (shown,) = [m for m in spool.status() if m.id == cut]
        assert shown.in_doubt is True
    where = "frozen" if mode == "freeze" else "active"
    assert places(tmp_path, cut) == [where]
    assert read_record(tmp_path, where, cut).in_doubt is True


async def test_the_mark_is_written_at_a_ping_once_the_disk_takes_it(tmp_path: Path) -> None:
    cut, _ = await crashed_spool(tmp_path, "checkout")
    relay = relay_answering({RCPT: TRY_LATER})
    clock = FakeClock(START)
    faults = Faults()
    faults.fail("write_record", disk_full())
    async with open_spool(
        tmp_path, relay, clock, after_crash="freeze", on_step=faults, ping_interval=30.0
    ) as spool:
        assert spool.unsettled_in_doubt == 1
        faults.clear()
        clock.advance(timedelta(seconds=30))
        await wait_until(lambda: spool.unsettled_in_doubt == 0, "the mark at the next ping")
        assert status_of(spool, cut) == Frozen()
        assert places(tmp_path, cut) == ["frozen"]
        assert read_record(tmp_path, "frozen", cut).in_doubt is True
        assert attempts_for(relay, cut) == []


async def test_a_misplaced_record_is_moved_home_on_a_full_disk(tmp_path: Path) -> None:
    """A crash between the two renames of a move leaves a record in the
    wrong queue; putting it where its status says needs no write."""
    clock = FakeClock(START)
    async with open_spool(tmp_path, InMemoryRelay(), clock) as spool:
        (mid,) = await spool.add(batch(RCPT), frozen=True)
    os.rename(tmp_path / "frozen" / mid, tmp_path / "active" / mid)
    faults = Faults()
    faults.fail("write_record", disk_full())
    async with open_spool(tmp_path, InMemoryRelay(), clock, on_step=faults) as spool:
        assert status_of(spool, mid) == Frozen()
    assert places(tmp_path, mid) == ["frozen"]


async def test_no_reply_to_the_end_of_the_message_is_in_doubt_in_events_too(
    tmp_path: Path,
) -> None:
    doubt = RecipientResult(451, "in doubt: no reply", "4.4.2", in_doubt=True)
    asked: list[str] = []

    def on_error(msg: Any, rcpt: str, result: RecipientResult) -> ErrorAction:
        asked.append(rcpt)
        return ErrorAction.FAIL_PERMANENTLY

    relay = relay_answering({RCPT: doubt})
    clock = FakeClock(START)
    async with (
        open_spool(tmp_path, relay, clock, after_crash="freeze", on_error=on_error) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(RCPT))
        spooled, presend, frozen = await next_events(stream, 3)
        assert [e.kind for e in (spooled, presend, frozen)] == ["spooled", "presend", "frozen"]
        assert frozen.id == mid
        assert frozen.detail is not None and "in doubt" in frozen.detail
        (shown,) = spool.status()
        assert shown.in_doubt is True
        assert shown.remaining_recipients == [RCPT]
    assert asked == []  # not a refusal: on_error is not asked
    assert read_record(tmp_path, "frozen", mid).in_doubt is True


async def test_a_held_message_removed_by_hand_is_dropped_and_pings_go_on(tmp_path: Path) -> None:
    """An operator frees space by deleting a checked-out record the spool
    holds in doubt: the next ping forgets it (logged) instead of failing,
    and settles the others."""
    cut, _ = await crashed_spool(tmp_path, "checkout")
    clock = FakeClock(START)
    faults = Faults()
    faults.fail("write_record", disk_full())
    async with open_spool(
        tmp_path,
        relay_answering({}),
        clock,
        after_crash="freeze",
        on_step=faults,
        ping_interval=30.0,
    ) as spool:
        assert spool.unsettled_in_doubt == 1
        (tmp_path / "active" / ".checkout" / cut).unlink()
        faults.clear()
        clock.advance(timedelta(seconds=30))
        await wait_until(lambda: spool.unsettled_in_doubt == 0, "the held message dropped")
        assert cut not in [m.id for m in spool.status()]


async def test_a_bounce_at_the_lifetimes_end_after_no_reply_keeps_its_in_doubt_detail(
    tmp_path: Path,
) -> None:
    """Recipients still in doubt when the lifetime ends fail, and the message
    bounces: the stream shows ``removed`` with the in-doubt detail (as it
    always has), while ``wait`` and the history journal both say ``bounced``."""
    doubt = RecipientResult(451, "in doubt: no reply", "4.4.2", in_doubt=True)
    relay = relay_answering({RCPT: doubt})
    clock = FakeClock(START)
    policy = DeliveryPolicy(
        max_queue_lifetime=timedelta(minutes=2),
        on_permanent_failure=OnPermanentFailure.BOUNCE,
    )
    async with (
        open_spool(tmp_path, relay, clock, delivery_policy=policy) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(RCPT))
        *_, first = await next_events(stream, 3)
        assert (first.kind, first.detail) == (
            "delayed",
            "in doubt: no reply to the end of the message",
        )
        clock.advance(timedelta(minutes=5))  # past the lifetime: the next attempt is the last
        seen = []
        while not any(e.id == mid and e.kind == "removed" for e in seen) and len(seen) < 8:
            seen += await next_events(stream, 1)
        ends = [e for e in seen if e.id == mid and e.kind == "removed"]
        assert [e.detail for e in ends] == ["in doubt: no reply to the end of the message"]
        outcome = await spool.wait(mid, timeout=WAIT_TIMEOUT)
        assert outcome.kind is OutcomeKind.BOUNCED
        await spool.flush_history()
        journalled = await spool.find_outcome(mid)
        assert journalled is not None and journalled.outcome is OutcomeKind.BOUNCED


async def test_a_misplaced_record_in_frozen_is_moved_home_and_served(tmp_path: Path) -> None:
    """A record whose status says active (a retry is due later), found in
    frozen, which is read after active: moved to active, and indexed by
    the same open, not left on disk unseen until the next one."""
    clock = FakeClock(START)
    later = RecipientResult(451, "try again later", "4.3.0")
    async with open_spool(tmp_path, relay_answering({RCPT: later}), clock) as spool:
        (mid,) = await spool.add(batch(RCPT))
        await wait_until(lambda: isinstance(status_of(spool, mid), SendAt), "the retry set")
    os.rename(tmp_path / "active" / mid, tmp_path / "frozen" / mid)
    async with open_spool(tmp_path, relay_answering({RCPT: later}), clock) as spool:
        assert isinstance(status_of(spool, mid), SendAt)
        assert [m.id for m in spool.status()] == [mid]
    assert places(tmp_path, mid) == ["active"]
