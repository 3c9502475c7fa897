"""The listing of a large queue: ``spoold status`` of ``--count`` messages.

Fills a spool with ``--count`` delayed messages (as ``queue_scale.py`` does;
``--dir`` keeps it for the next run), starts ``spoold run`` on it, then runs
``spoold status`` as an operator would (a new process each, its output read
to the end) in the formats ``table``, ``json`` and ``id``. For each: the wall
time, the CLI's peak resident memory (``ru_maxrss`` of the child), the
daemon's CPU time for the listing, and the latency of a control ``ping``
sent every 10 ms on the admin socket meanwhile (max and p99).

Targets (issue 20, point 5): ``status`` of 100,000 messages under 5 s and
100 MB in the CLI, ``--format json`` the same, ping under 50 ms meanwhile.

Usage: ``python bench/listing.py [--count 100000] [--dir PATH]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from queue_scale import SPOOLD, _proc_cpu, filled_spool, run_daemon  # bench/ is on the path

_PING = b'{"v": 1, "op": "ping"}\n'


def _ping_once(path: str) -> float:
    t0 = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(_PING)
        reply = s.makefile("rb").readline()
    assert b"pong" in reply, reply
    return time.perf_counter() - t0


def _pinger(path: str, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        out.append(_ping_once(path))
        stop.wait(0.01)


def _listing(cfg: Path, sock: Path, daemon_pid: int, fmt: str, count: int) -> dict[str, float]:
    pings: list[float] = []
    stop = threading.Event()
    pinger = threading.Thread(target=_pinger, args=(str(sock), stop, pings))
    cpu0 = _proc_cpu(daemon_pid)
    pinger.start()
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(
            [SPOOLD, "--config", str(cfg), "status", "--format", fmt],
            stdout=subprocess.PIPE,
            env={**os.environ, "COLUMNS": "160"},
        )
        assert proc.stdout is not None
        lines = 0
        while chunk := proc.stdout.read(1 << 16):
            lines += chunk.count(b"\n")
        _, code, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
        proc.returncode = os.waitstatus_to_exitcode(code)
    finally:
        wall = time.perf_counter() - t0
        stop.set()
        pinger.join()
    assert proc.returncode == 0, (fmt, proc.returncode)
    cpu = _proc_cpu(daemon_pid) - cpu0
    assert lines >= count, (fmt, lines, count)
    pings.sort()
    return {
        "wall s": wall,
        # ru_maxrss of the children is the largest so far: only a new peak shows
        "cli peak rss MB": usage.ru_maxrss / 1024,
        "daemon cpu s": cpu,
        "pings": len(pings),
        "ping max ms": pings[-1] * 1000,
        "ping p99 ms": pings[int(len(pings) * 0.99) - 1 if len(pings) > 1 else 0] * 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--dir", type=Path, help="spool to fill and keep (reused by the next run)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spoold-bench-listing-"))
    root = args.dir or work / "spool"
    results: dict[str, dict[str, float]] = {}
    try:
        filled_spool(root, args.count)

        def then(cfg: Path) -> dict[str, float]:
            sock = cfg.parent / "control.sock"
            pid = _daemon_pid(sock)
            idle = [_ping_once(str(sock)) for _ in range(20)]
            print(f"ping, idle daemon: max {max(idle) * 1000:.1f} ms")
            for fmt in ("id", "json", "table"):
                results[fmt] = _listing(cfg, sock, pid, fmt, args.count)
                print(fmt, {k: round(v, 2) for k, v in results[fmt].items()}, flush=True)
            return {}

        run_daemon(work, root, then)
        print(f"\n{args.count} messages in active (send_at), one run each:")
        print("| format | wall s | CLI peak RSS MB | daemon CPU s | pings | ping max ms | p99 ms |")
        print("|---|---|---|---|---|---|---|")
        for fmt, r in results.items():
            print(
                f"| `{fmt}` | {r['wall s']:.2f} | {r['cli peak rss MB']:.0f} | "
                f"{r['daemon cpu s']:.2f} | {r['pings']:.0f} | {r['ping max ms']:.1f} | "
                f"{r['ping p99 ms']:.1f} |"
            )
        print(f"load average: {os.getloadavg()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _daemon_pid(sock: Path) -> int:
    """The pid of the process listening on ``sock`` (SO_PEERCRED of a connection)."""
    import struct

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _, _ = struct.unpack("3i", creds)
    return pid


if __name__ == "__main__":
    sys.exit(main())
