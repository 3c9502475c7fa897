"""The spool: operator operations per status, scheduling on a fake clock,
attempt outcomes, hooks, events, concurrency, shutdown and reading.

Every test runs a real :class:`~spoold.spool.Spool` on a temp dir with an
in-memory relay and a :class:`~spoold.testing.FakeClock`; nothing sleeps in
real time. Where it matters the test asserts the directory tree, since the
queue a record is in is the truth.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from spoold.daemon.config import parse_config
from spoold.daemon.routing import Router
from spoold.errors import (
    InvalidIdError,
    NotFoundError,
    OperationRefusedError,
    SpoolClosedError,
    SpooldError,
    SpoolLockedError,
    StoreError,
)
from spoold.events import EventKind, Subscription
from spoold.hooks import ErrorAction, PresendDecision
from spoold.message import (
    Frozen,
    Message,
    Quarantined,
    Queue,
    RelayAttempt,
    Removed,
    RoutedBatch,
    RoutedEnvelope,
    SendAt,
    Sending,
    SendNow,
    decode_record,
    encode_record,
)
from spoold.ondisk import OnDiskSpool
from spoold.outcome import DeliveryPolicy, RetriesExhausted
from spoold.relay import AttemptFailed, BodyHandle, RecipientResult, RelayOutcome
from spoold.spool import Spool
from spoold.testing import FakeClock, InMemoryRelay
from tests.factories import new_message
from tests.relay_helpers import MakeRelay, route
from tests.smtp_server import Reply, SmtpTestServer
from tests.spool_helpers import (
    BODY,
    MINUTE,
    NO_SUCH_USER,
    SENDER,
    START,
    TRY_LATER,
    Answer,
    attempts_for,
    batch,
    intervals,
    is_delivered,
    is_gone,
    kinds,
    next_events,
    open_spool,
    places,
    read_record,
    relay_answering,
    round_trip,
    settle,
    status_of,
)
from tests.support import WAIT_TIMEOUT, spool_files, wait_until

RCPT = "rcpt@example.com"


def delivered_ids(relay: InMemoryRelay) -> list[str]:
    return [mid for mid, _, _ in relay.delivered]


def status_snapshot(spool: Spool) -> list[bytes]:
    return [encode_record(m) for m in spool.status()]


async def assert_no_event_since(spool: Spool, stream: Subscription) -> None:
    """The next event on ``stream`` is the one of a marker spooled now, so
    nothing was published in between."""
    (marker,) = await spool.add(batch("marker@example.com"), frozen=True)
    (event,) = await next_events(stream, 1)
    assert (event.kind, event.id) == ("spooled", marker)


# ================================================ every status x every operation

STATUSES = ("send_now", "send_at", "sending", "frozen", "removed", "quarantined")
OPERATIONS = (
    "freeze",
    "send",
    "send_all",
    "send_frozen_only",
    "remove",
    "recover_removed",
    "recover_quarantine",
)


@dataclass(frozen=True)
class Refused:
    """The operation raises ``error`` naming the id; nothing changes."""

    error: type[SpooldError]
    says: str


@dataclass(frozen=True)
class NotSelected:
    """A bulk send that does not take the message; nothing changes."""


@dataclass(frozen=True)
class Moves:
    """The record moves to ``queue`` with a status of type ``status``."""

    queue: str
    status: type
    event: str
    detail: str | None = None


@dataclass(frozen=True)
class SendsNow:
    """The message is sent at once (no clock change) and delivered."""

    event: str | None = None


Expected = Refused | NotSelected | Moves | SendsNow

ONLY_FROZEN = Refused(OperationRefusedError, "only frozen messages can be removed")
BEING_SENT = Refused(OperationRefusedError, "it is being sent")
ALREADY_FROZEN = Refused(OperationRefusedError, "already frozen")
NOT_INDEXED = Refused(NotFoundError, "no such message in active or frozen")
NOT_REMOVED = Refused(NotFoundError, "no such message in removed")
NOT_QUARANTINED = Refused(NotFoundError, "no such message in quarantine")
NOT_SELECTED = NotSelected()

EXPECTED: dict[str, dict[str, Expected]] = {
    "send_now": {
        "freeze": Moves("frozen", Frozen, "frozen"),
        "send": SendsNow(),
        "send_all": NOT_SELECTED,  # it is to be sent already
        "send_frozen_only": NOT_SELECTED,
        "remove": ONLY_FROZEN,
        "recover_removed": NOT_REMOVED,
        "recover_quarantine": NOT_QUARANTINED,
    },
    "send_at": {
        "freeze": Moves("frozen", Frozen, "frozen"),
        "send": SendsNow(),
        "send_all": SendsNow(),
        "send_frozen_only": NOT_SELECTED,
        "remove": ONLY_FROZEN,
        "recover_removed": NOT_REMOVED,
        "recover_quarantine": NOT_QUARANTINED,
    },
    "sending": {
        "freeze": BEING_SENT,
        "send": BEING_SENT,
        "send_all": NOT_SELECTED,
        "send_frozen_only": NOT_SELECTED,
        "remove": BEING_SENT,
        "recover_removed": NOT_REMOVED,
        "recover_quarantine": NOT_QUARANTINED,
    },
    "frozen": {
        "freeze": ALREADY_FROZEN,
        "send": SendsNow("unfrozen"),
        "send_all": SendsNow("unfrozen"),
        "send_frozen_only": SendsNow("unfrozen"),
        "remove": Moves("removed", Removed, "removed"),
        "recover_removed": NOT_REMOVED,
        "recover_quarantine": NOT_QUARANTINED,
    },
    "removed": {
        "freeze": NOT_INDEXED,
        "send": NOT_INDEXED,
        "send_all": NOT_SELECTED,
        "send_frozen_only": NOT_SELECTED,
        "remove": NOT_INDEXED,
        "recover_removed": Moves("frozen", Frozen, "recovered", "removed"),
        "recover_quarantine": NOT_QUARANTINED,
    },
    "quarantined": {
        "freeze": NOT_INDEXED,
        "send": NOT_INDEXED,
        "send_all": NOT_SELECTED,
        "send_frozen_only": NOT_SELECTED,
        "remove": NOT_INDEXED,
        "recover_removed": NOT_REMOVED,
        "recover_quarantine": Moves("frozen", Frozen, "recovered", "quarantine"),
    },
}


@dataclass
class Held:
    """A spool with message ``mid`` in a known status."""

    spool: Spool
    relay: InMemoryRelay
    gate: anyio.Event
    mid: str
    root: Path


@asynccontextmanager
async def message_in_status(root: Path, status: str) -> AsyncIterator[Held]:
    """Open a spool and bring one message into ``status``.

    ``send_now`` is held there by a limit of one send job, taken by another
    message that the relay's gate holds in ``sending``; ``send_at`` is the
    result of a 451 (the next hop answers 250 from then on)."""
    gate = anyio.Event()
    answers: dict[str, Answer] = {}
    relay = relay_answering(answers, gate)
    clock = FakeClock(START)
    limit = 1 if status == "send_now" else 8
    async with open_spool(root, relay, clock, max_concurrent_send_jobs=limit) as spool:
        try:
            if status == "send_now":
                await spool.add(batch("blocker@example.com"))
                await wait_until(relay.started.is_set, "the blocker to be sent")
                (mid,) = await spool.add(batch(RCPT))
            elif status == "send_at":
                gate.set()
                answers[RCPT] = TRY_LATER
                (mid,) = await spool.add(batch(RCPT))
                await wait_until(lambda: isinstance(status_of(spool, mid), SendAt), "send_at")
                answers[RCPT] = RecipientResult(250, "ok")
            elif status == "sending":
                (mid,) = await spool.add(batch(RCPT))
                await wait_until(relay.started.is_set, "the attempt to start")
            elif status == "frozen":
                (mid,) = await spool.add(batch(RCPT), frozen=True)
            elif status == "removed":
                (mid,) = await spool.add(batch(RCPT), frozen=True)
                await spool.remove([mid])
            else:
                (mid,) = await spool.quarantine("virus found", batch(RCPT))
            assert (await spool.get_message(mid)).status.name == status
            yield Held(spool, relay, gate, mid, root)
        finally:
            gate.set()


async def run_operation(spool: Spool, operation: str, mid: str) -> list[str] | None:
    if operation == "freeze":
        await spool.freeze([mid])
    elif operation == "send":
        return await spool.send([mid])
    elif operation == "send_all":
        return await spool.send(which="all")
    elif operation == "send_frozen_only":
        return await spool.send(which="frozen_only")
    elif operation == "remove":
        await spool.remove([mid])
    elif operation == "recover_removed":
        await spool.recover([mid], from_="removed")
    else:
        assert operation == "recover_quarantine"
        await spool.recover([mid], from_="quarantine")
    return None


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("status", STATUSES)
async def test_every_operation_on_every_status(tmp_path: Path, status: str, operation: str) -> None:
    expected = EXPECTED[status][operation]
    async with message_in_status(tmp_path, status) as held:
        spool, mid = held.spool, held.mid
        async with spool.events() as stream:
            await spool.flush_history()  # lines journalled in the set-up are on disk now
            files_before = spool_files(tmp_path)
            status_before = status_snapshot(spool)

            if isinstance(expected, Refused):
                with pytest.raises(expected.error) as info:
                    await run_operation(spool, operation, mid)
                assert mid in str(info.value)
                assert expected.says in str(info.value)
                assert spool_files(tmp_path) == files_before
                assert status_snapshot(spool) == status_before
                await assert_no_event_since(spool, stream)

            elif isinstance(expected, NotSelected):
                selected = await run_operation(spool, operation, mid)
                assert selected is not None
                assert mid not in selected
                assert spool_files(tmp_path) == files_before
                assert status_snapshot(spool) == status_before
                await assert_no_event_since(spool, stream)

            elif isinstance(expected, Moves):
                await run_operation(spool, operation, mid)
                assert places(tmp_path, mid) == [expected.queue]
                assert isinstance((await spool.get_message(mid)).status, expected.status)
                listed = status_of(spool, mid) is not None
                assert listed == (expected.queue in ("active", "frozen"))
                (event,) = await next_events(stream, 1)
                assert (event.kind, event.id, event.detail) == (
                    expected.event,
                    mid,
                    expected.detail,
                )
                assert not (tmp_path / "quarantine" / ".reasons" / mid).exists()

            else:
                selected = await run_operation(spool, operation, mid)
                if selected is not None:
                    assert mid in selected
                assert places(tmp_path, mid) in (["active"], ["active/.checkout"])
                if expected.event:
                    (event,) = await next_events(stream, 1)
                    assert (event.kind, event.id) == (expected.event, mid)
                held.gate.set()  # the clock stays put: it must go now
                await wait_until(
                    lambda: is_delivered(spool, tmp_path, mid), f"{mid} to be delivered"
                )
                assert held.relay.delivered.count((mid, RCPT, BODY.wire)) == 1
                assert status_of(spool, mid) is None


BAD_IDS = ["../x", "a/b", ""]


@pytest.mark.parametrize("bad_id", BAD_IDS)
async def test_ids_that_are_not_ids_are_refused_and_touch_nothing(
    tmp_path: Path, bad_id: str
) -> None:
    root = tmp_path / "spool"
    answers: dict[str, Answer] = {RCPT: TRY_LATER}
    relay = relay_answering(answers)
    async with open_spool(root, relay, FakeClock(START)) as spool:
        (delayed,) = await spool.add(batch(RCPT))
        (frozen,) = await spool.add(batch(RCPT), frozen=True)
        (removed,) = await spool.add(batch(RCPT), frozen=True)
        await spool.remove([removed])
        (quarantined,) = await spool.quarantine("bad", batch(RCPT))
        await wait_until(lambda: isinstance(status_of(spool, delayed), SendAt), "send_at")
        (tmp_path / "x").write_bytes(b"not a record")
        (root / "frozen" / "a").mkdir()
        await spool.flush_history()  # the removal's journal line is written now, not later
        files_before = spool_files(tmp_path)
        status_before = status_snapshot(spool)

        operations = [
            spool.freeze([bad_id]),
            spool.freeze([delayed, bad_id]),
            spool.send([bad_id]),
            spool.send([frozen, bad_id]),
            spool.remove([bad_id]),
            spool.remove([frozen, bad_id]),
            spool.recover([bad_id], from_="removed"),
            spool.recover([removed, bad_id], from_="removed"),
            spool.recover([quarantined, bad_id], from_="quarantine"),
            spool.get_message(bad_id),
        ]
        for operation in operations:
            with pytest.raises(InvalidIdError, match="not a message id"):
                await operation
            assert spool_files(tmp_path) == files_before
            assert status_snapshot(spool) == status_before


# ====================================================== stale retry timers


class RecordingPresend:
    """A presend hook that answers from a script (then ``SendNow()``) and
    records whom it was asked about. An exception in the script is raised."""

    def __init__(self, *script: PresendDecision | Exception) -> None:
        self.script = list(script)
        self.asked: list[str] = []

    def __call__(self, message: Message) -> PresendDecision:
        self.asked.append(message.id)
        answer = self.script.pop(0) if self.script else SendNow()
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.mark.parametrize("operations", [("freeze",), ("freeze", "remove")])
async def test_stale_retry_timer_after_an_operator_change_sends_nothing(
    tmp_path: Path, operations: tuple[str, ...]
) -> None:
    answers: dict[str, Answer] = {RCPT: TRY_LATER}
    relay = relay_answering(answers)
    presend = RecordingPresend()
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay, clock, presend=presend) as spool:
        (mid,) = await spool.add(batch(RCPT))
        await wait_until(lambda: status_of(spool, mid) == SendAt(at=START + MINUTE), "send_at")
        answers.pop(RCPT)  # were it sent again, it would be delivered
        for operation in operations:
            await run_operation(spool, operation, mid)

        clock.advance(MINUTE * 2)  # past the pending retry timer
        await settle()
        await round_trip(spool, relay, "probe@example.com")

        assert presend.asked.count(mid) == 1
        assert attempts_for(relay, mid) == [(RCPT,)]
        assert mid not in delivered_ids(relay)
        queue = "removed" if "remove" in operations else "frozen"
        assert places(tmp_path, mid) == [queue]


async def test_send_reschedules_and_the_old_timer_fires_nothing(tmp_path: Path) -> None:
    answers: dict[str, Answer] = {RCPT: TRY_LATER}
    relay = relay_answering(answers)
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay, clock, default_retry_intervals=intervals(1, 5)) as spool:
        (mid,) = await spool.add(batch(RCPT))
        await wait_until(lambda: status_of(spool, mid) == SendAt(at=START + MINUTE), "retry in 1m")

        # At START: tried now, fails, waits the 5 minutes at the head (an
        # operator's kick does not use it up).
        assert await spool.send([mid]) == [mid]
        await wait_until(lambda: status_of(spool, mid) == SendAt(at=START + 5 * MINUTE), "5m")
        assert len(attempts_for(relay, mid)) == 2

        clock.advance(2 * MINUTE)  # the 1-minute timer from the first failure comes up
        await settle()
        await round_trip(spool, relay, "probe@example.com")
        assert len(attempts_for(relay, mid)) == 2
        assert status_of(spool, mid) == SendAt(at=START + 5 * MINUTE)

        clock.advance(3 * MINUTE)  # the live timer: third attempt uses the last interval
        await wait_until(lambda: status_of(spool, mid) == SendAt(at=START + 10 * MINUTE), "10m")
        clock.advance(5 * MINUTE)  # fourth attempt: no interval left
        await wait_until(lambda: isinstance(status_of(spool, mid), Frozen), "frozen")
        assert len(attempts_for(relay, mid)) == 4


async def test_operator_kicks_never_bring_a_message_closer_to_freezing(tmp_path: Path) -> None:
    """A route with two retry intervals; the operator sends the message
    twice while its hop still defers it: it is not frozen, and both
    intervals are still there for the scheduler's own attempts."""
    relay = relay_answering({RCPT: TRY_LATER})
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay, clock) as spool:
        (mid,) = await spool.add(batch(RCPT, retry_intervals=intervals(1, 5)))
        await wait_until(lambda: status_of(spool, mid) == SendAt(at=START + MINUTE), "1st failure")
        for kick in (1, 2):
            await spool.send([mid])
            await wait_until(lambda kick=kick: len(attempts_for(relay, mid)) == 1 + kick, "kick")
            await wait_until(lambda: isinstance(status_of(spool, mid), SendAt), "delayed again")
        record = read_record(tmp_path, "active", mid)
        assert record.retry_intervals == intervals(5)  # only the first, automatic, failure used one
        assert len(record.relay_attempts) == 3  # every kick is recorded
        assert record.status == SendAt(at=START + 5 * MINUTE)


