"""Run under strace by tests/test_durability.py: add messages through
``Spool.add`` and write ``ADDED <ids>`` on stdout (one ``write`` each) as
soon as each call returns, so the trace shows what came before the caller
was told its message is safe.

It imports :mod:`spoold` from wherever ``PYTHONPATH`` points (the test may
point it at a copy with a mutated store), never from this checkout on its
own. The relay holds every attempt, so the only writes are the adds and
the checkouts of the attempts.

With POOLED, that many messages are added and deleted first (untraced in
effect: no acknowledgement is written for them), so the adds find the pool
of removed files full and write into its files (spoold.store.pool). With
AT_ONCE, the COUNT adds are made by that many tasks at once (a group
commit's batches then hold several, written by two threads: the store's
measure of how slow files are to create is set aside, so they are shared
whatever the filesystem).

Usage: ``python durability_child.py SPOOL_DIR COUNT fsync|syncfs [POOLED [AT_ONCE]]``
"""

from __future__ import annotations

import os
import sys

import anyio

import spoold.store.commit
from spoold.body import Body
from spoold.message import RoutedBatch, RoutedEnvelope
from spoold.spool import Spool
from spoold.testing import InMemoryRelay


async def main(
    spool_dir: str, count: str, sync: str, pooled: str = "0", at_once: str = "1"
) -> None:
    if int(at_once) > 1:  # large batches shared from the first (see the docstring)
        spoold.store.commit.SLOW_ENTRY_SECONDS = 0.0
    relay = InMemoryRelay(gate=anyio.Event())  # never opened: attempts wait
    body = Body.from_content(b"Subject: durability\r\n\r\nhello\r\n.a dot line\r\n")
    if int(pooled):  # delivered: the files of each one go into the pool
        async with Spool.open(
            spool_dir, relay=InMemoryRelay(), flush_timeout=0, sync=sync
        ) as spool:  # type: ignore[arg-type]
            ids = []
            for n in range(int(pooled)):
                envelope = RoutedEnvelope("old@example.org", [f"o{n}@example.com"], ["127.0.0.1:9"])
                ids += await spool.add(RoutedBatch([envelope], body))
            for mid in ids:
                await spool.wait(mid, timeout=30)
    async with Spool.open(spool_dir, relay=relay, flush_timeout=0, sync=sync) as spool:  # type: ignore[arg-type]

        async def adder(first: int) -> None:
            for n in range(first, int(count), int(at_once)):
                envelope = RoutedEnvelope(
                    "sender@example.org", [f"r{n}@example.com"], ["127.0.0.1:9"]
                )
                ids = await spool.add(RoutedBatch([envelope], body))
                os.write(1, f"ADDED {' '.join(ids)}\n".encode())

        async with anyio.create_task_group() as tg:
            for first in range(int(at_once)):
                tg.start_soon(adder, first)


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:6])
