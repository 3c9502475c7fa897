"""A second thread for a group commit's new files: a large batch's files
are created by two threads at once, the hop's and this one.

Why: creating a file is mostly the filesystem allocating its inode, which
on ext4 without a journal can take most of an add's time (see
:meth:`~spoold.store.directory.StoreDirectory.write_tmp`); in one thread, a
batch's files are created one after another on one core. The jobs of a
batch are :class:`Shares`, each taken by exactly one thread: the hop's
thread takes them one at a time and hands the same shares to the
:class:`SecondWriter`, which takes them too. The hop's thread never waits
for the second one to take a job: once it finds none left, it closes the
shares (no job can be taken any more), waits only for the job the second
thread has under way (if any), then goes on with the batch's syncs. That
wait is a barrier whatever ended the hop's share: once it returns, the
second thread writes nothing of that batch.

What a failure of the second thread does: nothing a commit can see. If
the thread cannot be started, or is slow to wake, the hop's thread takes
every job itself. A job is taken once, under a lock, so shares handed to a
thread that runs them after their batch is over find nothing left and do
nothing (no job is ever written twice). An error escaping a job (the
commit path catches each job's own) is kept with it, as that job's error
alone, and the thread goes on. Only jobs the second thread took, and never
a job already committed, can fail through it: it runs before the syncs.

Costs: no thread until a batch is large enough to share
(:meth:`Committer.commit_sync <spoold.store.commit.Committer.commit_sync>`
decides), then one thread, idle between batches, ended by :meth:`close_sync`.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["Shares", "SecondWriter"]

_J = TypeVar("_J")


class Shares(Generic[_J]):
    """The jobs of one batch, each taken by one thread: ``run(job)`` writes
    it (and must record its own errors); an error that escapes is given to
    ``failed(job, error)`` and the thread takes the next one."""

    def __init__(
        self,
        jobs: Sequence[_J],
        run: Callable[[_J], None],
        failed: Callable[[_J, BaseException], None],
    ) -> None:
        self._jobs: Iterator[_J] = iter(jobs)
        self._run = run
        self._failed = failed
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running = 0  # jobs taken and not yet written

    def _take(self) -> list[_J]:
        """The next job, as a list of one (empty: none left)."""
        with self._lock:
            taken = list(itertools.islice(self._jobs, 1))
            self._running += len(taken)
            return taken

    def _finished(self) -> None:
        with self._lock:
            self._running -= 1
            if not self._running:
                self._idle.notify_all()

    def take_all(self) -> None:
        """Write jobs until none is left to take (in whichever thread calls it)."""
        while taken := self._take():
            (job,) = taken
            try:
                self._run(job)
            except BaseException as exc:  # noqa: BLE001 (kept as this job's error)
                self._failed(job, exc)
            finally:
                self._finished()

    def close(self) -> None:
        """Let no thread take a job any more (those left are taken by none)."""
        with self._lock:
            self._jobs = iter(())

    def wait(self) -> None:
        """Return once every job taken has been written. After :meth:`close`
        it is a barrier: once it returns, no thread writes a job of these
        shares any more, however :meth:`take_all` ended in the caller's."""
        with self._lock:
            while self._running:
                self._idle.wait()


class SecondWriter:
    """One thread that takes :class:`Shares` handed to it; started at the
    first hand-over. ``name``: the thread's name."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._handed: queue.SimpleQueue[Shares[Any] | None] = queue.SimpleQueue()
        self._closed = False

    def hand(self, shares: Shares[_J]) -> bool:
        """Let the thread take some of ``shares`` as well (the caller takes
        them too: :meth:`Shares.take_all`); False if there is no thread
        (closed, or it could not be started)."""
        with self._lock:
            if self._closed:
                return False
            if self._thread is None:
                thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no thread to be had now: the caller writes alone
                    return False
                self._thread = thread
            self._handed.put(shares)
            return True

    def _serve(self) -> None:
        while (shares := self._handed.get()) is not None:
            # A job's own errors are the Shares' to keep; this only keeps
            # the thread serving whatever escapes (nothing should).
            with contextlib.suppress(Exception):
                shares.take_all()

    def close_sync(self) -> None:
        """End the thread (after the shares it holds, if any)."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            self._handed.put(None)
            thread.join()
