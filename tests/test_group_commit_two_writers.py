"""Group commit with two writer threads (``spoold.store.sharing``): the new
files of a large batch are written by the hop's thread and the store's
second writer at once. Each job is written by one of them, exactly once; a
job that fails in either is undone alone; a second writer that cannot
start costs nothing but the speed.

Tests hold a job in one thread (a step hook waiting on an event) until
the other thread has reached a step of its own: no timing is guessed."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import spoold.store.commit
from spoold.errors import StoreError
from spoold.store import NewEntry, Store
from spoold.store.commit import SHARED_FROM
from spoold.store.sharing import SecondWriter, Shares
from tests.support import WAIT_TIMEOUT, enqueue_each_at_once, records_in, spool_files

QUEUES = ["active", "frozen"]
ADDS = 16  # calls made at once: one batch, well above SHARED_FROM
assert ADDS >= SHARED_FROM


@pytest.fixture(autouse=True)
def large_batches_always_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about two threads writing one batch: they share it
    whatever the filesystem (the store's measure of how slow files are to
    create is tested on its own, below: ``measured``)."""
    monkeypatch.setattr(spoold.store.commit, "SLOW_ENTRY_SECONDS", 0.0)


def entry(n: int) -> NewEntry:
    return NewEntry(
        "active",
        f"body {n}\r\n".encode(),
        lambda name, names: f"record {n} of {name}".encode(),
    )


def second_writer() -> bool:
    return threading.current_thread().name.startswith("spoold-store-writer")


class BothWriters:
    """A step hook: the first job to reach ``write_body`` waits there until
    the other thread reaches it too, so both threads surely write (or the
    wait times out: one thread did everything). ``then`` sees every step
    after that."""

    def __init__(self, then: Callable[[str], None] = lambda step: None) -> None:
        self.threads: set[str] = set()
        self.met = threading.Event()
        self._first: str | None = None
        self._then = then
        self._lock = threading.Lock()

    def __call__(self, step: str) -> None:
        if step == "write_body":
            me = threading.current_thread().name
            with self._lock:
                self.threads.add(me)
                first = self._first is None
                if first:
                    self._first = me
                elif me != self._first:
                    self.met.set()
            if first:
                self.met.wait(WAIT_TIMEOUT)
        self._then(step)


class Hook:
    """The store's step hook, passed on to ``to`` (which a test may change)."""

    def __init__(self, to: Callable[[str], None]) -> None:
        self.to = to

    def __call__(self, step: str) -> None:
        self.to(step)


async def enqueue_at_once(store: Store, count: int) -> list[list[str] | BaseException]:
    """``count`` enqueue calls of one entry each, made at once (one batch)."""
    return await enqueue_each_at_once(store, [entry(n) for n in range(count)], WAIT_TIMEOUT * 2)


def tmp_leftovers(root: Path) -> list[str]:
    return [n for n in os.listdir(root / "tmp") if not n.startswith("pool.")]


async def test_a_large_batch_is_written_by_two_threads_and_all_of_it_committed(
    tmp_path: Path,
) -> None:
    hook = BothWriters()
    store, _ = await Store.open(tmp_path, QUEUES, sync="syncfs", on_step=hook)
    async with store:
        results = await enqueue_at_once(store, ADDS)
        assert hook.met.is_set()
        assert len(hook.threads) == 2
        names = [r[0] for r in results if isinstance(r, list)]
        assert len(names) == ADDS
        assert records_in(tmp_path, "active") == set(names)
        files = spool_files(tmp_path)
        for n, r in enumerate(results):
            assert isinstance(r, list)
            assert files[f"active/{r[0]}"] == f"record {n} of {r[0]}".encode()
            assert files[f"data/{r[0]}"] == f"body {n}\r\n".encode()
        assert tmp_leftovers(tmp_path) == []
        assert await store.check(max_age=0) == []


