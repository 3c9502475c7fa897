"""Durable enqueue rate of the store against the disk's own limit.

For 4 KiB bodies, at concurrency 1 and 16, measures in one run:

* ``plain``: a bare loop of write 4 KiB + fsync + rename + fsync(dir), one
  file per message, each in a worker thread (what the disk allows);
* ``store``: ``OnDiskSpool.add`` of one message (body + record, both
  fsynced, renamed, directories fsynced), i.e. what a submitter waits for.

Each figure is the median of ``--runs`` runs; the ratio store/plain says how
close the store is to the disk's limit. Usage::

    python bench/store_enqueue.py [--count 2000] [--runs 3] [--dir /path]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from spoold.body import Body
from spoold.message import SEND_NOW, EnvelopeInfo, Message
from spoold.ondisk import NewMessage, OnDiskSpool
from spoold.times import utcnow

BODY = Body.from_content((b"x" * 78 + b"\r\n") * 51 + b"x" * 14 + b"\r\n")  # 4096 bytes


def build(mid: str, related: list[str]) -> Message:
    return Message(
        id=mid,
        parent_id=mid,
        spool_date=utcnow(),
        next_hop_choices=["127.0.0.1:25"],
        remaining_recipients=["rcpt@example.com"],
        envelope_info=EnvelopeInfo(sender="s@example.org", recipients=["rcpt@example.com"]),
    )


async def run_concurrently(count: int, concurrency: int, one: object) -> float:
    per_task = count // concurrency
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for t in range(concurrency):
            tg.start_soon(one, t, per_task)  # type: ignore[arg-type]
    return per_task * concurrency / (time.perf_counter() - start)


async def plain(root: Path, count: int, concurrency: int) -> float:
    root.mkdir()
    (root / "tmp").mkdir()
    (root / "q").mkdir()
    data = BODY.wire
    limiter = anyio.CapacityLimiter(concurrency)

    def write(name: str) -> None:
        tmp = f"{root}/tmp/{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, f"{root}/q/{name}")
        dfd = os.open(f"{root}/q", os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)

    async def one(task: int, n: int) -> None:
        for i in range(n):
            await anyio.to_thread.run_sync(write, f"{task}-{i}", limiter=limiter)

    return await run_concurrently(count, concurrency, one)


async def store(root: Path, count: int, concurrency: int) -> float:
    od, _ = await OnDiskSpool.open(root, max_threads=max(concurrency, 1))
    new = NewMessage(BODY, SEND_NOW, build)

    async def one(task: int, n: int) -> None:
        for _ in range(n):
            await od.add([new])

    try:
        return await run_concurrently(count, concurrency, one)
    finally:
        await od.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="spoold-bench-", dir=args.dir))
    print(f"{args.count} messages x 4 KiB, median of {args.runs} runs, in {base}")
    try:
        for concurrency in (1, 16):
            results: dict[str, list[float]] = {"plain": [], "store": []}
            for run in range(args.runs):
                for name, fn in (("plain", plain), ("store", store)):
                    target = base / f"{name}-{concurrency}-{run}"
                    results[name].append(await fn(target, args.count, concurrency))
                    shutil.rmtree(target)
            med = {k: statistics.median(v) for k, v in results.items()}
            print(
                f"concurrency {concurrency:2d}: plain {med['plain']:7.0f}/s  "
                f"store {med['store']:7.0f}/s  ratio {med['store'] / med['plain']:.2f}"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    anyio.run(main)
