"""Running ``spoold run`` as a subprocess, the way systemd does, for the
end-to-end tests of the daemon and the admin CLI.

:func:`write_config` writes a small config in the test's temp dir (JSON
logs, a control socket under ``run/``, one route whose next hops the test
chooses). :class:`NotifySocket` binds the Unix datagram socket that
``$NOTIFY_SOCKET`` names and reads the daemon's datagrams with a timeout.
:class:`DaemonProcess` starts the daemon with its stdout and stderr in a
file (never an unread pipe), waits for ``READY=1``, sends signals, reads
the JSON log lines and always kills the process at teardown.

:func:`prefill` puts messages into a spool before a daemon opens it (the
daemon loads them at start-up). :func:`cli` runs one ``spoold`` command in
a subprocess with a timeout.

Every wait here is bounded; nothing sleeps for a fixed time except the
polling (:func:`tests.support.wait_until`) of a file or a process that has
no other way to say it has changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from spoold.body import Body
from spoold.message import SEND_NOW, Message, RetryInterval, Status
from spoold.ondisk import NewMessage, OnDiskSpool
from tests.factories import make_message
from tests.support import WAIT_TIMEOUT, wait_until

__all__ = [
    "BODY",
    "CliResult",
    "DaemonProcess",
    "DaemonFactory",
    "NotifySocket",
    "child_env",
    "cli",
    "far_future",
    "prefill",
    "set_config_value",
    "spooled",
    "start_daemon",
    "write_config",
]

BODY = b"Subject: hello\r\n\r\nfirst line\r\n.a line that starts with a dot\r\nlast\r\n"

_TIMEOUT = WAIT_TIMEOUT  # a safety net for every wait here: reaching it means a bug


# ------------------------------------------------------------- messages


def spooled(
    next_hop: str,
    *,
    status: Status = SEND_NOW,
    body: bytes = BODY,
    recipients: list[str] | None = None,
    retry_intervals: list[RetryInterval] | None = None,
) -> NewMessage:
    """A message for :func:`prefill` whose only next hop is ``next_hop``."""

    def build(mid: str, related: list[str]) -> Message:
        return make_message(
            mid,
            status=status,
            recipients=recipients,
            next_hops=[next_hop],
            retry_intervals=retry_intervals,
        )

    return NewMessage(Body.from_content(body), status, build)


async def prefill(spool_dir: Path, messages: Sequence[NewMessage]) -> list[str]:
    """Write ``messages`` into the spool at ``spool_dir`` (no daemon may own
    it); return their ids in order."""
    ondisk, _ = await OnDiskSpool.open(spool_dir)
    try:
        added = await ondisk.add(list(messages))
    finally:
        await ondisk.close()
    return [m.id for m in added]


# --------------------------------------------------------------- config


def write_config(
    directory: Path,
    *,
    next_hops: Sequence[str],
    max_concurrent_send_jobs: int = 4,
    flush_timeout: str = "1s",
    socket_mode: str = "0660",
    name: str = "spoold.toml",
    run_dir: Path | None = None,
) -> Path:
    """A config in ``directory``: spool in ``spool/``, control socket
    ``run/ctl.sock`` (the ``run`` directory is made 0750 if missing), or
    ``run_dir/ctl.sock`` when given; the submission socket is
    ``submit.sock`` beside it (the default)."""
    socket_path = "run/ctl.sock" if run_dir is None else str(run_dir / "ctl.sock")
    run_dir = run_dir or directory / "run"
    run_dir.mkdir(mode=0o750, exist_ok=True)
    hops = ", ".join(f'"{h}"' for h in next_hops)
    path = directory / name
    path.write_text(
        "[spool]\n"
        'dir = "spool"\n'
        f"max_concurrent_send_jobs = {max_concurrent_send_jobs}\n"
        'retry_intervals = ["1h"]\n'
        f'flush_timeout = "{flush_timeout}"\n'
        "\n[control]\n"
        f'socket = "{socket_path}"\n'
        f'mode = "{socket_mode}"\n'
        "\n[log]\n"
        'format = "json"\n'
        'level = "info"\n'
        "\n[relay]\n"
        'default_route = "smarthost"\n'
        'connect_timeout = "2s"\n'
        'command_timeout = "30s"\n'
        "\n[routes.smarthost]\n"
        f"next_hops = [{hops}]\n"
        'tls = "none"\n'
    )
    return path


def set_config_value(path: Path, key: str, value: str) -> None:
    """Replace the line ``key = ...`` of the config at ``path``."""
    lines = path.read_text().splitlines()
    out = [f"{key} = {value}" if line.split(" = ")[0] == key else line for line in lines]
    assert out != lines, f"no line {key} = ... in {path}"
    path.write_text("\n".join(out) + "\n")


# ------------------------------------------------------------------ CLI


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str
    stdout: bytes


def cli(*args: str, stdin: bytes = b"", timeout: float = _TIMEOUT) -> CliResult:
    """Run ``spoold ARGS < stdin`` and return its exit code and output. It
    blocks: from a test whose own loop serves the other end, run it in a
    worker thread."""
    done = subprocess.run(
        [sys.executable, "-m", "spoold.daemon.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
        env=child_env(),
    )
    return CliResult(
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
        done.stdout,
    )


async def sendmail(config: Path, *args: str, stdin: bytes) -> CliResult:
    """``spoold --config CONFIG sendmail ARGS < stdin``, in a worker thread
    (the other end may be served by this test's own loop)."""
    return await anyio.to_thread.run_sync(
        functools.partial(cli, "--config", str(config), "sendmail", *args, stdin=stdin)
    )


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``spoold`` child process: this one's, without
    what systemd or the user set for spoold, with this project importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "SPOOLD_CONFIG")
    }
    project = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


