"""Real daemons sharing one real redis-server. Two: each publishes its
heartbeat, ``spoold fleet status`` lists both; Redis stopped: the status
says so (exit 1) and mail is still taken; Redis back: shared again.

Three with one route's ``rate = "20/s"`` and a backlog each (alone, each
would send 20/s: 60/s in all) to one aiosmtpd next hop: 20/s at the hop
in all, measured over 30 s from the arrival times (issue 23's
demonstration; about 40 s). Then Redis killed mid-run (SIGKILL): every
node goes on at its own rate and says Redis is down (status, metric);
Redis started again on its port: 20/s in all again within two seconds;
every message at the hop exactly once."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from spoold import Client
from spoold.body import Body
from spoold.message import SEND_NOW, Message
from spoold.ondisk import NewMessage
from tests.daemon_helpers import DaemonFactory, DaemonProcess, cli, prefill, write_config
from tests.factories import make_message
from tests.redis_server import INSTALL_HINT, RedisServer, redis_server_path
from tests.smtp_server import ReceivedMessage, SmtpTestServer
from tests.support import free_port

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

    await anyio.to_thread.run_sync(redis_server.start)  # empty, on the same port
    code, found = await _status(two)
    assert code == 0 and found["redis_up"] is True and found["outages"] == 1
    assert isinstance(found["nodes"], list)


async def test_a_node_stopped_leaves_the_listing_at_once(
    tmp_path: Path, start_daemon: DaemonFactory, redis_server: RedisServer
) -> None:
    one = await start_daemon(_node_config(tmp_path / "one", "relay-1", redis_server))
    two = await start_daemon(_node_config(tmp_path / "two", "relay-2", redis_server))
    with anyio.fail_after(20):
        while len((await _status(one))[1]["nodes"] or []) < 2:
            await anyio.sleep(POLL)
    two.send_signal(signal.SIGTERM)
    assert await two.wait_exit() == 0
    # at once, not when its heartbeat would have expired (30 s)
    code, found = await _status(one)
    assert code == 0 and [n["node"] for n in found["nodes"]] == ["relay-1"]


async def test_a_new_password_in_the_file_needs_a_restart(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    binary = redis_server_path()
    if binary is None:
        pytest.skip(INSTALL_HINT)
    server = RedisServer(tmp_path, binary, "--requirepass", "s3cret")
    server.start()
    try:
        password = tmp_path / "redis.pass"
        password.write_text("s3cret\n")
        password.chmod(0o600)
        config = _node_config(tmp_path / "one", "relay-1", server)
        config.write_text(config.read_text() + f'password_file = "{password}"\n')
        daemon = await start_daemon(config)
        code, found = await _status(daemon)
        assert code == 0 and found["redis_up"] is True
        # The password is rotated in the file: a reload says it takes a
        # restart (the running node keeps the one it started with).
        password.write_text("n3w\n")
        done = await anyio.to_thread.run_sync(lambda: cli("--socket", str(daemon.socket), "reload"))
        assert done.code == 0, done.err
        assert "needs a restart to change: fleet.password_file" in done.out
        code, found = await _status(daemon)
        assert code == 0 and found["redis_up"] is True
    finally:
        server.stop()


RATE = 20.0  # the route's rate = "20/s", for the whole fleet


def _queued(node: str, count: int, hop: str) -> list[NewMessage]:
    """``count`` messages of the route ``smarthost`` for node ``node``, each
    with a Message-ID that names it (``<NODE-N@fleet.example>``)."""

    def one(n: int) -> NewMessage:
        def build(mid: str, related: list[str]) -> Message:
            msg = make_message(mid, recipients=[f"u{n}@example.com"], next_hops=[hop])
            return msgspec.structs.replace(msg, route="smarthost")

        body = f"Message-ID: <{node}-{n}@fleet.example>\r\nSubject: {n}\r\n\r\nhi\r\n"
        return NewMessage(Body.from_content(body.encode()), SEND_NOW, build)

    return [one(n) for n in range(count)]


_MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)@fleet\.example>", re.MULTILINE | re.IGNORECASE)


def _message_id(m: ReceivedMessage) -> str:
    found = _MESSAGE_ID.search(m.content)
    assert found is not None, m.content[:200]
    return found.group(1).decode()


def _node_of(m: ReceivedMessage) -> str:
    return _message_id(m).rsplit("-", 1)[0]


async def _rated_nodes(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis: RedisServer,
    hop: str,
    per_node: int,
    *,
    metrics_port: int | None = None,
) -> list[DaemonProcess]:
    """Three nodes, each with ``per_node`` messages queued before it starts,
    started at once; the first serves metrics on ``metrics_port``."""
    configs = []
    for n in range(3):
        config = _node_config(tmp_path / f"n{n}", f"relay-{n}", redis)
        text = config.read_text().replace("127.0.0.1:9", hop)
        text = text.replace('tls = "none"\n', f'tls = "none"\nrate = "{RATE:.0f}/s"\n', 1)
        if n == 0 and metrics_port is not None:
            text += f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        config.write_text(text)
        configs.append(config)
    async with anyio.create_task_group() as tg:  # the three spools filled at once
        for n, config in enumerate(configs):
            tg.start_soon(prefill, config.parent / "spool", _queued(f"relay-{n}", per_node, hop))
    daemons = [await start_daemon(c, wait_ready=False) for c in configs]
    for daemon in daemons:
        await daemon.wait_ready()
    return daemons


async def _arrivals_until(server: SmtpTestServer, end: float, limit: float) -> None:
    """Wait (at most ``limit`` s) until a message arrives at ``end`` (the
    hop's clock) or later: every arrival before ``end`` is then in."""
    with anyio.fail_after(limit):
        while not server.messages or server.messages[-1].at < end:
            await anyio.sleep(POLL)


def _rate(server: SmtpTestServer, start: float, end: float) -> float:
    """Messages per second that arrived in [start, end) (the hop's clock)."""
    return sum(1 for m in server.messages if start <= m.at < end) / (end - start)


async def _wait_for_nodes(server: SmtpTestServer, nodes: int, limit: float) -> None:
    with anyio.fail_after(limit):
        while len({_node_of(m) for m in server.messages}) < nodes:
            await anyio.sleep(POLL)


WINDOW = 30.0  # seconds, as the issue asks
WARM_UP = 1.0


async def test_three_nodes_share_one_rate_over_thirty_seconds(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis_server: RedisServer,
    smtp_server: SmtpTestServer,
) -> None:
    # 300 each: any one alone would send 20/s for 15 s; together, at 60/s
    # they would be done in 15 s. The fleet sends 20/s in all: they still
    # have mail waiting when the window ends.
    per_node = 300
    await _rated_nodes(tmp_path, start_daemon, redis_server, smtp_server.hop, per_node)
    await _wait_for_nodes(smtp_server, 3, 30)
    first = {}
    for m in smtp_server.messages:
        first.setdefault(_node_of(m), m.at)
    start = max(first.values()) + WARM_UP  # every node sending, and a second more
    end = start + WINDOW
    await _arrivals_until(smtp_server, end, WINDOW + 30)
    rate = _rate(smtp_server, start, end)
    by_node = Counter(_node_of(m) for m in smtp_server.messages if m.at < end)
    assert 0.9 * RATE <= rate <= 1.1 * RATE, f"{rate:.2f}/s at the next hop ({dict(by_node)})"
    # each node still had a backlog: the rate was the fleet's, not a drained queue's
    assert all(n < per_node for n in by_node.values()), by_node
    # and each had its turn (tokens are booked, not raced for)
    in_window = Counter(_node_of(m) for m in smtp_server.messages if start <= m.at < end)
    total = sum(in_window.values())
    assert all(in_window[f"relay-{n}"] >= 0.2 * total for n in range(3)), in_window
    print(f"three nodes, {WINDOW:.0f} s at the hop: {rate:.2f}/s, by node {dict(by_node)}")


async def _scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    return await asyncio.to_thread(get)


async def _redis_up_metric(port: int, value: int, limit: float = 20) -> None:
    line = re.compile(rf"^spoold_fleet_redis_up {value}(\.0)?$", re.MULTILINE)
    with anyio.fail_after(limit):
        while not line.search(await _scrape(port)):
            await anyio.sleep(POLL)


async def _fleet_says(daemons: Sequence[DaemonProcess], up: bool, limit: float = 20) -> None:
    """Every node's ``fleet status`` says Redis is up (exit 0) or down (1)."""
    with anyio.fail_after(limit):
        for daemon in daemons:
            while True:
                code, found = await _status(daemon)
                if found["redis_up"] is up:
                    assert code == (0 if up else 1)
                    break
                await anyio.sleep(POLL)


async def test_redis_killed_mid_run_loses_nothing_and_sharing_resumes(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis_server: RedisServer,
    smtp_server: SmtpTestServer,
) -> None:
    per_node = 200
    metrics_port = free_port()
    daemons = await _rated_nodes(
        tmp_path,
        start_daemon,
        redis_server,
        smtp_server.hop,
        per_node,
        metrics_port=metrics_port,
    )
    await _wait_for_nodes(smtp_server, 3, 30)  # sharing the rate
    await _redis_up_metric(metrics_port, 1)

    await anyio.to_thread.run_sync(redis_server.kill)  # the hop's loop goes on meanwhile
    killed = time.monotonic()  # the hop's clock (the same process)
    # Each node goes on alone, at its own 20/s, and says Redis is down.
    await _fleet_says(daemons, up=False)
    await _redis_up_metric(metrics_port, 0)
    await _arrivals_until(smtp_server, killed + 3.5, 30)
    after_kill = Counter(_node_of(m) for m in smtp_server.messages if m.at >= killed)
    assert set(after_kill) == {"relay-0", "relay-1", "relay-2"}, after_kill
    alone = _rate(smtp_server, killed + 0.5, killed + 3.5)
    # each node at its own rate: more than the fleet's, at most all three's
    assert 1.2 * RATE < alone <= 3 * RATE * 1.1, f"{alone:.2f}/s while Redis was dead"
    for daemon in daemons:
        downs = [e for e in daemon.log_lines() if e.get("event") == "fleet redis down"]
        assert len(downs) == 1, downs  # logged once, not per attempt

    await anyio.to_thread.run_sync(redis_server.start)  # empty, on the same port
    back = time.monotonic()
    # Shared again within two seconds (a node asks again once a second at
    # most); then 20/s in all, measured over the next five.
    await _arrivals_until(smtp_server, back + 7.0, 30)
    shared = _rate(smtp_server, back + 2.0, back + 7.0)
    assert 0.9 * RATE <= shared <= 1.1 * RATE, f"{shared:.2f}/s after Redis came back"
    await _fleet_says(daemons, up=True)
    await _redis_up_metric(metrics_port, 1)
    print(f"Redis killed: {alone:.2f}/s at the hop; back: {shared:.2f}/s")

    # The rest without a rate (a reload), then: every message exactly once.
    for daemon in daemons:
        daemon.config.write_text(daemon.config.read_text().replace(f'rate = "{RATE:.0f}/s"\n', ""))
        done = await anyio.to_thread.run_sync(
            lambda d=daemon: cli("--socket", str(d.socket), "reload")
        )
        assert done.code == 0, done.err
    with anyio.fail_after(60):
        while len(smtp_server.messages) < 3 * per_node:
            await anyio.sleep(POLL)
    seen = Counter(_message_id(m) for m in smtp_server.messages)
    expected = {f"relay-{n}-{i}" for n in range(3) for i in range(per_node)}
    assert set(seen) == expected
    assert [mid for mid, times in seen.items() if times > 1] == []
