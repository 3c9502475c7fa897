"""Cost of the suppression list (issue 22, point 4), on the paths that use it.

For lists of ``--sizes`` entries (made up: 550 5.1.1 bounces), in one
process:

* the RCPT path of an ingest worker: :meth:`Suppressions.stale` (one
  ``stat`` of the file) and :meth:`Suppressions.find` (the lookup), per call;
* a worker reading the list again after the daemon changed it
  (:meth:`Suppressions.refresh`);
* the daemon writing it: the whole list (one entry added), and 50 bounces
  at once (written together);
* the file's size.

Usage: ``python bench/suppression.py [--sizes 1000,10000,100000]``
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import timeit
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio

from spoold.suppression import SUPPRESSION_FILE, Suppression, Suppressions, suppression_for

MONTH = timedelta(days=30)


def bounce(address: str, now: datetime) -> Suppression:
    return suppression_for(
        address, now=now, span=MONTH, reason="550 5.1.1 no such user", source="bounce"
    )


async def measure(size: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="spoold-bench-suppress-"))
    try:
        (root / "tmp").mkdir()
        now = datetime.now(UTC)
        owner = Suppressions(root, owner=True)
        reader = Suppressions(root, owner=False)
        first = [bounce(f"user{i}@example{i % 100}.com", now) for i in range(size)]
        await owner.add(first, now=now, max_entries=size + 100, extend_only=True)
        t0 = time.perf_counter()
        await reader.refresh()
        refresh = time.perf_counter() - t0
        calls = 100_000
        stale = timeit.timeit(reader.stale, number=calls) / calls
        find = timeit.timeit(lambda: reader.find("User7@example7.com", now), number=calls) / calls
        t0 = time.perf_counter()
        await owner.add(
            [bounce("one@x.org", now)], now=now, max_entries=size + 100, extend_only=True
        )
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(
                    lambda i=i: owner.add(
                        [bounce(f"b{i}@x.org", now)],
                        now=now,
                        max_entries=size + 100,
                        extend_only=True,
                    )
                )
        fifty = time.perf_counter() - t0
        return {
            "stale_us": stale * 1e6,
            "find_us": find * 1e6,
            "refresh_ms": refresh * 1e3,
            "write_one_ms": one * 1e3,
            "write_50_at_once_ms": fifty * 1e3,
            "file_mb": (root / SUPPRESSION_FILE).stat().st_size / 1e6,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    args = p.parse_args()
    print(
        "| entries | stat at RCPT (us) | lookup (us) | worker re-read (ms) "
        "| daemon write, 1 change (ms) | 50 bounces at once (ms) | file (MB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        r = await measure(size)
        print(
            f"| {size:,} | {r['stale_us']:.1f} | {r['find_us']:.2f} | {r['refresh_ms']:.0f} "
            f"| {r['write_one_ms']:.0f} | {r['write_50_at_once_ms']:.0f} | {r['file_mb']:.1f} |"
        )


if __name__ == "__main__":
    anyio.run(main)
