"""A real ``redis-server`` on a free loopback port, in a temporary directory,
for the fleet tests (no persistence: ``--save "" --appendonly no``).

:func:`redis_server_path` is None when it is not installed; the fixtures
then skip with :data:`INSTALL_HINT`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["INSTALL_HINT", "RedisServer", "redis_server", "redis_server_path"]

INSTALL_HINT = "install redis-server (apt-get install redis-server)"


def redis_server_path() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process: :meth:`start`, :meth:`stop` or :meth:`kill`
    (and start again on the same port: the data is gone, as after a restart
    without persistence), :meth:`pause` / :meth:`resume` (SIGSTOP / SIGCONT:
    a Redis that accepts connections but never answers)."""

    def __init__(
        self, directory: Path, binary: str, *options: str, start_timeout: float = 10
    ) -> None:
        self.directory = directory
        self.start_timeout = start_timeout
        self.binary = binary
        self.options = options  # more redis-server arguments ("--requirepass", "pw")
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()  # never leave a server that did not come up running
            raise

    def _wait_until_up(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # up (with a password)
                        return
            except OSError:
                pass
            time.sleep(0.02)  # polling a process we cannot wait on otherwise
        raise RuntimeError(f"redis-server did not answer within {self.start_timeout} s")

    def stop(self) -> None:
        if self.proc is not None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # SIGKILL cannot be ignored
                self.proc.wait()
            self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer: no shutdown of its own."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started redis-server, stopped after the test (skips without one)."""
    binary = redis_server_path()
    if binary is None:
        pytest.skip(INSTALL_HINT)
    server = RedisServer(tmp_path, binary)
    try:
        server.start()
        yield server
    finally:
        server.stop()
