"""The pool of removed files (spoold.store.pool): a delete puts a record
and its body there, a group commit claims them, and writes into them only
after a syncfs that followed the claim; no old content ever shows in a new
message, and a crash at any step of a commit that reuses files loses
nothing acknowledged and leaves nothing that reads as a message."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spoold.message import Queue
from spoold.ondisk import OnDiskSpool
from spoold.store import pool as pool_module
from spoold.store.pool import POOL_FILE_SIZE, POOL_PREFIX, FilePool
from tests.factories import new_message
from tests.support import spool_files, without_pool

CHILD = str(Path(__file__).with_name("store_child.py"))
OLD = b"Subject: old\r\n\r\n" + b"old content, never to be seen again\r\n" * 50


def _inode(path: Path) -> int:
    return os.stat(path).st_ino


def _pool(root: Path, tmp: str = "tmp") -> list[str]:
    return sorted(n for n in os.listdir(root / tmp) if n.startswith(POOL_PREFIX))


async def _pooled_spool(root: Path) -> set[int]:
    """A spool whose pool holds the record and body of a deleted message
    with a long body; their inode numbers."""
    od, _ = await OnDiskSpool.open(root, sync="syncfs")
    (old,) = await od.add([new_message(OLD)])
    inodes = {_inode(root / "data" / old.id), _inode(root / "active" / old.id)}
    await od.store.delete(Queue.ACTIVE.value, old.id)
    await od.close()
    assert {_inode(root / "tmp" / n) for n in _pool(root)} == inodes
    return inodes


async def test_a_commit_writes_again_the_files_of_a_deleted_message(tmp_path: Path) -> None:
    inodes = await _pooled_spool(tmp_path)
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs")
    (first,) = await od.add([new_message(b"Subject: a\r\n\r\nfirst\r\n")])  # claims them
    assert _pool(tmp_path) == []
    (second,) = await od.add([new_message(b"Subject: b\r\n\r\nsecond\r\n")])  # writes them
    assert {
        _inode(tmp_path / "data" / second.id),
        _inode(tmp_path / "active" / second.id),
    } == inodes
    assert (tmp_path / "data" / second.id).read_bytes().endswith(b"\r\nsecond\r\n")
    assert all(OLD[20:60] not in content for content in spool_files(tmp_path).values())
    body = await od.read_body(second.id)
    assert body.content() == b"Subject: b\r\n\r\nsecond\r\n"
    loaded, _ = await od.load(Queue.ACTIVE)
    assert {m.id for m in loaded} == {first.id, second.id}
    assert (await od.read_body(first.id)).content() == b"Subject: a\r\n\r\nfirst\r\n"
    assert await od.check(max_age=0) == []
    await od.close()
    # Nothing claimed is left behind by a store that closes.
    assert without_pool(spool_files(tmp_path, "tmp")) == {}


async def test_fsync_commits_never_write_into_pooled_files(tmp_path: Path) -> None:
    inodes = await _pooled_spool(tmp_path)
    od, _ = await OnDiskSpool.open(tmp_path, sync="fsync")
    added = [m for _ in range(3) for m in await od.add([new_message()])]
    used = {_inode(tmp_path / d / m.id) for m in added for d in ("data", "active")}
    assert not used & inodes
    await od.close()


async def test_a_large_body_is_removed_not_pooled(tmp_path: Path) -> None:
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs")
    (big,) = await od.add([new_message(b"Subject: big\r\n\r\n" + b"x" * POOL_FILE_SIZE)])
    await od.store.delete(Queue.ACTIVE.value, big.id)
    assert len(_pool(tmp_path)) == 1  # the record only
    await od.close()


async def test_recovery_keeps_the_pool_and_removes_a_dead_writers_claims(tmp_path: Path) -> None:
    await _pooled_spool(tmp_path)
    (tmp_path / "tmp" / "999999999.reuse.0").write_bytes(b"claimed by a dead writer")
    od, report = await OnDiskSpool.open(tmp_path, sync="syncfs")
    assert report.removed_tmp == ["999999999.reuse.0"]
    assert len(_pool(tmp_path)) == 2
    assert await od.check(max_age=0) == []
    await od.close()


REUSE_STEPS = [
    "reserve",
    "write_body",
    "write_record",
    "sync_data",
    "rename_body",
    "rename_record",
    "fsync_dirs",
    "done",
]


@pytest.mark.parametrize("step", REUSE_STEPS)
async def test_crash_at_each_step_of_a_commit_that_reuses_files(tmp_path: Path, step: str) -> None:
    inodes = await _pooled_spool(tmp_path)
    done = subprocess.run(
        [sys.executable, CHILD, str(tmp_path), "enqueue_reuse", step], timeout=60, check=False
    )
    assert done.returncode == 77
    od, _ = await OnDiskSpool.open(tmp_path)
    messages, unreadable = await od.load(Queue.ACTIVE)
    assert unreadable == []
    bodies = {m.id: (await od.read_body(m.id)).content() for m in messages}
    if REUSE_STEPS.index(step) < REUSE_STEPS.index("fsync_dirs"):  # before the commit point
        assert sorted(bodies.values()) == [b"first\r\n"]
    else:
        assert sorted(bodies.values()) == [b"first\r\n", b"second\r\n"]
        (second,) = [mid for mid, content in bodies.items() if content == b"second\r\n"]
        assert {
            _inode(tmp_path / "data" / second),
            _inode(tmp_path / "active" / second),
        } == inodes
    # The dead writer's claimed files are gone; no old content anywhere
    # but in the pool (none is left there: both files were claimed).
    assert without_pool(spool_files(tmp_path, "tmp")) == {}
    assert all(OLD[20:60] not in content for content in spool_files(tmp_path).values())
    assert await od.check(max_age=0) == []
    await od.close()


def test_the_pool_takes_files_up_to_its_bound_and_unlinks_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "POOL_FILES", 3)
    pool = FilePool(str(tmp_path), os.getpid())
    for n in range(5):
        (tmp_path / f"f{n}").write_bytes(b"x")
        pool.put(str(tmp_path / f"f{n}"), "body", 1)
        assert not (tmp_path / f"f{n}").exists()
    assert len(_pool(tmp_path, "")) == 3
    with pytest.raises(FileNotFoundError):
        pool.put(str(tmp_path / "f0"), "record")


async def test_no_pool_in_fsync_mode_or_short_of_room(tmp_path: Path) -> None:
    od, _ = await OnDiskSpool.open(tmp_path, sync="fsync")
    (msg,) = await od.add([new_message()])
    await od.store.delete(Queue.ACTIVE.value, msg.id)
    assert _pool(tmp_path) == []
    await od.close()
    free = shutil.disk_usage(tmp_path).free
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs", min_free_bytes=free - 32 * 1024 * 1024)
    (msg,) = await od.add([new_message()])
    await od.store.delete(Queue.ACTIVE.value, msg.id)
    assert _pool(tmp_path) == []  # a full pool would take the disk below min_free_space
    assert spool_files(tmp_path) == {}
    await od.close()


async def test_the_check_finds_no_stale_file_in_the_pool_or_a_live_writers_claims(
    tmp_path: Path,
) -> None:
    await _pooled_spool(tmp_path)
    live = tmp_path / "tmp" / f"{os.getpid()}.reuse.999999"
    dead = tmp_path / "tmp" / "999999999.reuse.0"
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs")
    live.write_bytes(b"claimed by a writer at work")
    dead.write_bytes(b"claimed by a dead writer")
    problems = await od.check(max_age=0)  # every file is old
    assert [(p.kind, p.name) for p in problems] == [("stale_tmp", dead.name)]
    live.unlink()
    await od.close()


def test_a_put_the_pool_cannot_take_is_an_unlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename into tmp/ that fails (its directory cannot grow on a full
    disk) must not fail the delete: the file is unlinked, as without a pool."""
    pool = FilePool(str(tmp_path), os.getpid())
    (tmp_path / "f").write_bytes(b"x")

    def no_room(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", dst)

    monkeypatch.setattr(os, "rename", no_room)
    pool.put(str(tmp_path / "f"), "body", 1)
    assert os.listdir(tmp_path) == []