# ======================================================== attempt outcomes


async def test_partial_refusal_then_frozen_then_sent_again(tmp_path: Path) -> None:
    perm, later = "gone@example.com", "busy@example.com"
    answers: dict[str, Answer] = {perm: NO_SUCH_USER, later: TRY_LATER}
    relay = relay_answering(answers)
    clock = FakeClock(START)
    async with (
        open_spool(tmp_path, relay, clock, default_retry_intervals=intervals(1, 5)) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(perm, later))
        events = await next_events(stream, 3)
        assert kinds(events) == [("spooled", None), ("presend", "send_now"), ("delayed", None)]
        assert events[2].at == START + MINUTE

        msg = read_record(tmp_path, "active", mid)
        assert msg.status == SendAt(at=START + MINUTE)
        assert msg.failed_recipients == [perm]
        assert msg.remaining_recipients == [later]
        assert msg.retry_intervals == intervals(5)
        assert len(msg.relay_attempts) == 1
        attempt = msg.relay_attempts[0]
        assert attempt.time == START
        assert attempt.error == (
            f"{perm}: 550 5.1.1 no such user; {later}: 451 4.3.0 try again later via memory"
        )
        assert msg == await spool.get_message(mid)

        clock.advance(MINUTE)  # second attempt, only the one left to try
        events = await next_events(stream, 2)
        assert kinds(events) == [("presend", "send_now"), ("delayed", None)]
        assert events[1].at == START + 6 * MINUTE
        assert attempts_for(relay, mid) == [(perm, later), (later,)]

        clock.advance(5 * MINUTE)  # third attempt: no interval left
        events = await next_events(stream, 2)
        assert kinds(events) == [("presend", "send_now"), ("frozen", None)]
        assert places(tmp_path, mid) == ["frozen"]
        msg = read_record(tmp_path, "frozen", mid)
        assert msg.status == Frozen()
        assert msg.retry_intervals == []
        assert msg.failed_recipients == [perm]
        assert msg.remaining_recipients == [later]
        assert [a.time for a in msg.relay_attempts] == [
            START + 6 * MINUTE,
            START + MINUTE,
            START,
        ]

        # The operator fixes things and sends it again with new intervals;
        # hold the attempt to look at the message it is made with.
        answers.clear()
        relay.gate = anyio.Event()
        assert await spool.send([mid], retry_intervals=intervals(2)) == [mid]
        (event,) = await next_events(stream, 1)
        assert (event.kind, event.id) == ("unfrozen", mid)
        await wait_until(lambda: len(attempts_for(relay, mid)) == 4, "the fourth attempt")
        sending = await spool.get_message(mid)
        assert sending.status == Sending()
        assert sending.failed_recipients == []
        assert set(sending.remaining_recipients) == {perm, later}
        assert sending.retry_intervals == intervals(2)
        assert set(attempts_for(relay, mid)[-1]) == {perm, later}

        relay.gate.set()
        events = await next_events(stream, 2)
        assert kinds(events) == [("presend", "send_now"), ("delivered", None)]
        assert not (tmp_path / "data" / mid).exists()
        assert not (tmp_path / "active" / mid).exists()
        assert is_gone(tmp_path, mid)
        assert sorted(r for m, r, _ in relay.delivered if m == mid) == sorted([perm, later])


