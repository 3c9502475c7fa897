"""An SMTP ingest worker: one of the processes that take mail for the daemon.

The daemon (the spool's owner) starts ``smtp.workers`` of these, each as
this module run with ``--config PATH --fds N,... --ready-fd R
--lifeline-fd L --suppression-changes-fd S`` (from the daemon's own copy of
the package, never from its working directory: see
:mod:`spoold.daemon.workers`).
Each serves the listening sockets it inherited (fds ``N,...``: the same
sockets in every worker, so the kernel spreads connections over them),
writes what it accepts into the spool as a
:class:`~spoold.writer.SpoolWriter` (durable before the 250; the owner is
woken through the spool's wake-up socket and adopts the messages), and
writes one byte to fd ``R`` once it serves, then reports its counts there
(:mod:`spoold.daemon.workers`). Fd ``L`` is the read end of a
pipe only the daemon can write to: end-of-file there means the daemon is
gone, and the worker stops as on SIGTERM (it never outlives its daemon).
Fd ``S`` is the daemon's count of its suppression list writes (a
:class:`~spoold.shared_counter.SharedCounter`): the worker reads the list
again when it moved, and touches no file to know (without it, a ``stat``
per ``RCPT``).

Signals, as for the daemon: SIGHUP reads the config file again and applies
what it can (routes, listener limits, the ``hostname`` of new sessions and
messages, retry defaults, the free-space floor, the DKIM keys, whose files
it reads itself; a file that does not validate changes nothing and is
logged at error as ``ingest worker reload refused``, with the worker's
pid: the daemon has validated the file first, so only what changed in
between can do that, and the daemon's own reload answer does not show it); SIGTERM or SIGINT stop
accepting, let the messages being spooled finish (up to
``spool.flush_timeout``) and exit 0. Exit codes: 0 stopped, 2 bad config,
1 could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import socket
import sys
from dataclasses import dataclass

import anyio
import structlog

from spoold.daemon import logs
from spoold.daemon.config import Config, dkim_signer, fleet_settings, load_config
from spoold.daemon.ingest import Submitter
from spoold.daemon.listener import ListenerSettings, SmtpListener, listener_settings
from spoold.daemon.resources import (
    AcceptFailures,
    event_loop_options,
    install_accept_error_handler,
    raise_open_files_limit,
)
from spoold.daemon.routing import Router
from spoold.daemon.signals import Signals
from spoold.dkim import DkimSigner
from spoold.errors import ConfigError, SpooldError
from spoold.fleet import FleetSettings, SharedState
from spoold.fleet_keys import FleetKeys
from spoold.shared_counter import SharedCounter
from spoold.writer import SpoolWriter

__all__ = ["run_worker", "main"]

log = structlog.get_logger("spoold.worker")


@dataclass(frozen=True)
class _State:
    config: Config
    router: Router
    listener: ListenerSettings
    dkim: DkimSigner | None
    fleet: FleetSettings | None = None  # taken at start only, as by the daemon


def _build(config: Config) -> _State:
    """What a worker derives from a config (reads files: a worker thread)."""
    if config.smtp is None:
        raise SpooldError(f"{config.path}: [smtp] is off; an ingest worker has nothing to do")
    return _State(
        config,
        Router(config),
        listener_settings(config.smtp),
        dkim_signer(config),
        fleet_settings(config),
    )


async def run_worker(
    config_path: str,
    fds: list[int],
    ready_fd: int,
    lifeline_fd: int | None = None,
    suppression_changes_fd: int | None = None,
) -> int:
    signals = Signals()
    with signals.installed():
        try:
            config = await anyio.to_thread.run_sync(load_config, config_path)
        except ConfigError as exc:
            logs.configure()
            log.error("invalid configuration", config=exc.path, problems=exc.problems)
            return 2
        logs.configure(config.log.format, config.log.level)
        raise_open_files_limit()
        errors: list[str] = []
        try:
            return await _serve(config, fds, ready_fd, signals, lifeline_fd, suppression_changes_fd)
        except* (SpooldError, OSError) as group:
            errors = [str(e) for e in group.exceptions]
        log.error("ingest worker cannot run", error="; ".join(errors))
        return 1


async def _watch_lifeline(fd: int, signals: Signals) -> None:
    """Stop the worker once the daemon is gone (end-of-file on ``fd``)."""
    try:
        while True:
            await anyio.wait_readable(fd)
            if os.read(fd, 64) == b"":
                break
    finally:
        os.close(fd)
    log.warning("the daemon is gone; ingest worker stopping", pid=os.getpid())
    signals.stop.set()


async def _serve(
    config: Config,
    fds: list[int],
    ready_fd: int,
    signals: Signals,
    lifeline_fd: int | None,
    suppression_changes_fd: int | None = None,
) -> int:
    state = await anyio.to_thread.run_sync(_build, config)
    sockets = []
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    failures = AcceptFailures()
    restore = install_accept_error_handler(asyncio.get_running_loop(), failures)
    # [fleet]: smtp.deduplicate's keys are claimed fleet-wide from here too.
    fleet = SharedState(state.fleet) if state.fleet is not None else None
    try:
        async with SpoolWriter.open(
            config.spool.dir, settings=config.spool.settings.writer, dkim=state.dkim
        ) as writer:
            if fleet is not None:
                writer.shared_keys = FleetKeys(fleet)
            if suppression_changes_fd is not None:
                writer.suppressions.follow(SharedCounter.attach(suppression_changes_fd))
            submitter = Submitter(writer, lambda: state.router, hostname=config.hostname)
            listener = SmtpListener(submitter, lambda: state.listener, accept_failures=failures)
            drain = config.spool.flush_timeout.total_seconds()
            background = anyio.CancelScope()  # ended once the worker stops anyway

            async def housekeeping() -> None:
                with background:
                    async with anyio.create_task_group() as tasks:
                        if lifeline_fd is not None:
                            tasks.start_soon(_watch_lifeline, lifeline_fd, signals)
                        while True:  # close bursts of accept failures now and then
                            await anyio.sleep(failures.quiet)
                            failures.close_quiet()

            async with anyio.create_task_group() as tg:
                tg.start_soon(housekeeping)
                await tg.start(functools.partial(listener.serve, sockets, drain_timeout=drain))
                os.write(ready_fd, b"1")
                os.set_blocking(ready_fd, False)  # from now on: the report pipe
                writer.suppressions.on_count = _Reports(ready_fd)
                log.info(
                    "ingest worker ready",
                    pid=os.getpid(),
                    event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
                )
                while not signals.stop.is_set():
                    await signals.requested()
                    if signals.reload.is_set() and not signals.stop.is_set():
                        signals.take_reload()
                        state = await _reload(state, writer)
                        submitter.hostname = state.config.hostname  # new sessions and messages
                background.cancel()
                listener.stop()
    finally:
        restore()
        if fleet is not None:
            await fleet.aclose()
    log.info("ingest worker stopped", pid=os.getpid())
    return 0


class _Reports:
    """What this worker counts, told to the daemon on the report pipe (a
    line ``KIND N`` a count; see :mod:`spoold.daemon.workers`). Never
    blocks: a line the pipe cannot take now is sent with the next one."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending: dict[str, int] = {}

    def __call__(self, kind: str, n: int) -> None:
        self.pending[kind] = self.pending.get(kind, 0) + n
        lines = "".join(f"{k} {v}\n" for k, v in self.pending.items()).encode("ascii")
        try:
            os.write(self.fd, lines)  # under PIPE_BUF: all of it or nothing
        except BlockingIOError:
            return
        except OSError:  # the daemon is gone: nobody to tell
            pass
        self.pending.clear()


