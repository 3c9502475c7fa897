"""Signals: what SIGHUP, SIGTERM and SIGINT ask of a process's main loop.

The handlers only set events (a signal handler never does the work); the
main loop waits on them and acts: a reload, a graceful stop, or, on a
second stop signal, a stop at once. Used by the daemon and by its ingest
worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import anyio

__all__ = ["Signals"]


class Signals:
    """What SIGHUP, SIGTERM and SIGINT ask of the main loop. The handlers
    only set these events; :meth:`installed` puts them in place (on the
    running asyncio loop) for as long as its ``with`` block lasts."""

    def __init__(self) -> None:
        self.reload = anyio.Event()
        self.stop = anyio.Event()
        self.force_stop = anyio.Event()  # a second stop signal

    def on_reload(self) -> None:
        self.reload.set()

    def on_stop(self) -> None:
        if self.stop.is_set():
            self.force_stop.set()
        self.stop.set()

    def take_reload(self) -> None:
        """The main loop acts on the pending reload: the next SIGHUP is new."""
        self.reload = anyio.Event()

    async def requested(self) -> None:
        """Return once a reload or a stop is asked for (at once if one is
        pending)."""
        async with anyio.create_task_group() as tg:

            async def wait_for(event: anyio.Event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(wait_for, self.reload)
            tg.start_soon(wait_for, self.stop)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.on_reload)
        loop.add_signal_handler(signal.SIGTERM, self.on_stop)
        loop.add_signal_handler(signal.SIGINT, self.on_stop)
        try:
            yield
        finally:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