async def test_relay_attempt_failed_is_try_later_with_its_error(tmp_path: Path) -> None:
    error = "no next hop reachable: mx.example.net:25 connection refused"
    relay = relay_answering({RCPT: AttemptFailed(error)})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool, spool.events() as stream:
        (mid,) = await spool.add(batch(RCPT))
        events = await next_events(stream, 3)
        assert kinds(events)[2] == ("delayed", None)
        msg = read_record(tmp_path, "active", mid)
        assert msg.status == SendAt(at=START + MINUTE)
        assert msg.relay_attempts == [RelayAttempt(START, error)]
        assert msg.remaining_recipients == [RCPT]
        assert msg.failed_recipients == []


class RaisingRelay:
    """A relay with a bug: it raises instead of returning an outcome."""

    def __init__(self) -> None:
        self.calls = 0

    async def relay(
        self, message: Message, body: BodyHandle, recipients: Sequence[str]
    ) -> RelayOutcome:
        self.calls += 1
        raise RuntimeError("relay bug: boom")


async def test_a_relay_that_raises_is_try_later(tmp_path: Path) -> None:
    relay = RaisingRelay()
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool, spool.events() as stream:
        (mid,) = await spool.add(batch(RCPT))
        events = await next_events(stream, 3)
        assert (events[2].kind, events[2].at) == ("delayed", START + MINUTE)
        msg = read_record(tmp_path, "active", mid)
        assert relay.calls == 1
        assert msg.status == SendAt(at=START + MINUTE)
        assert [a.error for a in msg.relay_attempts] == [
            "relay error: RuntimeError('relay bug: boom')"
        ]
        assert places(tmp_path, mid) == ["active"]


