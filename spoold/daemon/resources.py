"""When the system runs short of descriptors or memory: the daemon serves on.

* :func:`raise_open_files_limit`, called once at start-up, raises the soft
  ``RLIMIT_NOFILE`` to the hard limit when the soft one is lower (every
  connection and open spool file takes a descriptor; systemd's default soft
  limit is 1024). It never calls ``setrlimit`` when there is nothing to
  raise, and a refusal (``EPERM``, e.g. from a seccomp filter) is logged as
  a warning, never raised.
* :class:`AcceptFailures` logs an ``accept()`` that failed for lack of
  resources (``EMFILE``, ``ENFILE``, ``ENOBUFS``, ``ENOMEM``) once per burst
  and per listening socket: one error line when a burst starts, a debug
  line at the 2nd, 4th, 8th, ... failure, one info line with the count
  when it ends. A burst ends at a successful accept ``quiet`` seconds or
  more after its last failure (:meth:`AcceptFailures.recovered`), or after
  ``quiet`` seconds without a failure (:meth:`AcceptFailures.close_quiet`,
  called periodically). A success in the middle (a descriptor came free
  for a moment) does not end it.
* :func:`install_accept_error_handler` routes asyncio's own report of such a
  failure to an :class:`AcceptFailures`. asyncio's servers (Python 3.11)
  survive it: they stop watching the socket for a second, but report each
  failed try (up to 100 per second) to the loop's exception handler, which
  by default logs a traceback every time. Every other report goes to the
  handler that was there before (by default the loop's own).

Nothing here holds a task: the caller owns the loops that retry.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import importlib.util
import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

__all__ = [
    "RESOURCE_ERRNOS",
    "AcceptFailures",
    "accept_forever",
    "install_accept_error_handler",
    "raise_open_files_limit",
]

#: accept() errors that mean "no resources now": retry later, never give up.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# What asyncio's selector event loop says when accept() fails for lack of
# resources (asyncio/selector_events.py, _accept_connection).
_ASYNCIO_ACCEPT_MESSAGE = "socket.accept() out of system resource"

log = structlog.get_logger("spoold.daemon.resources")


def event_loop_options() -> dict[str, Any]:
    """anyio's asyncio options for the daemon's processes: uvloop when it is
    installed (``pip install 'spoold[fast]'``; a quicker event loop),
    asyncio's own loop otherwise. ``SPOOLD_UVLOOP=0`` turns it off."""
    if os.environ.get("SPOOLD_UVLOOP", "1") == "0":
        return {}
    if importlib.util.find_spec("uvloop") is None:
        return {}
    return {"use_uvloop": True}


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raise the soft open-files limit to the hard one. Returns ``(old,
    new)`` when it was raised, None when there was nothing to do or it could
    not be done (then a warning is logged)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError) as exc:
        log.warning("cannot read the open files limit", error=str(exc))
        return None
    infinity = resource.RLIM_INFINITY
    if soft == infinity or hard == infinity or soft >= hard:
        return None  # nothing to raise: no setrlimit call at all
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning(
            "could not raise the open files limit; going on with it",
            soft=soft,
            hard=hard,
            error=str(exc),
        )
        return None
    log.info("raised the open files limit", old=soft, new=hard)
    return soft, hard


@dataclass(slots=True)
class _Burst:
    failures: int
    last: float


