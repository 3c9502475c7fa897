"""Relay over SMTP to next hops, with a connection cache of our own.

:class:`SmtpRelay` implements :class:`spoold.relay.Relay` with aiosmtplib.
aiosmtplib gives one connection per client object and no pool, so
:class:`ConnectionCache` keeps connections per next hop (and per set of
route settings) for reuse across messages.

An attempt tries ``next_hop_choices`` in order. A hop that cannot be reached
(connect, greeting, EHLO, STARTTLS or AUTH fails, or no free connection
within the give-up time) is skipped for the next; when every hop fails, the
attempt is :class:`~spoold.relay.AttemptFailed` with every hop's error. Once
a hop has greeted us, the attempt ends there:

* a refusal at MAIL FROM or at DATA applies to every recipient;
* each RCPT reply is that recipient's result;
* recipients count as delivered only after a 2xx reply to the end of DATA;
* a 421, a disconnect or a timeout at any point ends the attempt as
  try-later (:class:`AttemptFailed`) and the connection is dropped;
* a missing extension the message needs (8BITMIME, SMTPUTF8) or a message
  over the hop's SIZE limit is a permanent refusal (554 / 552) with a text
  saying why.

Cache rules: at most ``max_per_hop`` connections per hop and ``max_total``
overall; an idle connection is closed after ``idle_timeout``; a connection
idle for more than ``check_after`` seconds is checked with NOOP before reuse;
a connection that saw 421, a protocol error or a timeout is never reused;
after a transaction that did not complete, RSET is sent before reuse.
:meth:`ConnectionCache.close_and_flush` says QUIT to every idle connection at
shutdown. The body is read from disk in a worker thread and sent from
memory; the file is never rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import re
import ssl
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib
import anyio
import structlog

from spoold.errors import SpooldError
from spoold.message import Message
from spoold.relay import AttemptFailed, BodyHandle, Delivery, RecipientResult, RelayOutcome

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
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")
_NEEDS_8BIT = re.compile(rb"[\x80-\xff]")


class HopUnavailableError(SpooldError):
    """This next hop could not be used for the attempt (try the next one)."""


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


def _result(code: int, text: str) -> RecipientResult:
    m = _ENHANCED.match(text)
    if m:
        return RecipientResult(code, text[m.end() :], m.group(1))
    return RecipientResult(code, text)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------- cache


_Key = tuple[str, RouteSettings]


@dataclass(eq=False)
class _Connection:
    smtp: aiosmtplib.SMTP
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
        conn.smtp.close()
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
        oldest.smtp.close()
        self._open[oldest.key] -= 1
        self._total -= 1
        return True

    # -- public

    @asynccontextmanager
    async def connection(self, hop: str, settings: RouteSettings) -> AsyncIterator[_Connection]:
        """A connection to ``hop``, reused or new; returned to the cache
        afterwards if the body ended normally, dropped otherwise.

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
                smtp = await _connect(hop, settings)
            except BaseException:
                self._free_slot(key)
                raise
            self.connections_made += 1
            return _Connection(smtp, key)

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
        if not conn.smtp.is_connected or idle_for > self.idle_timeout:
            self._drop(conn)  # gone, or expired while its timer was late
            return False
        if idle_for <= self.check_after:
            return True
        try:
            reply = await conn.smtp.noop(timeout=min(10.0, conn.key[1].command_timeout))
        except (aiosmtplib.SMTPException, OSError):
            self._drop(conn)
            return False
        if reply.code != 250:
            self._drop(conn)
            return False
        return True

    def release(self, conn: _Connection) -> None:
        """Give a healthy connection back: to the oldest waiter, or idle."""
        if self._closing or not conn.smtp.is_connected:
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
                smtp = await _connect(hop, settings)
            except (HopUnavailableError, aiosmtplib.SMTPException, OSError) as exc:
                self._free_slot(key)
                log.warning("could not warm a connection", hop=hop, error=str(exc))
                break
            self.connections_made += 1
            self.release(_Connection(smtp, key))
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
            with contextlib.suppress(aiosmtplib.SMTPException, OSError), anyio.move_on_after(5):
                await conn.smtp.quit()
            conn.smtp.close()
            self._open[conn.key] -= 1
            self._total -= 1


async def _connect(hop: str, settings: RouteSettings) -> aiosmtplib.SMTP:
    host, port = parse_hop(hop)
    tls_context = _tls_context(settings) if settings.tls != "none" else None
    smtp = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        timeout=settings.command_timeout,
        local_hostname=settings.helo_name,
        start_tls={"none": False, "opportunistic": None, "required": True}[settings.tls],
        tls_context=tls_context,
    )
    try:
        await smtp.connect(timeout=settings.connect_timeout)
        # connect() leaves EHLO for later when it did not upgrade to TLS, and
        # forgets the extensions after STARTTLS: ask now, since SIZE,
        # 8BITMIME, SMTPUTF8 and AUTH are read before MAIL.
        if smtp.is_ehlo_or_helo_needed:
            try:
                await smtp.ehlo()
            except aiosmtplib.SMTPHeloError:
                await smtp.helo()
        if settings.tls == "required" and not _tls_on(smtp):
            raise HopUnavailableError(f"{hop}: TLS is required but the hop does not offer it")  # noqa: TRY301
        if settings.auth is not None:
            if not _tls_on(smtp):
                raise HopUnavailableError(  # noqa: TRY301
                    f"{hop}: refusing to send credentials without TLS (STARTTLS not offered)"
                )
            await _authenticate(smtp, hop, settings.auth)
    except HopUnavailableError:
        smtp.close()
        raise
    except aiosmtplib.SMTPTimeoutError as exc:
        smtp.close()
        raise HopUnavailableError(f"{hop}: timeout: {_describe(exc)}") from exc
    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
        smtp.close()
        raise HopUnavailableError(f"{hop}: {_describe(exc)}") from exc
    return smtp


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


