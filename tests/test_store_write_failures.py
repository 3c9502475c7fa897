"""A write or an fsync that fails inside ``StoreDirectory.write_tmp``, for the body
or for the record of an entry: ``enqueue`` raises a
:class:`~spoold.errors.StoreError` carrying the errno (``disk_full`` for
ENOSPC), leaves nothing in ``tmp/``, ``data/``, the queue or
``.registry`` (for the entries of the batch written before the failure
too), keeps no descriptor open, and the store takes the next entry.

The store has no step hook between the write and the fsync of a file, so
the first tests give the store's file steps (``spoold.store.directory``) an
``os`` of their own: the real one, except that ``write`` (after writing part
of the data, as a full disk does) or ``fsync`` fails on the chosen temp
file. The last tests use a real small filesystem instead (a 256 KiB tmpfs,
or else an ext4 image on a loop device): the kernel itself answers ENOSPC.
Mounting needs root; they skip where it is not allowed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest

import spoold.store.directory
from spoold.errors import StoreError
from spoold.store import NewEntry, Store
from tests.support import spool_files

QUEUES = ["active", "frozen"]


def entry(body: bytes, record: bytes = b'{"record": true}\n') -> NewEntry:
    return NewEntry("active", body, lambda name, names: record + name.encode())


def leftovers(root: Path) -> list[str]:
    """Files of entries: anything in tmp/, data/, a queue or .registry."""
    return sorted(set(spool_files(root)))


def open_files_under(directory: Path) -> list[str]:
    """Regular files below ``directory`` this process holds open, but the
    owner's lock."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if (
                target.startswith(f"{directory}/")
                and target != f"{directory}/lock"
                and not os.path.isdir(target)
            ):
                out.append(target)
    return out