async def test_a_job_failing_in_the_second_writer_fails_alone(tmp_path: Path) -> None:
    failed: list[str] = []

    def fail_one_in_the_second_writer(step: str) -> None:
        if step == "write_record" and second_writer() and not failed:
            failed.append(threading.current_thread().name)
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    hook = Hook(BothWriters(then=fail_one_in_the_second_writer))
    store, _ = await Store.open(tmp_path, QUEUES, sync="syncfs", on_step=hook)
    async with store:
        results = await enqueue_at_once(store, ADDS)
        errors = [r for r in results if isinstance(r, BaseException)]
        names = [r[0] for r in results if isinstance(r, list)]
        assert len(failed) == 1
        assert len(errors) == 1
        assert isinstance(errors[0], StoreError)
        assert errors[0].errno == errno.EIO
        # The others, of both threads, are committed; nothing of the failed one stays.
        assert len(names) == ADDS - 1
        assert records_in(tmp_path, "active") == set(names)
        assert sorted(os.listdir(tmp_path / "data")) == sorted(names)
        assert tmp_leftovers(tmp_path) == []
        assert await store.check(max_age=0) == []
        # The second writer serves the next batch as before.
        meeting = hook.to = BothWriters()
        again = await enqueue_at_once(store, ADDS)
        assert all(isinstance(r, list) for r in again)
        assert len(meeting.threads) == 2


async def test_commits_go_on_when_the_second_writer_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused: list[str] = []
    start = threading.Thread.start

    def no_second_writer(thread: threading.Thread) -> None:
        if thread.name.startswith("spoold-store-writer"):
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        start(thread)

    writers: set[str] = set()

    def note(step: str) -> None:
        if step == "write_body":
            writers.add(threading.current_thread().name)

    hook = Hook(note)
    store, _ = await Store.open(tmp_path, QUEUES, sync="syncfs", on_step=hook)
    async with store:
        monkeypatch.setattr(threading.Thread, "start", no_second_writer)
        first = await enqueue_at_once(store, ADDS)
        assert refused  # it was tried
        assert all(isinstance(r, list) for r in first)
        assert len(writers) == 1  # the hop's thread wrote every job
        # Once threads start again, the next large batch gets its second
        # writer, and no job of the first batch is written again.
        monkeypatch.undo()
        meeting = hook.to = BothWriters()
        second = await enqueue_at_once(store, ADDS)
        assert all(isinstance(r, list) for r in second)
        assert len(meeting.threads) == 2
        names = {r[0] for r in first + second if isinstance(r, list)}
        assert len(names) == 2 * ADDS
        assert records_in(tmp_path, "active") == names
        assert sorted(os.listdir(tmp_path / "data")) == sorted(names)
        assert tmp_leftovers(tmp_path) == []
        assert await store.check(max_age=0) == []


# ------------------------------------------------------------ Shares alone


def test_each_job_is_written_once_by_whichever_thread_takes_it() -> None:
    written: list[tuple[int, str]] = []
    gate = threading.Barrier(2, timeout=WAIT_TIMEOUT)

    def run(job: int) -> None:
        if job == 0:
            gate.wait()  # the other thread has taken a job meanwhile
        elif job == 1:
            gate.wait()
        written.append((job, threading.current_thread().name))

    shares = Shares(list(range(50)), run, lambda job, exc: None)
    writer = SecondWriter("spoold-store-writer test")
    try:
        assert writer.hand(shares)
        shares.take_all()
        shares.wait()
    finally:
        writer.close_sync()
    assert sorted(job for job, _ in written) == list(range(50))
    assert len({thread for _, thread in written}) == 2


def test_shares_run_after_their_batch_write_nothing() -> None:
    written: list[int] = []
    shares = Shares([1, 2, 3], written.append, lambda job, exc: None)
    shares.take_all()
    shares.wait()
    writer = SecondWriter("spoold-store-writer test")
    try:
        assert writer.hand(shares)  # late: its batch is over
    finally:
        writer.close_sync()  # after the shares it holds
    assert written == [1, 2, 3]