def _tls_on(smtp: aiosmtplib.SMTP) -> bool:
    transport = smtp.transport
    return transport is not None and transport.get_extra_info("sslcontext") is not None


async def _authenticate(smtp: aiosmtplib.SMTP, hop: str, auth: tuple[str, str]) -> None:
    user, password = auth
    methods = {m.lower() for m in smtp.server_auth_methods}
    if "plain" in methods:
        await smtp.auth_plain(user, password)
    elif "login" in methods:
        await smtp.auth_login(user, password)
    else:
        raise HopUnavailableError(f"{hop}: offers neither AUTH PLAIN nor AUTH LOGIN")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {_one_line(exc.message)}"
    if isinstance(exc, aiosmtplib.SMTPException):
        return _one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return _one_line(str(exc)) or type(exc).__name__


# ----------------------------------------------------------------- relay


class _TryLater(Exception):
    """The attempt ends on this hop as try-later; the connection is dropped."""


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
        wire = await body.read()
        content = wire.content()
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
                    f"{hop}: no answer within the message timeout of {settings.message_timeout:g}s"
                )
        return AttemptFailed("no hops available: " + "; ".join(hop_errors))

    async def _transaction(
        self,
        conn: _Connection,
        hop: str,
        settings: RouteSettings,
        message: Message,
        content: bytes,
        recipients: Sequence[str],
    ) -> Delivery:
        smtp = conn.smtp
        env = message.envelope_info
        options: list[str] = []
        needs_utf8 = "SMTPUTF8" in (p.upper() for p in env.mail_params) or any(
            not a.isascii() for a in [env.sender, *recipients]
        )
        needs_8bit = _NEEDS_8BIT.search(content) is not None or any(
            p.upper() == "BODY=8BITMIME" for p in env.mail_params
        )

        def everyone(code: int, text: str) -> Delivery:
            result = _result(code, text)
            return Delivery(dict.fromkeys(recipients, result), hop)

        if smtp.supports_extension("size"):
            limit = smtp.esmtp_extensions.get("size", "")
            if limit.isdigit() and 0 < int(limit) < len(content):
                return everyone(
                    552, f"5.3.4 message of {len(content)} bytes exceeds {hop}'s limit of {limit}"
                )
            options.append(f"SIZE={len(content)}")
        if needs_8bit:
            if not smtp.supports_extension("8bitmime"):
                return everyone(
                    554, f"5.6.3 {hop} does not offer 8BITMIME, which this message needs"
                )
            options.append("BODY=8BITMIME")
        if needs_utf8:
            if not smtp.supports_extension("smtputf8"):
                return everyone(
                    554, f"5.6.7 {hop} does not offer SMTPUTF8, which this message needs"
                )
            options.append("SMTPUTF8")
        encoding = "utf-8" if needs_utf8 else "ascii"
        try:
            try:
                await smtp.mail(env.sender, options=options, encoding=encoding)
            except aiosmtplib.SMTPSenderRefused as exc:
                self._check_421(exc)
                await self._reset(conn)
                return everyone(exc.code, exc.message)
            results: dict[str, RecipientResult] = {}
            accepted: list[str] = []
            for rcpt in recipients:
                try:
                    reply = await smtp.rcpt(rcpt, encoding=encoding)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    self._check_421(exc)
                    results[rcpt] = _result(exc.code, exc.message)
                else:
                    results[rcpt] = _result(reply.code, reply.message)
                    accepted.append(rcpt)
            if not accepted:
                await self._reset(conn)
                return Delivery(results, hop)
            try:
                reply = await smtp.data(content, timeout=settings.data_timeout(len(content)))
            except aiosmtplib.SMTPDataError as exc:
                self._check_421(exc)
                await self._reset(conn)
                refused = _result(exc.code, exc.message)
                results.update(dict.fromkeys(accepted, refused))
                return Delivery(results, hop)
            done = _result(reply.code, reply.message)
            results.update(dict.fromkeys(accepted, done))
            conn.transactions += 1
            return Delivery(results, hop)
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise _TryLater(f"connection lost: {_describe(exc)}") from None
        except aiosmtplib.SMTPTimeoutError as exc:
            raise _TryLater(f"timeout: {_describe(exc)}") from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _TryLater(f"protocol error: {_describe(exc)}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _TryLater(_describe(exc)) from None

    @staticmethod
    def _check_421(exc: aiosmtplib.SMTPResponseException) -> None:
        if exc.code == 421:
            raise _TryLater(f"421 {_one_line(exc.message)}")

    @staticmethod
    async def _reset(conn: _Connection) -> None:
        """After an incomplete transaction: RSET. If that fails the
        connection is closed (the cache then drops it); the replies already
        received still stand."""
        try:
            reply = await conn.smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            conn.smtp.close()
            return
        if reply.code != 250:
            conn.smtp.close()

    async def close_and_flush(self) -> None:
        await self.cache.close_and_flush()
