"""A small ESMTP client on asyncio, for the relay.

One :class:`SmtpClient` is one connection to one SMTP server. It owns the
transport and a reply parser (:class:`_ReplyReader`, an
:class:`asyncio.Protocol`: cheaper per message than asyncio streams, and it
sees flow control and STARTTLS leftovers directly). It does not know about
messages on disk, routes or retries: the relay (:mod:`spoold.smtp_relay`)
decides what to send, this module only says it and reads the answers.

What it does:

* connect within ``connect_timeout`` (TCP and the greeting together), EHLO
  with a fall-back to HELO when EHLO is refused with 5xx, STARTTLS through
  :meth:`asyncio.loop.start_tls` followed by a new EHLO, AUTH PLAIN or
  LOGIN, NOOP, RSET, QUIT;
* a transaction in two calls: :meth:`SmtpClient.send_envelope` sends MAIL,
  every RCPT and DATA -- in one write when the server offers PIPELINING
  (RFC 2920), replies then read in order; otherwise one command at a time,
  stopping after a refused MAIL or when no RCPT was accepted -- and
  :meth:`SmtpClient.send_content` writes the message as given (the caller
  passes chunks already in wire form: CRLF, dot-stuffed, without the final
  ``.`` line), waits for the transport to drain between chunks, and ends
  with ``.`` on a line of its own.

Invariants:

* replies are matched to commands strictly in order; a reply is only ever
  read as the answer to the command it follows;
* every wait is bounded: a reply by the timeout the caller gives (the
  command timeout, or the DATA timeout for the end of the message), a
  stalled write by the command timeout;
* a reply is at most :data:`MAX_REPLY_SIZE` bytes (all its lines); every
  line starts with a code from 200 to 599, and the lines of one reply share
  it; an enhanced status code (RFC 3463) is split off the text;
* bytes received after the 220 to STARTTLS and before the handshake are
  refused as an injection attempt (RFC 3207 §6); the extensions are
  forgotten and asked again over TLS.

Errors: every failure is an :class:`~spoold.errors.SmtpError` subclass
(connection lost, timeout, protocol error, TLS, a refusing reply, 421).
A method that raises -- for any reason, cancellation included -- leaves the
client closed, so a caller never has to guess where in the dialogue it
stopped; :attr:`SmtpClient.usable` is then false. A refusal of MAIL, RCPT,
DATA or the message is not an error: it is a reply, returned as a value.
A 421 anywhere is :class:`~spoold.errors.SmtpServiceClosingError`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import ssl
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, cast

import anyio

from spoold.errors import (
    SmtpConnectionError,
    SmtpError,
    SmtpProtocolError,
    SmtpReplyError,
    SmtpServiceClosingError,
    SmtpTimeoutError,
    SmtpTlsError,
)
from spoold.numerals import ascii_decimal

__all__ = [
    "MAX_REPLY_SIZE",
    "SmtpReply",
    "EnvelopeReplies",
    "SmtpClient",
]

MAX_REPLY_SIZE: Final = 64 * 1024
"""The most bytes one reply may take, all its lines together."""

_CRLF: Final = b"\r\n"
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?=\s|$)")
_DIGITS = frozenset(b"0123456789")
_KNOWN_MOST: Final = 32  # one-line replies kept parsed, per connection


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """One reply: its code, the enhanced status code of its first line
    (when it has one, of the code's class) and the text of each line
    (without the code, and without a repeated enhanced status code)."""

    code: int
    lines: tuple[str, ...]
    enhanced_status: str | None = None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def positive(self) -> bool:
        """2xx: done."""
        return 200 <= self.code < 300

    @property
    def intermediate(self) -> bool:
        """3xx: go on (354 to DATA, 334 during AUTH)."""
        return 300 <= self.code < 400

    def __str__(self) -> str:
        words = [str(self.code), *([self.enhanced_status] if self.enhanced_status else [])]
        return " ".join([*words, *self.text.split()])


def _reply(code: int, raw: list[bytes]) -> SmtpReply:
    lines = [line[4:].decode("utf-8", "replace") for line in raw]
    enhanced: str | None = None
    m = _ENHANCED.match(lines[0])
    if m is not None and m.group(1) == str(code)[0]:
        enhanced = m.group()
        lines = [
            line[len(enhanced) :].lstrip() if line.startswith(enhanced) else line for line in lines
        ]
    return SmtpReply(code, tuple(lines), enhanced)


def _refusal(reply: SmtpReply) -> SmtpReplyError:
    cls = SmtpServiceClosingError if reply.code == 421 else SmtpReplyError
    return cls(reply.code, reply.text, reply.enhanced_status)


@dataclass(frozen=True, slots=True)
class EnvelopeReplies:
    """The replies to MAIL, to each RCPT (in the order given) and to DATA.
    ``None`` for a command that was not sent: without PIPELINING nothing
    follows a refused MAIL, and DATA does not follow when no RCPT was
    accepted."""

    mail: SmtpReply
    rcpts: tuple[SmtpReply | None, ...]
    data: SmtpReply | None


# ------------------------------------------------------------------ timers


class _Alarm:
    """Calls ``expire`` once the time ``due`` (on the loop's clock) has
    come, unless ``due`` was cleared or moved first. One loop timer keeps
    it, moved only when ``due`` comes earlier than the timer: a later
    ``due`` waits for the timer to fire, which then re-arms. A wait set
    and cleared for every reply (or every message) then costs no timer
    call at all while the timeouts stay the same."""

    __slots__ = ("_armed_at", "_expire", "_handle", "_loop", "due")

    _SLACK: Final = 0.001  # a loop timer may fire up to a millisecond early

    def __init__(self, loop: asyncio.AbstractEventLoop, expire: Callable[[], None]) -> None:
        self._loop = loop
        self._expire = expire
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        self.due: float | None = None

    def set(self, due: float | None) -> None:
        self.due = due
        if due is not None and (self._handle is None or due < self._armed_at):
            if self._handle is not None:
                self._handle.cancel()
            self._armed_at = due
            self._handle = self._loop.call_at(due, self._fire)

    def cancel(self) -> None:
        self.due = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        due = self.due
        if due is None:
            return
        if due > self._loop.time() + self._SLACK:
            self._armed_at = due
            self._handle = self._loop.call_at(due, self._fire)
            return
        self.due = None
        self._expire()


# ---------------------------------------------------------------- protocol


class _ReplyReader(asyncio.Protocol):
    """Parses what the server sends into replies, queued in order, and
    tracks whether the transport may take more data (flow control)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_reply_size: int) -> None:
        self._loop = loop
        self._max = max_reply_size
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # the reply being received
        self._size = 0
        self.replies: deque[SmtpReply] = deque()
        # One-line replies parsed already, by their line ("250 2.1.0 Ok"): a
        # hop says the same few things for every message, and SmtpReply is
        # immutable. Bounded: the first ones are kept (a reply carrying a
        # queue id never repeats).
        self._known: dict[bytes, SmtpReply] = {}
        self.error: SmtpError | None = None  # the connection is finished
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_for = ("", 0.0)  # what the waiter waits for, how long
        self._reply_alarm = _Alarm(loop, self._no_reply)
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not subclasses of asyncio's).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end])
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not self._take_line(line):
                return
        if start:
            del buffer[:start]
        if self._size + len(buffer) > self._max:
            self._fail(SmtpProtocolError(f"a reply longer than {self._max} bytes"))
            return
        if self.replies:
            self._wake(self._waiter, None)

    def eof_received(self) -> bool:
        self._fail(SmtpConnectionError("connection lost: the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc is not None else ": the server closed the connection"
        self._fail(SmtpConnectionError(f"connection lost{why}"))
        self._wake(self._drain_waiter, self.error)
        self._reply_alarm.cancel()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake(self._drain_waiter, None)

    # -- parsing

    def _take_line(self, line: bytes) -> bool:
        self._size += len(line) + 2
        if self._size > self._max:
            self._fail(SmtpProtocolError(f"a reply longer than {self._max} bytes"))
            return False
        if (
            len(line) < 3
            or line[0] not in b"2345"
            or line[1] not in _DIGITS
            or line[2] not in _DIGITS
            or (len(line) > 3 and line[3] not in b" -")
        ):
            shown = line[:80].decode("ascii", "backslashreplace")
            self._fail(SmtpProtocolError(f"a malformed reply line: {shown!r}"))
            return False
        lines = self._lines
        if not lines and (len(line) == 3 or line[3] == 0x20):  # a reply of one line
            reply = self._known.get(line)
            if reply is None:
                reply = _reply(int(line[:3]), [line])
                if len(self._known) < _KNOWN_MOST and len(line) <= 128:
                    self._known[line] = reply
            self.replies.append(reply)
            self._size = 0
            return True
        if lines and lines[0][:3] != line[:3]:
            self._fail(SmtpProtocolError("the lines of a reply carry different codes"))
            return False
        lines.append(line)
        if len(line) == 3 or line[3] == 0x20:  # the last line of the reply
            self.replies.append(_reply(int(line[:3]), lines))
            self._lines = []
            self._size = 0
        return True

    # -- waiting

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None, error: BaseException | None) -> None:
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _fail(self, error: SmtpError) -> None:
        if self.error is None:
            self.error = error
        self._wake(self._waiter, self.error)
        if self.transport is not None and not isinstance(error, SmtpConnectionError):
            self.transport.abort()

    def _arm(self, waiter: asyncio.Future[None], what: str, timeout: float) -> asyncio.TimerHandle:
        def expire() -> None:
            self._wake(waiter, SmtpTimeoutError(f"timeout: {what} within {timeout:g}s"))

        return self._loop.call_later(timeout, expire)

    async def next_reply(self, what: str, timeout: float | None) -> SmtpReply:
        """The next reply; ``what`` names it for a timeout message."""
        if self.replies:
            return self.replies.popleft()
        if self.error is not None:
            raise self.error
        waiter = self._waiter = self._loop.create_future()
        if timeout is not None:
            self._waiting_for = (what, timeout)
            self._reply_alarm.set(self._loop.time() + timeout)
        try:
            await waiter
        finally:
            self._waiter = None
            if timeout is not None:
                self._reply_alarm.set(None)
        return self.replies.popleft()

    def _no_reply(self) -> None:
        what, timeout = self._waiting_for
        self._wake(
            self._waiter, SmtpTimeoutError(f"timeout: no reply to {what} within {timeout:g}s")
        )

    async def drain(self, timeout: float) -> None:
        """Wait until the transport takes more data."""
        if self.error is not None:
            raise self.error
        if not self._paused:
            return
        waiter = self._drain_waiter = self._loop.create_future()
        timer = self._arm(waiter, "the server read nothing of the message", timeout)
        try:
            await waiter
        finally:
            self._drain_waiter = None
            timer.cancel()

    @property
    def pending(self) -> bool:
        """Something arrived that no command asked for."""
        return bool(self.replies or self._buffer or self._lines)

    def forget_pending(self) -> None:
        self._buffer.clear()
        self._lines = []
        self._size = 0
        self.replies.clear()


# ------------------------------------------------------------------ client


class SmtpClient:
    """One connection to an SMTP server. Make one with :meth:`connect`."""

    def __init__(
        self, reader: _ReplyReader, transport: asyncio.Transport, command_timeout: float
    ) -> None:
        self._reader = reader
        self._transport = transport
        self.command_timeout = command_timeout
        self.greeting: SmtpReply | None = None
        self.extensions: dict[str, str] = {}
        self.tls_active = False
        self._closed = False
        self._deadline = _Alarm(reader._loop, self._deadline_passed)
        self._deadline_text = ""
        # Set when a deadline of set_deadline passed; never cleared (the
        # connection was aborted then: the client is done).
        self.deadline_passed = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        command_timeout: float,
        max_reply_size: int = MAX_REPLY_SIZE,
    ) -> SmtpClient:
        """Connect and read the greeting, both within ``connect_timeout``.
        A greeting other than 220 is :class:`~spoold.errors.SmtpReplyError`."""
        loop = asyncio.get_running_loop()
        stage = "cannot connect"
        client: SmtpClient | None = None
        try:
            with anyio.fail_after(connect_timeout):
                transport, reader = await loop.create_connection(
                    lambda: _ReplyReader(loop, max_reply_size), host, port
                )
                client = cls(reader, transport, command_timeout)
                stage = "no greeting"
                greeting = await reader.next_reply("the connection (greeting)", None)
        except SmtpError:
            if client is not None:
                client.close()
            raise
        except TimeoutError:
            if client is not None:
                client.close()
            raise SmtpTimeoutError(f"timeout: {stage} within {connect_timeout:g}s") from None
        except OSError as exc:
            # The errno's own words: asyncio and uvloop word the same failure
            # differently ("Connect call failed (...)", "Connection refused").
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise SmtpConnectionError(f"cannot connect: {why}") from exc
        except BaseException:
            if client is not None:
                client.close()
            raise
        client.greeting = greeting
        if greeting.code != 220:
            client.close()
            raise _refusal(greeting)
        return client

    # -- state

    @property
    def usable(self) -> bool:
        """Open, in step with the server, and nothing unasked-for received
        (a server that timed us out says 421 before it hangs up)."""
        return not self._closed and self._reader.error is None and not self._reader.pending

    def peer_certificate(self) -> bytes | None:
        """The server's certificate (DER) once TLS is up; None before, or
        when the server sent none."""
        if not self.tls_active:
            return None
        ssl_object = self._transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        return bytes(der) if der else None

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    @property
    def size_limit(self) -> int | None:
        """The SIZE the server declared: ``None`` if it did not offer SIZE,
        0 if it offered SIZE without a limit (or with a value that is not
        ASCII digits: no limit it wrote)."""
        value = self.extensions.get("SIZE")
        if value is None:
            return None
        return ascii_decimal(value) or 0

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        return frozenset(self.extensions.get("AUTH", "").upper().split())

    def close(self) -> None:
        """Hang up without a word. Pending output is dropped when the
        client is not in step with the server (never wait on a peer that
        stopped reading)."""
        if self._closed:
            return
        self._closed = True
        self._deadline.cancel()
        if self._reader.error is None and self._transport.get_write_buffer_size() == 0:
            self._transport.close()
        else:
            self._transport.abort()

    def set_deadline(self, when: float | None, text: str = "") -> None:
        """At ``when`` (a time of the event loop's clock), fail whatever the
        client is doing or does next with :class:`~spoold.errors.SmtpTimeoutError`
        (``text``) and drop the connection, and set :attr:`deadline_passed`;
        ``None``: no deadline (the one set before is lifted). One timer for
        a whole transaction, instead of a cancel scope around it.

        Once passed, :attr:`deadline_passed` stays set for good: the
        connection was aborted, so the client is never used again (a later
        ``set_deadline`` does not clear it)."""
        self._deadline_text = text
        self._deadline.set(when)

    def _deadline_passed(self) -> None:
        if self._closed:
            return
        self.deadline_passed = True
        self._reader._fail(SmtpTimeoutError(self._deadline_text))  # aborts the transport

    # -- plumbing

    @contextlib.contextmanager
    def _closed_on_error(self) -> Iterator[None]:
        """Close the client if the block raises (for anything)."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    def _write(self, data: bytes) -> None:
        if self._closed:
            raise SmtpConnectionError("connection closed by the client")
        if self._reader.error is not None:
            raise self._reader.error
        self._transport.write(data)

    async def _next(self, what: str, timeout: float | None = None) -> SmtpReply:
        reply = await self._reader.next_reply(
            what, self.command_timeout if timeout is None else timeout
        )
        if reply.code == 421:
            raise _refusal(reply)
        return reply

    def _ready(self) -> SmtpReply | None:
        """The next reply if it is in already (as :meth:`_next` would
        give it), else None."""
        replies = self._reader.replies
        if not replies:
            return None
        reply = replies.popleft()
        if reply.code == 421:
            raise _refusal(reply)
        return reply

    async def command(self, line: bytes, what: str, timeout: float | None = None) -> SmtpReply:
        """Send one command line (with its CRLF) and read its reply."""
        try:
            self._write(line)
            return await self._next(what, timeout)
        except BaseException:
            self.close()
            raise

    # -- session

    async def hello(self, name: str) -> SmtpReply:
        """EHLO, or HELO when EHLO is refused with 5xx; keeps the extensions
        offered (none after HELO)."""
        with self._closed_on_error():
            if not name.isascii() or not name or any(c.isspace() for c in name):
                raise SmtpError(f"the HELO name {name!r} is not an ASCII domain")
            encoded = name.encode("ascii")
            reply = await self.command(b"EHLO " + encoded + _CRLF, "EHLO")
            if reply.positive:
                self.extensions = {}
                for line in reply.lines[1:]:
                    keyword, _, params = line.strip().partition(" ")
                    if keyword:
                        self.extensions[keyword.upper()] = params.strip()
                return reply
            if 500 <= reply.code < 600:
                reply = await self.command(b"HELO " + encoded + _CRLF, "HELO")
                if reply.positive:
                    self.extensions = {}
                    return reply
            raise _refusal(reply)

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """Upgrade to TLS. Call :meth:`hello` again afterwards."""
        with self._closed_on_error():
            reply = await self.command(b"STARTTLS\r\n", "STARTTLS")
            if reply.code != 220:
                raise _refusal(reply)
            if self._reader.pending:
                raise SmtpProtocolError("the server sent data after its STARTTLS reply, before TLS")
            loop = asyncio.get_running_loop()
            try:
                transport = await loop.start_tls(
                    self._transport,
                    self._reader,
                    context,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=self.command_timeout,
                )
            except ssl.SSLError as exc:
                raise SmtpTlsError(f"TLS handshake failed: {exc.reason or exc}") from exc
            except TimeoutError as exc:
                raise SmtpTimeoutError(
                    f"timeout: TLS handshake not done within {self.command_timeout:g}s"
                ) from exc
            except OSError as exc:  # asyncio aborts a handshake that takes too long
                raise SmtpConnectionError(f"connection lost in the TLS handshake: {exc}") from exc
            if transport is None:
                raise SmtpConnectionError("connection lost in the TLS handshake")
            self._transport = transport
            self._reader.transport = transport
            self._reader.forget_pending()
            self.extensions = {}
            self.tls_active = True

    async def authenticate(self, user: str, password: str) -> None:
        """AUTH PLAIN, or LOGIN when PLAIN is not offered; a refusal is
        :class:`~spoold.errors.SmtpReplyError`."""
        mechanisms = self.auth_mechanisms
        with self._closed_on_error():
            if "PLAIN" in mechanisms:
                token = _b64(b"\0" + user.encode() + b"\0" + password.encode())
                reply = await self.command(b"AUTH PLAIN " + token + _CRLF, "AUTH PLAIN")
                if reply.code == 334:  # a server that wants the token on its own line
                    reply = await self.command(token + _CRLF, "AUTH PLAIN")
            elif "LOGIN" in mechanisms:
                reply = await self.command(b"AUTH LOGIN\r\n", "AUTH LOGIN")
                if reply.code == 334:
                    reply = await self.command(_b64(user.encode()) + _CRLF, "AUTH LOGIN")
                if reply.code == 334:
                    reply = await self.command(_b64(password.encode()) + _CRLF, "AUTH LOGIN")
            else:
                offered = " ".join(sorted(mechanisms)) or "no AUTH"
                raise SmtpError(f"offers neither AUTH PLAIN nor AUTH LOGIN (offers {offered})")
            if reply.code != 235:
                raise _refusal(reply)

    async def noop(self, timeout: float | None = None) -> SmtpReply:
        return await self.command(b"NOOP\r\n", "NOOP", timeout)

    async def rset(self) -> SmtpReply:
        return await self.command(b"RSET\r\n", "RSET")

    async def quit(self, timeout: float | None = None) -> None:
        """Say QUIT, read the answer, hang up."""
        try:
            await self.command(b"QUIT\r\n", "QUIT", timeout)
        except SmtpServiceClosingError:
            pass  # 421 to QUIT: closing either way
        finally:
            self.close()

    # -- transaction

    async def send_envelope(self, mail: bytes, rcpts: Sequence[bytes]) -> EnvelopeReplies:
        """Send ``mail`` (a whole ``MAIL FROM:`` line), each line of
        ``rcpts`` and DATA; see :class:`EnvelopeReplies`. A 3xx reply to
        MAIL or RCPT, or anything but 354, 4xx or 5xx to DATA, is a protocol
        error."""
        try:
            if self.pipelining:
                self._write(b"".join([mail, *rcpts, b"DATA\r\n"]))
                await self._reader.drain(self.command_timeout)
                # The replies come together: once the first is in, the
                # others are usually queued already (no wait to set up).
                mail_reply = _final(self._ready() or await self._next("MAIL"), "MAIL")
                rcpt_replies: list[SmtpReply | None] = [
                    _final(self._ready() or await self._next("RCPT"), "RCPT") for _ in rcpts
                ]
                data_reply: SmtpReply | None = _data(self._ready() or await self._next("DATA"))
                return EnvelopeReplies(mail_reply, tuple(rcpt_replies), data_reply)
            self._write(mail)
            mail_reply = _final(await self._next("MAIL"), "MAIL")
            if not mail_reply.positive:
                return EnvelopeReplies(mail_reply, (None,) * len(rcpts), None)
            rcpt_replies = []
            for line in rcpts:
                self._write(line)
                rcpt_replies.append(_final(await self._next("RCPT"), "RCPT"))
            data_reply = None
            if any(r is not None and r.positive for r in rcpt_replies):
                self._write(b"DATA\r\n")
                data_reply = _data(await self._next("DATA"))
            return EnvelopeReplies(mail_reply, tuple(rcpt_replies), data_reply)
        except BaseException:
            self.close()
            raise

    async def send_content(
        self,
        chunks: AsyncIterable[bytes] | None,
        *,
        timeout: float,
        on_final_dot: Callable[[], None] | None = None,
    ) -> SmtpReply:
        """After a 354: write the message content (wire form, as it is on
        disk) and the final ``.`` line; the reply to it, waited for up to
        ``timeout`` seconds. Writing waits for the transport to drain, up to
        the command timeout each time it stalls. A content that does not end
        with CRLF gets one before the ``.`` line. ``None``: no content, the
        ``.`` line alone (to end a DATA that has nothing left to carry).
        ``on_final_dot`` is called once the ``.`` line is handed to the
        transport: from then on the server may have the message, whatever
        happens to its reply."""
        try:
            held: bytes = b""
            tail = _CRLF  # empty content: the "." line follows DATA directly
            async for chunk in _NO_CONTENT if chunks is None else chunks:
                if not chunk:
                    continue
                if held:
                    self._write(held)
                    await self._reader.drain(self.command_timeout)
                held = chunk
                tail = chunk[-2:] if len(chunk) >= 2 else (tail + chunk)[-2:]
            end = b".\r\n" if tail == _CRLF else b"\r\n.\r\n"
            self._write(held + end)  # one write for a small message
            if on_final_dot is not None:
                on_final_dot()
            await self._reader.drain(self.command_timeout)
            return _final(await self._next("the end of the message", timeout), "the message")
        except BaseException:
            self.close()
            raise


class _NoContent:
    """An async iterable of no chunks."""

    def __aiter__(self) -> _NoContent:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


_NO_CONTENT: Final = _NoContent()


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _final(reply: SmtpReply, what: str) -> SmtpReply:
    if reply.intermediate:
        raise SmtpProtocolError(f"a {reply.code} reply to {what}: {reply}")
    return reply


def _data(reply: SmtpReply) -> SmtpReply:
    if reply.code != 354 and reply.code < 400:
        raise SmtpProtocolError(f"a {reply.code} reply to DATA (354 expected): {reply}")
    return reply
