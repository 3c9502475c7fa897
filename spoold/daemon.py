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

systemd (``Type=notify``) hears ``READY=1`` once every service is up,
``STATUS=`` with the queue counts, ``WATCHDOG=1`` at half of
``WatchdogSec`` while the event loop runs, ``RELOADING=1`` and ``READY=1``
around a reload, and ``STOPPING=1``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import signal
import socket
from collections.abc import Callable
from typing import Any, cast

import anyio
import structlog

from spoold import logs
from spoold.body import LineEndingPolicy
from spoold.config import Config, ConfigError, SmtpConfig, load_config, restart_needed
from spoold.control import ControlServer
from spoold.errors import SpooldError
from spoold.hooks import OnErrorHook, PresendHook, load_hook
from spoold.ingest import Origin, Submitter
from spoold.message import Message, Queue
from spoold.metrics import Metrics
from spoold.routing import Router
from spoold.smtp_listener import ListenerSettings, SmtpListener, listener_settings
from spoold.smtp_relay import ConnectionCache, RouteSettings, SmtpRelay
from spoold.spool import Spool, retry_intervals_from_spans
from spoold.systemd import Notifier, watchdog_interval

__all__ = ["Daemon", "run"]

log = structlog.get_logger("spoold.daemon")

_STATUS_EVERY = 5.0


@dataclasses.dataclass(frozen=True)
class _Live:
    """Everything a reload replaces, swapped as one value."""

    config: Config
    router: Router
    presend: PresendHook | None
    on_error: OnErrorHook | None
    listener: ListenerSettings | None


def _build(config: Config) -> _Live:
    """Everything derived from a config (reads files: run it off the event
    loop, except once at start); raises on any problem."""
    router = Router(config)
    listener = listener_settings(config.smtp) if config.smtp is not None else None
    presend = cast(PresendHook, load_hook(config.hooks.presend)) if config.hooks.presend else None
    on_error = (
        cast(OnErrorHook, load_hook(config.hooks.on_error)) if config.hooks.on_error else None
    )
    return _Live(config, router, presend, on_error, listener)