def test_an_error_escaping_a_job_is_that_jobs_alone() -> None:
    written: list[int] = []
    failures: list[tuple[int, BaseException]] = []
    boom = KeyboardInterrupt()

    def run(job: int) -> None:
        if job == 2:
            raise boom
        written.append(job)

    shares = Shares([1, 2, 3], run, lambda job, exc: failures.append((job, exc)))
    shares.take_all()
    shares.wait()
    assert written == [1, 3]
    assert failures == [(2, boom)]


def test_a_closed_second_writer_takes_nothing() -> None:
    writer = SecondWriter("spoold-store-writer test")
    writer.close_sync()
    assert not writer.hand(Shares([1], lambda job: None, lambda job, exc: None))


async def test_a_batch_the_pool_has_files_for_is_written_by_one_thread(tmp_path: Path) -> None:
    """The second thread is there to create files; writing over files of
    the pool (removed entries) is quick, and one thread does it."""
    writers: set[str] = set()

    def note(step: str) -> None:
        if step == "write_body":
            writers.add(threading.current_thread().name)

    store, _ = await Store.open(tmp_path, QUEUES, sync="syncfs")
    async with store:
        for r in await enqueue_at_once(store, ADDS):
            assert isinstance(r, list)
            await store.delete("active", r[0])  # into the pool
    hook = Hook(lambda step: None)
    store, _ = await Store.open(tmp_path, QUEUES, sync="syncfs", on_step=hook)
    async with store:
        await enqueue_at_once(store, ADDS)  # claims files of the pool, ready after its sync
        hook.to = note
        last = await enqueue_at_once(store, ADDS)
        assert all(isinstance(r, list) for r in last)
        assert len(writers) == 1
        assert tmp_leftovers(tmp_path) == []
        assert await store.check(max_age=0) == []


async def test_the_second_writer_writes_nothing_once_its_batch_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hop's thread leaves take_all early (its failure callback raises,
    # which it is written never to do) while the second writer holds a job.
    # The wait that ends the batch must still be a full barrier: the second
    # writer finishes the job it holds and takes none of those left.
    second_in, release = threading.Event(), threading.Event()
    second_jobs: list[str] = []
    hop_failed: list[str] = []

    def hook(step: str) -> None:
        if step != "write_body":
            return
        if second_writer():
            second_jobs.append(step)
            if len(second_jobs) == 1:
                second_in.set()
                assert release.wait(WAIT_TIMEOUT)
        elif not hop_failed:
            assert second_in.wait(WAIT_TIMEOUT)
            hop_failed.append(threading.current_thread().name)
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    store, _ = await Store.open(tmp_path, QUEUES, sync="syncfs", on_step=hook)
    committer = store._committer
    job_failed = committer._job_failed

    def failed_raising(s: Any, exc: BaseException) -> None:
        job_failed(s, exc)
        if not second_writer():
            raise RuntimeError("a failure callback that raised")

    wait = Shares.wait

    def release_then_wait(shares: Shares[Any]) -> None:
        release.set()  # the second writer goes on from here
        wait(shares)

    monkeypatch.setattr(committer, "_job_failed", failed_raising)
    monkeypatch.setattr(Shares, "wait", release_then_wait)
    async with store:
        results = await enqueue_at_once(store, ADDS)
    # The thread is joined: whatever it would write, it has.
    assert hop_failed
    assert all(isinstance(r, BaseException) for r in results)
    assert len(second_jobs) == 1


def writer_threads(root: Path) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"spoold-store-writer {root}"]


async def test_the_second_writer_thread_ends_when_the_store_closes(tmp_path: Path) -> None:
    hook = BothWriters()
    store, _ = await Store.open(tmp_path, QUEUES, sync="syncfs", on_step=hook)
    async with store:
        results = await enqueue_at_once(store, ADDS)
        assert all(isinstance(r, list) for r in results)
        assert len(hook.threads) == 2
        assert len(writer_threads(tmp_path)) == 1
    assert writer_threads(tmp_path) == []