# --------------------------------------------------------------- notify


Fields = dict[str, str]


class NotifySocket:
    """The ``$NOTIFY_SOCKET`` end: every datagram received is kept, in order,
    as a dict of its ``KEY=value`` fields."""

    def __init__(self, path: Path) -> None:
        if len(os.fsencode(path)) >= 108:
            pytest.fail(f"socket path too long for AF_UNIX: {path}")
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[Fields] = []

    def close(self) -> None:
        self.sock.close()

    def drain(self) -> list[Fields]:
        """Every datagram already received (kept in ``received`` too),
        without waiting: for a process that has exited."""
        out = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return out
            out.append(self._record(data))

    def _record(self, data: bytes) -> Fields:
        fields: Fields = {}
        for line in data.decode().split("\n"):
            key, _, value = line.partition("=")
            fields[key] = value
        self.received.append(fields)
        return fields

    async def next(self) -> Fields:
        """The next datagram (unbounded: callers bound their wait)."""
        loop = asyncio.get_running_loop()
        return self._record(await loop.sock_recv(self.sock, 65536))

    async def wait_for(
        self, key: str, value: str = "1", timeout: float = _TIMEOUT
    ) -> tuple[Fields, list[Fields]]:
        """Read datagrams until one has ``key=value``; return it and every
        datagram read on the way (itself included). Fails the test after
        ``timeout`` seconds (a safety net)."""
        seen: list[Fields] = []
        with anyio.move_on_after(timeout):
            while True:
                fields = await self.next()
                seen.append(fields)
                if fields.get(key) == value:
                    return fields, seen
        pytest.fail(f"no {key}={value} within {timeout}s; got: {seen}")


# --------------------------------------------------------------- daemon


_SET_NOFILE_AND_EXEC = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[3:]])"
)


