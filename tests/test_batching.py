"""Batches: jobs asked for together share one run; a cancelled caller's
cancellation never reaches the other callers of its batch."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import anyio
import pytest

from spoold.store.batching import Batches
from tests.support import WAIT_TIMEOUT


@dataclass(eq=False)
class Job:
    name: str
    error: BaseException | None = None
    done: bool = False


class Runner:
    """A batch run that waits at a gate before doing its jobs, so a test can
    cancel the runner's caller while its batch is under way."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.started = anyio.Event()
        self.batches: list[list[str]] = []
        self.done: list[str] = []
        self.task: asyncio.Task[object] | None = None  # the caller running the last batch

    async def run(self, batch: list[Job]) -> None:
        self.task = asyncio.current_task()
        self.batches.append([job.name for job in batch])
        self.started.set()
        await self.gate.wait()
        for job in batch:
            self.done.append(job.name)
            job.done = True


class TwoCallers:
    """Callers "one" and "two", each submitting its own job from a task
    under a cancel scope of its own, through the same Batches."""

    def __init__(self, runner: Runner) -> None:
        self.batches = Batches[Job](runner.run)
        self.jobs = {name: Job(name) for name in ("one", "two")}
        self.scopes = {name: anyio.CancelScope() for name in self.jobs}
        self.tasks: dict[asyncio.Task[object] | None, str] = {}
        self.left = {name: anyio.Event() for name in self.jobs}
        self.errors: dict[str, BaseException | None] = {}  # of the callers that returned

    async def submit(self, name: str) -> None:
        self.tasks[asyncio.current_task()] = name
        with self.scopes[name]:
            try:
                await self.batches.submit(self.jobs[name])
                self.errors[name] = self.jobs[name].error
            finally:
                self.left[name].set()

    def running_and_other(self, runner: Runner) -> tuple[str, str]:
        """The caller running the batch now, and the other one."""
        running = self.tasks[runner.task]
        return running, "two" if running == "one" else "one"


async def test_jobs_submitted_together_share_one_run() -> None:
    runner = Runner()
    runner.gate.set()
    batches = Batches[Job](runner.run)
    jobs = [Job(str(i)) for i in range(5)]
    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(batches.submit, job)
    assert runner.batches == [["0", "1", "2", "3", "4"]]
    assert all(job.done and job.error is None for job in jobs)


async def test_a_cancelled_runner_hands_the_other_jobs_to_the_next_batch() -> None:
    runner = Runner()
    callers = TwoCallers(runner)
    async with anyio.create_task_group() as tg:
        tg.start_soon(callers.submit, "one")
        tg.start_soon(callers.submit, "two")
        # One of the two callers runs the batch of both jobs, which waits
        # at the gate: cancel that caller only.
        await runner.started.wait()
        assert sorted(runner.batches[0]) == ["one", "two"]
        cancelled, other = callers.running_and_other(runner)
        callers.scopes[cancelled].cancel()
        await callers.left[cancelled].wait()
        # The other job was not done by the cancelled run: its own caller
        # runs it in the next batch, and sees no cancellation.
        runner.gate.set()

    assert callers.scopes[cancelled].cancelled_caught
    assert not callers.jobs[cancelled].done
    assert callers.errors == {other: None}
    assert callers.jobs[other].done
    assert runner.batches[1:] == [[other]]
    assert runner.done == [other]


async def test_a_failed_run_fails_every_job_of_its_batch() -> None:
    async def broken(batch: list[Job]) -> None:
        raise OSError("disk gone")

    batches = Batches[Job](broken)
    jobs = [Job("a"), Job("b")]
    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(batches.submit, job)
    for job in jobs:
        assert job.done
        assert isinstance(job.error, OSError)


@pytest.mark.parametrize("count", [1, 3])
async def test_a_job_cancelled_while_waiting_never_runs(count: int) -> None:
    runner = Runner()
    batches = Batches[Job](runner.run)
    busy = Job("busy")
    waiting = [Job(f"w{i}") for i in range(count)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(batches.submit, busy)
        await runner.started.wait()
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as inner:
                for job in waiting:
                    inner.start_soon(batches.submit, job)
                await anyio.sleep(0)
                scope.cancel()
        runner.gate.set()
    assert runner.batches == [["busy"]]
    assert not any(job.done for job in waiting)


async def test_a_bystander_cancelled_before_the_runner_leaves_when_its_job_is_handed_back() -> None:
    # Two callers share a batch. The one not running it is cancelled first
    # (it waits, shielded, for its job), then the runner before its run did
    # anything: the job handed back never ran, so its caller leaves too,
    # instead of waiting for a batch nobody will run.
    runner = Runner()
    callers = TwoCallers(runner)
    with anyio.fail_after(WAIT_TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(callers.submit, "one")
            tg.start_soon(callers.submit, "two")
            await runner.started.wait()
            running, bystander = callers.running_and_other(runner)
            callers.scopes[bystander].cancel()
            await anyio.wait_all_tasks_blocked()
            assert not callers.left[bystander].is_set()  # shielded: its job is in the batch
            callers.scopes[running].cancel()
            await callers.left[running].wait()
            await callers.left[bystander].wait()

    assert callers.scopes[running].cancelled_caught
    assert callers.scopes[bystander].cancelled_caught
    assert not any(job.done for job in callers.jobs.values())
    assert len(runner.batches) == 1  # nothing ran again


async def test_a_cancelled_gatherer_leaves_the_batch_to_the_callers_that_joined() -> None:
    # The first caller yields to the loop while jobs join; the others wait
    # for the batch it will run. Cancelled meanwhile, it never runs its job,
    # and one of the others runs the batch instead of all waiting forever.
    runner = Runner()
    runner.gate.set()
    batches = Batches[Job](runner.run)
    first, joined = Job("first"), [Job("b"), Job("c")]
    scope = anyio.CancelScope()

    async def first_caller() -> None:
        with scope:
            await batches.submit(first)

    with anyio.fail_after(WAIT_TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first_caller)
            for job in joined:
                tg.start_soon(batches.submit, job)
            await anyio.sleep(0)  # each has submitted: the first gathers, the others wait
            scope.cancel()

    assert scope.cancelled_caught
    assert not first.done
    assert runner.batches == [["b", "c"]]
    assert all(job.done and job.error is None for job in joined)
