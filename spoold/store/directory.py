"""The store's directory: its layout, its descriptors, and the file steps
every change is made of.

:class:`StoreDirectory` knows where things are (``tmp/``, ``data/``,
``.registry/``, each queue and its ``.checkout/`` and ``.reasons/``),
creates them (refusing a directory that is someone else's), keeps a
descriptor open on each one for the fsyncs, holds the owner's lock, and
provides the steps the operations are built from: write a file under
``tmp/`` (fsynced unless asked not to), fsync directories, ``syncfs``,
list a queue. Every method here blocks: callers run them in a worker thread
(:mod:`spoold.store.hops`). Errors are the filesystem's own
:class:`OSError`; the hop turns them into :class:`~spoold.errors.StoreError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import operator
import os
import stat
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import structlog

from spoold.errors import SpoolLockedError, StoreError
from spoold.ids import is_valid_id
from spoold.numerals import ascii_decimal
from spoold.store.records import StepHook

__all__ = [
    "StoreDirectory",
    "CHECKOUT",
    "REASONS",
    "fsync_directory",
    "replace_file",
    "unlink_quiet",
    "read_pid",
]

CHECKOUT = ".checkout"
REASONS = ".reasons"
DIR_MODE = 0o750
FILE_MODE = 0o640
OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_REUSE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
# An unnamed new file in a directory (0: this platform has no O_TMPFILE),
# and that file opened again once named.
_UNNAMED_FLAGS = os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC if hasattr(os, "O_TMPFILE") else 0
_NAMED_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# The errors that say files cannot be made unnamed here, by step: no
# O_TMPFILE (an old kernel reads it as O_DIRECTORY: EISDIR; a filesystem
# without it: EOPNOTSUPP; EINVAL), no /proc or not ours to read (ENOENT,
# EACCES), a link refused (EXDEV, EPERM).
_NOT_HERE = {
    "open": frozenset({errno.EISDIR, errno.EOPNOTSUPP, errno.EINVAL}),
    "link": frozenset({errno.ENOENT, errno.EACCES, errno.EXDEV, errno.EPERM}),
}

_libc = ctypes.CDLL(None, use_errno=True)
_first = operator.itemgetter(0)
log = structlog.get_logger("spoold.store")


class StoreDirectory:
    """The directory of one store, as this process has it open."""

    def __init__(
        self, root: Path, queues: Sequence[str], *, owner: bool, on_step: StepHook | None
    ) -> None:
        self.root = root
        self.queues = tuple(queues)
        self.owner = owner
        self._on_step = on_step
        self.pid = os.getpid()
        self.root_s = str(root)
        self.tmp = f"{root}/tmp"
        self.data = f"{root}/data"
        self.registry = f"{root}/.registry"
        self._lock_fd: int | None = None
        self._tmp_count = itertools.count()
        self._unnamed = _UNNAMED_FLAGS != 0  # whether files can be made unnamed (_create_tmp)
        self._unnamed_lock = threading.Lock()
        self.dir_fds: dict[str, int] = {}
        # Directories of queues this process cannot use (path -> why), found
        # at open: what lives there is skipped, the rest is served.
        self.unusable: dict[str, str] = {}

    # ------------------------------------------------- opening and closing

    def open_sync(self, create: bool) -> None:
        """Create what is missing (with ``create``) and open a descriptor
        on every directory; note those this process cannot use."""
        root = self.root_s
        needed = [root, self.tmp, self.data, self.registry]
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
                    os.mkdir(d, DIR_MODE)  # a refusal is reported below
                    made.append(d)
            # A new directory is an entry of its parent: until the parent is
            # synced, a power loss may take the directory and all it holds.
            _fsync_parents(made)
        for d in dirs:
            try:
                self.dir_fds[d] = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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

    def _refuse_foreign_dir_sync(self) -> None:
        """A store is created in a missing or empty directory, or opened in
        one that is a store already (it has ``.registry``, or only names a
        store uses: a creation cut short). Any other directory holds
        someone else's files: refused, so a mistyped path never fills (or
        recovers away files from) a directory that is not ours."""
        try:
            names = os.listdir(self.root_s)
        except FileNotFoundError:
            return
        except NotADirectoryError:
            raise StoreError(f"{self.root_s} is not a directory") from None
        if not names or ".registry" in names:
            return
        own = {"lock", "wakeup", "tmp", "data", *self.queues}
        foreign = sorted(n for n in names if n not in own)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise StoreError(
                f"{self.root_s} is not a spool directory and not empty (it holds {shown}); "
                "give an empty or missing directory for a new spool"
            )

    def lock_sync(self) -> None:
        """Take the owner's lock (``lock``, holding our pid), or raise
        :class:`SpoolLockedError` at once if another process holds it."""
        lock_path = f"{self.root_s}/lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLockedError(self.root_s, read_pid(lock_path)) from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.pid}\n".encode(), 0)

    def close_sync(self) -> None:
        """Close the directory descriptors, then the lock (which releases it)."""
        for fd in self.dir_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.dir_fds.clear()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------- places

    def step(self, name: str) -> None:
        if self._on_step is not None:
            self._on_step(name)

    def check_queue(self, queue: str) -> str:
        if queue not in self.queues:
            raise ValueError(f"unknown queue {queue!r}")
        return queue

    def qdir(self, queue: str, checked_out: bool = False) -> str:
        base = f"{self.root_s}/{self.check_queue(queue)}"
        return f"{base}/{CHECKOUT}" if checked_out else base

    def usable(self, directory: str) -> bool:
        return directory not in self.unusable

    def unusable_text(self, directory: str) -> str:
        """Why ``directory`` cannot be used, and what to run about it."""
        return _unusable_text(directory, self.unusable.get(directory, "Permission denied"))

    @staticmethod
    def names(directory: str) -> list[str]:
        with os.scandir(directory) as it:
            return [e.name for e in it if is_valid_id(e.name) and not e.is_dir()]

    def list_queue(self, queue: str) -> list[tuple[str, bool]]:
        """Names in ``queue`` as ``(name, checked_out)``, in name order.
        Raises :class:`StoreError` when the queue's directory is unusable;
        an unusable checkout directory is left out."""
        home = self.qdir(queue)
        if not self.usable(home):
            raise StoreError(errno.EACCES, self.unusable_text(home), home)
        out = [(n, False) for n in self.names(home)]
        if self.usable(self.qdir(queue, True)):
            out += [(n, True) for n in self.names(self.qdir(queue, True))]
        # By name alone (stable: a name in both comes first unchecked), which
        # sorts strings, not tuples: several times faster for a large queue.
        out.sort(key=_first)
        return out

    # -------------------------------------------------------- file steps

    def fsync_dirs(self, dirs: Iterable[str]) -> None:
        for d in dict.fromkeys(dirs):
            os.fsync(self.dir_fds[d])

    def syncfs(self) -> None:
        """Write out the whole filesystem and flush the drive's write cache
        after the last of those writes: what was written before the call is
        on stable storage when it returns.

        ``syncfs`` alone does not promise the second half everywhere. On
        ext4 without a journal (traced on Linux 6.18) it asks the drive to
        flush its cache while the metadata writes it started (the renames'
        directory blocks among them) are still in flight, and issues more
        metadata writes after the flush; with a volatile write cache, a
        rename could be lost to a power cut after the call returned. The
        fsync of a directory that follows writes what is left of that
        directory and flushes the cache once more, after all of them (on a
        filesystem with a journal it costs one flush at most)."""
        fd = self.dir_fds[self.tmp]
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), self.root_s)
        os.fsync(fd)

    def free_bytes(self) -> int:
        """Bytes free for this process on the store's filesystem (blocking:
        one ``fstatvfs``)."""
        st = os.fstatvfs(self.dir_fds[self.tmp])
        return st.f_bavail * st.f_frsize

    def _create_tmp(self, path: str, unnamed: bool) -> int:
        """Create the ``tmp/`` file ``path`` (it must not exist); a
        descriptor open for writing on it.

        With ``unnamed`` (another thread of the store creates files at the
        same moment): made unnamed (``O_TMPFILE``), named ``path`` (``linkat`` through
        ``/proc/self/fd``), then opened by that name before anything is
        written: the same file, under the same name and with a descriptor
        that says so (``/proc``, ``lsof``), as ``O_CREAT|O_EXCL`` makes,
        but the filesystem allocates its inode without holding the lock of
        ``tmp/``. On ext4 without a journal an inode allocation goes one by
        one past every inode freed in the last minute or so, and may take
        most of an add's time; created by name, the files of every writer
        thread and process of the store queue on that one lock, and two
        threads writing one batch (:mod:`spoold.store.sharing`) would take
        turns. Naming and opening take the lock only briefly. A thread
        creating files alone queues behind no one of its own, and creates
        them by name: three more calls a file are not worth it there.

        A process that dies before the name is made leaves nothing (the
        kernel frees an unnamed file with its last descriptor); a power cut
        in that moment may leave an empty inode with no name, which the
        filesystem's check frees. Where this way fails, the file is created
        by name, which reports the error if that fails too. If the error
        says the way cannot work here (no ``O_TMPFILE``: FUSE, an old
        kernel; no ``/proc``; a link refused: see :data:`_NOT_HERE`), this
        directory creates files by name from then on, and says so once in
        the log; any other error (no descriptor or no space left at that
        moment) costs this file's way only.
        """
        if not (unnamed and self._unnamed):
            return os.open(path, OPEN_FLAGS, FILE_MODE)
        try:
            nameless = os.open(self.tmp, _UNNAMED_FLAGS, FILE_MODE)
        except OSError as exc:
            self._unnamed_failed(exc, "open")
            return os.open(path, OPEN_FLAGS, FILE_MODE)
        try:
            # An absolute source ignores src_dir_fd; giving one makes os.link
            # call linkat(), which follows the /proc link to the file
            # (link() would link the /proc link itself).
            os.link(
                f"/proc/self/fd/{nameless}",
                path,
                src_dir_fd=self.dir_fds[self.tmp],
                follow_symlinks=True,
            )
        except OSError as exc:
            _close_quiet(nameless)  # still unnamed, this frees it
            self._unnamed_failed(exc, "link")
            return os.open(path, OPEN_FLAGS, FILE_MODE)
        try:
            return _open_linked(path, nameless)
        finally:
            # Named (or removed) by now: a close that reports an error loses
            # nothing, and must not lose the file the caller is given.
            _close_quiet(nameless)

    def _unnamed_failed(self, error: OSError, step: str) -> None:
        """Stop making files unnamed here if ``error`` (of ``step``) says
        that cannot work on this filesystem; logged once."""
        if error.errno not in _NOT_HERE[step]:
            return
        with self._unnamed_lock:
            if not self._unnamed:
                return
            self._unnamed = False
        log.warning(
            "new files are created by name from now on: this filesystem cannot make "
            "them unnamed, so the threads of a group commit take turns creating them",
            root=self.root_s,
            step=step,
            error=str(error),
        )

    def write_tmp(
        self,
        name: str,
        kind: str,
        data: bytes,
        prefix: bytes = b"",
        *,
        sync: bool = True,
        reuse: str | None = None,
        unnamed: bool = False,
    ) -> str:
        """Write ``prefix + data`` to a new file under ``tmp/``, or over the
        file ``reuse`` (a file of the pool, ready to be written: see
        :mod:`spoold.store.pool`), cut to the new length; its path.
        ``unnamed``: a new file is made unnamed first (see :meth:`_create_tmp`)."""
        fd = -1 if reuse is None else _open_reused(reuse)
        if reuse is None or fd < 0:
            # Unique without randomness: the name is this process's, the count too.
            path = f"{self.tmp}/{self.pid}.{name}.{kind}.{next(self._tmp_count)}"
            fd = self._create_tmp(path, unnamed)
            reuse = None
        else:
            path = reuse
        try:
            # One writev for the trace header and the body (more only after
            # a short write: then what is left, as views, nothing copied).
            parts: list[bytes | memoryview] = [prefix, data] if prefix else [data]
            size = left = len(prefix) + len(data)
            while left:
                done = os.writev(fd, parts)
                left -= done
                if left:
                    parts = _after(parts, done)
            if reuse is not None:
                os.ftruncate(fd, size)  # nothing of the old content past the new end
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)
        return path


def still_named(path: str, fd: int, dir_fd: int | None = None) -> bool:
    """Whether ``path`` still names the file open on ``fd``, read through
    it: a file deleted meanwhile may have been written again for another
    entry (see :mod:`spoold.store.pool`), whose bytes are then not the
    entry's. One ``stat`` and one ``fstat``."""
    try:
        named = os.stat(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return named.st_ino == st.st_ino and named.st_dev == st.st_dev


def _open_linked(path: str, nameless: int) -> int:
    """A descriptor open for writing on ``path``, just linked to the
    unnamed file open on ``nameless``, once it is sure to be that file:
    anything put in its place meanwhile (by whoever can write ``tmp/``) is
    neither written nor removed, and the job fails. Opened without blocking,
    so a FIFO put there cannot hold the commit (on a regular file,
    ``O_NONBLOCK`` changes nothing)."""
    made = os.fstat(nameless)
    try:
        fd = os.open(path, _NAMED_FLAGS)
    except BaseException:
        _unlink_if_same(path, made)
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        _unlink_if_same(path, made)
        raise
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (made.st_dev, made.st_ino):
        os.close(fd)
        _unlink_if_same(path, made)  # not ours now: left as it is
        raise StoreError(
            f"{path} was replaced between its link and its open: nothing written to it"
        )
    return fd


def _unlink_if_same(path: str, made: os.stat_result) -> None:
    """Remove ``path`` if it still names the file ``made`` describes (ours)."""
    with contextlib.suppress(OSError):
        st = os.stat(path, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == (made.st_dev, made.st_ino):
            os.unlink(path)


def _open_reused(path: str) -> int:
    """A descriptor open for writing on the claimed file ``path``, or -1
    (the file removed) when it cannot be written or is not the writer's
    alone: another name for it (a hard link made since its delete) or
    another owner. The caller then creates a new file: the pool never
    fails a commit."""
    try:
        fd = os.open(path, _REUSE_FLAGS)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            st = os.fstat(fd)
            mine = st.st_nlink == 1 and st.st_uid == os.geteuid()
        except OSError:
            mine = False
        if mine:
            return fd
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)
    return -1


def _after(parts: list[bytes | memoryview], done: int) -> list[bytes | memoryview]:
    """What of ``parts`` is left once their first ``done`` bytes are written."""
    rest: list[bytes | memoryview] = []
    for part in parts:
        if done >= len(part):
            done -= len(part)
            continue
        rest.append(memoryview(part)[done:] if done else part)
        done = 0
    return rest


def _close_quiet(fd: int) -> None:
    with contextlib.suppress(OSError):  # the descriptor is gone whatever it says
        os.close(fd)


def unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def read_pid(path: str) -> int | None:
    """The pid a lock or writer file holds (None: unreadable, or none)."""
    try:
        with open(path, "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return ascii_decimal(text)


def _missing_dirs(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    missing: list[str] = []
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing[::-1]


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Sync directory ``path``: the names made, renamed or removed in it
    are durable once this returns."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, tmp: Path, data: bytes, *, mode: int, mtime_ns: int = 0) -> None:
    """Put ``data`` at ``path`` durably, whole or not at all: written to
    ``tmp`` (made anew: one left by a write that failed is removed first),
    fsynced, renamed over ``path``, its directory fsynced. ``mtime_ns``: the
    file's modification time, when given. Raises :class:`OSError`, with
    ``tmp`` removed."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if mtime_ns:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_directory(path.parent)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_parents(dirs: Iterable[str]) -> None:
    """Sync the parent of each of ``dirs`` (each parent once)."""
    for parent in dict.fromkeys(os.path.dirname(os.path.abspath(d)) for d in dirs):
        fsync_directory(parent)


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
