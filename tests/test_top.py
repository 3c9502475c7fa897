"""``spoold top``: the screen it draws, and the command in a pseudo-terminal.

The command runs as a child on a pty (``pty.fork``: the pty is its
controlling terminal, so Ctrl-C typed there is a real SIGINT). The test
reads the screen until the expected counts show, types ``q`` (or Ctrl-C),
and checks the exit status and that the terminal was given back: the
alternate screen left, the cursor shown, canonical mode and echo on again.
Every read is bounded by a deadline; nothing sleeps.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
from rich.console import Console

from spoold import Client
from spoold.daemon.top import TopState, render
from tests.daemon_helpers import DaemonFactory, child_env, write_config
from tests.smtp_server import Reply, SmtpTestServer
from tests.support import WAIT_TIMEOUT, wait_until

_ANSI = re.compile(rb"\x1b(\[[0-9;?]*[A-Za-z]|[()][0-9A-Za-z]|[=>78])")


class PtyChild:
    """A process on its own pseudo-terminal of ``rows`` x ``cols``."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 50, cols: int = 160):
        pid, fd = pty.fork()
        if pid == 0:  # the child: size the terminal, then become the program
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid = pid
        self.fd = fd
        self.output = bytearray()
        self.eof = False

    def _read(self, deadline: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: every end of the terminal's other side is closed
            chunk = b""
        if chunk:
            self.output += chunk
        else:
            self.eof = True

    def text(self) -> str:
        return _ANSI.sub(b"", bytes(self.output)).decode(errors="replace")

    def last_lines(self) -> str:
        """The end of the output, blank lines left out (for a failure)."""
        return "\n".join(line for line in self.text().splitlines() if line.strip())[-3000:]

    def read_until(self, condition: Callable[[str], bool], timeout: float = WAIT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.text()):
            if self.eof or time.monotonic() > deadline:
                raise AssertionError(f"screen never matched; it showed:\n{self.last_lines()}")
            self._read(deadline)

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def exit_code(self, timeout: float = WAIT_TIMEOUT) -> int:
        """Read to the end of output (the child gone), then its status."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running; screen:\n{self.last_lines()}")
            self._read(deadline)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)

    def terminal_modes_restored(self) -> bool:
        lflag = termios.tcgetattr(self.fd)[3]
        return bool(lflag & termios.ICANON) and bool(lflag & termios.ECHO)

    def close(self) -> None:
        if not self.eof:
            try:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


async def queued_daemon(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> Path:
    """A daemon holding two delayed messages and one frozen, all for one hop."""
    daemon = await start_daemon(write_config(tmp_path, next_hops=[smtp_server.hop]))
    client = Client(daemon.socket, timeout=WAIT_TIMEOUT)
    smtp_server.behaviour.rcpt["later@example.com"] = Reply("451 4.3.0 try later")
    smtp_server.behaviour.rcpt["gone@example.com"] = Reply("550 5.1.1 no such user")

    def submit(rcpt: str) -> str:
        (mid,) = client.submit("app@example.org", [rcpt], b"Subject: t\n\nx\n")
        return mid

    for rcpt in ("later@example.com", "later@example.com", "gone@example.com"):
        await anyio.to_thread.run_sync(submit, rcpt)

    async def settled() -> bool:
        views = await anyio.to_thread.run_sync(client.status)
        return sorted(v["status"] for v in views) == ["frozen", "send_at", "send_at"]

    await wait_until(settled, "two delayed messages and one frozen", interval=0.02)
    return daemon.socket


def start_top(socket: Path) -> PtyChild:
    argv = [sys.executable, "-m", "spoold.daemon.cli", "--socket", str(socket)]
    argv += ["top", "--interval", "0.2"]
    return PtyChild(argv, child_env({"TERM": "xterm-256color"}))


def shows_counts(screen: str) -> bool:
    return "active 2   frozen 1   sending 0   removed 0   quarantine 0" in screen


async def test_top_shows_the_queue_and_quits_on_q(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    socket = await queued_daemon(tmp_path, start_daemon, smtp_server)

    def session() -> None:
        top = start_top(socket)
        try:
            top.read_until(shows_counts)
            hop_row = re.compile(
                re.escape(smtp_server.hop) + r"\s*│\s*3\s*│\s*\S+@example\.com: [45]"
            )
            top.read_until(lambda screen: bool(hop_row.search(screen)))
            assert not top.terminal_modes_restored()  # keys one at a time while it runs
            top.type(b"q")
            assert top.exit_code() == 0
            assert b"\x1b[?1049l" in top.output  # left the alternate screen
            assert top.output.rfind(b"\x1b[?25h") > top.output.rfind(b"\x1b[?25l")  # cursor on
            assert top.terminal_modes_restored()
        finally:
            top.close()

    await anyio.to_thread.run_sync(session)


async def test_top_quits_on_ctrl_c(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    socket = await queued_daemon(tmp_path, start_daemon, smtp_server)

    def session() -> None:
        top = start_top(socket)
        try:
            top.read_until(shows_counts)
            top.type(b"\x03")  # the terminal turns it into SIGINT
            assert top.exit_code() == 0
            assert "Traceback" not in top.text()
            assert top.terminal_modes_restored()
        finally:
            top.close()

    await anyio.to_thread.run_sync(session)


def test_top_without_a_daemon_fails_before_drawing(tmp_path: Path) -> None:
    top = start_top(tmp_path / "none.sock")
    try:
        code = top.exit_code()
        assert code == 2
        assert "no daemon" in top.text()
        assert b"\x1b[?1049h" not in top.output  # the screen was never taken
    finally:
        top.close()


def test_render_hops_oldest_and_rates() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    state = TopState(counts={"active": 3, "frozen": 1})

    def listed(mid: str, minutes: int, hop: str, error: str | None) -> dict[str, object]:
        attempts = [{"time": f"2026-11-25T11:{59 - minutes % 60:02d}:00Z", "error": error}]
        return {
            "id": mid,
            "status": "send_at",
            "spool_date": f"2026-11-25T{11 - minutes // 60:02d}:{59 - minutes % 60:02d}:30Z",
            "next_hop_choices": [hop],
            "remaining_recipients": ["a@example.com", "b@example.com"],
            "relay_attempts": attempts if error else [],
        }

    state.views = [
        listed("new1", 1, "mx.b:25", "451 newer"),
        listed("old1", 130, "mx.b:25", "451 older"),
        listed("mid1", 20, "mx.a:25", None),
        listed("mid2", 21, "mx.b:25", None),
    ]
    for i in range(20):  # 20 spooled events within the window: 2 per second
        state.saw({"event": "spooled", "id": f"s{i}", "time": "2026-11-25T11:59:59Z"}, 100.0)
    state.saw({"event": "ping"}, 100.0)
    state.saw({"event": "delivered", "id": "d1", "time": "2026-11-25T12:00:00Z"}, 80.0)
    console = Console(width=120, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(state, now, 105.0))
    screen = console.export_text()
    lines = screen.splitlines()
    assert "active 3   frozen 1   sending 0   removed 0   quarantine 0" in lines
    assert "ingest 2.0/s   delivered 0.0/s   (last 10 s)" in lines
    hop_rows = re.findall(r"│ (mx\.\S+)\s+│\s+(\d+) │", screen)
    assert hop_rows == [("mx.b:25", "3"), ("mx.a:25", "1")]
    assert "451 newer" in next(line for line in lines if "mx.b:25" in line)
    oldest = [line.split()[1] for line in lines if re.match(r"│ (new1|old1|mid1|mid2) ", line)]
    assert oldest == ["old1", "mid2", "mid1", "new1"]
    assert "2h" in next(line for line in lines if "old1" in line)
    assert "ping" not in screen
