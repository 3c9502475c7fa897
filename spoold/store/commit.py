"""New entries made durable: the commit path of :meth:`~spoold.store.Store.enqueue`.

Each entry is reserved in the registry, its body and its record written
under ``tmp/``, then the body renamed into ``data/`` and the record into its
queue last: the record's rename is the commit point. Two ways to make that
durable before the call returns (:data:`~spoold.store.records.SyncMode`):

* ``"fsync"`` (:meth:`Committer.enqueue_sync`): one call's entries in one
  worker-thread hop; each file fsynced before its rename, the directories
  after the renames.
* ``"syncfs"`` (group commit, :meth:`Committer.commit_sync`): the calls asked
  for at the same moment go in one hop (:class:`~spoold.store.batching.Batches`);
  their files are written unsynced, the filesystem synced once (the content
  is durable), every rename made, and the filesystem synced again (the
  renames are). Their files are taken from the pool of removed files when
  it has some ready (:mod:`spoold.store.pool`, which says why that is as
  durable), and files are claimed there for the next batches before the
  first sync. A large batch's files are written by two threads at once,
  each job by one of them (:mod:`spoold.store.sharing`); the syncs and
  renames that follow are the hop's thread's alone.

Free space is checked before anything is written (``min_free_bytes``, which
may change while the store is open). A call that fails removes everything
it wrote; in a group commit, a call that fails alone is undone alone, and a
failed sync undoes every call of the batch. Errors leave as
:class:`~spoold.errors.StoreError` naming the store.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from spoold.errors import InsufficientStorageError, StoreError
from spoold.store.batching import Batches
from spoold.store.directory import StoreDirectory, unlink_quiet
from spoold.store.hops import WorkerHops
from spoold.store.pool import FilePool
from spoold.store.records import NewEntry
from spoold.store.registry import Registry
from spoold.store.sharing import SecondWriter, Shares
from spoold.times import format_size

__all__ = ["Committer"]

# (name, queue, body's tmp path, record's tmp path)
_Move = tuple[str, str, str, str]
# Entries a batch holds at least (in two jobs or more) for its files to be
# written by two threads (below, a hand-over costs more than it saves).
SHARED_FROM = 4
# CPU seconds one thread took per entry to write a batch's new files (two
# creates and two writes), at or past which the next large batches share
# the work: only where creating a file is slow (ext4 without a journal,
# going past inodes deleted in the last minute: about 0.6 ms an entry
# measured) do two threads pay; where it is quick (tmpfs 0.04 ms, ext4
# with a journal 0.07 ms, ext4 without one and nothing deleted lately
# 0.09 ms), a second thread only adds hand-overs: 1.5x the wall time on
# tmpfs, +25% CPU on ext4 with a journal, for 16 adds at once. The
# thread's CPU time, not the wall clock's: a slow create is the kernel's
# work in the creating thread (0.8-1.0 ms of CPU a file, measured, for
# as much wall time), while a thread waiting its turn for a CPU on a busy
# machine is slow by the wall clock alone, and a second thread would not
# help it.
SLOW_ENTRY_SECONDS = 300e-6
# Shared batches in a row before one is written by one thread again, to
# measure anew (shared, a batch's time says nothing of one thread's).
SHARED_RUN = 16


@dataclass(eq=False)
class _Staged:
    """One job of a group commit, as its files are written."""

    job: _Job
    names: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # every path to remove if it fails
    moves: list[_Move] | None = None  # the renames to make, once every file is written


@dataclass(eq=False)
class _Job:
    """One enqueue call waiting in a group commit."""

    entries: Sequence[NewEntry]
    on_reserve: Callable[[str], None] | None
    names: list[str] | None = None
    error: BaseException | None = None
    done: bool = False


class Committer:
    """Writes the new entries of one store."""

    def __init__(
        self,
        directory: StoreDirectory,
        registry: Registry,
        hops: WorkerHops,
        min_free_bytes: int,
        pool: FilePool,
    ) -> None:
        self._dir = directory
        self._pool = pool
        self._registry = registry
        self._hops = hops
        self.min_free_bytes = min_free_bytes
        # How much CPU time one thread took per entry of the last large
        # batches it wrote alone (a running mean), and large batches shared
        # in a row: see SLOW_ENTRY_SECONDS. Touched by the hop's thread only.
        self._entry_seconds: float | None = None  # None: not measured yet
        self._shared_run = 0
        self.slow_entry_seconds = SLOW_ENTRY_SECONDS  # 0: every large batch shared
        self._clock = time.thread_time  # a test's own clock may stand in
        self._second = SecondWriter(f"spoold-store-writer {directory.root}")
        self._commits = Batches[_Job](lambda batch: hops.run(self.commit_sync, batch))

    async def enqueue_grouped(
        self, entries: Sequence[NewEntry], on_reserve: Callable[[str], None] | None
    ) -> list[str]:
        """Group commit: the calls asked for at the same moment are committed
        together, in one thread hop (see :class:`Batches`)."""
        job = _Job(entries, on_reserve)
        await self._commits.submit(job)
        if job.error is not None:
            raise job.error
        assert job.names is not None
        return job.names

    def commit_sync(self, batch: Sequence[_Job]) -> None:
        """Commit the jobs of a batch with two ``syncfs`` in all: the new
        files are written (no fsync), the filesystem synced (their content
        is durable), then renamed into place and the filesystem synced again
        (the renames are). A job that fails alone is undone alone; if a sync
        fails, every job of the batch is undone."""
        d = self._dir
        jobs: list[_Staged] = []
        free = d.free_bytes() if self.min_free_bytes else 0  # once for the batch
        for job in batch:
            try:
                d.step("check_space")
                needed = sum(len(e.body) for e in job.entries)
                free = self._check_free_space(needed, free) - needed
            except Exception as exc:  # noqa: BLE001 (given to its caller)
                job.error, job.done = self._store_error(exc, "enqueue"), True
                continue
            jobs.append(_Staged(job))
        self._write_jobs(jobs)
        staged = [(s, s.moves) for s in jobs if s.moves is not None]
        if not staged:
            return
        try:
            # Files for the next batches: written only after this syncfs
            # (see the pool's durability argument).
            claimed = self._pool.claim(sum(len(s.job.entries) for s, _ in staged))
            d.step("sync_data")
            d.syncfs()
            self._pool.synced(claimed)
            for s, moves in staged:
                self._move_into_place(moves, s.written)
            d.step("fsync_dirs")
            d.syncfs()
        except Exception as exc:  # noqa: BLE001 (undone, and given to every caller)
            self._pool.close_sync()  # claims a failed syncfs may not have made durable
            for s, _ in staged:
                _undo(s.written)
                s.job.error, s.job.done = self._store_error(exc, "enqueue"), True
            return
        for s, _ in staged:
            s.job.names, s.job.done = s.names, True
        d.step("done")

    def _write_jobs(self, jobs: list[_Staged]) -> None:
        """Reserve the names and write the ``tmp/`` files of ``jobs``; a job
        that fails is undone and given its error. A large batch that needs
        new files (more than the pool has ready) is written by two threads,
        this one and the second writer (see :mod:`spoold.store.sharing`),
        each taking the next job left, when this thread alone was measured
        slow at it (:data:`SLOW_ENTRY_SECONDS`): one large batch in
        :data:`SHARED_RUN` + 1 is written alone, to measure again."""
        entries = sum(len(s.job.entries) for s in jobs)
        # Shared only to create files (those of the pool are quickly
        # written), and only where creating them was measured slow.
        large = len(jobs) > 1 and entries >= SHARED_FROM and self._pool.ready() < entries
        share = large and (self._entry_seconds or 0.0) >= self.slow_entry_seconds
        if share and self.slow_entry_seconds and self._shared_run >= SHARED_RUN:
            share = False  # one thread this time: measure again
        if large:  # large batches in a row shared: the count of the probe
            self._shared_run = self._shared_run + 1 if share else 0
        started = self._clock()
        if share:
            self._write_shared(jobs)
        else:
            for s in jobs:
                self._write_job(s, unnamed=False)
        if large and not share:  # one thread's CPU time per entry, for the next batches
            seconds = (self._clock() - started) / entries
            last = self._entry_seconds
            self._entry_seconds = seconds if last is None else (last + seconds) / 2
        for s in jobs:  # nothing should be left half done; if it is, it fails
            if s.moves is None and not s.job.done:
                self._job_failed(s, StoreError(f"enqueue into {self._dir.root} was not written"))

    def _write_shared(self, jobs: list[_Staged]) -> None:
        """Write ``jobs`` with the second writer, each job by one of the two
        threads; files are made unnamed, so the two do not take turns on
        the lock of ``tmp/`` (``StoreDirectory._create_tmp``). With no
        second thread to be had, this one writes them all, by name."""
        unnamed = True

        def write(s: _Staged) -> None:
            self._write_job(s, unnamed=unnamed)

        shares = Shares(jobs, write, self._job_failed)
        if not self._second.hand(shares):
            unnamed = False  # read by write() in this thread only: no other has the shares
        try:
            shares.take_all()
        finally:
            # A full barrier even if take_all ended early: no job can be
            # taken any more, then the one the second writer has under way
            # (if any) is waited for; after that it writes nothing of this batch.
            shares.close()
            shares.wait()

    def _write_job(self, s: _Staged, *, unnamed: bool) -> None:
        try:
            s.moves = self._stage(
                s.job.entries, s.job.on_reserve, s.names, s.written, sync=False, unnamed=unnamed
            )
        except Exception as exc:  # noqa: BLE001 (undone, and given to its caller)
            self._job_failed(s, exc)

    def _job_failed(self, s: _Staged, exc: BaseException) -> None:
        """Undo what job ``s`` wrote, and give it ``exc`` (called in
        whichever thread wrote it: it never raises)."""
        s.moves = None
        error = self._store_error(exc, "enqueue") if isinstance(exc, Exception) else exc
        s.job.error, s.job.done = error, True
        with contextlib.suppress(OSError):  # what stays, the next recovery removes
            _undo(s.written)

    def close_sync(self) -> None:
        """End the second writer's thread, which the committer owns (call
        it once no commit is under way: the store closes its hops first)."""
        self._second.close_sync()

    def enqueue_sync(
        self, entries: Sequence[NewEntry], on_reserve: Callable[[str], None] | None = None
    ) -> list[str]:
        """One call's entries: each file fsynced, then the directories."""
        d = self._dir
        d.step("check_space")
        self._check_free_space(sum(len(e.body) for e in entries))
        names: list[str] = []
        written: list[str] = []  # every path to remove if we fail
        try:
            moves = self._stage(entries, on_reserve, names, written, sync=True)
            self._move_into_place(moves, written)
            d.step("fsync_dirs")
            # .registry is not fsynced: a committed record does not need its
            # registry entry to survive a power loss (ids stay unique by
            # time and randomness; recovery and delete tolerate its absence).
            d.fsync_dirs([d.data] + [f"{d.root_s}/{e.queue}" for e in entries])
        except Exception as exc:
            _undo(written)
            error = self._store_error(exc, "enqueue")
            if error is exc:
                raise
            raise error from exc
        d.step("done")
        return names

    def _stage(
        self,
        entries: Sequence[NewEntry],
        on_reserve: Callable[[str], None] | None,
        names: list[str],
        written: list[str],
        *,
        sync: bool,
        unnamed: bool = False,
    ) -> list[_Move]:
        """Reserve names and write the tmp files of ``entries`` (filling
        ``names`` and ``written``, every path to remove on failure);
        ``unnamed``: new files made unnamed first (see ``write_tmp``)."""
        d = self._dir
        for _ in entries:
            d.step("reserve")
            name = self._registry.reserve()
            if on_reserve is not None:
                on_reserve(name)
            names.append(name)
            written.append(f"{d.registry}/{name}")
        moves: list[_Move] = []
        for name, e in zip(names, entries, strict=True):
            d.step("write_body")
            prefix = e.make_prefix(name) if e.make_prefix is not None else b""
            size = len(prefix) + len(e.body)
            reuse = None if sync else self._pool.take("body", size)
            body_tmp = d.write_tmp(
                name, "body", e.body, prefix, sync=sync, reuse=reuse, unnamed=unnamed
            )
            written.append(body_tmp)
            d.step("write_record")
            record = e.make_record(name, names)
            reuse = None if sync else self._pool.take("record", len(record))
            record_tmp = d.write_tmp(
                name, "record", record, sync=sync, reuse=reuse, unnamed=unnamed
            )
            written.append(record_tmp)
            moves.append((name, e.queue, body_tmp, record_tmp))
        return moves

    def _move_into_place(self, moves: Sequence[_Move], written: list[str]) -> None:
        """The body into ``data/`` first, the record (the commit point) last."""
        d = self._dir
        for name, queue, body_tmp, record_tmp in moves:
            d.step("rename_body")
            os.rename(body_tmp, f"{d.data}/{name}")
            written.append(f"{d.data}/{name}")
            d.step("rename_record")
            os.rename(record_tmp, f"{d.root_s}/{queue}/{name}")
            written.append(f"{d.root_s}/{queue}/{name}")

    def _store_error(self, exc: Exception, what: str) -> Exception:
        if isinstance(exc, OSError) and not isinstance(exc, StoreError):
            error = StoreError(
                exc.errno, f"{what} into {self._dir.root} failed: {exc.strerror}", exc.filename
            )
            error.__cause__ = exc  # as "raise ... from exc" would
            return error
        return exc

    def _check_free_space(self, needed: int, free: int | None = None) -> int:
        """Raise if writing ``needed`` bytes would leave less than
        ``min_free_bytes`` free (``free``: as counted before, or counted
        now); the bytes free. Short of room, the pool of removed files is
        emptied first (its space returns) and free space counted again."""
        if not self.min_free_bytes:
            return 0
        if free is None:
            free = self._dir.free_bytes()
        if free - needed < self.min_free_bytes and self._pool.empty_sync():
            free = self._dir.free_bytes()
        if free - needed < self.min_free_bytes:
            raise InsufficientStorageError(
                errno.ENOSPC,
                f"{self._dir.root}: {format_size(free)} free, "
                f"{format_size(self.min_free_bytes)} must stay free (spool.min_free_space) "
                f"after writing {format_size(needed)}; new mail is refused until space is freed",
            )
        return free


def _undo(written: Sequence[str]) -> None:
    for path in reversed(written):
        unlink_quiet(path)
