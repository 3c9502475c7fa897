"""A durable, generic on-disk queue store. It knows nothing about mail.

Layout of a store directory::

    lock              flock()ed by the owner; holds the owner's pid
    wakeup            the owner's datagram socket: other writers send the
                      names they enqueued, so the owner need not poll
    .registry/NAME    one per live entry, created exclusively; holds the
                      pid of the process that created the entry
    .registry/.writer.PID.N   that pid, written once per writer process:
                      each entry is a hard link to it (see below)
    tmp/              staging: PID.NAME.KIND.RANDOM, never read back
    data/NAME         the entry's body (opaque bytes)
    QUEUE/NAME        the entry's record (opaque bytes), one directory per queue
    QUEUE/.checkout/NAME   a record a worker has checked out of QUEUE
    QUEUE/.reasons/NAME    why an unreadable record was set aside in QUEUE

Invariants:

* A name lives in at most one place among all ``QUEUE/`` and
  ``QUEUE/.checkout/`` directories. Every change of place is one rename.
* New files are written under ``tmp/``, fsynced, then renamed into place, and
  the directories touched are fsynced before the call returns. So a record is
  either wholly there or absent, and once a call returns its effect survives
  a crash or power loss (``delete`` excepted: see below).
* ``enqueue`` renames the body into ``data/`` first and the record into its
  queue last: the record's rename is the commit point. A crash before it
  leaves a body and a registry entry with no record; recovery removes those
  when the process that wrote them is gone (it never acknowledged them).
* ``delete`` unlinks the registry entry, then the record (the commit
  point), then the body. It is the one change that is not fsynced: after a
  power loss a deleted entry may come back (a delivered message is then sent
  again: at least once, never lost), which saves a delivery three directory
  fsyncs.
* A checked-out record belongs to its queue: recovery renames it back,
  except in the queues the owner asks to keep (``keep_checkouts``): those
  stay checked out, reported, for the owner to settle (rewrite, then move
  back) before it uses them, so what a cut-short job means is written down
  before the record is back in its queue.
* A registry entry is a hard link to its writer's ``.writer.PID.N`` file,
  made with ``link()``, which fails when the name exists just as
  ``O_CREAT|O_EXCL`` does. Its content is the writer's pid, as a file of its
  own would hold, but creating and removing it allocates and frees no inode
  and no data block: on a busy spool those are what a new file costs most.
  When links are not possible (a filesystem without them) an entry is a
  file of its own. Recovery removes the ``.writer`` files of dead writers.
* A store is created only in a missing or empty directory; an existing
  directory that is not a store (other files, no ``.registry``) is refused.
  Each directory it creates (the store's own, and missing parents) is
  synced into its parent before the store opens.

One process owns a store at a time (``owner=True`` takes the lock); only the
owner recovers, checks out, moves and deletes. Any number of other processes
may open it with ``owner=False`` and ``enqueue`` concurrently.

Every public operation is a coroutine that makes one hop to a worker thread,
behind a :class:`anyio.CapacityLimiter`, so no file I/O ever runs on the
event loop; short ones (checkout, delete) may share their hop with others
asked for at the same moment (:meth:`Store.run_grouped`). Errors from the filesystem are raised as
:class:`~spoold.errors.StoreError` naming the path; an ``enqueue`` that fails
removes whatever it had written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, Protocol, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel

from spoold.errors import InsufficientStorageError, NotFoundError, SpoolLockedError, StoreError
from spoold.ids import is_valid_id, new_id, validate_id
from spoold.times import format_size

__all__ = [
    "Store",
    "NewEntry",
    "StoredRecord",
    "Problem",
    "ProblemKind",
    "RecoveryReport",
    "StepHook",
]

CHECKOUT = ".checkout"
REASONS = ".reasons"
_DIR_MODE = 0o750
_FILE_MODE = 0o640
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_WRITER_PREFIX = ".writer."  # .registry/.writer.PID.N (never an id: ids have no dot)
# link() errors that mean "no hard links here": entries are then files.
_NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV})

_T = TypeVar("_T")
_RECORD_READ = 16 * 1024  # one read() takes a whole record of this size or less

NotifyResult = Literal["sent", "busy", "absent"]
SyncMode = Literal["fsync", "syncfs"]
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(eq=False)
class _Job:
    """One enqueue call waiting in a group commit."""

    entries: Sequence[NewEntry]
    on_reserve: Callable[[str], None] | None
    names: list[str] | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass(eq=False, slots=True)
class _Op:
    """One short operation waiting for a grouped hop (:meth:`Store._run_grouped`)."""

    fn: Callable[..., object]
    args: tuple[object, ...]
    result: object = None
    error: BaseException | None = None
    done: bool = False


class _Pending(Protocol):
    """What :class:`_Batches` needs of a job."""

    error: BaseException | None
    done: bool


_J = TypeVar("_J", bound=_Pending)


class _Batches(Generic[_J]):
    """Jobs submitted while a batch runs wait, and go together in the next
    one: the first of their callers to find no batch running runs it (with
    ``run``, one worker-thread hop for the whole batch). Alone, a job gets a
    batch of its own at once.

    Before taking a batch, its runner yields to the loop for as long as
    more jobs keep joining: the callers the last batch woke are about to
    submit their next jobs, which then share this batch instead of waiting
    behind a batch of one. A job cancelled while it still waits is dropped
    and never runs; once its batch runs, its caller waits for it (as for
    any hop). ``run`` sets each job's ``done`` (and ``error``); if it
    raises, the jobs it left undone get that error."""

    def __init__(self, run: Callable[[list[_J]], Awaitable[None]]) -> None:
        self._run = run
        self._waiting: list[_J] = []
        self._running = False
        self._over = anyio.Event()

    @property
    def waiting(self) -> int:
        """How many jobs wait for a batch."""
        return len(self._waiting)

    async def submit(self, job: _J) -> None:
        """Return once ``job`` is done (``job.error`` says how)."""
        self._waiting.append(job)
        try:
            while not job.done:
                if self._running:
                    await self._over.wait()
                    continue
                count = -1
                while count != len(self._waiting) and not self._running:
                    count = len(self._waiting)
                    await anyio.lowlevel.checkpoint()
                if not self._running and not job.done:
                    await self._run_batch()
        except BaseException:
            if job in self._waiting:  # not taken by a batch: it never runs
                self._waiting.remove(job)
            else:
                with anyio.CancelScope(shield=True):
                    while not job.done:
                        await self._over.wait()
            raise

    async def _run_batch(self) -> None:
        batch, self._waiting = self._waiting, []
        self._running = True
        try:
            await self._run(batch)
        except BaseException as exc:  # the store closed, or the hop failed
            for other in batch:
                if not other.done:
                    other.error, other.done = exc, True
            if not isinstance(exc, Exception):
                raise
        finally:
            self._running = False
            over, self._over = self._over, anyio.Event()
            over.set()


_WAKEUP_DATAGRAM = 8192  # bytes: a few hundred ids a datagram

StepHook = Callable[[str], None]
"""Called with the name of each filesystem step just before it runs (tests
use it to simulate a crash at that step)."""


@dataclass(frozen=True, slots=True)
class NewEntry:
    """One entry to enqueue. ``make_record(name, batch_names)`` turns the
    name the store reserved (and those of the whole batch, in order) into
    the record's bytes, so a record can contain its own and its siblings'
    ids."""

    queue: str
    body: bytes
    make_record: Callable[[str, Sequence[str]], bytes]
    # Bytes written before ``body`` in the body file, given the name (e.g.
    # a header naming the entry); ``body`` itself is never copied for it.
    # Called before ``make_record`` for the same name, in the same thread.
    make_prefix: Callable[[str], bytes] | None = None


@dataclass(frozen=True, slots=True)
class StoredRecord:
    name: str
    queue: str
    data: bytes
    checked_out: bool
    # Why the file could not be read (``data`` is then empty), e.g. its
    # permissions: a caller treats it as a record that cannot be decoded.
    error: str | None = None


ProblemKind = Literal[
    "orphan_body",  # a body no record names (its writer is gone, or it is old)
    "orphan_registry",  # a registry entry with nothing behind it
    "missing_body",  # a record whose body is gone
    "duplicate",  # one name in two places
    "damaged_body",  # a body that is not what was spooled (its size or checksum)
    "stale_tmp",  # a file left in tmp/ past the age limit
    "unusable_dir",  # a directory of the store this process cannot use
    "stale_checkout",  # a record checked out past the age limit
    "stray_file",  # a file in a queue whose name is not an id
    "unreadable",  # (ondisk) a record that cannot be decoded
]


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of the consistency check."""

    kind: ProblemKind
    name: str
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.name}: {self.detail} ({self.path})"


