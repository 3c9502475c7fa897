"""Short store calls asked for at the same moment share one worker-thread
hop (``Store.run_grouped``): checkouts, deletes and body opens of a busy
spool. Each caller still gets its own result or error, in order."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from spoold.body import BodyCheck
from spoold.errors import BodyDamagedError, NotFoundError, StoreError
from spoold.relay import BodyHandle, BodyReader
from spoold.store import NewEntry, Store
from tests.support import WAIT_TIMEOUT

QUEUES = ["active", "frozen"]


class Blocker:
    """A call that holds its worker thread until released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> str:
        self.started.set()
        if not self.release.wait(WAIT_TIMEOUT):
            raise TimeoutError("never released")
        return "blocker"


async def pending() -> None:
    """Wait until the calls just made wait for a group: every task blocks."""
    await anyio.wait_all_tasks_blocked()


async def test_calls_made_while_a_group_runs_wait_and_then_run_together(tmp_path: Path) -> None:
    store, _ = await Store.open(tmp_path, QUEUES)
    blocker = Blocker()
    ran: list[tuple[object, int]] = []
    results: dict[object, object] = {}

    def note(key: int) -> int:
        ran.append((key, threading.get_ident()))
        return key * 10

    async def call(key: object, fn: Callable[..., object], *args: object) -> None:
        results[key] = await store.run_grouped(fn, *args)

    with anyio.fail_after(WAIT_TIMEOUT):
        async with store, anyio.create_task_group() as tg:
            tg.start_soon(call, "blocker", blocker)
            await anyio.to_thread.run_sync(blocker.started.wait)
            for key in range(4):
                tg.start_soon(call, key, note, key)
            await pending()
            assert ran == []  # none started beside the running group
            blocker.release.set()

    assert results == {"blocker": "blocker", 0: 0, 1: 10, 2: 20, 3: 30}
    assert [key for key, _thread in ran] == [0, 1, 2, 3]
    assert len({thread for _key, thread in ran}) == 1  # one hop for the four


async def test_each_caller_gets_its_own_error(tmp_path: Path) -> None:
    store, _ = await Store.open(tmp_path, QUEUES)
    blocker = Blocker()
    outcomes: dict[str, object] = {}

    def fails_with_os_error() -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/spool/where")

    def fails_with_value_error() -> None:
        raise ValueError("a bug")

    async def call(key: str, fn: Callable[[], object]) -> None:
        try:
            outcomes[key] = await store.run_grouped(fn)
        except Exception as exc:  # what the test looks at
            outcomes[key] = exc

    with anyio.fail_after(WAIT_TIMEOUT):
        async with store, anyio.create_task_group() as tg:
            tg.start_soon(call, "blocker", blocker)
            await anyio.to_thread.run_sync(blocker.started.wait)
            tg.start_soon(call, "os", fails_with_os_error)
            tg.start_soon(call, "bug", fails_with_value_error)
            tg.start_soon(call, "fine", lambda: "fine")
            await pending()
            blocker.release.set()

    assert outcomes["blocker"] == "blocker"
    assert outcomes["fine"] == "fine"
    os_error = outcomes["os"]
    assert isinstance(os_error, StoreError)
    assert (os_error.errno, os_error.filename) == (errno.EIO, "/spool/where")
    assert isinstance(outcomes["bug"], ValueError)


async def test_a_call_cancelled_before_its_group_runs_never_runs(tmp_path: Path) -> None:
    store, _ = await Store.open(tmp_path, QUEUES)
    blocker = Blocker()
    ran: list[str] = []

    with anyio.fail_after(WAIT_TIMEOUT):
        async with store, anyio.create_task_group() as tg:
            tg.start_soon(store.run_grouped, blocker)
            await anyio.to_thread.run_sync(blocker.started.wait)
            scope = anyio.CancelScope()

            async def cancelled() -> None:
                with scope:
                    await store.run_grouped(lambda: ran.append("cancelled"))

            tg.start_soon(store.run_grouped, lambda: ran.append("kept"))
            tg.start_soon(cancelled)
            await pending()
            scope.cancel()
            await pending()  # the cancelled call has left
            blocker.release.set()

    assert ran == ["kept"]


