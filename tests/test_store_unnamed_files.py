"""New files under ``tmp/`` that two threads of a group commit create at
once (``spoold.store.sharing``) are made unnamed (``O_TMPFILE``), named,
then opened by their name before anything is written
(``StoreDirectory._create_tmp``): the filesystem allocates their inodes
without holding the lock of ``tmp/``. Where that cannot be done, files are
created by name, and nothing of the attempt is left. A thread creating
files alone creates them by name."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

import spoold.store.commit
import spoold.store.directory
from spoold.errors import StoreError
from spoold.store import NewEntry, Store
from tests.support import enqueue_each_at_once, records_in, unnamed_files_work

QUEUES = ["active", "frozen"]
AT_ONCE = 16  # enqueue calls made at once: a batch two threads write


@pytest.fixture(autouse=True)
def large_batches_always_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about two threads writing one batch: they share it
    whatever the filesystem (the store's measure of how slow files are to
    create is tested on its own in test_group_commit_two_writers)."""
    monkeypatch.setattr(spoold.store.commit, "SLOW_ENTRY_SECONDS", 0.0)


def entry(n: int) -> NewEntry:
    return NewEntry("active", f"body {n}\r\n".encode(), lambda name, names: f"record {n}".encode())


async def enqueue_at_once(store: Store) -> list[str]:
    """AT_ONCE calls of one entry each, made at once; the names (the first
    error, if one failed, is raised)."""
    names: list[str] = []
    for result in await enqueue_each(store):
        if isinstance(result, BaseException):
            raise result
        names += result
    return names


def one_failed(root: Path, results: list[list[str] | BaseException]) -> tuple[StoreError, set[str]]:
    """Of ``AT_ONCE`` adds, exactly one failed, with a StoreError, and every
    other is committed: that error, and the names committed."""
    errors = [r for r in results if isinstance(r, BaseException)]
    names = {r[0] for r in results if isinstance(r, list)}
    assert len(errors) == 1
    assert isinstance(errors[0], StoreError)
    assert len(names) == AT_ONCE - 1
    assert records_in(root, "active") == names
    return errors[0], names


def open_under(directory: Path) -> list[str]:
    """What this process holds open below ``directory`` (the lock aside)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if (
            target.startswith(f"{directory}/")
            and not target.endswith("/lock")
            and not os.path.isdir(target)
        ):
            out.append(target)
    return out


class Links:
    """``os`` as the store's file steps see it: the real one, with each
    ``link`` from ``/proc/self/fd`` noted (what the descriptor held then)
    and, when ``refuse`` is set, refused with it."""

    def __init__(
        self, refuse: OSError | None = None, then: Callable[[str], None] | None = None
    ) -> None:
        self.refuse = refuse
        self.then = then  # called with the new name after a link made
        self.seen: list[tuple[int, int]] = []  # (links, size) of the file then
        self.linked: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def link(self, src: str, dst: str, **kwargs: Any) -> None:
        if src.startswith("/proc/self/fd/"):
            st = os.fstat(int(src.rsplit("/", 1)[1]))
            self.seen.append((st.st_nlink, st.st_size))
            if self.refuse is not None:
                raise self.refuse
        os.link(src, dst, **kwargs)
        if src.startswith("/proc/self/fd/"):
            self.linked.append(dst)
            if self.then is not None:
                self.then(dst)


async def test_files_created_at_once_are_named_before_anything_is_written_to_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not unnamed_files_work(tmp_path):
        pytest.skip(f"no O_TMPFILE in {tmp_path}")
    links = Links()
    monkeypatch.setattr(spoold.store.directory, "os", links)
    root = tmp_path / "store"
    store, _ = await Store.open(root, QUEUES, sync="syncfs")
    async with store:
        names = await enqueue_at_once(store)
        assert records_in(root, "active") == set(names)
        assert sorted(os.listdir(root / "data")) == sorted(names)
        assert os.listdir(root / "tmp") == []
        assert await store.check(max_age=0) == []
    # A body and a record each, every one empty and nameless when named.
    assert links.seen == [(0, 0)] * (2 * AT_ONCE)


@pytest.mark.parametrize("sync", ["fsync", "syncfs"])
async def test_a_thread_creating_files_alone_creates_them_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: str
) -> None:
    links = Links()
    monkeypatch.setattr(spoold.store.directory, "os", links)
    root = tmp_path / "store"
    store, _ = await Store.open(root, QUEUES, sync=sync)
    async with store:
        names = await store.enqueue([entry(n) for n in range(AT_ONCE)])  # one call: one thread
        assert records_in(root, "active") == set(names)
    assert links.seen == []


@pytest.mark.parametrize(
    "refusal",
    [errno.EXDEV, errno.ENOENT, errno.EPERM],
    ids=["EXDEV", "ENOENT", "EPERM"],
)
async def test_where_a_file_cannot_be_named_so_files_are_created_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: int
) -> None:
    if not unnamed_files_work(tmp_path):
        pytest.skip(f"no O_TMPFILE in {tmp_path}")
    links = Links(refuse=OSError(refusal, os.strerror(refusal)))
    monkeypatch.setattr(spoold.store.directory, "os", links)
    root = tmp_path / "store"
    store, _ = await Store.open(root, QUEUES, sync="syncfs")
    async with store:
        first = await enqueue_at_once(store)
        second = await enqueue_at_once(store)
        assert records_in(root, "active") == {*first, *second}
        assert os.listdir(root / "tmp") == []
        assert open_under(root) == []  # the unnamed file was let go
        assert await store.check(max_age=0) == []
    # Tried once (or once in each thread, both at their first file): then by name only.
    assert 1 <= len(links.seen) <= 2


async def test_where_there_is_no_o_tmpfile_files_are_created_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An old kernel reads O_TMPFILE as O_DIRECTORY: a directory opened for
    # writing, EISDIR.
    monkeypatch.setattr(
        spoold.store.directory, "_UNNAMED_FLAGS", os.O_WRONLY | os.O_DIRECTORY | os.O_CLOEXEC
    )
    root = tmp_path / "store"
    store, _ = await Store.open(root, QUEUES, sync="syncfs")
    async with store:
        names = await enqueue_at_once(store)
        assert records_in(root, "active") == set(names)
        assert os.listdir(root / "tmp") == []
        assert open_under(root) == []
        assert await store.check(max_age=0) == []


async def enqueue_each(store: Store) -> list[list[str] | BaseException]:
    """AT_ONCE calls of one entry each, made at once; each one's names or error."""
    return await enqueue_each_at_once(store, [entry(n) for n in range(AT_ONCE)])


