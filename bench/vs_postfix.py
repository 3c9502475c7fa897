"""spoold next to Postfix: the same work on the same machine, alternated.

What it measures (each scenario runs A/B/A/B: Postfix, then spoold, for
``--rounds`` rounds, and reports every run, the medians, min/max and the
spoold/reference ratio of the medians):

a. 10,000 x 4 KiB from ``smtp-source`` (20 sessions, a new connection per
   message): *ingest* = N / smtp-source's wall time; *end to end* = N / the
   time from smtp-source's start until the sink has counted N; and the CPU
   time (user + system) the server's processes spent per message, from just
   before smtp-source starts until the queue is empty again (the figure
   other jobs on the machine disturb least). Also, once per round before
   the servers, the SMTP-only ceiling: smtp-source straight into the same
   smtp-sink (same count, sessions and size, no server in between), and
   each server's end to end as a share of its round's ceiling.
b. 2,000 x 100 KiB, the same figures.
c. Latency from submission to delivery at a steady rate (100 msg/s, 2,000
   messages): our own paced SMTP client opens one connection per message
   and tags it with an ``X-Bench-Seq`` header; our own small asyncio sink
   notes when each one arrives. p50 and p99 of (arrival - start of the
   submission), in ms; and the server's CPU time per message over the
   paced run (until its queue is empty again).
d. ``Spool.add`` durable rate through the Python API (2,000 x 4 KiB, 1 and
   16 concurrent adders, the relay held so nothing is sent) next to the
   disk's own loop (write 4 KiB + fsync + rename + fsync(dir), as many
   threads) on the same filesystem. The reference here is the disk, not
   Postfix. Also the CPU time (user + system, all threads) of the process
   doing it, per durable add / per write of the loop. spoold is imported
   from the tree this file is in (the commit the section records). The
   scenario settles once before its first run, and every run writes into
   a new directory that stays until the last run is over: no run starts
   right after another's files were deleted (see the settle below).

With ``--hog``, a busy loop pinned to CPU 0 (``taskset -c 0 sh -c 'while
:; do :; done'``) runs beside the server during every measured run of a, b
and c (and of the ceiling), the same for both servers: started just before
the run, stopped by its pid right after (on a failure or Ctrl-C too; under
``setpriv --pdeathsig KILL`` where there is setpriv, so that it dies with
the harness even on kill -9). Not during the settle, the warm-up or d. The
section's title says so. It is what a relay meets on a machine it shares
with the applications that feed it (issue 24).

How it drives the two servers. Postfix is a private instance made for this
run under the work directory: its own ``config_directory`` (a main.cf and a
master.cf written here: stock settings except what makes it a loopback relay,
and chroot off), ``queue_directory``, ``data_directory`` and ``maillog_file``;
it is started and stopped with ``postfix -c DIR``, listens on a free
127.0.0.1 port and relays everything to the sink. The system's Postfix (its
/etc/postfix, its queue, a running master) is never touched. spoold is only
used through its public interfaces: ``spoold run --config`` with a config
written here (the ``[smtp]`` listener on a free port with the shipped
limits: smtp-source sends every session from 127.0.0.1, which is in the
default ``relay_networks`` and so not held to ``max_connections_per_client``;
one route to the sink; JSON logs to a file), readiness by
the systemd notify protocol (``READY=1`` on a socket of ours), ``spoold
count`` on its control socket, SIGTERM to stop it; and, for (d),
``from spoold import ...``. The next hop of both is Postfix's ``smtp-sink``
in (a) and (b), whose ``-c`` counters are read live from a pipe that a
thread drains, and our latency sink in (c). A fresh sink, Postfix and spoold
are made for each scenario, and each server first relays a few messages
that are not measured (processes and connections warm); every run waits for
the queue of the server it measured to be empty again before the next one
starts. CPU time is read from /proc: the server's main process (Postfix's
master, the ``spoold run`` process) and every process under it, in clock
ticks (10 ms) per process: a figure for thousands of messages, not for a
``--quick`` run.

Settling (``--settle``, default 65 s; 0 with ``--quick``). Before each
run of (a) and (b), and before the first run of (d), the harness waits
this long with nothing running. ext4 without a journal (the machines this
was made on) skips, when it allocates an inode, every inode freed in the
last 60 seconds, looking each one up: a run that starts right after
another pays for the tens of thousands of files the previous run deleted,
up to three times the CPU per message, whichever server it is. Waiting
out that window gives every run the same start.

Bounded and tidy: every step has a timeout (``--timeout``); on a failure, on
Ctrl-C or SIGTERM it stops what it started (only that: by the pids it holds,
and ``postfix -c`` of its own instance), prints the tails of the logs and
removes the work directory (``--keep-workdir`` keeps it).

Results: printed, and appended as a section to ``--results`` (default
``bench/RESULTS.md``; a ``--quick`` run writes only when ``--results`` is
given) with the date, the machine, the commit, the command and the versions.

Scenarios a-c need root (Postfix's master runs as root), the Debian package
``postfix`` (installed without questions when missing) and a work directory
that user postfix can reach (``--workdir``, default the system temp dir).
Usage::

    bench/vs_postfix.sh                      # 3 rounds of a, b, c, d
    bench/vs_postfix.sh --quick              # small counts, 1 round: a smoke run
    bench/vs_postfix.sh --scenarios a,c --rounds 5 --spoold-set relay.max_connections_per_hop=20
    bench/vs_postfix.sh --scenarios a --reference-spoold /tmp/before/.venv/bin/spoold
    bench/vs_postfix.sh --scenarios a --dkim none,rsa,ed25519   # what signing costs
    bench/vs_postfix.sh --scenarios a,b,c --hog           # with a CPU hog on CPU 0

``--dkim none,rsa,ed25519`` runs scenarios a and b with several spoold
variants next to each other in the same run, alternated with the reference
round by round: ``none`` signs nothing, ``rsa`` signs every message with a
throwaway 2048-bit RSA key and ``ed25519`` with an Ed25519 key (made by
``spoold dkim keygen`` in the variant's directory; smtp-source's ``From:``
is the sender's domain, example.com). Each variant gets its own rows; a
signing variant warms up at log level debug, where every message signed or
not is logged, and fails the run unless all were signed (then it goes on at
``--spoold-log-level``, by a reload), and a round whose log says a message
went unsigned fails too. The
default is ``none`` alone, as before.

``--reference-spoold`` makes another build of spoold (an older commit's, in
a checkout and venv of its own) the reference of a and b instead of Postfix:
the two builds alternate in the same run, on the same config, and the ratio
says whether a change made spoold slower.

The harness itself is stdlib only; scenario (d) runs in the Python next to
the ``spoold`` command (``--spoold``), in a child process of this file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SENDER = "bench-sender@example.com"
RECIPIENT = "bench-rcpt@example.com"
WARM_UP = 20  # messages through each server before a scenario's first run (not measured)
QUEUE_DRAIN_TIMEOUT = 120.0  # seconds for a queue to empty once the sink has everything
DKIM_DOMAIN = SENDER.rpartition("@")[2]  # smtp-source's From: is the envelope sender
DKIM_VARIANTS = {"none": None, "rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}
DKIM_TITLES = {"none": "unsigned", "rsa": "DKIM RSA-2048", "ed25519": "DKIM Ed25519"}


class BenchError(Exception):
    """A step that failed or ran out of time: the harness stops, prints the logs' tails."""


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def need_tool(name: str) -> str:
    found = tool(name)
    if found is None:
        raise BenchError(f"{name} not found (Debian package postfix)")
    return found


