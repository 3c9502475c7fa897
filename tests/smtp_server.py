"""An SMTP server for relay tests: aiosmtpd in the test's own event loop.

:class:`SmtpTestServer` runs aiosmtpd's :class:`~aiosmtpd.smtp.SMTP` protocol
with ``loop.create_server`` on ``127.0.0.1`` and a free port: no thread, no
second loop, so a test and the server interleave deterministically and a
fault can be changed between two messages.

What the server does is set per test through :attr:`SmtpTestServer.behaviour`
(a mutable :class:`Behaviour`): a :class:`Reply` per command (a reply line,
held until an event or for a delay, never sent, or a disconnect instead of
it), per recipient at RCPT, at
the greeting, at the DATA command, at the end of DATA, and a disconnect in
the middle of the message content. Options that aiosmtpd fixes per protocol
instance (SIZE limit, SMTPUTF8, STARTTLS, AUTH: one account in
``credentials``, several in ``accounts``) are constructor arguments,
and so is ``pipelining``: aiosmtpd reads pipelined commands correctly but does
not say so in its EHLO reply; with ``pipelining=True`` the reply offers
PIPELINING (so a client sends MAIL, every RCPT and DATA in one batch).

What the server saw is kept for assertions: connections opened, closed and
open at once (counted in the protocol factory and ``connection_lost``), every
command with the number of the connection it came on, and every accepted
message with its envelope and exact content (dot-stuffing undone, as aiosmtpd
hands it over).

Use the ``smtp_server`` fixture for a default server, ``start_smtp_server``
to start servers with options (all are stopped at teardown), and
``tls_certificate`` for a self-signed certificate made with ``openssl``.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = [
    "Reply",
    "DISCONNECT",
    "HANG",
    "Behaviour",
    "Command",
    "ReceivedMessage",
    "SmtpTestServer",
    "TlsCertificate",
    "StartServer",
    "start_smtp_server",
    "smtp_server",
    "tls_certificate",
]

HOST = "127.0.0.1"


# ------------------------------------------------------------- behaviour


@dataclass(frozen=True, slots=True)
class Reply:
    """What the server does in place of its normal answer to one command:
    wait until ``gate`` is set (if given) and ``delay`` seconds more, then
    close the connection without a word (``disconnect``), or send ``text``
    (a full reply such as ``"451 4.3.0 try later"``; ``None`` keeps
    aiosmtpd's own answer). With ``hang`` it never answers at all: the
    command waits until the client hangs up or the server stops."""

    text: str | None = None
    delay: float = 0.0
    disconnect: bool = False
    gate: asyncio.Event | None = None
    hang: bool = False


DISCONNECT = Reply(disconnect=True)
HANG = Reply(hang=True)
"""No answer, ever: for timeouts, whose tests must not depend on how late a
late answer is."""


@dataclass(slots=True)
class Behaviour:
    """The faults a server injects; change it freely between messages."""

    greeting: Reply | None = None
    # EHLO keywords (e.g. "8BITMIME", "SIZE") left out of the EHLO reply.
    ehlo_drop: set[str] = field(default_factory=set)
    # EHLO lines put in place of aiosmtpd's line of the same keyword (or
    # added), e.g. "SIZE ²": what a broken or hostile hop may announce.
    ehlo_lines: list[str] = field(default_factory=list)
    mail: Reply | None = None
    rcpt: dict[str, Reply] = field(default_factory=dict)  # by recipient address
    data: Reply | None = None  # the DATA command itself (in place of 354)
    disconnect_in_data: bool = False  # after 354 and the first content line
    data_end: Reply | None = None  # the reply to the final "."
    noop: Reply | None = None
    rset: Reply | None = None
    starttls: Reply | None = None  # in place of "220 Ready to start TLS"


# --------------------------------------------------------- observations


@dataclass(frozen=True, slots=True)
class Command:
    """One command as the server saw it, on its ``connection`` (1, 2, ...).
    For MAIL, ``arg`` is the address as aiosmtpd parsed it (``<>`` for the
    null sender) and the parameters; for RCPT, the address."""

    connection: int
    verb: str
    arg: str = ""


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A message the server accepted (2xx at the end of DATA)."""

    connection: int
    mail_from: str
    mail_options: tuple[str, ...]
    rcpt_tos: tuple[str, ...]
    content: bytes  # as the client meant it: dot-stuffing undone
    tls: bool
    login: str | None
    at: float = field(default_factory=time.monotonic)  # when it was accepted


# ------------------------------------------------------------ protocol


class _TestSMTP(SMTP):  # type: ignore[misc]
    """aiosmtpd's protocol with the three faults that no handler hook can
    reach: the greeting, the DATA command and a disconnect inside the
    content."""

    def __init__(self, owner: SmtpTestServer, number: int, **options: Any) -> None:
        super().__init__(owner._handler, **options)
        self.owner = owner
        self.number = number

    def connection_lost(self, error: Exception | None) -> None:
        self.owner._lost(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        greeting = self.owner.behaviour.greeting
        if greeting is not None:
            text = await self.owner._perform(self, greeting)
            if text is not None:
                await self.push(text)
                self.transport.close()
                return
        await super()._handle_client()

    async def smtp_STARTTLS(self, arg: str) -> None:
        reply = self.owner.behaviour.starttls
        if reply is not None:
            self.owner._record(self, "STARTTLS")
            text = await self.owner._perform(self, reply)
            if text is not None:
                await self.push(text)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self.owner._record(self, "DATA")
        behaviour = self.owner.behaviour
        if self.envelope.rcpt_tos and behaviour.data is not None:
            text = await self.owner._perform(self, behaviour.data)
            if text is not None:
                await self.push(text)
                return
        if self.envelope.rcpt_tos and behaviour.disconnect_in_data:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            await self._reader.readuntil(b"\r\n")
            await self.owner._perform(self, DISCONNECT)
        await super().smtp_DATA(arg)


class _Handler:
    """aiosmtpd handler hooks: record each command, then act on
    :attr:`SmtpTestServer.behaviour`. A hook that answers for aiosmtpd must
    also do aiosmtpd's bookkeeping (fill the envelope) on success."""

    def __init__(self, owner: SmtpTestServer) -> None:
        self.owner = owner

    async def handle_EHLO(
        self,
        server: _TestSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        self.owner._record(server, "EHLO", hostname)
        session.host_name = hostname
        extra = self.owner.behaviour.ehlo_lines
        drop = {k.upper() for k in self.owner.behaviour.ehlo_drop}
        drop |= {x.split(" ")[0].upper() for x in extra}
        lines = [r[4:] for r in responses]
        if self.owner.pipelining:
            lines.insert(1, "PIPELINING")
        kept = [lines[0]] + [x for x in lines[1:] if x.split(" ")[0].upper() not in drop] + extra
        return [f"250-{x}" for x in kept[:-1]] + [f"250 {kept[-1]}"]

    async def handle_MAIL(
        self,
        server: _TestSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        self.owner._record(server, "MAIL", " ".join([address, *mail_options]))
        text = await self.owner._perform(server, self.owner.behaviour.mail)
        if text is None or text.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return text or "250 OK"

    async def handle_RCPT(
        self,
        server: _TestSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        self.owner._record(server, "RCPT", address)
        text = await self.owner._perform(server, self.owner.behaviour.rcpt.get(address))
        if text is None or text.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return text or "250 OK"

    async def handle_DATA(self, server: _TestSMTP, session: Session, envelope: Envelope) -> str:
        self.owner._record(server, ".")
        text = await self.owner._perform(server, self.owner.behaviour.data_end)
        if text is None or text.startswith("2"):
            login = session.login_data
            self.owner.messages.append(
                ReceivedMessage(
                    connection=server.number,
                    mail_from=envelope.mail_from,
                    mail_options=tuple(envelope.mail_options),
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    content=bytes(envelope.original_content),
                    tls=session.ssl is not None,
                    login=login.decode() if isinstance(login, bytes) else login,
                )
            )
        return text or "250 2.0.0 OK: queued"

    async def handle_NOOP(
        self, server: _TestSMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        self.owner._record(server, "NOOP")
        return await self.owner._perform(server, self.owner.behaviour.noop) or "250 OK"

    async def handle_RSET(self, server: _TestSMTP, session: Session, envelope: Envelope) -> str:
        self.owner._record(server, "RSET")
        return await self.owner._perform(server, self.owner.behaviour.rset) or "250 OK"

    async def handle_QUIT(self, server: _TestSMTP, session: Session, envelope: Envelope) -> str:
        self.owner._record(server, "QUIT")
        return "221 Bye"

    def handle_STARTTLS(self, server: _TestSMTP, session: Session, envelope: Envelope) -> bool:
        self.owner._record(server, "STARTTLS")
        return True


# --------------------------------------------------------------- server


class SmtpTestServer:
    """One listening aiosmtpd server; see the module docstring."""

    def __init__(
        self,
        *,
        data_size_limit: int | None = 32 * 1024 * 1024,
        smtputf8: bool = False,
        decode_data: bool = False,
        tls_context: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
        accounts: Mapping[str, str] | None = None,
        auth_require_tls: bool = False,
        pipelining: bool = False,
    ) -> None:
        self.behaviour = Behaviour()
        self.pipelining = pipelining
        self.connections_opened = 0
        self.connections_closed = 0
        self.max_open_connections = 0
        self.commands: list[Command] = []
        self.messages: list[ReceivedMessage] = []
        self.auth_attempts: list[tuple[str, bool]] = []  # (user, accepted)
        # user: password; ``credentials`` is one such account
        self._accounts = dict(accounts or {})
        if credentials is not None:
            self._accounts[credentials[0]] = credentials[1]
        self._options: dict[str, Any] = {
            "hostname": "mx.test",
            "data_size_limit": data_size_limit,
            "enable_SMTPUTF8": smtputf8,
            "decode_data": decode_data,
            "tls_context": tls_context,
            "auth_require_tls": auth_require_tls,
            "timeout": 30,
        }
        if self._accounts:
            self._options["authenticator"] = self._authenticate
        self._handler = _Handler(self)
        self._live: set[_TestSMTP] = set()
        self._server: asyncio.Server | None = None
        self.host = HOST
        self.port = 0

    @property
    def hop(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return self.connections_opened - self.connections_closed

    @property
    def transactions(self) -> int:
        """Messages accepted at the end of DATA."""
        return len(self.messages)

    def verbs(self, connection: int | None = None) -> list[str]:
        """The commands seen (on one connection, or on all), in order."""
        return [c.verb for c in self.commands if connection in (None, c.connection)]

    def count(self, verb: str) -> int:
        return sum(1 for c in self.commands if c.verb == verb)

    def args(self, verb: str) -> list[str]:
        return [c.arg for c in self.commands if c.verb == verb]

    async def start(self, port: int = 0, host: str = HOST) -> None:
        """Listen on ``port`` (0: a free one), e.g. a hop that was down; on
        ``host`` (another loopback address: an MX host on port 25)."""
        loop = asyncio.get_running_loop()
        self.host = host
        self._server = await loop.create_server(self._new_protocol, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and cut every connection still open."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.cut_connections()

    async def cut_connections(self) -> None:
        """Close every open connection from the server side, as a server
        does when a client has been idle too long."""
        for proto in list(self._live):
            raw = proto._original_transport or proto.transport
            if raw is not None:
                raw.abort()
        for _ in range(10):  # let connection_lost and the handler tasks finish
            await asyncio.sleep(0)

    def _new_protocol(self) -> _TestSMTP:
        self.connections_opened += 1
        proto = _TestSMTP(
            self, self.connections_opened, loop=asyncio.get_running_loop(), **self._options
        )
        self._live.add(proto)
        self.max_open_connections = max(self.max_open_connections, self.open_connections)
        return proto

    def _lost(self, proto: _TestSMTP) -> None:
        if proto in self._live:
            self._live.discard(proto)
            self.connections_closed += 1

    def _record(self, proto: _TestSMTP, verb: str, arg: str = "") -> None:
        self.commands.append(Command(proto.number, verb, arg))

    async def _perform(self, proto: _TestSMTP, reply: Reply | None) -> str | None:
        """Carry out ``reply``; the text to send, or None for the default."""
        if reply is None:
            return None
        if reply.hang:
            await asyncio.Event().wait()  # until connection_lost cancels this task
        if reply.gate is not None:
            await reply.gate.wait()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.disconnect:
            # Close the TCP connection itself (under TLS too); connection_lost
            # then cancels the task running this hook.
            raw = proto._original_transport or proto.transport
            if raw is not None:
                raw.close()
            await asyncio.sleep(3600)
        return reply.text

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        ok = self._accounts.get(user) == password
        self.auth_attempts.append((user, ok))
        return AuthResult(success=ok, auth_data=auth_data if ok else None, handled=False)


# ------------------------------------------------------------- fixtures

StartServer = Callable[..., Awaitable[SmtpTestServer]]


@pytest.fixture
async def start_smtp_server() -> AsyncIterator[StartServer]:
    """Start servers with options (``await start_smtp_server(smtputf8=True)``);
    each is stopped at teardown."""
    servers: list[SmtpTestServer] = []

    async def start(**options: Any) -> SmtpTestServer:
        server = SmtpTestServer(**options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def smtp_server(start_smtp_server: StartServer) -> SmtpTestServer:
    """A server with aiosmtpd's defaults: 250 to everything, SIZE, 8BITMIME."""
    return await start_smtp_server()


@dataclass(frozen=True, slots=True)
class TlsCertificate:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="session")
def tls_certificate(tmp_path_factory: pytest.TempPathFactory) -> TlsCertificate:
    """A self-signed certificate for ``localhost`` and ``127.0.0.1``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found: install Debian package 'openssl' to test STARTTLS")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return TlsCertificate(cert, key)
