"""Three real daemons sharing one real redis-server, a route with
``max_connections = 4`` to one aiosmtpd next hop: the hop never sees more
than 4 connections at once, though each node alone would open 4; and a node
killed with ``kill -9`` while holding slots gives them back within its
lease, after which the others reach 4 connections again; Redis stopped,
each node delivers on its own 4 (nothing waits for Redis), and once it is
back the fleet shares the 4 again."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import anyio
import redis.asyncio

from spoold import Client
from spoold.fleet import KEY_PREFIX
from tests.daemon_helpers import DaemonFactory, DaemonProcess, cli, write_config
from tests.redis_server import RedisServer
from tests.smtp_server import Reply, SmtpTestServer
from tests.support import free_port

POLL = 0.05  # seconds between two looks at what another process changes
SLOTS = f"{KEY_PREFIX}slots:smarthost"  # the route's slot holders in Redis


def _node_config(
    directory: Path, name: str, redis: RedisServer, hop: str, metrics_port: int | None = None
) -> Path:
    directory.mkdir()
    # 8 send jobs: each node alone would open the route's 4 connections.
    config = write_config(directory, next_hops=[hop], max_concurrent_send_jobs=8)
    text = config.read_text().replace('tls = "none"\n', 'tls = "none"\nmax_connections = 4\n', 1)
    config.write_text(
        text + f'\n[fleet]\nredis = "{redis.url}"\nnode = "{name}"\n'
        'timeout = "300ms"\nlease = "2s"\n'
        + ("" if metrics_port is None else f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    )
    return config


async def _three_nodes(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis: RedisServer,
    hop: SmtpTestServer,
    metrics_ports: Sequence[int | None] = (None, None, None),
) -> list[DaemonProcess]:
    return [
        await start_daemon(
            _node_config(tmp_path / f"n{n}", f"relay-{n}", redis, hop.hop, metrics_ports[n])
        )
        for n in range(3)
    ]


def _slot_refusals(port: int) -> float:
    """The node's ``spoold_fleet_slot_refusals_total`` (its metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("spoold_fleet_slot_refusals_total"):
            return float(line.split()[-1])
    return 0.0


def _submit(daemon: DaemonProcess, count: int, batch: str = "") -> None:
    client = Client(daemon.socket)
    node = daemon.socket.parent.parent.name
    for i in range(count):
        rcpt = f"{node}{batch}-u{i}@example.com"
        client.submit("app@example.org", [rcpt], b"Subject: hi\r\n\r\nhi\r\n")


async def test_three_nodes_share_four_connections(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis_server: RedisServer,
    smtp_server: SmtpTestServer,
) -> None:
    # Each answer to the final "." a little late: the connections overlap.
    smtp_server.behaviour.data_end = Reply(delay=0.05)
    daemons = await _three_nodes(tmp_path, start_daemon, redis_server, smtp_server)
    per_node = 50
    async with anyio.create_task_group() as tg:
        for daemon in daemons:
            tg.start_soon(anyio.to_thread.run_sync, _submit, daemon, per_node)
    with anyio.fail_after(90):
        while smtp_server.transactions < 3 * per_node:
            await anyio.sleep(POLL)
    assert len({m.rcpt_tos[0] for m in smtp_server.messages}) == 3 * per_node
    assert smtp_server.max_open_connections <= 4, smtp_server.max_open_connections
    # (without the fleet's slots the hop sees 12 here: 4 per node)
    # The slots were used, and every one given back.
    assert smtp_server.max_open_connections >= 2
    async with redis.asyncio.Redis.from_url(redis_server.url) as r:
        with anyio.fail_after(10):
            while await r.zcard(SLOTS):
                await anyio.sleep(POLL)
    # A node stops cleanly (its renewing task ends with it).
    first = daemons[0]
    assert first.proc is not None
    first.send_signal(signal.SIGTERM)
    with anyio.fail_after(20):
        assert await first.proc.wait() == 0


