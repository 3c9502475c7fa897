"""The ESMTP server side of one connection: an :class:`asyncio.Protocol`.

:class:`SmtpSession` owns the protocol state of one client connection: the
line buffer, the command state machine (its state a :class:`SessionState`;
EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, STARTTLS, AUTH PLAIN/LOGIN,
VRFY, HELP), reading the message, and every limit that protects the
server from its client. It knows nothing of spools or routes: what to do
with a message, whom to let in, whose password is right and whether there
is room for a message at MAIL, it asks its :class:`SessionHost` (the
listener).

Invariants:

* Replies are printable ASCII with enhanced status codes (RFC 2034); no byte
  a client sent is ever echoed (text from elsewhere is made printable and
  cut short by :func:`reply_line`).
* Pipelining (RFC 2920): the commands of one read are answered in order and
  their replies leave in one ``transport.write``; so do the lines of a
  multi-line reply. Replies are written before the session waits for input.
* A message ends only at ``CRLF . CRLF`` (a bare CR or LF never ends it:
  no SMTP smuggling). It is kept in wire form, as received (CRLF lines,
  dot-stuffed, without the final ``.`` line): the on-disk body format. Past
  ``max_message_size`` the rest is read and dropped (552), never buffered.
* Anything pipelined after STARTTLS is dropped (RFC 3207); after the
  handshake the session starts over (EHLO again, no transaction, no AUTH).
* AUTH is offered only when the policy says so (an ``auth_file`` is set), and
  only after STARTTLS when a certificate is configured. A failed AUTH is
  answered after a delay that doubles with each failure on the connection,
  or of the client's address on any connection lately (the host counts
  those: :mod:`spoold.daemon.auth_failures`); after ``max_auth_failures``
  on the connection, or once the host refuses the address, the connection
  gets 421 and is closed, and AUTH from a refused address gets 454.
* A client idle for ``timeout`` (waiting for a command or message data, not
  while we work) gets 421 and is closed; so is one past
  ``max_junk_commands`` junk commands (NOOP, RSET, VRFY, HELP, a repeated
  HELO/EHLO, any command refused as unknown, malformed or out of
  sequence, and every refused recipient but a suppressed one (those
  count against ``max_recipients`` instead: a message to a list is not
  junk for holding suppressed addresses), so a client cannot send RCPTs
  without end; the count restarts after each accepted message).

Addresses (MAIL FROM and RCPT TO paths are ``<...>``, a source route
``@a,@b:`` is dropped; the mailbox goes through
:func:`~spoold.address.validate_address`, non-ASCII only when MAIL carried
SMTPUTF8; a line that is not UTF-8 is decoded with surrogateescape, so its
bytes fail validation rather than decoding):

=============================================  ==========  ==========
problem                                        MAIL        RCPT
=============================================  ==========  ==========
no ``FROM:`` / ``TO:``                         501 5.5.4   501 5.5.4
path that does not parse                       553 5.1.7   501 5.1.3
syntax or control character                    553 5.1.7   501 5.1.3
too long, or ``<>`` as a recipient             553 5.1.7   553 5.1.3
non-ASCII without SMTPUTF8                     553 5.6.7   553 5.6.7
not UTF-8 (with SMTPUTF8)                      553 5.1.7   501 5.1.3
unknown parameter                              555 5.5.4   555 5.5.4
=============================================  ==========  ==========

A refused recipient leaves the transaction going: the message goes to the
recipients that were accepted. A recipient on the suppression list gets
``550 5.7.1 Recipient suppressed until TIME`` from the host (not the
reason: an operator's note, or a hop's reply, is not for any client)
(:meth:`SessionHost.recipient_refusal`); when the list changed since the
host read it, the RCPT waits (as a delivery does) until it has read it
again, so an entry added a moment ago applies to the next RCPT.

Work that waits (handing a message over, the delay of a failed AUTH, the TLS
handshake) runs as a task in the host's task group; meanwhile input is
buffered (reading pauses past a bound) and no command is processed. Such a
task never lets an exception out: the host's errors become 451/421 replies.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import re
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, NamedTuple, Protocol

import structlog

from spoold.address import validate_address
from spoold.errors import AddressError, StoreError
from spoold.numerals import ascii_decimal

__all__ = [
    "SessionPolicy",
    "SessionHost",
    "SessionState",
    "SmtpSession",
    "Delivery",
    "parse_path",
    "reply_line",
]

log = structlog.get_logger("spoold.smtp")

MAX_COMMAND_LINE: Final = 512  # octets with CRLF (RFC 5321 4.5.3.1.4)
# MAIL parameters we take add to that: SIZE= (RFC 1870: 26), BODY=8BITMIME
# (RFC 6152), SMTPUTF8 (RFC 6531), AUTH= (RFC 4954: 500).
MAX_MAIL_LINE: Final = MAX_COMMAND_LINE + 26 + 16 + 10 + 500
MAX_AUTH_LINE: Final = 12288  # AUTH and its responses (RFC 4954 §4)
_MAX_PENDING_INPUT: Final = 256 * 1024  # buffered while busy, then reading pauses
_MAX_AUTH_DELAY_DOUBLINGS: Final = 5  # the delay grows to at most 32 x the base

_NEEDS_SMTPUTF8: Final = b"553 5.6.7 Non-ASCII address needs SMTPUTF8\r\n"
_LOGIN_USERNAME: Final = b"334 VXNlcm5hbWU6\r\n"  # base64 "Username:"
_LOGIN_PASSWORD: Final = b"334 UGFzc3dvcmQ6\r\n"  # base64 "Password:"
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_SOURCE_ROUTE = re.compile(r"@[^,:@<>\s]+(?:,@[^,:@<>\s]+)*:")


def reply_line(text: str, limit: int = 400) -> bytes:
    """``text`` as one reply line: printable ASCII, at most ``limit``
    characters, CRLF."""
    text = text[:limit]
    if text.isascii() and text.isprintable():  # the usual reply: nothing to replace
        return text.encode("ascii") + b"\r\n"
    return _UNPRINTABLE.sub("?", text).encode("ascii") + b"\r\n"


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """The limits and offers of a session, fixed when it starts."""

    hostname: str
    max_message_size: int
    max_recipients: int
    max_line_length: int  # octets of a message line, without its CRLF
    timeout: float  # seconds
    max_junk_commands: int
    max_auth_failures: int
    auth_failure_delay: float  # seconds
    tls_context: ssl.SSLContext | None = None  # offer STARTTLS
    require_tls: bool = False  # 530 to MAIL before STARTTLS
    auth: bool = False  # offer AUTH PLAIN LOGIN (after STARTTLS when tls_context is set)


class Delivery(NamedTuple):
    """A message as received, handed to :meth:`SessionHost.deliver`.
    (A named tuple: immutable, and made with one call, where a frozen
    dataclass sets each of its eight fields through object.__setattr__.)"""

    sender: str  # "" for the null sender <>
    recipients: tuple[str, ...]
    mail_params: tuple[str, ...]  # normalised: "BODY=8BITMIME", "SMTPUTF8"
    # CRLF lines, dot-stuffed, cut at the first end-of-data line: never
    # holds one (SmtpListener.deliver relies on it and does not search
    # again; bytes holding one would be SMTP smuggling at the next hop).
    wire: bytes
    helo: str  # as the client gave it (make it safe before use)
    protocol: str  # for Received: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA (RFC 3848)
    peer: str  # the client's IP address, "" when unknown
    login: str | None  # the AUTH identity


class SessionHost(Protocol):
    """What a session needs from the listener that runs it."""

    def open_session(self, session: SmtpSession, peer: str) -> tuple[SessionPolicy, bool] | str:
        """A new connection from ``peer``: its policy and whether the peer is
        trusted to send without AUTH, or a reply line refusing it."""
        ...

    def close_session(self, session: SmtpSession, peer: str) -> None:
        """A session opened by :meth:`open_session` has ended."""
        ...

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work`` as a task of the listener's task group."""
        ...

    sleep: Callable[[float], Awaitable[None]]  # waits out the delay of a failed AUTH

    def check_password(self, login: str, password: bytes) -> bool:
        """Whether ``password`` is that of ``login`` (constant time)."""
        ...

    def auth_refused(self, peer: str) -> bool:
        """Whether ``peer``'s address has failed AUTH too often lately
        (on any connection) to be let try again now."""
        ...

    def auth_failed(self, peer: str) -> int:
        """Note a failed AUTH of ``peer``; its address's recent failures,
        this one included, on every connection."""
        ...

    async def deliver(self, delivery: Delivery) -> str:
        """Take a message; the reply line to send (250 only once durable).
        ``delivery.wire`` holds no end-of-data line (see :class:`Delivery`)."""
        ...

    def space_refusal(self, size: int | None) -> bytes | None:
        """At MAIL: the reply refusing a message of ``size`` octets (SIZE=,
        None when not declared) because the spool is short of space, or
        None to go on. No I/O: the host answers from what it measured."""
        ...

    def suppressions_stale(self) -> bool:
        """At RCPT: whether the suppression list changed since the host read
        it (no file I/O: see :meth:`spoold.suppression.Suppressions.stale`),
        so :meth:`refresh_suppressions` must come first."""
        ...

    async def refresh_suppressions(self) -> None:
        """Read the suppression list again (a worker thread)."""
        ...

    def recipient_refusal(self, address: str) -> bytes | None:
        """At RCPT: the reply refusing ``address`` because it is suppressed
        (under ``suppressed_recipients = "refuse"``), or None to take it.
        No I/O: the host answers from the list it read."""
        ...


