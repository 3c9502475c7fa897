"""End to end over SMTP: smtp-source -> spoold daemon -> smtp-sink.

The same pipeline FACTS.md measured for Postfix on this kind of machine
(~860 msg/s for 10,000 x 4 KiB, 20 sessions). Starts a sink, a real
``spoold run`` on a temporary config, and ``smtp-source -s SESSIONS -m
COUNT -l SIZE``; the clock runs from the first connection of smtp-source to
the last message counted by the sink. Prints the median over ``--runs``.

Usage: ``python bench/smtp_e2e.py [--count 10000] [--sessions 20] [--runs 3]``
(needs ``smtp-sink`` and ``smtp-source``: Debian package ``postfix``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if not found:
        raise SystemExit(f"{name} not found: apt-get install postfix")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def sink_count(path: Path) -> int:
    text = path.read_bytes().decode("ascii", "replace").replace("\r", " ").split()
    for word in reversed(text):
        if word.startswith("mesg="):
            return int(word[5:])
    return 0


def one_run(count: int, sessions: int, size: int, jobs: int) -> float:
    work = Path(tempfile.mkdtemp(prefix="spoold-bench-e2e-"))
    os.chmod(work, 0o755)
    sink_port, smtp_port = free_port(), free_port()
    config = work / "spoold.toml"
    config.write_text(
        f"""
[spool]
dir = "spool"
max_concurrent_send_jobs = {jobs}
[control]
socket = "ctl.sock"
[smtp]
listen = ["127.0.0.1:{smtp_port}"]
[log]
format = "json"
level = "warning"
[relay]
default_route = "sink"
max_connections_per_hop = 20
[routes.sink]
next_hops = ["127.0.0.1:{sink_port}"]
tls = "none"
"""
    )
    sink_out = work / "sink.out"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(sink_out, "wb") as out:
            procs.append(
                subprocess.Popen(
                    [tool("smtp-sink"), "-c", "-u", "nobody", f"127.0.0.1:{sink_port}", "256"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        with open(work / "daemon.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "spoold.daemon.cli", "run", "--config", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        wait_port(sink_port)
        wait_port(smtp_port)
        start = time.perf_counter()
        subprocess.run(
            [
                tool("smtp-source"),
                "-s",
                str(sessions),
                "-m",
                str(count),
                "-l",
                str(size),
                "-f",
                "sender@example.org",
                "-t",
                "rcpt@example.com",
                f"127.0.0.1:{smtp_port}",
            ],
            check=True,
            timeout=600,
        )
        deadline = time.monotonic() + 600
        while sink_count(sink_out) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {sink_count(sink_out)} of {count} arrived")
            time.sleep(0.02)
        return count / (time.perf_counter() - start)
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--jobs", type=int, default=64, help="max_concurrent_send_jobs")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    rates = []
    for run in range(args.runs):
        rate = one_run(args.count, args.sessions, args.size, args.jobs)
        rates.append(rate)
        print(f"run {run + 1}: {rate:7.0f} msg/s", flush=True)
    print(
        f"median {statistics.median(rates):.0f} msg/s, smtp-source -> spoold -> smtp-sink, "
        f"{args.count} x {args.size} B, {args.sessions} sessions"
    )


if __name__ == "__main__":
    main()
