"""Running short of descriptors never stops the daemon.

End to end: ``spoold run`` in a subprocess whose ``RLIMIT_NOFILE`` is set
low (256), hammered with idle connections to its control socket and its
SMTP listener until ``accept()`` fails with EMFILE; then the connections go
away and the daemon answers again. Also the start-up raise of the soft
limit, and :class:`AcceptFailures` and the loop exception handler in this
process (a fake clock; asyncio's own report injected through
``call_exception_handler``, exactly as its selector loop makes it).

Every wait is bounded; the counts of connections are fixed.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import select
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog

from spoold.daemon import logs
from spoold.daemon.control import MAX_CLIENTS, ControlClient
from spoold.daemon.resources import (
    AcceptFailures,
    accept_forever,
    install_accept_error_handler,
    raise_open_files_limit,
)
from spoold.errors import ControlError
from tests.daemon_helpers import DaemonFactory, DaemonProcess, cli, set_config_value, write_config
from tests.support import free_port, wait_until

NOFILE = 256
IDLE = 300  # connections of each kind: more than the daemon has descriptors
OUT_OF = "socket.accept() out of system resource"
STILL = "socket.accept() still out of system resource"
AGAIN = "socket.accept() works again"


@pytest.fixture(autouse=True)
def enough_descriptors_here() -> None:
    """This process holds 2 x IDLE sockets itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * IDLE:
        if hard != resource.RLIM_INFINITY and hard < 4 * IDLE:
            pytest.skip(f"this process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (4 * IDLE, hard))


@contextmanager
def idle_connections(
    address: str | tuple[str, int] | None, count: int, family: int = socket.AF_UNIX
) -> Iterator[list[socket.socket]]:
    """``count`` non-blocking sockets that never send a byte, connected to
    ``address`` (None: the caller connects them); all closed on the way out."""
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            opened.append(s)
            s.setblocking(False)
            if address is not None:
                code = s.connect_ex(address)
                assert code in (0, errno.EINPROGRESS), errno.errorcode.get(code, code)
        yield opened
    finally:
        for s in opened:
            s.close()


def ready(sockets: list[socket.socket], events: int, timeout: float = 0) -> list[socket.socket]:
    """Those of ``sockets`` ready for ``events`` (poll: no FD_SETSIZE limit)."""
    poller = select.poll()
    by_fd = {s.fileno(): s for s in sockets}
    for fd in by_fd:
        poller.register(fd, events)
    ready_fds = {fd for fd, got in poller.poll(timeout * 1000) if got & events}
    return [s for s in sockets if s.fileno() in ready_fds]


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of 127.0.0.1:``port``
    (``/proc/net/tcp`` shows it as rx_queue of the LISTEN socket)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on port {port}")


async def fill_descriptors(daemon: DaemonProcess, clients: list[socket.socket], port: int) -> None:
    """Connect the first of ``clients`` to ``port`` a batch at a time,
    each batch once the daemon has accepted the one before (a TCP backlog
    drops SYNs when full, and a dropped SYN is retried only seconds later),
    until accept() fails for want of descriptors; then the rest."""
    batch = 20

    def exhausted() -> bool:
        return bool(logged(daemon, OUT_OF, f"127.0.0.1:{port}"))

    for start in range(0, len(clients), batch):
        chunk = clients[start : start + batch]
        for s in chunk:
            code = s.connect_ex(("127.0.0.1", port))
            assert code in (0, errno.EINPROGRESS), errno.errorcode.get(code, code)

        def taken(chunk: list[socket.socket] = chunk) -> bool:
            connected = ready(chunk, select.POLLOUT) == chunk and accept_queue(port) == 0
            return connected or exhausted()

        await wait_until(
            taken,
            lambda: (
                f"the daemon to accept or run out ({accept_queue(port)} queued):\n"
                + daemon.log_text()
            ),
            interval=0.02,
        )


def logged(daemon: DaemonProcess, event: str, listener: str) -> list[dict[str, Any]]:
    return [
        line
        for line in daemon.log_lines()
        if line["event"] == event and line.get("listener") == listener
    ]


async def answers_again(daemon: DaemonProcess) -> None:
    """Poll ``ping`` until the daemon answers it (it takes a moment to see
    every hung-up client)."""

    async def pong() -> bool:
        try:
            return await ControlClient(daemon.socket, timeout=5).request("ping") == "pong"
        except (ControlError, OSError):  # busy, or not accepted yet
            return False

    await wait_until(pong, lambda: f"a pong:\n{daemon.log_text()}", interval=0.1)


async def busy_replies(clients: list[socket.socket], expected: int) -> set[int]:
    """Wait until ``expected`` of ``clients`` got a ``busy`` reply; the
    descriptors of those that did."""
    busy: set[int] = set()

    def enough() -> bool:
        for s in ready([s for s in clients if s.fileno() not in busy], select.POLLIN):
            data = s.recv(4096)
            if data and json.loads(data)["kind"] == "busy":
                busy.add(s.fileno())
        return len(busy) >= expected

    await wait_until(enough, lambda: f"{expected} busy replies, got {len(busy)}", interval=0.05)
    return busy


# ---------------------------------------------------------------- e2e


async def test_idle_control_connections_past_the_descriptor_limit(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """Seen: 200 idle control connections at nofile=256 (1,100 at 1024)
    ended the daemon with an unhandled exception group. Now at most
    MAX_CLIENTS are served at once; the rest are told busy and dropped."""
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    daemon = await start_daemon(config, nofile=(NOFILE, NOFILE))
    with idle_connections(str(daemon.socket), IDLE) as clients:
        assert len(await busy_replies(clients, IDLE - MAX_CLIENTS)) == IDLE - MAX_CLIENTS
        assert daemon.running
    await answers_again(daemon)
    done = cli("--socket", str(daemon.socket), "status", "--format", "json")
    assert done.code == 0 and done.out == "", done
    assert daemon.running
    assert "Traceback" not in daemon.log_text()


async def test_descriptor_exhaustion_is_logged_once_per_burst_and_survived(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """IDLE SMTP connections take every descriptor of the ingest worker
    (the listener allows more than that); the daemon's own limit is then
    set just above what it holds, so IDLE control connections cannot be
    accepted either. Both processes keep running, log one error per
    listener for the whole burst (debug lines count the retries), and serve
    again once the connections are gone."""
    smtp_port = free_port()
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    set_config_value(config, "level", '"debug"')
    with config.open("a") as f:
        f.write(
            f'\n[smtp]\nlisten = ["127.0.0.1:{smtp_port}"]\nmax_connections = 10000\n'
            "max_connections_per_client = 10000\n"
            "workers = 1\n"  # one process, so one burst per listener to count
        )
    daemon = await start_daemon(config, nofile=(NOFILE, NOFILE))
    smtp = f"127.0.0.1:{smtp_port}"
    control = str(daemon.socket)

    with idle_connections(None, IDLE, socket.AF_INET) as smtp_clients:
        await fill_descriptors(daemon, smtp_clients, smtp_port)
        await daemon.wait_log(lambda line: line["event"] == OUT_OF and line["listener"] == smtp)
        assert await ControlClient(daemon.socket, timeout=5).request("ping") == "pong"
        held = len(list(Path(f"/proc/{daemon.pid}/fd").iterdir()))
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (held + 8, NOFILE))
        with idle_connections(control, IDLE):
            await daemon.wait_log(
                lambda line: line["event"] == OUT_OF and line["listener"] == control
            )
            # Retried, again and again, while nothing is freed:
            for listener in (control, smtp):
                await daemon.wait_log(
                    lambda line, listener=listener: (
                        line["event"] == STILL
                        and line["listener"] == listener
                        and line["failures"] >= 4
                    )
                )
            assert daemon.running
            assert len(logged(daemon, OUT_OF, control)) == 1
            assert len(logged(daemon, OUT_OF, smtp)) == 1

    # The descriptors are free again: both listeners say so, with the count.
    control_again = await daemon.wait_log(
        lambda line: line["event"] == AGAIN and line["listener"] == control
    )
    smtp_again = await daemon.wait_log(
        lambda line: line["event"] == AGAIN and line["listener"] == smtp
    )
    assert control_again["failures"] >= 4 and smtp_again["failures"] >= 4
    assert len(logged(daemon, OUT_OF, control)) == 1
    assert len(logged(daemon, OUT_OF, smtp)) == 1

    await answers_again(daemon)
    done = cli("--socket", control, "status", "--format", "json")
    assert done.code == 0, done
    with socket.create_connection(("127.0.0.1", smtp_port), timeout=10) as s:
        assert s.recv(512).startswith(b"220 ")
    assert daemon.running
    assert "Traceback" not in daemon.log_text()


async def test_the_soft_open_files_limit_is_raised_to_the_hard_one(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    daemon = await start_daemon(config, nofile=(200, NOFILE))
    raised = [line for line in daemon.log_lines() if line["event"] == "raised the open files limit"]
    assert [(line["old"], line["new"]) for line in raised] == [(200, NOFILE)]
    limits = Path(f"/proc/{daemon.pid}/limits").read_text()
    (row,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert row.split()[3:5] == [str(NOFILE), str(NOFILE)]

    # soft == hard: nothing to raise, no setrlimit call, no log line.
    (tmp_path / "b").mkdir()
    config_b = write_config(tmp_path / "b", next_hops=[f"127.0.0.1:{free_port()}"])
    other = await start_daemon(config_b, nofile=(NOFILE, NOFILE))
    assert not any("open files limit" in line["event"] for line in other.log_lines())


# ----------------------------------------------------------- in-process


class LogCapture:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def __call__(self, logger: object, method: str, event: dict[str, Any]) -> dict[str, Any]:
        self.lines.append({**event, "level": method})
        raise structlog.DropEvent

    def events(self) -> list[tuple[str, str]]:
        return [(line["level"], line["event"]) for line in self.lines]


@pytest.fixture
def captured() -> Iterator[LogCapture]:
    capture = LogCapture()
    structlog.configure(
        processors=[capture], wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG)
    )
    try:
        yield capture
    finally:
        logs.configure()


def test_a_burst_is_logged_once_and_ends_with_a_count(captured: LogCapture) -> None:
    now = [100.0]
    failures = AcceptFailures(quiet=3.0, clock=lambda: now[0])
    emfile = OSError(errno.EMFILE, "Too many open files")
    for _ in range(10):
        failures.failed("a.sock", emfile)
        now[0] += 1.0
    failures.failed("b:25", OSError(errno.ENOBUFS, "No buffer space available"))
    failures.recovered("a.sock")  # 0 s after the last failure: still the same burst
    assert failures.in_burst("a.sock")
    now[0] += 3.0
    failures.recovered("a.sock")  # quiet for 3 s, then a success: over
    failures.recovered("a.sock")  # no burst: nothing to say
    assert captured.events() == [
        ("error", OUT_OF),
        ("debug", STILL),  # 2
        ("debug", STILL),  # 4
        ("debug", STILL),  # 8
        ("error", OUT_OF),
        ("info", AGAIN),
    ]
    assert captured.lines[0]["errno"] == "EMFILE" and captured.lines[0]["listener"] == "a.sock"
    assert captured.lines[4]["errno"] == "ENOBUFS"
    assert captured.lines[-1]["failures"] == 10

    # Without a success, quiet for 3 s ends it too.
    failures.failed("b:25", OSError(errno.ENOBUFS, "No buffer space available"))
    failures.close_quiet()
    assert failures.in_burst("b:25")
    now[0] += 3.0
    failures.close_quiet()
    assert not failures.in_burst("b:25")
    assert captured.lines[-1] == {
        "event": AGAIN,
        "listener": "b:25",
        "failures": 2,
        "level": "info",
    }


async def test_the_loop_handler_takes_asyncio_accept_reports_and_passes_the_rest(
    captured: LogCapture,
) -> None:
    loop = asyncio.get_running_loop()
    passed: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: passed.append(context))
    failures = AcceptFailures()
    restore = install_accept_error_handler(loop, failures)
    try:
        with socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            port = listening.getsockname()[1]
            for _ in range(5):  # as asyncio/selector_events.py reports it
                loop.call_exception_handler(
                    {
                        "message": OUT_OF,
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                        "socket": listening,
                    }
                )
            other = {"message": "something else", "exception": ValueError("x")}
            loop.call_exception_handler(other)
            not_resources = {"message": OUT_OF, "exception": OSError(errno.EBADF, "bad")}
            loop.call_exception_handler(not_resources)
    finally:
        restore()
    assert [line["event"] for line in captured.lines if line["level"] == "error"] == [OUT_OF]
    assert captured.lines[0]["listener"] == f"127.0.0.1:{port}"
    assert failures.in_burst(f"127.0.0.1:{port}")
    assert passed == [other, not_resources]
    loop.call_exception_handler(other)  # restored: the previous handler again
    assert passed == [other, not_resources, other]
    loop.set_exception_handler(None)


def test_a_refused_setrlimit_is_a_warning_not_a_failure(
    captured: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (100, 200))

    def refused(which: int, limits: tuple[int, int]) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")  # a seccomp filter's EPERM

    monkeypatch.setattr(resource, "setrlimit", refused)
    assert raise_open_files_limit() is None
    assert captured.events() == [
        ("warning", "could not raise the open files limit; going on with it")
    ]
    assert "Operation not permitted" in captured.lines[0]["error"]


async def test_accept_forever_hands_over_each_connection_with_its_address() -> None:
    """Every waiting connection is taken, with the address accept() gave
    (the listener's sessions need not ask the kernel for it again); a
    cancel stops the loop and leaves the socket unwatched."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    taken: list[tuple[socket.socket, Any]] = []
    all_taken = asyncio.Event()

    def take(conn: socket.socket, address: Any) -> None:
        taken.append((conn, address))
        if len(taken) == len(clients):
            all_taken.set()

    try:
        task = asyncio.create_task(accept_forever(listener, "test", AcceptFailures(), take))
        await asyncio.wait_for(all_taken.wait(), 10)
        assert sorted(address for _, address in taken) == sorted(c.getsockname() for c in clients)
        for conn, _ in taken:  # a socket like accept()'s (its family and type as plain numbers)
            assert isinstance(conn, socket.socket)
            assert (conn.family, conn.type) == (socket.AF_INET, socket.SOCK_STREAM)
            assert conn.getblocking()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not asyncio.get_running_loop().remove_reader(listener.fileno())  # unwatched
    finally:
        for conn, _ in taken:
            conn.close()
        for c in clients:
            c.close()
        listener.close()
