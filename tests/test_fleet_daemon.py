"""Two real daemons sharing one real redis-server: each publishes its
heartbeat, ``spoold fleet status`` lists both; Redis stopped: the status
says so (exit 1) and mail is still taken; Redis back: shared again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio

from spoold import Client
from tests.daemon_helpers import DaemonFactory, DaemonProcess, cli, write_config
from tests.redis_server import RedisServer

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
