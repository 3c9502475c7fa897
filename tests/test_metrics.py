"""Prometheus metrics: queue gauges and event counters over HTTP."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import anyio

from spoold.body import Body
from spoold.daemon.metrics import Metrics
from spoold.message import RoutedBatch, RoutedEnvelope
from spoold.spool import Spool
from spoold.testing import InMemoryRelay
from tests.support import WAIT_TIMEOUT, free_port, wait_until


async def scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    return await anyio.to_thread.run_sync(get)


async def test_metrics_count_queue_and_events(tmp_path: Path) -> None:
    port = free_port()
    batch = RoutedBatch(
        [RoutedEnvelope("s@example.org", ["r@example.com"], ["127.0.0.1:25"])],
        Body.from_content(b"Subject: m\r\n\r\nx\r\n"),
    )
    metrics = Metrics()
    expected = {
        'spoold_messages{state="frozen"} 1.0',
        'spoold_messages{state="active"} 0.0',
        'spoold_events_total{event="spooled"} 2.0',
        'spoold_events_total{event="delivered"} 1.0',
    }
    with anyio.fail_after(WAIT_TIMEOUT):
        async with (
            Spool.open(tmp_path, relay=InMemoryRelay(), ping_interval=0.05) as spool,
            anyio.create_task_group() as tg,
        ):
            await tg.start(metrics.serve, spool, f"127.0.0.1:{port}")
            async with spool.events() as events:
                await spool.add(batch, frozen=True)
                await spool.add(batch)
                async for event in events:
                    if event.kind == "delivered":
                        break

            # The metrics task sees the events in its own time.
            async def counted() -> bool:
                return expected <= set((await scrape(port)).splitlines())

            await wait_until(counted, lambda: f"{expected} in the metrics", interval=0.01)
            tg.cancel_scope.cancel()


def test_every_metric_is_documented() -> None:
    """docs/metrics.md lists every metric the daemon serves, and no other."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(spoold_\w+)` \|", doc, re.M))
    served = set()
    for family in Metrics().registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        served.add(family.name + suffix)
    assert documented == served
