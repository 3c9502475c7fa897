"""The on-disk spool: layout after each operation, lock, recovery, check."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

from spoold.errors import InvalidIdError, NotFoundError, SpoolLockedError, StoreError
from spoold.message import Frozen, Queue, Removed, SendAt, encode_record
from spoold.ondisk import OnDiskSpool
from spoold.store import Store
from spoold.store.registry import Registry
from spoold.times import utcnow
from tests.factories import make_message, new_message
from tests.spool_helpers import settle
from tests.store_child import GROUPED_STEPS
from tests.support import WAIT_TIMEOUT, spool_files, without_pool

CHILD = str(Path(__file__).with_name("store_child.py"))


async def test_tree_after_each_operation(tmp_path: Path) -> None:
    od, report = await OnDiskSpool.open(tmp_path)
    assert not report
    assert spool_files(tmp_path) == {}
    for d in ["tmp", "data", ".registry", "active/.checkout", "frozen/.reasons", "quarantine"]:
        assert (tmp_path / d).is_dir()

    (msg,) = await od.add([new_message(b"Subject: x\r\n\r\nbody\r\n")])
    mid = msg.id
    assert set(spool_files(tmp_path)) == {f".registry/{mid}", f"data/{mid}", f"active/{mid}"}
    assert (tmp_path / "data" / mid).read_bytes() == b"Subject: x\r\n\r\nbody\r\n"

    await od.checkout(msg)
    assert set(spool_files(tmp_path)) == {
        f".registry/{mid}",
        f"data/{mid}",
        f"active/.checkout/{mid}",
    }

    msg.status = SendAt(at=utcnow())
    await od.save(msg, from_queue=Queue.ACTIVE, checked_out=True)
    assert set(spool_files(tmp_path)) == {f".registry/{mid}", f"data/{mid}", f"active/{mid}"}
    assert (tmp_path / "active" / mid).read_bytes() == encode_record(msg)

    msg.status = Frozen()
    await od.save(msg, from_queue=Queue.ACTIVE)
    assert set(spool_files(tmp_path)) == {f".registry/{mid}", f"data/{mid}", f"frozen/{mid}"}

    msg.status = Removed()
    await od.save(msg, from_queue=Queue.FROZEN)
    assert set(spool_files(tmp_path)) == {f".registry/{mid}", f"data/{mid}", f"removed/{mid}"}

    await od.store.set_aside("removed", mid, "quarantine", "operator says so")
    assert set(spool_files(tmp_path)) == {
        f".registry/{mid}",
        f"data/{mid}",
        f"quarantine/{mid}",
        f"quarantine/.reasons/{mid}",
    }
    assert await od.store.set_aside_reason("quarantine", mid) == "operator says so"

    await od.store.delete("quarantine", mid)
    await od.store.clear_reason("quarantine", mid)
    assert spool_files(tmp_path) == {}  # no pool in fsync mode
    assert await od.check(max_age=0) == []
    await od.close()


async def test_second_owner_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    od, _ = await OnDiskSpool.open(tmp_path)
    with pytest.raises(SpoolLockedError) as info:
        await OnDiskSpool.open(tmp_path)
    assert str(info.value) == f"spool {tmp_path} is already owned by pid {os.getpid()}"

    # The same from another process, which must not wait for the lock.
    script = (
        "import anyio, sys\n"
        "from spoold.ondisk import OnDiskSpool\n"
        "from spoold.errors import SpoolLockedError\n"
        "async def main():\n"
        "    try:\n"
        "        await OnDiskSpool.open(sys.argv[1])\n"
        "    except SpoolLockedError as e:\n"
        "        print(e)\n"
        "anyio.run(main)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == f"spool {tmp_path} is already owned by pid {os.getpid()}"

    # A non-owner may still open it to add messages.
    writer, _ = await OnDiskSpool.open(tmp_path, owner=False)
    (msg,) = await writer.add([new_message()])
    with pytest.raises(StoreError, match="only the owner"):
        await writer.store.delete("active", msg.id)
    await writer.close()

    await od.close()
    od2, _ = await OnDiskSpool.open(tmp_path)  # the lock is free again
    messages, _ = await od2.load(Queue.ACTIVE)
    assert [m.id for m in messages] == [msg.id]
    await od2.close()


async def test_open_without_create_on_a_missing_spool(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is not a spool directory"):
        await OnDiskSpool.open(tmp_path / "nope", create=False)


async def test_ids_from_outside_are_validated_before_any_path(tmp_path: Path) -> None:
    od, _ = await OnDiskSpool.open(tmp_path)
    (tmp_path / "secret").write_text("x")
    for bad in ["../secret", "a/b", "", "a\x00b", "x" * 65, ".."]:
        with pytest.raises(InvalidIdError):
            await od.store.read("active", bad)
        with pytest.raises(InvalidIdError):
            await od.store.delete("active", bad)
        with pytest.raises(InvalidIdError):
            await od.store.read_body(bad)
        with pytest.raises(InvalidIdError):
            await od.store.write("active", bad, b"x", to_queue="frozen")
    assert (tmp_path / "secret").read_text() == "x"
    with pytest.raises(NotFoundError, match="nosuch: not in queue active"):
        await od.store.read("active", "nosuch")
    await od.close()


async def test_unreadable_record_is_set_aside_not_deleted(tmp_path: Path) -> None:
    od, _ = await OnDiskSpool.open(tmp_path)
    (good,) = await od.add([new_message()])
    garbage = b'{"version": 99, "whatever": true}\n'
    (tmp_path / "active" / "BadRecord1").write_bytes(garbage)
    (tmp_path / "data" / "BadRecord1").write_bytes(b"body\r\n")
    (tmp_path / "active" / "BadRecord2").write_bytes(b"\x00\xff not json")

    messages, unreadable = await od.load(Queue.ACTIVE)
    assert [m.id for m in messages] == [good.id]
    assert {(u.id, u.queue) for u in unreadable} == {
        ("BadRecord1", Queue.ACTIVE),
        ("BadRecord2", Queue.ACTIVE),
    }
    reasons = {u.id: u.reason for u in unreadable}
    assert "unknown record version 99" in reasons["BadRecord1"]
    assert "corrupt record" in reasons["BadRecord2"]
    # Byte for byte in quarantine, with the reason beside it; body kept.
    assert (tmp_path / "quarantine" / "BadRecord1").read_bytes() == garbage
    assert (tmp_path / "data" / "BadRecord1").read_bytes() == b"body\r\n"
    assert not (tmp_path / "active" / "BadRecord1").exists()
    assert await od.store.set_aside_reason("quarantine", "BadRecord1") == reasons["BadRecord1"]

    # Reading quarantine reports them again with the kept reason.
    _, again = await od.load(Queue.QUARANTINE)
    assert {u.id: u.reason for u in again} == reasons
    await od.close()


async def test_record_in_the_wrong_queue_moves_to_its_status(tmp_path: Path) -> None:
    od, _ = await OnDiskSpool.open(tmp_path)
    (msg,) = await od.add([new_message()])
    msg.status = Frozen()
    # What a crash between "replace" and "move" leaves: new content, old place.
    (tmp_path / "active" / msg.id).write_bytes(encode_record(msg))
    active, _ = await od.load(Queue.ACTIVE)
    assert active == []
    frozen, _ = await od.load(Queue.FROZEN)
    assert [m.id for m in frozen] == [msg.id]
    assert set(spool_files(tmp_path)) == {
        f".registry/{msg.id}",
        f"data/{msg.id}",
        f"frozen/{msg.id}",
    }
    await od.close()


async def test_non_owner_load_changes_nothing(tmp_path: Path) -> None:
    od, _ = await OnDiskSpool.open(tmp_path)
    (tmp_path / "active" / "Bad").write_bytes(b"nope")
    reader, _ = await OnDiskSpool.open(tmp_path, owner=False)
    _, unreadable = await reader.load(Queue.ACTIVE)
    assert [u.id for u in unreadable] == ["Bad"]
    assert (tmp_path / "active" / "Bad").exists()
    await reader.close()
    await od.close()


async def test_check_reports_every_kind_of_problem(tmp_path: Path) -> None:
    od, _ = await OnDiskSpool.open(tmp_path)
    (a,) = await od.add([new_message()])
    (b,) = await od.add([new_message()])
    (c,) = await od.add([new_message()])
    # duplicate: a also in frozen
    (tmp_path / "frozen" / a.id).write_bytes((tmp_path / "active" / a.id).read_bytes())
    # missing body
    (tmp_path / "data" / b.id).unlink()
    # stale checkout
    await od.checkout(c)
    # orphan body and registry entry from a writer that is gone
    (tmp_path / "data" / "OrphanBody").write_bytes(b"x")
    (tmp_path / ".registry" / "OrphanReg").write_text("999999999\n")
    # stale tmp file, stray file
    (tmp_path / "tmp" / "1.x.record.abcd").write_bytes(b"x")
    (tmp_path / "active" / "not an id.txt").write_bytes(b"x")

    problems = {(p.kind, p.name) for p in await od.check(max_age=0)}
    assert problems == {
        ("duplicate", a.id),
        ("missing_body", b.id),
        ("stale_checkout", c.id),
        ("orphan_body", "OrphanBody"),
        ("orphan_registry", "OrphanReg"),
        ("stale_tmp", "1.x.record.abcd"),
        ("stray_file", "not an id.txt"),
    }
    # Nothing is stale under a generous age limit, except what has no owner.
    lenient = {(p.kind, p.name) for p in await od.check(max_age=3600)}
    assert ("stale_checkout", c.id) not in lenient
    assert ("stale_tmp", "1.x.record.abcd") not in lenient
    assert ("orphan_registry", "OrphanReg") in lenient
    await od.close()


async def test_check_takes_a_record_seen_in_its_queue_and_its_checkout_for_a_move(
    tmp_path: Path,
) -> None:
    # A running daemon checks a record out (a rename) between check's listing
    # of the queue and of its checkout: both listings name it. Not a copy.
    od, _ = await OnDiskSpool.open(tmp_path)
    (a,) = await od.add([new_message()])
    record = (tmp_path / "active" / a.id).read_bytes()
    (tmp_path / "active" / ".checkout" / a.id).write_bytes(record)
    assert [p for p in await od.check() if p.kind == "duplicate"] == []
    await od.close()


async def test_recovery_returns_checkouts_and_clears_dead_writers(tmp_path: Path) -> None:
    od, _ = await OnDiskSpool.open(tmp_path)
    (msg,) = await od.add([new_message()])
    await od.checkout(msg)
    await od.close()
    dead_pid = 999_999_999
    (tmp_path / "tmp" / f"{dead_pid}.X.record.aaaa").write_bytes(b"x")
    (tmp_path / "data" / "Unacked").write_bytes(b"x")
    (tmp_path / ".registry" / "Unacked").write_text(f"{dead_pid}\n")
    # A live writer's work in progress is left alone (pid 1 is alive).
    (tmp_path / "tmp" / "1.Y.record.bbbb").write_bytes(b"y")
    (tmp_path / "data" / "InFlight").write_bytes(b"y")
    (tmp_path / ".registry" / "InFlight").write_text("1\n")

    od, report = await OnDiskSpool.open(tmp_path)
    assert report.returned_checkouts == [("active", msg.id)]
    assert report.removed_tmp == [f"{dead_pid}.X.record.aaaa"]
    assert report.removed_unacknowledged == ["Unacked"]
    assert set(spool_files(tmp_path)) == {
        f".registry/{msg.id}",
        f"data/{msg.id}",
        f"active/{msg.id}",
        "tmp/1.Y.record.bbbb",
        "data/InFlight",
        ".registry/InFlight",
    }
    await od.close()


async def test_failed_enqueue_leaves_nothing(tmp_path: Path) -> None:
    def disk_full(step: str) -> None:
        if step == "rename_record":
            raise OSError(errno.ENOSPC, "No space left on device")

    od, _ = await OnDiskSpool.open(tmp_path, on_step=disk_full)
    with pytest.raises(StoreError) as info:
        await od.add([new_message(), new_message()])
    assert Store.is_disk_full(info.value)
    assert "No space left on device" in str(info.value)
    assert spool_files(tmp_path) == {}
    assert await od.check(max_age=0) == []
    await od.close()


async def test_failed_rewrite_keeps_the_old_record(tmp_path: Path) -> None:
    fail = {"on": False}

    def hook(step: str) -> None:
        if fail["on"] and step == "replace":
            raise OSError(errno.EIO, "I/O error")

    od, _ = await OnDiskSpool.open(tmp_path, on_step=hook)
    (msg,) = await od.add([new_message()])
    before = (tmp_path / "active" / msg.id).read_bytes()
    fail["on"] = True
    msg.status = Frozen()
    with pytest.raises(StoreError, match="I/O error"):
        await od.save(msg, from_queue=Queue.ACTIVE)
    assert (tmp_path / "active" / msg.id).read_bytes() == before
    assert spool_files(tmp_path, "tmp") == {}
    await od.close()


# ----------------------------------------------------- crash simulation


def run_child(spool: Path, op: str, arg: str, *, timeout: float = 60) -> int:
    return subprocess.run(
        [sys.executable, CHILD, str(spool), op, arg], timeout=timeout, check=False
    ).returncode


ENQUEUE_STEPS = [
    "reserve",
    "write_body",
    "write_record",
    "rename_body",
    "rename_record",
    "fsync_dirs",
    "done",
]


async def everything(od: OnDiskSpool) -> dict[str, Queue]:
    where: dict[str, Queue] = {}
    for q in Queue:
        messages, unreadable = await od.load(q)
        assert unreadable == []
        for m in messages:
            assert m.id not in where, f"{m.id} in {where[m.id]} and {q}"
            where[m.id] = q
    return where


@pytest.mark.parametrize(
    ("op", "step"),
    [("enqueue", s) for s in ENQUEUE_STEPS] + [("enqueue_syncfs", s) for s in GROUPED_STEPS],
)
async def test_crash_at_each_step_of_enqueue(tmp_path: Path, op: str, step: str) -> None:
    assert run_child(tmp_path, op, step) == 77
    od, _ = await OnDiskSpool.open(tmp_path)
    where = await everything(od)
    steps = ENQUEUE_STEPS if op == "enqueue" else GROUPED_STEPS
    if steps.index(step) < steps.index("fsync_dirs"):  # before: rename_record has not run
        assert where == {}
        assert spool_files(tmp_path) == {}
    else:
        ((mid, queue),) = where.items()
        assert queue is Queue.ACTIVE
        body = await od.read_body(mid)
        assert body.content() == b".leading dot\r\nbody\r\n"
    assert await od.check(max_age=0) == []
    await od.close()


MOVE_STEPS = ["write_record", "replace", "move", "fsync_dirs", "done"]


@pytest.mark.parametrize(
    ("op", "step"),
    [("move", s) for s in MOVE_STEPS]
    # A checked-out record going back to its own queue has no "move" step.
    + [("move_checked_out", s) for s in MOVE_STEPS if s != "move"],
)
async def test_crash_at_each_step_of_a_move(tmp_path: Path, step: str, op: str) -> None:
    od, _ = await OnDiskSpool.open(tmp_path)
    (msg,) = await od.add([new_message(b"body\r\n")])
    await od.close()
    assert run_child(tmp_path, op, step) == 77

    od, _ = await OnDiskSpool.open(tmp_path)
    where = await everything(od)
    changed = MOVE_STEPS.index(step) > MOVE_STEPS.index("replace")  # hooks run before a step
    if op == "move":
        assert where == {msg.id: Queue.FROZEN if changed else Queue.ACTIVE}
    else:
        assert where == {msg.id: Queue.ACTIVE}
        (loaded,), _ = await od.load(Queue.ACTIVE)
        assert isinstance(loaded.status, SendAt) == changed
    assert (await od.read_body(msg.id)).content() == b"body\r\n"
    assert await od.check(max_age=0) == []
    await od.close()


@pytest.mark.parametrize(
    "step",
    ["unlink_registry", "unlink_record", "unlink_body", "done"],
)
async def test_crash_at_each_step_of_delete(tmp_path: Path, step: str) -> None:
    od, _ = await OnDiskSpool.open(tmp_path)
    (msg,) = await od.add([new_message()])
    await od.close()
    assert run_child(tmp_path, "delete", step) == 77
    od, _ = await OnDiskSpool.open(tmp_path)
    where = await everything(od)
    if step in ("unlink_registry", "unlink_record"):  # before the commit point
        assert where == {msg.id: Queue.ACTIVE}
        assert (await od.read_body(msg.id)).content() == b"Subject: hi\r\n\r\nhello\r\n"
    else:
        assert where == {}
        assert without_pool(spool_files(tmp_path)) == {}
    assert await od.check(max_age=0) == []
    await od.close()


async def test_two_processes_enqueue_concurrently(tmp_path: Path) -> None:
    od, _ = await OnDiskSpool.open(tmp_path)
    procs = [
        subprocess.Popen([sys.executable, CHILD, str(tmp_path), "enqueue_many", "1000"])
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    messages, unreadable = await od.load(Queue.ACTIVE)
    assert unreadable == []
    ids = [m.id for m in messages]
    assert len(ids) == 2000
    assert len(set(ids)) == 2000
    for m in messages[::100]:
        assert (await od.read_body(m.id)).content() == b"Subject: hi\r\n\r\nhello\r\n"
    assert len(spool_files(tmp_path, "data")) == 2000
    assert await od.check(max_age=0) == []
    await od.close()


def test_make_message_helper_is_valid() -> None:
    assert make_message("abc").id == "abc"


async def test_close_waits_for_operations_under_way(tmp_path: Path) -> None:
    reached, release = threading.Event(), threading.Event()

    def hold(step: str) -> None:
        if step == "fsync_dirs":
            reached.set()
            release.wait(WAIT_TIMEOUT)  # a safety net: the test releases it

    od, _ = await OnDiskSpool.open(tmp_path, on_step=hold)
    added: list[str] = []
    closed = anyio.Event()
    with anyio.fail_after(2 * WAIT_TIMEOUT):
        async with anyio.create_task_group() as tg:

            async def add() -> None:
                (msg,) = await od.add([new_message()])
                added.append(msg.id)

            async def close() -> None:
                await od.close()
                closed.set()

            tg.start_soon(add)
            assert await anyio.to_thread.run_sync(reached.wait, WAIT_TIMEOUT)
            tg.start_soon(close)
            await settle()  # the close is under way...
            assert not closed.is_set()  # ...but the enqueue is still fsyncing
            release.set()
    assert closed.is_set() and len(added) == 1
    assert (tmp_path / "active" / added[0]).exists()
    with pytest.raises(StoreError, match="is closed"):
        await od.add([new_message()])


async def test_checkouts_of_kept_queues_stay_checked_out_for_the_owner(tmp_path: Path) -> None:
    """``keep_checkouts``: recovery leaves those records checked out (the
    owner settles them); the others go back to their queues as usual."""
    od, _ = await OnDiskSpool.open(tmp_path)
    try:
        cut, held = await od.add([new_message(), new_message(status=Frozen())])
        await od.checkout(cut)
        await od.checkout(held)
    finally:
        await od.close()
    od, report = await OnDiskSpool.open(
        tmp_path, keep_checkouts=[Queue.ACTIVE], keep_listings=[Queue.ACTIVE, Queue.FROZEN]
    )
    try:
        assert report.kept_checkouts == [("active", cut.id)]
        assert report.returned_checkouts == [("frozen", held.id)]
        assert (tmp_path / "active" / ".checkout" / cut.id).exists()
        assert (tmp_path / "frozen" / held.id).exists()
        # Recovery's listings, as a load right after the open takes them
        # (once: a listing taken later would be an old one).
        assert report.take_listing("active") == await od.names(Queue.ACTIVE) == [(cut.id, True)]
        assert report.take_listing("active") is None
        assert report.take_listing("frozen") == [(held.id, False)]
        msgs, _ = await od.load(Queue.ACTIVE)
        assert [m.id for m in msgs] == [cut.id]  # loaded from where it is
        cut.in_doubt = True
        await od.save(cut, from_queue=Queue.ACTIVE, checked_out=True)
    finally:
        await od.close()
    assert (tmp_path / "active" / cut.id).exists()
    assert not (tmp_path / "active" / ".checkout" / cut.id).exists()


@pytest.mark.parametrize("where", ["active", "frozen/.checkout"])
async def test_a_record_committed_while_recovery_runs_keeps_its_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A short-lived writer (``spoold submit``) commits its record right after
    recovery listed the queues, and exits before recovery reaches ``data/``:
    the message was acknowledged, so its body and registry entry stay."""
    od, _ = await OnDiskSpool.open(tmp_path)
    (msg,) = await od.add([new_message()])
    await od.close()
    record = tmp_path / "active" / msg.id
    # The writer just before its commit: the record still aside (in tmp/),
    # its registry entry naming a pid that has exited by the time recovery asks.
    pending = tmp_path / "tmp" / "1.pending"
    record.rename(pending)
    (tmp_path / ".registry" / msg.id).unlink()
    (tmp_path / ".registry" / msg.id).write_text("999999999\n")
    asked = Registry.writer_gone

    def writer_gone(self: Registry, registry_name: str) -> bool:
        # The queues are listed by now: the writer commits, then exits.
        if pending.exists():
            pending.rename(tmp_path / where / msg.id)
        return asked(self, registry_name)

    monkeypatch.setattr(Registry, "writer_gone", writer_gone)
    od, report = await OnDiskSpool.open(tmp_path, keep_listings=[Queue.ACTIVE, Queue.FROZEN])
    await od.close()
    assert report.removed_unacknowledged == []
    assert (tmp_path / where / msg.id).exists()
    assert (tmp_path / "data" / msg.id).exists()
    assert (tmp_path / ".registry" / msg.id).exists()


