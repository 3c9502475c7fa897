"""New files under ``tmp/`` are made unnamed (``O_TMPFILE``), named, then
opened by their name before anything is written
(``StoreDirectory._create_tmp``): the filesystem allocates their inodes
without holding the lock of ``tmp/``. Where that cannot be done, files are
created by name, and nothing of the attempt is left."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

import spoold.store.directory
from spoold.store import NewEntry, Store
from tests.support import records_in

QUEUES = ["active", "frozen"]


def entry(n: int) -> NewEntry:
    return NewEntry("active", f"body {n}\r\n".encode(), lambda name, names: f"record {n}".encode())


def unnamed_files_work(directory: Path) -> bool:
    try:
        os.close(os.open(directory, os.O_WRONLY | os.O_TMPFILE, 0o600))
    except OSError:
        return False
    return True


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

    def __init__(self, refuse: OSError | None = None) -> None:
        self.refuse = refuse
        self.seen: list[tuple[int, int]] = []  # (links, size) of the file then

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def link(self, src: str, dst: str, **kwargs: Any) -> None:
        if src.startswith("/proc/self/fd/"):
            st = os.fstat(int(src.rsplit("/", 1)[1]))
            self.seen.append((st.st_nlink, st.st_size))
            if self.refuse is not None:
                raise self.refuse
        os.link(src, dst, **kwargs)


@pytest.mark.parametrize("sync", ["fsync", "syncfs"])
async def test_new_files_are_named_before_anything_is_written_to_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: str
) -> None:
    if not unnamed_files_work(tmp_path):
        pytest.skip(f"no O_TMPFILE in {tmp_path}")
    links = Links()
    monkeypatch.setattr(spoold.store.directory, "os", links)
    store, _ = await Store.open(tmp_path / "store", QUEUES, sync=sync)
    async with store:
        names = await store.enqueue([entry(1), entry(2)])
        assert records_in(tmp_path / "store", "active") == set(names)
        for n, name in enumerate(names, 1):
            assert (tmp_path / "store" / "data" / name).read_bytes() == f"body {n}\r\n".encode()
        assert await store.check(max_age=0) == []
    # A body and a record each, every one empty and nameless when named.
    assert links.seen == [(0, 0)] * 4


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
        first = await store.enqueue([entry(1)])
        second = await store.enqueue([entry(2), entry(3)])
        assert records_in(root, "active") == {*first, *second}
        assert os.listdir(root / "tmp") == []
        assert open_under(root) == []  # the unnamed file was let go
        assert await store.check(max_age=0) == []
    assert len(links.seen) == 1  # tried once: then by name only


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
        names = await store.enqueue([entry(1), entry(2)])
        assert records_in(root, "active") == set(names)
        assert os.listdir(root / "tmp") == []
        assert open_under(root) == []
        assert await store.check(max_age=0) == []
