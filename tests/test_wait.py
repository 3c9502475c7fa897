"""Spool.wait: the outcome of a message, waited for or remembered."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from spoold.errors import (
    InvalidIdError,
    NotFoundError,
    SpoolClosedError,
    SpooldError,
    WaitTimeoutError,
)
from spoold.ids import new_id
from spoold.message import EnvelopeInfo
from spoold.testing import FakeClock
from spoold.waiting import MessageOutcome, OutcomeBoard, OutcomeKind
from spoold.writer import SpoolWriter
from tests.spool_helpers import (
    NO_SUCH_USER,
    SENDER,
    START,
    TRY_LATER,
    batch,
    intervals,
    open_spool,
    relay_answering,
)
from tests.support import WAIT_TIMEOUT, wait_until


async def test_wait_returns_delivered_once_the_message_is_delivered(tmp_path: Path) -> None:
    gate = anyio.Event()
    relay = relay_answering({}, gate=gate)
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay, clock) as spool:
        (mid,) = await spool.add(batch("a@example.com"))
        got: list[MessageOutcome] = []

        async def waiter() -> None:
            got.append(await spool.wait(mid, timeout=WAIT_TIMEOUT))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_until(lambda: relay.started.is_set(), "the attempt to start")
            await wait_until(lambda: spool.waiters == 1, "the waiter to watch")
            assert got == []  # the attempt is held at the gate: no outcome yet
            gate.set()
        (outcome,) = got
        assert (outcome.id, outcome.kind, outcome.time) == (mid, OutcomeKind.DELIVERED, START)
        assert outcome.envelope_info == EnvelopeInfo(SENDER, ["a@example.com"])
        assert outcome.failed_recipients == () and outcome.last_error is None
        # Remembered: asking again after the fact gives the same answer at once.
        assert await spool.wait(mid, timeout=0) == outcome
        assert spool.waiters == 0


async def test_wait_returns_frozen_with_the_failed_recipients(tmp_path: Path) -> None:
    relay = relay_answering({"bad@example.com": NO_SUCH_USER})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        (mid,) = await spool.add(batch("good@example.com", "bad@example.com"))
        outcome = await spool.wait(mid, timeout=WAIT_TIMEOUT)
    assert outcome.kind is OutcomeKind.FROZEN
    assert outcome.failed_recipients == ("bad@example.com",)
    assert outcome.last_error is not None and "550" in outcome.last_error
    assert outcome.time == START


async def test_wait_returns_removed_and_a_frozen_message_at_once(tmp_path: Path) -> None:
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        (mid,) = await spool.add(batch("a@example.com"), frozen=True)
        frozen = await spool.wait(mid, timeout=0)  # frozen now: no waiting
        assert (frozen.kind, frozen.failed_recipients) == (OutcomeKind.FROZEN, ())
        await spool.remove([mid])
        removed = await spool.wait(mid, timeout=0)
        assert (removed.kind, removed.time) == (OutcomeKind.REMOVED, START)
    # After a restart the outcome is read from the record in removed (no time).
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        again = await spool.wait(mid, timeout=0)
    assert (again.kind, again.time, again.id) == (OutcomeKind.REMOVED, None, mid)
    assert relay.attempts == []


async def test_a_thawed_message_is_waited_for_again(tmp_path: Path) -> None:
    answers = {"a@example.com": NO_SUCH_USER}
    relay = relay_answering(answers)
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        (mid,) = await spool.add(batch("a@example.com"))
        assert (await spool.wait(mid, timeout=WAIT_TIMEOUT)).kind is OutcomeKind.FROZEN
        del answers["a@example.com"]
        await spool.send([mid])
        assert (await spool.wait(mid, timeout=WAIT_TIMEOUT)).kind is OutcomeKind.DELIVERED


async def test_wait_times_out_with_a_spoold_timeout_error(tmp_path: Path) -> None:
    relay = relay_answering({"a@example.com": TRY_LATER})
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay, clock) as spool:
        (mid,) = await spool.add(batch("a@example.com", retry_intervals=intervals(60)))
        await wait_until(lambda: len(relay.attempts) == 1, "the first attempt")
        with pytest.raises(WaitTimeoutError) as caught:
            await spool.wait(mid, timeout=0.01)  # delayed for an hour of the fake clock
        assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, SpooldError)
        assert caught.value.message_id == mid
        assert str(caught.value) == f"{mid}: no outcome within 0.01 s; still in the queue"
        assert spool.waiters == 0  # the timed-out wait left nothing behind


async def test_unknown_and_invalid_ids_are_clear_errors(tmp_path: Path) -> None:
    async with open_spool(tmp_path, relay_answering({}), FakeClock(START)) as spool:
        unknown = new_id()
        with pytest.raises(NotFoundError) as caught:
            await spool.wait(unknown, timeout=WAIT_TIMEOUT)
        assert str(caught.value) == (
            f"{unknown}: no such message: not in the spool, and no outcome remembered for it"
        )
        with pytest.raises(InvalidIdError):
            await spool.wait("../etc/passwd", timeout=WAIT_TIMEOUT)


async def test_a_message_another_process_added_is_found_and_waited_for(
    tmp_path: Path,
) -> None:
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        async with SpoolWriter.open(tmp_path, default_retry_intervals=intervals(1)) as writer:
            (mid,) = await writer.add(batch("a@example.com"))
        outcome = await spool.wait(mid, timeout=WAIT_TIMEOUT)
    assert (outcome.id, outcome.kind) == (mid, OutcomeKind.DELIVERED)


async def test_closing_the_spool_ends_a_wait(tmp_path: Path) -> None:
    relay = relay_answering({"a@example.com": TRY_LATER})
    errors: list[BaseException] = []
    # The waiter's task group encloses the spool: the spool closes under it.
    async with (
        anyio.create_task_group() as tg,
        open_spool(tmp_path, relay, FakeClock(START)) as spool,
    ):
        (mid,) = await spool.add(batch("a@example.com", retry_intervals=intervals(60)))

        async def waiter() -> None:
            try:
                await spool.wait(mid)
            except SpoolClosedError as exc:
                errors.append(exc)

        tg.start_soon(waiter)
        await wait_until(lambda: spool.waiters == 1, "the waiter to watch")
    assert [type(e) for e in errors] == [SpoolClosedError]
    assert mid in str(errors[0])


def test_the_board_remembers_a_bounded_number_of_outcomes() -> None:
    board = OutcomeBoard(max_remembered=2)
    ids = [new_id() for _ in range(3)]
    outcomes = [
        MessageOutcome(mid, OutcomeKind.DELIVERED, START + timedelta(seconds=n), None)
        for n, mid in enumerate(ids)
    ]
    for outcome in outcomes:
        board.reached(outcome)
    assert [board.recent(mid) for mid in ids] == [None, outcomes[1], outcomes[2]]
    # A newer outcome of a remembered message replaces it and counts as newest.
    bounced = MessageOutcome(ids[1], OutcomeKind.BOUNCED, START + timedelta(hours=1), None)
    board.reached(bounced)
    board.reached(outcomes[0])
    assert [board.recent(mid) for mid in ids] == [outcomes[0], bounced, None]


def test_a_watch_is_woken_by_the_outcome_of_its_message_only() -> None:
    board = OutcomeBoard()
    first, second = new_id(), new_id()
    watch = board.watch(first)
    board.reached(MessageOutcome(second, OutcomeKind.REMOVED, START, None))
    assert not watch.is_set()
    board.reached(MessageOutcome(first, OutcomeKind.REMOVED, START, None))
    assert watch.is_set() and board.watched == 0


async def test_a_quarantined_message_and_its_recovery(tmp_path: Path) -> None:
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        (mid,) = await spool.quarantine("looks like spam", batch("a@example.com"))
        held = await spool.wait(mid, timeout=0)
        assert (held.kind, held.detail, held.time) == (
            OutcomeKind.QUARANTINED,
            "looks like spam",
            START,
        )
        await spool.recover([mid], from_="quarantine")
        recovered = await spool.wait(mid, timeout=0)  # recovered messages are frozen
        assert (recovered.kind, recovered.detail) == (OutcomeKind.FROZEN, None)
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        assert (await spool.wait(mid, timeout=0)).kind is OutcomeKind.FROZEN
    assert relay.attempts == []


async def test_a_message_delivered_before_a_restart_is_found_in_the_history(
    tmp_path: Path,
) -> None:
    relay = relay_answering({})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        (mid,) = await spool.add(batch("a@example.com"))
        await spool.wait(mid, timeout=WAIT_TIMEOUT)
    # A new spool remembers nothing: the answer comes from the journal.
    async with open_spool(tmp_path, relay_answering({}), FakeClock(START)) as spool:
        assert await spool.find_outcome(mid) is not None  # the journal has it
        outcome = await spool.wait(mid, timeout=0)
    assert (outcome.id, outcome.kind, outcome.time) == (mid, OutcomeKind.DELIVERED, START)
    assert outcome.envelope_info == EnvelopeInfo(SENDER, ["a@example.com"])
    assert outcome.failed_recipients == ()
