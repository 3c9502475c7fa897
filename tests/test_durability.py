"""Durability proven at the syscall level, under strace.

The crash tests of the store end a child with ``os._exit``: the page cache
survives, so they cannot tell an fsync from no fsync. These tests watch the
system calls instead. They run the real code under ``strace -f`` and check,
for every message whose submitter was told it is safe, that before the
telling:

* its body and its record were each created under ``tmp/``, written and
  synced before their rename: an fsync of the file, or a ``syncfs`` of the
  spool's filesystem followed at once by a flush (below), starting after the
  last write and ending before the rename;
* the body was renamed into ``data/`` and the record into ``active/``;
* ``data/`` and ``active/`` were synced after the renames: an fsync of the
  directory, or a ``syncfs`` and its flush, starting after the rename into
  it and ending before the acknowledgement.

A ``syncfs`` counts only with the fsync of a spool directory that its
thread makes next: on ext4 without a journal, ``syncfs`` flushes the
drive's cache before its last metadata writes end, and the fsync flushes it
after them (see ``StoreDirectory.syncfs``).

Both ways of the store (``spool.sync = "fsync"`` and ``"syncfs"``, the group
commit) are run.

"Told it is safe" is the ``250 ... queued as ID`` reply written to the SMTP
client's TCP socket (the daemon, ``python -m spoold run``, with its
listener on), or a marker line the child ``tests/durability_child.py``
writes once ``Spool.add`` has returned.

The order of lines in one ``strace -f -o`` file is causal for what matters
here: a worker thread's fsync is logged as finished before that thread
runs again, so before the event loop hears of it and writes the reply.
Calls cut in two (``<unfinished ...>`` / ``<... resumed>``) are joined; a
call's start and end are the lines where it began and finished.

The test has teeth: :data:`MUTANTS` are copies of the store's modules
(``spoold/store/directory.py``, ``spoold/store/commit.py``) with one sync
removed (the file fsync of ``write_tmp``, the directory fsyncs of
``enqueue_sync``, or only one of the two directories; either ``syncfs`` of
a group commit, or the flush after each ``syncfs``). Each copy is put in
a copy of the package in a temp dir that ``PYTHONPATH`` names first (the
child runs in another directory, so ``python -m`` does not put this
checkout first); the trace itself shows which store modules were loaded.
The checker must find the missing step in every one of them.

strace must be installed (Debian package ``strace``; ``.ci/run`` installs
it) and allowed to trace; otherwise these tests skip, saying so. Every run
is bounded: a few messages, a timeout on every wait.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import unnamed_files_work

PROJECT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "durability_child.py"
STRACE = shutil.which("strace")
TIMEOUT = 60.0  # the longest any one traced run may take
SMTP_MESSAGES = 20
API_MESSAGES = 10
AT_ONCE_MESSAGES = 48
MUTANT_MESSAGES = 3

# A regular expression, so a syscall this architecture lacks (rename on
# arm64) is no error.
TRACED = (
    "/^(open|openat|creat|write|writev|pwrite64|sendto|sendmsg|fsync|fdatasync|syncfs|sync"
    "|rename|renameat|renameat2|unlink|unlinkat|ftruncate|link|linkat)$"
)


@functools.cache
def _strace_usable() -> str | None:
    """Why strace cannot be used here, or None."""
    if STRACE is None:
        return "strace not found: install Debian package 'strace' (apt-get install strace)"
    done = subprocess.run(
        [STRACE, "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, timeout=30
    )
    if done.returncode != 0:
        return f"strace cannot trace here (ptrace not permitted?): {done.stderr.decode().strip()}"
    return None


needs_strace = pytest.mark.skipif(_strace_usable() is not None, reason=str(_strace_usable() or ""))


# ------------------------------------------------------------- the trace


@dataclass(frozen=True)
class Call:
    """One system call of the trace; ``start`` and ``end`` are line numbers."""

    pid: int
    name: str
    args: str
    result: str
    start: int
    end: int

    @property
    def ok(self) -> bool:
        return re.match(r"\d", self.result) is not None

    @property
    def fd_path(self) -> str | None:
        """What strace -y says the first argument, a descriptor, is."""
        m = re.match(r"-?\d+<(.*?)>(?:,|$)", self.args)
        return m.group(1) if m else None

    def strings(self) -> list[str]:
        return [_unescape(s) for s in re.findall(r'"((?:[^"\\]|\\.)*)"', self.args)]


def _unescape(text: str) -> str:
    return text.replace('\\"', '"').replace("\\\\", "\\")


_LINE = re.compile(r"^(\d+)\s+[\d:.]+\s+(.*)$")
_WHOLE = re.compile(r"^(\w+)\((.*)\)\s+=\s+(.*)$")
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(.*)$")


def parse_trace(text: str) -> list[Call]:
    """The calls of an ``strace -f -tt -y -o`` file, in the order they ended."""
    calls: list[Call] = []
    pending: dict[int, tuple[str, str, int]] = {}
    for number, line in enumerate(text.splitlines()):
        m = _LINE.match(line)
        if m is None:
            continue
        pid, rest = int(m.group(1)), m.group(2)
        if whole := _WHOLE.match(rest):
            calls.append(Call(pid, whole[1], whole[2], whole[3], number, number))
        elif unfinished := _UNFINISHED.match(rest):
            pending[pid] = (unfinished[1], unfinished[2], number)
        elif (resumed := _RESUMED.match(rest)) and pid in pending:
            name, args, start = pending.pop(pid)
            calls.append(Call(pid, name, args + resumed[2], resumed[3], start, number))
    return calls


WRITES = ("write", "writev", "pwrite64")
SYNCS = ("fsync", "fdatasync")
SYNCFS = "syncfs"


def durability_problems(calls: list[Call], spool: Path, acks: dict[str, int]) -> list[str]:
    """Every commit step missing before the acknowledgement of each id.
    ``acks`` maps an id to the line where its acknowledgement starts."""
    root = os.path.realpath(spool)
    flushed = flushed_syncfs(calls, root)
    problems = []
    for mid, ack in acks.items():
        problems += _problems_of(calls, flushed, root, mid, ack)
    return problems


def flushed_syncfs(calls: list[Call], root: str) -> list[Call]:
    """Each successful ``syncfs`` of the spool's filesystem whose thread
    next makes a successful fsync (or fdatasync) of a descriptor of the
    spool, as one call from the start of the one to the end of the other.
    A ``syncfs`` without it is no sync point (see the module's text)."""
    by_thread: dict[int, list[Call]] = {}
    for c in sorted(calls, key=lambda c: c.start):
        by_thread.setdefault(c.pid, []).append(c)
    out = []
    for mine in by_thread.values():
        for c, after in itertools.pairwise(mine):
            if (
                c.name == SYNCFS
                and c.result == "0"
                and _on_spool(c, root)
                and after.name in SYNCS
                and after.result == "0"
                and _on_spool(after, root)
            ):
                out.append(Call(c.pid, SYNCFS, c.args, "0", c.start, after.end))
    return out


def _problems_of(
    calls: list[Call], flushed: list[Call], root: str, mid: str, ack: int
) -> list[str]:
    problems: list[str] = []
    renames = {}
    for directory in ("data", "active"):
        target = f"{root}/{directory}/{mid}"
        found = [
            c
            for c in calls
            if c.name.startswith("rename")
            and c.ok
            and c.end < ack
            and len(c.strings()) >= 2
            and c.strings()[1] == target
            and c.strings()[0].startswith(f"{root}/tmp/")
        ]
        if not found:
            problems.append(f"{mid}: no rename from tmp/ into {directory}/ before the ack")
            continue
        renames[directory] = found[0]
    for directory, rename in renames.items():
        what = "body" if directory == "data" else "record"
        tmp = rename.strings()[0]
        opened = [
            c
            for c in calls
            if c.name in ("open", "openat", "creat")
            and c.ok
            and tmp in c.strings()
            and c.end < rename.start
        ]
        # A file of the pool (spoold.store.pool) is claimed (renamed from
        # tmp/pool.*), then opened, not created.
        claims = [
            c
            for c in calls
            if c.name.startswith("rename")
            and c.ok
            and len(c.strings()) >= 2
            and c.strings()[1] == tmp
            and c.strings()[0].startswith(f"{root}/tmp/pool.")
            and c.end < rename.start
        ]
        # Or created unnamed (O_TMPFILE), linked to its tmp/ name, and
        # opened by that name (spoold.store.directory).
        named = named_unnamed(calls, tmp, rename.start)
        if not any("O_CREAT" in c.args for c in opened) and not (opened and (claims or named)):
            problems.append(f"{mid}: the {what} {tmp} was not created before its rename")
        writes = [
            c
            for c in calls
            if c.name in WRITES and c.ok and c.fd_path == tmp and c.end < rename.start
        ]
        if not writes:
            problems.append(f"{mid}: nothing was written to the {what} {tmp} before its rename")
            continue
        last_write = max(c.end for c in writes)
        if claims:
            problems += _reuse_problems(calls, flushed, mid, what, tmp, claims[-1], writes, rename)
            cuts = [c for c in calls if c.name == "ftruncate" and c.ok and c.fd_path == tmp]
            last_write = max([last_write] + [c.end for c in cuts if c.end < rename.start])
        synced = [
            c
            for c in [*(c for c in calls if c.name in SYNCS and c.fd_path == tmp), *flushed]
            if c.result == "0" and c.start > last_write and c.end < rename.start
        ]
        if not synced:
            problems.append(
                f"{mid}: the {what} {tmp} was not synced between its last write and its rename "
                f"into {directory}/"
            )
    for directory, rename in renames.items():
        path = f"{root}/{directory}"
        synced = [
            c
            for c in [*(c for c in calls if c.name in SYNCS and c.fd_path == path), *flushed]
            if c.result == "0" and c.start > rename.end and c.end < ack
        ]
        if not synced:
            problems.append(
                f"{mid}: directory {directory}/ was not synced between the rename into it "
                "and the ack"
            )
    return problems


_PROC_FD = re.compile(r"/proc/self/fd/(\d+)$")


def named_unnamed(calls: list[Call], tmp: str, before: int) -> list[Call]:
    """The ``linkat`` calls, before line ``before``, that named ``tmp`` a
    file created unnamed (``O_TMPFILE``) by the same thread: its source is
    ``/proc/self/fd/N``, N what that thread's last ``O_TMPFILE`` open before
    it returned."""
    out = []
    for link in calls:
        if not (
            link.name == "linkat"
            and link.ok
            and link.end < before
            and len(link.strings()) >= 2
            and link.strings()[1] == tmp
            and (fd := _PROC_FD.match(link.strings()[0])) is not None
        ):
            continue
        made = [
            c
            for c in calls
            if c.name in ("open", "openat")
            and c.pid == link.pid
            and c.ok
            and "O_TMPFILE" in c.args
            and c.end < link.start
        ]
        if made and made[-1].result.split("<")[0] == fd.group(1):
            out.append(link)
    return out


def _reuse_problems(
    calls: list[Call],
    flushed: list[Call],
    mid: str,
    what: str,
    tmp: str,
    claim: Call,
    writes: list[Call],
    rename: Call,
) -> list[str]:
    """A reused file: a syncfs (and its flush) after its claim and before
    its first write (no old name of it can come back holding the new
    content), and cut to its length after its last write, before its
    rename."""
    problems = []
    first_write = min(c.start for c in writes)
    if not [c for c in flushed if c.start > claim.end and c.end < first_write]:
        problems.append(
            f"{mid}: the reused {what} {tmp} was written before a syncfs that followed its claim"
        )
    last_write = max(c.end for c in writes)
    if not [
        c
        for c in calls
        if c.name == "ftruncate"
        and c.ok
        and c.fd_path == tmp
        and c.start > last_write
        and c.end < rename.start
    ]:
        problems.append(f"{mid}: the reused {what} {tmp} was not cut to its length")
    return problems


def _on_spool(call: Call, root: str) -> bool:
    """A syncfs of the spool's filesystem (through a descriptor of the spool)."""
    path = call.fd_path
    return path is not None and (path == root or path.startswith(root + "/"))


_QUEUED = re.compile(r"queued as ([A-Za-z0-9_ -]+)\\r\\n")


def smtp_acks(calls: list[Call]) -> dict[str, int]:
    """id -> start line of the ``250 ... queued as`` written to a TCP socket."""
    acks = {}
    for c in calls:
        if c.name in (*WRITES, "sendto", "sendmsg") and (c.fd_path or "").startswith("TCP"):
            for m in _QUEUED.finditer(c.args):
                for mid in m.group(1).split():
                    acks.setdefault(mid, c.start)
    return acks


def api_acks(calls: list[Call]) -> dict[str, int]:
    """id -> start line of the child's ``ADDED`` marker."""
    acks = {}
    for c in calls:
        if c.name in WRITES:
            for m in re.finditer(r"ADDED ([A-Za-z0-9_ -]+)\\n", c.args):
                for mid in m.group(1).split():
                    acks.setdefault(mid, c.start)
    return acks


def store_loaded_from(calls: list[Call]) -> list[str]:
    """Where the traced process read the modules of ``spoold/store/`` (or
    their bytecode) from."""
    out = []
    for c in calls:
        if c.name in ("open", "openat") and c.ok:
            for s in c.strings():
                if re.search(r"spoold/store/(__pycache__/)?\w+(\.cpython-\d+)?\.pyc?$", s):
                    out.append(s)
    return out


# ------------------------------------------------------------- mutants


_DIR_FSYNC = '            d.fsync_dirs([d.data] + [f"{d.root_s}/{e.queue}" for e in entries])\n'
_MOVE = (
    "            moves = self._stage(entries, on_reserve, names, written, sync=True)\n"
    "            self._move_into_place(moves, written)\n"
)
_FIRST_SYNCFS = '            d.step("sync_data")\n            d.syncfs()\n'
_SECOND_SYNCFS = '            d.step("fsync_dirs")\n            d.syncfs()\n'
_FILES = "directory.py"  # of spoold/store/: the file steps
_FLUSH = "            raise OSError(code, os.strerror(code), self.root_s)\n        os.fsync(fd)\n"
_COMMIT = "commit.py"  # enqueue's commit path

# name -> the store's sync mode, the module of spoold/store/ it changes, the
# (text, replacement) pairs that make it, and what the checker must say.
MUTANTS: dict[str, tuple[str, str, list[tuple[str, str]], str]] = {
    "no fsync of the file in write_tmp": (
        "fsync",
        _FILES,
        [("                os.fsync(fd)\n", "                pass  # mutant\n")],
        "was not synced between its last write",
    ),
    "no fsync of the directories in enqueue_sync": (
        "fsync",
        _COMMIT,
        [(_DIR_FSYNC, "            pass  # mutant\n")],
        "was not synced between the rename",
    ),
    "no fsync of data/ in enqueue_sync": (
        "fsync",
        _COMMIT,
        [(_DIR_FSYNC, '            d.fsync_dirs([f"{d.root_s}/{e.queue}" for e in entries])\n')],
        "directory data/ was not synced",
    ),
    "no fsync of the queue in enqueue_sync": (
        "fsync",
        _COMMIT,
        [(_DIR_FSYNC, "            d.fsync_dirs([d.data])\n")],
        "directory active/ was not synced",
    ),
    "no os.fsync in fsync_dirs": (
        "fsync",
        _FILES,
        [("            os.fsync(self.dir_fds[d])\n", "            pass  # mutant\n")],
        "was not synced between the rename",
    ),
    "the directories fsynced before the renames": (
        "fsync",
        _COMMIT,
        [(_DIR_FSYNC, "            pass  # mutant\n"), (_MOVE, _DIR_FSYNC + _MOVE)],
        "was not synced between the rename",
    ),
    "group commit without its first syncfs": (
        "syncfs",
        _COMMIT,
        [(_FIRST_SYNCFS, "            pass  # mutant\n")],
        "was not synced between its last write",
    ),
    "group commit without its second syncfs": (
        "syncfs",
        _COMMIT,
        [(_SECOND_SYNCFS, "            pass  # mutant\n")],
        "was not synced between the rename",
    ),
    "syncfs without the flush after it": (
        "syncfs",
        _FILES,
        [(_FLUSH, "            raise OSError(code, os.strerror(code), self.root_s)\n")],
        "was not synced between its last write",
    ),
}

# Mutants of the pool of removed files (spoold.store.pool), each caught
# when the adds reuse its files.
_TAKE = "            return self._kinds[kind].take(size)\n"
_CUT = "                os.ftruncate(fd, size)  # nothing of the old content past the new end\n"
POOL_MUTANTS: dict[str, tuple[str, str, list[tuple[str, str]], str]] = {
    "a claimed file written before a syncfs": (
        "syncfs",
        "pool.py",
        [
            (
                _TAKE,
                "            self.claim(1)\n"
                "            claimed = self._kinds[kind].claimed\n"
                "            return claimed.pop()[0] if claimed else None\n",
            )
        ],
        "was written before a syncfs that followed its claim",
    ),
    "a reused file not cut to its length": (
        "syncfs",
        "directory.py",
        [(_CUT, "                pass  # mutant\n")],
        "was not cut to its length",
    ),
}
POOLED = 4  # messages delivered (their files pooled) before the traced adds


def mutated_package(where: Path, mutant: str) -> Path:
    """A copy of the spoold package under ``where`` whose store module has
    ``mutant`` (of :data:`MUTANTS` or :data:`POOL_MUTANTS`) applied;
    returns the directory to put first on PYTHONPATH."""
    overlay = where / "overlay"
    shutil.copytree(
        PROJECT / "spoold", overlay / "spoold", ignore=shutil.ignore_patterns("__pycache__")
    )
    _mode, module, changes, _says = {**MUTANTS, **POOL_MUTANTS}[mutant]
    store = overlay / "spoold" / "store" / module
    source = store.read_text()
    for original, replacement in changes:
        assert source.count(original) == 1, f"the mutant {mutant!r} no longer applies to {module}"
        source = source.replace(original, replacement)
    store.write_text(source)
    return overlay


# ------------------------------------------------------------- running


_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "SPOOLD_CONFIG", "PYTHONPATH")


