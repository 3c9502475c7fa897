"""The SMTP ingest listener, run inside the daemon's task group.

:class:`SmtpListener` listens (``loop.create_server``) on ``smtp.listen``
and runs one :class:`~spoold.daemon.smtp_server.SmtpSession` per connection (the
protocol itself lives in :mod:`spoold.daemon.smtp_server`). It decides who may
connect, whose password is right and what becomes of a message; every task
a session needs runs in the listener's own task group, and stopping the
listener (cancelling :meth:`SmtpListener.serve`) answers 421 to every open
session.

Replies:

* 250 after DATA only once every resulting message is durable on disk;
* 451 (or 452 when the disk is full) when the spool cannot write: nothing
  half-written remains, the client retries later; 421 while the spool
  closes; 550 5.1.2 when no route takes a recipient or its domain does not
  exist in DNS, 451 4.4.3 for a temporary DNS failure; any other error of
  ours is a 451, never a 5xx;
* 550 for content with a bare CR or LF under ``bare_line_endings =
  "reject"`` (with ``"normalize"`` they become CRLF); the sequences used for
  SMTP smuggling therefore never split one message into two;
* 452 4.3.1 at MAIL when the spool's free space is below
  ``spool.min_free_space``, or below it plus the size the client declared
  (``SIZE=``): the same rule the store applies after DATA (which stays, as
  the final word). The free space is measured in a worker thread when the
  listener starts and every :data:`FREE_SPACE_INTERVAL` seconds after,
  so MAIL does no I/O; the floor is read live (a reload applies at once).
  Crossing the floor is logged once each way (``short of space`` as a
  warning, ``room again``);
* 552 past ``max_message_size`` (SIZE is advertised), 452 past
  ``max_recipients``, 500 for a message line over ``max_line_length``;
  501/553 for a bad address (see :mod:`spoold.daemon.smtp_server`);
* 421 to a connection over ``max_connections``, or over
  ``max_connections_per_client`` from one address (clients in
  ``relay_networks`` are held to that only with ``limit_relay_networks``:
  a local application may open as many sessions at once as it has
  workers); both limits count this process's sessions (each ingest worker
  has its own counts); 554 to a client outside
  ``relay_networks`` (when AUTH is on, such a client may connect and must
  authenticate: 530 to MAIL before that).

With ``tls_cert``/``tls_key`` STARTTLS is offered (``require_tls``: 530 to
MAIL before it); with ``auth_file`` AUTH PLAIN and LOGIN are offered, only
after STARTTLS when TLS is configured (the config refuses an ``auth_file``
without TLS unless the listener is on loopback only). Passwords are compared
in constant time; a failed AUTH is answered after ``auth_failure_delay``,
doubling per failure on the connection or of the client's address lately,
waited with :attr:`SmtpListener.sleep` (injectable for tests);
``max_auth_failures`` failures close the connection. Failures are also
counted per client address over ``auth_failure_window``, on every
connection (:class:`~spoold.daemon.auth_failures.AuthFailureLog`, on
:attr:`SmtpListener.clock`): past ``max_auth_failures_per_client`` the
address gets 454 to AUTH and, outside ``relay_networks``, 421 at the
greeting, until its failures age out.
:func:`listener_settings` reads the certificate and the users file off the
event loop, at start and on reload.

Limits are read from the live settings when a connection opens, so a reload
applies them to new sessions, as it does the name we give in the banner and
EHLO reply (the submitter's ``hostname``, which a reload may change); the
listen addresses need a restart. An error accepting a connection (EMFILE...)
is asyncio's to handle: it pauses accepting for a while and goes on; it
never stops the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog

from spoold.body import LineEndingPolicy
from spoold.credentials import read_private_file
from spoold.daemon.auth_failures import AuthFailureLog
from spoold.daemon.config import SmtpConfig
from spoold.daemon.ingest import Origin, Submitter, message_id_key
from spoold.daemon.resources import AcceptFailures, accept_forever
from spoold.daemon.smtp_server import (
    Delivery,
    SessionPolicy,
    SmtpSession,
    peer_ip,
    reply_line,
)
from spoold.daemon.workers import worker_count
from spoold.errors import (
    BareLineEndingError,
    MxError,
    NoRouteError,
    RecipientSuppressedError,
    SpoolClosedError,
    SpooldError,
    StoreError,
)
from spoold.log import get_logger
from spoold.store import Store
from spoold.suppression import SUPPRESSED_STATUS
from spoold.times import format_size, utcnow

__all__ = ["SmtpListener", "ListenerSettings", "listener_settings", "FREE_SPACE_INTERVAL"]

log = structlog.get_logger("spoold.smtp")
# The one line of every message (``accepted``) goes through the library's
# logger: the same line in the daemon's output, without structlog's proxy,
# which builds a bound logger at each call (about 19k instructions a line
# less, under callgrind).
_accepted_log = get_logger("spoold.smtp")

_BACKLOG = 1024
FREE_SPACE_INTERVAL = 1.0
"""Seconds between two measurements of the spool's free space (for MAIL)."""
_NO_SPACE = b"452 4.3.1 Insufficient system storage, try again later\r\n"
_IDLE_FLOOR = 8
"""Runners kept parked however few sessions are open (see ``_run_work``)."""

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