# ================================================================== hooks


async def test_presend_answering_send_at_waits_until_then(tmp_path: Path) -> None:
    presend = RecordingPresend(SendAt(at=START + 10 * MINUTE))
    relay = relay_answering({})
    clock = FakeClock(START)
    async with (
        open_spool(tmp_path, relay, clock, presend=presend) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(RCPT))
        events = await next_events(stream, 3)
        # As async_smtp: a presend "send at" is published as delayed, with its time.
        assert kinds(events) == [("spooled", None), ("presend", "send_at"), ("delayed", None)]
        assert (events[2].id, events[2].at) == (mid, START + 10 * MINUTE)
        await wait_until(lambda: not spool.running_sends, "the attempt to end")
        assert relay.attempts == []
        assert read_record(tmp_path, "active", mid).status == SendAt(at=START + 10 * MINUTE)
        assert read_record(tmp_path, "active", mid).relay_attempts == []

        clock.advance(9 * MINUTE)
        # A probe sent and delivered shows the scheduler has gone round.
        probe = await round_trip(spool, relay, "probe@example.com")
        assert presend.asked == [mid, probe]
        assert kinds(await next_events(stream, 3)) == [
            ("spooled", None),
            ("presend", "send_now"),
            ("delivered", None),
        ]
        clock.advance(MINUTE)
        events = await next_events(stream, 2)
        assert kinds(events) == [("presend", "send_now"), ("delivered", None)]
        assert presend.asked == [mid, probe, mid]
        assert is_gone(tmp_path, mid)


@pytest.mark.parametrize(
    ("decision", "queue", "event"),
    [(Frozen(), "frozen", "frozen"), (Removed(), "removed", "removed")],
)
async def test_presend_answering_freeze_or_remove(
    tmp_path: Path, decision: PresendDecision, queue: str, event: str
) -> None:
    presend = RecordingPresend(decision)
    relay = relay_answering({})
    async with (
        open_spool(tmp_path, relay, FakeClock(START), presend=presend) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(RCPT))
        events = await next_events(stream, 3)
        detail = "freeze" if queue == "frozen" else "remove"
        assert kinds(events) == [("spooled", None), ("presend", detail), (event, None)]
        assert places(tmp_path, mid) == [queue]
        assert (tmp_path / "data" / mid).exists()
        assert relay.attempts == []
        assert (await spool.get_message(mid)).status == decision
        assert (status_of(spool, mid) is not None) == (queue == "frozen")


async def test_presend_that_raises_is_try_later(tmp_path: Path) -> None:
    presend = RecordingPresend(RuntimeError("policy database down"))
    relay = relay_answering({})
    async with (
        open_spool(tmp_path, relay, FakeClock(START), presend=presend) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(RCPT))
        events = await next_events(stream, 2)
        assert kinds(events) == [("spooled", None), ("delayed", None)]
        assert events[1].at == START + MINUTE
        assert relay.attempts == []
        assert places(tmp_path, mid) == ["active"]
        msg = read_record(tmp_path, "active", mid)
        assert msg.status == SendAt(at=START + MINUTE)
        assert [a.error for a in msg.relay_attempts] == [
            "presend hook failed: RuntimeError('policy database down')"
        ]
        assert msg.retry_intervals == intervals(5)


async def test_presend_answering_a_time_without_zone_does_not_break_the_spool(
    tmp_path: Path,
) -> None:
    """A send_at time without a time zone cannot be written in a record
    (it would not read back). hooks.py: an answer that is not one of the
    choices is taken as try later. The spool must not write it."""
    naive = (START + 10 * MINUTE).replace(tzinfo=None)
    presend = RecordingPresend(SendAt(at=naive))
    relay = relay_answering({})
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay, clock, presend=presend) as spool:
        (mid,) = await spool.add(batch(RCPT))
        await wait_until(lambda: presend.asked and not spool.running_sends, "the attempt to end")
        statuses = spool.status()  # must not raise
        assert [m.id for m in statuses] == [mid]
    async with open_spool(tmp_path, relay, clock) as spool:
        assert places(tmp_path, mid) == ["active"]
        assert status_of(spool, mid) is not None