def wait_until(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def run(argv: Sequence[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (killed at ``timeout``); BenchError if it fails."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{shlex.join(argv)}: no answer in {timeout:.0f} s") from exc
    if done.returncode != 0:
        said = "\n".join((done.stderr or done.stdout).strip().splitlines()[-20:])
        raise BenchError(f"{shlex.join(argv)} exited {done.returncode}: {said}")
    return done


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) used so far by process ``root`` and everything
    under it: each live process's own time, plus the time of the children it
    has already reaped (cutime/cstime). A server's processes come and go during
    a run (Postfix's smtpd, cleanup, smtp; spoold's workers, if any): the
    difference of two readings is what the whole server spent between them."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (ppid, seconds)
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # after the name: state ppid ... utime(11) stime(12) cutime(13) cstime(14)
        stats[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo.extend(children.get(pid, []))
    return total


def tail(path: Path, lines: int = 25) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read: {exc})"
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def payload_lines(size: int) -> bytes:
    """``size`` bytes of 78-character lines ending in CRLF (none starts with a dot)."""
    line = b"x" * 78 + b"\r\n"
    text = line * (size // len(line) + 1)
    return text[: size - 2] + b"\r\n"


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100)
    return ordered[int(rank) - 1]


class Logs:
    """The log files of this run, so a failure can print their tails."""

    def __init__(self) -> None:
        self.paths: list[tuple[str, Path]] = []

    def add(self, label: str, path: Path) -> None:
        self.paths.append((label, path))

    def print_tails(self) -> None:
        for label, path in self.paths:
            if path.exists():
                print(f"\n----- {label}: {path} (tail) -----", file=sys.stderr)
                print(tail(path), file=sys.stderr)


# ---------------------------------------------------------------- sinks


class SmtpSink:
    """Postfix's ``smtp-sink`` on a free loopback port, with its ``-c`` counters
    read live.

    smtp-sink writes ``sess=N quit=N mesg=N`` and a CR to stdout after each
    end of DATA, QUIT and session end, flushed at once. A thread drains the
    pipe all the time (a full pipe would stall every session) and notes when
    ``mesg`` grew, so :meth:`wait_for` knows the moment a count was reached.
    """

    def __init__(self, workdir: Path, logs: Logs) -> None:
        self.port = free_port()
        self.err_path = workdir / "smtp-sink.err"
        logs.add("smtp-sink stderr", self.err_path)
        self._cond = threading.Condition()
        self._mesg = 0
        self._history: list[tuple[int, float]] = [(0, 0.0)]  # (mesg, when it was read)
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> SmtpSink:
        with open(self.err_path, "wb") as err:
            self._proc = subprocess.Popen(
                [need_tool("smtp-sink"), "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "1024"],
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        self._reader = threading.Thread(target=self._read, name="smtp-sink-reader", daemon=True)
        self._reader.start()
        wait_until(lambda: self._alive() and port_open(self.port), 20, "smtp-sink to listen")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            stop_process(self._proc, "smtp-sink", grace=5)
        if self._reader is not None:
            self._reader.join(timeout=5)

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        pending = b""
        while chunk := os.read(fd, 65536):
            now = time.monotonic()
            pending += chunk
            *records, pending = pending.split(b"\r")
            counts = [int(m[1]) for r in records if (m := re.search(rb"mesg=(\d+)", r))]
            if counts and max(counts) > self._mesg:
                with self._cond:
                    self._mesg = max(counts)
                    self._history.append((self._mesg, now))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def count(self) -> int:
        with self._cond:
            return self._mesg

    def wait_for(self, target: int, timeout: float) -> float:
        """Block until ``mesg`` >= target; the monotonic time it got there."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._mesg < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(
                        f"the sink counted {self._mesg} messages, not {target}, in {timeout:.0f} s"
                    )
                if not self._alive():
                    raise BenchError("smtp-sink died")
                self._cond.wait(min(left, 1.0))
            return next(when for mesg, when in self._history if mesg >= target)


class LatencySink:
    """A small SMTP server of our own (asyncio, in a thread) that notes the
    monotonic time each message's end of data arrived, by its ``X-Bench-Seq``
    header. Only for the latency scenario: smtp-sink cannot say which message
    arrived when."""

    def __init__(self, logs: Logs, workdir: Path) -> None:
        self.port = free_port()
        self._lock = threading.Lock()
        self._arrivals: dict[str, list[float]] = {}
        self.total = 0
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._open: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._thread = threading.Thread(target=self._thread_main, name="latency-sink", daemon=True)
        self.err_path = workdir / "latency-sink.err"
        logs.add("latency sink errors", self.err_path)

    def __enter__(self) -> LatencySink:
        self._thread.start()
        if not self._ready.wait(20) or self._failure is not None:
            raise BenchError(f"the latency sink did not start: {self._failure!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def arrivals(self, token: str) -> dict[str, list[float]]:
        with self._lock:
            return {k: v[:] for k, v in self._arrivals.items() if k.startswith(token)}

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported through __enter__ or the error file
            self._failure = exc
            self.err_path.write_text(repr(exc))
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(
            self._session, "127.0.0.1", self.port, limit=1 << 20, backlog=1024
        )
        async with server:
            self._ready.set()
            await self._stop.wait()
        # Sessions still open (cached by a relay): end them by closing the
        # connection (their read sees the end), and wait for them.
        for writer in self._open.values():
            writer.close()
        await asyncio.gather(*self._open, return_exceptions=True)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = writer
        try:
            writer.write(b"220 latency-sink ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-latency-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n")
                    writer.write(b"250 SIZE 209715200\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 end with <CRLF>.<CRLF>\r\n")
                    await writer.drain()
                    seq = await self._read_data(reader)
                    now = time.monotonic()
                    with self._lock:
                        self.total += 1
                        if seq is not None:
                            self._arrivals.setdefault(seq, []).append(now)
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    break
                elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    writer.write(b"250 2.0.0 ok\r\n")
                else:
                    writer.write(b"502 5.5.2 not here\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            del self._open[task]
            writer.close()

    @staticmethod
    async def _read_data(reader: asyncio.StreamReader) -> str | None:
        seq = None
        in_headers = True
        while True:
            line = await reader.readline()
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            if line == b".\r\n":
                return seq
            if in_headers:
                if line == b"\r\n":
                    in_headers = False
                elif line[:12].lower() == b"x-bench-seq:":
                    seq = line[12:].strip().decode("ascii", "replace")


# ---------------------------------------------------------------- the servers


def stop_process(proc: subprocess.Popen[Any], name: str, grace: float) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL: only this pid."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        print(f"{name} (pid {proc.pid}) ignored SIGTERM for {grace:.0f} s: killing it", flush=True)
        proc.kill()
        proc.wait(timeout=10)


HOG_CPU = 0  # the CPU the --hog busy loop is pinned to
HOG_COMMAND = ("taskset", "-c", str(HOG_CPU), "sh", "-c", "while :; do :; done")


class CpuHog:
    """``--hog``: a busy loop pinned to CPU 0 (``taskset -c 0 sh -c 'while :;
    do :; done'``; the same in Python where there is no taskset), beside
    whichever server a run measures. ``with hog:`` starts it just before the
    run and stops it by its pid right after, on a failure and on Ctrl-C too.
    Its CPU time is not the server's: it is not under the server's processes.
    Disabled, ``with hog:`` does nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []  # every loop started, in order (each one stopped)

    @staticmethod
    def command() -> list[str]:
        if tool("taskset"):
            argv = [need_tool("taskset"), *HOG_COMMAND[1:]]
        else:
            code = f"import os\nos.sched_setaffinity(0, {{{HOG_CPU}}})\nwhile True: pass"
            argv = [sys.executable, "-c", code]
        # setpriv (util-linux): the kernel kills the loop if this harness dies
        # without cleaning up (kill -9 included), so no busy loop outlives us.
        setpriv = tool("setpriv")
        return [setpriv, "--pdeathsig", "KILL", *argv] if setpriv else argv

    @staticmethod
    def describe() -> str:
        return f"`{shlex.join(HOG_COMMAND)}`"

    def __enter__(self) -> CpuHog:
        if self.enabled:
            if HOG_CPU not in os.sched_getaffinity(0):
                raise BenchError(f"--hog: CPU {HOG_CPU} is not one this harness may use")
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C at the terminal reaches only us
            )
            self.pids.append(self._proc.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()  # a busy loop has nothing to clean up: SIGKILL, by its pid
            proc.wait(timeout=10)

    def said(self) -> str:
        """A line for the output: which loops ran (all stopped by now)."""
        pids = ", ".join(map(str, self.pids))
        return f"  (CPU hog: {len(self.pids)} busy loop(s) on CPU {HOG_CPU}, pids {pids}, stopped)"


MASTER_CF = """\
# A private loopback relay for bench/vs_postfix.py: the services a relay needs,
# chroot off (column 5), one smtpd on 127.0.0.1:{port}.
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{port} inet n - n - - smtpd
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
# A private loopback relay for bench/vs_postfix.py. Everything not set here
# keeps Postfix's defaults (concurrency, in_flow_delay, connection cache, ...).
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
maillog_file = {maillog}
maillog_file_prefixes = {home}
syslog_name = postfix-bench
myhostname = postfix-bench.invalid
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [127.0.0.1]:{next_hop}
"""

POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")


class PostfixInstance:
    """A Postfix instance of our own under ``home``: started and stopped with
    ``postfix -c home/etc``; never the system's."""

    name = "postfix"

    def __init__(self, home: Path, next_hop_port: int, logs: Logs) -> None:
        self.home = home
        self.config_dir = home / "etc"
        self.queue_dir = home / "queue"
        self.maillog = home / "maillog"
        self.port = free_port()
        self.next_hop_port = next_hop_port
        logs.add("postfix maillog", self.maillog)

    def _postfix(self, command: str) -> None:
        run([need_tool("postfix"), "-c", str(self.config_dir), command], timeout=60)

    def __enter__(self) -> PostfixInstance:
        self.home.mkdir(mode=0o755)
        self.config_dir.mkdir(mode=0o755)
        self.queue_dir.mkdir(mode=0o755)  # Postfix makes its subdirectories and data_directory
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(port=self.port))
        (self.config_dir / "main.cf").write_text(
            MAIN_CF.format(
                queue=self.queue_dir,
                data=self.home / "data",
                maillog=self.maillog,
                home=self.home,
                next_hop=self.next_hop_port,
            )
        )
        try:
            self._postfix("start")
            wait_until(lambda: port_open(self.port), 30, "Postfix to listen")
        except BaseException:
            self.__exit__()
            raise
        return self

    def master_pid(self) -> int | None:
        """The pid of our instance's master, if it runs."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, ValueError, IndexError):
            return None
        if b"master" not in cmdline or stat.rsplit(")", 1)[1].split()[0] == "Z":
            return None
        return pid

    def __exit__(self, *exc: object) -> None:
        pid = self.master_pid()
        if pid is None:
            return
        try:
            self._postfix("stop")  # waits up to 5 s, then kills the master's process group
        except BenchError as err:
            print(f"postfix stop: {err}", flush=True)
        with contextlib.suppress(BenchError):
            wait_until(lambda: self.master_pid() is None, 15, "Postfix to stop", every=0.1)
        if self.master_pid() == pid:
            print(f"Postfix master {pid} still runs: killing it", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def cpu_seconds(self) -> float:
        """CPU time of the whole instance so far (the master and its daemons)."""
        pid = self.master_pid()
        if pid is None:
            raise BenchError("Postfix's master is not running")
        return tree_cpu_seconds(pid)

    def queued(self) -> dict[str, int]:
        return {
            q: sum(len(files) for _, _, files in os.walk(self.queue_dir / q))
            for q in POSTFIX_QUEUES
        }

    def wait_empty(self) -> None:
        def empty() -> bool:
            counts = self.queued()
            if counts["deferred"] or counts["hold"] or counts["corrupt"]:
                raise BenchError(f"Postfix did not deliver everything: queue files {counts}")
            return sum(counts.values()) == 0

        wait_until(empty, QUEUE_DRAIN_TIMEOUT, "Postfix's queue to empty", every=0.05)

    @staticmethod
    def version() -> str:
        out = run([need_tool("postconf"), "-d", "-h", "mail_version"], timeout=30).stdout
        return out.strip()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for these values
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


class SpooldInstance:
    """``spoold run --config`` on a config of its own under ``home``."""

    def __init__(
        self,
        home: Path,
        binary: str,
        next_hop_port: int,
        logs: Logs,
        log_level: str,
        overrides: dict[str, dict[str, Any]],
        name: str = "spoold",
        dkim: str = "none",
    ) -> None:
        self.name = name
        self.dkim = dkim  # a key of DKIM_VARIANTS
        self.log_level = log_level
        self.home = home
        self.binary = binary
        self.port = free_port()
        self.config_path = home / "spoold.toml"
        self.socket_path = home / "ctl.sock"
        self.log_path = home / "spoold.log"
        logs.add(f"{name} log", self.log_path)
        self.tables: dict[str, dict[str, Any]] = {
            "spool": {"dir": "spool", "flush_timeout": "5s"},
            "control": {"socket": "ctl.sock"},
            "smtp": {"listen": [f"127.0.0.1:{self.port}"]},  # the shipped limits
            # A signing variant warms up at debug (each message signed is
            # logged; check_warm_up_signed), then runs at log_level.
            "log": {"format": "json", "level": log_level if dkim == "none" else "debug"},
            "relay": {"default_route": "sink"},
            "routes.sink": {"next_hops": [f"127.0.0.1:{next_hop_port}"], "tls": "none"},
        }
        for table, keys in overrides.items():
            self.tables.setdefault(table, {}).update(keys)
        self._proc: subprocess.Popen[bytes] | None = None
        self._notify: socket.socket | None = None
        self._drainer: threading.Thread | None = None

    def config_text(self) -> str:
        out = ["# written by bench/vs_postfix.py"]
        for table, keys in self.tables.items():
            out.append(f"\n[{table}]")
            out.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
        algorithm = DKIM_VARIANTS[self.dkim]
        if algorithm is not None:
            out.append("\n[[dkim]]")
            out.append(f"domain = {toml_value(DKIM_DOMAIN)}")
            out.append('selector = "bench"')
            out.append('key_file = "dkim.key"')
            out.append(f"algorithm = {toml_value(algorithm)}")
        return "\n".join(out) + "\n"

    def __enter__(self) -> SpooldInstance:
        self.home.mkdir(mode=0o755)
        algorithm = DKIM_VARIANTS[self.dkim]
        if algorithm is not None:  # a throwaway key, made as an operator would
            keygen = [self.binary, "dkim", "keygen", DKIM_DOMAIN, "bench"]
            keygen += ["--algorithm", algorithm, "--output", str(self.home / "dkim.key")]
            run(keygen, timeout=60, cwd=self.home)
        self.config_path.write_text(self.config_text())
        # Our end of the systemd notify protocol: READY=1 says spoold serves.
        # It stays open and drained while spoold runs (it sends STATUS= lines).
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = self.home / "notify.sock"
        self._notify.bind(str(notify_path))
        self._notify.settimeout(0.5)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [self.binary, "run", "--config", str(self.config_path)],
                # Started in its home: a `python -c` wrapper (or `python -m
                # spoold`) imports spoold from its working directory first,
                # and the harness's is often a checkout of another build.
                cwd=self.home,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        self._drainer = threading.Thread(target=self._drain, name="notify-drain", daemon=True)
        self._drainer.start()
        return self

    def _drain(self) -> None:
        while self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(TimeoutError):
                self._notify.recv(4096)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self._proc.returncode} while starting")
            try:
                fields = self._notify.recv(4096).decode("utf-8", "replace").split("\n")
            except TimeoutError:
                continue
            if "READY=1" in fields:
                return
        raise BenchError(f"{self.name} sent no READY=1 in 60 s")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            stop_process(self._proc, "spoold", grace=30)
            if self._proc.returncode not in (0, -signal.SIGTERM):
                print(f"{self.name} exited with {self._proc.returncode}", flush=True)
        if self._drainer is not None:
            self._drainer.join(timeout=5)
        if self._notify is not None:
            self._notify.close()

    def cpu_seconds(self) -> float:
        """CPU time of the daemon (and any processes of its own) so far."""
        if self._proc is None or self._proc.poll() is not None:
            raise BenchError("spoold is not running")
        return tree_cpu_seconds(self._proc.pid)

    def _control(self, command: str) -> str:
        """The output of ``spoold --socket ... COMMAND`` against this
        daemon, run in its home (see __enter__)."""
        argv = [self.binary, "--socket", str(self.socket_path), command]
        return run(argv, timeout=30, cwd=self.home).stdout

    def counts(self) -> dict[str, int]:
        out = self._control("count")
        return {k: int(v) for k, v in (line.split() for line in out.splitlines() if line.strip())}

    def _log_events(self, event: str) -> int:
        with open(self.log_path, "rb") as log:
            return sum(1 for line in log if f'"event": "{event}"'.encode() in line)

    def check_warm_up_signed(self, count: int) -> None:
        """A signing variant runs its warm-up at log level debug, which logs
        every message signed (``DKIM-signed``) and every one not (``not
        DKIM-signed``, whatever the reason): all ``count`` must be signed.
        Then the measured rounds run at the plan's log level (a reload)."""
        if DKIM_VARIANTS[self.dkim] is None:
            return
        signed, unsigned = self._log_events("DKIM-signed"), self._log_events("not DKIM-signed")
        if signed != count or unsigned:
            raise BenchError(
                f"{self.name}: {signed} of the {count} warm-up messages DKIM-signed, "
                f"{unsigned} not (see its log)"
            )
        workers = self._log_events("ingest worker ready")
        self.tables["log"]["level"] = self.log_level
        self.config_path.write_text(self.config_text())
        self._control("reload")
        wait_until(
            lambda: self._log_events("ingest worker reloaded") >= workers,
            30,
            f"{self.name}'s ingest workers to reload",
        )

    def check_signed(self) -> None:
        """A signing variant must have signed every message of a round: its
        log has no ``not DKIM-signed`` line. At log level info that catches a
        message spoold could not read for signing; one whose ``From:`` domain
        has no key is logged at debug only, which check_warm_up_signed
        covers."""
        if DKIM_VARIANTS[self.dkim] is None:
            return
        if self._log_events("not DKIM-signed"):
            raise BenchError(f"{self.name}: messages went unsigned (see its log)")

    def wait_empty(self) -> None:
        def empty() -> bool:
            counts = self.counts()
            if counts.get("frozen") or counts.get("quarantine"):
                raise BenchError(f"spoold did not deliver everything: {counts}")
            return counts.get("active", 0) == 0

        wait_until(empty, QUEUE_DRAIN_TIMEOUT, "spoold's queue to empty", every=0.05)

    @staticmethod
    def version_of(binary: str) -> str:
        # Not in the harness's working directory either (see __enter__).
        return run([binary, "--version"], timeout=30, cwd="/").stdout.strip()


Server = PostfixInstance | SpooldInstance


# ---------------------------------------------------------------- results


@dataclass
class Metric:
    """One figure of one scenario, measured for the reference and for spoold."""

    scenario: str
    title: str
    label: str
    reference: str  # "Postfix" or "disk loop"
    fmt: str = "{:.0f}"
    ref: list[float] = field(default_factory=list)
    spoold: list[float] = field(default_factory=list)
    variant: str = ""  # which spoold variant (--dkim), when several ran

    @staticmethod
    def summary(values: Sequence[float], fmt: str) -> str:
        if not values:
            return "-"
        low, mid, high = min(values), statistics.median(values), max(values)
        return f"**{fmt.format(mid)}** ({fmt.format(low)}-{fmt.format(high)})"

    def ratio(self) -> str:
        if not self.ref or not self.spoold:
            return "-"
        ref = statistics.median(self.ref)
        return f"{statistics.median(self.spoold) / ref:.2f}" if ref else "-"

    def row(self) -> str:
        return (
            f"| {self.scenario}: {self.title} | {self.label} | {self.reference} | "
            f"{self.summary(self.ref, self.fmt)} | {self.summary(self.spoold, self.fmt)} | "
            f"{self.ratio()} |"
        )

    def runs(self) -> str:
        def fmt(values: list[float]) -> str:
            return ", ".join(self.fmt.format(v) for v in values)

        spoold = f"spoold ({self.variant})" if self.variant else "spoold"
        sides = [f"{self.reference} {fmt(self.ref)}"] if self.ref else []
        sides += [f"{spoold} {fmt(self.spoold)}"] if self.spoold else []
        return f"{self.scenario} {self.label}: {'; '.join(sides)}"


TABLE_HEAD = (
    "| scenario | figure | reference | reference: median (min-max) "
    "| spoold: median (min-max) | spoold / reference |\n|---|---|---|---|---|---|"
)


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Plan:
    rounds: int
    counts: dict[str, int]
    rate: float
    timeout: float
    spoold: str
    python: str
    log_level: str
    overrides: dict[str, dict[str, Any]]
    settle: float = 0.0
    # Another build of spoold as the reference of a and b, instead of Postfix.
    reference_spoold: str | None = None
    # The spoold variants of a and b, by DKIM signing (keys of DKIM_VARIANTS).
    dkim: tuple[str, ...] = ("none",)
    # A busy loop pinned to CPU 0 during every measured run of a, b, c (CpuHog).
    hog: bool = False

    @property
    def reference(self) -> str:
        return "spoold (reference build)" if self.reference_spoold else "Postfix"


def smtp_source(port: int, count: int, size: int, sessions: int, timeout: float) -> None:
    run(
        [
            need_tool("smtp-source"),
            "-s",
            str(sessions),
            "-m",
            str(count),
            "-l",
            str(size),
            "-f",
            SENDER,
            "-t",
            RECIPIENT,
            f"127.0.0.1:{port}",
        ],
        timeout=timeout,
    )


def warm_up(servers: Sequence[Server], count: int, timeout: float) -> None:
    for server in servers:
        smtp_source(server.port, min(WARM_UP, count), 4096, 5, timeout)
        server.wait_empty()
        if isinstance(server, SpooldInstance):
            server.check_warm_up_signed(min(WARM_UP, count))


def hog_note(plan: Plan) -> str:
    return f" (a CPU hog on CPU {HOG_CPU} during each measured run)" if plan.hog else ""


def throughput_scenario(
    key: str, title: str, size: int, plan: Plan, workdir: Path, logs: Logs
) -> list[Metric]:
    n = plan.counts[key]
    ref_name = plan.reference
    variants = plan.dkim
    named = variants != ("none",)  # rows and names say which variant
    metrics: dict[str, tuple[Metric, ...]] = {}
    for variant in variants:
        shown = title.format(n=n) + (f", {DKIM_TITLES[variant]}" if named else "")
        label = DKIM_TITLES[variant] if named else ""
        metrics[variant] = (
            Metric(key, shown, "ingest msg/s", ref_name, variant=label),
            Metric(key, shown, "end to end msg/s", ref_name, variant=label),
            Metric(
                key,
                shown,
                "server CPU ms per message (lower is better)",
                ref_name,
                "{:.2f}",
                variant=label,
            ),
        )
        metrics[variant] += (
            Metric(key, shown, "end to end / SMTP-only ceiling", ref_name, "{:.3f}", variant=label),
        )
    ceiling = Metric(
        key,
        title.format(n=n),
        "SMTP-only ceiling msg/s (smtp-source -> smtp-sink, no server)",
        "no server",
    )
    hog = CpuHog(plan.hog)
    print(f"\n== {key}: {title.format(n=n)}{hog_note(plan)}", flush=True)
    home = workdir / key
    home.mkdir()
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(SmtpSink(home, logs))
        reference: Server
        if plan.reference_spoold:
            reference = SpooldInstance(
                home / "reference",
                plan.reference_spoold,
                sink.port,
                logs,
                plan.log_level,
                plan.overrides,
                name="reference",
            )
        else:
            reference = PostfixInstance(home / "postfix", sink.port, logs)
        servers: list[Server] = [stack.enter_context(reference)]
        variant_of: dict[int, str] = {}
        for variant in variants:
            name = f"spoold-{variant}" if named else "spoold"
            server = SpooldInstance(
                home / name,
                plan.spoold,
                sink.port,
                logs,
                plan.log_level,
                plan.overrides,
                name=name,
                dkim=variant,
            )
            servers.append(stack.enter_context(server))
            variant_of[id(server)] = variant
        warm_up(servers, n, plan.timeout)
        for rnd in range(1, plan.rounds + 1):
            # The SMTP path alone, with the same counts, sessions and sizes (and
            # the hog, if any): what no relay can beat on this machine now.
            base = sink.count()
            with hog:
                t0 = time.monotonic()
                smtp_source(sink.port, n, size, 20, plan.timeout)
                t2 = sink.wait_for(base + n, plan.timeout)
            r_ceiling = n / (t2 - t0)
            ceiling.ref.append(r_ceiling)
            print(
                f"{key} round {rnd} {'ceiling':9s} smtp-source -> smtp-sink {r_ceiling:7.1f} "
                f"msg/s ({t2 - t0:6.2f} s): the SMTP-only ceiling",
                flush=True,
            )
            for server in servers:
                if plan.settle > 0:
                    print(f"  (settling {plan.settle:.0f} s before {server.name})", flush=True)
                    time.sleep(plan.settle)
                base = sink.count()
                with hog:
                    cpu0 = server.cpu_seconds()
                    t0 = time.monotonic()
                    smtp_source(server.port, n, size, 20, plan.timeout)
                    t1 = time.monotonic()
                    t2 = sink.wait_for(base + n, plan.timeout)
                    server.wait_empty()
                    cpu_ms = (server.cpu_seconds() - cpu0) * 1000 / n
                got = sink.count() - base
                if got != n:
                    raise BenchError(f"{server.name}: the sink got {got} messages, not {n}")
                r_ingest, r_e2e = n / (t1 - t0), n / (t2 - t0)
                figures = (r_ingest, r_e2e, cpu_ms, r_e2e / r_ceiling)
                if server is servers[0]:  # the reference: in every variant's rows
                    for row in metrics.values():
                        for metric, value in zip(row, figures, strict=True):
                            metric.ref.append(value)
                else:
                    assert isinstance(server, SpooldInstance)
                    server.check_signed()
                    for metric, value in zip(metrics[variant_of[id(server)]], figures, strict=True):
                        metric.spoold.append(value)
                print(
                    f"{key} round {rnd} {server.name:9s} ingest {r_ingest:7.1f} msg/s "
                    f"({t1 - t0:6.2f} s)   end to end {r_e2e:7.1f} msg/s ({t2 - t0:6.2f} s)"
                    f"   CPU {cpu_ms:.2f} ms/msg   {r_e2e / r_ceiling:.3f} of the ceiling",
                    flush=True,
                )
    if plan.hog:
        print(hog.said(), flush=True)
    return [ceiling, *(m for variant in variants for m in metrics[variant])]


def message_bytes(token: str, seq: int) -> bytes:
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: latency {seq}\r\n"
        f"Message-ID: <{token}.{seq}@bench.invalid>\r\nX-Bench-Seq: {token}-{seq}\r\n\r\n"
    ).encode()
    return head + payload_lines(4096 - len(head))


async def expect(reader: asyncio.StreamReader, code: bytes, what: str) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise BenchError(f"connection closed while waiting for {code.decode()} to {what}")
        if line[:3] != code:
            raise BenchError(f"{what}: answered {line.decode('ascii', 'replace').strip()!r}")
        if line[3:4] != b"-":
            return


async def submit_one(port: int, message: bytes, timeout: float) -> tuple[float, float]:
    """One SMTP transaction on a new connection: (start, accepted) monotonic times."""
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await expect(reader, b"220", "connect")
            for command, code in (
                (b"EHLO bench.invalid", b"250"),
                (f"MAIL FROM:<{SENDER}>".encode(), b"250"),
                (f"RCPT TO:<{RECIPIENT}>".encode(), b"250"),
                (b"DATA", b"354"),
            ):
                writer.write(command + b"\r\n")
                await expect(reader, code, command.decode())
            writer.write(message + b".\r\n")
            await expect(reader, b"250", "end of data")
            accepted = time.monotonic()
            writer.write(b"QUIT\r\n")
            await expect(reader, b"221", "QUIT")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return start, accepted


async def paced_submissions(
    port: int, token: str, n: int, rate: float, timeout: float
) -> dict[str, tuple[float, float]]:
    """Start one submission every 1/rate seconds (open loop: a slow answer does
    not delay the next start), each on its own connection."""
    times: dict[str, tuple[float, float]] = {}

    async def one(seq: int) -> None:
        times[f"{token}-{seq}"] = await submit_one(port, message_bytes(token, seq), timeout)

    begin = time.monotonic()
    try:
        async with asyncio.TaskGroup() as tg:
            for seq in range(n):
                delay = begin + seq / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tg.create_task(one(seq))
    except* (BenchError, OSError, TimeoutError) as group:
        first = group.exceptions[0]
        raise BenchError(f"a paced submission failed: {first!r}") from first
    return times


def latency_scenario(plan: Plan, workdir: Path, logs: Logs) -> list[Metric]:
    n = plan.counts["c"]
    title = f"{n:,} x 4 KiB at {plan.rate:g} msg/s, submission -> delivery"
    p50 = Metric("c", title, "latency p50 ms (lower is better)", "Postfix", fmt="{:.1f}")
    p99 = Metric("c", title, "latency p99 ms (lower is better)", "Postfix", fmt="{:.1f}")
    cpu = Metric("c", title, "server CPU ms per message (lower is better)", "Postfix", fmt="{:.2f}")
    hog = CpuHog(plan.hog)
    print(f"\n== c: {title}{hog_note(plan)}", flush=True)
    home = workdir / "c"
    home.mkdir()
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(LatencySink(logs, home))
        servers: list[Server] = [
            stack.enter_context(PostfixInstance(home / "postfix", sink.port, logs)),
            stack.enter_context(
                SpooldInstance(
                    home / "spoold", plan.spoold, sink.port, logs, plan.log_level, plan.overrides
                )
            ),
        ]
        warm_up(servers, n, plan.timeout)
        for rnd in range(1, plan.rounds + 1):
            for server in servers:
                token = f"r{rnd}{server.name}"

                def all_arrived(token: str = token) -> bool:
                    return len(sink.arrivals(token)) >= n

                with hog:
                    cpu0 = server.cpu_seconds()
                    sent = asyncio.run(
                        paced_submissions(server.port, token, n, plan.rate, min(60.0, plan.timeout))
                    )
                    wait_until(all_arrived, plan.timeout, f"{n} messages at the latency sink")
                    server.wait_empty()
                    cpu_ms = (server.cpu_seconds() - cpu0) * 1000 / n
                arrived = sink.arrivals(token)
                extra = sum(len(v) - 1 for v in arrived.values())
                latencies = [(arrived[k][0] - start) * 1000 for k, (start, _) in sent.items()]
                accepts = [(acc - start) * 1000 for start, acc in sent.values()]
                r50, r99 = percentile(latencies, 50), percentile(latencies, 99)
                (p50.ref if server is servers[0] else p50.spoold).append(r50)
                (p99.ref if server is servers[0] else p99.spoold).append(r99)
                (cpu.ref if server is servers[0] else cpu.spoold).append(cpu_ms)
                print(
                    f"c round {rnd} {server.name:9s} latency p50 {r50:7.1f} ms  p99 {r99:7.1f} ms"
                    f"  max {max(latencies):7.1f} ms   (accepted: p50 "
                    f"{percentile(accepts, 50):.1f} ms, p99 {percentile(accepts, 99):.1f} ms)"
                    f"   CPU {cpu_ms:.2f} ms/msg" + (f"  {extra} delivered twice" if extra else ""),
                    flush=True,
                )
    if plan.hog:
        print(hog.said(), flush=True)
    return [p50, p99, cpu]


def add_scenario(plan: Plan, workdir: Path, logs: Logs) -> list[Metric]:
    n = plan.counts["d"]
    title = f"{n:,} x 4 KiB Spool.add, relay held"
    metrics = {c: Metric("d", title, f"durable adds/s, {c} at once", "disk loop") for c in (1, 16)}
    cpus = {
        c: Metric(
            "d",
            title,
            f"CPU ms per add, {c} at once (lower is better)",
            "disk loop",
            fmt="{:.2f}",
        )
        for c in (1, 16)
    }
    print(
        f"\n== d: {title}; reference: write+fsync+rename+fsync(dir), same concurrency", flush=True
    )
    home = workdir / "d"
    home.mkdir()
    # The worker imports spoold from this tree, whose commit the section
    # records; left to itself, the Python would take the first it finds
    # (an editable install of another checkout, for one).
    found = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *([found] if found else [])])}
    # Every run writes new files, and no file is deleted until the last run
    # is over: a run that started right after another's files were deleted
    # would pay for them (see the settle), one mode more than the other.
    if plan.settle > 0:
        print(f"  (settling {plan.settle:.0f} s before d)", flush=True)
        time.sleep(plan.settle)
    try:
        add_runs(plan, home, n, env, metrics, cpus)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return [m for c in metrics for m in (metrics[c], cpus[c])]