@dataclass(slots=True)
class RecoveryReport:
    """What opening the store as owner found and repaired."""

    returned_checkouts: list[tuple[str, str]] = field(default_factory=list)
    # (queue, name) found checked out in a ``keep_checkouts`` queue, left there.
    kept_checkouts: list[tuple[str, str]] = field(default_factory=list)
    removed_tmp: list[str] = field(default_factory=list)
    removed_unacknowledged: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.returned_checkouts
            or self.kept_checkouts
            or self.removed_tmp
            or self.removed_unacknowledged
        )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _missing_dirs(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    missing: list[str] = []
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing[::-1]


def _fsync_parents(dirs: Iterable[str]) -> None:
    """Sync the parent of each of ``dirs`` (each parent once)."""
    for parent in dict.fromkeys(os.path.dirname(os.path.abspath(d)) for d in dirs):
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_pid(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _unusable_text(path: str, why: str) -> str:
    """What an operator reads about a directory this process cannot use,
    and what to run about it."""
    user = _user_name()
    return (
        f"cannot use directory {path}: {why}; it must belong to the daemon's user and be "
        f"readable, writable and searchable by it (e.g. chown {user}: {path} && "
        f"chmod 0750 {path})"
    )


def _user_name() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


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
        self.min_free_bytes = min_free_bytes
        self.queues = tuple(queues)
        self.owner = owner
        self._limiter = anyio.CapacityLimiter(max_threads)
        self._on_step = on_step
        self._pid = os.getpid()
        self._root_s = str(root)
        self._tmp = f"{root}/tmp"
        self._data = f"{root}/data"
        self._registry = f"{root}/.registry"
        self._lock_fd: int | None = None
        self._notify_socket: socket.socket | None = None
        self._tmp_count = itertools.count()
        self._writer_file: str | None = None  # what registry entries link to
        self._writer_files: list[str] = []  # every one this store made
        self._links = True  # False once link() is found not to work here
        self.sync: SyncMode = sync
        self._commits = _Batches[_Job](lambda batch: self._run(self._commit_sync, batch))
        self._dir_fds: dict[str, int] = {}
        # Directories of queues this process cannot use (path -> why), found
        # at open: what lives there is skipped, the rest is served.
        self.unusable: dict[str, str] = {}
        self._ops = _Batches[_Op](lambda group: self._run(self._run_ops_sync, group))
        self._closed = False
        self._inflight = 0  # operations running in worker threads
        self._drained = anyio.Event()

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
        Returns the store and what recovery did.
        """
        for q in queues:
            if not q or q.startswith(".") or "/" in q or q in ("tmp", "data"):
                raise ValueError(f"bad queue name {q!r}")
        for q in keep_checkouts:
            if q not in queues:
                raise ValueError(f"keep_checkouts names {q!r}, which is not a queue")
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
                store._open_sync, create, frozenset(keep_checkouts)
            )
        except BaseException:
            store._close_sync()
            raise
        return store, report

    async def close(self) -> None:
        """Take no new operation, wait for those under way (their directory
        fsyncs use the cached directory descriptors), then close."""
        if self._closed:
            return
        self._closed = True
        if self._inflight:
            with anyio.CancelScope(shield=True):
                await self._drained.wait()
        await anyio.to_thread.run_sync(self._close_sync)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _open_sync(self, create: bool, keep_checkouts: frozenset[str]) -> RecoveryReport:
        root = self._root_s
        needed = [root, self._tmp, self._data, self._registry]
        dirs = list(needed)
        for q in self.queues:
            dirs += [f"{root}/{q}", f"{root}/{q}/{CHECKOUT}", f"{root}/{q}/{REASONS}"]
        if create:
            parent = os.path.dirname(os.path.abspath(root))  # e.g. var/
            made = _missing_dirs(parent)
            os.makedirs(parent, exist_ok=True)
            self._refuse_foreign_dir_sync()
            for d in dirs:
                with contextlib.suppress(FileExistsError, PermissionError):
                    os.mkdir(d, _DIR_MODE)  # a refusal is reported below
                    made.append(d)
            # A new directory is an entry of its parent: until the parent is
            # synced, a power loss may take the directory and all it holds.
            _fsync_parents(made)
        for d in dirs:
            try:
                self._dir_fds[d] = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                raise StoreError(f"{root} is not a spool directory (missing {d})") from None
            except PermissionError as exc:
                why = exc.strerror or "Permission denied"
                if d in needed:
                    raise StoreError(exc.errno, _unusable_text(d, why), d) from None
                self.unusable[d] = why
                continue
            # The owner changes every directory: one it may open but not
            # change or search is unusable too. (A reader needs only to open.)
            if self.owner and not os.access(d, os.R_OK | os.W_OK | os.X_OK, effective_ids=True):
                why = "Permission denied (not readable, writable and searchable)"
                if d in needed:
                    raise StoreError(errno.EACCES, _unusable_text(d, why), d)
                self.unusable[d] = why
        # Inside an unusable directory, nothing is usable.
        for d in dirs:
            parent = os.path.dirname(d)
            if parent in self.unusable and d not in self.unusable:
                self.unusable[d] = f"inside {parent}, which is unusable"
        if not self.owner:
            return RecoveryReport()
        lock_path = f"{root}/lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLockedError(root, _read_pid(lock_path)) from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self._pid}\n".encode(), 0)
        return self._recover_sync(keep_checkouts)

    def _refuse_foreign_dir_sync(self) -> None:
        """A store is created in a missing or empty directory, or opened in
        one that is a store already (it has ``.registry``, or only names a
        store uses: a creation cut short). Any other directory holds
        someone else's files: refused, so a mistyped path never fills (or
        recovers away files from) a directory that is not ours."""
        try:
            names = os.listdir(self._root_s)
        except FileNotFoundError:
            return
        except NotADirectoryError:
            raise StoreError(f"{self._root_s} is not a directory") from None
        if not names or ".registry" in names:
            return
        own = {"lock", "wakeup", "tmp", "data", *self.queues}
        foreign = sorted(n for n in names if n not in own)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise StoreError(
                f"{self._root_s} is not a spool directory and not empty (it holds {shown}); "
                "give an empty or missing directory for a new spool"
            )

    def _close_sync(self) -> None:
        self._closed = True
        # Entries still linked to them keep their content: only a name goes.
        for path in self._writer_files:
            self._unlink_quiet(path)
        self._writer_files.clear()
        self._writer_file = None
        if self._notify_socket is not None:
            self._notify_socket.close()
            self._notify_socket = None
        for fd in self._dir_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dir_fds.clear()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------ helpers

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        if self._closed:
            raise StoreError(f"store {self.root} is closed")
        self._inflight += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except StoreError:
            raise
        except OSError as exc:  # every filesystem error leaves as a StoreError
            raise self._os_error(exc) from exc
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._drained.set()
                self._drained = anyio.Event()

    def _os_error(self, exc: OSError) -> StoreError:
        return StoreError(exc.errno, f"{self.root}: {exc.strerror}", exc.filename)

    async def run_grouped(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run ``fn(*args)``, a short blocking call (a rename, a few
        unlinks, opening a file), in a worker thread, in one hop with the
        others asked for meanwhile.

        Under load many attempts start and end at the same moment, and a
        hop each (waking a thread, then handing the GIL back and forth) costs
        the event loop more than the calls themselves. The first caller that
        finds no group under way runs every call waiting (its own included)
        in one hop, in order; the others wait for that group or the next.
        Alone, a call gets a hop of its own at once, as with a plain hop.
        Cancelled while still waiting, a call is dropped and never runs;
        once its group runs, the caller waits for it (as for any hop).
        Each call gets its own result or exception (an OSError as a
        StoreError)."""
        if self._closed:
            raise StoreError(f"store {self.root} is closed")
        op = _Op(fn, args)
        await self._ops.submit(op)
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[return-value]

    def _run_ops_sync(self, group: Sequence[_Op]) -> None:
        for op in group:
            try:
                op.result = op.fn(*op.args)
            except StoreError as exc:
                op.error = exc
            except OSError as exc:
                op.error = self._os_error(exc)
            except Exception as exc:  # noqa: BLE001 (given to its own caller)
                op.error = exc
            op.done = True

    def _step(self, name: str) -> None:
        if self._on_step is not None:
            self._on_step(name)

    def _require_owner(self) -> None:
        if not self.owner:
            raise StoreError(f"only the owner of {self.root} may change existing entries")

    def _check_queue(self, queue: str) -> str:
        if queue not in self.queues:
            raise ValueError(f"unknown queue {queue!r}")
        return queue

    def _qdir(self, queue: str, checked_out: bool = False) -> str:
        base = f"{self._root_s}/{self._check_queue(queue)}"
        return f"{base}/{CHECKOUT}" if checked_out else base

    def _usable(self, directory: str) -> bool:
        return directory not in self.unusable

    def unusable_text(self, directory: str) -> str:
        """Why ``directory`` cannot be used, and what to run about it."""
        return _unusable_text(directory, self.unusable.get(directory, "Permission denied"))

    def _fsync_dirs(self, dirs: Iterable[str]) -> None:
        for d in dict.fromkeys(dirs):
            os.fsync(self._dir_fds[d])

    def _write_tmp(
        self, name: str, kind: str, data: bytes, prefix: bytes = b"", *, sync: bool = True
    ) -> str:
        # Unique without randomness: the name is this process's, the count too.
        path = f"{self._tmp}/{self._pid}.{name}.{kind}.{next(self._tmp_count)}"
        fd = os.open(path, _OPEN_FLAGS, _FILE_MODE)
        try:
            for part in (prefix, data):
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)
        return path

    def _reserve_sync(self) -> str:
        for _ in range(100):
            name = new_id()
            try:
                self._make_entry(f"{self._registry}/{name}")
            except FileExistsError:
                continue
            return name
        raise StoreError(f"could not reserve a unique id in {self._registry}")

    def _make_entry(self, path: str) -> None:
        """Create the registry entry ``path`` (FileExistsError if taken): a
        link to this writer's pid file, or a file of its own."""
        for _ in range(4):
            if not self._links:
                break
            source = self._writer_file or self._new_writer_file()
            try:
                os.link(source, path)
            except FileNotFoundError:
                if not os.path.isdir(self._registry):
                    raise
                self._writer_file = None  # removed under us: make another
            except FileExistsError:
                raise
            except OSError as exc:
                if exc.errno == errno.EMLINK:
                    self._writer_file = None  # full (65,000 links on ext4): a new one
                elif exc.errno in _NO_LINKS:
                    self._links = False
                else:
                    raise
            else:
                return
        self._create_pid_file(path)

    def _new_writer_file(self) -> str:
        for n in itertools.count(len(self._writer_files)):
            path = f"{self._registry}/{_WRITER_PREFIX}{self._pid}.{n}"
            try:
                self._create_pid_file(path)
            except FileExistsError:
                continue  # another store of this process, or a dead one's with our pid
            self._writer_files.append(path)
            self._writer_file = path
            return path
        raise AssertionError("unreachable")

    def _create_pid_file(self, path: str) -> None:
        """Create ``path`` (FileExistsError if it exists) holding our pid."""
        fd = os.open(path, _OPEN_FLAGS, _FILE_MODE)
        try:
            os.write(fd, f"{self._pid}\n".encode())
        except BaseException:
            os.close(fd)
            self._unlink_quiet(path)
            raise
        os.close(fd)

    def _unlink_quiet(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    # --------------------------------------------------------- operations

    # ------------------------------------------------------------ wake-ups

    @property
    def wakeup_path(self) -> str:
        return f"{self._root_s}/wakeup"

    @asynccontextmanager
    async def wakeups(self) -> AsyncIterator[AsyncIterator[list[str]]]:
        """(Owner) bind the wake-up socket; yields an iterator of the name
        batches other processes report. A stale socket file is replaced."""
        self._require_owner()
        path = self.wakeup_path
        with contextlib.suppress(FileNotFoundError):
            await anyio.Path(path).unlink()
        sock = await anyio.create_unix_datagram_socket(local_path=path, local_mode=0o660)

        raw: socket.socket = sock.extra(anyio.abc.SocketAttribute.raw_socket)

        def names_in(packet: bytes) -> list[str]:
            return [n for n in packet.decode("ascii", "replace").split() if is_valid_id(n)]

        async def batches() -> AsyncIterator[list[str]]:
            async for packet, _ in sock:
                names = names_in(packet)
                # Take every datagram already queued too: one batch for all
                # (the queue is short, and writers wait while it is full).
                while True:
                    try:
                        more = raw.recv(_WAKEUP_DATAGRAM)
                    except (BlockingIOError, InterruptedError):
                        break
                    names += names_in(more)
                if names:
                    yield names

        try:
            yield batches()
        finally:
            with anyio.CancelScope(shield=True):
                await sock.aclose()
                with contextlib.suppress(OSError):
                    await anyio.Path(path).unlink()

    def try_notify_owner(self, names: Sequence[str]) -> NotifyResult:
        """(Writer) tell the owner about new entries, without waiting: a
        non-blocking send (fit for the event loop). ``"sent"``; ``"busy"``
        when the owner's queue is full (try again shortly: ``names`` not
        sent yet); ``"absent"`` when no owner listens (it will find them
        when it opens the spool). Long lists go in several datagrams."""
        if self._notify_socket is None:
            self._notify_socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        chunk = _WAKEUP_DATAGRAM // (17 + 1)
        for start in range(0, len(names), chunk):
            payload = " ".join(names[start : start + chunk]).encode("ascii")
            try:
                self._notify_socket.sendto(payload, self.wakeup_path)
            except (BlockingIOError, InterruptedError):
                return "busy"
            except OSError:
                return "absent"
        return "sent"

    async def notify_owner(self, names: Sequence[str]) -> bool:
        """(Writer) tell the owner about new entries, waiting up to 2 s while
        its queue is full; False if no owner listens or it stayed busy (it
        will still find them, at its next rescan or open)."""
        pause = 0.005
        for _ in range(9):  # about 2.5 s in all
            result = self.try_notify_owner(names)
            if result != "busy":
                return result == "sent"
            await anyio.sleep(pause)
            pause *= 2
        return False

    async def enqueue(
        self, entries: Sequence[NewEntry], on_reserve: Callable[[str], None] | None = None
    ) -> list[str]:
        """Durably add ``entries``; return their names, in order.

        ``on_reserve(name)`` is called (in the worker thread) as each name is
        reserved, before anything of it can be seen in a queue.

        All entries are committed before the call returns (the directories are
        fsynced once for the batch). If it raises, nothing it wrote remains.
        """
        for e in entries:
            self._check_queue(e.queue)
        if self.sync == "fsync":
            return await self._run(self._enqueue_sync, entries, on_reserve)
        return await self._enqueue_grouped(_Job(entries, on_reserve))

    async def _enqueue_grouped(self, job: _Job) -> list[str]:
        """Group commit: the jobs asked for at the same moment are committed
        together, in one thread hop (see :class:`_Batches`)."""
        await self._commits.submit(job)
        if job.error is not None:
            raise job.error
        assert job.names is not None
        return job.names

    def _commit_sync(self, batch: Sequence[_Job]) -> None:
        """Commit the jobs of a batch with two ``syncfs`` in all: the new
        files are written (no fsync), the filesystem synced (their content
        is durable), then renamed into place and the filesystem synced again
        (the renames are). A job that fails alone is undone alone; if a sync
        fails, every job of the batch is undone."""
        staged: list[tuple[_Job, list[str], list[str], list[tuple[str, str, str, str]]]] = []
        free = self.free_bytes() if self.min_free_bytes else 0  # once for the batch
        for job in batch:
            names: list[str] = []
            written: list[str] = []
            try:
                self._step("check_space")
                needed = sum(len(e.body) for e in job.entries)
                self._check_free_space(needed, free)
                free -= needed
                moves = self._stage(job.entries, job.on_reserve, names, written, sync=False)
            except Exception as exc:  # noqa: BLE001 (undone, and given to its caller)
                self._undo(written)
                job.error, job.done = self._store_error(exc, "enqueue"), True
                continue
            staged.append((job, names, written, moves))
        if not staged:
            return
        try:
            self._step("sync_data")
            self._syncfs()
            for _job, _names, written, moves in staged:
                self._move_into_place(moves, written)
            self._step("fsync_dirs")
            self._syncfs()
        except Exception as exc:  # noqa: BLE001 (undone, and given to every caller)
            for job, _names, written, _moves in staged:
                self._undo(written)
                job.error, job.done = self._store_error(exc, "enqueue"), True
            return
        for job, names, _written, _moves in staged:
            job.names, job.done = names, True
        self._step("done")

    def _syncfs(self) -> None:
        if _libc.syncfs(self._dir_fds[self._tmp]) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), self._root_s)

    def _stage(
        self,
        entries: Sequence[NewEntry],
        on_reserve: Callable[[str], None] | None,
        names: list[str],
        written: list[str],
        *,
        sync: bool,
    ) -> list[tuple[str, str, str, str]]:
        """Reserve names and write the tmp files of ``entries`` (filling
        ``names`` and ``written``, every path to remove on failure)."""
        for _ in entries:
            self._step("reserve")
            name = self._reserve_sync()
            if on_reserve is not None:
                on_reserve(name)
            names.append(name)
            written.append(f"{self._registry}/{name}")
        moves: list[tuple[str, str, str, str]] = []
        for name, e in zip(names, entries, strict=True):
            self._step("write_body")
            prefix = e.make_prefix(name) if e.make_prefix is not None else b""
            body_tmp = self._write_tmp(name, "body", e.body, prefix, sync=sync)
            written.append(body_tmp)
            self._step("write_record")
            record_tmp = self._write_tmp(name, "record", e.make_record(name, names), sync=sync)
            written.append(record_tmp)
            moves.append((name, e.queue, body_tmp, record_tmp))
        return moves

    def _move_into_place(
        self, moves: Sequence[tuple[str, str, str, str]], written: list[str]
    ) -> None:
        """The body into ``data/`` first, the record (the commit point) last."""
        for name, queue, body_tmp, record_tmp in moves:
            self._step("rename_body")
            os.rename(body_tmp, f"{self._data}/{name}")
            written.append(f"{self._data}/{name}")
            self._step("rename_record")
            os.rename(record_tmp, f"{self._root_s}/{queue}/{name}")
            written.append(f"{self._root_s}/{queue}/{name}")

    def _undo(self, written: Sequence[str]) -> None:
        for path in reversed(written):
            self._unlink_quiet(path)

    def _store_error(self, exc: Exception, what: str) -> Exception:
        if isinstance(exc, OSError) and not isinstance(exc, StoreError):
            error = StoreError(
                exc.errno, f"{what} into {self.root} failed: {exc.strerror}", exc.filename
            )
            error.__cause__ = exc  # as "raise ... from exc" would
            return error
        return exc

    def free_bytes(self) -> int:
        """Bytes free for this process on the store's filesystem (blocking:
        one ``fstatvfs``)."""
        st = os.fstatvfs(self._dir_fds[self._tmp])
        return st.f_bavail * st.f_frsize

    def _check_free_space(self, needed: int, free: int | None = None) -> None:
        if not self.min_free_bytes:
            return
        if free is None:
            free = self.free_bytes()
        if free - needed < self.min_free_bytes:
            raise InsufficientStorageError(
                errno.ENOSPC,
                f"{self.root}: {format_size(free)} free, {format_size(self.min_free_bytes)} "
                f"must stay free (spool.min_free_space) after writing {format_size(needed)}; "
                "new mail is refused until space is freed",
            )

    def _enqueue_sync(
        self, entries: Sequence[NewEntry], on_reserve: Callable[[str], None] | None = None
    ) -> list[str]:
        """One call's entries: each file fsynced, then the directories."""
        self._step("check_space")
        self._check_free_space(sum(len(e.body) for e in entries))
        names: list[str] = []
        written: list[str] = []  # every path to remove if we fail
        try:
            moves = self._stage(entries, on_reserve, names, written, sync=True)
            self._move_into_place(moves, written)
            self._step("fsync_dirs")
            # .registry is not fsynced: a committed record does not need its
            # registry entry to survive a power loss (ids stay unique by
            # time and randomness; recovery and delete tolerate its absence).
            self._fsync_dirs([self._data] + [f"{self._root_s}/{e.queue}" for e in entries])
        except Exception as exc:
            self._undo(written)
            error = self._store_error(exc, "enqueue")
            if error is exc:
                raise
            raise error from exc
        self._step("done")
        return names

    async def read(self, queue: str, name: str) -> StoredRecord:
        """Read a record from ``queue`` (or its checkout directory)."""
        validate_id(name)
        return await self._run(self._read_sync, queue, name)

    def _read_sync(self, queue: str, name: str) -> StoredRecord:
        for checked_out in (False, True):
            try:
                with open(f"{self._qdir(queue, checked_out)}/{name}", "rb") as f:
                    return StoredRecord(name, queue, f.read(), checked_out)
            except FileNotFoundError:
                continue
        raise NotFoundError(f"{name}: not in queue {queue}")

    async def read_many(self, queues: Sequence[str], names: Sequence[str]) -> list[StoredRecord]:
        """The records of ``names``, each from the first of ``queues`` that
        holds it (not checked out), in one thread hop; missing ones skipped."""
        for name in names:
            validate_id(name)
        for q in queues:
            self._check_queue(q)
        return await self._run(self._read_many_sync, queues, names)

    def _read_many_sync(self, queues: Sequence[str], names: Sequence[str]) -> list[StoredRecord]:
        out = []
        for name in names:
            for q in queues:
                try:
                    with open(f"{self._qdir(q)}/{name}", "rb") as f:
                        out.append(StoredRecord(name, q, f.read(), False))
                    break
                except FileNotFoundError:
                    continue
        return out

    async def read_queue(self, queue: str) -> list[StoredRecord]:
        """Every record of ``queue``, checked-out ones included, in name order.
        Files whose names are not ids are skipped (the check reports them)."""
        return await self._run(self._read_queue_sync, queue)

    def _read_queue_sync(self, queue: str) -> list[StoredRecord]:
        out = []
        for checked_out in (False, True):
            d = self._qdir(queue, checked_out)
            if not self._usable(d):
                continue  # the check reports the directory
            for name in sorted(self._names(d)):
                try:
                    with open(f"{d}/{name}", "rb") as f:
                        out.append(StoredRecord(name, queue, f.read(), checked_out))
                except FileNotFoundError:
                    continue  # moved away under us (we are not the owner)
                except PermissionError as exc:
                    out.append(StoredRecord(name, queue, b"", checked_out, exc.strerror))
        out.sort(key=lambda r: r.name)
        return out

    async def read_records(
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
        self._check_queue(queue)
        return await self._run(self._read_records_sync, queue, names, then)

    def _read_records_sync(
        self,
        queue: str,
        names: Sequence[tuple[str, bool]],
        then: Callable[[list[StoredRecord]], _T],
    ) -> _T:
        dir_fds = (
            self._dir_fds.get(self._qdir(queue), -1),
            self._dir_fds.get(self._qdir(queue, True), -1),
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
            finally:
                os.close(fd)
            out.append(StoredRecord(name, queue, data, checked_out))
        return then(out)

    async def list_queue(self, queue: str) -> list[tuple[str, bool]]:
        """Names in ``queue`` as ``(name, checked_out)``, in name order."""
        return await self._run(self._list_queue_sync, queue)

    def _list_queue_sync(self, queue: str) -> list[tuple[str, bool]]:
        """Raises :class:`StoreError` when the queue's directory is
        unusable; an unusable checkout directory is left out."""
        home = self._qdir(queue)
        if not self._usable(home):
            raise StoreError(errno.EACCES, self.unusable_text(home), home)
        out = [(n, False) for n in self._names(home)]
        if self._usable(self._qdir(queue, True)):
            out += [(n, True) for n in self._names(self._qdir(queue, True))]
        out.sort()
        return out

    @staticmethod
    def _names(directory: str) -> list[str]:
        with os.scandir(directory) as it:
            return [e.name for e in it if is_valid_id(e.name) and not e.is_dir()]

    def body_path(self, name: str) -> Path:
        """Where the body of ``name`` is (for streaming it without a copy)."""
        return Path(self._data, validate_id(name))

    async def read_body(self, name: str) -> bytes:
        validate_id(name)
        return await self._run(self._read_body_sync, name)

    def _read_body_sync(self, name: str) -> bytes:
        try:
            with open(f"{self._data}/{name}", "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFoundError(f"{name}: no body in {self._data}") from None

    async def checkout(self, queue: str, name: str) -> None:
        """Mark a record as taken by a worker (``QUEUE/.checkout/NAME``).

        Not fsynced: before and after, the record belongs to ``queue``.
        """
        self._require_owner()
        validate_id(name)
        await self.run_grouped(self._checkout_sync, queue, name)

    def _checkout_sync(self, queue: str, name: str) -> None:
        try:
            os.rename(f"{self._qdir(queue)}/{name}", f"{self._qdir(queue, True)}/{name}")
        except FileNotFoundError:
            raise NotFoundError(f"{name}: not in queue {queue}") from None

    async def write(
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
        self._check_queue(to_queue or queue)
        await self._run(self._write_sync, queue, name, record, to_queue or queue, checked_out)

    def _write_sync(
        self, queue: str, name: str, record: bytes | None, to_queue: str, checked_out: bool
    ) -> None:
        src_dir = self._qdir(queue, checked_out)
        dst_dir = self._qdir(to_queue)
        src = f"{src_dir}/{name}"
        if not os.path.exists(src):
            raise NotFoundError(f"{name}: not in queue {queue}")
        tmp = None
        try:
            if record is not None:
                self._step("write_record")
                tmp = self._write_tmp(name, "record", record)
                self._step("replace")
                os.rename(tmp, src)
                tmp = None
            if src_dir != dst_dir:
                self._step("move")
                os.rename(src, f"{dst_dir}/{name}")
            self._step("fsync_dirs")
            self._fsync_dirs([src_dir, dst_dir])
        except OSError as exc:
            if tmp is not None:
                self._unlink_quiet(tmp)
            raise StoreError(
                exc.errno, f"writing {name} in {self.root} failed: {exc.strerror}", exc.filename
            ) from exc
        self._step("done")

    async def release(self, queue: str, name: str) -> None:
        """Return a checked-out record to its queue unchanged."""
        await self.write(queue, name, None, checked_out=True)

    async def delete(self, queue: str, name: str, *, checked_out: bool = False) -> None:
        """Remove a record, its body and its registry entry, in that order."""
        self._require_owner()
        validate_id(name)
        await self.run_grouped(self._delete_sync, queue, name, checked_out)

    def _delete_sync(self, queue: str, name: str, checked_out: bool) -> None:
        d = self._qdir(queue, checked_out)
        if not os.path.exists(f"{d}/{name}"):
            raise NotFoundError(f"{name}: not in queue {queue}")
        # The registry entry goes first: it names the writer that created
        # the entry, which may still be alive, and a body left behind by a
        # crash below must read as nobody's (recovery then removes it).
        self._step("unlink_registry")
        self._unlink_quiet(f"{self._registry}/{name}")
        try:
            self._step("unlink_record")
            os.unlink(f"{d}/{name}")
        except FileNotFoundError:
            raise NotFoundError(f"{name}: not in queue {queue}") from None
        self._step("unlink_body")
        self._unlink_quiet(f"{self._data}/{name}")
        # Not fsynced, on purpose: if the power fails before the kernel writes
        # these unlinks, the entry comes back and (a delivered message) is sent
        # again; at least once, never lost. Fsyncing three directories per
        # delivery would double what a message costs the disk.
        self._step("done")

    async def delete_many(self, queue: str, names: Sequence[str]) -> int:
        """:meth:`delete` for many entries of ``queue`` in one worker-thread
        hop (not checked out); names no longer there are skipped. Returns
        how many were deleted."""
        self._require_owner()
        for name in names:
            validate_id(name)
        return await self._run(self._delete_many_sync, queue, list(names))

    def _delete_many_sync(self, queue: str, names: list[str]) -> int:
        deleted = 0
        for name in names:
            try:
                self._delete_sync(queue, name, False)
            except NotFoundError:
                continue
            deleted += 1
        return deleted

    async def set_aside(self, queue: str, name: str, to_queue: str, reason: str) -> None:
        """Move a record that cannot be read, byte for byte, to ``to_queue``
        and keep ``reason`` beside it in ``to_queue/.reasons/NAME``."""
        self._require_owner()
        validate_id(name)
        self._check_queue(to_queue)
        await self._run(self._set_aside_sync, queue, name, to_queue, reason)

    def _set_aside_sync(self, queue: str, name: str, to_queue: str, reason: str) -> None:
        reasons_dir = f"{self._qdir(to_queue)}/{REASONS}"
        tmp = self._write_tmp(name, "reason", reason.encode("utf-8", "replace") + b"\n")
        os.rename(tmp, f"{reasons_dir}/{name}")
        for checked_out in (False, True):
            src_dir = self._qdir(queue, checked_out)
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{src_dir}/{name}", f"{self._qdir(to_queue)}/{name}")
                self._fsync_dirs([reasons_dir, src_dir, self._qdir(to_queue)])
                return
        raise NotFoundError(f"{name}: not in queue {queue}")

    async def set_aside_reason(self, queue: str, name: str) -> str | None:
        """The reason kept by :meth:`set_aside`, if any."""
        validate_id(name)
        return await self._run(self._reason_sync, queue, name)

    def _reason_sync(self, queue: str, name: str) -> str | None:
        try:
            with open(f"{self._qdir(queue)}/{REASONS}/{name}", "rb") as f:
                return f.read().decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None

    async def clear_reason(self, queue: str, name: str) -> None:
        validate_id(name)
        await self.run_grouped(self._unlink_quiet, f"{self._qdir(queue)}/{REASONS}/{name}")

    # ---------------------------------------------- recovery and checking

    def _all_records(self) -> dict[str, list[tuple[str, bool]]]:
        found: dict[str, list[tuple[str, bool]]] = {}
        for q in self.queues:
            if not self._usable(self._qdir(q)):
                continue
            for name, checked_out in self._list_queue_sync(q):
                found.setdefault(name, []).append((q, checked_out))
        return found

    def _record_names(self) -> set[str]:
        """The name of every record in every queue (a set: a large spool's
        recovery asks only whether a name has a record)."""
        found: set[str] = set()
        for q in self.queues:
            for d in (self._qdir(q), self._qdir(q, True)):
                if self._usable(d):
                    found.update(self._names(d))
        return found

    def _registry_sync(self) -> tuple[list[str], list[str]]:
        """One listing of ``.registry``: the entries' names (ids), and the
        writers' pid files."""
        entries: list[str] = []
        writers: list[str] = []
        with os.scandir(self._registry) as it:
            for e in it:
                if e.name.startswith(_WRITER_PREFIX):
                    writers.append(e.name)
                elif is_valid_id(e.name) and not e.is_dir():
                    entries.append(e.name)
        return entries, writers

    def _writer_gone(self, registry_name: str) -> bool:
        pid = _read_pid(f"{self._registry}/{registry_name}")
        return pid is None or (pid != self._pid and not _pid_alive(pid))

    def _recover_sync(self, keep_checkouts: frozenset[str]) -> RecoveryReport:
        report = RecoveryReport()
        touched: list[str] = []
        for q in self.queues:
            if not (self._usable(self._qdir(q, True)) and self._usable(self._qdir(q))):
                continue  # reported at open; what is there waits
            for name in self._names(self._qdir(q, True)):
                dst = f"{self._qdir(q)}/{name}"
                if os.path.exists(dst):
                    continue  # a duplicate: leave both for the check to report
                if q in keep_checkouts:
                    report.kept_checkouts.append((q, name))
                    continue
                os.rename(f"{self._qdir(q, True)}/{name}", dst)
                report.returned_checkouts.append((q, name))
                touched += [self._qdir(q, True), self._qdir(q)]
        with os.scandir(self._tmp) as it:
            tmp_names = [e.name for e in it]
        for tmp_name in tmp_names:
            pid_text = tmp_name.split(".", 1)[0]
            if pid_text.isdigit() and int(pid_text) != self._pid and _pid_alive(int(pid_text)):
                continue  # a live writer's work in progress
            # Anything in tmp/ was never renamed into place: it was never
            # acknowledged, and the committed copy (if any) is elsewhere.
            self._unlink_quiet(f"{self._tmp}/{tmp_name}")
            report.removed_tmp.append(tmp_name)
        records = self._record_names()
        for name in self._names(self._data):
            if name not in records and self._writer_gone(name):
                self._unlink_quiet(f"{self._data}/{name}")
                self._unlink_quiet(f"{self._registry}/{name}")
                report.removed_unacknowledged.append(name)
                touched += [self._data, self._registry]
        entries, writers = self._registry_sync()
        for name in entries:
            if name not in records and self._writer_gone(name):
                self._unlink_quiet(f"{self._registry}/{name}")
                if name not in report.removed_unacknowledged:
                    report.removed_unacknowledged.append(name)
                touched.append(self._registry)
        for writer in writers:
            path = f"{self._registry}/{writer}"
            pid = _read_pid(path)
            if pid is None or (pid != self._pid and not _pid_alive(pid)):
                self._unlink_quiet(path)  # its entries (if any) keep their content
        if touched:
            self._fsync_dirs(touched)
        return report

    async def check(self, max_age: float = 3600.0) -> list[Problem]:
        """Report inconsistencies; change nothing.

        Finds bodies and registry entries with no record (once their writer
        is gone or they are older than ``max_age`` seconds), records with no
        body, one name in two places, files in ``tmp/`` or a checkout older
        than ``max_age``, and files in a queue whose names are not ids.
        """
        return await self._run(self._check_sync, max_age)

    def _check_sync(self, max_age: float) -> list[Problem]:
        problems: list[Problem] = []
        now = time.time()

        def old(path: str) -> bool:
            # The later of the two times: a rename (a checkout) or a link
            # (a registry entry: see the module docstring) changes only ctime.
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return False
            return now - max(st.st_mtime, st.st_ctime) > max_age

        records = self._all_records()
        for name, places in sorted(records.items()):
            # A queue and its own checkout: a rename between the two listings
            # (an attempt starting or ending while the daemon runs), not a copy.
            if len({q for q, _c in places}) > 1:
                where = ", ".join(q + ("/.checkout" if c else "") for q, c in places)
                problems.append(
                    Problem("duplicate", name, f"{self.root}", f"one id in several places: {where}")
                )
            for q, checked_out in places:
                path = f"{self._qdir(q, checked_out)}/{name}"
                if checked_out and old(path):
                    problems.append(
                        Problem("stale_checkout", name, path, f"checked out over {max_age:.0f}s")
                    )
            if not os.path.exists(f"{self._data}/{name}"):
                q, c = places[0]
                problems.append(
                    Problem(
                        "missing_body", name, f"{self._qdir(q, c)}/{name}", "record has no body"
                    )
                )
        for name in self._names(self._data):
            path = f"{self._data}/{name}"
            if name not in records and (self._writer_gone(name) or old(path)):
                problems.append(Problem("orphan_body", name, path, "body with no record"))
        for name in self._names(self._registry):
            path = f"{self._registry}/{name}"
            if (
                name not in records
                and not os.path.exists(f"{self._data}/{name}")
                and (self._writer_gone(name) or old(path))
            ):
                problems.append(Problem("orphan_registry", name, path, "registry entry, no record"))
        with os.scandir(self._tmp) as it:
            for e in it:
                if old(e.path):
                    problems.append(Problem("stale_tmp", e.name, e.path, "left in tmp/"))
        for d in sorted(self.unusable):
            problems.append(Problem("unusable_dir", os.path.basename(d), d, self.unusable_text(d)))
        for q in self.queues:
            for checked_out in (False, True):
                d = self._qdir(q, checked_out)
                if not self._usable(d):
                    continue
                with os.scandir(d) as it:
                    for e in it:
                        if e.name in (CHECKOUT, REASONS):
                            continue
                        if not is_valid_id(e.name) or e.is_dir():
                            problems.append(
                                Problem("stray_file", e.name, e.path, "not a record name")
                            )
        return problems

    # -------------------------------------------------------------- errors

    @staticmethod
    def is_disk_full(exc: BaseException) -> bool:
        return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
