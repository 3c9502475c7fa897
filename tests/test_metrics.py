"""Prometheus metrics: queue gauges and event counters over HTTP."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import anyio
from prometheus_client.parser import text_string_to_metric_families

from spoold import Client
from spoold.body import Body
from spoold.daemon.metrics import Metrics
from spoold.message import RoutedBatch, RoutedEnvelope
from spoold.spool import Spool
from spoold.testing import InMemoryRelay
from tests.daemon_helpers import DaemonFactory, write_config
from tests.smtp_server import Reply, SmtpTestServer
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


# -----------------------------------------------------------------------------
# The daemon's metrics, scraped during an end-to-end run and checked
# against what happened: messages submitted, delivered, refused, deferred,
# connections held, a refused and an applied reload.


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape_samples(port: int) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    text = await anyio.to_thread.run_sync(get)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


async def test_metrics_follow_an_end_to_end_run(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    port = free_port()
    config = write_config(tmp_path, next_hops=[smtp_server.hop])
    good_config = config.read_text()
    config.write_text(good_config + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    started = time.time()
    daemon = await start_daemon(config)
    client = Client(daemon.socket, timeout=WAIT_TIMEOUT)
    hop = smtp_server.hop

    before = await scrape_samples(port)
    assert before[key("spoold_last_reload_success")] == 1.0
    assert before[key("spoold_last_reload_timestamp_seconds")] == 0.0
    assert before[key("spoold_spooled_messages_total")] == 0.0

    smtp_server.behaviour.rcpt["gone@example.com"] = Reply("550 5.1.1 no such user")
    smtp_server.behaviour.rcpt["later@example.com"] = Reply("451 4.3.0 try later")
    rcpts = ["a@example.com", "b@example.com", "c@example.com"]
    rcpts += ["gone@example.com", "later@example.com"]
    ids = {}
    for rcpt in rcpts:
        (ids[rcpt],) = await anyio.to_thread.run_sync(
            lambda r=rcpt: client.submit("app@example.org", [r], b"Subject: m\n\nx\n")
        )
    for rcpt in rcpts[:4]:  # delivered, delivered, delivered, frozen
        await anyio.to_thread.run_sync(lambda r=rcpt: client.wait(ids[r], timeout=WAIT_TIMEOUT))

    expected = {
        key("spoold_spooled_messages_total"): 5.0,
        key("spoold_relay_attempts_total", next_hop=hop, result="delivered"): 3.0,
        key("spoold_relay_attempts_total", next_hop=hop, result="refused"): 1.0,
        key("spoold_relay_attempts_total", next_hop=hop, result="deferred"): 1.0,
        key("spoold_relay_attempt_duration_seconds_count", next_hop=hop): 5.0,
        key("spoold_delivery_latency_seconds_count", next_hop=hop): 3.0,
        key("spoold_events_total", event="delivered"): 3.0,
        key("spoold_events_total", event="frozen"): 1.0,
        key("spoold_events_total", event="delayed"): 1.0,
        key("spoold_messages", state="active"): 1.0,
        key("spoold_messages", state="frozen"): 1.0,
        key("spoold_relay_connections", state="busy"): 0.0,
    }
    samples: Samples = {}

    async def caught_up() -> bool:
        nonlocal samples
        samples = await scrape_samples(port)
        return all(samples.get(k) == v for k, v in expected.items())

    await wait_until(
        caught_up,
        lambda: f"{expected}, got { {k: samples.get(k) for k in expected} }",
        interval=0.1,
    )
    elapsed = time.time() - started
    # Ages are those of real messages: more than nothing, less than the test.
    for queue in ("active", "frozen"):
        age = samples[key("spoold_oldest_message_age_seconds", queue=queue)]
        assert 0 < age <= elapsed + 1, (queue, age, elapsed)
    latency_sum = samples[key("spoold_delivery_latency_seconds_sum", next_hop=hop)]
    assert 0 < latency_sum <= 3 * elapsed

    # The cache holds, idle, the connections the server still has open.
    async def same_connections() -> bool:
        idle = (await scrape_samples(port))[key("spoold_relay_connections", state="idle")]
        return idle == smtp_server.open_connections > 0

    await wait_until(same_connections, "the cache's idle connections", interval=0.1)
    free = samples[key("spoold_spool_free_bytes")]
    st = os.statvfs(daemon.spool_dir)
    assert abs(free - st.f_bavail * st.f_frsize) < 256 * 1024 * 1024  # others write too

    # A refused reload, then an applied one.
    config.write_text(config.read_text() + "\n[nonsense]\n")
    before_reload = time.time()
    result = await anyio.to_thread.run_sync(client.reload)
    assert result["applied"] is False
    samples = await scrape_samples(port)
    assert samples[key("spoold_last_reload_success")] == 0.0
    assert before_reload - 1 <= samples[key("spoold_last_reload_timestamp_seconds")]
    assert samples[key("spoold_last_reload_timestamp_seconds")] <= time.time() + 1
    config.write_text(good_config + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    assert (await anyio.to_thread.run_sync(client.reload))["applied"] is True
    samples = await scrape_samples(port)
    assert samples[key("spoold_last_reload_success")] == 1.0
