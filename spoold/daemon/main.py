"""The daemon: ``spoold run --config PATH``.

One task-group tree owns everything: the spool (and its scheduler), the
control server and the watchdog. Signal handlers only set events; the main
loop acts on them:

* SIGHUP (or the ``reload`` control request): read and validate the file,
  build everything new (routes, credentials, hooks) and swap it in in one
  step; an invalid file is logged with every problem and changes nothing.
  Settings that need a restart (spool directory, control socket, listener
  addresses, metrics address) keep their running values and are named in
  the log.
* SIGTERM / SIGINT: stop accepting, wait up to ``spool.flush_timeout`` for
  attempts under way, exit 0. A second signal stops at once: messages are
  on disk and a cut attempt is retried at the next start.

The handlers are installed first thing in :func:`run`, before the config is
read, hooks are imported and the spool is opened, so a signal during
start-up never kills the process: a SIGHUP then is one reload once the
daemon is ready; a SIGTERM/SIGINT ends start-up at the next step (exit 0,
before the spool is opened if it comes that early) or, once the spool is
open, stops the daemon as soon as it is ready, the usual way. (Before
``run`` starts, while Python itself starts, the default actions apply.)

Running short of resources never stops the daemon: the soft open-files
limit is raised to the hard one at start (see :mod:`spoold.daemon.resources`), the
control server retries accept errors for lack of descriptors or memory, and
a loop exception handler logs asyncio's own servers' (the SMTP listener's)
accept failures of that kind once per burst instead of a traceback each
time; bursts that went quiet are closed by the status loop.

systemd (``Type=notify``) hears ``READY=1`` once every service is up,
``STATUS=`` with the queue counts, ``WATCHDOG=1`` at half of
``WatchdogSec`` while the event loop runs, ``RELOADING=1`` and ``READY=1``
around a reload, and ``STOPPING=1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, cast

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import structlog

from spoold.address import validate_address, validate_recipients
from spoold.body import LineEndingPolicy
from spoold.connection_cache import ConnectionCache
from spoold.daemon import logs
from spoold.daemon.config import (
    Config,
    SmtpConfig,
    dkim_signer,
    fleet_settings,
    load_config,
    restart_needed,
    webhook_settings,
)
from spoold.daemon.control import ControlServer, PeerCredentials
from spoold.daemon.dns import DnsLookups
from spoold.daemon.fleet_node import FleetNode, alone_status
from spoold.daemon.ingest import Origin, Submitter
from spoold.daemon.listener import ListenerSettings, listener_settings, listening_sockets
from spoold.daemon.metrics import Metrics
from spoold.daemon.mx import MxResolver
from spoold.daemon.resources import (
    AcceptFailures,
    install_accept_error_handler,
    raise_open_files_limit,
)
from spoold.daemon.routing import Router
from spoold.daemon.signals import Signals
from spoold.daemon.sts_fetch import PolicyFetcher
from spoold.daemon.systemd import Notifier, listen_fds, watchdog_interval
from spoold.daemon.webhooks import Webhooks, WebhookSettings
from spoold.daemon.workers import IngestWorkers, worker_count
from spoold.dkim import DkimSigner
from spoold.errors import (
    ConfigError,
    SpooldError,
)
from spoold.fleet import FleetSettings
from spoold.fleet_suppression import SuppressionMirror
from spoold.hooks import OnErrorHook, PresendHook, load_hook
from spoold.hostname import is_qualified
from spoold.idempotency import user_key, validate_key
from spoold.message import Queue
from spoold.mta_sts import MtaStsPolicies
from spoold.smtp_relay import SmtpRelay
from spoold.spool import Spool
from spoold.tls_policy import TlsPolicies

__all__ = ["Daemon", "Signals", "run", "EXIT_CONFIG_ERROR"]

log = structlog.get_logger("spoold.daemon.main")

_STATUS_EVERY = 5.0


@dataclasses.dataclass(frozen=True)
class _Live:
    """Everything a reload replaces, swapped as one value."""

    config: Config
    router: Router
    presend: PresendHook | None
    on_error: OnErrorHook | None
    listener: ListenerSettings | None
    dns: DnsLookups
    dkim: DkimSigner | None
    webhooks: list[WebhookSettings]  # secrets read (a reload checks them, applies a new secret)
    fleet: FleetSettings | None  # taken at start only: [fleet] changes need a restart


def _build(config: Config) -> _Live:
    """Everything derived from a config (reads files: run it off the event
    loop, except once at start); raises on any problem."""
    dns = DnsLookups(config.dns.nameservers)
    router = Router(config, MxResolver(dns.mx))  # one resolver, one cache
    listener = listener_settings(config.smtp) if config.smtp is not None else None
    presend = cast(PresendHook, load_hook(config.hooks.presend)) if config.hooks.presend else None
    on_error = (
        cast(OnErrorHook, load_hook(config.hooks.on_error)) if config.hooks.on_error else None
    )
    return _Live(
        config,
        router,
        presend,
        on_error,
        listener,
        dns,
        dkim_signer(config),
        webhook_settings(config),
        fleet_settings(config),
    )


class Daemon:
    """One daemon run: :meth:`run` opens the spool, serves the control
    socket, the SMTP listener (on ``inherited`` sockets from systemd and the
    addresses of ``smtp.listen``) and the metrics, acts on signals until a
    stop, flushes and returns the exit code. It owns every task it starts
    (one task group tree); a failure to start raises.

    ``signals`` are those :func:`run` installed before start-up (a Daemon
    made without them installs its own in :meth:`run`); ``live`` is what
    :func:`_build` made of ``config`` (built here, on the event loop, when
    not given). A reload (:meth:`reload`) builds a whole new ``live`` off
    the event loop and swaps it in one step, or changes nothing. It also
    serves the control socket's own operations (:class:`DaemonOperations
    <spoold.daemon.control.DaemonOperations>`)."""

    def __init__(
        self,
        config: Config,
        notifier: Notifier | None = None,
        *,
        signals: Signals | None = None,
        live: _Live | None = None,
        inherited: Sequence[socket.socket] = (),
    ) -> None:
        self.live = live or _build(config)
        self._started_webhooks = self.live.config.webhooks  # what a restart would change
        self.inherited = list(inherited)  # listening sockets systemd handed over
        self.notifier = notifier or Notifier()
        self._own_signals = signals is None
        self.signals = signals or Signals()
        self._spool: Spool | None = None
        self._submitter: Submitter | None = None
        self._workers: IngestWorkers | None = None
        self._webhooks: Webhooks | None = None
        self._reload_lock = anyio.Lock()  # SIGHUP and the control request never overlap
        self.accept_failures = AcceptFailures()
        # [fleet]: what this node shares through Redis.
        self.fleet = FleetNode(self.live.fleet) if self.live.fleet is not None else None
        self.metrics = Metrics()  # served when [metrics] listen is set
        self.cache = ConnectionCache(resolve_host=self.live.dns.resolve_host)
        self.cache.settings = config.relay.cache
        # MX routes' TLS policies: lookups through the live resolver (a
        # reload may point it elsewhere); kept MTA-STS policies outlive reloads.
        self.sts_fetcher = PolicyFetcher(self.live.dns.resolve_host)
        self.mta_sts = MtaStsPolicies(lambda name: self.live.dns.txt(name), self.sts_fetcher)
        self.tls_policies = TlsPolicies(
            self.mta_sts,
            lookup_tlsa=lambda host, port: self.live.dns.tlsa(host, port),
            mx_secure=lambda domain: self.live.dns.mx_secure(domain),
            on_report=self.metrics.tls_policy_finding,
        )

    # ------------------------------------------------------------ running

    def _status_text(self) -> str:
        if self._spool is None:
            return "starting"
        c = self._spool.counts()
        return f"{c[Queue.ACTIVE]} active, {c[Queue.FROZEN]} frozen, {self._spool.sending} sending"

    def _notify(self, fn: Callable[..., None], *args: Any) -> None:
        logs.flush()  # what led to this state is in the log before systemd hears of it
        try:
            fn(*args)
        except OSError as exc:
            log.warning("could not notify systemd", error=str(exc))

    async def run(self) -> int:
        cfg = self.live.config
        # Hop settings come with each attempt's policy (the router's); a hop
        # a policy does not cover is asked of the router as it is dialled.
        relay = SmtpRelay(
            lambda hop, message: self.live.router.settings_for(hop, message),
            self.cache,
            tls_policies=self.tls_policies,
        )
        restore_handler = install_accept_error_handler(
            asyncio.get_running_loop(), self.accept_failures
        )
        try:
            with self.signals.installed() if self._own_signals else contextlib.nullcontext():
                await self._run(cfg, relay)
        finally:
            restore_handler()
            with anyio.CancelScope(shield=True):
                await relay.close_and_flush()
                if self.fleet is not None:
                    await self.fleet.aclose()
        log.info("spoold stopped")
        return 0

    async def _run(self, cfg: Config, relay: SmtpRelay) -> None:
        # The webhooks outlive the spool: the events of the final flush
        # reach their outboxes before the senders stop.
        async with anyio.create_task_group() as outer:
            webhooks = None
            if self.live.webhooks:
                webhooks = self._webhooks = Webhooks(
                    cfg.spool.dir,
                    self.live.webhooks,
                    lambda recipient, sender: self.live.router.route_name_for(recipient, sender),
                    self.metrics,
                )
            await self._run_spool(cfg, relay, outer, webhooks)
            if webhooks is not None:
                with anyio.move_on_after(cfg.spool.flush_timeout.total_seconds() + 5):
                    await webhooks.written.wait()
            outer.cancel_scope.cancel()

    def _before_start(self, spool: Spool, webhooks: Webhooks | None) -> SuppressionMirror | None:
        """What must be in place before the spool's first attempt (a queue
        loaded at start is sent at once): the webhooks subscribed (they miss
        no event) and, with ``[fleet]``, the spool joined to the fleet
        (rates, connections, idempotency keys and the suppression list are
        the fleet's from the first message). Returns the suppression
        list's mirror, for the daemon to run."""
        if webhooks is not None:
            webhooks.subscribe(spool.events)
        return None if self.fleet is None else self.fleet.join(spool)

    async def _run_spool(
        self,
        cfg: Config,
        relay: SmtpRelay,
        outer: anyio.abc.TaskGroup,
        webhooks: Webhooks | None,
    ) -> None:
        hostname = cfg.hostname
        joined: list[SuppressionMirror | None] = []  # what _before_start gave
        async with Spool.open(
            cfg.spool.dir,
            relay=self.metrics.measured(relay) if cfg.metrics.listen else relay,
            presend=self.live.presend,
            on_error=self.live.on_error,
            settings=cfg.spool.settings,
            flush_timeout=0,  # the daemon flushes before leaving (see _stop)
            routes=self.live.router,
            policies=self.live.router,
            reporting_mta=hostname,
            dkim=self.live.dkim,
            before_start=lambda s: joined.append(self._before_start(s, webhooks)),
        ) as spool:
            self._spool = spool
            mirror = joined[0]
            if webhooks is not None:
                await outer.start(webhooks.run)
            if self.fleet is not None:
                # Renews the slots held; in the outer group, so it goes on
                # through the final flush (attempts under way hold slots).
                outer.start_soon(self.fleet.slots.run)
            self._submitter = Submitter(spool, lambda: self.live.router, hostname=hostname)
            server = ControlServer(
                spool,
                self,
                max_message_size=self._max_message_size,
                accept_failures=self.accept_failures,
            )
            submission = ControlServer(
                spool,
                self,
                max_message_size=self._max_message_size,
                accept_failures=self.accept_failures,
                submission_only=True,
            )
            async with anyio.create_task_group() as services:
                await services.start(server.serve, cfg.control.socket, cfg.control.mode)
                await services.start(
                    submission.serve,
                    cfg.control.submission_path,
                    cfg.control.submission_mode,
                    cfg.control.submission_group,
                )
                if cfg.metrics.listen:
                    await services.start(
                        functools.partial(
                            self.metrics.serve,
                            cache=self.cache,
                            fleet=self.fleet.state.health if self.fleet is not None else None,
                            slots=self.fleet.slots if self.fleet is not None else None,
                        ),
                        spool,
                        cfg.metrics.listen,
                    )
                if cfg.smtp is not None:
                    sockets = await anyio.to_thread.run_sync(
                        listening_sockets, cfg.smtp.listen, self.inherited
                    )
                    self._workers = IngestWorkers(
                        str(cfg.path),
                        sockets,
                        worker_count(cfg.smtp.workers),
                        grace=cfg.spool.flush_timeout.total_seconds(),
                        on_count=spool.suppressions.count,
                        suppression_changes=spool.suppressions.change_counter(),
                    )
                    await services.start(self._workers.run)
                elif self.inherited:
                    log.warning(
                        "systemd handed over listening sockets but [smtp] is off; closing them",
                        sockets=[str(s.getsockname()) for s in self.inherited],
                    )
                    for sock in self.inherited:
                        sock.close()
                services.start_soon(self._watchdog_loop)
                services.start_soon(self.mta_sts.run)  # refreshes kept MTA-STS policies
                if self.fleet is not None:
                    services.start_soon(self.fleet.heartbeats, spool)
                if mirror is not None:
                    await services.start(mirror.run)
                log.info(
                    "spoold ready",
                    event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
                    spool_dir=str(cfg.spool.dir),
                    control_socket=str(cfg.control.socket),
                    submission_socket=str(cfg.control.submission_path),
                    config=str(cfg.path),
                )
                self._notify(self.notifier.ready, self._status_text())
                await self._main_loop()
                self._notify(self.notifier.stopping)
                log.info("stopping: no new work taken")
                if self._workers is not None:
                    await self._workers.stop()  # they finish the messages under way
                services.cancel_scope.cancel()
            await self._flush(spool)

    async def _main_loop(self) -> None:
        """Act on signals until a stop; one that came during start-up is
        acted on at once (a stop before a reload)."""
        signals = self.signals
        while not signals.stop.is_set():
            await signals.requested()
            if signals.reload.is_set() and not signals.stop.is_set():
                signals.take_reload()
                await self.reload()

    async def _flush(self, spool: Spool) -> None:
        timeout = self.live.config.spool.flush_timeout.total_seconds()
        async with anyio.create_task_group() as tg:

            async def flush() -> None:
                try:
                    await spool.kill_and_flush(timeout)
                    log.info("all attempts finished")
                except TimeoutError:
                    log.warning(
                        "attempts still running after the flush timeout; they will be retried",
                        running=spool.running_sends,
                        flush_timeout=timeout,
                    )
                tg.cancel_scope.cancel()

            async def forced() -> None:
                await self.signals.force_stop.wait()
                log.warning("second stop signal: exiting now; messages are safe on disk")
                tg.cancel_scope.cancel()

            tg.start_soon(flush)
            tg.start_soon(forced)

    async def _watchdog_loop(self) -> None:
        interval = watchdog_interval()
        period = min(interval, _STATUS_EVERY) if interval else _STATUS_EVERY
        last_status = ""
        while True:
            if interval:
                self._notify(self.notifier.watchdog)
            self.accept_failures.close_quiet()
            status = self._status_text()
            if status != last_status:
                self._notify(self.notifier.status, status)
                last_status = status
            await anyio.sleep(period)

    # ------------------------------------------------------------- reload

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply it in one step (one reload at
        a time, so the newest file read is the one applied last)."""
        async with self._reload_lock:
            result = await self._reload()
        self.metrics.reloaded(bool(result.get("applied")))
        return result

    async def _reload(self) -> dict[str, Any]:
        old = self.live.config
        self._notify(self.notifier.reloading)
        log.info("reloading", config=str(old.path))
        try:
            new = await anyio.to_thread.run_sync(load_config, old.path)
            # The webhooks run as started: compared with that, not the last reload.
            restart = [s for s in restart_needed(old, new) if s != "webhooks"]
            if new.webhooks != self._started_webhooks:
                restart.append("webhooks")
            # What needs a restart keeps its running value.
            new = dataclasses.replace(
                new,
                spool=msgspec.structs.replace(new.spool, dir=old.spool.dir),
                control=old.control,
                metrics=old.metrics,
                fleet=old.fleet,
                smtp=(
                    msgspec.structs.replace(
                        new.smtp, listen=old.smtp.listen, workers=old.smtp.workers
                    )
                    if new.smtp and old.smtp
                    else old.smtp
                ),
            )
            live = await anyio.to_thread.run_sync(_build, new)
            # [fleet] is taken at start only; its password file was read
            # again (and checked): a new password, too, needs a restart.
            if self.fleet is not None and live.fleet != self.fleet.settings:
                restart.append("fleet.password_file")
        except ConfigError as exc:
            log.error("reload refused; the running config stays", problems=exc.problems)
            self._notify(self.notifier.ready, self._status_text())
            return {"applied": False, "errors": exc.problems}
        except (SpooldError, ValueError, OSError) as exc:
            log.error("reload refused; the running config stays", problems=[str(exc)])
            self._notify(self.notifier.ready, self._status_text())
            return {"applied": False, "errors": [str(exc)]}
        self._apply(live)
        _check_dane_resolver(live)
        moved = [
            name
            for name, route in new.routes.items()
            if name in old.routes and old.routes[name].next_hops != route.next_hops
        ]
        if moved:
            log.info(
                "routes with new next hops: their queued messages use them from their "
                "next attempt on",
                routes=moved,
            )
        if restart:
            log.warning("these settings change only after a restart", settings=restart)
        if new.hostname != old.hostname:
            _check_hostname(new)
        log.info(
            "reloaded",
            max_concurrent_send_jobs=new.spool.max_concurrent_send_jobs,
            routes=sorted(new.routes),
        )
        self._notify(self.notifier.ready, self._status_text())
        return {"applied": True, "restart_needed": restart}

    def _apply(self, live: _Live) -> None:
        """Swap in a new live state. Synchronous: nothing runs in between."""
        cfg = live.config
        self.live = live
        logs.configure(cfg.log.format, cfg.log.level)
        self.cache.settings = cfg.relay.cache
        self.cache.resolve_host = live.dns.resolve_host
        self.sts_fetcher.resolve_host = live.dns.resolve_host
        spool = self._spool
        if spool is not None:
            spool.settings = cfg.spool.settings
            spool.set_hooks(live.presend, live.on_error)
            spool.routes = live.router
            spool.policies = live.router
            spool.reporting_mta = cfg.hostname
            spool.dkim = live.dkim
        if self._submitter is not None:
            self._submitter.hostname = cfg.hostname
        if self._webhooks is not None:
            # A rotated secret file of an unchanged webhook signs from now on.
            self._webhooks.use_secrets(
                {
                    s.name: s.secret
                    for s in live.webhooks
                    if cfg.webhooks.get(s.name) == self._started_webhooks.get(s.name)
                }
            )
        if self._workers is not None:
            self._workers.reload()  # they read the same (now validated) file

    # ---------------------------------------------------- control extras

    def _listener_settings(self) -> ListenerSettings:
        settings = self.live.listener
        assert settings is not None
        return settings

    def _max_message_size(self) -> int:
        """The listener's size limit applies to ``spoold sendmail`` too."""
        return (self.live.config.smtp or SmtpConfig()).max_message_size

    # ------------------------------------ what the control socket adds

    async def submit(
        self,
        sender: str,
        recipients: list[str],
        content: bytes,
        idempotency_key: str | None = None,
        peer: PeerCredentials | None = None,
    ) -> list[str]:
        """A message from ``spoold sendmail`` (the control server has read
        its content and checked its size). The control socket is a way in
        of its own: the envelope is validated here again, never rewritten.
        A repeated ``idempotency_key`` returns the first submission's ids.
        ``peer``: who submitted it, as the kernel says; its uid (and user
        name) goes into the ``Received:`` header and the log."""
        assert self._submitter is not None
        sender = validate_address(sender, role="sender", smtputf8=True)
        recipients = validate_recipients(recipients, smtputf8=True)
        if not content:
            raise ValueError("an empty message (no content) is not accepted")
        limits = self.live.config.smtp or SmtpConfig()  # the listener's limits apply too
        if len(recipients) > limits.max_recipients:
            raise ValueError(
                f"{len(recipients)} recipients exceed the limit of "
                f"{limits.max_recipients} (smtp.max_recipients)"
            )
        uid = peer.uid if peer is not None else None
        if idempotency_key is not None:
            idempotency_key = (
                validate_key(idempotency_key) if uid is None else user_key(idempotency_key, uid)
            )
        user = await anyio.to_thread.run_sync(_user_name, uid) if uid is not None else ""
        ids = await self._submitter.submit(
            sender,
            recipients,
            content,
            origin=Origin("local", "localhost", uid=uid, user=user),
            policy=LineEndingPolicy.NORMALIZE,  # local programs write LF
            idempotency_key=idempotency_key,
        )
        log.info(
            "local submission",
            ids=ids,
            sender=sender,
            uid=uid,
            user=user or None,
            pid=peer.pid if peer is not None else None,
        )
        return ids

    async def webhooks(self) -> list[dict[str, Any]]:
        """Each webhook's state, in the order configured (none: [])."""
        return [] if self._webhooks is None else self._webhooks.status()

    async def count(self) -> dict[str, int]:
        """The same keys as ``count`` without a daemon: the messages of
        each queue (active and frozen from memory, removed and quarantine
        from the directory listing), and how many of active are being sent."""
        spool = self._spool
        assert spool is not None
        in_memory = spool.counts()
        return {
            "active": in_memory[Queue.ACTIVE],
            "frozen": in_memory[Queue.FROZEN],
            "sending": spool.sending,
            "removed": await spool.ondisk.count(Queue.REMOVED),
            "quarantine": await spool.ondisk.count(Queue.QUARANTINE),
        }

    async def info(self) -> dict[str, Any]:
        cfg = self.live.config
        return {
            "pid": os.getpid(),
            "config": str(cfg.path),
            "spool_dir": str(cfg.spool.dir),
            "max_concurrent_send_jobs": self._spool.max_concurrent_send_jobs
            if self._spool
            else cfg.spool.max_concurrent_send_jobs,
            "routes": sorted(cfg.routes),
            "control_socket": str(cfg.control.socket),
            "submission_socket": str(cfg.control.submission_path),
            "log_level": cfg.log.level,
        }

    async def fleet_status(self) -> dict[str, Any]:
        return alone_status() if self.fleet is None else await self.fleet.status()

    async def check(self, max_age: float, quick: bool = False) -> list[str]:
        assert self._spool is not None
        return [str(p) for p in await self._spool.ondisk.check(max_age, quick=quick)]


def _user_name(uid: int) -> str:
    """The login name of ``uid``, or "" when the system knows none (a
    lookup that may ask a directory service: run it off the event loop)."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OSError):
        return ""


EXIT_CONFIG_ERROR = 2
"""The exit status of ``spoold run`` for a config it cannot use (a file
that is not valid, a hook that cannot be loaded): starting again cannot
help, so the systemd unit does not restart on it
(``RestartPreventExitStatus=``). Every other failure to start exits 1."""


async def run(config_path: str) -> int:
    """Entry point of ``spoold run``: 0 on a clean stop (a stop signal
    during start-up included), :data:`EXIT_CONFIG_ERROR` (2) on a bad config
    or a hook that cannot be loaded, 1 when it cannot start otherwise."""
    signals = Signals()
    inherited = listen_fds()  # socket activation; forgotten by any child process
    with signals.installed():  # first thing: a signal while starting is never fatal
        try:
            config = await anyio.to_thread.run_sync(load_config, config_path)
        except ConfigError as exc:
            logs.configure()
            log.error("invalid configuration", config=exc.path, problems=exc.problems)
            return EXIT_CONFIG_ERROR
        logs.configure(config.log.format, config.log.level)
        raise_open_files_limit()
        _check_hostname(config)
        failure: BaseException | None = None
        try:
            if await _stopped_while_starting(signals, "reading the config"):
                return 0
            try:
                live = await anyio.to_thread.run_sync(_build, config)  # imports the hooks
            except ValueError as exc:  # a hook or a DKIM key that cannot be loaded: the config's
                problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
                log.error("invalid configuration", config=config_path, problems=problems)
                return EXIT_CONFIG_ERROR
            if await _stopped_while_starting(signals, "loading hooks and routes"):
                return 0
            _check_dane_resolver(live)
            return await Daemon(config, signals=signals, live=live, inherited=inherited).run()
        except* (SpooldError, OSError) as group:  # directly or from inside a task group
            failure = group
        log.error("cannot start", error="; ".join(str(e) for e in _leaves(failure)))
        return 1


def _check_hostname(config: Config) -> None:
    """Warn when the name we give next hops is not fully qualified (the
    machine has none and the config sets none): smarthosts may refuse it."""
    if not is_qualified(config.hostname):
        log.warning(
            "hostname is not a fully qualified domain name: next hops may refuse our "
            "EHLO or mark our mail down; set hostname in the config",
            hostname=config.hostname,
        )


def _check_dane_resolver(live: _Live) -> None:
    """Warn when a route uses DANE but its DNS answers come from servers
    not on this machine: their AD bit proves nothing over a path an
    attacker may be on (RFC 7672 §1.3: use a validating resolver on the
    same host, or a trusted path to it)."""
    routes = [n for n, r in live.config.routes.items() if r.tls_policy == "dane-mta-sts"]
    remote = live.dns.remote_nameservers() if routes else []
    if remote:
        log.warning(
            "DANE trusts the AD bit of DNS servers not on this machine, which anyone "
            "on the path to them can forge; use a validating resolver on 127.0.0.1 "
            "([dns] nameservers)",
            routes=routes,
            nameservers=remote,
        )


async def _stopped_while_starting(signals: Signals, step: str) -> bool:
    # A signal that arrived while a worker thread did the step is already
    # queued on the loop, maybe behind the thread's own wake-up: let it run.
    await anyio.lowlevel.checkpoint()
    if signals.stop.is_set():
        log.info("stop signal while starting: not starting", after=step)
        return True
    return False


def _leaves(error: BaseException | None) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in _leaves(e)]
    return [] if error is None else [error]