def add_runs(
    plan: Plan,
    home: Path,
    n: int,
    env: dict[str, str],
    metrics: dict[int, Metric],
    cpus: dict[int, Metric],
) -> None:
    """The runs of scenario d, alternated, each in a new directory under
    ``home`` that stays until the scenario ends."""
    for rnd in range(1, plan.rounds + 1):
        for conc, metric in metrics.items():
            for mode in ("disk", "spoold"):
                target = home / f"{mode}-{conc}-{rnd}"
                worker = [plan.python, str(Path(__file__).resolve()), "_add-worker"]
                done = run(
                    [*worker, mode, str(target), str(n), str(conc)], timeout=plan.timeout, env=env
                )
                said = json.loads(done.stdout.strip().splitlines()[-1])
                if Path(said["spoold"]) != ROOT / "spoold":
                    raise BenchError(
                        f"scenario d's worker imported spoold from {said['spoold']}, "
                        f"not from this tree ({ROOT / 'spoold'})"
                    )
                seconds = float(said["seconds"])
                rate, cpu_ms = n / seconds, float(said["cpu"]) * 1000 / n
                (metric.ref if mode == "disk" else metric.spoold).append(rate)
                (cpus[conc].ref if mode == "disk" else cpus[conc].spoold).append(cpu_ms)
                print(
                    f"d round {rnd} {mode:8s} {conc:2d} at once: {rate:7.1f}/s ({seconds:.2f} s)"
                    f"   CPU {cpu_ms:.2f} ms per add",
                    flush=True,
                )


