"""A bare SMTP server on :class:`asyncio.Protocol`, for what aiosmtpd hides.

aiosmtpd (:mod:`tests.smtp_server`) is the relay's behavioural peer; this
server exists for the few things it cannot show:

* the boundaries of each read in the command phase (:attr:`reads`), which
  show whether a client wrote MAIL, every RCPT and DATA in one batch;
* replies held back until DATA arrives (``hold_until_data``): a client that
  waits for the MAIL reply before sending RCPT gets nothing, so only a
  pipelining client gets through;
* the exact bytes between the 354 and the end of the final ``.`` line
  (:attr:`WireMessage.wire`), without dot-stuffing undone;
* content that is not kept (``keep_content=False``: only its size and
  SHA-256), so that a memory test measures the client, not the server;
* any reply text, malformed or overlong, per command (``replies``).

It runs in the test's event loop on ``127.0.0.1`` and a free port. Replies
to the commands of one read go out in one write, as a real server does.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = ["Read", "WireMessage", "RawSmtpServer", "StartRawServer", "start_raw_server", "NO_REPLY"]

HOST = "127.0.0.1"
_END = b"\r\n.\r\n"

NO_REPLY = b""
"""A reply that is never sent (the server just keeps reading)."""


@dataclass(frozen=True, slots=True)
class Read:
    """One ``data_received`` in the command phase, on connection ``connection``."""

    connection: int
    data: bytes


@dataclass(frozen=True, slots=True)
class WireMessage:
    """One message as it crossed the wire after 354, final ``.`` line
    included: its size, digest and (when kept) bytes."""

    connection: int
    size: int
    sha256: str
    wire: bytes | None


@dataclass
class RawSmtpServer:
    """See the module docstring. Change the fields between messages."""

    extensions: list[str] = field(default_factory=lambda: ["PIPELINING", "SIZE", "8BITMIME"])
    # By verb (EHLO, MAIL, RCPT, DATA, "." for the end of the content, NOOP,
    # RSET, AUTH, STARTTLS, GREETING): raw reply bytes, CRLFs included.
    replies: dict[str, bytes] = field(default_factory=dict)
    hold_until_data: bool = False
    keep_content: bool = True
    reads: list[Read] = field(default_factory=list)
    lines: list[tuple[int, bytes]] = field(default_factory=list)  # every command line
    messages: list[WireMessage] = field(default_factory=list)
    connections_opened: int = 0
    connections_closed: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _sessions: set[_Session] = field(default_factory=set)

    @property
    def hop(self) -> str:
        return f"{HOST}:{self.port}"

    def command_reads(self, connection: int = 1) -> list[bytes]:
        return [r.data for r in self.reads if r.connection == connection]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_session, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.abort()
        for _ in range(10):
            await asyncio.sleep(0)

    def _new_session(self) -> _Session:
        self.connections_opened += 1
        session = _Session(self, self.connections_opened)
        self._sessions.add(session)
        return session


class _Session(asyncio.Protocol):
    def __init__(self, owner: RawSmtpServer, number: int) -> None:
        self.owner = owner
        self.number = number
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.in_data = False
        self.auth_login_steps = 0
        self.held: list[bytes] = []
        self._reset_content()

    def _reset_content(self) -> None:
        self.tail = b"\r\n"  # so that an empty content (".\r\n" at once) ends too
        self.size = 0
        self.digest = hashlib.sha256()
        self.kept = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.owner.replies.get("GREETING", b"220 raw.test ESMTP\r\n"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.owner._sessions:
            self.owner._sessions.discard(self)
            self.owner.connections_closed += 1

    def data_received(self, data: bytes) -> None:
        out: list[bytes] = []
        if self.in_data:
            data = self._content(data, out)
        elif data:
            self.owner.reads.append(Read(self.number, data))
        if data:
            self.buffer += data
            self._commands(out)
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def _commands(self, out: list[bytes]) -> None:
        while not self.in_data and b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            self.owner.lines.append((self.number, line))
            reply = self._answer(line)
            if reply == b"QUIT":
                out.append(b"221 2.0.0 bye\r\n")
                assert self.transport is not None
                self.transport.write(b"".join(out))
                out.clear()
                self.transport.close()
                return
            if reply:
                out.append(reply)
        if self.in_data and self.buffer:
            rest, self.buffer = self.buffer, b""
            rest = self._content(rest, out)
            if rest:
                self.buffer = rest
                self._commands(out)

    def _answer(self, line: bytes) -> bytes:
        replies = self.owner.replies
        if self.auth_login_steps:
            self.auth_login_steps -= 1
            return b"334 UGFzc3dvcmQ6\r\n" if self.auth_login_steps else b"235 2.7.0 ok\r\n"
        verb = line.split(b" ", 1)[0].upper().decode("ascii", "replace")
        if verb in replies:
            reply = replies[verb]
        elif verb == "EHLO":
            names = ["raw.test", *self.owner.extensions]
            reply = "".join(
                f"250{'-' if i < len(names) - 1 else ' '}{n}\r\n" for i, n in enumerate(names)
            ).encode()
        elif verb in ("HELO", "MAIL", "RCPT", "RSET", "NOOP"):
            reply = b"250 2.0.0 ok\r\n"
        elif verb == "DATA":
            reply = b"354 go ahead\r\n"
        elif verb == "QUIT":
            return b"QUIT"
        elif verb == "AUTH" and line.upper().startswith(b"AUTH LOGIN"):
            self.auth_login_steps = 2
            return b"334 VXNlcm5hbWU6\r\n"
        else:
            reply = b"502 5.5.2 not here\r\n"
        if verb == "DATA" and reply.startswith(b"354"):
            self.in_data = True
            self._reset_content()
        if self.owner.hold_until_data and verb in ("MAIL", "RCPT"):
            self.held.append(reply)
            return b""
        if verb == "DATA" and self.held:
            reply, self.held = b"".join([*self.held, reply]), []
        return reply

    def _content(self, data: bytes, out: list[bytes]) -> bytes:
        """Take message content; return what follows its end (commands)."""
        span = self.tail + data[:4]
        at = span.find(_END)
        if at >= 0:
            end = at + len(_END) - len(self.tail)
        else:
            at = data.find(_END)
            end = at + len(_END) if at >= 0 else -1
        piece = data if end < 0 else data[:end]
        self.size += len(piece)
        self.digest.update(piece)
        if self.owner.keep_content:
            self.kept += piece
        self.tail = (self.tail + piece)[-4:] if len(piece) < 4 else piece[-4:]
        if end < 0:
            return b""
        self.owner.messages.append(
            WireMessage(
                self.number,
                self.size,
                self.digest.hexdigest(),
                bytes(self.kept) if self.owner.keep_content else None,
            )
        )
        self.in_data = False
        self.owner.lines.append((self.number, b"."))
        reply = self.owner.replies.get(".", b"250 2.0.0 queued\r\n")
        if reply:
            out.append(reply)
        return data[end:]


StartRawServer = Callable[..., Awaitable[RawSmtpServer]]


@pytest.fixture
async def start_raw_server() -> AsyncIterator[StartRawServer]:
    """``await start_raw_server(hold_until_data=True)``: a started
    :class:`RawSmtpServer` with those fields; all are stopped at teardown."""
    servers: list[RawSmtpServer] = []

    async def start(**options: Any) -> RawSmtpServer:
        server = RawSmtpServer(**options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()