async def test_a_closed_store_refuses_the_call(tmp_path: Path) -> None:
    store, _ = await Store.open(tmp_path, QUEUES)
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.run_grouped(lambda: None)


@pytest.mark.parametrize(
    ("size", "whole"),
    [(0, True), (100, True), (256 * 1024, True), (256 * 1024 + 1, False)],
)
async def test_a_body_up_to_256_kib_is_read_whole_when_opened(
    tmp_path: Path, size: int, whole: bool
) -> None:
    path = tmp_path / "body"
    data = os.urandom(size)
    path.write_bytes(data)
    store, _ = await Store.open(tmp_path / "spool", QUEUES)
    async with store, BodyHandle(path, store.run_grouped).open() as reader:
        assert isinstance(reader, BodyReader)
        assert reader.holds_file is not whole
        assert (reader.head == data) is whole
        assert b"".join([chunk async for chunk in reader.chunks()]) == data


async def test_checkout_then_runs_its_call_in_the_checkouts_hop(tmp_path: Path) -> None:
    store, _ = await Store.open(tmp_path, QUEUES)
    async with store:
        (name,) = await store.enqueue(
            [NewEntry("active", b"body\r\n", lambda _name, _names: b"record")]
        )
        here: list[Path] = []

        def then() -> str:
            here.append(tmp_path / "active" / ".checkout" / name)
            return "read"

        assert await store.checkout_then("active", name, then) == "read"
        assert [p.exists() for p in here] == [True]  # already checked out when it ran
        with pytest.raises(NotFoundError):  # not in the queue any more: then never runs
            await store.checkout_then("active", name, then)
        assert len(here) == 1


async def test_a_body_read_ahead_is_what_the_first_open_gives_without_a_hop(
    tmp_path: Path,
) -> None:
    data = b"Subject: read ahead\r\n\r\nhello\r\n"
    path = tmp_path / "body"
    path.write_bytes(data)
    check = BodyCheck(len(data), hashlib.sha256(data).hexdigest())

    async def no_hop(*_args: object) -> object:
        raise AssertionError("the body was read again")

    ready = BodyHandle.read_ahead_sync(path, check)
    assert isinstance(ready, BodyReader) and not ready.holds_file
    async with BodyHandle(path, no_hop, check, ready).open() as reader:
        assert reader is ready and reader.head == data
    assert (await BodyHandle(path, no_hop, check, ready).read()).wire == data

    path.write_bytes(data[:-3])  # damaged at rest: raised where the relay opens it
    damaged = BodyHandle.read_ahead_sync(path, check)
    assert isinstance(damaged, BodyDamagedError)
    with pytest.raises(BodyDamagedError):
        async with BodyHandle(path, no_hop, check, damaged).open():
            pass
    path.unlink()  # missing: a StoreError naming the file, as an open would raise
    missing = BodyHandle.read_ahead_sync(path, check)
    assert isinstance(missing, StoreError) and str(path) in str(missing)


def test_a_body_not_known_to_fit_one_read_is_not_read_ahead(tmp_path: Path) -> None:
    path = tmp_path / "body"
    path.write_bytes(b"x" * 10)
    assert BodyHandle.read_ahead_sync(path, None) is None  # no check: size unknown
    big = BodyCheck(256 * 1024 + 1, "0" * 64)
    assert BodyHandle.read_ahead_sync(path, big) is None


async def test_a_checkout_whose_call_fails_returns_the_record_to_its_queue(
    tmp_path: Path,
) -> None:
    store, _ = await Store.open(tmp_path, QUEUES)
    async with store:
        (name,) = await store.enqueue(
            [NewEntry("active", b"body\r\n", lambda _name, _names: b"record")]
        )

        def then() -> str:
            raise ValueError("the read ahead failed")

        with pytest.raises(ValueError, match="read ahead failed"):
            await store.checkout_then("active", name, then)
        assert await store.list_queue("active") == [(name, False)]  # not left checked out
        assert not (tmp_path / "active" / ".checkout" / name).exists()
        assert await store.checkout_then("active", name, lambda: "again") == "again"