class FakeClock:
    """The committer's clock: each reading ``step`` seconds past the last."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.now = 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class Batches:
    """A step hook: per group commit, how many jobs it held and whether the
    second writer wrote any of its bodies (a batch ends at its first sync).
    Which calls share a batch is the loop's affair: a round of calls made at
    once may be one batch or, on a busy machine, several."""

    def __init__(self) -> None:
        self.done: list[tuple[int, bool]] = []
        self._jobs = 0
        self._shared = False
        self._lock = threading.Lock()

    def __call__(self, step: str) -> None:
        with self._lock:
            if step == "check_space":
                self._jobs += 1
            elif step == "write_body":
                self._shared |= threading.current_thread().name.startswith("spoold-store-writer")
            elif step == "sync_data":
                self.done.append((self._jobs, self._shared))
                self._jobs, self._shared = 0, False

    def large(self) -> list[bool]:
        """Whether each batch large enough to share (one entry a job) was."""
        return [shared for jobs, shared in self.done if jobs >= SHARED_FROM]


async def large_batches_shared(
    tmp_path: Path,
    rounds: int,
    on_step: Callable[[str], None],
    batches: Batches,
    prepare: Callable[[Store], None] = lambda store: None,
) -> list[bool]:
    """``rounds`` rounds of ADDS calls made at once on a new store (after
    ``prepare``), every one committed: whether each large batch was shared,
    as ``batches`` (called by ``on_step``) saw them."""
    store, _ = await Store.open(tmp_path, QUEUES, sync="syncfs", on_step=on_step)
    prepare(store)
    async with store:
        for _ in range(rounds):
            results = await enqueue_at_once(store, ADDS)
            assert all(isinstance(r, list) for r in results)
        assert len(records_in(tmp_path, "active")) == rounds * ADDS
    return batches.large()


async def test_a_thread_kept_waiting_while_it_writes_is_not_measured_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What is measured is the writing thread's CPU time: a thread held up
    # (here by a step hook waiting 30 ms an entry; on a busy machine, by its
    # wait for a CPU) is slow by the wall clock only, and a second thread
    # would not make it faster. The threshold is far above any filesystem's
    # CPU time an entry (under 1 ms measured), far below the wait.
    monkeypatch.setattr(spoold.store.commit, "SLOW_ENTRY_SECONDS", 0.02)
    held = threading.Event()  # never set: each wait runs to its timeout
    batches = Batches()

    def hook(step: str) -> None:
        batches(step)
        if step == "write_body":
            held.wait(0.03)

    large = await large_batches_shared(tmp_path, 2, hook, batches)
    assert large, "no batch large enough to be shared was made"
    assert not any(large)


@pytest.mark.parametrize("measured", ["quick", "slow"])
async def test_a_large_batch_is_shared_only_where_one_thread_was_measured_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, measured: str
) -> None:
    # The store's own threshold; its clock is the test's: writing a batch
    # alone reads it twice in a row, so one step is the time of the batch.
    monkeypatch.setattr(spoold.store.commit, "SLOW_ENTRY_SECONDS", 300e-6)
    monkeypatch.setattr(spoold.store.commit, "SHARED_RUN", 2)
    batches = Batches()

    def clock(store: Store) -> None:
        # Slow: 1 s a batch, past the threshold whatever the batch's size;
        # quick: 1 us a batch.
        store._committer._clock = FakeClock(1.0 if measured == "slow" else 1e-6)

    large = await large_batches_shared(tmp_path, 6, batches, batches, clock)
    assert len(large) >= 4
    if measured == "quick":
        assert not any(large)
    else:
        # Alone until measured; then shared, with never more than SHARED_RUN
        # shared in a row: the next is written alone, to measure anew.
        assert large[0] is False
        assert any(large)
        runs = "".join("s" if shared else "-" for shared in large).split("-")
        assert max(len(run) for run in runs) <= 2