# ------------------------------------------------------------ path syntax


def peer_ip(address: object) -> str:
    """The client's IP address from a socket address as accept() or a
    transport gives it; ``""`` for one with none (a Unix socket)."""
    return str(address[0]) if isinstance(address, tuple) and address else ""


def parse_path(text: str) -> tuple[str, str] | None:
    """Split ``<path> params`` (RFC 5321 §4.1.2): the mailbox (``""`` for
    ``<>``; a source route ``@a,@b:`` is dropped) and the rest after the
    ``>`` (its parameters, without the leading space). None if the path is
    not one: no brackets, an unterminated quote, text glued to the ``>``."""
    if not text.startswith("<"):
        return None
    i = 1
    if text.startswith("@", i):
        route = _SOURCE_ROUTE.match(text, i)
        if route is None:
            return None
        i = route.end()
    start = i
    close = text.find(">", i)
    if close < 0:
        return None  # no ">" at all: not a path, quoted or not
    if '"' not in text[start:close]:
        i = close  # the usual path, no quoted local part: its first ">" ends it
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':  # a quoted local part may hold '>' and spaces
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            if i >= n:
                return None
        elif c == ">":
            break
        i += 1
    else:
        return None
    mailbox, rest = text[start:i], text[i + 1 :]
    if rest and not rest.startswith(" "):
        return None
    if start > 1 and not mailbox:
        return None  # "<@a:>": a route to nowhere
    return mailbox, rest.strip(" ")