async def test_recovery_keeps_the_listings_of_the_queues_asked_for_only(tmp_path: Path) -> None:
    """The owner loads ``active`` and ``frozen``: recovery's listings of
    those are kept for the load; ``removed`` (it can be the largest queue)
    and ``quarantine`` are not listed into the report. Kept listings are not
    part of what the report says: equal reports compare equal."""
    od, _ = await OnDiskSpool.open(tmp_path)
    try:
        sent, held, gone = await od.add(
            [new_message(), new_message(status=Frozen()), new_message(status=Removed())]
        )
        await od.checkout(held)
    finally:
        await od.close()
    od, report = await OnDiskSpool.open(tmp_path, keep_listings=[Queue.ACTIVE])
    await od.close()
    assert report.listings == {"active": [(sent.id, False)]}
    assert report.returned_checkouts == [("frozen", held.id)]
    od, report = await OnDiskSpool.open(tmp_path)
    await od.close()
    assert report.listings == {}
    od, again = await OnDiskSpool.open(tmp_path, keep_listings=[Queue.ACTIVE, Queue.REMOVED])
    await od.close()
    assert again.listings == {"active": [(sent.id, False)], "removed": [(gone.id, False)]}
    assert again == report
    assert (tmp_path / "removed" / gone.id).exists()
    assert (tmp_path / "data" / gone.id).exists()  # a record's body is a record's body
