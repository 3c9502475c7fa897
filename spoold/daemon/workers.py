"""The daemon's SMTP ingest worker processes, seen from the owner.

With ``[smtp]`` on, the daemon itself does not take SMTP connections: it
opens the listening sockets (or takes those systemd handed over) and starts
``smtp.workers`` processes (0: one per CPU) of :mod:`spoold.daemon.worker`
that all serve the same sockets. Python runs one thread at a time per
process; several processes use every core for the protocol work, while the
owner schedules and relays. A worker writes into the spool as a non-owner
and wakes the owner, which adopts the messages.

:class:`IngestWorkers` starts them and waits until each serves (a worker
that cannot start makes the daemon's start fail), restarts one that dies
(with a growing pause, logged), passes a reload on as SIGHUP (after the
owner has validated the file), and on :meth:`IngestWorkers.stop` asks each
to stop (SIGTERM: they stop accepting and finish the messages being
spooled) and kills those still running after the grace time. The workers
share the daemon's stdout/stderr (one log stream) but not its systemd
notification socket.

The pipe a worker says it serves on (``--ready-fd``) stays open as its
*report* pipe: the worker writes a line ``KIND N`` there for what it counts
that the daemon's own counters show (``refused 1``: a recipient refused at
RCPT because it is suppressed); the daemon reads each worker's reports and
adds them to its counts (``on_count``). A report the pipe cannot take at
once is kept and sent with the next.

Each worker also gets the read end of a *lifeline* pipe whose write end only
the daemon holds (never written, never inherited by anyone else): if the
daemon dies without stopping its workers (SIGKILL, a crash), the kernel
closes the write end, the worker reads end-of-file and stops as on SIGTERM.
No worker outlives its daemon to keep taking mail on the shared port.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
from collections.abc import Callable, Sequence

import anyio
import anyio.abc
import structlog

from spoold.errors import SpooldError
from spoold.numerals import ascii_decimal
from spoold.shared_counter import SharedCounter
from spoold.suppression import SUPPRESSION_COUNTS, SuppressionCount

__all__ = ["IngestWorkers", "worker_count"]

log = structlog.get_logger("spoold.workers")

_READY_TIMEOUT = 60.0  # seconds a new worker may take to serve
_FIRST_RESTART_PAUSE = 1.0
_LONGEST_RESTART_PAUSE = 30.0
# What a worker must not inherit: systemd talks to the main process only.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS")
# A worker runs this daemon's own spoold package, the one in _PACKAGE_HOME
# (its first argument), and nothing from its working directory: ``python -m
# spoold.daemon.worker`` would search the directory the daemon was started
# from first, so a ``spoold/`` there (a checkout of another version, or one
# planted in a directory others may write, such as /tmp) would run as the
# worker, beside an owner of another version. ``-P`` keeps that directory
# off sys.path; the package is then found in the owner's directory only
# (sys.path unchanged), and the rest (the standard library, anyio,
# uvloop...) as usual.
_PACKAGE_HOME = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LAUNCH = """\
import importlib.machinery, importlib.util, runpy, sys
spec = importlib.machinery.PathFinder.find_spec("spoold", [sys.argv.pop(1)])
package = importlib.util.module_from_spec(spec)
sys.modules["spoold"] = package
spec.loader.exec_module(package)
runpy.run_module("spoold.daemon.worker", run_name="__main__", alter_sys=True)
"""


def worker_count(configured: int) -> int:
    """``smtp.workers``, 0 meaning one per CPU this process may use."""
    if configured > 0:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class IngestWorkers:
    """``count`` worker processes serving ``sockets``; see the module docstring."""

    def __init__(
        self,
        config_path: str,
        sockets: Sequence[socket.socket],
        count: int,
        grace: float,
        *,
        on_count: Callable[[SuppressionCount, int], None] | None = None,
        suppression_changes: SharedCounter | None = None,
    ) -> None:
        self.config_path = config_path
        self.on_count = on_count
        # The owner's count of suppression list writes, which every worker
        # follows (spoold.suppression: no stat per RCPT).
        self.suppression_changes = suppression_changes
        self._reports: dict[int, int] = {}  # slot -> read end of its worker's report pipe
        self.sockets = list(sockets)
        self.count = count
        self.grace = grace
        self._processes: dict[int, anyio.abc.Process] = {}  # slot -> process
        self._lifelines: dict[int, int] = {}  # slot -> write end of its worker's lifeline
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes.values() if p.returncode is None]

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start every worker, report started once all serve, then keep
        them running until cancelled (which kills those left)."""
        try:
            async with anyio.create_task_group() as tg:
                for slot in range(self.count):
                    await self._start(slot)
                task_status.started()
                for slot in range(self.count):
                    tg.start_soon(self._supervise, slot)
        finally:
            with anyio.CancelScope(shield=True):
                for process in self._processes.values():
                    if process.returncode is None:
                        process.kill()
                        with anyio.move_on_after(5):
                            await process.wait()
            for slot in list(self._lifelines):
                self._cut_lifeline(slot)
            for fd in self._reports.values():  # of workers never supervised
                os.close(fd)
            self._reports.clear()

    def _cut_lifeline(self, slot: int) -> None:
        fd = self._lifelines.pop(slot, None)
        if fd is not None:
            os.close(fd)

    async def _start(self, slot: int) -> None:
        read_end, write_end = os.pipe()
        life_read, life_write = os.pipe()  # both ends non-inheritable
        fds = [s.fileno() for s in self.sockets]
        changes = self.suppression_changes.fd if self.suppression_changes is not None else None
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
        command = [
            sys.executable,
            "-P",  # nothing from the working directory (see _LAUNCH)
            "-c",
            _LAUNCH,
            _PACKAGE_HOME,
            "--config",
            self.config_path,
            "--fds",
            ",".join(map(str, fds)),
            "--ready-fd",
            str(write_end),
            "--lifeline-fd",
            str(life_read),
            *(["--suppression-changes-fd", str(changes)] if changes is not None else []),
        ]
        try:
            process = await anyio.open_process(
                command,
                stdin=None,
                stdout=None,
                stderr=None,
                env=env,
                pass_fds=[*fds, write_end, life_read, *([changes] if changes is not None else [])],
            )
        except BaseException:
            os.close(life_write)
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
            os.close(life_read)
        self._cut_lifeline(slot)  # the one of a worker that died
        self._lifelines[slot] = life_write
        try:
            with anyio.move_on_after(_READY_TIMEOUT):
                await anyio.wait_readable(read_end)
            ready = os.read(read_end, 1) if _readable(read_end) else b""
        except BaseException:
            os.close(read_end)
            raise
        if ready != b"1":
            os.close(read_end)
            if process.returncode is None:
                process.kill()
            code = await process.wait()
            raise SpooldError(
                f"an SMTP ingest worker did not start (exit code {code}); its log says why"
            )
        self._processes[slot] = process
        self._reports[slot] = read_end
        log.info("ingest worker started", pid=process.pid, slot=slot)

    async def _supervise(self, slot: int) -> None:
        pause = _FIRST_RESTART_PAUSE
        while True:
            process = self._processes[slot]
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_reports, self._reports.pop(slot))
                code = await process.wait()
            if self._stopping:
                return
            log.error("ingest worker died; starting another", pid=process.pid, exit_code=code)
            await anyio.sleep(pause)
            if self._stopping:
                return
            try:
                await self._start(slot)
                pause = _FIRST_RESTART_PAUSE
            except SpooldError as exc:
                log.error("could not start an ingest worker", error=str(exc), retry_in=pause)
                pause = min(pause * 2, _LONGEST_RESTART_PAUSE)

    async def _read_reports(self, fd: int) -> None:
        """Add what one worker reports to the daemon's counts, until its
        end of the pipe closes (the worker is gone)."""
        pending = b""
        try:
            while True:
                await anyio.wait_readable(fd)
                data = os.read(fd, 4096)
                if not data:
                    return
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    kind, _, text = line.decode("ascii", "replace").partition(" ")
                    number = ascii_decimal(text)
                    if kind in SUPPRESSION_COUNTS and number is not None and self.on_count:
                        self.on_count(kind, number)
        finally:
            os.close(fd)

    def reload(self) -> None:
        """Pass a (validated) reload on to every worker."""
        self._signal(signal.SIGHUP)

    async def stop(self) -> None:
        """Ask every worker to stop, wait up to the grace time, kill the rest."""
        self._stopping = True
        self._signal(signal.SIGTERM)
        with anyio.move_on_after(self.grace + 5):
            for process in self._processes.values():
                await process.wait()
        for process in self._processes.values():
            if process.returncode is None:
                log.warning("ingest worker did not stop in time; killed", pid=process.pid)
                process.kill()
        for sock in self.sockets:
            sock.close()

    def _signal(self, sig: signal.Signals) -> None:
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)


def _readable(fd: int) -> bool:
    ready, _, _ = select.select([fd], [], [], 0)
    return bool(ready)
