"""Relay over SMTP to next hops, with a connection cache of our own.

:class:`SmtpRelay` implements :class:`spoold.relay.Relay` on
:class:`spoold.smtp_client.SmtpClient` (one client per connection), and
:class:`ConnectionCache` keeps connections per next hop (and per set of
route settings) for reuse across messages.

Before any connection, the sender and every recipient are checked with
:func:`spoold.address.validate_address` (SMTPUTF8 allowed): an invalid
recipient gets a permanent ``553 5.1.3`` result of its own and is not sent;
an invalid sender fails every recipient with ``553 5.1.7`` and no hop is
contacted. The others of the message go on: whatever is wrong with one
recipient becomes that recipient's result, never an exception.

An attempt tries ``next_hop_choices`` in order. A hop that cannot be reached
(connect, greeting, EHLO, STARTTLS or AUTH fails, or no free connection
within the give-up time) is skipped for the next; when every hop fails, the
attempt is :class:`~spoold.relay.AttemptFailed` with every hop's error. Once
a hop has greeted us, the attempt ends there:

* MAIL, every RCPT and DATA go in one write when the hop offers PIPELINING,
  one by one otherwise;
* a refusal at MAIL FROM or at DATA applies to every recipient sent;
* each RCPT reply is that recipient's result;
* recipients count as delivered only after a 2xx reply to the end of DATA;
* a 421, a disconnect, a protocol error or a timeout at any point ends the
  attempt as try-later (:class:`AttemptFailed`) and the connection is
  dropped;
* a missing extension the message needs (8BITMIME, or SMTPUTF8 for a
  non-ASCII sender or an SMTPUTF8 submission) or a message over the hop's
  SIZE limit is a permanent refusal of every recipient (554 / 552) with a
  text saying why; a non-ASCII recipient of an otherwise ASCII message on a
  hop without SMTPUTF8 fails alone (553 5.6.7).

TLS per route: ``none``, ``opportunistic`` (STARTTLS when offered) or
``required`` (a hop without it is unavailable); credentials are never sent
without TLS. The SSL context is built once per route settings.

Cache rules: at most ``max_per_hop`` connections per hop and ``max_total``
overall; a released connection or a freed slot goes to the oldest waiter; an
idle connection is closed after ``idle_timeout``; a connection idle for more
than ``check_after`` seconds is checked with NOOP before reuse; a connection
that saw 421, a protocol error or a timeout is never reused; after a
transaction that did not complete, RSET is sent before reuse.
:meth:`ConnectionCache.close_and_flush` says QUIT to every idle connection at
shutdown.

The body is streamed from its file as it is on disk (already CRLF and
dot-stuffed) in chunks read in worker threads
(:meth:`spoold.relay.BodyHandle.open`); it is never held whole in memory,
and never rewritten. Its SIZE (without the stuffing dots) and whether it
needs 8BITMIME are found by one scan in chunks, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import socket
import ssl
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import anyio
import structlog

from spoold.address import validate_address
from spoold.errors import AddressError, HopUnavailableError, SmtpError, SpooldError, StoreError
from spoold.message import Message
from spoold.relay import (
    AttemptFailed,
    BodyHandle,
    BodyReader,
    Delivery,
    RecipientResult,
    RelayOutcome,
)
from spoold.smtp_client import SmtpClient, SmtpReply

__all__ = [
    "RouteSettings",
    "ConnectionCache",
    "SmtpRelay",
    "HopUnavailableError",
    "load_auth_file",
    "read_private_file",
    "parse_hop",
]

log = structlog.get_logger("spoold.relay")

TlsMode = Literal["none", "opportunistic", "required"]


@dataclass(frozen=True, slots=True)
class RouteSettings:
    """How to talk to the next hops of one route. Hashable: it is part of
    the cache key, so a reload with new settings never reuses an old
    connection."""

    tls: TlsMode = "opportunistic"
    verify_certificates: bool = True
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    auth: tuple[str, str] | None = field(default=None, repr=False)
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    message_timeout: float = 600.0
    # DATA may take command_timeout plus one second per data_rate bytes.
    data_rate: int = 64 * 1024
    helo_name: str | None = None

    def data_timeout(self, size: int) -> float:
        return self.command_timeout + size / self.data_rate


def read_private_file(path: str | os.PathLike[str]) -> str:
    """The text of a secrets file that only its owner may read."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            text = f.read().decode("utf-8")
    except OSError as exc:
        raise SpooldError(f"auth file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SpooldError(
            f"auth file {path} is readable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); make it 0600"
        )
    return text