class Daemon:
    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.live = _build(config)
        self.notifier = notifier or Notifier()
        self._reload_requested = anyio.Event()
        self._stop_requested = anyio.Event()
        self._force_stop = anyio.Event()
        self._spool: Spool | None = None
        self._submitter: Submitter | None = None
        self._reload_lock = anyio.Lock()  # SIGHUP and the control request never overlap
        self.cache = ConnectionCache(
            max_per_hop=config.relay.max_connections_per_hop,
            max_total=config.relay.max_connections,
            idle_timeout=config.relay.idle_timeout.total_seconds(),
        )

    # -------------------------------------------------------------- signals

    def _on_reload_signal(self) -> None:
        self._reload_requested.set()  # whichever event the main loop waits on now

    def _on_stop_signal(self) -> None:
        if self._stop_requested.is_set():
            self._force_stop.set()
        self._stop_requested.set()

    def _install_signals(self) -> Callable[[], None]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal)

        def remove() -> None:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

        return remove

    # ------------------------------------------------------------ running

    def _settings_for(self, hop: str, message: Message) -> RouteSettings:
        return self.live.router.settings_for(hop, message)

    def _status_text(self) -> str:
        if self._spool is None:
            return "starting"
        c = self._spool.counts()
        return f"{c['active']} active, {c['frozen']} frozen, {c['sending']} sending"

    def _notify(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except OSError as exc:
            log.warning("could not notify systemd", error=str(exc))

    async def run(self) -> int:
        cfg = self.live.config
        relay = SmtpRelay(self._settings_for, self.cache)
        remove_signals = self._install_signals()
        try:
            async with Spool.open(
                cfg.spool.dir,
                relay=relay,
                presend=self.live.presend,
                on_error=self.live.on_error,
                max_concurrent_send_jobs=cfg.spool.max_concurrent_send_jobs,
                default_retry_intervals=retry_intervals_from_spans(
                    cfg.spool.retry_intervals, cfg.spool.retry_jitter
                ),
                flush_timeout=0,  # the daemon flushes before leaving (see _stop)
                min_free_space=cfg.spool.min_free_space,
                routes=self.live.router,
            ) as spool:
                self._spool = spool
                hostname = await anyio.to_thread.run_sync(socket.getfqdn)
                self._submitter = Submitter(spool, lambda: self.live.router, hostname=hostname)
                server = ControlServer(
                    spool,
                    extra={
                        "reload": self._reload_request,
                        "check": self._check_request,
                        "info": self._info_request,
                        "count": self._count_request,
                        "submit": self._submit_request,
                    },
                )
                async with anyio.create_task_group() as services:
                    await services.start(server.serve, cfg.control.socket, cfg.control.mode)
                    if cfg.metrics.listen:
                        await services.start(Metrics().serve, spool, cfg.metrics.listen)
                    if cfg.smtp is not None:
                        listener = SmtpListener(self._submitter, self._listener_settings)
                        await services.start(listener.serve)
                    services.start_soon(self._watchdog_loop)
                    log.info(
                        "spoold ready",
                        spool_dir=str(cfg.spool.dir),
                        control_socket=str(cfg.control.socket),
                        config=str(cfg.path),
                    )
                    self._notify(self.notifier.ready, self._status_text())
                    await self._main_loop()
                    self._notify(self.notifier.stopping)
                    log.info("stopping: no new work taken")
                    services.cancel_scope.cancel()
                await self._flush(spool)
        finally:
            remove_signals()
            with anyio.CancelScope(shield=True):
                await relay.close_and_flush()
        log.info("spoold stopped")
        return 0

    async def _main_loop(self) -> None:
        while not self._stop_requested.is_set():
            async with anyio.create_task_group() as tg:

                async def wait_for(event: anyio.Event) -> None:
                    await event.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(wait_for, self._reload_requested)
                tg.start_soon(wait_for, self._stop_requested)
            if self._reload_requested.is_set() and not self._stop_requested.is_set():
                self._reload_requested = anyio.Event()
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
                await self._force_stop.wait()
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
            return await self._reload()

    async def _reload(self) -> dict[str, Any]:
        old = self.live.config
        self._notify(self.notifier.reloading)
        log.info("reloading", config=str(old.path))
        try:
            new = await anyio.to_thread.run_sync(load_config, old.path)
            restart = restart_needed(old, new)
            # What needs a restart keeps its running value.
            new = dataclasses.replace(
                new,
                spool=dataclasses.replace(new.spool, dir=old.spool.dir),
                control=old.control,
                metrics=old.metrics,
                smtp=(
                    dataclasses.replace(new.smtp, listen=old.smtp.listen)
                    if new.smtp and old.smtp
                    else old.smtp
                ),
            )
            live = await anyio.to_thread.run_sync(_build, new)
        except ConfigError as exc:
            log.error("reload refused; the running config stays", problems=exc.problems)
            self._notify(self.notifier.ready, self._status_text())
            return {"applied": False, "errors": exc.problems}
        except (SpooldError, ValueError, OSError) as exc:
            log.error("reload refused; the running config stays", problems=[str(exc)])
            self._notify(self.notifier.ready, self._status_text())
            return {"applied": False, "errors": [str(exc)]}
        self._apply(live)
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
        cache = self.cache
        cache.max_per_hop = cfg.relay.max_connections_per_hop
        cache.max_total = cfg.relay.max_connections
        cache.idle_timeout = cfg.relay.idle_timeout.total_seconds()
        spool = self._spool
        if spool is not None:
            spool.max_concurrent_send_jobs = cfg.spool.max_concurrent_send_jobs
            spool.min_free_space = cfg.spool.min_free_space
            spool.default_retry_intervals = retry_intervals_from_spans(
                cfg.spool.retry_intervals, cfg.spool.retry_jitter
            )
            spool.set_hooks(live.presend, live.on_error)
            spool.routes = live.router

    # ---------------------------------------------------- control extras

    async def _reload_request(self, request: dict[str, Any]) -> Any:
        return await self.reload()

    def _listener_settings(self) -> ListenerSettings:
        settings = self.live.listener
        assert settings is not None
        return settings

    async def _submit_request(self, request: dict[str, Any]) -> Any:
        """A message from ``spoold sendmail``: envelope and base64 content."""
        assert self._submitter is not None
        sender = request.get("sender", "")
        recipients = request.get("recipients")
        if not isinstance(sender, str):
            raise ValueError("sender must be a string")
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise ValueError("recipients must be a list of addresses")
        try:
            content = base64.b64decode(request.get("content", ""), validate=True)
        except (ValueError, TypeError):
            raise ValueError("content must be base64") from None
        limits = self.live.config.smtp or SmtpConfig()  # the listener's limits apply too
        if len(content) > limits.max_message_size:
            raise ValueError(
                f"message of {len(content)} bytes exceeds the limit of "
                f"{limits.max_message_size} (smtp.max_message_size)"
            )
        if len(recipients) > limits.max_recipients:
            raise ValueError(
                f"{len(recipients)} recipients exceed the limit of "
                f"{limits.max_recipients} (smtp.max_recipients)"
            )
        return await self._submitter.submit(
            sender,
            recipients,
            content,
            origin=Origin("local", "localhost"),
            policy=LineEndingPolicy.NORMALIZE,  # local programs write LF
        )

    async def _count_request(self, request: dict[str, Any]) -> Any:
        """The same keys as ``count`` without a daemon: active and frozen
        from memory, removed and quarantine from the directory listing."""
        assert self._spool is not None
        counts: dict[str, int] = dict(self._spool.counts())
        for queue in (Queue.REMOVED, Queue.QUARANTINE):
            counts[queue.value] = await self._spool.ondisk.count(queue)
        return counts

    async def _info_request(self, request: dict[str, Any]) -> Any:
        cfg = self.live.config
        return {
            "pid": os.getpid(),
            "config": str(cfg.path),
            "spool_dir": str(cfg.spool.dir),
            "max_concurrent_send_jobs": self._spool.max_concurrent_send_jobs
            if self._spool
            else cfg.spool.max_concurrent_send_jobs,
            "routes": sorted(cfg.routes),
            "log_level": cfg.log.level,
        }

    async def _check_request(self, request: dict[str, Any]) -> Any:
        assert self._spool is not None
        max_age = request.get("max_age", 3600)
        if not isinstance(max_age, int | float):
            raise ValueError("max_age must be a number of seconds")
        return [str(p) for p in await self._spool.ondisk.check(float(max_age))]


async def run(config_path: str) -> int:
    """Entry point of ``spoold run``: 0 on a clean stop, 2 on a bad config."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        logs.configure()
        log.error("invalid configuration", config=exc.path, problems=exc.problems)
        return 2
    logs.configure(config.log.format, config.log.level)
    failure: BaseException | None = None
    try:
        daemon = Daemon(config)
        return await daemon.run()
    except* (SpooldError, OSError) as group:  # directly or from inside a task group
        failure = group
    log.error("cannot start", error="; ".join(str(e) for e in _leaves(failure)))
    return 1


def _leaves(error: BaseException | None) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in _leaves(e)]
    return [] if error is None else [error]
