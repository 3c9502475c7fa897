"""The store's worker threads (``spoold.store.hops``): a call runs in one of
the store's own threads and answers on the caller's loop; a caller
cancelled before a thread takes its call drops it, one cancelled while it
runs waits for it; the threads end when the store closes, on asyncio's loop
and on uvloop's."""

from __future__ import annotations

import asyncio
import errno
import gc
import importlib.util
import threading
import weakref
from pathlib import Path

import anyio
import pytest

from spoold.errors import StoreError
from spoold.store import Store
from spoold.store.hops import WorkerHops
from tests.support import WAIT_TIMEOUT

QUEUES = ["active", "frozen"]


class Blocker:
    """A call that holds its worker thread until released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = False

    def __call__(self) -> str:
        self.started.set()
        if not self.release.wait(WAIT_TIMEOUT):
            raise TimeoutError("never released")
        self.finished = True
        return "blocker"


def store_threads(root: Path) -> list[threading.Thread]:
    """The live worker threads of the store at ``root`` (named after it)."""
    return [t for t in threading.enumerate() if t.name == f"spoold-store {root.name}"]


async def test_a_call_runs_in_a_store_thread_and_errors_name_the_store(tmp_path: Path) -> None:
    hops = WorkerHops(tmp_path, 2)

    def fails() -> None:
        raise OSError(errno.EIO, "I/O error", "/spool/where")

    assert await hops.run(threading.current_thread) in store_threads(tmp_path)
    with pytest.raises(StoreError, match=str(tmp_path)) as caught:
        await hops.run(fails)
    assert (caught.value.errno, caught.value.filename) == (errno.EIO, "/spool/where")
    with pytest.raises(ValueError, match="bug"):
        await hops.run(_raise, ValueError("bug"))
    await hops.drain()
    hops.stop_sync()
    assert store_threads(tmp_path) == []


def _raise(exc: BaseException) -> None:
    raise exc


async def test_a_caller_cancelled_while_its_call_runs_waits_for_it(tmp_path: Path) -> None:
    hops = WorkerHops(tmp_path, 2)
    blocker = Blocker()
    left = anyio.Event()
    with anyio.fail_after(WAIT_TIMEOUT):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def caller() -> None:
                with scope:
                    await hops.run(blocker)
                left.set()

            tg.start_soon(caller)
            await anyio.to_thread.run_sync(blocker.started.wait)
            scope.cancel()
            await anyio.wait_all_tasks_blocked()
            assert not left.is_set()  # still waiting for the call under way
            blocker.release.set()
        assert left.is_set() and blocker.finished and scope.cancelled_caught
        await hops.drain()
    hops.stop_sync()


async def test_a_call_cancelled_before_a_thread_takes_it_never_runs(tmp_path: Path) -> None:
    hops = WorkerHops(tmp_path, 1)  # one thread: the second call waits for it
    blocker = Blocker()
    ran: list[str] = []
    with anyio.fail_after(WAIT_TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hops.run, blocker)
            await anyio.to_thread.run_sync(blocker.started.wait)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await hops.run(ran.append, "cancelled")
            tg.start_soon(hops.run, ran.append, "kept")
            await anyio.wait_all_tasks_blocked()
            blocker.release.set()
        await hops.drain()
    hops.stop_sync()
    assert ran == ["kept"]


async def test_drain_waits_for_the_calls_under_way_and_refuses_new_ones(tmp_path: Path) -> None:
    hops = WorkerHops(tmp_path, 2)
    blocker = Blocker()
    with anyio.fail_after(WAIT_TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hops.run, blocker)
            await anyio.to_thread.run_sync(blocker.started.wait)
            tg.start_soon(hops.drain)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(StoreError, match="closed"):
                await hops.run(ran_nothing)
            assert not blocker.finished
            blocker.release.set()
        assert blocker.finished
    hops.stop_sync()


def ran_nothing() -> None:
    raise AssertionError("a closed store ran a call")


async def exercise_and_close(root: Path) -> None:
    """Open a store, keep several of its threads busy at once, close it."""
    store, _ = await Store.open(root, QUEUES)
    async with store, anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(store.list_queue, "active")
            tg.start_soon(store.run_grouped, threading.current_thread)


async def test_the_threads_end_when_the_store_closes(tmp_path: Path) -> None:
    for n in range(10):
        await exercise_and_close(tmp_path / f"spool{n}")
        assert store_threads(tmp_path / f"spool{n}") == []


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop not installed")
def test_hops_on_uvloop(tmp_path: Path) -> None:
    async def main() -> None:
        await test_a_caller_cancelled_while_its_call_runs_waits_for_it(tmp_path)
        await test_a_call_cancelled_before_a_thread_takes_it_never_runs(tmp_path)
        await exercise_and_close(tmp_path / "spool")

    anyio.run(main, backend_options={"use_uvloop": True})
    assert store_threads(tmp_path) == store_threads(tmp_path / "spool") == []


async def test_a_call_made_in_a_cancelled_scope_never_runs(tmp_path: Path) -> None:
    hops = WorkerHops(tmp_path, 2)
    ran: list[str] = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        await hops.run(ran.append, "run")
    assert scope.cancelled_caught
    with anyio.CancelScope() as scope:
        scope.cancel()
        await hops.run_grouped(ran.append, "grouped")
    assert scope.cancelled_caught
    with anyio.move_on_after(0) as scope:
        await hops.run(ran.append, "deadline passed")
    assert scope.cancelled_caught
    await hops.drain()
    hops.stop_sync()
    assert ran == []


async def test_a_drain_after_a_cancelled_one_still_waits(tmp_path: Path) -> None:
    hops = WorkerHops(tmp_path, 1)
    blocker = Blocker()
    with anyio.fail_after(WAIT_TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hops.run, blocker)
            await anyio.to_thread.run_sync(blocker.started.wait)
            first = asyncio.ensure_future(hops.drain())
            await anyio.wait_all_tasks_blocked()
            first.cancel()  # a plain asyncio cancel, as asyncio.wait_for gives
            with pytest.raises(asyncio.CancelledError):
                await first
            second = asyncio.ensure_future(hops.drain())
            await anyio.wait_all_tasks_blocked()
            assert not second.done()  # the call is still under way
            blocker.release.set()
            await second
            assert blocker.finished
    hops.stop_sync()


class _Arguments:
    """What a call is given (a message body, say), weakly referable."""


async def test_a_failed_call_frees_its_arguments_without_waiting_for_the_collector(
    tmp_path: Path,
) -> None:
    # A refused write (a full disk) must not leave a reference cycle that
    # holds the message until the next full garbage collection: a worker
    # refusing many large messages would pile them up in memory.
    hops = WorkerHops(tmp_path, 2)

    def refuse(_: _Arguments) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    arguments = _Arguments()
    gone = weakref.ref(arguments)
    gc.disable()
    try:
        try:  # not pytest.raises, which would keep the error, and so the call
            await hops.run(refuse, arguments)
        except StoreError:
            pass
        else:
            pytest.fail("the call did not fail")
        await hops.drain()
        hops.stop_sync()  # its threads are gone: only a cycle could hold them now
        await asyncio.sleep(0)  # the loop's callbacks holding the answered future run
        del arguments
        assert gone() is None
    finally:
        gc.enable()
