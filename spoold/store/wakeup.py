"""The wake-up socket: how writers tell the owner about new entries.

The owner binds a Unix datagram socket at ``STORE/wakeup``
(:meth:`Wakeup.receive`); a writer that enqueued entries sends their names
to it (:meth:`Wakeup.try_send`, :meth:`Wakeup.send`), so the owner need not
poll. It is only a trigger: the truth stays on disk, and an owner that
missed a datagram (it was not running, or its queue stayed full) finds the
entries at its next rescan or open. A datagram carries names separated by
spaces; what is not an id is ignored.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Literal

import anyio
import anyio.abc

from spoold.ids import is_valid_id

__all__ = ["Wakeup", "NotifyResult"]

NotifyResult = Literal["sent", "busy", "absent"]

_WAKEUP_DATAGRAM = 8192  # bytes: a few hundred ids a datagram


class Wakeup:
    """The wake-up socket at ``path``: the owner's end and the writers'."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._send_socket: socket.socket | None = None

    @asynccontextmanager
    async def receive(self) -> AsyncIterator[AsyncIterator[list[str]]]:
        """(Owner) bind the socket; yields an iterator of the name batches
        other processes report. A stale socket file is replaced."""
        path = self.path
        with contextlib.suppress(FileNotFoundError):
            await anyio.Path(path).unlink()
        sock = await anyio.create_unix_datagram_socket(local_path=path, local_mode=0o660)

        raw: socket.socket = sock.extra(anyio.abc.SocketAttribute.raw_socket)

        def names_in(packet: bytes) -> list[str]:
            return [n for n in packet.decode("ascii", "replace").split() if is_valid_id(n)]

        async def batches() -> AsyncIterator[list[str]]:
            async for packet, _ in sock:
                names = names_in(packet)
                # Take every datagram already queued too: one batch for all
                # (the queue is short, and writers wait while it is full).
                while True:
                    try:
                        more = raw.recv(_WAKEUP_DATAGRAM)
                    except (BlockingIOError, InterruptedError):
                        break
                    names += names_in(more)
                if names:
                    yield names

        try:
            yield batches()
        finally:
            with anyio.CancelScope(shield=True):
                await sock.aclose()
                with contextlib.suppress(OSError):
                    await anyio.Path(path).unlink()

    def try_send(self, names: Sequence[str]) -> NotifyResult:
        """(Writer) tell the owner about new entries, without waiting: a
        non-blocking send (fit for the event loop). ``"sent"``; ``"busy"``
        when the owner's queue is full (try again shortly: ``names`` not
        sent yet); ``"absent"`` when no owner listens (it will find them
        when it opens the spool). Long lists go in several datagrams."""
        if self._send_socket is None:
            self._send_socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        chunk = _WAKEUP_DATAGRAM // (17 + 1)
        for start in range(0, len(names), chunk):
            payload = " ".join(names[start : start + chunk]).encode("ascii")
            try:
                self._send_socket.sendto(payload, self.path)
            except (BlockingIOError, InterruptedError):
                return "busy"
            except OSError:
                return "absent"
        return "sent"

    async def send(self, names: Sequence[str]) -> bool:
        """(Writer) tell the owner about new entries, waiting up to 2 s while
        its queue is full; False if no owner listens or it stayed busy (it
        will still find them, at its next rescan or open)."""
        pause = 0.005
        for _ in range(9):  # about 2.5 s in all
            result = self.try_send(names)
            if result != "busy":
                return result == "sent"
            await anyio.sleep(pause)
            pause *= 2
        return False

    def close_sync(self) -> None:
        if self._send_socket is not None:
            self._send_socket.close()
            self._send_socket = None
