"""Jobs asked for at the same moment, run together in one worker-thread hop.

:class:`Batches` is the one mechanism behind both ways a store shares a
hop: the short calls of :meth:`~spoold.store.hops.WorkerHops.run_grouped`
(checkouts, deletes, body opens) and the group commit of
:class:`~spoold.store.commit.Committer` (new entries made durable with two
``syncfs`` for the whole batch). It knows nothing of files: a batch is a
list of jobs handed to one coroutine, which marks each job done.

Cancellation: a job cancelled while it still waits is dropped and never
runs; once its batch runs, its caller waits for it (shielded), so a job is
never left half done behind a caller that went away. A batch whose runner
is cancelled before its run did the others' jobs hands them back: they
wait for the next batch, and never see a cancellation that was not theirs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import anyio

__all__ = ["Batches", "Pending"]


class Pending(Protocol):
    """What :class:`Batches` needs of a job."""

    error: BaseException | None
    done: bool


_J = TypeVar("_J", bound=Pending)


class Batches(Generic[_J]):
    """Jobs submitted while a batch runs wait, and go together in the next
    one: the first of their callers to find no batch running runs it (with
    ``run``, one worker-thread hop for the whole batch). Alone, a job gets a
    batch of its own at once.

    Before taking a batch, its runner yields to the loop for as long as
    more jobs keep joining: the callers the last batch woke are about to
    submit their next jobs, which then share this batch instead of waiting
    behind a batch of one. Only the runner yields meanwhile; those who
    joined wait for the end of the batch. A job cancelled while it still waits is dropped
    and never runs; once its batch runs, its caller waits for it (as for
    any hop). ``run`` sets each job's ``done`` (and ``error``); if it
    raises, the jobs it left undone get that error.

    Plain asyncio futures (one per waiting caller, made only when a caller
    has to wait), not anyio events: this runs for every checkout, delete
    and group commit."""

    def __init__(self, run: Callable[[list[_J]], Awaitable[None]]) -> None:
        self._run = run
        self._waiting: list[_J] = []
        self._running = False
        # A caller is yielding to the loop while jobs join, before it runs
        # the next batch: the others wait for that batch to end, not yield too.
        self._gathering = False
        self._over: list[asyncio.Future[None]] = []  # callers waiting for the batch to end

    async def _batch_over(self) -> None:
        """Wait until the batch running now ends."""
        over = asyncio.get_running_loop().create_future()
        self._over.append(over)  # cancelled, it stays there, done: skipped
        await over

    async def submit(self, job: _J) -> None:
        """Return once ``job`` is done (``job.error`` says how)."""
        self._waiting.append(job)
        try:
            while not job.done:
                if self._running or self._gathering:
                    await self._batch_over()
                    continue
                await self._gather()
                if not self._running and not job.done:
                    await self._run_batch()
        except BaseException:
            if job in self._waiting:  # not taken by a batch: it never runs
                self._waiting.remove(job)
            else:
                with anyio.CancelScope(shield=True):
                    while not job.done:
                        if job in self._waiting:  # handed back by a cancelled runner: never ran
                            self._waiting.remove(job)
                            break
                        await self._batch_over()
            raise

    async def _gather(self) -> None:
        """Yield to the loop for as long as more jobs keep joining (one
        caller does; the others wait for the batch it runs). Cancelled, it
        wakes the others: one of them gathers instead."""
        self._gathering = True
        try:
            count = -1
            while count != len(self._waiting):
                count = len(self._waiting)
                await asyncio.sleep(0)
        except BaseException:
            self._gathering = False
            self._wake_over()
            raise
        self._gathering = False

    def _wake_over(self) -> None:
        over, self._over = self._over, []
        for waiter in over:
            if not waiter.done():
                waiter.set_result(None)

    async def _run_batch(self) -> None:
        batch, self._waiting = self._waiting, []
        self._running = True
        try:
            await self._run(batch)
        except asyncio.CancelledError:
            # The runner's caller was cancelled, not the others: the jobs
            # the run did not do go back to wait for the next batch, which
            # one of their own callers runs (the runner's own job is taken
            # out again by its ``submit``, which then raises).
            self._waiting[:0] = [job for job in batch if not job.done]
            raise
        except BaseException as exc:  # the store closed, or the hop failed
            for other in batch:
                if not other.done:
                    other.error, other.done = exc, True
            if not isinstance(exc, Exception):
                raise
        finally:
            self._running = False
            self._wake_over()