async def test_on_error_done_counts_the_recipient_as_dealt_with(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []

    async def on_error(message: Message, rcpt: str, result: RecipientResult) -> ErrorAction:
        seen.append((rcpt, result.code))
        return ErrorAction.DONE

    relay = relay_answering({"gone@example.com": NO_SUCH_USER})
    async with (
        open_spool(tmp_path, relay, FakeClock(START), on_error=on_error) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(RCPT, "gone@example.com"))
        events = await next_events(stream, 3)
        assert kinds(events)[2] == ("delivered", None)
        assert seen == [("gone@example.com", 550)]
        assert is_gone(tmp_path, mid)
        assert [r for _, r, _ in relay.delivered] == [RCPT]


async def test_on_error_rate_limited_keeps_the_head_interval(tmp_path: Path) -> None:
    answer = [ErrorAction.TRY_LATER_RATE_LIMITED]

    def on_error(message: Message, rcpt: str, result: RecipientResult) -> ErrorAction:
        return answer[0]

    relay = relay_answering({RCPT: TRY_LATER})
    clock = FakeClock(START)
    async with (
        open_spool(
            tmp_path, relay, clock, on_error=on_error, default_retry_intervals=intervals(1, 5)
        ) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(RCPT))
        events = await next_events(stream, 4)
        assert (events[2].kind, events[2].at) == ("delayed_rate_limited", START + MINUTE)
        # The hop is backed off for every message, for a minute at first.
        assert (events[3].kind, events[3].detail, events[3].at) == (
            "throttled",
            "memory",
            START + MINUTE,
        )
        msg = read_record(tmp_path, "active", mid)
        assert msg.status == SendAt(at=START + MINUTE)
        assert msg.retry_intervals == intervals(1, 5)  # not consumed
        assert len(msg.relay_attempts) == 1

        answer[0] = ErrorAction.TRY_LATER  # a plain try-later consumes the head
        clock.advance(MINUTE)
        events = await next_events(stream, 2)
        assert (events[1].kind, events[1].at) == ("delayed", START + 2 * MINUTE)
        msg = read_record(tmp_path, "active", mid)
        assert msg.retry_intervals == intervals(5)
        assert len(msg.relay_attempts) == 2


async def test_on_error_that_raises_is_try_later(tmp_path: Path) -> None:
    def on_error(message: Message, rcpt: str, result: RecipientResult) -> ErrorAction:
        raise RuntimeError("hook bug")

    # A 550 would fail permanently by default; the broken hook makes it try later.
    relay = relay_answering({RCPT: NO_SUCH_USER})
    async with (
        open_spool(tmp_path, relay, FakeClock(START), on_error=on_error) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(RCPT))
        events = await next_events(stream, 3)
        assert (events[2].kind, events[2].at) == ("delayed", START + MINUTE)
        msg = read_record(tmp_path, "active", mid)
        assert msg.status == SendAt(at=START + MINUTE)
        assert msg.remaining_recipients == [RCPT]
        assert msg.failed_recipients == []
        assert [a.error for a in msg.relay_attempts] == [
            f"{RCPT}: 550 5.1.1 no such user via memory"
        ]


# ================================================================== events


async def test_events_of_a_whole_life(tmp_path: Path) -> None:
    answers: dict[str, Answer] = {RCPT: TRY_LATER}
    relay = relay_answering(answers)
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay, clock) as spool, spool.events() as stream:
        (mid,) = await spool.add(batch(RCPT))
        life = await next_events(stream, 3)
        await wait_until(lambda: not spool.running_sends, "the attempt to end")
        await spool.freeze([mid])
        life += await next_events(stream, 1)
        answers.clear()
        await spool.send([mid])
        life += await next_events(stream, 3)

        assert kinds(life) == [
            ("spooled", None),
            ("presend", "send_now"),
            ("delayed", None),
            ("frozen", None),
            ("unfrozen", None),
            ("presend", "send_now"),
            ("delivered", None),
        ]
        assert {e.id for e in life} == {mid}
        assert [e.at for e in life] == [None, None, START + MINUTE, None, None, None, None]
        assert all(e.time == START for e in life)
        assert all(e.envelope_info is not None for e in life)
        assert {e.envelope_info.sender for e in life if e.envelope_info} == {SENDER}
        assert is_gone(tmp_path, mid)


async def test_ping_every_interval(tmp_path: Path) -> None:
    clock = FakeClock(START)
    relay = relay_answering({})
    async with (
        open_spool(tmp_path, relay, clock, ping_interval=30.0) as spool,
        spool.events() as stream,
    ):
        await settle()
        clock.advance(30)
        (ping,) = await next_events(stream, 1)
        assert (ping.kind, ping.id, ping.time) == ("ping", None, START + timedelta(seconds=30))


async def test_a_slow_subscriber_does_not_stall_delivery(tmp_path: Path) -> None:
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        slow = spool.events(max_buffer=3)
        full = spool.events()
        ids = [(await spool.add(batch(f"r{i}@example.com")))[0] for i in range(50)]
        await wait_until(lambda: len(relay.delivered) == 50 and not spool.status(), "50 deliveries")
        assert sorted(delivered_ids(relay)) == sorted(ids)
        assert not spool.running_sends

        everything = await next_events(full, 150)
        assert sorted(e.kind for e in everything) == sorted(
            ["spooled", "presend", "delivered"] * 50
        )
        first = await next_events(slow, 4)
        assert first[:3] == everything[:3]
        assert (first[3].kind, first[3].detail) == ("overflow", str(150 - 3))

        # Nothing is lost silently afterwards: the next events come through.
        (later,) = await spool.add(batch("late@example.com"))
        after = await next_events(slow, 3)
        assert after == await next_events(full, 3)
        assert [(e.kind, e.id) for e in after] == [
            ("spooled", later),
            ("presend", later),
            ("delivered", later),
        ]
        slow.close()
        full.close()


# ============================================================= concurrency


async def test_max_concurrent_send_jobs_is_honoured_and_changeable(tmp_path: Path) -> None:
    gate = anyio.Event()
    relay = relay_answering({}, gate)
    async with open_spool(tmp_path, relay, FakeClock(START), max_concurrent_send_jobs=3) as spool:
        for i in range(10):
            await spool.add(batch(f"r{i}@example.com"))
        await wait_until(lambda: len(relay.attempts) == 3, "three attempts")
        await settle()
        assert len(relay.attempts) == 3
        assert spool.running_sends == 3
        assert spool.counts() == {Queue.ACTIVE: 10, Queue.FROZEN: 0}
        assert spool.sending == 3

        spool.max_concurrent_send_jobs = 5
        await wait_until(lambda: len(relay.attempts) == 5, "five attempts")
        await settle()
        assert len(relay.attempts) == 5
        assert spool.running_sends == 5

        gate.set()
        await wait_until(lambda: len(relay.delivered) == 10 and not spool.status(), "all sent")
        assert len({mid for mid, _ in relay.attempts}) == 10


async def test_send_jobs_idle_between_messages_count_as_nothing_and_take_the_next(
    tmp_path: Path,
) -> None:
    # A send job with nothing left to do waits for the next message (it is
    # not counted as sending meanwhile); each message added later is sent
    # once, and the job count still holds when it is lowered.
    relay = InMemoryRelay()
    async with open_spool(tmp_path, relay, FakeClock(START), max_concurrent_send_jobs=4) as spool:
        for i in range(6):
            await spool.add(batch(f"r{i}@example.com"))
            await wait_until(lambda i=i: len(relay.delivered) == i + 1, "the message sent")
            await wait_until(lambda: spool.sending == 0, "its job to be idle")
        gate = anyio.Event()
        held = relay_answering({}, gate)
        spool.relay = held
        spool.max_concurrent_send_jobs = 2
        for i in range(5):
            await spool.add(batch(f"s{i}@example.com"))
        await wait_until(lambda: len(held.attempts) == 2, "two attempts")
        await settle()
        assert (len(held.attempts), spool.sending) == (2, 2)
        gate.set()
        await wait_until(lambda: len(held.delivered) == 5 and not spool.status(), "all sent")
        assert len({mid for mid, _ in held.attempts}) == 5
        await wait_until(lambda: spool.sending == 0, "the jobs to be idle")


