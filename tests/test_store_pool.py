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
from typing import BinaryIO

import pytest

from spoold import ondisk as ondisk_module
from spoold.errors import InsufficientStorageError, NotFoundError, StoreError
from spoold.message import Queue
from spoold.ondisk import OnDiskSpool
from spoold.store import pool as pool_module
from spoold.store import store as store_module
from spoold.store.pool import POOL_BYTES, POOL_FILE_SIZE, POOL_PREFIX, FilePool
from tests.factories import new_message
from tests.store_child import GROUPED_STEPS
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


async def test_fsync_mode_removes_the_pool_at_open_and_keeps_none(tmp_path: Path) -> None:
    """Nobody claims pool files in fsync mode: those of an earlier run in
    syncfs mode are removed at open, and deletes unlink."""
    await _pooled_spool(tmp_path)
    od, _ = await OnDiskSpool.open(tmp_path, sync="fsync")
    assert _pool(tmp_path) == []
    added = [m for _ in range(3) for m in await od.add([new_message()])]
    await od.store.delete(Queue.ACTIVE.value, added[0].id)
    assert _pool(tmp_path) == []
    assert all(OLD[20:60] not in content for content in spool_files(tmp_path).values())
    await od.close()


async def test_a_body_up_to_the_file_bound_is_pooled_a_larger_one_removed(
    tmp_path: Path,
) -> None:
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs")
    (large,) = await od.add([new_message(b"Subject: large\r\n\r\n" + b"x" * 100 * 1024)])
    (big,) = await od.add([new_message(b"Subject: big\r\n\r\n" + b"x" * POOL_FILE_SIZE)])
    await od.store.delete(Queue.ACTIVE.value, large.id)
    # pool.PID.N.SIZE.KIND: the size the file has
    pooled = {n.rsplit(".", 1)[1]: n for n in _pool(tmp_path)}
    assert sorted(pooled) == ["body", "record"]
    for name in pooled.values():
        assert int(name.split(".")[3]) == (tmp_path / "tmp" / name).stat().st_size
    await od.store.delete(Queue.ACTIVE.value, big.id)
    assert sorted(n.rsplit(".", 1)[1] for n in _pool(tmp_path)) == ["body", "record", "record"]
    await od.close()


async def test_recovery_keeps_the_pool_and_removes_a_dead_writers_claims(tmp_path: Path) -> None:
    await _pooled_spool(tmp_path)
    (tmp_path / "tmp" / "999999999.reuse.0").write_bytes(b"claimed by a dead writer")
    od, report = await OnDiskSpool.open(tmp_path, sync="syncfs")
    assert report.removed_tmp == ["999999999.reuse.0"]
    assert len(_pool(tmp_path)) == 2
    assert await od.check(max_age=0) == []
    await od.close()


REUSE_STEPS = GROUPED_STEPS  # a commit that reuses files has the same steps


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
        pool.put(str(tmp_path / f"f{n}"), "body", 1, 1)
        assert not (tmp_path / f"f{n}").exists()
    assert len(_pool(tmp_path, "")) == 3
    with pytest.raises(FileNotFoundError):
        pool.put(str(tmp_path / "f0"), "record", 1, 1)


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
    pool.put(str(tmp_path / "f"), "body", 1, 1)
    assert os.listdir(tmp_path) == []


async def _add_until_reused(od: OnDiskSpool, count: int = 20) -> list[str]:
    """Add ``count`` messages (enough for every pooled file to be claimed
    and written); their ids."""
    return [
        m.id
        for n in range(count)
        for m in await od.add([new_message(b"Subject: new %d\r\n\r\nanother message\r\n" % n)])
    ]