@pytest.mark.parametrize("put", ["hard link", "fifo"])
async def test_a_name_replaced_after_its_link_is_neither_written_nor_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, put: str
) -> None:
    # Whoever can write tmp/ puts something else under the name between the
    # link and the open by name: another file (it would be written over),
    # or a FIFO (the open would wait for a reader for ever).
    if not unnamed_files_work(tmp_path):
        pytest.skip(f"no O_TMPFILE in {tmp_path}")
    other = tmp_path / "other"
    other.write_bytes(b"not the store's")
    replaced: list[str] = []

    def replace(name: str) -> None:
        if replaced:
            return
        replaced.append(name)
        os.unlink(name)
        if put == "fifo":
            os.mkfifo(name, 0o600)
        else:
            os.link(other, name)

    links = Links(then=replace)
    monkeypatch.setattr(spoold.store.directory, "os", links)
    root = tmp_path / "store"
    store, _ = await Store.open(root, QUEUES, sync="syncfs")
    async with store:
        error, names = one_failed(root, await enqueue_each(store))
        assert "was replaced" in str(error) or put == "fifo"
        assert sorted(os.listdir(root / "data")) == sorted(names)
        # What was put there is left as it was, and nothing else of the job stays.
        (name,) = replaced
        assert os.listdir(root / "tmp") == [os.path.basename(name)]
        if put == "fifo":
            assert os.path.exists(name) and not os.path.isfile(name)
        else:
            assert os.path.samefile(name, other)
        assert other.read_bytes() == b"not the store's"
        assert open_under(root) == []