class FailingOs:
    """The ``os`` module as the store sees it during a test: the real one,
    except that ``call`` (``write``, which covers ``writev``, or ``fsync``) fails with ``error`` on
    the ``nth`` temp file of ``kind`` (``body`` or ``record``) under
    ``tmp``. A failing write first writes part of what it was given, as a
    filling disk does. ``armed = False`` makes it the real module again."""

    def __init__(
        self, tmp: Path, call: str, kind: str, error: OSError, nth: int, real: ModuleType = os
    ) -> None:
        self._real = real
        self._tmp = f"{tmp}/"
        self._call = call
        self._kind = f".{kind}."
        self._error = error
        self._nth = nth
        self._seen: list[str] = []
        self.armed = True
        self.failed = 0
        self.partial_writes = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def _is_target(self, fd: int) -> bool:
        if not self.armed:
            return False
        path = self._real.readlink(f"/proc/self/fd/{fd}")
        if not (path.startswith(self._tmp) and self._kind in path):
            return False
        if path not in self._seen:
            self._seen.append(path)
        return self._seen.index(path) + 1 == self._nth

    def write(self, fd: int, data: Sequence[int]) -> int:
        if self._call == "write" and self._is_target(fd):
            view = memoryview(bytes(data))
            if len(view) > 1 and self.partial_writes == 0:
                self.partial_writes += 1
                return self._real.write(fd, view[: len(view) // 2])
            self.failed += 1
            raise self._error
        return self._real.write(fd, data)

    def writev(self, fd: int, buffers: Sequence[bytes | memoryview]) -> int:
        """As :meth:`write`: the store writes a body and its trace header
        in one ``writev`` (and, after a short write, writes the rest)."""
        if self._call == "write" and self._is_target(fd):
            return self.write(fd, b"".join(bytes(b) for b in buffers))
        return self._real.writev(fd, buffers)

    def fsync(self, fd: int) -> None:
        if self._call == "fsync" and self._is_target(fd):
            self.failed += 1
            raise self._error
        self._real.fsync(fd)


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("kind", ["body", "record"])
@pytest.mark.parametrize("call", ["write", "fsync"])
@pytest.mark.parametrize("nth", [1, 2], ids=["first-entry", "second-entry"])
async def test_a_failed_write_or_fsync_leaves_nothing_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, kind: str, code: int, nth: int
) -> None:
    root = tmp_path / "store"
    store, _ = await Store.open(root, QUEUES)
    async with store:
        failing = FailingOs(root / "tmp", call, kind, _error(code), nth)
        monkeypatch.setattr(spoold.store.directory, "os", failing)
        batch = [entry(b"first body\r\n" * 100), entry(b"second body\r\n" * 100)]

        with pytest.raises(StoreError) as raised:
            await store.enqueue(batch)

        assert failing.failed == 1
        if call == "write":
            assert failing.partial_writes == 1  # the failure came mid-file
        error = raised.value
        assert isinstance(error, OSError)
        assert error.errno == code
        assert error.disk_full is (code == errno.ENOSPC)
        assert Store.is_disk_full(error) is (code == errno.ENOSPC)
        assert str(root) in str(error)
        assert leftovers(root) == []
        assert open_files_under(root) == []

        failing.armed = False
        (name,) = await store.enqueue([entry(b"after\r\n")])
        assert leftovers(root) == [f".registry/{name}", f"active/{name}", f"data/{name}"]
        assert await store.check(max_age=0) == []


class ShortWritesOs:
    """The real ``os``, but a ``writev`` writes at most ``most`` bytes (as a
    signal or a filling disk may cut one short)."""

    def __init__(self, most: int) -> None:
        self._most = most
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def writev(self, fd: int, buffers: Sequence[bytes | memoryview]) -> int:
        self.calls += 1
        return os.write(fd, b"".join(bytes(b) for b in buffers)[: self._most])


async def test_short_writes_are_resumed_where_they_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Body and trace header go in one ``writev``; one cut short is resumed
    with the rest, across the boundary of the two, until all is written."""
    store, _ = await Store.open(tmp_path, QUEUES)
    async with store:
        short = ShortWritesOs(7)
        monkeypatch.setattr(spoold.store.directory, "os", short)
        body = b"".join(b"line %d\r\n" % i for i in range(20))
        (name,) = await store.enqueue(
            [NewEntry("active", body, lambda n, ns: b"record", lambda n: b"Received: x\r\n")]
        )
        monkeypatch.undo()
        assert (tmp_path / "data" / name).read_bytes() == b"Received: x\r\n" + body
        assert (tmp_path / "active" / name).read_bytes() == b"record"
        assert short.calls > (len(body) + 13) // 7


# ------------------------------------------------- a real small filesystem


def _run(*command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(command, capture_output=True, timeout=60, check=False)


@contextlib.contextmanager
def small_filesystem(where: Path, size_kib: int = 256) -> Iterator[Path]:
    """A filesystem of ``size_kib`` KiB mounted at ``where`` (tmpfs, or an
    ext4 image on a loop device); skips the test if neither can be had."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    where.mkdir()
    tried = _run("mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(where))
    if tried.returncode != 0:
        image = where.parent / "small.img"
        with image.open("wb") as f:
            f.truncate(max(size_kib, 1024) * 1024)  # ext4 needs a little room of its own
        made = _run("mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(image))
        tried = (
            _run("mount", "-o", "loop", str(image), str(where)) if made.returncode == 0 else made
        )
        if tried.returncode != 0:
            pytest.skip(
                "cannot mount a small filesystem here (tmpfs nor loop device): "
                + tried.stderr.decode(errors="replace").strip()
            )
    try:
        yield where
    finally:
        if _run("umount", str(where)).returncode != 0:
            _run("umount", "-l", str(where))


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def test_a_body_larger_than_the_disk_gets_enospc_and_leaves_nothing(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "mnt") as mnt:
        root = mnt / "store"
        store, _ = await Store.open(root, QUEUES)
        async with store:
            too_big = b"x" * (_free(mnt) + 64 * 1024)
            with pytest.raises(StoreError) as raised:
                await store.enqueue([entry(b"fits\r\n"), entry(too_big)])
            assert raised.value.errno == errno.ENOSPC
            assert raised.value.disk_full
            assert leftovers(root) == []
            assert open_files_under(root) == []

            (name,) = await store.enqueue([entry(b"small enough\r\n")])
            assert leftovers(root) == [f".registry/{name}", f"active/{name}", f"data/{name}"]
            assert await store.check(max_age=0) == []


async def test_a_record_that_no_longer_fits_gets_enospc_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """The body takes every block left but the registry entry's: the
    record's write is the one that fails."""
    with small_filesystem(tmp_path / "mnt") as mnt:
        root = mnt / "store"
        store, _ = await Store.open(root, QUEUES)
        async with store:
            block = os.statvfs(mnt).f_frsize
            body = b"y" * (_free(mnt) - block)  # one block stays for the registry entry
            with pytest.raises(StoreError) as raised:
                await store.enqueue([entry(body)])
            assert raised.value.errno == errno.ENOSPC
            assert raised.value.disk_full
            assert leftovers(root) == []
            assert open_files_under(root) == []
            assert (await store.enqueue([entry(b"small\r\n")])) != []