_Work = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class ListenerSettings:
    """The listener's config plus what was read from files for it."""

    config: SmtpConfig
    tls_context: ssl.SSLContext | None = None
    users: Mapping[str, str] = field(default_factory=dict, repr=False)  # login -> password


def listener_settings(config: SmtpConfig) -> ListenerSettings:
    """Load the certificate and users file of ``config`` (blocking: run it
    in a worker thread). Raises SpooldError or OSError with the path."""
    context = None
    if config.tls_cert is not None and config.tls_key is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise SpooldError(f"smtp.tls_cert {config.tls_cert}: {exc}") from None
    users: dict[str, str] = {}
    if config.auth_file is not None:
        for number, line in enumerate(read_private_file(config.auth_file).splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            login, sep, password = line.partition(":")
            if not sep or not login:
                raise SpooldError(f"{config.auth_file}:{number}: expected 'user:password'")
            users[login] = password
    return ListenerSettings(config, context, users)


_PEERS_KEPT = 4096


@dataclass(frozen=True)
class _Derived:
    """What a session needs from one :class:`ListenerSettings`, worked out
    once per settings value rather than once per connection."""

    settings: ListenerSettings
    policy: SessionPolicy
    networks: tuple[_Network, ...]
    line_endings: LineEndingPolicy
    # Peers already looked up in ``networks`` (bounded: emptied when full);
    # made anew with the settings, so a reload's networks apply at once.
    trusted_peers: dict[str, bool] = field(default_factory=dict, compare=False)

    def trusted(self, peer: str) -> bool:
        """Whether ``peer`` is in ``relay_networks``."""
        known = self.trusted_peers.get(peer)
        if known is None:
            if len(self.trusted_peers) >= _PEERS_KEPT:
                self.trusted_peers.clear()
            known = self.trusted_peers[peer] = _allowed(peer, self.networks)
        return known


def _derive(settings: ListenerSettings, hostname: str) -> _Derived:
    cfg = settings.config
    policy = SessionPolicy(
        hostname=hostname,
        max_message_size=cfg.max_message_size,
        max_recipients=cfg.max_recipients,
        max_line_length=cfg.max_line_length,
        timeout=cfg.timeout.total_seconds(),
        max_junk_commands=cfg.max_junk_commands,
        max_auth_failures=cfg.max_auth_failures,
        auth_failure_delay=cfg.auth_failure_delay.total_seconds(),
        tls_context=settings.tls_context,
        require_tls=cfg.require_tls,
        auth=cfg.auth_file is not None,
    )
    networks = tuple(ipaddress.ip_network(n, strict=False) for n in cfg.relay_networks)
    return _Derived(settings, policy, networks, cfg.bare_line_endings)


class SmtpListener:
    """Listens on ``config().listen`` and spools what it accepts.

    :meth:`serve` runs until cancelled (sessions are cut with 421) or until
    :meth:`stop`: then it stops accepting, lets the messages being spooled
    finish (up to ``drain_timeout`` seconds: a client whose DATA we took
    gets its 250), says 421 to the sessions left and returns. However it
    ends (a cancel too), the work still under way is cancelled and waited
    for: a commit under way finishes first (the store's waits are shielded),
    so nothing of the store runs once serve() has returned. A session's work
    that raises (a bug) stops the listener the same way; serve() raises it."""

    def __init__(
        self,
        submitter: Submitter,
        settings: Callable[[], ListenerSettings | SmtpConfig],
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        accept_failures: AcceptFailures | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.submitter = submitter
        self.accept_failures = accept_failures or AcceptFailures()
        self._settings = settings
        self.sleep = sleep  # waits out the delay of a failed AUTH
        self.clock = clock  # seconds, for counting failed AUTH over time
        self.connections = 0
        self.connections_by_client: dict[str, int] = {}
        self.auth_failures: AuthFailureLog | None = None  # made with the first settings
        self._sessions: set[SmtpSession] = set()
        self._derived: _Derived | None = None
        # Where the work of sessions runs (a delivery, an AUTH check, and
        # each accepted connection's start): an asyncio task group held open
        # by a task of serve(). A session hands work over from a protocol
        # callback, where no task runs and anyio cannot be called (it cannot
        # tell the event loop when sniffio is installed), and an asyncio task
        # costs a fraction of an anyio one: two per message.
        # The group never ends by cancellation (asyncio would cancel its
        # tasks with Task.cancel(), which goes through anyio's shields, and
        # the store's shielded waits let a commit finish): work runs in
        # runner tasks, each in its own cancel scope (``_scopes``), cancelled
        # at the end; the holder ends through ``_release`` once no work is
        # left. A runner whose work is done parks (``_idle``; about one per
        # open session at most) and takes the next piece of work handed to
        # it: no task and no cancel scope made per message (an anyio scope
        # alone was ~40k instructions a message).
        self._work: asyncio.TaskGroup | None = None
        self._scopes: set[anyio.CancelScope] = set()
        self._idle: list[asyncio.Future[_Work]] = []  # parked runners' next work
        self._closing = False  # no new work from now on
        self._release = anyio.Event()  # the holder may end the group
        self._failure: Exception | None = None  # the first bug in a session's work
        self._stopping = anyio.Event()
        self._working = 0  # deliveries under way (spawned work)
        self._all_done: anyio.Event | None = None  # made by who waits for no work
        self._free_space: int | None = None  # bytes, last measured (None: not known)
        self._short_of_space = False  # below the floor at the last measurement

    def stop(self) -> None:
        """Stop accepting and return from :meth:`serve` once drained."""
        self._stopping.set()

    def settings(self) -> ListenerSettings:
        value = self._settings()
        return value if isinstance(value, ListenerSettings) else ListenerSettings(value)

    def config(self) -> SmtpConfig:
        return self.settings().config

    def _current(self) -> _Derived:
        value = self._settings()
        derived = self._derived
        if (
            derived is not None
            and (derived.settings is value or derived.settings.config is value)
            and derived.policy.hostname == self.submitter.hostname  # a reload may rename us
        ):
            return derived
        settings = value if isinstance(value, ListenerSettings) else ListenerSettings(value)
        self._derived = derived = _derive(settings, self.submitter.hostname)
        cfg = settings.config
        window = cfg.auth_failure_window.total_seconds()
        share = worker_count(cfg.workers)
        if self.auth_failures is None:
            self.auth_failures = AuthFailureLog(
                cfg.max_auth_failures_per_client, window, share=share, clock=self.clock
            )
        else:
            self.auth_failures.configure(cfg.max_auth_failures_per_client, window, share)
        return derived

    def _auth_log(self) -> AuthFailureLog:
        self._current()
        assert self.auth_failures is not None
        return self.auth_failures

    # ------------------------------------------- what sessions ask of us

    def open_session(self, session: SmtpSession, peer: str) -> tuple[SessionPolicy, bool] | str:
        if self._closing:  # started as the listener ends
            return "421 4.3.2 Service shutting down, try again later"
        derived = self._current()
        cfg = derived.settings.config
        trusted = derived.trusted(peer)
        if not trusted and not derived.policy.auth:
            return "554 5.7.1 Your address may not send mail here"
        if self.connections >= cfg.max_connections:
            return "421 4.7.0 Too many connections, try again later"
        held = not trusted or cfg.limit_relay_networks  # relay_networks: exempt by default
        if held and self.connections_by_client.get(peer, 0) >= cfg.max_connections_per_client:
            return "421 4.7.0 Too many connections from your address, try again later"
        if not trusted and self._auth_log().refused(peer):
            return (
                "421 4.7.0 Too many failed authentication attempts from your address, "
                "try again later"
            )
        self.connections += 1
        self.connections_by_client[peer] = self.connections_by_client.get(peer, 0) + 1
        self._sessions.add(session)
        return derived.policy, trusted

    def close_session(self, session: SmtpSession, peer: str) -> None:
        self._sessions.discard(session)
        self.connections -= 1
        left = self.connections_by_client[peer] - 1
        if left:
            self.connections_by_client[peer] = left
        else:
            del self.connections_by_client[peer]

    def spawn(self, work: _Work) -> None:
        group = self._work
        if group is None or self._closing:
            raise RuntimeError("the listener is not serving")
        idle = self._idle
        while idle:  # a parked runner takes it
            parked = idle.pop()
            if not parked.done():  # (else cancelled as the listener ends)
                parked.set_result(work)
                self._working += 1
                return
        runner = self._run_work(work)
        try:
            group.create_task(runner)
        except BaseException:
            runner.close()  # never started: no "never awaited" warning
            raise
        self._working += 1

    async def _hold_work(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Hold the sessions' task group open until ``_release`` is set
        (by :meth:`_end_work`, once no work is left). Shielded: cancelling
        serve() must not reach the group (see ``__init__``)."""
        try:
            with anyio.CancelScope(shield=True):
                async with asyncio.TaskGroup() as work:
                    self._work = work
                    task_status.started()
                    await self._release.wait()
        finally:
            self._work = None

    async def _run_work(self, work: _Work) -> None:
        """Run ``work``, then each piece of work handed to this runner while
        it is parked, until the listener ends (its scope is cancelled) or
        enough runners are parked already.

        One task runs the work of many sessions, one after another: work
        must not set context variables (``bind_contextvars``, a
        ``ContextVar``) or leave anything on its task (an ``uncancel``
        count...), or the next session's work would inherit it."""
        scope = anyio.CancelScope()  # cancelled by _end_work; honours shields
        self._scopes.add(scope)
        if self._closing:  # handed over before the end, started after it
            scope.cancel()  # (as a parked runner's is): cancelled at its first wait
        loop = asyncio.get_running_loop()
        try:
            with scope:
                while True:
                    try:
                        await work()
                    except Exception as exc:  # noqa: BLE001 (a bug: serve() raises it)
                        self._fail(exc)
                    finally:
                        self._work_ended()
                    del work  # (not held while parked)
                    # Work outlives its connection (a failed AUTH's delay, a
                    # commit nobody waits for): past a burst, the runners
                    # beyond about one per open session end, and memory
                    # returns.
                    idle = self._idle
                    if self._closing or len(idle) >= max(self.connections, _IDLE_FLOOR):
                        return
                    parked: asyncio.Future[_Work] = loop.create_future()
                    idle.append(parked)
                    try:
                        work = await parked
                    except BaseException:
                        # Cancelled by asyncio itself (not through our scope)
                        # after work was handed over: it never runs.
                        if parked.done() and not parked.cancelled():
                            self._work_ended()
                        raise
        finally:
            self._scopes.discard(scope)

    def _work_ended(self) -> None:
        """A piece of work counted by :meth:`spawn` is over (or never ran)."""
        self._working -= 1
        if self._working == 0 and self._all_done is not None:
            self._all_done.set()
            self._all_done = None

    async def _no_work(self) -> None:
        """Return once no work is under way."""
        while self._working:
            if self._all_done is None:
                self._all_done = anyio.Event()
            await self._all_done.wait()

    def _fail(self, exc: Exception) -> None:
        """A session's work (or a connection's start) raised: the listener
        stops as at :meth:`stop` (the other sessions' messages finish) and
        serve() raises it."""
        log.error("a session's work failed: the listener stops", error=repr(exc))
        if self._failure is None:
            self._failure = exc
        self._stopping.set()

    async def _end_work(self) -> None:
        """Close every session, cancel the work left (through its cancel
        scope: a commit under way finishes first) and wait for it; then let
        the holder end the task group. Run shielded."""
        try:
            self._cut_work()
            await self._no_work()
        finally:
            self._release.set()

    def _cut_work(self) -> None:
        """The end up to its wait: no new work, every session closed, the
        work left cancelled. Work handed to a runner in the same turn is
        cancelled at its first wait, before anything of it is spooled (its
        client has its 421 already)."""
        self._closing = True
        for session in list(self._sessions):
            session.shutdown()
        for scope in self._scopes:
            scope.cancel()

    def auth_refused(self, peer: str) -> bool:
        return self._auth_log().refused(peer)

    def auth_failed(self, peer: str) -> int:
        return self._auth_log().failed(peer)

    def check_password(self, login: str, password: bytes) -> bool:
        expected = self._current().settings.users.get(login)
        # Compare against something even for an unknown login: the time
        # taken says nothing about which logins exist.
        reference = (expected if expected is not None else "\0unknown login\0").encode("utf-8")
        return hmac.compare_digest(reference, password) and expected is not None

    def space_refusal(self, size: int | None) -> bytes | None:
        floor = self.submitter.spool.min_free_space
        free = self._free_space
        if not floor or free is None or free - (size or 0) >= floor:
            return None
        return _NO_SPACE

    def suppressions_stale(self) -> bool:
        return self.submitter.spool.suppressions.stale()

    async def refresh_suppressions(self) -> None:
        await self.submitter.spool.suppressions.refresh()

    def recipient_refusal(self, address: str) -> bytes | None:
        spool = self.submitter.spool
        if spool.suppressed_recipients != "refuse":
            return None  # "fail": taken, and failed at its first attempt
        listed = spool.suppressions
        if not len(listed):
            return None  # the usual case: no list (nothing to normalise or date)
        entry = listed.find(address, utcnow())
        if entry is None:
            return None
        listed.count("refused")
        log.info(
            "recipient refused: suppressed",
            recipient=entry.address,
            until=entry.until,
            reason=entry.reason,
        )
        # The end only: the reason is for the operator (suppress list/check).
        return reply_line(f"550 {SUPPRESSED_STATUS} Recipient {entry.describe(reason=False)}")

    async def _measure_free_space(self) -> None:
        spool_dir = self.submitter.spool.spool_dir
        try:
            st = await anyio.to_thread.run_sync(os.statvfs, spool_dir)
        except OSError as exc:
            if self._free_space is not None:
                log.warning("cannot measure the spool's free space", error=str(exc))
            self._free_space = None  # not known: the store's own check decides
            return
        self._free_space = free = st.f_bavail * st.f_frsize
        floor = self.submitter.spool.min_free_space
        short = free < floor
        if short != self._short_of_space:  # said once per change, not per MAIL
            self._short_of_space = short
            if short:
                log.warning(
                    "short of space: new mail is refused at MAIL",
                    spool=str(spool_dir),
                    free=format_size(free),
                    min_free_space=format_size(floor),
                )
            else:
                log.info("room again: new mail is taken", free=format_size(free))

    async def _watch_free_space(self) -> None:
        while True:
            await anyio.sleep(FREE_SPACE_INTERVAL)
            await self._measure_free_space()

    async def deliver(self, delivery: Delivery) -> str:
        """Spool one message; the reply for the client. ``delivery`` comes
        from a session: its wire holds no end-of-data line (not searched
        again)."""
        derived = self._current()
        peer = delivery.peer
        origin = Origin(delivery.protocol, delivery.helo, peer)
        key = None
        if derived.settings.config.deduplicate == "message-id":
            key = message_id_key(delivery.sender, delivery.wire, delivery.recipients)
        try:
            ids = await self.submitter.submit_wire(
                delivery.sender,
                delivery.recipients,
                delivery.wire,
                origin=origin,
                policy=derived.line_endings,
                mail_params=delivery.mail_params,
                idempotency_key=key,
                # The session cut it at the first end-of-data line: it holds
                # none (see Delivery.wire; pinned by test_smtp_server.py).
                cut_at_end=True,
            )
        except RecipientSuppressedError:
            # Suppressed after its RCPT was taken: a retry gets 550 for that
            # RCPT alone, and the message goes to the others.
            return "451 4.7.1 A recipient was suppressed meanwhile, try again"
        except BareLineEndingError as exc:
            return f"550 5.6.0 {exc}"
        except NoRouteError as exc:
            return f"550 5.1.2 {exc}"
        except MxError as exc:
            return f"550 5.1.2 {exc}" if exc.permanent else f"451 4.4.3 {exc}"
        except SpoolClosedError:
            return "421 4.3.2 Service shutting down, try again later"
        except StoreError as exc:
            log.error("could not spool a message", error=str(exc), peer=peer)
            if Store.is_disk_full(exc):
                return "452 4.3.1 Insufficient system storage, try again later"
            return "451 4.3.0 Could not write the message, try again later"
        except Exception:  # never a permanent 5xx for our own trouble
            log.exception("unexpected error taking a message", peer=peer)
            return "451 4.3.0 Local error, try again later"
        _accepted_log.info("accepted", ids=ids, peer=peer, recipients=len(delivery.recipients))
        return f"250 2.0.0 OK queued as {' '.join(ids)}"

    # ------------------------------------------------------------ serving

    async def serve(
        self,
        inherited: Sequence[socket.socket] = (),
        *,
        drain_timeout: float = 30.0,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen until cancelled; reports started once every address listens.

        ``inherited`` are listening sockets opened by someone else (systemd
        socket activation): each is served as it is, and an ``smtp.listen``
        address none of them has is bound here.
        """
        loop = asyncio.get_running_loop()
        await self._measure_free_space()
        inherited_keys = {_sockname_key(sock.getsockname()) for sock in inherited}
        own = await anyio.to_thread.run_sync(listening_sockets, self.config().listen, inherited)
        own = own[len(inherited) :]  # the ones bound here, closed here
        sockets = [*inherited, *own]

        def take(conn: socket.socket, address: Any) -> None:
            if self._work is None or self._closing:
                conn.close()
                return
            # The client's address as accept() gave it: the session need
            # not ask the kernel again (getsockname + getpeername).
            self._work.create_task(self._attach(loop, conn, peer_ip(address)))

        try:
            async with anyio.create_task_group() as tg:
                try:
                    await tg.start(self._hold_work)
                    tg.start_soon(self._watch_free_space)
                    async with anyio.create_task_group() as accepting:
                        for sock in sockets:
                            sock.setblocking(False)
                            where = _show(sock.getsockname())
                            accepting.start_soon(
                                accept_forever, sock, where, self.accept_failures, take
                            )
                            log.info(
                                "smtp listening",
                                address=where,
                                **(
                                    {"inherited": True}
                                    if _sockname_key(sock.getsockname()) in inherited_keys
                                    else {}
                                ),
                            )
                        task_status.started()
                        await self._stopping.wait()
                        accepting.cancel_scope.cancel()  # no new connections; those open go on
                    log.info("smtp listener stopping", deliveries_under_way=self._working)
                    for session in list(self._sessions):
                        if not session.busy:
                            session.shutdown()
                    with anyio.move_on_after(drain_timeout):
                        await self._no_work()
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._end_work()
                    tg.cancel_scope.cancel()
            failure = self._failure
            if failure is not None:
                raise failure
        finally:
            for sock in own:
                sock.close()

    async def _attach(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, peer: str
    ) -> None:
        """Run a session on an accepted connection from ``peer``."""
        try:
            await loop.connect_accepted_socket(
                lambda: SmtpSession(self, peer=peer, loop=loop), conn
            )
        except OSError:
            conn.close()  # gone before we got to it
        except Exception as exc:  # noqa: BLE001 (a bug: serve() raises it, not the group)
            conn.close()
            self._fail(exc)


def listening_sockets(
    listen: Sequence[str], inherited: Sequence[socket.socket]
) -> list[socket.socket]:
    """The sockets to serve: every inherited one, and one bound here for
    each ``listen`` address none of them has (blocking: a few syscalls)."""
    sockets = list(inherited)
    covered = {_sockname_key(s.getsockname()) for s in inherited}
    for address in listen:
        host, _, port_text = address.rpartition(":")
        host = host.strip("[]")
        if _sockname_key((host, int(port_text))) in covered:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, int(port_text)))
            sock.listen(_BACKLOG)
        except OSError as exc:
            sock.close()
            for s in sockets[len(inherited) :]:
                s.close()
            raise SpooldError(f"smtp.listen {address}: {exc.strerror or exc}") from None
        sockets.append(sock)
    return sockets


def _sockname_key(name: Any) -> tuple[str, int]:
    """(address, port) of a socket name or a listen entry, the address in
    its canonical form, so ``[::1]:25`` and a socket on ``::1`` match."""
    host, port = str(name[0]), int(name[1])
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host))
    return host, port


def _show(name: Any) -> str:
    host, port = _sockname_key(name)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _allowed(peer: str, networks: tuple[_Network, ...]) -> bool:
    if not peer:
        return True  # not an IP peer (e.g. a test transport)
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in networks)