class Refusing(Links):
    """:class:`Links`, whose first ``O_TMPFILE`` open (``at="open"``),
    ``link`` (``at="link"``) or close of an unnamed file once linked
    (``at="close"``) fails with ``error``."""

    def __init__(self, at: str, error: int) -> None:
        super().__init__()
        self.at, self.error, self.refused = at, error, 0
        self.nameless: set[int] = set()

    def _refuse(self, at: str) -> bool:
        if at == self.at and not self.refused:
            self.refused += 1
            return True
        return False

    def open(self, path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        tmpfile = flags & os.O_TMPFILE == os.O_TMPFILE
        if tmpfile and self._refuse("open"):
            raise OSError(self.error, os.strerror(self.error))
        return os.open(path, flags, *args, **kwargs)

    def link(self, src: str, dst: str, **kwargs: Any) -> None:
        if src.startswith("/proc/self/fd/") and self._refuse("link"):
            self.seen.append((0, 0))
            raise OSError(self.error, os.strerror(self.error))
        super().link(src, dst, **kwargs)
        if src.startswith("/proc/self/fd/"):
            self.nameless.add(int(src.rsplit("/", 1)[1]))

    def close(self, fd: int) -> None:
        os.close(fd)
        if fd in self.nameless:
            self.nameless.discard(fd)
            if self._refuse("close"):
                raise OSError(self.error, os.strerror(self.error))


@pytest.mark.parametrize(
    ("at", "error"),
    [("open", errno.EMFILE), ("open", errno.ENOSPC), ("link", errno.EMFILE)],
    ids=["open-EMFILE", "open-ENOSPC", "link-EMFILE"],
)
async def test_an_error_of_the_moment_costs_that_file_its_way_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str, error: int
) -> None:
    if not unnamed_files_work(tmp_path):
        pytest.skip(f"no O_TMPFILE in {tmp_path}")
    links = Refusing(at, error)
    monkeypatch.setattr(spoold.store.directory, "os", links)
    root = tmp_path / "store"
    store, _ = await Store.open(root, QUEUES, sync="syncfs")
    with structlog.testing.capture_logs() as logged:
        async with store:
            first = await enqueue_at_once(store)
            second = await enqueue_at_once(store)
            assert records_in(root, "active") == {*first, *second}
            assert os.listdir(root / "tmp") == []
            assert open_under(root) == []
    assert links.refused == 1
    # The second batch's files were still made unnamed, and nothing was logged.
    assert len(links.seen) >= 2 * AT_ONCE + 1
    assert [e for e in logged if e["log_level"] == "warning"] == []


async def test_files_made_by_name_from_then_on_is_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not unnamed_files_work(tmp_path):
        pytest.skip(f"no O_TMPFILE in {tmp_path}")
    links = Links(refuse=OSError(errno.EXDEV, os.strerror(errno.EXDEV)))
    monkeypatch.setattr(spoold.store.directory, "os", links)
    root = tmp_path / "store"
    store, _ = await Store.open(root, QUEUES, sync="syncfs")
    with structlog.testing.capture_logs() as logged:
        async with store:
            await enqueue_at_once(store)
            await enqueue_at_once(store)
    warnings = [e for e in logged if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["root"] == str(root)
    assert warnings[0]["step"] == "link"
    assert "Invalid cross-device link" in warnings[0]["error"]


async def test_a_close_failing_after_the_link_loses_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not unnamed_files_work(tmp_path):
        pytest.skip(f"no O_TMPFILE in {tmp_path}")
    links = Refusing("close", errno.EIO)
    monkeypatch.setattr(spoold.store.directory, "os", links)
    root = tmp_path / "store"
    store, _ = await Store.open(root, QUEUES, sync="syncfs")
    async with store:
        results = await enqueue_each(store)
        names = {r[0] for r in results if isinstance(r, list)}
        assert links.refused == 1
        # The file was named and opened: its job went on with it.
        assert len(names) == AT_ONCE
        assert records_in(root, "active") == names
        assert sorted(os.listdir(root / "data")) == sorted(names)
        assert os.listdir(root / "tmp") == []
        assert open_under(root) == []
        assert await store.check(max_age=0) == []


async def test_an_open_failing_after_the_link_fails_its_job_and_leaves_no_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not unnamed_files_work(tmp_path):
        pytest.skip(f"no O_TMPFILE in {tmp_path}")
    refused: list[str] = []

    class RefusedOpen(Links):
        def open(self, path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if path in self.linked and not refused:
                refused.append(path)
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
            return os.open(path, flags, *args, **kwargs)

    links = RefusedOpen()
    monkeypatch.setattr(spoold.store.directory, "os", links)
    root = tmp_path / "store"
    store, _ = await Store.open(root, QUEUES, sync="syncfs")
    async with store:
        error, names = one_failed(root, await enqueue_each(store))
        assert refused
        assert error.errno == errno.EMFILE
        assert sorted(os.listdir(root / "data")) == sorted(names)
        assert os.listdir(root / "tmp") == []
        assert open_under(root) == []
        assert await store.check(max_age=0) == []
