"""Registry entries: hard links to their writer's pid file.

Each ``.registry/ID`` must keep reading as the pid of the process that
wrote it (recovery and ``check`` depend on that), whatever way it was made.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

from spoold.store import NewEntry, Store

QUEUES = ["active", "frozen"]
DEAD_PID = 999_999_999  # no such process


def entry() -> NewEntry:
    return NewEntry("active", b"body\r\n", lambda name, names: f"record {name}".encode())


def writer_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / ".registry").iterdir() if p.name.startswith(".writer."))


@pytest.mark.parametrize("sync", ["fsync", "syncfs"])
async def test_entries_are_links_to_one_file_holding_the_pid(tmp_path: Path, sync: str) -> None:
    store, _ = await Store.open(tmp_path, QUEUES, sync=sync)  # type: ignore[arg-type]
    async with store:
        names = await store.enqueue([entry(), entry(), entry()])
        (writer,) = writer_files(tmp_path)
        assert writer == f".writer.{os.getpid()}.0"
        pid_file = tmp_path / ".registry" / writer
        for name in names:
            path = tmp_path / ".registry" / name
            assert path.read_bytes() == f"{os.getpid()}\n".encode()
            assert path.stat().st_ino == pid_file.stat().st_ino
        assert pid_file.stat().st_nlink == 4

        await store.delete("active", names[0])
        assert not (tmp_path / ".registry" / names[0]).exists()
        assert pid_file.stat().st_nlink == 3
    # Closed: the pid file's name goes; the entries still say whose they are.
    assert writer_files(tmp_path) == []
    for name in names[1:]:
        assert (tmp_path / ".registry" / name).read_bytes() == f"{os.getpid()}\n".encode()


async def test_a_pid_file_removed_under_the_writer_is_made_again(tmp_path: Path) -> None:
    store, _ = await Store.open(tmp_path, QUEUES)
    async with store:
        (first,) = await store.enqueue([entry()])
        (tmp_path / ".registry" / f".writer.{os.getpid()}.0").unlink()
        (second,) = await store.enqueue([entry()])
        assert writer_files(tmp_path) == [f".writer.{os.getpid()}.1"]
        for name in (first, second):
            assert (tmp_path / ".registry" / name).read_text() == f"{os.getpid()}\n"


async def test_two_stores_of_one_process_use_two_pid_files(tmp_path: Path) -> None:
    owner, _ = await Store.open(tmp_path, QUEUES)
    writer, _ = await Store.open(tmp_path, QUEUES, owner=False)
    async with owner, writer:
        await owner.enqueue([entry()])
        await writer.enqueue([entry()])
        assert writer_files(tmp_path) == [f".writer.{os.getpid()}.{n}" for n in (0, 1)]
        await writer.close()
        assert len(writer_files(tmp_path)) == 1


@pytest.mark.parametrize(
    ("code", "files_after"),
    [(errno.EMLINK, 2), (errno.EPERM, 1), (errno.EOPNOTSUPP, 1)],
    ids=["too-many-links", "links-not-permitted", "links-not-supported"],
)
async def test_when_link_fails_the_entry_is_still_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, files_after: int
) -> None:
    """A full pid file (ext4 allows 65,000 links) gets a successor; a
    filesystem without hard links gets entries that are files of their own."""
    real_link = os.link
    failures = [code]

    def link(src: str, dst: str, **kwargs: Any) -> None:
        if failures and "/.registry/" in dst:  # not the naming of a new tmp/ file
            raise OSError(failures.pop(), os.strerror(code), src)
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", link)
    store, _ = await Store.open(tmp_path, QUEUES)
    async with store:
        (name,) = await store.enqueue([entry()])
        (other,) = await store.enqueue([entry()])
        assert len(writer_files(tmp_path)) == files_after
        for n in (name, other):
            assert (tmp_path / ".registry" / n).read_text() == f"{os.getpid()}\n"
        if code != errno.EMLINK:  # no more links tried: both are files of their own
            assert (tmp_path / ".registry" / other).stat().st_nlink == 1


async def test_recovery_removes_what_a_dead_writer_left(tmp_path: Path) -> None:
    store, _ = await Store.open(tmp_path, QUEUES)
    await store.close()
    registry = tmp_path / ".registry"
    dead = registry / f".writer.{DEAD_PID}.0"
    dead.write_text(f"{DEAD_PID}\n")
    os.link(dead, registry / "NeverCommitted")  # reserved, then the writer died
    alive = registry / f".writer.{os.getppid()}.0"  # a live writer (our parent)
    alive.write_text(f"{os.getppid()}\n")
    os.link(alive, registry / "InFlight")

    store, report = await Store.open(tmp_path, QUEUES)
    async with store:
        assert report.removed_unacknowledged == ["NeverCommitted"]
        assert sorted(p.name for p in registry.iterdir()) == [
            f".writer.{os.getppid()}.0",
            "InFlight",
        ]


async def test_check_ages_an_entry_from_its_link_not_from_its_pid_file(tmp_path: Path) -> None:
    """The pid file may be hours old; an entry just linked to it is not."""
    store, _ = await Store.open(tmp_path, QUEUES)
    async with store:
        await store.enqueue([entry()])
        registry = tmp_path / ".registry"
        (pid_file,) = (p for p in registry.iterdir() if p.name.startswith(".writer."))
        two_hours_ago = time.time() - 7200
        os.utime(pid_file, (two_hours_ago, two_hours_ago))
        os.link(pid_file, registry / "JustReserved")  # a reservation under way
        assert [p.name for p in await store.check(max_age=3600)] == []
        assert [(p.kind, p.name) for p in await store.check(max_age=0)] == [
            ("orphan_registry", "JustReserved")
        ]