class DaemonProcess:
    """One ``spoold run`` subprocess (see the module docstring)."""

    def __init__(self, directory: Path, config: Path, notify: NotifySocket) -> None:
        self.directory = directory
        self.config = config
        self.notify = notify
        self.log_path = directory / f"{config.stem}.log"
        self.spool_dir = directory / "spool"
        self.socket = directory / "run" / "ctl.sock"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(
        self,
        env: dict[str, str] | None = None,
        nofile: tuple[int, int] | None = None,
        prefix: Sequence[str] = (),
        cwd: Path | None = None,
    ) -> None:
        """Start ``spoold run``; with ``nofile`` = (soft, hard) its
        RLIMIT_NOFILE is set first (by a small Python that then execs the
        daemon: same pid, no preexec_fn in this threaded process);
        ``prefix``: a command that runs the daemon (e.g. ``setpriv ...``),
        which must exec it (same pid); ``cwd``: the directory it starts in
        (it then imports nothing from there, as the installed ``spoold``
        command does not: ``python -P``)."""
        limit: list[str] = []
        if nofile is not None:
            limit = ["-c", _SET_NOFILE_AND_EXEC, str(nofile[0]), str(nofile[1])]
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *prefix,
                sys.executable,
                *(["-P"] if cwd is not None else []),
                *limit,
                "-m",
                "spoold.daemon.cli",
                "run",
                "--config",
                str(self.config),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=child_env({"NOTIFY_SOCKET": str(self.notify.path), **(env or {})}),
                cwd=cwd,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def wait_ready(self, timeout: float = _TIMEOUT) -> Fields:
        """Wait for READY=1 (fails the test, with the log, if the daemon
        exits or does not get ready in time)."""
        waiter = asyncio.ensure_future(self.notify.wait_for("READY", "1", timeout))
        exited = asyncio.ensure_future(self._wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            exited.cancel()
        if waiter in done:
            return waiter.result()[0]
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError, BaseException):
            await waiter
        pytest.fail(f"the daemon did not get ready:\n{self.log_text()}")

    async def _wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def wait_exit(self, timeout: float = _TIMEOUT) -> int:
        """The exit code; fails the test if it is still running after ``timeout``."""
        try:
            return await asyncio.wait_for(self._wait(), timeout)
        except TimeoutError:
            pytest.fail(f"the daemon still runs after {timeout}s:\n{self.log_text()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines of the log (anything else, e.g. a traceback, is skipped)."""
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    async def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = _TIMEOUT
    ) -> dict[str, Any]:
        """The first log line matching ``predicate``, polling the log file."""
        line: dict[str, Any] = await wait_until(
            lambda: next((line for line in self.log_lines() if predicate(line)), None),
            lambda: f"such a log line:\n{self.log_text()}",
            timeout=timeout,
            interval=0.05,
        )
        return line


async def reload_workers(daemon: DaemonProcess) -> None:
    """``spoold reload``, then wait until the (one) ingest worker applied it."""

    def reloads() -> int:
        return sum(
            1 for line in daemon.log_lines() if line.get("event") == "ingest worker reloaded"
        )

    before = reloads()
    done = await anyio.to_thread.run_sync(cli, "--socket", str(daemon.socket), "reload")
    assert done.code == 0, done.err
    await wait_until(lambda: reloads() > before, "the ingest worker's reload", interval=0.05)


class DaemonFactory:
    """What the ``start_daemon`` fixture gives: ``await start_daemon(config)``
    starts a daemon and waits until it is ready; every daemon started is
    killed at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.daemons: list[DaemonProcess] = []
        self.sockets: list[NotifySocket] = []

    def notify_socket(self, name: str = "notify.sock") -> NotifySocket:
        sock = NotifySocket(self.tmp_path / name)
        self.sockets.append(sock)
        return sock

    async def __call__(
        self,
        config: Path,
        *,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        notify: NotifySocket | None = None,
        nofile: tuple[int, int] | None = None,
        prefix: Sequence[str] = (),
        cwd: Path | None = None,
    ) -> DaemonProcess:
        if notify is None:
            notify = self.notify_socket(f"notify{len(self.sockets)}.sock")
        daemon = DaemonProcess(config.parent, config, notify)
        self.daemons.append(daemon)
        await daemon.start(env, nofile, prefix, cwd)
        if wait_ready:
            await daemon.wait_ready()
        return daemon

    async def close(self) -> None:
        for daemon in self.daemons:
            await daemon.kill()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    try:
        yield factory
    finally:
        await factory.close()


def far_future() -> timedelta:
    """How far ahead a ``send_at`` is put so that no attempt starts by itself."""
    return timedelta(days=30)