async def test_kill_and_flush_waits_for_running_sends(tmp_path: Path) -> None:
    gate = anyio.Event()
    relay = relay_answering({}, gate)
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        (frozen,) = await spool.add(batch(RCPT), frozen=True)
        (mid,) = await spool.add(batch(RCPT))
        await wait_until(relay.started.is_set, "the attempt to start")

        with pytest.raises(TimeoutError):
            await spool.kill_and_flush(0.05)
        assert places(tmp_path, mid) == ["active/.checkout"]
        with pytest.raises(SpoolClosedError):
            await spool.add(batch(RCPT))

        flushed = anyio.Event()

        async def flush() -> None:
            await spool.kill_and_flush(5)
            flushed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(flush)
            await settle()
            assert not flushed.is_set()
            gate.set()
            with anyio.fail_after(WAIT_TIMEOUT):
                await flushed.wait()
            assert delivered_ids(relay) == [mid]
            assert is_gone(tmp_path, mid)

        # Stopped: operator changes are refused (as async_smtp), not
        # silently accepted to wait for a start that may never come.
        with pytest.raises(SpoolClosedError, match="shutting down"):
            await spool.send([frozen])
        await settle()
        assert attempts_for(relay, frozen) == []
        assert places(tmp_path, frozen) == ["frozen"]


async def test_close_with_messages_waiting_and_sending_then_reopen(tmp_path: Path) -> None:
    clock = FakeClock(START)
    answers: dict[str, Answer] = {"later@example.com": TRY_LATER}
    relay = relay_answering(answers)
    async with open_spool(
        tmp_path, relay, clock, flush_timeout=0.2, default_retry_intervals=intervals(10)
    ) as spool:
        (waiting,) = await spool.add(batch("later@example.com"))
        await wait_until(lambda: isinstance(status_of(spool, waiting), SendAt), "send_at")
        relay.gate = anyio.Event()
        (sending,) = await spool.add(batch(RCPT))
        await wait_until(lambda: attempts_for(relay, sending), "the attempt to start")
    # Closing cancelled the held attempt: its record stays checked out.
    relay.gate.set()
    assert places(tmp_path, waiting) == ["active"]
    assert places(tmp_path, sending) == ["active/.checkout"]
    assert relay.delivered == []
    on_disk, unreadable = await Spool.status_from_disk(tmp_path)
    assert unreadable == []
    assert {m.id: m.status for m in on_disk} == {
        waiting: SendAt(at=START + 10 * MINUTE),
        sending: Sending(),
    }

    fresh = relay_answering({})
    async with open_spool(tmp_path, fresh, clock) as spool:
        await wait_until(
            lambda: is_delivered(spool, tmp_path, sending), "the interrupted one to be delivered"
        )
        assert fresh.attempts == [(sending, (RCPT,))]
        assert status_of(spool, waiting) == SendAt(at=START + 10 * MINUTE)
        probe = await round_trip(spool, fresh, "probe@example.com")
        assert attempts_for(fresh, waiting) == []

        clock.advance(10 * MINUTE)
        await wait_until(
            lambda: is_delivered(spool, tmp_path, waiting), "the waiting one to be delivered"
        )
        assert sorted(delivered_ids(fresh)) == sorted([waiting, sending, probe])
        assert spool.status() == []


# ========================================================= adding messages


async def test_add_frozen_goes_to_frozen(tmp_path: Path) -> None:
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool, spool.events() as stream:
        (mid,) = await spool.add(batch(RCPT), frozen=True)
        assert kinds(await next_events(stream, 2)) == [("spooled", None), ("frozen", None)]
        assert places(tmp_path, mid) == ["frozen"]
        assert (tmp_path / "data" / mid).read_bytes() == BODY.wire
        assert status_of(spool, mid) == Frozen()
        probe = await round_trip(spool, relay, "probe@example.com")
        assert relay.attempts == [(probe, ("probe@example.com",))]


async def test_quarantine_writes_into_quarantine_with_the_reason(tmp_path: Path) -> None:
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool, spool.events() as stream:
        (mid,) = await spool.quarantine("virus found: Eicar", batch(RCPT))
        (event,) = await next_events(stream, 1)
        assert (event.kind, event.id, event.detail) == ("quarantined", mid, "virus found: Eicar")
        assert places(tmp_path, mid) == ["quarantine"]
        assert read_record(tmp_path, "quarantine", mid).status == Quarantined(
            reason="virus found: Eicar"
        )
        assert (await spool.get_message(mid)).status == Quarantined(reason="virus found: Eicar")
        assert spool.status() == []
        probe = await round_trip(spool, relay, "probe@example.com")
        assert relay.attempts == [(probe, ("probe@example.com",))]


async def test_one_submission_with_three_envelopes(tmp_path: Path) -> None:
    envelopes = [
        RoutedEnvelope(SENDER, [f"r{i}@example.com"], [f"mx{i}.example.net:25"]) for i in range(3)
    ]
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        ids = await spool.add(RoutedBatch(envelopes, BODY), frozen=True, flows=["flow-1"])
        assert len(set(ids)) == 3
        records = [read_record(tmp_path, "frozen", mid) for mid in ids]
        assert len({m.parent_id for m in records}) == 1
        assert records[0].parent_id not in ids
        for mid, msg in zip(ids, records, strict=True):
            assert sorted(msg.related_ids) == sorted(set(ids) - {mid})
            assert msg.flows == ["flow-1"]
            assert (tmp_path / "data" / mid).read_bytes() == BODY.wire
        assert [m.next_hop_choices for m in records] == [[e.next_hop_choices[0]] for e in envelopes]
        assert [m.remaining_recipients for m in records] == [list(e.recipients) for e in envelopes]


# ================================================================ reading


async def test_status_reads_no_body(tmp_path: Path) -> None:
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        (mid,) = await spool.add(batch(RCPT), frozen=True)
        (tmp_path / "data" / mid).unlink()
        (msg,) = spool.status()
        assert (msg.id, msg.status, msg.remaining_recipients) == (mid, Frozen(), [RCPT])
        on_disk, _ = await Spool.status_from_disk(tmp_path)
        assert [m.id for m in on_disk] == [mid]


async def test_status_and_count_from_disk_with_and_without_an_owner(tmp_path: Path) -> None:
    gate = anyio.Event()
    answers: dict[str, Answer] = {"later@example.com": TRY_LATER}
    relay = relay_answering(answers)
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay, clock) as spool:
        (waiting,) = await spool.add(batch("later@example.com"))
        await wait_until(lambda: isinstance(status_of(spool, waiting), SendAt), "send_at")
        relay.gate = gate
        (frozen,) = await spool.add(batch(RCPT), frozen=True)
        (removed,) = await spool.add(batch(RCPT), frozen=True)
        await spool.remove([removed])
        (quarantined,) = await spool.quarantine("spam", batch(RCPT))
        (sending,) = await spool.add(batch(RCPT))
        await wait_until(lambda: attempts_for(relay, sending), "the attempt to start")
        await spool.flush_history()  # the removal's journal line is on disk now

        files = spool_files(tmp_path)
        on_disk, unreadable = await Spool.status_from_disk(tmp_path)
        assert unreadable == []
        assert {m.id: m.status for m in on_disk} == {
            waiting: SendAt(at=START + MINUTE),
            frozen: Frozen(),
            removed: Removed(),
            quarantined: Quarantined(reason="spam"),
            sending: Sending(),
        }
        assert await Spool.count_from_disk(tmp_path) == {
            "active": 2,
            "frozen": 1,
            "sending": 1,
            "removed": 1,
            "quarantine": 1,
        }
        assert spool_files(tmp_path) == files  # reading changed nothing

        gate.set()  # the owner carries on
        await wait_until(lambda: is_delivered(spool, tmp_path, sending), "delivery")

    assert await Spool.count_from_disk(tmp_path) == {
        "active": 1,
        "frozen": 1,
        "sending": 0,
        "removed": 1,
        "quarantine": 1,
    }
    on_disk, _ = await Spool.status_from_disk(tmp_path)
    assert [m.id for m in on_disk] == sorted([waiting, frozen, removed, quarantined])