def _env(python_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env["PYTHONPATH"] = str(python_path)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _strace(log: Path, *command: str) -> list[str]:
    assert STRACE is not None
    return [
        STRACE, "-f", "-qq", "-tt", "-yy", "-s", "512", "-e", "signal=none",
        "-e", f"trace={TRACED}", "-o", str(log), *command,
    ]  # fmt: skip


def run_api_child(
    work: Path, python_path: Path, count: int, sync: str, pooled: int = 0, at_once: int = 1
) -> tuple[list[Call], Path]:
    """Trace the child that adds ``count`` messages (after delivering
    ``pooled`` ones), ``at_once`` at a time; its calls and spool."""
    spool = work / "spool"
    log = work / "api.strace"
    done = subprocess.run(
        _strace(
            log,
            sys.executable,
            str(CHILD),
            str(spool),
            str(count),
            sync,
            str(pooled),
            str(at_once),
        ),
        cwd=work,
        env=_env(python_path),
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    assert done.stdout.count(b"ADDED ") == count, done.stdout
    return parse_trace(log.read_text(errors="replace")), spool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_daemon_config(work: Path, port: int, hop: str, sync: str) -> Path:
    (work / "run").mkdir(mode=0o750)
    config = work / "spoold.toml"
    config.write_text(
        "[spool]\n"
        'dir = "spool"\n'
        'retry_intervals = ["1h"]\n'
        'flush_timeout = "1s"\n'
        f'sync = "{sync}"\n'
        "\n[control]\n"
        'socket = "run/ctl.sock"\n'
        "\n[log]\n"
        'format = "json"\n'
        "\n[relay]\n"
        'default_route = "smarthost"\n'
        'connect_timeout = "10m"\n'
        "\n[routes.smarthost]\n"
        f'next_hops = ["{hop}"]\n'
        'tls = "none"\n'
        "\n[smtp]\n"
        f'listen = ["127.0.0.1:{port}"]\n'
    )
    return config


class SmtpLine:
    """A blocking SMTP client on one connection, every read bounded."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline(4096)
            assert line.endswith(b"\r\n"), f"connection ended: {lines} {line!r}"
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "".join(lines)

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def submit_over_smtp(port: int, count: int) -> list[str]:
    client = SmtpLine(port)
    try:
        assert client.reply().startswith("220 ")
        assert client.command("EHLO client.example").startswith("250")
        ids = []
        for n in range(count):
            assert client.command("MAIL FROM:<sender@example.org>").startswith("250")
            assert client.command(f"RCPT TO:<r{n}@example.com>").startswith("250")
            assert client.command("DATA").startswith("354")
            client.sock.sendall(f"Subject: message {n}\r\n\r\nhello\r\n..dot\r\n.\r\n".encode())
            reply = client.reply()
            m = re.match(r"250 2\.0\.0 OK queued as (\S+)\r\n$", reply)
            assert m, reply
            ids.append(m.group(1))
        assert client.command("QUIT").startswith("221")
    finally:
        client.close()
    return ids


@contextmanager
def traced_daemon(work: Path, python_path: Path, sync: str) -> Iterator[tuple[int, Path]]:
    """``spoold run`` under strace with its SMTP listener on; yields the
    listener's port and the trace file once it accepts connections; stops
    the daemon (SIGTERM to its pid, from the spool's lock file) after."""
    port = _free_port()
    log = work / "daemon.strace"
    out = work / "daemon.out"
    # The next hop never greets: every attempt waits (its checkout is a
    # rename without fsync), so no other fsync of active/ mixes into the
    # trace and stands in for the one under test.
    with socket.socket() as silent_hop, out.open("wb") as output:
        silent_hop.bind(("127.0.0.1", 0))
        silent_hop.listen(64)
        hop = f"127.0.0.1:{silent_hop.getsockname()[1]}"
        config = _write_daemon_config(work, port, hop, sync)
        proc = subprocess.Popen(
            _strace(log, sys.executable, "-m", "spoold", "run", "--config", str(config)),
            cwd=work,
            env=_env(python_path),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + TIMEOUT
            while True:  # poll: the daemon is ready when its listener accepts
                assert proc.poll() is None, out.read_text(errors="replace")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the traced daemon never listened"
                    time.sleep(0.05)
            yield port, log
            pid = int((work / "spool" / "lock").read_text().strip())
            os.kill(pid, signal.SIGTERM)
            assert proc.wait(timeout=TIMEOUT) == 0, out.read_text(errors="replace")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this test started
                proc.wait(timeout=TIMEOUT)


def run_smtp_daemon(
    work: Path, python_path: Path, count: int, sync: str
) -> tuple[list[Call], Path]:
    with traced_daemon(work, python_path, sync) as (port, log):
        ids = submit_over_smtp(port, count)
    calls = parse_trace(log.read_text(errors="replace"))
    assert sorted(smtp_acks(calls)) == sorted(ids), "every 250 reply is in the trace"
    return calls, work / "spool"


# ------------------------------------------------------------- the tests


SYNC_MODES = ["fsync", "syncfs"]


@needs_strace
@pytest.mark.parametrize("sync", SYNC_MODES)
def test_every_smtp_250_comes_after_the_files_and_directories_are_synced(
    tmp_path: Path, sync: str
) -> None:
    calls, spool = run_smtp_daemon(tmp_path, PROJECT, SMTP_MESSAGES, sync)
    acks = smtp_acks(calls)
    assert len(acks) == SMTP_MESSAGES
    assert store_loaded_from(calls) and all(
        p.startswith(str(PROJECT)) for p in store_loaded_from(calls)
    )
    assert durability_problems(calls, spool, acks) == []


@needs_strace
@pytest.mark.parametrize("sync", SYNC_MODES)
def test_spool_add_returns_after_the_files_and_directories_are_synced(
    tmp_path: Path, sync: str
) -> None:
    calls, spool = run_api_child(tmp_path, PROJECT, API_MESSAGES, sync)
    acks = api_acks(calls)
    assert len(acks) == API_MESSAGES
    assert durability_problems(calls, spool, acks) == []


@needs_strace
def test_adds_made_at_once_return_after_their_files_are_synced(tmp_path: Path) -> None:
    """The group commit's batches hold several adds, whose files two
    threads write (spoold.store.sharing), made unnamed and then named
    (spoold.store.directory) where the filesystem can."""
    calls, spool = run_api_child(tmp_path, PROJECT, AT_ONCE_MESSAGES, "syncfs", at_once=16)
    acks = api_acks(calls)
    assert len(acks) == AT_ONCE_MESSAGES
    assert durability_problems(calls, spool, acks) == []
    if unnamed_files_work(tmp_path):
        root = os.path.realpath(spool)
        # Files were made unnamed and named, and by two threads between the
        # same two syncfs (one batch, written by the hop's thread and the
        # second writer): the checker above saw both at work.
        naming: list[set[int]] = [set()]
        for c in sorted(calls, key=lambda c: c.start):
            if c.name == "syncfs":
                naming.append(set())
            elif (
                c.name == "linkat"
                and c.ok
                and len(c.strings()) >= 2
                and _PROC_FD.match(c.strings()[0])
                and c.strings()[1].startswith(f"{root}/tmp/")
            ):
                naming[-1].add(c.pid)
        assert max(len(threads) for threads in naming) == 2


@needs_strace
@pytest.mark.parametrize("way", ["api", "smtp"])
@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_a_store_without_one_of_its_syncs_is_caught(tmp_path: Path, mutant: str, way: str) -> None:
    overlay = mutated_package(tmp_path, mutant)
    sync = MUTANTS[mutant][0]
    if way == "api":
        calls, spool = run_api_child(tmp_path, overlay, MUTANT_MESSAGES, sync)
        acks = api_acks(calls)
    else:
        calls, spool = run_smtp_daemon(tmp_path, overlay, MUTANT_MESSAGES, sync)
        acks = smtp_acks(calls)
    loaded = store_loaded_from(calls)
    assert loaded and all(p.startswith(str(overlay)) for p in loaded), loaded
    assert len(acks) == MUTANT_MESSAGES

    problems = durability_problems(calls, spool, acks)

    assert problems, f"the checker missed the mutant {mutant!r}"
    for mid in acks:  # every acknowledged message is reported, for the right reason
        mine = [p for p in problems if p.startswith(f"{mid}: ")]
        assert any(MUTANTS[mutant][3] in p for p in mine), (mid, problems)


def _reused(calls: list[Call], root: Path) -> int:
    """How many files the trace claims from the pool."""
    pool = f"{os.path.realpath(root)}/tmp/pool."
    return sum(
        1
        for c in calls
        if c.name.startswith("rename")
        and c.ok
        and c.strings()[:1]
        and c.strings()[0].startswith(pool)
    )


@needs_strace
def test_adds_into_files_of_the_pool_are_written_after_a_syncfs_and_cut(tmp_path: Path) -> None:
    calls, spool = run_api_child(tmp_path, PROJECT, API_MESSAGES, "syncfs", pooled=POOLED)
    acks = api_acks(calls)
    assert len(acks) == API_MESSAGES
    assert _reused(calls, spool) == 2 * POOLED
    assert durability_problems(calls, spool, acks) == []


@needs_strace
@pytest.mark.parametrize("mutant", list(POOL_MUTANTS))
def test_a_pool_that_writes_too_soon_or_leaves_old_bytes_is_caught(
    tmp_path: Path, mutant: str
) -> None:
    overlay = mutated_package(tmp_path, mutant)
    calls, spool = run_api_child(tmp_path, overlay, API_MESSAGES, "syncfs", pooled=POOLED)
    acks = api_acks(calls)
    assert len(acks) == API_MESSAGES
    problems = durability_problems(calls, spool, acks)
    assert problems, f"the checker missed the mutant {mutant!r}"
    assert all(POOL_MUTANTS[mutant][3] in p for p in problems), problems


def test_the_checker_reads_cut_calls_and_wants_each_step_in_order() -> None:
    """The checker on a hand-written trace: joined unfinished calls pass;
    the same trace with a step moved after the ack fails, naming it."""
    root = "/s"
    good = [
        '1 10:00:00.000001 openat(AT_FDCWD</w>, "/s/tmp/1.M.body.a", O_WRONLY|O_CREAT|O_EXCL, '
        "0640) = 5</s/tmp/1.M.body.a>",
        '1 10:00:00.000002 write(5</s/tmp/1.M.body.a>, "x", 1) = 1',
        "1 10:00:00.000003 fsync(5</s/tmp/1.M.body.a> <unfinished ...>",
        '2 10:00:00.000004 write(9<TCP:[1.2.3.4:25->1.2.3.4:9]>, "250 other", 9) = 9',
        "1 10:00:00.000005 <... fsync resumed>) = 0",
        '1 10:00:00.000006 openat(AT_FDCWD</w>, "/s/tmp/1.M.record.b", O_WRONLY|O_CREAT|O_EXCL, '
        "0640) = 5</s/tmp/1.M.record.b>",
        '1 10:00:00.000007 write(5</s/tmp/1.M.record.b>, "{}", 2) = 2',
        "1 10:00:00.000008 fdatasync(5</s/tmp/1.M.record.b>) = 0",
        '1 10:00:00.000009 rename("/s/tmp/1.M.body.a", "/s/data/M") = 0',
        '1 10:00:00.000010 rename("/s/tmp/1.M.record.b", "/s/active/M") = 0',
        "1 10:00:00.000011 fsync(6</s/data>) = 0",
        "1 10:00:00.000012 fsync(7</s/active>) = 0",
        '2 10:00:00.000013 sendto(9<TCP:[1.2.3.4:25->1.2.3.4:9]>, "250 2.0.0 OK queued as M\\r\\n"'
        ", 27, 0, NULL, 0) = 27",
    ]

    def check(lines: list[str]) -> list[str]:
        calls = parse_trace("\n".join(lines))
        return durability_problems(calls, Path(root), smtp_acks(calls))

    assert check(good) == []
    late_dir_fsync = [*good[:11], good[12], good[11]]
    assert check(late_dir_fsync) == [
        "M: directory active/ was not synced between the rename into it and the ack"
    ]
    fsync_fails = [line.replace("resumed>) = 0", "resumed>) = -1 EIO (I/O error)") for line in good]
    assert check(fsync_fails) == [
        "M: the body /s/tmp/1.M.body.a was not synced between its last write and its rename "
        "into data/"
    ]
    no_rename = [line for line in good if '"/s/data/M"' not in line]
    assert check(no_rename) == ["M: no rename from tmp/ into data/ before the ack"]
