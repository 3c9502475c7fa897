"""Throughput from the Python API to Postfix's smtp-sink, through the spool.

``--count`` messages of 4 KiB are added with ``Spool.add`` (durably, from
``--submitters`` concurrent tasks) and relayed to one next hop, a local
``smtp-sink``; the clock runs from the first add to the last ``delivered``
event. Prints the median rate over ``--runs`` runs and the sessions the sink
counted (so connection reuse is visible).

Usage: ``python bench/relay_sink.py [--count 10000] [--runs 3]``
(needs ``smtp-sink``: Debian package ``postfix``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import anyio
import structlog

from spoold import (
    Body,
    ConnectionCache,
    RoutedBatch,
    RoutedEnvelope,
    RouteSettings,
    SmtpRelay,
    Spool,
)

BODY = Body.from_content(
    b"Subject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * 50 + b"x" * 58 + b"\r\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sink_sessions_open(port: int) -> int:
    """Connections to ``port`` whose sink end is still open (ESTABLISHED or
    CLOSE_WAIT in /proc/net/tcp). smtp-sink writes its counters before it
    closes a session, so at 0 the counters are final."""
    suffix = f":{port:04X}"
    with open("/proc/net/tcp") as fh:
        next(fh)
        return sum(
            1
            for line in fh
            if (fields := line.split())[1].endswith(suffix) and fields[3] in ("01", "08")
        )


def sink_binary() -> str:
    found = shutil.which("smtp-sink") or shutil.which("smtp-sink", path="/usr/sbin")
    if not found:
        raise SystemExit("smtp-sink not found: apt-get install postfix")
    return found


async def one_run(count: int, submitters: int, jobs: int, per_hop: int) -> tuple[float, str]:
    port = free_port()
    spool_dir = Path(tempfile.mkdtemp(prefix="spoold-bench-relay-"))
    # The -c counters go to a file: smtp-sink keeps writing them, and a pipe
    # nobody reads fills up and stalls every session.
    sink_out = spool_dir.with_suffix(".sink")
    with open(sink_out, "wb") as out:
        sink = subprocess.Popen(
            [sink_binary(), "-c", "-u", "nobody", f"127.0.0.1:{port}", "256"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    break
            except OSError:
                await anyio.sleep(0.05)
        relay = SmtpRelay(RouteSettings(tls="none"), ConnectionCache(max_per_hop=per_hop))
        envelope = RoutedEnvelope("sender@example.org", ["rcpt@example.com"], [f"127.0.0.1:{port}"])
        batch = RoutedBatch([envelope], BODY)
        async with (
            Spool.open(spool_dir, relay=relay, max_concurrent_send_jobs=jobs) as spool,
            spool.events(max_buffer=4 * count) as stream,
        ):
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:

                async def submit(n: int) -> None:
                    for _ in range(n):
                        await spool.add(batch)

                for _ in range(submitters):
                    tg.start_soon(submit, count // submitters)
            delivered = 0
            async for event in stream:
                if event.kind == "delivered":
                    delivered += 1
                    if delivered == count // submitters * submitters:
                        break
            rate = delivered / (time.perf_counter() - start)
        await relay.close_and_flush()
        # The relay has sent QUIT; the sink counts a session when it ends it.
        with anyio.fail_after(10):
            while sink_sessions_open(port):
                await anyio.sleep(0.02)
    finally:
        sink.terminate()
        sink.wait(timeout=10)
        shutil.rmtree(spool_dir, ignore_errors=True)
    text = sink_out.read_bytes().decode("ascii", "replace").replace("\r", "\n").split()
    sink_out.unlink()
    counters = " ".join(text[-3:]) if text else "?"
    return rate, counters


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--submitters", type=int, default=20)
    p.add_argument("--jobs", type=int, default=64, help="max_concurrent_send_jobs")
    p.add_argument("--per-hop", type=int, default=10, help="connections per hop")
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rates = []
    for run in range(args.runs):
        rate, counters = await one_run(args.count, args.submitters, args.jobs, args.per_hop)
        rates.append(rate)
        print(f"run {run + 1}: {rate:7.0f} msg/s   sink: {counters}")
    print(
        f"median {statistics.median(rates):.0f} msg/s for {args.count} x 4 KiB "
        f"({args.submitters} submitters, {args.jobs} send jobs, {args.per_hop} connections)"
    )


if __name__ == "__main__":
    anyio.run(main)
