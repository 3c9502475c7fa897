"""Errors come out of the library's ``async with`` blocks as themselves: an
exception raised in the block is not wrapped in an ExceptionGroup, and a
failure of the object's own tasks is one SpoolFailedError with its cause."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import anyio
import pytest

from spoold import BareLineEndingError, Body, SpoolFailedError, SpoolWriter
from spoold.testing import FakeClock
from tests.spool_helpers import START, batch, intervals, open_spool, relay_answering


class ClockThatBreaks(FakeClock):
    """A fake clock whose next wait, once :meth:`break_next` is called,
    raises: the spool's scheduler (which waits on its clock) then fails."""

    def __init__(self, start: datetime) -> None:
        super().__init__(start)
        self._break = False

    def break_next(self) -> None:
        self._break = True

    async def wait(self, event: anyio.Event, deadline: datetime | None) -> None:
        if self._break:
            self._break = False
            raise RuntimeError("the clock broke")
        await super().wait(event, deadline)


async def test_an_error_in_the_spool_block_is_caught_by_its_own_type(tmp_path: Path) -> None:
    raised: list[BaseException] = []
    try:
        async with open_spool(tmp_path, relay_answering({}), FakeClock(START)) as spool:
            await spool.add(batch("a@example.com"))
            try:
                Body.from_content(b"Subject: x\r\n\r\nbare\nline\r\n")
            except BareLineEndingError as exc:
                raised.append(exc)
                raise
    except BareLineEndingError as exc:
        caught: BaseException = exc
    assert len(raised) == 1 and caught is raised[0]  # the very object, unwrapped
    # The spool was closed properly all the same: it opens again at once.
    async with open_spool(tmp_path, relay_answering({}), FakeClock(START)):
        pass


async def test_a_failure_of_the_spools_own_tasks_is_one_spoold_error(tmp_path: Path) -> None:
    clock = ClockThatBreaks(START)
    with pytest.raises(SpoolFailedError) as caught:
        async with open_spool(tmp_path, relay_answering({}), clock) as spool:
            clock.break_next()
            await spool.add(batch("a@example.com"))  # wakes the scheduler, which fails
            await anyio.sleep_forever()  # cancelled when it does
    cause = caught.value.__cause__
    assert isinstance(cause, RuntimeError) and str(cause) == "the clock broke"
    assert str(caught.value) == f"spool {tmp_path} stopped: the clock broke"


async def test_an_error_in_the_writer_block_is_caught_by_its_own_type(tmp_path: Path) -> None:
    async with open_spool(tmp_path, relay_answering({}), FakeClock(START)):
        pass  # creates the spool a writer opens
    with pytest.raises(LookupError) as caught:
        async with SpoolWriter.open(tmp_path, default_retry_intervals=intervals(1)) as writer:
            await writer.add(batch("a@example.com"))
            raise LookupError("from the block")
    assert type(caught.value) is LookupError and str(caught.value) == "from the block"


async def test_cancelling_the_block_from_outside_is_still_a_cancellation(tmp_path: Path) -> None:
    with anyio.CancelScope() as scope:
        async with open_spool(tmp_path, relay_answering({}), FakeClock(START)):
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