async def _reload(state: _State, writer: SpoolWriter) -> _State:
    """A new state from the config file, or the old one if it does not
    validate. What needs a restart (addresses, the spool) keeps its value."""
    try:
        config = await anyio.to_thread.run_sync(load_config, state.config.path)
        new = await anyio.to_thread.run_sync(_build, config)
    except (ConfigError, SpooldError, ValueError, OSError) as exc:
        # The daemon validated the file before passing the reload on, but a
        # worker reads it (and its key files) again: what changed meanwhile
        # can be refused here alone. Said at error, naming this worker, in
        # the daemon's log stream (the daemon's reload answer cannot know).
        problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
        log.error(
            "ingest worker reload refused; this worker keeps its running config",
            pid=os.getpid(),
            problems=problems,
        )
        return state
    logs.configure(config.log.format, config.log.level)
    writer.settings = config.spool.settings.writer
    writer.dkim = new.dkim
    log.info("ingest worker reloaded", pid=os.getpid())
    return new


GC_YOUNG_THRESHOLD = 10_000
"""The worker's first-generation threshold of the cyclic garbage collector
(Python's default: 700)."""


def tune_gc() -> None:
    """Collect the youngest generation after 10,000 net new objects, not 700.
    A message makes a few hundred short-lived objects, nearly all freed by
    reference counting; with the default threshold the collector ran every
    few messages and traversed what was alive then: about 30k instructions
    a message of the worker's 1.15 M (callgrind, in-process ingest); this
    threshold saves nearly all of that. The older generations keep their
    thresholds; what waits for the collector in between is a few MB at most."""
    gc.set_threshold(GC_YOUNG_THRESHOLD)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="spoold-ingest-worker", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--fds", required=True, help="listening socket fds, comma-separated")
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--lifeline-fd", type=int, default=None)
    parser.add_argument("--suppression-changes-fd", type=int, default=None)
    args = parser.parse_args(argv)
    fds = [int(f) for f in args.fds.split(",") if f]
    tune_gc()
    sys.exit(
        anyio.run(
            run_worker,
            args.config,
            fds,
            args.ready_fd,
            args.lifeline_fd,
            args.suppression_changes_fd,
            backend_options=event_loop_options(),
        )
    )


if __name__ == "__main__":
    main()