class AcceptFailures:
    """Accept failures for lack of resources, logged once per burst (see the
    module docstring). ``where`` names the listening socket in the log."""

    def __init__(self, *, quiet: float = 3.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet = quiet
        self._clock = clock
        self._bursts: dict[str, _Burst] = {}

    def in_burst(self, where: str) -> bool:
        return where in self._bursts

    def failed(self, where: str, exc: OSError) -> None:
        """An accept on ``where`` failed with ``exc`` (one of RESOURCE_ERRNOS)."""
        now = self._clock()
        burst = self._bursts.get(where)
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if burst is None:
            self._bursts[where] = _Burst(1, now)
            log.error(
                _ASYNCIO_ACCEPT_MESSAGE,  # the same words as asyncio's own report
                listener=where,
                errno=code,
                error=exc.strerror or str(exc),
            )
            return
        burst.failures += 1
        burst.last = now
        if burst.failures & (burst.failures - 1):
            return  # a debug line at 2, 4, 8, ... failures: asyncio retries in bursts of 100
        log.debug(
            "socket.accept() still out of system resource",
            listener=where,
            errno=code,
            failures=burst.failures,
        )

    def recovered(self, where: str) -> None:
        """An accept on ``where`` worked: its burst, if any, is over, unless
        it failed less than ``quiet`` seconds ago (a descriptor came free
        for a moment: the shortage goes on, and one burst is one report)."""
        burst = self._bursts.get(where)
        if burst is not None and self._clock() - burst.last >= self.quiet:
            self._end(where)

    def _end(self, where: str) -> None:
        burst = self._bursts.pop(where, None)
        if burst is not None:
            log.info("socket.accept() works again", listener=where, failures=burst.failures)

    def close_quiet(self) -> None:
        """End every burst without a failure for ``quiet`` seconds."""
        now = self._clock()
        for where, burst in list(self._bursts.items()):
            if now - burst.last >= self.quiet:
                self._end(where)


def _listener_name(context: dict[str, Any]) -> str:
    sock = context.get("socket")
    try:
        name = sock.getsockname() if sock is not None else None
    except OSError:
        name = None
    if isinstance(name, tuple) and len(name) >= 2:
        host = str(name[0])
        return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"
    return str(name) if name else "?"


class _Accepted(socket.socket):
    """A connection :func:`accept_forever` took: a :class:`socket.socket`
    whose ``family`` and ``type`` read as the plain numbers the kernel gave
    (equal to the enum members). :class:`socket.socket` makes an enum member
    at each read (about 1.4 us), and ``accept()`` reads the listening
    socket's twice, uvloop's ``connect_accepted_socket`` the new one's three
    times: per connection."""

    __slots__ = ()
    family = _socket.socket.family  # type: ignore[assignment]
    type = _socket.socket.type  # type: ignore[assignment]


_FIRST_PAUSE = 0.1  # seconds after an accept failed for lack of resources
_LONGEST_PAUSE = 1.0


async def accept_forever(
    sock: socket.socket,
    where: str,
    failures: AcceptFailures,
    take: Callable[[socket.socket, Any], None],
) -> None:
    """Accept connections on the non-blocking listening ``sock`` until
    cancelled, handing each to ``take`` with the client's address as
    ``accept()`` gave it (the socket as accepted: whoever serves it makes
    it non-blocking, as the event loop's transports do). An accept that
    fails for lack of resources is counted in ``failures`` and tried again
    after a pause growing from 0.1 s to 1 s, while the connection waits in
    the backlog; any other error is raised. Our own loop, not the event
    loop's server: every event loop then behaves the same (uvloop's libuv
    closes the connections it cannot take, without a word). ``sock`` stays
    watched while this runs (but during a pause): one registration with the
    event loop, not one per wake-up."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    readable: asyncio.Future[None] = loop.create_future()
    # What socket.accept() does, without its two enum reads per connection.
    family, kind, proto = int(sock.family), int(sock.type), sock.proto
    accept: Callable[[], tuple[int, Any]] = sock._accept  # type: ignore[attr-defined]

    def wake() -> None:  # the loop's callback: sock has connections waiting
        if not readable.done():
            readable.set_result(None)

    pause = _FIRST_PAUSE
    loop.add_reader(fd, wake)
    try:
        while True:
            await readable
            readable = loop.create_future()
            while True:  # take every connection that is waiting
                try:
                    new, address = accept()
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionAbortedError:
                    continue  # taken back by the client before we got to it
                except OSError as exc:
                    if exc.errno not in RESOURCE_ERRNOS:
                        raise
                    failures.failed(where, exc)
                    loop.remove_reader(fd)  # not woken for the same connection meanwhile
                    await anyio.sleep(pause)
                    pause = min(pause * 2, _LONGEST_PAUSE)
                    readable.set_result(None)  # try again at once
                    loop.add_reader(fd, wake)
                    break
                conn = _Accepted(family, kind, proto, fileno=new)
                pause = _FIRST_PAUSE
                failures.recovered(where)
                take(conn, address)
    finally:
        loop.remove_reader(fd)


def install_accept_error_handler(
    loop: asyncio.AbstractEventLoop, failures: AcceptFailures
) -> Callable[[], None]:
    """Send asyncio's accept-out-of-resources reports to ``failures``;
    return a function that puts the previous handler back."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (
            context.get("message") == _ASYNCIO_ACCEPT_MESSAGE
            and isinstance(exc, OSError)
            and exc.errno in RESOURCE_ERRNOS
        ):
            failures.failed(_listener_name(context), exc)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)

    def restore() -> None:
        loop.set_exception_handler(previous)

    return restore