async def test_a_killed_node_gives_its_slots_back_within_its_lease(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis_server: RedisServer,
    smtp_server: SmtpTestServer,
) -> None:
    lease = 2.0
    answer = asyncio.Event()  # every final "." waits for it: slots stay held
    smtp_server.behaviour.data_end = Reply(gate=answer)
    ports = [free_port(), free_port()]
    dead, *alive = await _three_nodes(
        tmp_path, start_daemon, redis_server, smtp_server, (None, *ports)
    )
    r = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    try:

        async def holders(node: str) -> list[str]:
            return [h for h in await r.zrange(SLOTS, 0, -1) if h.startswith(f"{node}:")]

        await anyio.to_thread.run_sync(_submit, dead, 6)
        with anyio.fail_after(30):
            while len(await holders("relay-0")) < 4 or smtp_server.open_connections < 4:
                await anyio.sleep(POLL)
        status = await anyio.to_thread.run_sync(
            lambda: cli("--socket", str(dead.socket), "fleet", "status", "--json")
        )
        assert status.code == 0 and json.loads(status.out)["slots"] == {"smarthost": 4}
        # The fleet is full: the other nodes' mail waits for a slot.
        async with anyio.create_task_group() as tg:
            for daemon in alive:
                tg.start_soon(anyio.to_thread.run_sync, _submit, daemon, 5)
        for port in ports:  # each has asked and been refused
            with anyio.fail_after(30):
                while await anyio.to_thread.run_sync(_slot_refusals, port) == 0:
                    await anyio.sleep(POLL)
        assert await holders("relay-1") == [] and await holders("relay-2") == []

        await dead.kill()  # SIGKILL: no goodbye, its leases simply stop being renewed
        # Its leases end within one lease, on the clock that decides (Redis's).
        seconds, micros = await r.time()
        redis_now_ms = seconds * 1000 + micros // 1000
        ends = [
            end
            for h, end in await r.zrange(SLOTS, 0, -1, withscores=True)
            if h.startswith("relay-0:")
        ]
        assert len(ends) == 4
        assert all(end <= redis_now_ms + lease * 1000 for end in ends), (ends, redis_now_ms)
        # And a node asking for the route then sweeps them out (however
        # slow this machine is, that comes: the bound is generous).
        with anyio.fail_after(lease + 30):
            while await holders("relay-0"):
                await anyio.sleep(POLL)
        # The others take the four slots (and the hop sees four connections).
        with anyio.fail_after(20):
            while smtp_server.open_connections < 4:
                await anyio.sleep(POLL)
        theirs = await holders("relay-1") + await holders("relay-2")
        assert len(theirs) == 4
        answer.set()
        with anyio.fail_after(60):
            while smtp_server.transactions < 10:
                await anyio.sleep(POLL)
        assert smtp_server.max_open_connections == 4
    finally:
        answer.set()
        await r.aclose()


async def test_redis_stopped_the_nodes_deliver_alone_and_share_again_when_it_is_back(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis_server: RedisServer,
    smtp_server: SmtpTestServer,
) -> None:
    smtp_server.behaviour.data_end = Reply(delay=0.05)
    daemons = [
        await start_daemon(
            _node_config(tmp_path / f"n{n}", f"relay-{n}", redis_server, smtp_server.hop)
        )
        for n in range(2)
    ]

    async def send(count: int, batch: str) -> None:
        async with anyio.create_task_group() as tg:
            for daemon in daemons:
                tg.start_soon(anyio.to_thread.run_sync, _submit, daemon, count, batch)

    async def redis_up_everywhere(up: bool) -> None:
        for daemon in daemons:
            with anyio.fail_after(20):
                while True:
                    done = await anyio.to_thread.run_sync(
                        lambda d=daemon: cli("--socket", str(d.socket), "fleet", "status", "--json")
                    )
                    if json.loads(done.out)["redis_up"] is up:
                        break
                    await anyio.sleep(POLL)

    redis_server.stop()
    await redis_up_everywhere(False)
    await send(20, "-down")
    with anyio.fail_after(60):  # nothing waits for Redis: every message goes
        while smtp_server.transactions < 40:
            await anyio.sleep(POLL)
    # Alone, each node keeps its own 4 (never more).
    assert smtp_server.max_open_connections <= 8

    redis_server.start()  # empty, on the same port
    await redis_up_everywhere(True)
    smtp_server.max_open_connections = smtp_server.open_connections
    await send(30, "-back")
    with anyio.fail_after(60):
        while smtp_server.transactions < 100:
            await anyio.sleep(POLL)
    assert smtp_server.max_open_connections <= 4, smtp_server.max_open_connections


async def test_a_backlog_at_start_asks_the_fleet_for_its_slots(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis_server: RedisServer,
    smtp_server: SmtpTestServer,
) -> None:
    """Mail queued when a node starts is sent under the fleet's limits
    from the first message: the node joins the fleet before its first
    attempt, not after (then a restarted node sent its whole backlog on
    its own 4 connections while the others held the fleet's 4)."""
    port = free_port()
    config = _node_config(tmp_path / "n0", "relay-0", redis_server, smtp_server.hop, port)
    others = [f"elsewhere:{n}" for n in range(4)]  # another node's four slots
    async with redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True) as r:
        seconds, micros = await r.time()
        now_ms = seconds * 1000 + micros // 1000
        await r.zadd(SLOTS, {holder: now_ms + 3_600_000 for holder in others})
        daemon = await start_daemon(config)
        with anyio.fail_after(30):
            while _slot_refusals(port) == 0:  # the fleet is full: nothing goes
                await anyio.to_thread.run_sync(_submit, daemon, 1)
                await anyio.sleep(POLL)
        queued = smtp_server.transactions  # at most what went before the first refusal
        daemon.send_signal(signal.SIGTERM)
        assert daemon.proc is not None
        with anyio.fail_after(20):
            assert await daemon.proc.wait() == 0

        # Started again with its backlog, the fleet still full.
        daemon = await start_daemon(config)
        with anyio.fail_after(30):
            while _slot_refusals(port) == 0:
                await anyio.sleep(POLL)
        assert smtp_server.transactions == queued
        await r.zrem(SLOTS, *others)  # the other node's slots come back
        with anyio.fail_after(30):
            while Client(daemon.socket).count()["active"]:
                await anyio.sleep(POLL)
        assert smtp_server.max_open_connections <= 4