async def test_get_message_from_memory_and_from_disk(tmp_path: Path) -> None:
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        (frozen,) = await spool.add(batch(RCPT), frozen=True)
        (removed,) = await spool.add(batch("other@example.com"), frozen=True)
        await spool.remove([removed])

        msg = await spool.get_message(frozen)
        assert (msg.id, msg.status, msg.remaining_recipients) == (frozen, Frozen(), [RCPT])
        msg.remaining_recipients.append("tamper@example.com")  # a snapshot: changes nothing
        assert (await spool.get_message(frozen)).remaining_recipients == [RCPT]

        gone = await spool.get_message(removed)
        assert (gone.id, gone.status) == (removed, Removed())
        assert gone.remaining_recipients == ["other@example.com"]

        with pytest.raises(NotFoundError) as info:
            await spool.get_message("NoSuchMessage")
        assert "NoSuchMessage" in str(info.value)


async def test_a_second_open_of_the_same_spool_is_refused(tmp_path: Path) -> None:
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        (mid,) = await spool.add(batch(RCPT), frozen=True)
        with pytest.raises(SpoolLockedError, match="already owned"):
            async with open_spool(tmp_path, relay, FakeClock(START)):
                pass
        assert status_of(spool, mid) == Frozen()  # the owner is unaffected
        await spool.send([mid])
        await wait_until(lambda: is_delivered(spool, tmp_path, mid), "delivery")


# ================================================== several ids at once


@pytest.mark.parametrize("which", ["ids", "frozen_only", "all"])
async def test_sending_several_messages_sends_every_one(tmp_path: Path, which: str) -> None:
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        ids = [(await spool.add(batch(f"r{i}@example.com"), frozen=True))[0] for i in range(3)]
        if which == "ids":
            selected = await spool.send(ids)
        else:
            selected = await spool.send(which="all" if which == "all" else "frozen_only")
        assert sorted(selected) == sorted(ids)

        def left() -> str:
            stuck = [(m.id, m.status.name) for m in spool.status()]
            return f"all three to be delivered; delivered {delivered_ids(relay)}, left {stuck}"

        # The clock stays put: they must go without it.
        await wait_until(lambda: all(is_delivered(spool, tmp_path, mid) for mid in ids), left)


@pytest.mark.parametrize("operation", ["freeze", "remove", "recover_removed"])
async def test_an_id_given_twice_is_handled_once(tmp_path: Path, operation: str) -> None:
    relay = relay_answering({RCPT: TRY_LATER})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool, spool.events() as stream:
        if operation == "freeze":
            (mid,) = await spool.add(batch(RCPT))
            await wait_until(lambda: isinstance(status_of(spool, mid), SendAt), "send_at")
            target, event_kind, events_before = "frozen", "frozen", 3
        else:
            (mid,) = await spool.add(batch(RCPT), frozen=True)
            target, event_kind, events_before = "removed", "removed", 2
            if operation == "recover_removed":
                await spool.remove([mid])
                target, event_kind, events_before = "frozen", "recovered", 3
        await next_events(stream, events_before)

        call = {
            "freeze": lambda: spool.freeze([mid, mid]),
            "remove": lambda: spool.remove([mid, mid]),
            "recover_removed": lambda: spool.recover([mid, mid], from_="removed"),
        }[operation]
        await call()
        assert places(tmp_path, mid) == [target]
        (event,) = await next_events(stream, 1)
        assert (event.kind, event.id) == (event_kind, mid)
        await assert_no_event_since(spool, stream)


# ===================================== a record stored as "sending" (not by us)


async def test_a_record_stored_as_sending_loads_as_send_now(tmp_path: Path) -> None:
    """``sending`` is this spool's in-memory status during an attempt; a
    record written with it (by hand, or by another tool) must still be sent,
    not sit unscheduled in ``active`` for ever."""
    writer, _ = await OnDiskSpool.open(tmp_path)
    async with writer:
        (stored,) = await writer.add([new_message(status=Sending())])
    assert read_record(tmp_path, "active", stored.id).status == Sending()

    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        await wait_until(lambda: is_delivered(spool, tmp_path, stored.id), "it to be delivered")
    assert attempts_for(relay, stored.id) == [("rcpt@example.com",)]


async def test_a_record_added_as_sending_by_another_process_is_adopted_as_send_now(
    tmp_path: Path,
) -> None:
    relay = relay_answering({})
    async with (
        open_spool(tmp_path, relay, FakeClock(START)) as spool,
        spool.events() as events,
    ):
        writer, _ = await OnDiskSpool.open(tmp_path, owner=False)
        async with writer:
            (stored,) = await writer.add([new_message(status=Sending())])
        with anyio.fail_after(WAIT_TIMEOUT):
            async for event in events:
                if event.kind == "delivered" and event.id == stored.id:
                    break
    assert attempts_for(relay, stored.id) == [("rcpt@example.com",)]


# -----------------------------------------------------------------------------
# Where spoold behaves as async_smtp's spool does (issue 13, point 7): a 421
# goes through on_error, a presend "send at" is published as delayed, the
# operator operations are refused after kill_and_flush, a directory that is
# not a spool is not taken for one, and (issue 19) a message whose retry
# intervals are used up is frozen, with the default policy (no lifetime) or
# ``retries_exhausted = freeze`` beside a lifetime.