# ------------------------------------------------- the (d) worker (child process)


def add_worker(mode: str, directory: Path, count: int, concurrency: int) -> None:
    """Child process of scenario d: time ``count`` durable 4 KiB writes from
    ``concurrency`` writers, and print ``{"seconds": ..., "cpu": ...,
    "spoold": ...}``: the wall time and this process's CPU time (user +
    system, all its threads) over the same span, and the directory of the
    spoold package it imported."""
    import spoold

    directory.mkdir()
    shares = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]
    seconds, cpu = (disk_loop if mode == "disk" else spool_adds)(directory, shares)
    package = str(Path(spoold.__file__).resolve().parent)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "spoold": package}))


def process_cpu() -> float:
    """This process's CPU time so far, user + system, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def disk_loop(directory: Path, shares: list[int]) -> tuple[float, float]:
    """What the disk allows: write 4 KiB + fsync + rename + fsync(dir), one
    thread per writer (the GIL is released in every one of these calls)."""
    tmp, active = directory / "tmp", directory / "active"
    tmp.mkdir()
    active.mkdir()
    data = payload_lines(4096)
    gate = threading.Barrier(len(shares) + 1)

    def writer(tid: int, n: int) -> None:
        dir_fd = os.open(active, os.O_RDONLY | os.O_DIRECTORY)
        try:
            gate.wait()
            for i in range(n):
                name = f"{tid}-{i}"
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp / name, active / name)
                os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    threads = [threading.Thread(target=writer, args=(i, n)) for i, n in enumerate(shares)]
    for t in threads:
        t.start()
    gate.wait()
    start, cpu0 = time.perf_counter(), process_cpu()
    for t in threads:
        t.join()
    return time.perf_counter() - start, process_cpu() - cpu0


def spool_adds(directory: Path, shares: list[int]) -> tuple[float, float]:
    """``Spool.add`` from ``len(shares)`` concurrent tasks; the relay is held
    at a gate that never opens (one attempt waits there; nothing is sent)."""
    import logging

    import anyio
    import structlog

    from spoold import Body, RoutedBatch, RoutedEnvelope, Spool
    from spoold.testing import InMemoryRelay

    # The library logs each message at info; a program embedding it decides
    # what to keep. Here: warnings only, so the figure is the spool's own.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    head = b"Subject: bench\r\n\r\n"
    batch = RoutedBatch(
        [RoutedEnvelope(SENDER, [RECIPIENT], ["127.0.0.1:9"])],
        Body.from_content(head + payload_lines(4096 - len(head))),
    )

    async def main() -> tuple[float, float]:
        relay = InMemoryRelay(gate=anyio.Event())
        async with Spool.open(
            directory / "spool", relay=relay, max_concurrent_send_jobs=1, flush_timeout=0.5
        ) as spool:

            async def adder(n: int) -> None:
                for _ in range(n):
                    await spool.add(batch)

            start, cpu0 = time.perf_counter(), process_cpu()
            async with anyio.create_task_group() as tg:
                for n in shares:
                    tg.start_soon(adder, n)
            return time.perf_counter() - start, process_cpu() - cpu0

    return anyio.run(main)


# ---------------------------------------------------------------- the report


def machine() -> dict[str, str]:
    def first(path: str, key: str) -> str:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        return "?"

    mem_kib = first("/proc/meminfo", "MemTotal").split()[0]
    return {
        "cpus": str(len(os.sched_getaffinity(0))),
        "cpu": first("/proc/cpuinfo", "model name"),
        "ram": f"{int(mem_kib) / 1024 / 1024:.1f} GiB" if mem_kib.isdigit() else "?",
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def filesystem(path: Path) -> str:
    with contextlib.suppress(BenchError):
        lines = run(["df", "-T", str(path)], timeout=30).stdout.splitlines()
        device, fstype = lines[-1].split()[:2]
        return f"{fstype} on {device}"
    return "?"


def commit() -> str:
    git = ["git", "-C", str(ROOT)]
    try:
        head = run([*git, "rev-parse", "--short", "HEAD"], timeout=30).stdout.strip()
        dirty = run([*git, "status", "--porcelain", "--", ".", ":!bench/RESULTS.md"], timeout=30)
        code = run([*git, "log", "-1", "--format=%h", "--", "spoold"], timeout=30).stdout.strip()
    except BenchError:
        return "? (not a git checkout)"
    state = "dirty" if dirty.stdout.strip() else "clean"
    return f"{head} ({state}); the last commit that changed spoold/ is {code}"


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def report(
    metrics: list[Metric],
    context: dict[str, str],
    plan: Plan,
    quick: bool,
) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    kind = "quick run" if quick else "full run"
    lines = [
        f"## {when}: {kind}, {plan.rounds} round(s), scenarios {context['scenarios']}"
        + (", against another spoold build" if plan.reference_spoold else "")
        + (f", with a CPU hog on CPU {HOG_CPU}" if plan.hog else ""),
        "",
        f"- Machine: {context['cpus']} CPUs ({context['cpu']}), {context['ram']} RAM, "
        f"kernel {context['kernel']}, Python {context['python']}; work directory "
        f"`{context['workdir']}` on {context['fs']}.",
        f"- Load average (1/5/15 min) at the start: {context['load_start']}; "
        f"at the end: {context['load_end']}.",
        f"- Commit: {context['commit']}.",
        f"- Command: `{context['command']}`",
        f"- {'Reference' if plan.reference_spoold else 'Postfix'}: {context['postfix']}; "
        f"{context['spoold_version']} "
        f"(`{plan.spoold}`, log level {plan.log_level}"
        + (f", overrides {context['overrides']}" if plan.overrides else "")
        + ").",
        f"- Wall time of the whole run: {context['wall']}.",
        *(
            [
                f"- CPU hog (`--hog`): {CpuHog.describe()} ran beside the server during every "
                "measured run of a, b and c (and of the SMTP-only ceiling), the same for both: "
                "started just before each run, stopped right after; not during the settle, the "
                "warm-up or d. Its own CPU time is in no figure."
            ]
            if plan.hog
            else []
        ),
        "- SMTP-only ceiling (a, b): smtp-source straight into smtp-sink, the same count, "
        "20 sessions and size, once per round before the servers; end to end / ceiling is "
        "each run's end-to-end rate over its round's ceiling.",
        "",
        TABLE_HEAD,
        *(m.row() for m in metrics),
        "",
        "Runs, in order:",
        "",
        *(f"- {m.runs()}" for m in metrics),
        "",
    ]
    return "\n".join(lines)


RESULTS_INTRO = """\
# spoold next to Postfix: results

