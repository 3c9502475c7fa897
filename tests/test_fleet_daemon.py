"""Real daemons sharing one real redis-server. Two: each publishes its
heartbeat, ``spoold fleet status`` lists both; Redis stopped: the status
says so (exit 1) and mail is still taken; Redis back: shared again. Three
with one route's ``rate = "20/s"`` to one aiosmtpd next hop: 20/s at the
hop in all, not 20/s each."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio

from spoold import Client
from tests.daemon_helpers import DaemonFactory, DaemonProcess, cli, write_config
from tests.redis_server import RedisServer
from tests.smtp_server import SmtpTestServer

POLL = 0.05  # seconds between two looks at what another process changes


def _node_config(directory: Path, name: str, redis: RedisServer) -> Path:
    directory.mkdir()
    config = write_config(directory, next_hops=["127.0.0.1:9"])  # nobody answers: mail waits
    config.write_text(
        config.read_text()
        + f'\n[fleet]\nredis = "{redis.url}"\nnode = "{name}"\ntimeout = "300ms"\n'
    )
    return config


async def _status(daemon: DaemonProcess) -> tuple[int, dict[str, Any]]:
    done = await anyio.to_thread.run_sync(
        lambda: cli("--socket", str(daemon.socket), "fleet", "status", "--json")
    )
    return done.code, json.loads(done.out)


async def test_fleet_status_through_an_outage(
    tmp_path: Path, start_daemon: DaemonFactory, redis_server: RedisServer
) -> None:
    one = await start_daemon(_node_config(tmp_path / "one", "relay-1", redis_server))
    two = await start_daemon(_node_config(tmp_path / "two", "relay-2", redis_server))

    with anyio.fail_after(20):
        while True:
            code, found = await _status(one)
            if found["nodes"] and len(found["nodes"]) == 2:
                break
            await anyio.sleep(POLL)
    assert code == 0
    assert found["enabled"] is True and found["redis_up"] is True
    assert found["node"] == "relay-1" and found["redis"] == redis_server.url
    assert [n["node"] for n in found["nodes"]] == ["relay-1", "relay-2"]
    assert {"active", "frozen", "sending"} <= set(found["nodes"][1]["queues"])

    redis_server.stop()
    code, found = await _status(two)
    assert code == 1
    assert found["redis_up"] is False and found["nodes"] is None and found["outages"] == 1
    # Mail is still taken while Redis is down.
    client = Client(two.socket)
    ids = await anyio.to_thread.run_sync(
        lambda: client.submit("app@example.org", ["ops@example.com"], b"Subject: hi\r\n\r\nhi\r\n")
    )
    assert len(ids) == 1
    text = await anyio.to_thread.run_sync(
        lambda: cli("--socket", str(two.socket), "fleet", "status")
    )
    assert text.code == 1 and "DOWN" in text.out and "nodes: unknown" in text.out

    redis_server.start()  # empty, on the same port
    code, found = await _status(two)
    assert code == 0 and found["redis_up"] is True and found["outages"] == 1
    assert isinstance(found["nodes"], list)


MESSAGES_PER_NODE = 40


async def test_three_nodes_share_one_rate(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis_server: RedisServer,
    smtp_server: SmtpTestServer,
) -> None:
    # Each node alone would send 20/s (60/s together); the fleet sends 20/s.
    daemons = []
    for n in range(3):
        config = _node_config(tmp_path / f"n{n}", f"relay-{n}", redis_server)
        text = config.read_text().replace("127.0.0.1:9", smtp_server.hop)
        config.write_text(text.replace('tls = "none"\n', 'tls = "none"\nrate = "20/s"\n', 1))
        daemons.append(await start_daemon(config))

    def submit_all(daemon: DaemonProcess) -> None:
        client = Client(daemon.socket)
        for i in range(MESSAGES_PER_NODE):
            client.submit("app@example.org", [f"u{i}@example.com"], b"Subject: hi\r\n\r\nhi\r\n")

    async with anyio.create_task_group() as tg:
        for daemon in daemons:
            tg.start_soon(anyio.to_thread.run_sync, submit_all, daemon)
    submitted = time.monotonic()
    total = 3 * MESSAGES_PER_NODE
    with anyio.fail_after(30):
        while len(smtp_server.messages) < total:
            await anyio.sleep(POLL)
    # Measured once every node has its whole backlog: the arrivals at the hop.
    times = sorted(m.at for m in smtp_server.messages if m.at > submitted)
    # (about 110 of the 120 on an idle machine; a slow submission leaves fewer)
    assert len(times) >= 20, f"only {len(times)} messages after the submissions ended"
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 18.0 <= rate <= 22.0, f"{rate:.1f}/s at the next hop"


async def test_redis_stopped_mid_run_loses_nothing_and_sharing_resumes(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis_server: RedisServer,
    smtp_server: SmtpTestServer,
) -> None:
    daemons = []
    for n in range(2):
        config = _node_config(tmp_path / f"n{n}", f"relay-{n}", redis_server)
        text = config.read_text().replace("127.0.0.1:9", smtp_server.hop)
        config.write_text(text.replace('tls = "none"\n', 'tls = "none"\nrate = "20/s"\n', 1))
        daemons.append(await start_daemon(config))
    per_node = 30

    def submit_all(daemon: DaemonProcess) -> None:
        client = Client(daemon.socket)
        for i in range(per_node):
            rcpt = f"{daemon.socket.parent.parent.name}-u{i}@example.com"
            client.submit("app@example.org", [rcpt], b"Subject: hi\r\n\r\nhi\r\n")

    async with anyio.create_task_group() as tg:
        for daemon in daemons:
            tg.start_soon(anyio.to_thread.run_sync, submit_all, daemon)
        with anyio.fail_after(30):
            while len(smtp_server.messages) < 10:
                await anyio.sleep(POLL)
        redis_server.stop()  # mid-run: the nodes go on with their local rates
    with anyio.fail_after(30):
        while len(smtp_server.messages) < 2 * per_node:
            await anyio.sleep(POLL)
    for daemon in daemons:
        code, found = await _status(daemon)
        assert code == 1 and found["redis_up"] is False and found["outages"] == 1
    redis_server.start()
    for daemon in daemons:
        code, found = await _status(daemon)
        assert code == 0 and found["redis_up"] is True
    # Every message once: none lost, none sent twice.
    recipients = sorted(r for m in smtp_server.messages for r in m.rcpt_tos)
    assert recipients == sorted(f"n{n}-u{i}@example.com" for n in range(2) for i in range(per_node))