async def test_a_hard_linked_record_or_body_is_unlinked_not_pooled(tmp_path: Path) -> None:
    """An operator's snapshot (``cp -al``) or ``ln`` keeps its content: a
    file with another name never goes into the pool."""
    keep = tmp_path / "keep"
    keep.mkdir()
    root = tmp_path / "spool"
    od, _ = await OnDiskSpool.open(root, sync="syncfs")
    (old,) = await od.add([new_message(OLD)])
    os.link(root / "data" / old.id, keep / "body")
    os.link(root / "active" / old.id, keep / "record")
    record = (keep / "record").read_bytes()
    await od.store.delete(Queue.ACTIVE.value, old.id)
    assert _pool(root) == []
    await _add_until_reused(od)
    assert (keep / "body").read_bytes() == OLD
    assert (keep / "record").read_bytes() == record
    await od.close()


async def test_a_pooled_file_linked_since_is_not_written_again(tmp_path: Path) -> None:
    """A link made to a file once in the pool (after its delete's check):
    the writer sees it when it opens the file, drops it and creates a new
    one; the add succeeds and the link keeps its content."""
    inodes = await _pooled_spool(tmp_path)
    linked = [tmp_path / f"linked.{n}" for n in range(2)]
    for name, link in zip(_pool(tmp_path), linked, strict=True):
        os.link(tmp_path / "tmp" / name, link)
    before = [p.read_bytes() for p in linked]
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs")
    ids = await _add_until_reused(od)
    assert [p.read_bytes() for p in linked] == before
    used = {_inode(tmp_path / d / i) for i in ids for d in ("data", "active")}
    assert not used & inodes
    assert without_pool(spool_files(tmp_path, "tmp")) == {}
    await od.close()


@pytest.mark.parametrize("fault", ["gone", "other_owner"])
async def test_a_claimed_file_that_cannot_be_used_gives_a_new_file(
    tmp_path: Path, fault: str
) -> None:
    """A claimed file removed, or owned by another user (a restore, a
    writer run as another uid): the add never fails because of the pool."""
    inodes = await _pooled_spool(tmp_path)
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs")
    await od.add([new_message(b"Subject: a\r\n\r\nfirst\r\n")])  # claims them
    claimed = [p for p in (tmp_path / "tmp").iterdir() if ".reuse." in p.name]
    assert {_inode(p) for p in claimed} == inodes
    for p in claimed:
        if fault == "gone":
            p.unlink()
        else:
            os.chown(p, os.geteuid() + 4242, -1)
    (second,) = await od.add([new_message(b"Subject: b\r\n\r\nsecond\r\n")])
    assert (await od.read_body(second.id)).content() == b"Subject: b\r\n\r\nsecond\r\n"
    owners = {(tmp_path / d / second.id).stat().st_uid for d in ("data", "active")}
    assert owners == {os.geteuid()}
    assert without_pool(spool_files(tmp_path, "tmp")) == {}
    assert await od.check(max_age=0) == []
    await od.close()


