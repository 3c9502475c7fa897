"""Group commit (``sync="syncfs"``): concurrent enqueues share their syncs,
and a failure costs only the jobs it touches."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import anyio
import pytest

from spoold.errors import StoreError
from spoold.message import Queue
from spoold.ondisk import NewMessage, OnDiskSpool
from spoold.testing import Faults
from tests.factories import new_message
from tests.support import spool_files


async def add_many(od: OnDiskSpool, count: int) -> list[str | BaseException]:
    results: list[str | BaseException] = []

    async def one() -> None:
        try:
            (msg,) = await od.add([new_message()])
            results.append(msg.id)
        except Exception as exc:
            results.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(one)
    return results


async def test_concurrent_adds_share_their_syncs_and_all_arrive(tmp_path: Path) -> None:
    faults = Faults()
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs", on_step=faults, max_threads=4)
    with anyio.fail_after(30):
        ids = await add_many(od, 200)
    assert all(isinstance(i, str) for i in ids)
    messages, unreadable = await od.load(Queue.ACTIVE)
    assert unreadable == []
    assert sorted(m.id for m in messages) == sorted(str(i) for i in ids)
    for m in messages[:20]:
        assert (await od.read_body(m.id)).content() == b"Subject: hi\r\n\r\nhello\r\n"
    # Two syncs per batch, and batches hold several adds.
    assert faults.seen["sync_data"] == faults.seen["fsync_dirs"]
    assert faults.seen["sync_data"] < 200
    assert faults.seen["write_record"] == 200
    assert await od.check(max_age=0) == []
    await od.close()


async def test_adders_woken_by_a_batch_all_join_the_next_one(tmp_path: Path) -> None:
    """16 adders adding one message after another: each batch's end wakes
    all 16, and all 16 next adds go in one batch (not the first alone, then
    the other 15)."""
    faults = Faults()
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs", on_step=faults)

    async def adder() -> None:
        for _ in range(3):
            await od.add([new_message()])

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(adder)
    assert faults.seen["write_record"] == 48
    assert faults.seen["sync_data"] == 3
    await od.close()


async def test_an_add_cancelled_while_it_waits_for_a_batch_is_never_written(
    tmp_path: Path,
) -> None:
    """Cancelled before its batch started, an add leaves nothing: its caller
    never learns an id, so a message spooled anyway would be sent unseen."""
    started, release = threading.Event(), threading.Event()

    def hold_first_batch(step: str) -> None:
        if step == "sync_data" and not started.is_set():
            started.set()
            release.wait(30)

    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs", on_step=hold_first_batch)
    first: list[str] = []

    async def add_first() -> None:
        (msg,) = await od.add([new_message()])
        first.append(msg.id)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(add_first)
            await anyio.to_thread.run_sync(started.wait)
            with anyio.CancelScope() as scope:

                async def cancel() -> None:  # runs once the add below waits
                    scope.cancel()

                tg.start_soon(cancel)
                await od.add([new_message()])
            assert scope.cancelled_caught
            release.set()
        (later,) = await od.add([new_message()])  # the next batch: without the cancelled one
    messages, _ = await od.load(Queue.ACTIVE)
    assert sorted(m.id for m in messages) == sorted([*first, later.id])
    assert await od.check(max_age=0) == []
    await od.close()


async def test_a_job_that_fails_alone_is_undone_alone(tmp_path: Path) -> None:
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs")

    def broken_build(mid: str, related: list[str]) -> object:
        raise ValueError("cannot build this record")

    good = new_message()
    bad = NewMessage(good.body, good.status, broken_build)  # type: ignore[arg-type]
    results: dict[str, object] = {}

    async def add(name: str, item: NewMessage) -> None:
        try:
            results[name] = (await od.add([item]))[0].id
        except Exception as exc:
            results[name] = exc

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(add, f"good{i}", new_message())
            tg.start_soon(add, "bad", bad)
    assert isinstance(results.pop("bad"), ValueError)
    assert all(isinstance(v, str) for v in results.values())
    messages, _ = await od.load(Queue.ACTIVE)
    assert sorted(m.id for m in messages) == sorted(str(v) for v in results.values())
    assert await od.check(max_age=0) == []
    await od.close()


@pytest.mark.parametrize("step", ["sync_data", "fsync_dirs"])
async def test_a_failed_sync_undoes_the_whole_batch(tmp_path: Path, step: str) -> None:
    faults = Faults()
    faults.fail(step, OSError(errno.EIO, "Input/output error"))
    od, _ = await OnDiskSpool.open(tmp_path, sync="syncfs", on_step=faults)
    with anyio.fail_after(30):
        results = await add_many(od, 20)
    assert len(results) == 20
    for r in results:
        assert isinstance(r, StoreError)
        assert r.errno == errno.EIO
    assert set(spool_files(tmp_path)) == set()  # nothing of any job is left
    faults.clear()
    with anyio.fail_after(30):
        assert all(isinstance(r, str) for r in await add_many(od, 5))
    await od.close()