def load_auth_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    """Read ``user:password`` from a file that only its owner may read."""
    text = read_private_file(path).strip()
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise SpooldError(f"auth file {path}: expected one line 'user:password'")
    return user, password


def parse_hop(hop: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` (port defaults to 25)."""
    port: str | None
    if hop.startswith("["):
        host, bracket, rest = hop[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"next hop {hop!r}: expected [address]:port")
        port = rest[1:] if rest else None
    elif hop.count(":") == 1:
        host, _, port = hop.partition(":")
    elif ":" in hop:
        raise ValueError(f"next hop {hop!r}: write an IPv6 address as [address]:port")
    else:
        host, port = hop, None
    if not host:
        raise ValueError(f"next hop {hop!r}: no host")
    if port == "":
        raise ValueError(f"next hop {hop!r}: empty port")
    try:
        number = 25 if port is None else int(port)
    except ValueError:
        raise ValueError(f"next hop {hop!r}: port is not a number") from None
    if not 0 < number < 65536:
        raise ValueError(f"next hop {hop!r}: port out of range")
    return host, number


def _result(reply: SmtpReply) -> RecipientResult:
    return RecipientResult(reply.code, reply.text, reply.enhanced_status)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------- cache


_Key = tuple[str, RouteSettings]


@dataclass(eq=False)
class _Connection:
    client: SmtpClient
    key: _Key
    last_used: float = field(default_factory=time.monotonic)
    transactions: int = 0
    expiry: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Waiter:
    """One acquirer waiting its turn: it is handed a connection, or a slot
    (already counted) in which to open one."""

    key: _Key
    seq: int
    event: anyio.Event = field(default_factory=anyio.Event)
    conn: _Connection | None = None
    slot: bool = False


class ConnectionCache:
    """Open SMTP connections per (next hop, route settings).

    Waiters are served first come, first served: a released connection, or
    a freed slot, is handed to the oldest waiter for it, so under load no
    message waits longer than its turn.
    """

    def __init__(
        self,
        *,
        max_per_hop: int = 10,
        max_total: int = 100,
        idle_timeout: float = 30.0,
        check_after: float = 2.0,
        acquire_timeout: float = 60.0,
    ) -> None:
        self.max_per_hop = max_per_hop
        self.max_total = max_total
        self.idle_timeout = idle_timeout
        self.check_after = check_after
        self.acquire_timeout = acquire_timeout
        self._idle: dict[_Key, list[_Connection]] = {}
        self._open: dict[_Key, int] = {}
        self._total = 0
        self._waiters: dict[_Key, deque[_Waiter]] = {}
        self._seq = itertools.count()
        self._closing = False
        self._local_name: str | None = None
        self.connections_made = 0

    @property
    def open_connections(self) -> int:
        return self._total

    @property
    def idle_connections(self) -> int:
        return sum(len(v) for v in self._idle.values())

    # -- slots and hand-off

    def _has_room(self, key: _Key) -> bool:
        if self._open.get(key, 0) >= self.max_per_hop:
            return False
        return self._total < self.max_total or self._evict_idle_elsewhere(key)

    def _take_slot(self, key: _Key) -> None:
        self._open[key] = self._open.get(key, 0) + 1
        self._total += 1

    def _free_slot(self, key: _Key) -> None:
        self._open[key] -= 1
        self._total -= 1
        self._serve_waiters()

    def _serve_waiters(self) -> None:
        """Hand idle connections and free slots to waiters, oldest first."""
        while True:
            queues = [q for q in self._waiters.values() if q]
            if not queues:
                return
            served = False
            for q in sorted(queues, key=lambda q: q[0].seq):
                w = q[0]
                idle = self._idle.get(w.key)
                if idle:
                    w.conn = self._unidle(idle.pop())
                elif self._has_room(w.key):
                    self._take_slot(w.key)
                    w.slot = True
                else:
                    continue
                q.popleft()
                w.event.set()
                served = True
                break
            if not served:
                return

    def _unidle(self, conn: _Connection) -> _Connection:
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        return conn

    def _drop(self, conn: _Connection) -> None:
        """Close without a goodbye (the connection is suspect or expired)."""
        self._unidle(conn)
        conn.client.close()
        self._free_slot(conn.key)

    def _expire(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key, [])
        if conn in idle:
            idle.remove(conn)
            conn.expiry = None
            self._drop(conn)

    def _evict_idle_elsewhere(self, key: _Key) -> bool:
        """Close the least recently used idle connection of another hop to
        make room under ``max_total``."""
        oldest: _Connection | None = None
        for k, conns in self._idle.items():
            if k != key and conns and (oldest is None or conns[0].last_used < oldest.last_used):
                oldest = conns[0]
        if oldest is None:
            return False
        self._idle[oldest.key].remove(oldest)
        self._unidle(oldest)
        oldest.client.close()
        self._open[oldest.key] -= 1
        self._total -= 1
        return True

    # -- public

    @asynccontextmanager
    async def connection(self, hop: str, settings: RouteSettings) -> AsyncIterator[_Connection]:
        """A connection to ``hop``, reused or new; returned to the cache
        afterwards if the body ended normally (and the client is still in
        step with the server), dropped otherwise.

        Raises :class:`HopUnavailableError` if none can be had.
        """
        conn = await self._acquire(hop, settings)
        healthy = False
        try:
            yield conn
            healthy = True
        finally:
            if healthy:
                self.release(conn)
            else:
                self._drop(conn)

    async def _acquire(self, hop: str, settings: RouteSettings) -> _Connection:
        key = (hop, settings)
        deadline = time.monotonic() + self.acquire_timeout
        while True:
            if self._closing:
                raise HopUnavailableError(f"{hop}: relay is shutting down")
            conn: _Connection | None = None
            slot = False
            queue = self._waiters.setdefault(key, deque())
            idle = self._idle.get(key)
            if not queue and idle:
                conn = self._unidle(idle.pop())  # most recently used first
            elif not queue and self._has_room(key):
                self._take_slot(key)
                slot = True
            else:
                waiter = _Waiter(key, next(self._seq))
                queue.append(waiter)
                try:
                    with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                        await waiter.event.wait()
                except BaseException:
                    self._give_back(waiter)  # cancelled: pass on what we were handed
                    raise
                if not waiter.event.is_set():
                    queue.remove(waiter)
                    raise HopUnavailableError(
                        f"{hop}: no free connection within {self.acquire_timeout:g}s"
                    )
                conn, slot = waiter.conn, waiter.slot
                if conn is None and not slot:
                    continue  # woken without a grant (shutting down)
            if conn is not None:
                if await self._usable(conn):
                    return conn
                continue  # it was dropped (and its slot passed on); try again
            assert slot
            try:
                client = await self._connect(hop, settings)
            except BaseException:
                self._free_slot(key)
                raise
            self.connections_made += 1
            return _Connection(client, key)

    def _give_back(self, waiter: _Waiter) -> None:
        queue = self._waiters.get(waiter.key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
        if waiter.conn is not None:
            self.release(waiter.conn)
        elif waiter.slot:
            self._free_slot(waiter.key)

    async def _usable(self, conn: _Connection) -> bool:
        idle_for = time.monotonic() - conn.last_used
        if not conn.client.usable or idle_for > self.idle_timeout:
            self._drop(conn)  # gone, out of step, or expired while its timer was late
            return False
        if idle_for <= self.check_after:
            return True
        try:
            reply = await conn.client.noop(timeout=min(10.0, conn.key[1].command_timeout))
        except SmtpError:
            self._drop(conn)
            return False
        if reply.code != 250:
            self._drop(conn)
            return False
        return True

    def release(self, conn: _Connection) -> None:
        """Give a healthy connection back: to the oldest waiter, or idle."""
        if self._closing or not conn.client.usable:
            self._drop(conn)
            return
        conn.last_used = time.monotonic()
        conn.expiry = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire, conn)
        self._idle.setdefault(conn.key, []).append(conn)
        self._serve_waiters()

    async def warm(self, hop: str, settings: RouteSettings, count: int) -> int:
        """Open up to ``count`` idle connections to ``hop`` ahead of need;
        returns how many are idle for it afterwards. Failures are logged."""
        key = (hop, settings)
        while len(self._idle.get(key, [])) < count and self._has_room(key):
            self._take_slot(key)
            try:
                client = await self._connect(hop, settings)
            except HopUnavailableError as exc:
                self._free_slot(key)
                log.warning("could not warm a connection", hop=hop, error=str(exc))
                break
            self.connections_made += 1
            self.release(_Connection(client, key))
        return len(self._idle.get(key, []))

    async def close_and_flush(self) -> None:
        """Take no more connections out; QUIT every idle one."""
        self._closing = True
        for queue in self._waiters.values():
            for w in queue:
                w.event.set()  # they wake, see no grant... and give up
        idle = [self._unidle(c) for conns in self._idle.values() for c in conns]
        self._idle.clear()
        for conn in idle:
            with contextlib.suppress(SmtpError), anyio.move_on_after(5):
                await conn.client.quit(timeout=min(5.0, conn.key[1].command_timeout))
            conn.client.close()
            self._open[conn.key] -= 1
            self._total -= 1

    # -- opening

    async def _helo_name(self, settings: RouteSettings) -> str:
        """The route's HELO name, or this host's name (looked up once, in a
        worker thread: it may ask DNS)."""
        if settings.helo_name:
            return settings.helo_name
        if self._local_name is None:
            name = await anyio.to_thread.run_sync(socket.getfqdn)
            usable = name.isascii() and "." in name and all(c.isalnum() or c in ".-" for c in name)
            self._local_name = name if usable else "localhost.localdomain"
        return self._local_name

    async def _connect(self, hop: str, settings: RouteSettings) -> SmtpClient:
        """A new connection to ``hop``, greeted, EHLO'd, with TLS and AUTH
        as the route says; every failure is :class:`HopUnavailableError`."""
        host, port = parse_hop(hop)
        name = await self._helo_name(settings)
        try:
            context = _tls_context(settings) if settings.tls != "none" else None
        except (OSError, ssl.SSLError) as exc:
            raise HopUnavailableError(f"{hop}: cannot set up TLS: {_describe(exc)}") from exc
        try:
            client = await SmtpClient.connect(
                host,
                port,
                connect_timeout=settings.connect_timeout,
                command_timeout=settings.command_timeout,
            )
        except SmtpError as exc:
            raise HopUnavailableError(f"{hop}: {exc}") from exc
        try:
            await client.hello(name)
            if context is not None and client.supports("STARTTLS"):
                await client.starttls(context, server_hostname=host)
                await client.hello(name)
            if settings.tls == "required" and not client.tls_active:
                raise HopUnavailableError(  # noqa: TRY301
                    f"{hop}: TLS is required but the hop does not offer STARTTLS"
                )
            if settings.auth is not None:
                if not client.tls_active:
                    raise HopUnavailableError(  # noqa: TRY301
                        f"{hop}: refusing to send credentials without TLS (STARTTLS not offered)"
                    )
                await client.authenticate(*settings.auth)
        except HopUnavailableError:
            client.close()
            raise
        except SmtpError as exc:
            client.close()
            raise HopUnavailableError(f"{hop}: {exc}") from exc
        except BaseException:
            client.close()
            raise
        return client


@functools.lru_cache(maxsize=64)
def _tls_context(settings: RouteSettings) -> ssl.SSLContext:
    """One context per route settings (reading the CA bundle is slow: done
    once, not per connection)."""
    context = ssl.create_default_context(cafile=settings.ca_file)
    if not settings.verify_certificates:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.client_cert:
        context.load_cert_chain(settings.client_cert, settings.client_key)
    return context


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return _one_line(str(exc)) or type(exc).__name__


# ----------------------------------------------------------------- relay


class _TryLater(Exception):
    """The attempt ends on this hop as try-later; the connection is dropped."""


@dataclass(frozen=True, slots=True)
class _Checked:
    """The recipients of an attempt after validation: those to send, and
    the results of those that will not be sent."""

    sendable: list[str]
    refused: dict[str, RecipientResult]


def _check_recipients(recipients: Sequence[str]) -> _Checked:
    sendable: list[str] = []
    refused: dict[str, RecipientResult] = {}
    for rcpt in dict.fromkeys(recipients):  # a recipient listed twice gets one RCPT
        try:
            validate_address(rcpt, role="recipient", smtputf8=True)
        except AddressError as exc:
            refused[rcpt] = RecipientResult(553, f"recipient cannot be relayed: {exc}", "5.1.3")
        else:
            sendable.append(rcpt)
    return _Checked(sendable, refused)


class SmtpRelay:
    """Relays messages over SMTP through a :class:`ConnectionCache`.

    ``settings_for(hop, message)`` gives the route settings for a next hop
    (the daemon reads them from its current routes, so a reload applies).
    """

    def __init__(
        self,
        settings_for: Callable[[str, Message], RouteSettings] | RouteSettings | None = None,
        cache: ConnectionCache | None = None,
    ) -> None:
        if settings_for is None:
            settings_for = RouteSettings()
        if isinstance(settings_for, RouteSettings):
            fixed = settings_for
            self.settings_for: Callable[[str, Message], RouteSettings] = lambda _h, _m: fixed
        else:
            self.settings_for = settings_for
        self.cache = cache or ConnectionCache()

    async def relay(
        self, message: Message, body: BodyHandle, recipients: Sequence[str]
    ) -> RelayOutcome:
        sender = message.envelope_info.sender
        try:
            validate_address(sender, role="sender", smtputf8=True)
        except AddressError as exc:
            bad_sender = RecipientResult(553, f"sender cannot be relayed: {exc}", "5.1.7")
            return Delivery(dict.fromkeys(recipients, bad_sender))
        checked = _check_recipients(recipients)
        if not checked.sendable:
            return Delivery(checked.refused)
        try:
            async with body.open() as content:
                outcome = await self._to_next_hops(message, content, checked.sendable)
        except StoreError as exc:
            return AttemptFailed(str(exc))
        if isinstance(outcome, Delivery) and checked.refused:
            results = {**checked.refused, **outcome.recipients}
            return Delivery({r: results[r] for r in dict.fromkeys(recipients)}, outcome.hop)
        return outcome

    async def _to_next_hops(
        self, message: Message, content: BodyReader, recipients: list[str]
    ) -> RelayOutcome:
        hop_errors: list[str] = []
        for hop in message.next_hop_choices:
            settings = self.settings_for(hop, message)
            try:
                with anyio.fail_after(settings.message_timeout):
                    async with self.cache.connection(hop, settings) as conn:
                        return await self._transaction(
                            conn, hop, settings, message, content, recipients
                        )
            except HopUnavailableError as exc:
                hop_errors.append(str(exc))
                log.warning(
                    "next hop unavailable",
                    id=message.id,
                    flows=message.flows,
                    hop=hop,
                    error=str(exc),
                )
            except _TryLater as exc:
                return AttemptFailed(f"{hop}: {exc}")
            except TimeoutError:
                return AttemptFailed(
                    f"{hop}: timeout: no answer within the message timeout of "
                    f"{settings.message_timeout:g}s"
                )
        return AttemptFailed("no hops available: " + "; ".join(hop_errors))

    async def _transaction(
        self,
        conn: _Connection,
        hop: str,
        settings: RouteSettings,
        message: Message,
        content: BodyReader,
        recipients: list[str],
    ) -> Delivery:
        client = conn.client
        env = message.envelope_info
        params = {p.upper() for p in env.mail_params}
        facts = await content.facts()
        size = facts.content_size

        def everyone(code: int, enhanced: str, text: str) -> Delivery:
            return Delivery(dict.fromkeys(recipients, RecipientResult(code, text, enhanced)), hop)

        options: list[str] = []
        limit = client.size_limit
        if limit is not None:
            if 0 < limit < size:
                return everyone(
                    552, "5.3.4", f"message of {size} bytes exceeds {hop}'s limit of {limit}"
                )
            options.append(f"SIZE={size}")
        if facts.eight_bit or "BODY=8BITMIME" in params:
            if not client.supports("8BITMIME"):
                return everyone(
                    554, "5.6.3", f"{hop} does not offer 8BITMIME, which this message needs"
                )
            options.append("BODY=8BITMIME")
        hop_utf8 = client.supports("SMTPUTF8")
        message_needs_utf8 = "SMTPUTF8" in params or not env.sender.isascii()
        if message_needs_utf8 and not hop_utf8:
            return everyone(
                554, "5.6.7", f"{hop} does not offer SMTPUTF8, which this message needs"
            )
        results: dict[str, RecipientResult] = {}
        to_send = recipients
        if not hop_utf8:
            to_send = []
            for rcpt in recipients:
                if rcpt.isascii():
                    to_send.append(rcpt)
                else:
                    results[rcpt] = RecipientResult(
                        553,
                        f"{hop} does not offer SMTPUTF8, which this non-ASCII recipient needs",
                        "5.6.7",
                    )
        use_utf8 = hop_utf8 and (message_needs_utf8 or not all(r.isascii() for r in to_send))
        if use_utf8:
            options.append("SMTPUTF8")
        encoding = "utf-8" if use_utf8 else "ascii"
        sent: list[str] = []
        rcpt_lines: list[bytes] = []
        for rcpt in to_send:
            try:
                rcpt_lines.append(f"RCPT TO:<{rcpt}>\r\n".encode(encoding))
            except ValueError as exc:  # cannot happen after validation; never fail the others
                results[rcpt] = RecipientResult(553, f"recipient cannot be relayed: {exc}", "5.1.3")
            else:
                sent.append(rcpt)
        if not sent:
            return Delivery(results, hop)
        mail_line = " ".join([f"MAIL FROM:<{env.sender}>", *options]) + "\r\n"
        try:
            replies = await client.send_envelope(mail_line.encode(encoding), rcpt_lines)
            if not replies.mail.positive:
                await self._reset(client, replies.data)
                results.update(dict.fromkeys(sent, _result(replies.mail)))
                return Delivery(results, hop)
            accepted: list[str] = []
            for rcpt, reply in zip(sent, replies.rcpts, strict=True):
                assert reply is not None  # MAIL was accepted: every RCPT was sent
                results[rcpt] = _result(reply)
                if reply.positive:
                    accepted.append(rcpt)
            data = replies.data
            if not accepted or data is None or data.code != 354:
                if accepted and data is not None:
                    results.update(dict.fromkeys(accepted, _result(data)))
                await self._reset(client, data)
                return Delivery(results, hop)
            final = await client.send_content(
                content.chunks(), timeout=settings.data_timeout(content.size)
            )
            results.update(dict.fromkeys(accepted, _result(final)))
            if final.positive:
                conn.transactions += 1
            else:
                await self._reset(client, None)
            return Delivery(results, hop)
        except SmtpError as exc:
            raise _TryLater(str(exc)) from None

    @staticmethod
    async def _reset(client: SmtpClient, data: SmtpReply | None) -> None:
        """After an incomplete transaction: end a DATA the server accepted
        (with PIPELINING, DATA may get 354 although no recipient was
        accepted: RFC 2920 says to send the lone "."), then RSET. If that
        fails the client is closed (the cache then drops it); the replies
        already received still stand."""
        try:
            if data is not None and data.code == 354:
                await client.send_content(None, timeout=client.command_timeout)
            reply = await client.rset()
        except SmtpError:
            client.close()
            return
        if reply.code != 250:
            client.close()

    async def close_and_flush(self) -> None:
        await self.cache.close_and_flush()