async def test_a_large_record_is_removed_not_pooled(tmp_path: Path) -> None:
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs")
    many = [f"recipient{n:06d}@example.com" for n in range(POOL_FILE_SIZE // 20)]
    (big,) = await od.add([new_message(recipients=many)])
    assert (tmp_path / "active" / big.id).stat().st_size > POOL_FILE_SIZE
    await od.store.delete(Queue.ACTIVE.value, big.id)
    assert [n.rsplit(".", 1)[1] for n in _pool(tmp_path)] == ["body"]
    await od.close()


async def test_mail_refused_for_space_empties_the_pool(tmp_path: Path) -> None:
    await _pooled_spool(tmp_path)
    free = shutil.disk_usage(tmp_path).free
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs", min_free_bytes=free + 2**30)
    with pytest.raises(InsufficientStorageError):
        await od.add([new_message()])
    assert _pool(tmp_path) == []
    assert spool_files(tmp_path) == {}
    await od.close()


async def test_a_failed_sync_drops_the_claimed_files(tmp_path: Path) -> None:
    """After a failed syncfs, files claimed are removed, never written: a
    later syncfs that succeeds does not prove the deletes reached the disk."""
    await _pooled_spool(tmp_path)

    def fail_sync(step: str) -> None:
        if step == "sync_data":
            raise OSError(errno.EIO, "Input/output error")

    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs", on_step=fail_sync)
    with pytest.raises(StoreError):
        await od.add([new_message()])
    assert _pool(tmp_path) == []
    assert spool_files(tmp_path, "tmp") == {}
    await od.close()


def _recycling_open(
    monkeypatch: pytest.MonkeyPatch, module: object, path: Path, other: bytes
) -> None:
    """Make ``module``'s next ``open`` of ``path`` race a delete: once the
    reader holds it, the file leaves its name (as into the pool: here out
    of the spool) and is written with ``other`` (as a later commit would)."""
    real_open = open
    away = path.parents[2] / f"recycled.{path.name}"

    def racing_open(name: str | Path, mode: str = "r") -> BinaryIO:
        f = real_open(name, mode)
        if str(name) == str(path):
            os.rename(path, away)
            away.write_bytes(other)
        return f  # type: ignore[return-value]

    monkeypatch.setattr(module, "open", racing_open, raising=False)


async def test_a_body_deleted_and_written_again_while_read_is_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "spool"
    od, _ = await OnDiskSpool.open(root, sync="syncfs")
    (msg,) = await od.add([new_message()])
    other = b"Subject: other\r\n\r\nnot yours\r\n"
    _recycling_open(monkeypatch, store_module, root / "data" / msg.id, other)
    with pytest.raises(NotFoundError):
        await od.store.read_body(msg.id)
    monkeypatch.undo()
    await od.close()


async def test_a_record_deleted_and_written_again_while_read_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read with its queue, the record is left out; read alone, not found."""
    root = tmp_path / "spool"
    od, _ = await OnDiskSpool.open(root, sync="syncfs")
    (msg, lone, other) = await od.add([new_message(), new_message(), new_message()])
    other_record = (root / "active" / other.id).read_bytes()
    _recycling_open(monkeypatch, store_module, root / "active" / msg.id, other_record)
    records = await od.store.read_queue(Queue.ACTIVE.value)
    assert {r.name for r in records} == {lone.id, other.id}
    _recycling_open(monkeypatch, store_module, root / "active" / lone.id, other_record)
    with pytest.raises(NotFoundError):
        await od.store.read(Queue.ACTIVE.value, lone.id)
    monkeypatch.undo()
    await od.close()


async def test_the_check_finds_no_damage_in_a_body_deleted_while_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``spoold check`` beside a running daemon: a body whose message is
    delivered while the check reads it is not reported as damaged."""
    root = tmp_path / "spool"
    od, _ = await OnDiskSpool.open(root, sync="syncfs")
    (msg,) = await od.add([new_message()])
    other = b"Subject: other\r\n\r\nnot yours\r\n"
    _recycling_open(monkeypatch, ondisk_module, root / "data" / msg.id, other)
    assert await od.check(max_age=0) == []
    monkeypatch.undo()
    await od.close()


def _put_files(pool: FilePool, root: Path, sizes: list[int], kind: str = "body") -> list[int]:
    """Put files of ``sizes`` bytes into ``pool``; their inode numbers."""
    inodes = []
    for n, size in enumerate(sizes):
        path = root / f"{kind}.{n}"
        path.write_bytes(b"o" * size)
        inodes.append(_inode(path))
        st = os.lstat(path)
        pool.put(str(path), kind, st.st_size, st.st_nlink)
    return inodes


def test_the_pool_holds_bytes_up_to_its_bound_counted_in_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file counts its whole blocks (one at least); a file the pool
    has no room left for is unlinked, a smaller one may still go in."""
    monkeypatch.setattr(pool_module, "POOL_BYTES", 10 * 4096)
    pool = FilePool(str(tmp_path), os.getpid())
    _put_files(pool, tmp_path, [4 * 4096, 4 * 4096 - 1, 2 * 4096 + 1, 1, 0])
    sizes = sorted(int(n.split(".")[3]) for n in _pool(tmp_path, ""))
    assert sizes == [0, 1, 4 * 4096 - 1, 4 * 4096]  # 3 blocks did not fit in the 2 left
    assert not [n for n in os.listdir(tmp_path) if not n.startswith(POOL_PREFIX)]


def test_a_full_pool_is_counted_again_soon_and_takes_files_once_claimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers' claims are not seen between two counts: a full pool is
    counted again after a few puts, not after the usual many, so a pool
    that writers empty as fast as deletes fill it keeps taking files."""
    monkeypatch.setattr(pool_module, "POOL_BYTES", 4 * 4096)
    owner = FilePool(str(tmp_path), os.getpid())
    writer = FilePool(str(tmp_path), os.getpid())
    _put_files(owner, tmp_path, [4096] * 4)
    assert len(_pool(tmp_path, "")) == 4
    writer.synced(writer.claim(4))
    assert _pool(tmp_path, "") == []
    # Unlinked: not counted again before _COUNT_FULL puts since the last count.
    _put_files(owner, tmp_path, [4096] * (pool_module._COUNT_FULL - 4))
    assert _pool(tmp_path, "") == []
    _put_files(owner, tmp_path, [4096] * 4)  # counted again: room for four
    assert len(_pool(tmp_path, "")) == 4


def test_a_writer_takes_the_file_nearest_in_size(tmp_path: Path) -> None:
    owner = FilePool(str(tmp_path), os.getpid())
    writer = FilePool(str(tmp_path), os.getpid())
    small, middle, large = _put_files(owner, tmp_path, [900, 100 * 1024, POOL_FILE_SIZE])
    writer.synced(writer.claim(3))

    def taken(size: int) -> int:
        path = writer.take("body", size)
        assert path is not None
        return _inode(Path(path))

    assert taken(90 * 1024) == middle
    assert taken(10) == small
    assert taken(50) == large  # the only one left
    assert writer.take("body", 50) is None
    assert writer.take("record", 50) is None


def test_a_writer_holds_at_most_its_bound_of_bytes_claimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "_CLAIM_BYTES", 3 * 4096)
    owner = FilePool(str(tmp_path), os.getpid())
    writer = FilePool(str(tmp_path), os.getpid())
    _put_files(owner, tmp_path, [2 * 4096] * 4)
    assert len(writer.claim(4)) == 2  # the second takes it past: no third
    assert len(_pool(tmp_path, "")) == 2


def test_a_pool_file_named_by_an_older_spoold_is_reused(tmp_path: Path) -> None:
    """``pool.PID.N.KIND`` (no size): claimed and written like the others,
    counted at the older bound (64 KiB)."""
    old = tmp_path / f"{POOL_PREFIX}1.0.body"
    old.write_bytes(OLD)
    inode = _inode(old)
    writer = FilePool(str(tmp_path), os.getpid())
    writer.synced(writer.claim(1))
    path = writer.take("body", 10)
    assert path is not None and _inode(Path(path)) == inode
    assert not old.exists()


async def test_new_bodies_are_written_over_pooled_ones_of_any_size(tmp_path: Path) -> None:
    """A pooled body larger than the new one is cut to its length, a
    smaller one grows: each new body reads back whole, with nothing of the
    old ones, and no old content is left anywhere but in the pool."""
    old_big = b"Subject: old\r\n\r\n" + OLD * 100  # about 190 KiB
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs")
    (old,) = await od.add([new_message(old_big)])
    pooled = _inode(tmp_path / "data" / old.id)
    await od.store.delete(Queue.ACTIVE.value, old.id)
    await od.close()
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs")  # lists the pool at once
    small = b"Subject: small\r\n\r\nsmall\r\n"
    await od.add([new_message(small)])  # claims the files
    (second,) = await od.add([new_message(small)])  # written over the big one
    assert _inode(tmp_path / "data" / second.id) == pooled
    assert (await od.read_body(second.id)).content() == small
    assert (tmp_path / "data" / second.id).stat().st_size < 1024
    # The other way: the small body pooled, a larger one written over it.
    await od.store.delete(Queue.ACTIVE.value, second.id)
    await od.close()
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs")
    large = b"Subject: large\r\n\r\n" + b"new content\r\n" * 10_000
    await od.add([new_message(small)])
    (third,) = await od.add([new_message(large)])
    assert _inode(tmp_path / "data" / third.id) == pooled
    assert (await od.read_body(third.id)).content() == large
    assert all(
        OLD[20:60] not in content for content in without_pool(spool_files(tmp_path)).values()
    )
    assert await od.check(max_age=0) == []
    await od.close()


async def test_the_pool_is_off_while_the_disk_has_not_room_for_all_its_bytes(
    tmp_path: Path,
) -> None:
    """Room for a full pool (its byte bound) above min_free_space, or no
    pool: a delete then unlinks, as it would without one."""
    free = shutil.disk_usage(tmp_path).free
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs", min_free_bytes=free - POOL_BYTES // 2)
    (msg,) = await od.add([new_message(b"Subject: b\r\n\r\n" + b"x" * 100 * 1024)])
    await od.store.delete(Queue.ACTIVE.value, msg.id)
    assert spool_files(tmp_path) == {}
    await od.close()
    free = shutil.disk_usage(tmp_path).free
    min_free = free - POOL_BYTES - 1024 * 1024 * 1024
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs", min_free_bytes=min_free)
    (msg,) = await od.add([new_message(b"Subject: b\r\n\r\n" + b"x" * 100 * 1024)])
    await od.store.delete(Queue.ACTIVE.value, msg.id)
    assert sorted(n.rsplit(".", 1)[1] for n in _pool(tmp_path)) == ["body", "record"]
    await od.close()


async def test_odd_names_in_tmp_break_neither_recovery_nor_the_pool(tmp_path: Path) -> None:
    """Names made by hand or by another program: a size or pid that is no
    ASCII number ("²" is a digit to str.isdigit, not to int), or a size
    larger than the pool takes. Recovery, deletes and adds go on; the pool
    counts such a file at a bound."""
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs")
    await od.close()
    odd = [f"{POOL_PREFIX}1.0.\u00b2\u00b3.body", f"{POOL_PREFIX}1.1.{'9' * 30}.body"]
    for name in [*odd, "\u00b2.reuse.1", "\u00b2x"]:
        (tmp_path / "tmp" / name).write_bytes(b"o")
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs")
    assert sorted(os.listdir(tmp_path / "tmp")) == sorted(odd)  # the others were nobody's
    ids = [m.id for m in await od.add([new_message() for _ in range(3)])]
    for mid in ids:
        await od.store.delete(Queue.ACTIVE.value, mid)  # into the pool
    await _add_until_reused(od)
    assert _pool(tmp_path) == []  # every pooled file claimed, the odd ones too
    await od.close()


def test_a_pool_full_of_files_is_not_listed_again_every_few_puts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full by its file bound (small mail's steady state), the pool is
    counted once every _COUNT_EVERY puts, not every _COUNT_FULL: a count
    lists tmp/ and reads every name."""
    monkeypatch.setattr(pool_module, "POOL_FILES", 4)
    owner = FilePool(str(tmp_path), os.getpid())
    listings = 0
    names = owner._names

    def counted() -> list[str]:
        nonlocal listings
        listings += 1
        return names()

    monkeypatch.setattr(owner, "_names", counted)
    _put_files(owner, tmp_path, [100] * (pool_module._COUNT_EVERY - 1))
    assert listings == 1
    assert len(_pool(tmp_path, "")) == 4
