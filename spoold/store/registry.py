"""The registry: ``.registry/NAME``, one per live entry, so names stay unique
across every process that writes to a store.

A name is reserved by creating its entry exclusively. An entry is a hard
link to its writer's ``.writer.PID.N`` file (made with ``link()``, which
fails when the name exists just as ``O_CREAT|O_EXCL`` does): its content is
the writer's pid, as a file of its own would hold, but creating and
removing it allocates and frees no inode and no data block. Where links
are not possible (a filesystem without them, a writer file full of links)
it falls back to a new writer file, or to an entry that is a file of its
own. What an entry's pid is for: recovery and the consistency check tell a
writer still at work from a dead one by it.

Every method blocks: callers run them in a worker thread.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections.abc import Container

from spoold.errors import StoreError
from spoold.ids import is_valid_id, new_id
from spoold.store.directory import FILE_MODE, OPEN_FLAGS, read_pid, unlink_quiet

__all__ = ["Registry", "pid_alive"]

_WRITER_PREFIX = ".writer."  # .registry/.writer.PID.N (never an id: ids have no dot)
# link() errors that mean "no hard links here": entries are then files.
_NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV})


class Registry:
    """The ``.registry`` directory at ``path``, as the process ``pid`` writes it."""

    def __init__(self, path: str, pid: int) -> None:
        self.path = path
        self._pid = pid
        self._writer_file: str | None = None  # what registry entries link to
        self._writer_files: list[str] = []  # every one this store made
        self._links = True  # False once link() is found not to work here
        self._lock = threading.Lock()  # over the three above

    def reserve(self) -> str:
        """A new name, its entry created (so no other writer can take it)."""
        for _ in range(100):
            name = new_id()
            try:
                self._make_entry(f"{self.path}/{name}")
            except FileExistsError:
                continue
            return name
        raise StoreError(f"could not reserve a unique id in {self.path}")

    def _make_entry(self, path: str) -> None:
        """Create the registry entry ``path`` (FileExistsError if taken): a
        link to this writer's pid file, or a file of its own."""
        with self._lock:  # two threads may write one batch (spoold.store.sharing)
            for _ in range(4):
                if not self._links:
                    break
                source = self._writer_file or self._new_writer_file()
                try:
                    os.link(source, path)
                except FileNotFoundError:
                    if not os.path.isdir(self.path):
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
        self._create_pid_file(path)  # no link: an entry of its own (not under the lock)

    def _new_writer_file(self) -> str:
        for n in itertools.count(len(self._writer_files)):
            path = f"{self.path}/{_WRITER_PREFIX}{self._pid}.{n}"
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
        fd = os.open(path, OPEN_FLAGS, FILE_MODE)
        try:
            os.write(fd, f"{self._pid}\n".encode())
        except BaseException:
            os.close(fd)
            unlink_quiet(path)
            raise
        os.close(fd)

    def listing(self, skip: Container[str] = ()) -> tuple[list[str], list[str]]:
        """One listing of ``.registry``: the entries' names (ids), and the
        writers' pid files; names in ``skip`` (entries the caller knows of,
        e.g. those of records) are left out before any other test."""
        entries: list[str] = []
        writers: list[str] = []
        for name in os.listdir(self.path):
            if name in skip:
                continue
            if name.startswith(_WRITER_PREFIX):
                writers.append(name)
            elif is_valid_id(name) and not os.path.isdir(f"{self.path}/{name}"):
                entries.append(name)
        return entries, writers

    def writer_gone(self, registry_name: str) -> bool:
        """Whether the process that wrote ``registry_name`` (an entry, or a
        writer file) is gone."""
        pid = read_pid(f"{self.path}/{registry_name}")
        return pid is None or (pid != self._pid and not pid_alive(pid))

    def close_sync(self) -> None:
        """Remove the writer files this store made. Entries still linked to
        them keep their content: only a name goes."""
        for path in self._writer_files:
            unlink_quiet(path)
        self._writer_files.clear()
        self._writer_file = None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