async def test_a_421_reaches_on_error_which_may_answer_rate_limited(
    smtp_server: SmtpTestServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    smtp_server.behaviour.rcpt[RCPT] = Reply("421 4.7.0 too fast, closing")
    asked: list[tuple[str, RecipientResult]] = []

    def on_error(message: Message, rcpt: str, result: RecipientResult) -> ErrorAction:
        asked.append((rcpt, result))
        return ErrorAction.TRY_LATER_RATE_LIMITED

    submission = RoutedBatch([RoutedEnvelope(SENDER, [RCPT], [smtp_server.hop])], BODY)
    async with (
        open_spool(tmp_path, make_relay(route()), FakeClock(START), on_error=on_error) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(submission)
        events = await next_events(stream, 4)

    assert asked == [(RCPT, RecipientResult(421, "too fast, closing", "4.7.0"))]
    assert [e.kind for e in events] == [
        EventKind.SPOOLED,
        EventKind.PRESEND,
        EventKind.DELAYED_RATE_LIMITED,
        EventKind.THROTTLED,
    ]
    assert (events[2].id, events[2].at) == (mid, START + MINUTE)
    assert (events[3].detail, events[3].at) == (smtp_server.hop, START + MINUTE)
    assert smtp_server.messages == []


@pytest.mark.parametrize(
    "policy",
    [
        DeliveryPolicy(),
        DeliveryPolicy(
            max_queue_lifetime=5 * 24 * 60 * MINUTE, retries_exhausted=RetriesExhausted.FREEZE
        ),
    ],
    ids=["no lifetime", "freeze beside a lifetime"],
)
async def test_a_message_whose_intervals_are_used_up_is_frozen(
    tmp_path: Path, policy: DeliveryPolicy
) -> None:
    clock = FakeClock(START)
    relay = relay_answering({RCPT: TRY_LATER})
    async with (
        open_spool(tmp_path, relay, clock, delivery_policy=policy) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(RCPT, retry_intervals=intervals(1, 5)))
        kinds = []
        while EventKind.FROZEN not in kinds and len(kinds) < 10:  # bounded
            (event,) = await next_events(stream, 1)
            kinds.append(event.kind)
            if event.kind is EventKind.DELAYED:
                assert event.at is not None
                clock.advance(event.at - clock.now())
    kinds = [k for k in kinds if k is not EventKind.PRESEND]
    # attempts at 0, 1m and 6m, then frozen
    assert kinds == [EventKind.SPOOLED, EventKind.DELAYED, EventKind.DELAYED, EventKind.FROZEN]
    assert places(tmp_path, mid) == ["frozen"]


async def test_a_presend_send_at_is_published_as_delayed(tmp_path: Path) -> None:
    later = START + 7 * MINUTE
    relay = relay_answering({})
    async with (
        open_spool(tmp_path, relay, FakeClock(START), presend=lambda _m: SendAt(at=later)) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(RCPT))
        events = await next_events(stream, 3)
    assert [(e.kind, e.id) for e in events] == [
        (EventKind.SPOOLED, mid),
        (EventKind.PRESEND, mid),
        (EventKind.DELAYED, mid),
    ]
    assert events[2].at == later
    assert relay.attempts == []


Operation = Callable[[Spool, str, str], Awaitable[object]]

OPERATOR_OPERATIONS: dict[str, Operation] = {
    "freeze": lambda s, active, _frozen: s.freeze([active]),
    "send": lambda s, _active, frozen: s.send([frozen]),
    "send all": lambda s, _active, _frozen: s.send(which="all"),
    "remove": lambda s, _active, frozen: s.remove([frozen]),
    "recover": lambda s, _active, frozen: s.recover([frozen], from_="removed"),
    "reroute": lambda s, active, _frozen: s.reroute([active]),
    "add": lambda s, _active, _frozen: s.add(batch(RCPT)),
}


@pytest.mark.parametrize("operation", OPERATOR_OPERATIONS.values(), ids=OPERATOR_OPERATIONS.keys())
async def test_after_kill_and_flush_operator_operations_are_refused(
    tmp_path: Path, operation: Operation
) -> None:
    raw = {"spool": {"dir": "spool"}, "routes": {"r": {"next_hops": ["127.0.0.1:9"]}}}
    router = Router(parse_config(raw, tmp_path / "spoold.toml"))
    clock = FakeClock(START)
    # The active message waits for its next attempt (a minute away).
    relay = relay_answering({RCPT: RecipientResult(451, "later", "4.3.0")})
    spool_dir = tmp_path / "spool"
    async with open_spool(spool_dir, relay, clock, routes=router) as spool:
        async with spool.events() as stream:
            (active,) = await spool.add(batch(RCPT, retry_intervals=intervals(1)))
            (frozen,) = await spool.add(batch(RCPT), frozen=True)
            while (await next_events(stream, 1))[0].kind != EventKind.DELAYED:
                pass
        before = {m.id: m for m in spool.status()}
        await spool.kill_and_flush(5)

        with pytest.raises(SpoolClosedError, match=r"shutting down|closing"):
            await operation(spool, active, frozen)

        await settle()
        assert {m.id: m for m in spool.status()} == before  # nothing was changed
        assert places(spool_dir, active) == ["active"]
        assert places(spool_dir, frozen) == ["frozen"]
        assert sorted(os.listdir(spool_dir / "active")) == [".checkout", ".reasons", active]


async def test_a_directory_holding_other_files_is_not_taken_for_a_spool(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine\n")
    (home / "tmp").mkdir()  # a name a spool uses does not make it one

    with pytest.raises(StoreError, match="not a spool directory") as info:
        async with Spool.open(home, relay=relay_answering({}), clock=FakeClock(START)):
            pass

    assert "notes.txt" in str(info.value)
    assert sorted(os.listdir(home)) == ["notes.txt", "tmp"]  # nothing created


@pytest.mark.parametrize("state", ["missing", "empty", "existing spool"])
async def test_missing_empty_or_existing_spool_directories_open(tmp_path: Path, state: str) -> None:
    spool_dir = tmp_path / "spool"
    if state != "missing":
        spool_dir.mkdir()
    mid = None
    if state == "existing spool":
        async with open_spool(spool_dir, relay_answering({}), FakeClock(START)) as spool:
            (mid,) = await spool.add(batch(RCPT), frozen=True)
        (spool_dir / "control.sock").write_text("")  # the daemon keeps its socket here

    async with open_spool(spool_dir, relay_answering({}), FakeClock(START)) as spool:
        assert [m.id for m in spool.status()] == ([mid] if mid else [])


async def test_a_message_knows_its_spool_dir_without_storing_it(tmp_path: Path) -> None:
    """The seed's ``Message.spool_dir``: set on every message the spool
    reads or writes, never written into the record."""
    spool_dir = tmp_path / "spool"
    async with open_spool(spool_dir, relay_answering({}), FakeClock(START)) as spool:
        (mid,) = await spool.add(batch(RCPT), frozen=True)  # from add
        assert (await spool.get_message(mid)).spool_dir == spool_dir
        (listed,) = spool.status()
        assert listed.spool_dir == spool_dir
    record = (spool_dir / "frozen" / mid).read_bytes()
    assert b"spool_dir" not in record and str(tmp_path).encode() not in record

    async with open_spool(spool_dir, relay_answering({}), FakeClock(START)) as spool:
        (loaded,) = spool.status()  # from a reload of the spool
        assert (loaded.id, loaded.spool_dir) == (mid, spool_dir)
    (from_disk,), _ = await Spool.status_from_disk(spool_dir)
    assert from_disk.spool_dir == spool_dir

    made = decode_record(record)  # not from a spool: not known
    assert made.spool_dir is None
    made.spool_dir = tmp_path / "elsewhere"
    assert made.spool_dir == tmp_path / "elsewhere"
    assert encode_record(made) == record