Sections appended by `bench/vs_postfix.py` (see its docstring for what each
scenario measures). Scenarios a-c compare spoold with a private Postfix
instance on the same machine, alternated run by run; d compares `Spool.add`
with the disk's own write+fsync+rename+fsync(dir) loop. A ratio above 1
means spoold is faster, except for the figures marked "lower is better"
(latency, and the CPU time the server spent per message: all its processes,
user + system), where it means spoold is slower or costlier. Other jobs share
the machine: compare ratios, not absolute figures, and look at the load
average each section records. CPU per message is the figure that load
disturbs least.
"""


# ---------------------------------------------------------------- main


def closed_parent(path: Path) -> Path | None:
    """The first of path and its parents that others may not enter, if any
    (Postfix's processes run as user postfix and must reach their queue)."""
    for p in (path, *path.parents):
        if not p.stat().st_mode & stat.S_IXOTH:
            return p
    return None


def ensure_postfix() -> None:
    if all(tool(t) for t in ("postfix", "postconf", "smtp-sink", "smtp-source")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError(
            "Postfix is not installed: apt-get install postfix (Debian), or run this as root"
        )
    print("installing the Debian package postfix (not started, not configured by us)")
    run(
        ["debconf-set-selections"],
        timeout=60,
        input="postfix postfix/main_mailer_type select Local only\n",
    )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(["apt-get", "install", "-y", "postfix"], timeout=900, env=env)
    except BenchError:
        run(["apt-get", "update"], timeout=600, env=env)
        run(["apt-get", "install", "-y", "postfix"], timeout=900, env=env)


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        path, sep, raw = item.partition("=")
        table, dot, key = path.strip().rpartition(".")
        if not sep or not dot or not key:
            raise SystemExit(f"--spoold-set {item!r}: want TABLE.KEY=VALUE (a TOML value)")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word: a string
        out.setdefault(table, {})[key] = value
    return out


DEFAULT_COUNTS = {"a": 10_000, "b": 2_000, "c": 2_000, "d": 2_000}
QUICK_COUNTS = {"a": 300, "b": 100, "c": 200, "d": 200}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="See the module docstring (bench/vs_postfix.py) for what each scenario measures.",
    )
    p.add_argument("--rounds", type=int, help="A/B rounds per scenario (default 3; 1 with --quick)")
    p.add_argument(
        "--scenarios", help="which of a,b,c,d (default all; a,b with --reference-spoold)"
    )
    p.add_argument("--count", type=int, help="messages per run for every chosen scenario")
    p.add_argument("--quick", action="store_true", help="small counts and 1 round: a smoke run")
    p.add_argument("--rate", type=float, default=100.0, help="msg/s of scenario c (default 100)")
    p.add_argument(
        "--settle",
        type=float,
        help="quiet seconds before each run of a and b, and before d (default 65; --quick: 0)",
    )
    p.add_argument("--spoold", default=str(ROOT / ".venv" / "bin" / "spoold"))
    p.add_argument(
        "--reference-spoold",
        metavar="PATH",
        help="for a and b: another spoold command (e.g. an older commit's) as the reference, "
        "alternated with --spoold in the same run, instead of Postfix",
    )
    p.add_argument(
        "--dkim",
        default="none",
        help="for a and b: spoold variants run next to each other, comma-separated from "
        "none,rsa,ed25519 (DKIM signing off, RSA-2048, Ed25519; default none)",
    )
    p.add_argument(
        "--hog",
        action="store_true",
        help=f"a busy loop pinned to CPU {HOG_CPU} beside the server during each measured run "
        "of a, b and c (the same for both servers)",
    )
    p.add_argument("--python", help="Python for scenario d (default: the one beside --spoold)")
    p.add_argument("--results", help="Markdown file to append to (default bench/RESULTS.md)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per step (default 600)")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temp dir goes")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temp dir afterwards")
    p.add_argument("--spoold-log-level", default="info", help="spoold's [log] level")
    p.add_argument(
        "--spoold-set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="a key of spoold's config (repeatable): relay.max_connections_per_hop=20",
    )
    return p.parse_args(argv)


