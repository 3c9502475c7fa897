"""Worker-thread hops: the one way a store's blocking calls leave the event loop.

:class:`WorkerHops` runs a blocking call in a worker thread behind a
:class:`anyio.CapacityLimiter` (:meth:`~WorkerHops.run`), or with the other
short calls asked for at the same moment in one shared hop
(:meth:`~WorkerHops.run_grouped`, on :class:`~spoold.store.batching.Batches`).
Every :class:`OSError` leaves as a :class:`~spoold.errors.StoreError` naming
the store; a :class:`~spoold.errors.StoreError` leaves as it is. Once closed
(:meth:`~WorkerHops.drain`) it takes no new call and waits for those under
way, so the store may close the descriptors they use.

Each blocking operation of the store is written once, as a method that
runs in the worker thread; its async twin is derived from it:

    def _read_sync(self, queue: str, name: str) -> StoredRecord: ...
    read = one_hop(_read_sync)

:func:`one_hop` gives it a hop of its own, :func:`grouped_hop` a share of a
grouped one. The twin takes the same arguments, checked by the type
checker (a ``ParamSpec``), and carries the blocking method's docstring.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, TypeVarTuple

import anyio

from spoold.errors import StoreError
from spoold.store.batching import Batches

__all__ = ["WorkerHops", "one_hop", "grouped_hop"]

_T = TypeVar("_T")
_R = TypeVar("_R")
_P = ParamSpec("_P")
_Ts = TypeVarTuple("_Ts")


@dataclass(eq=False, slots=True)
class _Call:
    """One short call waiting for a grouped hop (:meth:`WorkerHops.run_grouped`)."""

    fn: Callable[..., object]
    args: tuple[object, ...]
    result: object = None
    error: BaseException | None = None
    done: bool = False


class WorkerHops:
    """The worker threads of one store. ``root`` names the store in errors."""

    def __init__(self, root: Path, max_threads: int) -> None:
        self._root = root
        self._limiter = anyio.CapacityLimiter(max_threads)
        self.closed = False
        self._inflight = 0  # calls running in worker threads
        self._drained = anyio.Event()
        self._grouped = Batches[_Call](lambda group: self.run(self._run_calls_sync, group))

    async def run(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        """``fn(*args)`` in a worker thread, in a hop of its own."""
        if self.closed:
            raise StoreError(f"store {self._root} is closed")
        self._inflight += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except StoreError:
            raise
        except OSError as exc:  # every filesystem error leaves as a StoreError
            raise self.os_error(exc) from exc
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._drained.set()
                self._drained = anyio.Event()

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
        if self._inflight:
            with anyio.CancelScope(shield=True):
                await self._drained.wait()


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
