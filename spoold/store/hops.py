"""Worker-thread hops: the one way a store's blocking calls leave the event loop.

:class:`WorkerHops` runs a blocking call in one of the store's own worker
threads (:meth:`~WorkerHops.run`), or with the other short calls asked for
at the same moment in one shared hop (:meth:`~WorkerHops.run_grouped`, on
:class:`~spoold.store.batching.Batches`). The threads live as long as the
store (up to ``max_threads`` of them; one idle for 10 s ends), take calls
from one queue and answer on the caller's loop (``call_soon_threadsafe``):
a hop costs a queue put and a loop wake-up, with none of the limiter,
cancel scope and task lookups of ``anyio.to_thread.run_sync`` (about a
tenth of the owner's event-loop time when they were used). A call made
in a scope already cancelled is never queued (as with ``run_sync``); a
call whose caller is cancelled before a thread takes it is dropped and
never runs; once running, its caller waits for it to end (shielded), then
gets the cancellation, not the call's result or error (``run_sync``
returned the result and left the cancellation to the next checkpoint): a
caller that must know whether the call took effect has the call record it
(see :meth:`spoold.history.History.flush`). Every
:class:`OSError` leaves as a :class:`~spoold.errors.StoreError` naming the
store; a :class:`~spoold.errors.StoreError` leaves as it is. Once closed
(:meth:`~WorkerHops.drain`) it takes no new call and waits for those under
way, so the store may close the descriptors they use; then
:meth:`~WorkerHops.stop_sync` ends the threads.

Each blocking operation of the store is written once, as a method that
runs in the worker thread; its async twin is derived from it:

    def _read_sync(self, queue: str, name: str) -> StoredRecord: ...
    read = one_hop(_read_sync)

:func:`one_hop` gives it a hop of its own, :func:`grouped_hop` a share of a
grouped one. The twin takes the same arguments, checked by the type
checker (a ``ParamSpec``), and carries the blocking method's docstring.

A call running in a store thread cannot use ``anyio.from_thread.run`` (these
are not anyio's worker threads: it raises); to reach the loop from one, use
``asyncio.run_coroutine_threadsafe`` (or ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, TypeVarTuple

import anyio
import anyio.lowlevel

from spoold.errors import StoreError
from spoold.store.batching import Batches

__all__ = ["WorkerHops", "one_hop", "grouped_hop"]

_T = TypeVar("_T")
_R = TypeVar("_R")
_P = ParamSpec("_P")
_Ts = TypeVarTuple("_Ts")

_IDLE_SECONDS = 10.0  # a worker thread with nothing to do this long ends


@dataclass(eq=False, slots=True)
class _Call:
    """One short call waiting for a grouped hop (:meth:`WorkerHops.run_grouped`)."""

    fn: Callable[..., object]
    args: tuple[object, ...]
    result: object = None
    error: BaseException | None = None
    done: bool = False


@dataclass(eq=False, slots=True)
class _Job:
    """One call handed to a worker thread (:class:`_Threads`)."""

    fn: Callable[..., object]
    args: tuple[object, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]  # answered on the loop (replaced once its caller is cancelled)
    # Taken (popped) by whoever comes first: the thread, to run the call, or
    # its cancelled caller, to drop it. list.pop is atomic, so exactly one wins.
    token: list[bool] = field(default_factory=lambda: [True])
    result: object = None
    error: BaseException | None = None
    answered: bool = False


class _Threads:
    """Long-lived worker threads fed by one queue, up to ``limit`` at once.

    A call is put on the queue (a thread is started when every running one
    may be busy) and answered on the caller's loop with
    ``call_soon_threadsafe``: one wake-up each way, with no per-call
    limiter, cancel scope or task-local lookups. A thread that
    finds nothing to do for :data:`_IDLE_SECONDS` ends; :meth:`stop` ends
    them all."""

    def __init__(self, limit: int, name: str) -> None:
        self._limit = limit
        self._name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # the queue's puts and the thread count, together
        self._threads: list[threading.Thread] = []
        self.unanswered = 0  # calls given and not answered yet (touched on the loop only)
        self._idle_waiters: list[asyncio.Future[None]] = []  # one per idle() caller

    async def call(self, fn: Callable[..., _T], args: tuple[object, ...]) -> _T:
        """``fn(*args)`` in a worker thread. Cancelled before a thread takes
        it (or already cancelled when called), the call is dropped and never
        runs; once it runs, the caller waits for it to end (shielded), then
        the cancellation goes on (its result or error is lost)."""
        await anyio.lowlevel.checkpoint_if_cancelled()  # cancelled already: never queued
        loop = asyncio.get_running_loop()
        job = _Job(fn, args, loop, loop.create_future())
        self.unanswered += 1
        with self._lock:
            self._queue.put(job)
            if self.unanswered > len(self._threads) < self._limit:
                thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._threads.append(thread)
                try:
                    thread.start()
                except RuntimeError:  # no thread to be had: the running ones take it
                    self._threads.remove(thread)
                    if not self._threads and job.token:
                        job.token.clear()  # nobody to run it: never runs
                        self._answered()
                        raise
        try:
            try:
                return await job.future  # type: ignore[no-any-return]
            except asyncio.CancelledError:
                if not job.answered:
                    try:
                        job.token.pop()
                    except IndexError:  # running or ran: wait for it to end
                        while not job.answered:
                            job.future = loop.create_future()
                            try:
                                with anyio.CancelScope(shield=True):
                                    await job.future
                            except asyncio.CancelledError:
                                continue
                    else:  # dropped: no thread will run it
                        self._answered()
                raise
        finally:
            # A failed call leaves no cycle (this frame, the job, its future,
            # the error, its traceback, this frame) to hold its arguments,
            # a message body perhaps, until a full garbage collection.
            del job

    def _work(self) -> None:
        get = self._queue.get
        while True:
            try:
                job = get(timeout=_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():  # else a call came meanwhile: take it
                        self._threads.remove(threading.current_thread())
                        return
                continue
            if job is None:  # stop
                return
            try:
                job.token.pop()
            except IndexError:  # its caller was cancelled before: dropped
                continue
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:  # noqa: BLE001 (given to its caller)
                job.error = exc
            # RuntimeError: the loop is closed, nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                job.loop.call_soon_threadsafe(self._answer, job)
            del job  # an idle thread holds no call's arguments

    def _answer(self, job: _Job) -> None:
        """On the loop: hand ``job``'s outcome to its caller."""
        job.answered = True
        fut = job.future
        if not fut.done():
            if job.error is None:
                fut.set_result(job.result)
            elif isinstance(job.error, StopIteration):  # a future cannot carry it
                fut.set_exception(RuntimeError(f"{job.fn!r} raised StopIteration"))
            else:
                fut.set_exception(job.error)
        job.error = None  # no cycle through the traceback
        self._answered()

    def _answered(self) -> None:
        self.unanswered -= 1
        if self.unanswered == 0 and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():  # else its caller was cancelled
                    waiter.set_result(None)

    async def idle(self) -> None:
        """Return once every call given is answered (shielded from anyio
        scopes; a raw ``task.cancel()`` cancels only this caller's wait)."""
        while self.unanswered:
            waiter = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            with anyio.CancelScope(shield=True):
                await waiter

    def stop(self) -> None:
        """End every thread once it is done with what it runs (blocking:
        joins them)."""
        with self._lock:
            threads = list(self._threads)
            for _ in threads:
                self._queue.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()


