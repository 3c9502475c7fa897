""":class:`Store`: one store directory opened by this process, and the
operations on its entries.

The store's contract (layout, invariants, crash commit points) is at the
top of :mod:`spoold.store`. Here: opening (create, lock, recover) and
closing, and each operation on entries, written once as the blocking
method that runs in a worker thread (``_read_sync``) with its async twin
derived from it (``read = one_hop(_read_sync)``: see
:mod:`spoold.store.hops`). A blocking method checks its arguments itself
(an id, a queue, ownership) before it touches a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import anyio

from spoold.errors import NotFoundError, StoreError
from spoold.ids import validate_id
from spoold.store.commit import Committer
from spoold.store.directory import REASONS, StoreDirectory, still_named, unlink_quiet
from spoold.store.hops import WorkerHops, grouped_hop, one_hop
from spoold.store.pool import FilePool
from spoold.store.records import (
    NewEntry,
    Problem,
    RecoveryReport,
    StepHook,
    StoredRecord,
    SyncMode,
)
from spoold.store.recovery import check_sync, recover_sync
from spoold.store.registry import Registry
from spoold.store.wakeup import NotifyResult, Wakeup, Woken

__all__ = ["Store"]

_T = TypeVar("_T")
_RECORD_READ = 16 * 1024  # one read() takes a whole record of this size or less


class Store:
    """A store directory opened by this process. Use :meth:`open`."""

    def __init__(
        self,
        root: Path,
        queues: Sequence[str],
        *,
        owner: bool,
        max_threads: int,
        on_step: StepHook | None,
        min_free_bytes: int = 0,
        sync: SyncMode = "fsync",
    ) -> None:
        self.root = root
        self.queues = tuple(queues)
        self.owner = owner
        self.sync: SyncMode = sync
        self._dir = StoreDirectory(root, self.queues, owner=owner, on_step=on_step)
        self._data_path = Path(self._dir.data)  # a body's path is this / its id (parsed once)
        self._registry = Registry(self._dir.registry, self._dir.pid)
        self._wakeup = Wakeup(f"{root}/wakeup")
        self._hops = WorkerHops(root, max_threads)
        self._pool = FilePool(
            self._dir.tmp,
            self._dir.pid,
            wanted=lambda: self.sync == "syncfs",
            min_free=lambda: self._committer.min_free_bytes,
        )
        self._committer = Committer(
            self._dir, self._registry, self._hops, min_free_bytes, self._pool
        )

    @property
    def min_free_bytes(self) -> int:
        """The floor of free space under which :meth:`enqueue` refuses new
        entries; may be changed while open."""
        return self._committer.min_free_bytes

    @min_free_bytes.setter
    def min_free_bytes(self, value: int) -> None:
        self._committer.min_free_bytes = value

    @property
    def unusable(self) -> dict[str, str]:
        """Directories of queues this process cannot use (path -> why),
        found at open: what lives there is skipped, the rest is served."""
        return self._dir.unusable

    # ----------------------------------------------------------- lifecycle

    @classmethod
    async def open(
        cls,
        root: str | os.PathLike[str],
        queues: Sequence[str],
        *,
        owner: bool = True,
        create: bool = True,
        max_threads: int = 16,
        on_step: StepHook | None = None,
        min_free_bytes: int = 0,
        sync: SyncMode = "fsync",
        keep_checkouts: Sequence[str] = (),
        keep_listings: Sequence[str] = (),
    ) -> tuple[Store, RecoveryReport]:
        """Open (and create, missing parent directories too) the store at ``root``.

        ``min_free_bytes`` is the floor of free space under which
        :meth:`enqueue` refuses new entries (changes of existing ones are
        never refused for it, so a full queue can still drain); it may be
        changed while open. ``sync`` is how :meth:`enqueue` makes new
        entries durable: ``"fsync"``, each file and directory of each call;
        ``"syncfs"``, the calls under way at once as one batch with two
        ``syncfs`` of the filesystem (group commit).

        As owner, take the lock (raising :class:`SpoolLockedError` at once if
        another process holds it) and recover: checked-out records go back to
        their queues (but those of ``keep_checkouts``, which stay checked
        out and are listed in :attr:`RecoveryReport.kept_checkouts`: the
        owner settles each with :meth:`write` ``checked_out=True``), and
        leftovers of writers that died before committing are removed.
        The listings recovery makes of the ``keep_listings`` queues are kept
        in the report, for a load right after the open
        (:meth:`RecoveryReport.take_listing`).
        Returns the store and what recovery did.
        """
        for q in queues:
            if not q or q.startswith(".") or "/" in q or q in ("tmp", "data"):
                raise ValueError(f"bad queue name {q!r}")
        for what, kept in (("keep_checkouts", keep_checkouts), ("keep_listings", keep_listings)):
            for q in kept:
                if q not in queues:
                    raise ValueError(f"{what} names {q!r}, which is not a queue")
        store = cls(
            Path(os.path.abspath(root)),  # noqa: ASYNC240 (no I/O: joins with the cwd)
            queues,
            owner=owner,
            max_threads=max_threads,
            on_step=on_step,
            min_free_bytes=min_free_bytes,
            sync=sync,
        )
        try:
            report = await anyio.to_thread.run_sync(
                store._open_sync, create, frozenset(keep_checkouts), frozenset(keep_listings)
            )
        except BaseException:
            store._close_sync()
            raise
        return store, report

    async def close(self) -> None:
        """Take no new operation, wait for those under way (their directory
        fsyncs use the cached directory descriptors), then close."""
        if self._hops.closed:
            return
        await self._hops.drain()
        await anyio.to_thread.run_sync(self._close_sync)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _open_sync(
        self, create: bool, keep_checkouts: frozenset[str], keep_listings: frozenset[str]
    ) -> RecoveryReport:
        self._dir.open_sync(create)
        if not self.owner:
            return RecoveryReport()
        self._dir.lock_sync()
        report = recover_sync(self._dir, self._registry, keep_checkouts, keep_listings)
        if self.sync != "syncfs":
            self._pool.empty_sync()  # left by a run in syncfs mode: nobody claims them now
        return report

    def _close_sync(self) -> None:
        self._hops.stop_sync()
        self._committer.close_sync()
        self._pool.close_sync()
        self._registry.close_sync()
        self._wakeup.close_sync()
        self._dir.close_sync()

    # ------------------------------------------------------------ helpers

    async def run_grouped(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run ``fn(*args)``, a short blocking call, in a worker thread, in
        one hop with the others asked for meanwhile
        (:meth:`~spoold.store.hops.WorkerHops.run_grouped`)."""
        return await self._hops.run_grouped(fn, *args)

    def _require_owner(self) -> None:
        if not self.owner:
            raise StoreError(f"only the owner of {self.root} may change existing entries")

    def unusable_text(self, directory: str) -> str:
        """Why ``directory`` cannot be used, and what to run about it."""
        return self._dir.unusable_text(directory)

    def free_bytes(self) -> int:
        """Bytes free for this process on the store's filesystem (blocking:
        one ``fstatvfs``)."""
        return self._dir.free_bytes()

    @staticmethod
    def is_disk_full(exc: BaseException) -> bool:
        return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)

    # ------------------------------------------------------------ wake-ups

    @property
    def wakeup_path(self) -> str:
        return self._wakeup.path

    @asynccontextmanager
    async def wakeups(self) -> AsyncIterator[AsyncIterator[Woken]]:
        """(Owner) bind the wake-up socket; yields an iterator of the name
        batches other processes report (each name with the record sent
        along, if any). A stale socket file is replaced."""
        self._require_owner()
        async with self._wakeup.receive() as batches:
            yield batches

    def try_notify_owner(
        self, names: Sequence[str], records: Sequence[bytes | None] | None = None
    ) -> NotifyResult:
        """(Writer) tell the owner about new entries (with their records as
        committed, if given), without waiting
        (:meth:`~spoold.store.wakeup.Wakeup.try_send`)."""
        return self._wakeup.try_send(names, records)

    def notify_owner_some(
        self, names: Sequence[str], records: Sequence[bytes | None] | None = None
    ) -> tuple[NotifyResult, int]:
        """:meth:`try_notify_owner`, and how many of ``names`` were sent
        (:meth:`~spoold.store.wakeup.Wakeup.send_some`)."""
        return self._wakeup.send_some(names, records)

    async def notify_owner(self, names: Sequence[str]) -> bool:
        """(Writer) tell the owner about new entries, waiting up to 2 s while
        its queue is full; False if no owner listens or it stayed busy (it
        will still find them, at its next rescan or open)."""
        return await self._wakeup.send(names)

    # ------------------------------------------------------------- adding

    async def enqueue(
        self, entries: Sequence[NewEntry], on_reserve: Callable[[str], None] | None = None
    ) -> list[str]:
        """Durably add ``entries``; return their names, in order.

        ``on_reserve(name)`` is called (in a worker thread) as each name is
        reserved, before anything of it can be seen in a queue. The
        callbacks of one call (``on_reserve``, and each entry's
        ``make_prefix`` and ``make_record``) run in one thread; those of
        different calls committed together may run at the same time in two
        threads, so state they share between calls must be locked.

        All entries are committed before the call returns (the directories are
        fsynced once for the batch). If it raises, nothing it wrote remains.
        """
        for e in entries:
            self._dir.check_queue(e.queue)
        if self.sync == "fsync":
            return await self._hops.run(self._committer.enqueue_sync, entries, on_reserve)
        return await self._committer.enqueue_grouped(entries, on_reserve)

    # ------------------------------------------------------------ reading

    def _read_sync(self, queue: str, name: str) -> StoredRecord:
        """Read a record from ``queue`` (or its checkout directory)."""
        validate_id(name)
        for checked_out in (False, True):
            try:
                data = _read_record(name, f"{self._dir.qdir(queue, checked_out)}/{name}")
                return StoredRecord(name, queue, data, checked_out)
            except FileNotFoundError:
                continue
        raise NotFoundError(f"{name}: not in queue {queue}")

    read = one_hop(_read_sync)

    def _read_many_sync(
        self,
        queues: Sequence[str],
        names: Sequence[str],
        sent: Mapping[str, bytes | None] | None = None,
    ) -> list[StoredRecord]:
        """The records of ``names``, each from the first of ``queues`` that
        holds it (not checked out), in one thread hop; missing ones skipped.

        ``sent``: records their writers sent along with their names (the
        wake-up socket's, :mod:`spoold.store.wakeup`). One is taken instead
        of reading the file when the file has its size (a ``stat``): on the
        two assumptions that module states (only the owner's own user sends
        records; the owner never rewrites a file it has not indexed)."""
        for name in names:
            validate_id(name)
        for q in queues:
            self._dir.check_queue(q)
        out = []
        for name in names:
            data = sent.get(name) if sent else None
            for q in queues:
                path = f"{self._dir.qdir(q)}/{name}"
                try:
                    if data is not None and os.stat(path).st_size == len(data):
                        out.append(StoredRecord(name, q, data, False))
                    else:
                        out.append(StoredRecord(name, q, _read_record(name, path), False))
                    break
                except FileNotFoundError:
                    continue
        return out

    read_many = one_hop(_read_many_sync)
    read_many_grouped = grouped_hop(_read_many_sync)

    def _read_queue_sync(self, queue: str) -> list[StoredRecord]:
        """Every record of ``queue``, checked-out ones included, in name order.
        Files whose names are not ids are skipped (the check reports them)."""
        out = []
        for checked_out in (False, True):
            d = self._dir.qdir(queue, checked_out)
            if not self._dir.usable(d):
                continue  # the check reports the directory
            for name in sorted(self._dir.names(d)):
                try:
                    with open(f"{d}/{name}", "rb") as f:
                        data = f.read()
                        if _own_record(name, data) or still_named(f"{d}/{name}", f.fileno()):
                            out.append(StoredRecord(name, queue, data, checked_out))
                except FileNotFoundError:
                    continue  # moved away under us (we are not the owner)
                except PermissionError as exc:
                    out.append(StoredRecord(name, queue, b"", checked_out, exc.strerror))
        out.sort(key=lambda r: r.name)
        return out

    read_queue = one_hop(_read_queue_sync)

    def _read_records_sync(
        self,
        queue: str,
        names: Sequence[tuple[str, bool]],
        then: Callable[[list[StoredRecord]], _T],
    ) -> _T:
        """``then`` applied, in the worker thread (a caller decodes there),
        to the records ``names`` of ``queue`` (``(name, checked_out)`` pairs,
        as :meth:`list_queue` gives them) in the order given; records gone
        meanwhile are left out. One thread hop: a caller reading a large
        queue calls this batch by batch, so that only one batch of raw
        records is in memory at a time."""
        self._dir.check_queue(queue)
        dir_fds = (
            self._dir.dir_fds.get(self._dir.qdir(queue), -1),
            self._dir.dir_fds.get(self._dir.qdir(queue, True), -1),
        )
        out = []
        for name, checked_out in names:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fds[checked_out])
            except FileNotFoundError:
                continue  # moved away under us (we are not the owner)
            except PermissionError as exc:  # this one file: the others are read
                out.append(StoredRecord(name, queue, b"", checked_out, exc.strerror))
                continue
            try:
                data = os.read(fd, _RECORD_READ)
                if len(data) == _RECORD_READ:  # a large record: read on to its end
                    chunks = [data]
                    while chunk := os.read(fd, _RECORD_READ):
                        chunks.append(chunk)
                    data = b"".join(chunks)
                if not _own_record(name, data) and not still_named(name, fd, dir_fds[checked_out]):
                    continue  # deleted under us, its file written again
            finally:
                os.close(fd)
            out.append(StoredRecord(name, queue, data, checked_out))
        return then(out)

    read_records = one_hop(_read_records_sync)

    def _in_memory_sync(self, queue: str, names: Sequence[tuple[str, bool]]) -> bool:
        """Whether the records ``names`` of ``queue`` (a sample: ``(name,
        checked_out)`` pairs, as :meth:`list_queue` gives them) are all in
        the page cache: each is opened and its first byte read with
        ``RWF_NOWAIT``, which fails rather than wait for the disk. A record
        gone, or a system without the flag, counts as in memory (so a
        reader asks no more of the disk than before)."""
        self._dir.check_queue(queue)
        nowait = getattr(os, "RWF_NOWAIT", None)
        if nowait is None:
            return True
        dir_fds = (
            self._dir.dir_fds.get(self._dir.qdir(queue), -1),
            self._dir.dir_fds.get(self._dir.qdir(queue, True), -1),
        )
        buf = bytearray(1)
        for name, checked_out in names:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fds[checked_out])
            except OSError:
                continue
            try:
                os.preadv(fd, [buf], 0, nowait)
            except BlockingIOError:
                return False
            except OSError:
                continue  # EOPNOTSUPP (a filesystem without it), ...: as before
            finally:
                os.close(fd)
        return True

    in_memory = one_hop(_in_memory_sync)

    def _list_queue_sync(self, queue: str) -> list[tuple[str, bool]]:
        """Names in ``queue`` as ``(name, checked_out)``, in name order."""
        return self._dir.list_queue(queue)

    list_queue = one_hop(_list_queue_sync)

    def body_path(self, name: str) -> Path:
        """Where the body of ``name`` is (for streaming it without a copy)."""
        return self._data_path / validate_id(name)

    def _read_body_sync(self, name: str) -> bytes:
        """The body of ``name``."""
        validate_id(name)
        path = f"{self._dir.data}/{name}"
        try:
            with open(path, "rb") as f:
                data = f.read()
                if still_named(path, f.fileno()):
                    return data
        except FileNotFoundError:
            pass
        raise NotFoundError(f"{name}: no body in {self._dir.data}")

    read_body = one_hop(_read_body_sync)

    # ------------------------------------------------------------ changes

    def _checkout_sync(self, queue: str, name: str) -> None:
        """Mark a record as taken by a worker (``QUEUE/.checkout/NAME``).

        Not fsynced: before and after, the record belongs to ``queue``.
        """
        self._require_owner()
        validate_id(name)
        try:
            os.rename(f"{self._dir.qdir(queue)}/{name}", f"{self._dir.qdir(queue, True)}/{name}")
        except FileNotFoundError:
            raise NotFoundError(f"{name}: not in queue {queue}") from None

    checkout = grouped_hop(_checkout_sync)

    def _checkout_then_sync(self, queue: str, name: str, then: Callable[[], _T]) -> _T:
        """:meth:`checkout`, then ``then()`` in the same hop; its result.
        An attempt reads its message's body there: one hop less for each.
        If ``then()`` raises, the record is returned to ``queue`` first (as
        if never checked out), then its error goes on."""
        self._checkout_sync(queue, name)
        try:
            return then()
        except BaseException:
            self._release_sync(queue, name)
            raise

    checkout_then = grouped_hop(_checkout_then_sync)

    def _write_sync(
        self,
        queue: str,
        name: str,
        record: bytes | None,
        *,
        to_queue: str | None = None,
        checked_out: bool = False,
    ) -> None:
        """Replace a record's content and/or move it to ``to_queue``.

        ``checked_out`` says the record is in ``queue``'s checkout directory;
        it leaves it (returned to ``to_queue`` or ``queue``). The new content
        is written under ``tmp/``, fsynced and renamed over the old file; then
        the file is renamed to its new place and both directories fsynced.
        A crash between the two renames leaves the new content in the old
        place; callers that derive the queue from the content repair that.
        """
        self._require_owner()
        validate_id(name)
        d = self._dir
        src_dir = d.qdir(queue, checked_out)
        dst_dir = d.qdir(to_queue or queue)
        src = f"{src_dir}/{name}"
        if not os.path.exists(src):
            raise NotFoundError(f"{name}: not in queue {queue}")
        tmp = None
        try:
            if record is not None:
                d.step("write_record")
                tmp = d.write_tmp(name, "record", record)
                d.step("replace")
                os.rename(tmp, src)
                tmp = None
            if src_dir != dst_dir:
                d.step("move")
                os.rename(src, f"{dst_dir}/{name}")
            d.step("fsync_dirs")
            d.fsync_dirs([src_dir, dst_dir])
        except OSError as exc:
            if tmp is not None:
                unlink_quiet(tmp)
            raise StoreError(
                exc.errno, f"writing {name} in {self.root} failed: {exc.strerror}", exc.filename
            ) from exc
        d.step("done")

    write = one_hop(_write_sync)

    def _release_sync(self, queue: str, name: str) -> None:
        """Return a checked-out record to its queue unchanged."""
        self._write_sync(queue, name, None, checked_out=True)

    release = one_hop(_release_sync)

    def _delete_sync(self, queue: str, name: str, *, checked_out: bool = False) -> None:
        """Remove a record, its body and its registry entry, in that order."""
        self._require_owner()
        validate_id(name)
        d = self._dir
        record = f"{d.qdir(queue, checked_out)}/{name}"
        try:
            # Whether it is there, and what the pool needs to know of it: one
            # lstat (the pool checks the link count again when it reuses it).
            st = os.lstat(record)
        except FileNotFoundError:
            raise NotFoundError(f"{name}: not in queue {queue}") from None
        # The registry entry goes first: it names the writer that created
        # the entry, which may still be alive, and a body left behind by a
        # crash below must read as nobody's (recovery then removes it).
        d.step("unlink_registry")
        unlink_quiet(f"{d.registry}/{name}")
        # The record and the body go into the pool of files for the next
        # commits to write again (or are unlinked when it is full): see
        # spoold.store.pool, which says why that is as safe as an unlink.
        try:
            d.step("unlink_record")
            self._pool.put(record, "record", st.st_size, st.st_nlink)
        except FileNotFoundError:
            raise NotFoundError(f"{name}: not in queue {queue}") from None
        d.step("unlink_body")
        body = f"{d.data}/{name}"
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(body)
            self._pool.put(body, "body", st.st_size, st.st_nlink)
        # Not fsynced, on purpose: if the power fails before the kernel writes
        # these removals, the entry comes back and (a delivered message) is sent
        # again; at least once, never lost. Fsyncing three directories per
        # delivery would double what a message costs the disk.
        d.step("done")

    delete = grouped_hop(_delete_sync)

    def _delete_many_sync(self, queue: str, names: Sequence[str]) -> int:
        """:meth:`delete` for many entries of ``queue`` in one worker-thread
        hop (not checked out); names no longer there are skipped. Returns
        how many were deleted."""
        self._require_owner()
        for name in names:
            validate_id(name)
        deleted = 0
        for name in names:
            try:
                self._delete_sync(queue, name)
            except NotFoundError:
                continue
            deleted += 1
        return deleted

    delete_many = one_hop(_delete_many_sync)

    def _set_aside_sync(self, queue: str, name: str, to_queue: str, reason: str) -> None:
        """Move a record that cannot be read, byte for byte, to ``to_queue``
        and keep ``reason`` beside it in ``to_queue/.reasons/NAME``."""
        self._require_owner()
        validate_id(name)
        d = self._dir
        d.check_queue(to_queue)
        reasons_dir = f"{d.qdir(to_queue)}/{REASONS}"
        tmp = d.write_tmp(name, "reason", reason.encode("utf-8", "replace") + b"\n")
        os.rename(tmp, f"{reasons_dir}/{name}")
        for checked_out in (False, True):
            src_dir = d.qdir(queue, checked_out)
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{src_dir}/{name}", f"{d.qdir(to_queue)}/{name}")
                d.fsync_dirs([reasons_dir, src_dir, d.qdir(to_queue)])
                return
        raise NotFoundError(f"{name}: not in queue {queue}")

    set_aside = one_hop(_set_aside_sync)

    def _set_aside_reason_sync(self, queue: str, name: str) -> str | None:
        """The reason kept by :meth:`set_aside`, if any."""
        validate_id(name)
        try:
            with open(f"{self._dir.qdir(queue)}/{REASONS}/{name}", "rb") as f:
                return f.read().decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None

    set_aside_reason = one_hop(_set_aside_reason_sync)

    def _clear_reason_sync(self, queue: str, name: str) -> None:
        """Forget the reason kept by :meth:`set_aside`."""
        validate_id(name)
        unlink_quiet(f"{self._dir.qdir(queue)}/{REASONS}/{name}")

    clear_reason = grouped_hop(_clear_reason_sync)

    # ---------------------------------------------------------- checking

    def _check_sync(self, max_age: float = 3600.0) -> list[Problem]:
        """Report inconsistencies; change nothing.

        Finds bodies and registry entries with no record (once their writer
        is gone or they are older than ``max_age`` seconds), records with no
        body, one name in two places, files in ``tmp/`` or a checkout older
        than ``max_age``, and files in a queue whose names are not ids.
        """
        return check_sync(self._dir, self._registry, max_age)

    check = one_hop(_check_sync)


def _own_record(name: str, data: bytes) -> bool:
    """Whether the record bytes ``data`` read under ``name`` name it as
    their id near their start (where a record has it): then they are its
    own, whatever happened to its file since (ids are never reused), and
    no ``stat`` is needed to be sure."""
    return data.find(b'"id":"' + name.encode() + b'"', 0, 64) >= 0


def _read_record(name: str, path: str) -> bytes:
    """The record ``name`` at ``path``; :class:`FileNotFoundError` if it
    is gone, also while it was read (see :func:`still_named`)."""
    with open(path, "rb") as f:
        data = f.read()
        if not _own_record(name, data) and not still_named(path, f.fileno()):
            raise FileNotFoundError(errno.ENOENT, "deleted while read", path)
    return data