def interrupted(signum: int, _frame: object) -> None:
    """Ctrl-C or SIGTERM: unwind (which stops the servers); a second one is
    ignored so that the clean-up is not cut short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.scenarios is None:
        args.scenarios = "a,b" if args.reference_spoold else "a,b,c,d"
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(DEFAULT_COUNTS)
    if unknown or not scenarios:
        raise SystemExit(f"--scenarios: choose from a,b,c,d (got {args.scenarios!r})")
    dkim = tuple(v.strip() for v in args.dkim.split(",") if v.strip())
    if not dkim or set(dkim) - set(DKIM_VARIANTS) or len(set(dkim)) != len(dkim):
        raise SystemExit(f"--dkim: choose from none,rsa,ed25519, each once (got {args.dkim!r})")
    counts = dict(QUICK_COUNTS if args.quick else DEFAULT_COUNTS)
    if args.count is not None:
        counts = dict.fromkeys(counts, args.count)
    spoold = str(Path(args.spoold).absolute())
    python = args.python or str(Path(spoold).parent / "python")
    plan = Plan(
        rounds=args.rounds or (1 if args.quick else 3),
        counts=counts,
        rate=args.rate,
        timeout=args.timeout,
        spoold=spoold,
        python=python,
        log_level=args.spoold_log_level,
        overrides=parse_overrides(args.spoold_set),
        settle=args.settle if args.settle is not None else (0.0 if args.quick else 65.0),
        reference_spoold=(
            str(Path(args.reference_spoold).absolute()) if args.reference_spoold else None
        ),
        dkim=dkim,
        hog=args.hog,
    )
    if plan.reference_spoold and set(scenarios) - {"a", "b"}:
        raise SystemExit("--reference-spoold: only scenarios a and b take another reference")
    results_path = args.results or (None if args.quick else str(ROOT / "bench" / "RESULTS.md"))
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    logs = Logs()
    began = time.monotonic()
    context = {
        **machine(),
        "scenarios": ",".join(scenarios),
        "load_start": loadavg(),
        "commit": commit(),
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "overrides": ", ".join(args.spoold_set),
    }
    workdir = Path(tempfile.mkdtemp(prefix="spoold-vs-postfix-", dir=args.workdir))
    workdir.chmod(0o755)  # Postfix's processes (user postfix) walk into it
    context["workdir"] = str(workdir)
    context["fs"] = filesystem(workdir)
    metrics: list[Metric] = []
    try:
        if not os.access(spoold, os.X_OK):
            raise BenchError(f"no spoold command at {spoold} (make test creates .venv)")
        context["spoold_version"] = SpooldInstance.version_of(spoold)
        if plan.reference_spoold:
            if not os.access(plan.reference_spoold, os.X_OK):
                raise BenchError(
                    f"no spoold command at {plan.reference_spoold} (--reference-spoold)"
                )
            ensure_postfix()  # its smtp-sink is the next hop
            context["postfix"] = (
                f"{SpooldInstance.version_of(plan.reference_spoold)} "
                f"(`{plan.reference_spoold}`), instead of Postfix"
            )
        elif set(scenarios) & {"a", "b", "c"}:
            if os.geteuid() != 0:
                raise BenchError("scenarios a, b and c start Postfix: run as root")
            ensure_postfix()
            if closed := closed_parent(workdir):
                raise BenchError(
                    f"Postfix (user postfix) cannot reach {workdir}: others may not enter "
                    f"{closed}; give a --workdir that they can (default: the system temp dir)"
                )
            context["postfix"] = (
                f"{PostfixInstance.version()}, a private instance (stock settings, relay to "
                "the sink, chroot off, logging to a file)"
            )
        else:
            context["postfix"] = "not used"
        print(
            f"work directory {workdir} ({context['fs']}); {plan.rounds} round(s); "
            f"counts {', '.join(f'{s}={counts[s]}' for s in scenarios)}",
            flush=True,
        )
        for key in scenarios:
            if key == "a":
                metrics += throughput_scenario(
                    "a", "{n:,} x 4 KiB, 20 sessions", 4096, plan, workdir, logs
                )
            elif key == "b":
                metrics += throughput_scenario(
                    "b", "{n:,} x 100 KiB, 20 sessions", 102_400, plan, workdir, logs
                )
            elif key == "c":
                metrics += latency_scenario(plan, workdir, logs)
            else:
                metrics += add_scenario(plan, workdir, logs)
    except (Exception, KeyboardInterrupt) as exc:
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"FAILED: {exc}"
        print(f"\nvs_postfix: {what}", file=sys.stderr, flush=True)
        if not isinstance(exc, BenchError | KeyboardInterrupt):
            import traceback

            traceback.print_exc()
        logs.print_tails()
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        if args.keep_workdir:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = time.monotonic() - began
    context["wall"] = f"{int(wall // 60)} min {wall % 60:.0f} s"
    context["load_end"] = loadavg()
    section = report(metrics, context, plan, args.quick)
    print("\n" + section)
    if results_path:
        path = Path(results_path)
        existing = path.read_text() if path.exists() else RESULTS_INTRO
        path.write_text(existing.rstrip("\n") + "\n\n" + section)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_add-worker"]:
        _, _, worker_mode, worker_dir, worker_count, worker_conc = sys.argv
        add_worker(worker_mode, Path(worker_dir), int(worker_count), int(worker_conc))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
