"""Cost of a large queue: open time, memory per message, status() time.

Fills a spool with ``--count`` messages in ``active`` whose ``send_at`` is a
day ahead (written directly, without fsync: set-up is not measured), then in
the same process measures:

* time for ``Spool.open`` (lock, recovery, reading and decoding every
  record, scheduling each);
* resident memory added by the open spool, per queued message;
* time for ``spool.status()`` (snapshots from memory) and ``counts()``.

Usage: ``python bench/spool_open.py [--count 100000] [--runs 3]``
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import anyio

from spoold.ids import new_id
from spoold.message import EnvelopeInfo, Message, SendAt, encode_record
from spoold.spool import DEFAULT_RETRY_INTERVALS, Spool
from spoold.testing import InMemoryRelay
from spoold.times import utcnow


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(root: Path, count: int) -> None:
    for d in ("active", "data", ".registry", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    later = utcnow() + timedelta(days=1)
    body = b"Subject: bench\r\n\r\n" + b"x" * 4000 + b"\r\n"
    for i in range(count):
        mid = new_id(now_us=1_700_000_000_000_000 + i)
        msg = Message(
            id=mid,
            parent_id=mid,
            spool_date=utcnow(),
            next_hop_choices=["127.0.0.1:25"],
            retry_intervals=list(DEFAULT_RETRY_INTERVALS),
            remaining_recipients=[f"rcpt{i}@example.com"],
            status=SendAt(at=later),
            envelope_info=EnvelopeInfo(
                sender="sender@example.org", recipients=[f"rcpt{i}@example.com"]
            ),
        )
        (root / "active" / mid).write_bytes(encode_record(msg))
        (root / "data" / mid).write_bytes(body)
        (root / ".registry" / mid).write_bytes(b"1\n")


async def measure(root: Path, count: int) -> tuple[float, float, float, float]:
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    async with Spool.open(root, relay=InMemoryRelay()) as spool:
        t_open = time.perf_counter() - t0
        gc.collect()
        per_msg = (rss_bytes() - before) / count
        t0 = time.perf_counter()
        listing = spool.status()
        t_status = time.perf_counter() - t0
        assert len(listing) == count
        del listing
        t0 = time.perf_counter()
        spool.counts()
        t_counts = time.perf_counter() - t0
    return t_open, per_msg, t_status, t_counts


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spoold-bench-open-"))
    try:
        t0 = time.perf_counter()
        fill(root, args.count)
        print(f"filled {args.count} messages in {time.perf_counter() - t0:.1f}s ({root})")
        results = [await measure(root, args.count) for _ in range(args.runs)]
        med = [statistics.median(r[i] for r in results) for i in range(4)]
        print(f"median of {args.runs} runs with {args.count} messages in active (send_at):")
        print(f"  open            {med[0]:8.2f} s  ({args.count / med[0]:,.0f} msg/s)")
        print(f"  memory          {med[1]:8.0f} bytes per queued message")
        print(f"  status()        {med[2]:8.2f} s")
        print(f"  counts()        {med[3] * 1000:8.1f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    anyio.run(main)