def _params(text: str) -> list[tuple[str, str | None]] | None:
    """ESMTP parameters ``KEY[=VALUE] ...`` with upper-cased keys; None if
    malformed."""
    out: list[tuple[str, str | None]] = []
    for item in text.split():
        key, eq, value = item.partition("=")
        if _KEYWORD.fullmatch(key) is None or (eq and _VALUE.fullmatch(value) is None):
            return None
        out.append((key.upper(), value if eq else None))
    return out


@functools.lru_cache(maxsize=64)
def _ehlo_reply(hostname: str, size: int, starttls: bool, auth: bool) -> bytes:
    lines = [hostname, f"SIZE {size}", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"]
    if starttls:
        lines.append("STARTTLS")
    if auth:
        lines.append("AUTH PLAIN LOGIN")
    lines.append("HELP")
    body = b"".join(b"250-" + reply_line(line) for line in lines[:-1])
    return body + b"250 " + reply_line(lines[-1])


@functools.lru_cache(maxsize=64)
def _greeting(hostname: str) -> bytes:
    """The 220 banner naming ``hostname`` (made once per name)."""
    return b"220 " + reply_line(f"{hostname} ESMTP spoold")


@functools.lru_cache(maxsize=64)
def _helo_reply(hostname: str) -> bytes:
    return b"250 " + reply_line(hostname)


def has_long_line(wire: bytes, limit: int) -> bool:
    """Whether a line of ``wire`` is longer than ``limit`` octets (without
    its line ending; a bare CR or LF ends a line too)."""
    # The common case without looking at each byte: from a line's start,
    # the last LF of the next ``limit`` + 2 octets (one memrchr) ends lines
    # that are all short enough (measured up to their LF, a bare CR in them
    # only makes them shorter), except one that fills the whole window with
    # no CR before its LF; the next window starts after that LF. About one
    # step per ``limit`` octets. Otherwise (no LF there, or that one line):
    # maybe a long line, and the exact search decides from that line on.
    start = 0
    end = len(wire)
    while end - start > limit:
        lf = wire.rfind(b"\n", start, start + limit + 2)
        if lf < 0 or (lf == start + limit + 1 and wire[lf - 1] != 13):
            return _long_line(limit).search(wire, start) is not None
        start = lf + 1
    return False


@functools.lru_cache(maxsize=16)
def _long_line(limit: int) -> re.Pattern[bytes]:
    # Anchored at line starts (not after a non-EOL byte): linear time.
    return re.compile(rb"(?<![^\r\n])[^\r\n]{%d}" % (limit + 1))


# ------------------------------------------------------------ the session


class SessionState(Enum):
    """What a session takes its input as; the one state of the engine.

    The state of the transaction itself (greeted, sender, recipients) is in
    the values it collected: ``_helo``, ``_sender`` and ``_recipients``."""

    COMMAND = "command"  # a command line (the transaction goes on between them)
    DATA = "data"  # message lines, until ``CRLF . CRLF``
    AUTH = "auth"  # the client's answer to an AUTH challenge (``_auth_step`` takes it)
    CLOSED = "closed"  # nothing: the connection is closing or gone


# The states as module constants: on Python 3.11 an enum class has a
# ``__getattr__``, so each ``SessionState.X`` read is a slow attribute
# lookup (about 800 instructions); a session read them ~27 times a message.
_COMMAND: Final = SessionState.COMMAND
_DATA: Final = SessionState.DATA
_AUTH: Final = SessionState.AUTH
_CLOSED: Final = SessionState.CLOSED

_AuthStep = Callable[["SmtpSession", bytes], None]


class SmtpSession(asyncio.Protocol):
    """One SMTP connection; see the module docstring."""

    def __init__(
        self,
        host: SessionHost,
        *,
        peer: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """``peer``: the client's IP address when the caller knows it (from
        ``accept()``); None: asked of the transport. ``loop``: the running
        event loop, when the caller has it at hand (else looked up)."""
        self._host = host
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = loop
        self._policy: SessionPolicy | None = None
        self._peer = "" if peer is None else peer
        self._ask_peer = peer is None
        self._trusted = False
        self._opened = False  # open_session accepted us: close_session is owed
        self._state: SessionState = _COMMAND
        self._busy = False  # a task works for us; input waits
        self._write_paused = False
        self._reading_paused = False
        self._eof = False
        self._in = bytearray()
        self._out: list[bytes] = []
        self._discarding = False  # dropping the rest of an overlong line
        self._timer: asyncio.TimerHandle | None = None
        self._last_input = 0.0
        # Session state
        self._helo: str | None = None
        self._esmtp = False
        self._tls = False
        self._login: str | None = None
        self._auth_step: _AuthStep | None = None
        self._auth_user = b""
        self._auth_failures = 0
        self._junk = 0
        # Transaction state
        self._sender: str | None = None
        self._mail_params: tuple[str, ...] = ()
        self._smtputf8 = False
        self._recipients: list[str] = []
        self._rcpt_seen = False
        self._suppressed_rcpts = 0  # refused as suppressed: they count as recipients
        # DATA state: the message so far, after a virtual CRLF (so that an
        # empty message's ".\r\n" is found like any other end)
        self._data = bytearray()
        self._oversize = False

    # ------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's too); no cast(): a call per session.
        stream: asyncio.Transport = transport  # type: ignore[assignment]
        self._transport = stream
        if self._ask_peer:
            self._peer = peer_ip(transport.get_extra_info("peername"))
        opened = self._host.open_session(self, self._peer)
        if isinstance(opened, str):
            self._state = _CLOSED
            stream.write(reply_line(opened))
            stream.close()
            return
        self._opened = True
        self._policy, self._trusted = opened
        loop = self._loop
        if loop is None:
            self._loop = loop = asyncio.get_running_loop()
        self._last_input = loop.time()
        # call_later, not call_at: uvloop's call_at is call_later through a
        # keyword call (~1.5k instructions a session). The same deadline:
        # uvloop counts the delay from the time loop.time() just read, and
        # asyncio's is later by the microseconds between the two reads.
        self._timer = loop.call_later(self._policy.timeout, self._on_timer)
        stream.write(_greeting(self._policy.hostname))

    def data_received(self, data: bytes) -> None:
        if self._state is _CLOSED:
            return
        assert self._loop is not None
        self._last_input = self._loop.time()
        if (
            self._state is _DATA
            and not self._in
            and not (self._busy or self._write_paused or self._reading_paused)
        ):
            # A message's lines go straight into the message (not copied
            # through the input buffer first); nothing to answer before its end.
            if self._take_data(data):
                self._run()
            return
        self._in += data
        if self._busy or self._write_paused:
            if len(self._in) > _MAX_PENDING_INPUT and not self._reading_paused:
                self._pause_reading()
            return
        self._run()

    def eof_received(self) -> bool:
        self._eof = True  # answer what came before, then close
        if not self._busy:
            self._run()
        return not self._tls  # (over TLS the transport closes regardless)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._in.clear()
        self._data = bytearray()
        if self._opened:
            self._opened = False
            self._host.close_session(self, self._peer)

    def pause_writing(self) -> None:
        self._write_paused = True  # the client does not read: stop answering

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._busy:
            self._run()

    # ------------------------------------------------------ the engine

    def _run(self) -> None:
        """Answer every complete command (and message) buffered, in order,
        then write the replies in one go. Stops when work must be awaited,
        when the client stops reading, or when the session ends."""
        buf = self._in
        while not self._busy and not self._write_paused:
            state = self._state
            if state is _CLOSED:
                break
            if state is _DATA:
                if not self._take_data():
                    break
                continue
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_AUTH_LINE and not self._discarding:
                    self._discarding = True
                    # (an AUTH exchange ends)
                    self._state, self._auth_step = _COMMAND, None
                    self._error(b"500 5.5.2 Line too long\r\n")
                if self._discarding:
                    buf.clear()
                break
            line = bytes(buf[: end - 1 if end and buf[end - 1] == 13 else end])
            del buf[: end + 1]
            if self._discarding:
                self._discarding = False
                continue
            if state is _AUTH:
                step = self._auth_step
                assert step is not None
                self._state, self._auth_step = _COMMAND, None
                if len(line) > MAX_AUTH_LINE:
                    self._error(b"500 5.5.6 Authentication exchange line is too long\r\n")
                elif line == b"*":
                    self._error(b"501 5.7.0 Authentication cancelled\r\n")
                else:
                    step(self, line)
                continue
            self._command(line)
        self._flush()
        if self._state is _CLOSED:
            return
        if self._eof and not self._busy:
            self._close()
        elif self._reading_paused and not self._busy and not self._write_paused:
            self._reading_paused = False
            assert self._transport is not None
            self._transport.resume_reading()

    def _command(self, line: bytes) -> None:
        space = line.find(b" ")
        verb, arg = (line, b"") if space < 0 else (line[:space], line[space + 1 :])
        handler = _COMMANDS.get(verb.upper())
        if handler is None:
            self._error(b"500 5.5.1 Command unrecognized\r\n")
            return
        limit = handler[1]
        if len(line) + 2 > limit:
            self._error(b"500 5.5.2 Line too long\r\n")
            return
        handler[0](self, arg.strip(b" "))

    def _flush(self) -> None:
        out = self._out
        if out:
            transport = self._transport
            assert transport is not None
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if not transport.is_closing():
                transport.write(data)

    def _close(self, reply: bytes = b"") -> None:
        """Send what is pending (and ``reply``), then close."""
        if reply:
            self._out.append(reply)
        self._flush()
        self._state = _CLOSED
        self._in.clear()
        if self._transport is not None:
            self._transport.close()

    def _pause_reading(self) -> None:
        assert self._transport is not None
        self._reading_paused = True
        self._transport.pause_reading()

    def _error(self, reply: bytes) -> None:
        """A refused command: it counts as junk."""
        if not self._junk_over_limit():
            self._out.append(reply)

    def _junk_over_limit(self) -> bool:
        assert self._policy is not None
        self._junk += 1
        if self._junk <= self._policy.max_junk_commands:
            return False
        log.info("too many junk commands", peer=self._peer)
        self._close(b"421 4.7.0 Too many useless or refused commands, closing connection\r\n")
        return True

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        assert self._loop is not None and self._policy is not None
        now = self._loop.time()
        due = self._last_input + self._policy.timeout
        if self._busy:
            due = now + self._policy.timeout
        elif due <= now:
            log.info("client timed out", peer=self._peer)
            self._close(b"421 4.4.2 Timeout waiting for the client, closing connection\r\n")
            return
        self._timer = self._loop.call_at(due, self._on_timer)

    def _start_work(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work`` in the host's task group; input waits until it ends."""
        self._busy = True
        self._flush()
        try:
            self._host.spawn(work)
        except BaseException:
            self._busy = False  # nothing works for us after all
            raise

    def _work_done(self) -> None:
        self._busy = False
        if self._state is _CLOSED:
            return
        assert self._loop is not None
        self._last_input = self._loop.time()  # our time is not the client's idle time
        self._run()

    def _reset_transaction(self) -> None:
        self._sender = None
        self._mail_params = ()
        self._smtputf8 = False
        self._recipients = []
        self._rcpt_seen = False
        self._suppressed_rcpts = 0

    @property
    def _closed(self) -> bool:
        """Whether the session has ended (a property, not a narrowed
        comparison: an ``await`` may end it)."""
        return self._state is _CLOSED

    @property
    def _auth_offered(self) -> bool:
        policy = self._policy
        assert policy is not None
        return policy.auth and (self._tls or policy.tls_context is None)

    # ------------------------------------------------------- commands

    def _cmd_helo(self, arg: bytes) -> None:
        self._greet(arg, esmtp=False)

    def _cmd_ehlo(self, arg: bytes) -> None:
        self._greet(arg, esmtp=True)

    def _greet(self, arg: bytes, *, esmtp: bool) -> None:
        if not arg:
            self._error(
                b"501 5.5.4 Syntax: EHLO hostname\r\n"
                if esmtp
                else b"501 5.5.4 Syntax: HELO hostname\r\n"
            )
            return
        if self._helo is not None and self._junk_over_limit():
            return
        policy = self._policy
        assert policy is not None
        self._helo = arg.decode("utf-8", "surrogateescape")
        self._esmtp = esmtp
        self._reset_transaction()
        if esmtp:
            starttls = policy.tls_context is not None and not self._tls
            self._out.append(
                _ehlo_reply(policy.hostname, policy.max_message_size, starttls, self._auth_offered)
            )
        else:
            self._out.append(_helo_reply(policy.hostname))

    def _cmd_mail(self, arg: bytes) -> None:
        policy = self._policy
        assert policy is not None
        if self._helo is None:
            self._error(b"503 5.5.1 Send HELO or EHLO first\r\n")
            return
        if self._sender is not None:
            self._error(b"503 5.5.1 Nested MAIL command\r\n")
            return
        if policy.require_tls and not self._tls:
            self._error(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
            return
        if not self._trusted and self._login is None:
            self._error(b"530 5.7.0 Authentication required\r\n")
            return
        text = arg.decode("utf-8", "surrogateescape")
        if text[:5].upper() != "FROM:":
            self._error(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
            return
        path = parse_path(text[5:].lstrip(" "))
        if path is None:
            self._out.append(b"553 5.1.7 Bad sender address syntax\r\n")
            return
        address, rest = path
        params = _params(rest) if rest else []
        if params is None or (params and not self._esmtp):
            self._error(
                b"501 5.5.4 Bad MAIL parameters\r\n"
                if params is None
                else b"555 5.5.4 MAIL parameters need EHLO\r\n"
            )
            return
        kept: list[str] = []
        seen: set[str] = set()
        smtputf8 = False
        declared_size: int | None = None
        for key, value in params:
            if key in seen:
                self._error(b"501 5.5.4 Repeated MAIL parameter\r\n")
                return
            seen.add(key)
            if key == "SIZE":
                declared_size = None if value is None else ascii_decimal(value)
                if declared_size is None:
                    self._error(b"501 5.5.4 Syntax: SIZE=<octets>\r\n")
                    return
                if declared_size > policy.max_message_size:
                    self._out.append(
                        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
                    )
                    return
            elif key == "BODY":
                body = (value or "").upper()
                if body not in ("7BIT", "8BITMIME"):
                    self._error(b"501 5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME\r\n")
                    return
                kept.append(f"BODY={body}")
            elif key == "SMTPUTF8" and value is None:
                smtputf8 = True
                kept.append("SMTPUTF8")
            elif key == "AUTH" and value is not None and self._auth_offered:
                pass  # RFC 4954 §5: who submitted it first; we do not relay it
            else:
                self._error(b"555 5.5.4 Unsupported MAIL parameter\r\n")
                return
        try:
            validate_address(address, role="sender", smtputf8=smtputf8)
        except AddressError as exc:
            if exc.kind == "non_ascii" and not smtputf8:
                self._out.append(_NEEDS_SMTPUTF8)
            else:
                self._out.append(b"553 5.1.7 Sender address refused\r\n")
            return
        short = self._host.space_refusal(declared_size)
        if short is not None:
            self._out.append(short)
            return
        self._sender = address
        self._mail_params = tuple(kept)
        self._smtputf8 = smtputf8
        self._out.append(b"250 2.1.0 OK\r\n")

    def _cmd_rcpt(self, arg: bytes) -> None:
        policy = self._policy
        assert policy is not None
        if self._sender is None:
            self._error(b"503 5.5.1 Need MAIL before RCPT\r\n")
            return
        self._rcpt_seen = True
        text = arg.decode("utf-8", "surrogateescape")
        if text[:3].upper() != "TO:":
            self._error(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n")
            return
        path = parse_path(text[3:].lstrip(" "))
        if path is None:
            self._error(b"501 5.1.3 Bad recipient address syntax\r\n")
            return
        address, rest = path
        if rest:
            self._error(b"555 5.5.4 Unsupported RCPT parameter\r\n")
            return
        try:
            validate_address(address, role="recipient", smtputf8=self._smtputf8)
        except AddressError as exc:
            if exc.kind == "non_ascii" and not self._smtputf8:
                self._error(_NEEDS_SMTPUTF8)
            elif exc.kind in ("null", "too_long"):
                self._error(b"553 5.1.3 Recipient address not allowed\r\n")
            else:  # syntax, control, or bytes that are not UTF-8 at all
                self._error(b"501 5.1.3 Bad recipient address syntax\r\n")
            return
        if len(self._recipients) + self._suppressed_rcpts >= policy.max_recipients:
            self._error(  # refused recipients count as junk: no endless RCPTs
                reply_line(
                    f"452 4.5.3 Too many recipients (at most {policy.max_recipients} per message)"
                )
            )
            return
        if self._host.suppressions_stale():
            self._start_work(lambda: self._rcpt_after_refresh(address))
            return
        self._take_recipient(address)

    def _take_recipient(self, address: str) -> None:
        """The end of RCPT: refused if suppressed, else taken."""
        refusal = self._host.recipient_refusal(address)
        if refusal is not None:
            self._suppressed_rcpts += 1  # not junk; bounded by max_recipients
            self._out.append(refusal)
            return
        if address not in self._recipients:
            self._recipients.append(address)
        self._out.append(b"250 2.1.5 OK\r\n")

    async def _rcpt_after_refresh(self, address: str) -> None:
        """RCPT once the suppression list, changed, has been read again."""
        try:
            await self._host.refresh_suppressions()
        except Exception as exc:  # never a permanent 5xx for our own trouble
            if not isinstance(exc, StoreError):  # that one is logged by the list
                log.exception("cannot read the suppression list", peer=self._peer)
            if not self._closed:
                self._out.append(b"451 4.3.0 Local error, try again later\r\n")
                self._work_done()
            return
        if self._closed:
            return
        self._take_recipient(address)
        self._work_done()

    def _cmd_data(self, arg: bytes) -> None:
        if arg:
            self._error(b"501 5.5.4 Syntax: DATA\r\n")
        elif self._sender is None:
            self._error(b"503 5.5.1 Need MAIL command\r\n")
        elif not self._recipients:
            if self._rcpt_seen:
                self._out.append(b"554 5.5.1 No valid recipients\r\n")
            else:
                self._error(b"503 5.5.1 Need RCPT command\r\n")
        else:
            self._out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            self._state = _DATA
            self._data = bytearray(b"\r\n")
            self._oversize = False

    def _cmd_rset(self, arg: bytes) -> None:
        if arg:
            self._error(b"501 5.5.4 Syntax: RSET\r\n")
        elif not self._junk_over_limit():
            self._reset_transaction()
            self._out.append(b"250 2.0.0 OK\r\n")

    def _cmd_noop(self, arg: bytes) -> None:
        if not self._junk_over_limit():
            self._out.append(b"250 2.0.0 OK\r\n")

    def _cmd_vrfy(self, arg: bytes) -> None:
        if not arg:
            self._error(b"501 5.5.4 Syntax: VRFY address\r\n")
        elif not self._junk_over_limit():
            self._out.append(
                b"252 2.5.0 Cannot VRFY; send the message and delivery will be tried\r\n"
            )

    def _cmd_help(self, arg: bytes) -> None:
        if not self._junk_over_limit():
            self._out.append(
                b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT "
                b"STARTTLS AUTH VRFY HELP\r\n"
            )

    def _cmd_quit(self, arg: bytes) -> None:
        self._close(b"221 2.0.0 Bye\r\n")

    # ------------------------------------------------------- STARTTLS

    def _cmd_starttls(self, arg: bytes) -> None:
        policy = self._policy
        assert policy is not None and self._transport is not None
        if arg:
            self._error(b"501 5.5.4 Syntax: STARTTLS\r\n")
        elif policy.tls_context is None:
            self._error(b"502 5.5.1 STARTTLS not available\r\n")
        elif self._tls:
            self._error(b"503 5.5.1 TLS already active\r\n")
        elif not self._esmtp:
            self._error(b"503 5.5.1 Send EHLO first\r\n")
        else:
            self._out.append(b"220 2.0.0 Ready to start TLS\r\n")
            self._in.clear()  # RFC 3207: nothing sent before the handshake counts
            self._transport.pause_reading()  # the next bytes are the TLS handshake
            context = policy.tls_context
            self._start_work(lambda: self._start_tls(context))

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        assert self._loop is not None and self._policy is not None
        transport = self._transport
        assert transport is not None
        if self._closed or transport.is_closing():
            return  # the client left before the handshake
        try:
            tls = await self._loop.start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self._policy.timeout,
            )
        except OSError as exc:  # ssl.SSLError, timeouts and resets alike
            log.info("TLS handshake failed", peer=self._peer, error=str(exc))
            self._state = _CLOSED
            transport.abort()
            return
        if tls is None or self._closed:
            return
        self._transport = tls
        self._tls = True
        self._reading_paused = False
        self._helo = None  # RFC 3207 §4.2: forget what the client said before
        self._esmtp = False
        self._reset_transaction()
        self._work_done()

    # ----------------------------------------------------------- AUTH

    def _cmd_auth(self, arg: bytes) -> None:
        policy = self._policy
        assert policy is not None
        if not policy.auth:
            self._error(b"502 5.5.1 AUTH not available\r\n")
            return
        if not self._esmtp:
            self._error(b"503 5.5.1 Send EHLO first\r\n")
            return
        if not self._auth_offered:
            self._out.append(b"538 5.7.11 Encryption required: issue STARTTLS first\r\n")
            return
        if self._login is not None:
            self._error(b"503 5.5.1 Already authenticated\r\n")
            return
        if self._sender is not None:
            self._error(b"503 5.5.1 AUTH is not allowed during a mail transaction\r\n")
            return
        if self._host.auth_refused(self._peer):
            self._error(
                b"454 4.7.0 Too many failed authentication attempts from your address, "
                b"try again later\r\n"
            )
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._error(b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n")
            return
        mechanism = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mechanism == b"PLAIN":
            if initial is None:
                self._ask(b"334 \r\n", SmtpSession._auth_plain)
            else:
                self._auth_plain(b"" if initial == b"=" else initial)
        elif mechanism == b"LOGIN":
            if initial is None:
                self._ask(_LOGIN_USERNAME, SmtpSession._auth_login_user)
            else:
                self._auth_login_user(b"" if initial == b"=" else initial)
        else:
            self._error(b"504 5.5.4 Unrecognized authentication mechanism\r\n")

    def _ask(self, challenge: bytes, step: _AuthStep) -> None:
        self._out.append(challenge)
        self._state = _AUTH
        self._auth_step = step

    def _decode(self, line: bytes) -> bytes | None:
        try:
            return binascii.a2b_base64(line, strict_mode=True)
        except binascii.Error:
            self._error(b"501 5.5.2 Cannot decode the response\r\n")
            return None

    def _auth_plain(self, line: bytes) -> None:
        decoded = self._decode(line)
        if decoded is None:
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            self._auth_check(b"", None)  # malformed, or acting for someone else: a failure
        else:
            self._auth_check(parts[1], parts[2])

    def _auth_login_user(self, line: bytes) -> None:
        decoded = self._decode(line)
        if decoded is not None:
            self._auth_user = decoded
            self._ask(_LOGIN_PASSWORD, SmtpSession._auth_login_password)

    def _auth_login_password(self, line: bytes) -> None:
        decoded = self._decode(line)
        if decoded is not None:
            user, self._auth_user = self._auth_user, b""
            self._auth_check(user, decoded)

    def _auth_check(self, user: bytes, password: bytes | None) -> None:
        policy = self._policy
        assert policy is not None
        try:
            login = user.decode("utf-8")
        except UnicodeDecodeError:
            login = ""
        if password is not None and login and self._host.check_password(login, password):
            self._login = login
            log.info("authenticated", login=login, peer=self._peer)
            self._out.append(b"235 2.7.0 Authentication successful\r\n")
            return
        self._auth_failures += 1
        failures = self._auth_failures
        recent = self._host.auth_failed(self._peer)  # on every connection of the address
        log.warning(
            "authentication failed",
            login=_UNPRINTABLE.sub("?", login[:64]),
            peer=self._peer,
            failures=failures,
            recent_failures=recent,
        )
        grown = min(max(failures, recent) - 1, _MAX_AUTH_DELAY_DOUBLINGS)
        delay = policy.auth_failure_delay * 2**grown
        final = failures >= policy.max_auth_failures or self._host.auth_refused(self._peer)
        self._start_work(lambda: self._auth_failed(delay, final))

    async def _auth_failed(self, delay: float, final: bool) -> None:
        await self._host.sleep(delay)
        if self._closed:
            return
        if final:
            self._busy = False
            self._close(
                b"421 4.7.0 Too many failed authentication attempts, closing connection\r\n"
            )
            return
        self._out.append(b"535 5.7.8 Authentication credentials invalid\r\n")
        self._work_done()

    # ----------------------------------------------------------- DATA

    def _take_data(self, more: bytes | None = None) -> bool:
        """Move buffered input (or ``more``, input not buffered) into the
        message; at its end, check it and hand it over. False when more
        input is needed."""
        data = self._data
        start = max(len(data) - 4, 0)
        if more is None:
            data += self._in
            self._in.clear()
        else:
            data += more
        end = data.find(b"\r\n.\r\n", start)
        policy = self._policy
        assert policy is not None
        if end < 0:
            # At least len - 4 octets are message: the rest may be "\r\n." + "\r".
            if not self._oversize and len(data) - 4 > policy.max_message_size:
                self._oversize = True
            if self._oversize:
                del data[:-4]  # only what may begin the end marker is kept
            return False
        self._state = _COMMAND
        with memoryview(data) as view:  # one copy (a bytearray's slice is another)
            self._in += view[end + 5 :]  # pipelined commands after the message
            wire = bytes(view[2 : end + 2]) if not self._oversize else b""
        self._data = bytearray()
        if self._oversize or len(wire) > policy.max_message_size:
            self._reset_transaction()
            self._out.append(b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
            return True
        if has_long_line(wire, policy.max_line_length):
            self._reset_transaction()
            self._out.append(
                reply_line(f"500 5.5.2 Line too long (at most {policy.max_line_length} octets)")
            )
            return True
        protocol = "ESMTP" if self._esmtp else "SMTP"
        if self._esmtp and (self._tls or self._login is not None):
            protocol += ("S" if self._tls else "") + ("A" if self._login is not None else "")
        assert self._sender is not None and self._helo is not None
        delivery = Delivery(
            self._sender,
            tuple(self._recipients),
            self._mail_params,
            wire,
            self._helo,
            protocol,
            self._peer,
            self._login,
        )
        self._reset_transaction()
        self._start_work(lambda: self._deliver(delivery))
        return True

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            reply = await self._host.deliver(delivery)
        except Exception:  # never a permanent 5xx for our own trouble
            log.exception("unexpected error taking a message", peer=self._peer)
            reply = "451 4.3.0 Local error, try again later"
        if self._closed:
            return
        if reply[:3] == "250":
            self._junk = 0
        if reply[:3] == "421":
            self._busy = False
            self._close(reply_line(reply))
            return
        self._out.append(reply_line(reply))
        self._work_done()

    @property
    def busy(self) -> bool:
        """A delivery (or an AUTH check) of this session is under way."""
        return self._busy

    @property
    def buffered(self) -> int:
        """Bytes of the message under way held in memory now."""
        return len(self._data)

    def shutdown(self) -> None:
        """The listener stops: tell the client and close."""
        if not self._closed:
            self._busy = False
            self._close(b"421 4.3.2 Service shutting down, try again later\r\n")


_Handler = Callable[[SmtpSession, bytes], None]
_COMMANDS: Final[dict[bytes, tuple[_Handler, int]]] = {
    b"EHLO": (SmtpSession._cmd_ehlo, MAX_COMMAND_LINE),
    b"HELO": (SmtpSession._cmd_helo, MAX_COMMAND_LINE),
    b"MAIL": (SmtpSession._cmd_mail, MAX_MAIL_LINE),
    b"RCPT": (SmtpSession._cmd_rcpt, MAX_COMMAND_LINE),
    b"DATA": (SmtpSession._cmd_data, MAX_COMMAND_LINE),
    b"RSET": (SmtpSession._cmd_rset, MAX_COMMAND_LINE),
    b"NOOP": (SmtpSession._cmd_noop, MAX_COMMAND_LINE),
    b"QUIT": (SmtpSession._cmd_quit, MAX_COMMAND_LINE),
    b"VRFY": (SmtpSession._cmd_vrfy, MAX_COMMAND_LINE),
    b"HELP": (SmtpSession._cmd_help, MAX_COMMAND_LINE),
    b"STARTTLS": (SmtpSession._cmd_starttls, MAX_COMMAND_LINE),
    b"AUTH": (SmtpSession._cmd_auth, MAX_AUTH_LINE),
}