class WorkerHops:
    """The worker threads of one store. ``root`` names the store in errors."""

    def __init__(self, root: Path, max_threads: int) -> None:
        self._root = root
        self._threads = _Threads(max_threads, f"spoold-store {root.name}")
        self.closed = False
        self._grouped = Batches[_Call](lambda group: self.run(self._run_calls_sync, group))

    async def run(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        """``fn(*args)`` in a worker thread, in a hop of its own."""
        if self.closed:
            raise StoreError(f"store {self._root} is closed")
        try:
            return await self._threads.call(fn, args)
        except StoreError:
            raise
        except OSError as exc:  # every filesystem error leaves as a StoreError
            raise self.os_error(exc) from exc

    def os_error(self, exc: OSError) -> StoreError:
        return StoreError(exc.errno, f"{self._root}: {exc.strerror}", exc.filename)

    async def run_grouped(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run ``fn(*args)``, a short blocking call (a rename, a few
        unlinks, opening a file), in a worker thread, in one hop with the
        others asked for meanwhile.

        Under load many attempts start and end at the same moment, and a
        hop each (waking a thread, then handing the GIL back and forth) costs
        the event loop more than the calls themselves. The first caller that
        finds no group under way runs every call waiting (its own included)
        in one hop, in order; the others wait for that group or the next.
        Alone, a call gets a hop of its own at once, as with a plain hop.
        Cancelled while still waiting, a call is dropped and never runs;
        once its group runs, the caller waits for it (as for any hop).
        Each call gets its own result or exception (an OSError as a
        StoreError)."""
        if self.closed:
            raise StoreError(f"store {self._root} is closed")
        call = _Call(fn, args)
        await self._grouped.submit(call)
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _run_calls_sync(self, group: Sequence[_Call]) -> None:
        for call in group:
            try:
                call.result = call.fn(*call.args)
            except StoreError as exc:
                call.error = exc
            except OSError as exc:
                call.error = self.os_error(exc)
            except Exception as exc:  # noqa: BLE001 (given to its own caller)
                call.error = exc
            call.done = True

    async def drain(self) -> None:
        """Take no new call, and wait for those under way."""
        self.closed = True
        await self._threads.idle()

    def stop_sync(self) -> None:
        """(Blocking, once drained) end the worker threads and join them."""
        self.closed = True
        self._threads.stop()


class _HasHops(Protocol):
    """An object whose blocking methods run in :class:`WorkerHops`."""

    @property
    def _hops(self) -> WorkerHops: ...


_O = TypeVar("_O", bound=_HasHops)


def one_hop(
    blocking: Callable[Concatenate[_O, _P], _R],
) -> Callable[Concatenate[_O, _P], Coroutine[Any, Any, _R]]:
    """The async twin of the blocking method ``blocking``: the same call,
    run in a worker-thread hop of its own (:meth:`WorkerHops.run`)."""

    async def twin(self: _O, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return await self._hops.run(functools.partial(blocking, self, *args, **kwargs))

    _name(twin, blocking)
    return twin


def grouped_hop(
    blocking: Callable[Concatenate[_O, _P], _R],
) -> Callable[Concatenate[_O, _P], Coroutine[Any, Any, _R]]:
    """The async twin of the short blocking method ``blocking``: the same
    call, run in a hop shared with the others asked for at the same moment
    (:meth:`WorkerHops.run_grouped`)."""

    async def twin(self: _O, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return await self._hops.run_grouped(functools.partial(blocking, self, *args, **kwargs))

    _name(twin, blocking)
    return twin


def _name(twin: Callable[..., object], blocking: Callable[..., object]) -> None:
    """Give ``twin`` the docstring of ``blocking`` and its name without the
    ``_`` and ``_sync`` (``_read_sync`` -> ``read``)."""
    functools.update_wrapper(twin, blocking)
    name = blocking.__name__.removeprefix("_").removesuffix("_sync")
    twin.__name__ = name
    twin.__qualname__ = f"{blocking.__qualname__.rpartition('.')[0]}.{name}".lstrip(".")
