"""Open SMTP connections to next hops, kept for reuse across messages.

:class:`RouteSettings` says how to talk to the hops of one route (TLS,
credentials, timeouts); :class:`ConnectionCache` keeps connections per
(next hop, route settings), opening them with the route's TLS and AUTH.

Rules: at most ``max_per_hop`` connections per hop and ``max_total``
overall (an idle connection of another hop is closed to make room); a
released connection or a freed slot goes to the oldest waiter, so under
load no message waits longer than its turn; a waiter gives up after
``acquire_timeout``; an idle connection is closed after ``idle_timeout``;
one idle for more than ``check_after`` seconds is checked with NOOP before
reuse; a connection the relay does not hand back healthy is dropped.
:meth:`ConnectionCache.close_and_flush` says QUIT to every idle connection
at shutdown.

Opening a connection (greeting, EHLO, STARTTLS, AUTH) either gives a ready
:class:`~spoold.smtp_client.SmtpClient` or raises
:class:`~spoold.errors.HopUnavailableError` saying why: TLS ``none``,
``opportunistic`` (STARTTLS when offered) or ``required`` (a hop without it
is unavailable); credentials are never sent without TLS; an SSL context is
built once per CA file, client certificate and kind of check
(:class:`TlsContexts`, in a worker thread: it reads files). The name sent in EHLO is the settings'
``helo_name``, else this machine's (:func:`~spoold.hostname.local_hostname`).

A connection whose settings carry a TLS policy requirement
(:class:`~spoold.tls_policy.TlsRequirement`, set by the relay for an MX
route's ``tls_policy``) must get STARTTLS whatever the route's ``tls``
says; its certificate is checked as the requirement says (PKIX and the
host name even when the route has ``verify_certificates = false``, or
against the host's TLSA records for DANE: its DANE-EE records after the
handshake, or, when it has only DANE-TA ones, the handshake's own check
of the chain and the name against their trust anchors), and every failure names the
policy (``TLS policy (DANE): ...``). The requirement is part of the
settings, hence of the cache key: a connection is only lent to messages
whose policy asks exactly what it was checked for.

Host names are resolved by the event loop's resolver (the system's:
``/etc/hosts``, then DNS), or by ``resolve_host`` when one is given (the
daemon's ``[dns] nameservers``): its addresses are tried in order, and
the name itself stays the TLS server name.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import math
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Literal

import anyio
import msgspec

from spoold.dane import DANE_EE, certificate_matches, trust_anchors
from spoold.errors import HopUnavailableError, SmtpError, SmtpReplyError, SmtpTlsError
from spoold.hops import ResolveHost, parse_hop
from spoold.hostname import local_hostname
from spoold.smtp_client import SmtpClient
from spoold.tls_policy import TlsRequirement

__all__ = [
    "TlsMode",
    "RouteSettings",
    "ResolveHost",
    "ConnectionCache",
    "CacheSettings",
    "Connection",
    "ContextKey",
    "TlsContexts",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_MESSAGE_TIMEOUT",
    "DEFAULT_FINAL_REPLY_TIMEOUT",
    "DEFAULT_MAX_PER_HOP",
    "DEFAULT_MAX_TOTAL",
    "DEFAULT_IDLE_TIMEOUT",
]

# The one place these defaults are written (the daemon's config reads them).
DEFAULT_CONNECT_TIMEOUT = 30.0  # seconds
DEFAULT_COMMAND_TIMEOUT = 300.0
DEFAULT_MESSAGE_TIMEOUT = 600.0
DEFAULT_FINAL_REPLY_TIMEOUT = 600.0
DEFAULT_MAX_PER_HOP = 10
DEFAULT_MAX_TOTAL = 100
DEFAULT_IDLE_TIMEOUT = 30.0


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
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    message_timeout: float = DEFAULT_MESSAGE_TIMEOUT
    # The wait for the reply to the final "." (RFC 5321 4.5.3.2.6: 10 min),
    # not counted in message_timeout.
    final_reply_timeout: float = DEFAULT_FINAL_REPLY_TIMEOUT
    # The final reply may take one second more per data_rate bytes.
    data_rate: int = 64 * 1024
    helo_name: str | None = None  # what we say in EHLO; None: this machine's name
    # What an MX route's TLS policy asks of this connection (STARTTLS
    # required, and a PKIX or DANE check of the certificate); None: the
    # route's own tls and verify_certificates (spoold.tls_policy).
    tls_policy: TlsRequirement | None = None
    # False: a connection lives one use (QUIT after it, never kept idle):
    # what a fleet-wide connection limit counts (spoold.fleet_slots).
    reuse: bool = True

    def data_timeout(self, size: int) -> float:
        """Kept for callers of earlier versions: ``command_timeout`` plus a
        second per ``data_rate`` bytes. The relay waits for the final reply
        :meth:`final_reply_wait` instead."""
        return self.command_timeout + size / self.data_rate

    def final_reply_wait(self, size: int) -> float:
        """How long the reply to the final ``.`` of a message of ``size``
        bytes is waited for: ``final_reply_timeout``, plus a second per
        ``data_rate`` bytes (a hop may check a large message before it
        answers)."""
        return self.final_reply_timeout + size / self.data_rate


_Key = tuple[str, RouteSettings]


@dataclass(eq=False)
class Connection:
    """One open connection, as the cache lends it out."""

    client: SmtpClient
    key: _Key
    last_used: float
    transactions: int = 0
    # The idle timer: armed when the connection goes idle, and left armed
    # while it is lent and given back (it then re-arms from ``idle_since``):
    # no timer call per message.
    expiry: asyncio.TimerHandle | None = None
    idle_since: float | None = None  # the loop's clock; None while lent


class _Waiter:
    """One acquirer waiting its turn: it is handed a connection, or a slot
    (already counted) in which to open one, or told it waited too long
    (``expired``); ``future`` is done when any of these happened."""

    __slots__ = ("conn", "expired", "expires_at", "future", "key", "seq", "slot", "why")

    def __init__(self, key: _Key, seq: int, future: asyncio.Future[None]) -> None:
        self.key = key
        self.seq = seq
        self.future = future
        self.conn: Connection | None = None
        self.slot = False
        self.expired: Literal["acquire", "deadline"] | None = None
        self.expires_at = 0.0  # the loop's clock
        self.why: Literal["acquire", "deadline"] = "acquire"  # what expires_at is


class CacheSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What a running cache may change (a reload): connections at most per
    hop and overall, and seconds an idle connection is kept."""

    max_per_hop: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_PER_HOP
    max_total: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_TOTAL
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT


class ConnectionCache:
    """Open SMTP connections per (next hop, route settings).

    Waiters are served first come, first served: a released connection, or
    a freed slot, is handed to the oldest waiter for it, so under load no
    message waits longer than its turn.
    """

    def __init__(
        self,
        *,
        max_per_hop: int = DEFAULT_MAX_PER_HOP,
        max_total: int = DEFAULT_MAX_TOTAL,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        check_after: float = 2.0,
        acquire_timeout: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
        resolve_host: ResolveHost | None = None,
    ) -> None:
        """``monotonic`` is the clock idle times are measured by (tests move
        it forward; the expiry timers themselves run on the event loop);
        ``resolve_host``: the addresses of a host name (None: the system's
        resolver, through the event loop)."""
        self._monotonic = monotonic
        self.resolve_host = resolve_host
        self.max_per_hop = max_per_hop
        self.max_total = max_total
        self.idle_timeout = idle_timeout
        self.check_after = check_after
        self.acquire_timeout = acquire_timeout
        self._idle: dict[_Key, list[Connection]] = {}
        self._open: dict[_Key, int] = {}
        self._total = 0
        self._waiters: dict[_Key, deque[_Waiter]] = {}
        self._seq = itertools.count()
        self._waiters_timer: asyncio.TimerHandle | None = None
        self._waiters_timer_at = 0.0
        self._closing = False
        self._local_name: str | None = None
        self.connections_made = 0
        self.tls_contexts = TlsContexts()

    @property
    def settings(self) -> CacheSettings:
        """The limits and idle time, as one value; assigning a new one (a
        reload) applies to the next connection asked for or released."""
        return CacheSettings(
            max_per_hop=self.max_per_hop, max_total=self.max_total, idle_timeout=self.idle_timeout
        )

    @settings.setter
    def settings(self, value: CacheSettings) -> None:
        self.max_per_hop = value.max_per_hop
        self.max_total = value.max_total
        self.idle_timeout = value.idle_timeout

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
            if len(queues) > 1:
                queues.sort(key=lambda q: q[0].seq)
            for q in queues:
                w = q[0]
                if w.future.done():  # cancelled: its task is leaving, unserved
                    q.popleft()
                    served = True
                    break
                idle = self._idle.get(w.key)
                if idle:
                    w.conn = self._unidle(idle.pop())
                elif self._has_room(w.key):
                    self._take_slot(w.key)
                    w.slot = True
                else:
                    continue
                q.popleft()
                w.future.set_result(None)
                served = True
                break
            if not served:
                return

    def _unidle(self, conn: Connection) -> Connection:
        conn.idle_since = None  # its timer, if armed, finds it lent
        return conn

    @staticmethod
    def _forget(conn: Connection) -> None:
        conn.idle_since = None
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None

    def _drop(self, conn: Connection) -> None:
        """Close without a goodbye (the connection is suspect or expired)."""
        self._forget(conn)
        conn.client.close()
        self._free_slot(conn.key)

    def _expire(self, conn: Connection) -> None:
        conn.expiry = None
        if conn.idle_since is None:
            return  # lent: armed again when given back
        loop = asyncio.get_running_loop()
        until = conn.idle_since + self.idle_timeout
        if until > loop.time() + 0.001:  # used since the timer was set
            conn.expiry = loop.call_at(until, self._expire, conn)
            return
        idle = self._idle.get(conn.key, [])
        if conn in idle:
            idle.remove(conn)
            self._drop(conn)

    def _evict_idle_elsewhere(self, key: _Key) -> bool:
        """Close the least recently used idle connection of another hop to
        make room under ``max_total``."""
        oldest: Connection | None = None
        for k, conns in self._idle.items():
            if k != key and conns and (oldest is None or conns[0].last_used < oldest.last_used):
                oldest = conns[0]
        if oldest is None:
            return False
        self._idle[oldest.key].remove(oldest)
        self._forget(oldest)
        oldest.client.close()
        self._open[oldest.key] -= 1
        self._total -= 1
        return True

    # -- public

    @asynccontextmanager
    async def connection(self, hop: str, settings: RouteSettings) -> AsyncIterator[Connection]:
        """A connection to ``hop``, reused or new; returned to the cache
        afterwards if the body ended normally (and the client is still in
        step with the server), dropped otherwise.

        Raises :class:`HopUnavailableError` if none can be had.
        """
        conn = await self.acquire(hop, settings)
        healthy = False
        try:
            yield conn
            healthy = True
        finally:
            await self.give_back(conn, healthy=healthy)

    async def give_back(self, conn: Connection, *, healthy: bool) -> None:
        """The end of a use of ``conn`` (from :meth:`acquire`): kept for
        reuse when ``healthy`` (the use ended normally) and its settings
        allow reuse, QUIT when healthy but not to be reused, dropped
        otherwise."""
        if not healthy:
            self._drop(conn)
        elif conn.key[1].reuse:
            self.release(conn)
        else:
            await self._close_after_use(conn)

    async def acquire(
        self, hop: str, settings: RouteSettings, deadline: float | None = None
    ) -> Connection:
        """A connection to ``hop``, reused or new, until :meth:`give_back`.
        Raises :class:`HopUnavailableError` if none can be had, and
        :class:`TimeoutError` if ``deadline`` (a time of the event loop's
        clock, :func:`anyio.current_time`) comes first: nothing is then
        held."""
        key = (hop, settings)
        give_up = self._monotonic() + self.acquire_timeout
        while True:
            if self._closing:
                raise HopUnavailableError(f"{hop}: relay is shutting down")
            conn: Connection | None = None
            slot = False
            queue = self._waiters.get(key)
            idle = self._idle.get(key)
            if not queue and idle:
                conn = self._unidle(idle.pop())  # most recently used first
            elif not queue and self._has_room(key):
                self._take_slot(key)
                slot = True
            else:
                if queue is None:
                    queue = self._waiters[key] = deque()
                waiter = await self._wait_turn(queue, key, give_up, deadline)
                if waiter.expired == "deadline":
                    raise TimeoutError(f"{hop}: no free connection before the deadline")
                if waiter.expired is not None:
                    raise HopUnavailableError(
                        f"{hop}: no free connection within {self.acquire_timeout:g}s"
                    )
                conn, slot = waiter.conn, waiter.slot
                if conn is None and not slot:
                    continue  # woken without a grant (shutting down)
            if conn is not None:
                if await self._checked(conn, deadline):
                    return conn
                continue  # it was dropped (and its slot passed on); try again
            assert slot
            return await self._open_in_slot(hop, settings, deadline)

    async def _wait_turn(
        self, queue: deque[_Waiter], key: _Key, give_up: float, deadline: float | None
    ) -> _Waiter:
        """Wait in ``queue`` until served, or until ``give_up`` (on the
        cache's clock) or ``deadline`` (on the loop's) passes."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(key, next(self._seq), loop.create_future())
        queue.append(waiter)
        when = loop.time() + max(0.0, give_up - self._monotonic())
        if deadline is not None and deadline < when:
            waiter.expires_at, waiter.why = deadline, "deadline"
        else:
            waiter.expires_at = when
        self._arm_waiters_timer(loop, waiter.expires_at)
        try:
            await waiter.future
        except BaseException:
            self._give_back(waiter)  # cancelled: pass on what we were handed
            raise
        return waiter

    def _arm_waiters_timer(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """One timer for every waiter's give-up time, moved only when a
        waiter must give up before it fires (later waiters give up later:
        no timer call per wait)."""
        if self._waiters_timer is None or when < self._waiters_timer_at:
            if self._waiters_timer is not None:
                self._waiters_timer.cancel()
            self._waiters_timer_at = when
            self._waiters_timer = loop.call_at(when, self._expire_waiters)

    def _expire_waiters(self) -> None:
        """Send away every waiter whose time is up; re-arm for the next."""
        self._waiters_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time() + 0.001  # a loop timer may fire up to a millisecond early
        earliest: float | None = None
        for queue in self._waiters.values():
            if not queue:
                continue
            kept: deque[_Waiter] = deque()
            for w in queue:
                if w.future.done():  # cancelled, leaving
                    kept.append(w)
                elif w.expires_at <= now:
                    w.expired = w.why
                    w.future.set_result(None)
                else:
                    kept.append(w)
                    earliest = w.expires_at if earliest is None else min(earliest, w.expires_at)
            if len(kept) != len(queue):
                queue.clear()
                queue.extend(kept)
        if earliest is not None:
            self._arm_waiters_timer(loop, earliest)

    async def _checked(self, conn: Connection, deadline: float | None) -> bool:
        """Whether an idle connection taken out may be used (else it was
        dropped): a NOOP first when it was idle long; TimeoutError (and
        dropped) if ``deadline`` comes first."""
        fresh = self._fresh(conn)
        if fresh is not None:
            return fresh
        usable = False
        with anyio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
            try:
                usable = await self._answers_noop(conn)
            except BaseException:
                self._drop(conn)
                raise
        if scope.cancelled_caught:  # dropped above
            raise TimeoutError(f"{conn.key[0]}: no NOOP reply before the deadline")
        return usable

    async def _open_in_slot(
        self, hop: str, settings: RouteSettings, deadline: float | None
    ) -> Connection:
        """A new connection, in a slot already taken (freed on failure)."""
        key = (hop, settings)
        client: SmtpClient | None = None
        try:
            with anyio.CancelScope(deadline=math.inf if deadline is None else deadline):
                client = await self._connect(hop, settings)
        except BaseException:
            self._free_slot(key)
            raise
        if client is None:  # the deadline came first
            self._free_slot(key)
            raise TimeoutError(f"{hop}: not connected before the deadline")
        self.connections_made += 1
        return Connection(client, key, self._monotonic())

    def _give_back(self, waiter: _Waiter) -> None:
        queue = self._waiters.get(waiter.key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
        if waiter.conn is not None:
            self.release(waiter.conn)
        elif waiter.slot:
            self._free_slot(waiter.key)

    def _fresh(self, conn: Connection) -> bool | None:
        """Whether an idle connection taken out may be used without a NOOP
        (False: it was dropped); None: it needs a NOOP first."""
        idle_for = self._monotonic() - conn.last_used
        if not conn.client.usable or idle_for > self.idle_timeout:
            self._drop(conn)  # gone, out of step, or expired while its timer was late
            return False
        if idle_for <= self.check_after:
            return True
        return None

    async def _answers_noop(self, conn: Connection) -> bool:
        """Whether a connection idle long (:meth:`_fresh` said None)
        answers NOOP with 250 (else it was dropped)."""
        try:
            reply = await conn.client.noop(timeout=min(10.0, conn.key[1].command_timeout))
        except SmtpError:
            self._drop(conn)
            return False
        if reply.code != 250:
            self._drop(conn)
            return False
        return True

    def release(self, conn: Connection) -> None:
        """Give a healthy connection back: to the oldest waiter, or idle."""
        if self._closing or not conn.client.usable:
            self._drop(conn)
            return
        conn.last_used = self._monotonic()
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        if conn.expiry is None:
            conn.expiry = loop.call_at(conn.idle_since + self.idle_timeout, self._expire, conn)
        self._idle.setdefault(conn.key, []).append(conn)
        self._serve_waiters()

    async def _close_after_use(self, conn: Connection) -> None:
        """QUIT a connection not to be reused, then free its slot: when
        this returns, the hop has said goodbye (and closed its side)."""
        try:
            with contextlib.suppress(SmtpError), anyio.move_on_after(5):
                await conn.client.quit(timeout=min(5.0, conn.key[1].command_timeout))
        finally:
            self._drop(conn)

    async def close_and_flush(self) -> None:
        """Take no more connections out; QUIT every idle one."""
        self._closing = True
        if self._waiters_timer is not None:
            self._waiters_timer.cancel()
            self._waiters_timer = None
        for queue in self._waiters.values():
            for w in queue:
                if not w.future.done():
                    w.future.set_result(None)  # they wake, see no grant... and give up
        idle = [c for conns in self._idle.values() for c in conns]
        for conn in idle:
            self._forget(conn)
        self._idle.clear()
        for conn in idle:
            with contextlib.suppress(SmtpError), anyio.move_on_after(5):
                await conn.client.quit(timeout=min(5.0, conn.key[1].command_timeout))
            conn.client.close()
            self._open[conn.key] -= 1
            self._total -= 1

    # -- opening

    async def _helo_name(self, settings: RouteSettings) -> str:
        """The route's HELO name, or this host's name
        (:func:`~spoold.hostname.local_hostname`: looked up once, in a
        worker thread, as it may ask DNS)."""
        if settings.helo_name:
            return settings.helo_name
        if self._local_name is None:
            self._local_name = await anyio.to_thread.run_sync(local_hostname)
        return self._local_name

    async def _connect(self, hop: str, settings: RouteSettings) -> SmtpClient:
        """A new connection to ``hop``, greeted, EHLO'd, with TLS and AUTH
        as the route (and its TLS policy) says; every failure is
        :class:`HopUnavailableError`."""
        host, port = parse_hop(hop)
        name = await self._helo_name(settings)
        required = settings.tls_policy
        why = f"TLS policy ({required.source}): " if required is not None else ""
        tls = "required" if required is not None else settings.tls
        try:
            context = await self.tls_contexts.get(settings) if tls != "none" else None
        except (OSError, ssl.SSLError) as exc:
            raise HopUnavailableError(f"{hop}: cannot set up TLS: {_describe(exc)}") from exc
        client = await self._dial(hop, host, port, settings)
        try:
            await client.hello(name)
            if context is not None and client.supports("STARTTLS"):
                try:
                    await client.starttls(context, server_hostname=host)
                except SmtpTlsError as exc:
                    raise HopUnavailableError(f"{hop}: {why}{exc}") from exc
                except SmtpReplyError as exc:
                    if not why:
                        raise
                    raise HopUnavailableError(f"{hop}: {why}STARTTLS refused: {exc}") from exc
                await client.hello(name)
            if tls == "required" and not client.tls_active:
                missing = (
                    f"{why}{host} does not offer STARTTLS"
                    if why
                    else "TLS is required but the hop does not offer STARTTLS"
                )
                raise HopUnavailableError(f"{hop}: {missing}")  # noqa: TRY301
            if required is not None and _dane_ee(required):
                der = client.peer_certificate()
                ee = [r for r in required.tlsa or () if r.usage == DANE_EE]
                if der is None or not certificate_matches(ee, der):
                    raise HopUnavailableError(  # noqa: TRY301
                        f"{hop}: {why}the certificate of {host} matches none of its "
                        f"{len(ee)} usable TLSA record(s) (_{port}._tcp.{host})"
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

    async def _dial(self, hop: str, host: str, port: int, settings: RouteSettings) -> SmtpClient:
        """Connect and read the greeting: to ``host`` through the system's
        resolver, or to each address ``resolve_host`` gives, in order."""
        addresses = [host]
        if self.resolve_host is not None and not _is_address(host):
            try:
                addresses = await self.resolve_host(host)
            except Exception as exc:  # the resolver is the caller's code
                raise HopUnavailableError(
                    f"{hop}: cannot resolve {host}: {_describe(exc)}"
                ) from exc
        errors: list[str] = []
        last: SmtpError | None = None
        for address in addresses:
            try:
                return await SmtpClient.connect(
                    address,
                    port,
                    connect_timeout=settings.connect_timeout,
                    command_timeout=settings.command_timeout,
                )
            except SmtpError as exc:
                errors.append(f"{address}: {exc}" if address != host else str(exc))
                last = exc
        if last is None:
            raise HopUnavailableError(f"{hop}: {host} has no address")
        raise HopUnavailableError(f"{hop}: {'; '.join(errors)}") from last


def _dane_ee(required: TlsRequirement) -> bool:
    """Whether a DANE requirement has DANE-EE records (checked after the
    handshake; its DANE-TA records, if any, are then not used)."""
    return any(r.usage == DANE_EE for r in required.tlsa or ())


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


ContextKind = Literal["unverified", "pkix", "dane-ta"]


@dataclass(frozen=True, slots=True)
class ContextKey:
    """What shapes an SSL context: whether the server's certificate is
    checked against CAs (``pkix``: a CA of ``ca_file``, else of the
    default store, and the host's name) or not at all here
    (``unverified``: a route with ``verify_certificates = false``, or DANE,
    whose TLSA check comes after the handshake), or against the trust
    anchors of a host's DANE-TA records alone (``dane-ta``: their DER
    certificates are ``anchors``), and our own certificate. A DANE-EE
    host's TLSA records are not part of it: such hosts share one
    context."""

    kind: ContextKind
    ca_file: str | None
    client_cert: str | None
    client_key: str | None
    anchors: tuple[bytes, ...] = ()

    @classmethod
    def of(cls, settings: RouteSettings) -> ContextKey:
        required = settings.tls_policy
        if required is not None and required.tlsa and not _dane_ee(required):
            anchors = trust_anchors(required.tlsa)
            if anchors:
                return cls("dane-ta", None, settings.client_cert, settings.client_key, anchors)
        # A policy's PKIX check is made whatever the route says.
        verify = settings.verify_certificates if required is None else not required.dane
        return cls(
            "pkix" if verify else "unverified",
            settings.ca_file if verify else None,
            settings.client_cert,
            settings.client_key,
        )


class TlsContexts:
    """The SSL contexts of outgoing connections, one per :class:`ContextKey`
    (a handful per config). A missing one is built in a worker thread: it
    reads files (the CA bundle, our certificate). An unverified context
    loads no CA at all."""

    def __init__(self, most: int = 256) -> None:
        self._built: dict[ContextKey, ssl.SSLContext] = {}
        self.most = most  # DANE-TA anchors come from DNS: bounded, oldest out

    async def get(self, settings: RouteSettings) -> ssl.SSLContext:
        key = ContextKey.of(settings)
        context = self._built.get(key)
        if context is None:
            context = await anyio.to_thread.run_sync(_build_context, key)
            self._built[key] = context
            while len(self._built) > self.most:
                del self._built[next(iter(self._built))]
        return context


def _build_context(key: ContextKey) -> ssl.SSLContext:
    """A new context for ``key`` (blocking: reads files)."""
    if key.kind == "pkix":
        context = ssl.create_default_context(cafile=key.ca_file)
    elif key.kind == "dane-ta":
        # The anchors and nothing else; one may be an intermediate CA.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the chain and the name
        context.load_verify_locations(cadata=b"".join(key.anchors))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if key.client_cert:
        context.load_cert_chain(key.client_cert, key.client_key)
    return context


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return _one_line(str(exc)) or type(exc).__name__
