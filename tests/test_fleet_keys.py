"""spoold.fleet_keys against a real redis-server: an idempotency key claimed
fleet-wide (two nodes: two key directories, two SharedStates), a duplicate
answered with the other node's ids, a claim released when the write fails,
claims that lapse, and a Redis that is down (the node's own keys alone)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
import redis.asyncio

from spoold.body import Body
from spoold.errors import IdempotencyKeyError, StoreError
from spoold.fleet import FleetSettings, SharedState
from spoold.fleet_keys import FleetKeys, redis_key
from spoold.idempotency import KeyFiles, envelope_fingerprint, user_key
from spoold.message import RoutedBatch, RoutedEnvelope
from tests.redis_server import RedisServer

pytestmark = pytest.mark.daemon  # starts redis-server

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
WINDOW = timedelta(days=1)


def _batch(to: str = "rcpt@example.com") -> RoutedBatch:
    return RoutedBatch(
        [RoutedEnvelope("app@example.com", [to], ["127.0.0.1:25"])],
        Body(b"Subject: x\r\n\r\nhi\r\n"),
    )


def _node(server: RedisServer | str, name: str, **kw: float) -> SharedState:
    url = server if isinstance(server, str) else server.url
    return SharedState(FleetSettings(url=url, node=name, **kw))


class _Spool:
    """What a node's add does, counted: each call queues one message."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queued: list[str] = []

    def add(self) -> Callable[[], Awaitable[list[str]]]:
        async def go() -> list[str]:
            mid = f"{self.name}-{len(self.queued) + 1}"
            self.queued.append(mid)
            return [mid]

        return go


async def test_the_same_key_at_two_nodes_queues_one_message(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    files_a, files_b = KeyFiles(tmp_path / "a"), KeyFiles(tmp_path / "b")
    spool_a, spool_b = _Spool("a"), _Spool("b")
    async with _node(redis_server, "a") as a, _node(redis_server, "b") as b:
        keys_a, keys_b = FleetKeys(a), FleetKeys(b)
        first = await keys_a.add_once(files_a, "order-1", _batch(), NOW, WINDOW, spool_a.add())
        second = await keys_b.add_once(files_b, "order-1", _batch(), NOW, WINDOW, spool_b.add())
        assert first == (["a-1"], False)
        assert second == (["a-1"], True)  # the other node's id, as a local duplicate
        assert spool_b.queued == []
        # Remembered at b too: a retry there is a duplicate with Redis gone.
        await b.client.delete(redis_key("order-1"))
        again = await keys_b.add_once(files_b, "order-1", _batch(), NOW, WINDOW, spool_b.add())
        assert again == (["a-1"], True)
        # Another key is another message.
        other = await keys_b.add_once(files_b, "order-2", _batch(), NOW, WINDOW, spool_b.add())
        assert other == (["b-1"], False)
        stored = json.loads(await a.client.get(redis_key("order-1")) or "null")
        assert stored is None  # deleted above
        stored = json.loads(await a.client.get(redis_key("order-2")) or "{}")
        assert stored["node"] == "b" and stored["ids"] == ["b-1"]
        ttl = await a.client.pttl(redis_key("order-2"))
        assert WINDOW.total_seconds() * 1000 - 60_000 < ttl <= WINDOW.total_seconds() * 1000


async def test_both_nodes_at_once_queue_one_message(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    spools = {n: _Spool(n) for n in "ab"}
    results: dict[str, tuple[list[str], bool]] = {}
    async with _node(redis_server, "a") as a, _node(redis_server, "b") as b:
        gate = anyio.Event()

        async def submit(name: str, shared: SharedState) -> None:
            spool = spools[name]

            async def slow_add() -> list[str]:
                await gate.wait()  # the other node asks while this one writes
                return await spool.add()()

            keys = FleetKeys(shared)
            results[name] = await keys.add_once(
                KeyFiles(tmp_path / name), "k", _batch(), NOW, WINDOW, slow_add
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(submit, "a", a)
            tg.start_soon(submit, "b", b)
            with anyio.fail_after(10):
                while not await a.client.exists(redis_key("k")):
                    await anyio.sleep(0.01)
            gate.set()
    queued = spools["a"].queued + spools["b"].queued
    assert len(queued) == 1
    assert results["a"][0] == results["b"][0] == queued
    assert sorted(r[1] for r in results.values()) == [False, True]


async def test_a_failed_write_releases_the_claim(redis_server: RedisServer, tmp_path: Path) -> None:
    async with _node(redis_server, "a") as a, _node(redis_server, "b") as b:

        async def broken() -> list[str]:
            raise StoreError("disk full")

        with pytest.raises(StoreError):
            await FleetKeys(a).add_once(
                KeyFiles(tmp_path / "a"), "k", _batch(), NOW, WINDOW, broken
            )
        assert not await a.client.exists(redis_key("k"))
        spool_b = _Spool("b")
        got = await FleetKeys(b).add_once(
            KeyFiles(tmp_path / "b"), "k", _batch(), NOW, WINDOW, spool_b.add()
        )
        assert got == (["b-1"], False)


async def test_release_never_takes_another_nodes_claim(redis_server: RedisServer) -> None:
    async with _node(redis_server, "a") as a, _node(redis_server, "b") as b:
        keys_a, keys_b = FleetKeys(a), FleetKeys(b)
        mine = await keys_a.claim("k", "", WINDOW)
        assert mine is not None and mine.mine
        await a.client.delete(mine.redis_key)  # lapsed
        theirs = await keys_b.claim("k", "", WINDOW)
        assert theirs is not None and theirs.mine
        assert await keys_a.release(mine) is False
        assert await a.client.get(theirs.redis_key) == theirs.value


async def test_a_pending_claim_of_a_dead_node_lapses(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    envelope = envelope_fingerprint("app@example.com", ["rcpt@example.com"])
    async with _node(redis_server, "a") as a, _node(redis_server, "b") as b:
        # a claims and dies before writing (its claim has no ids).
        dead = await FleetKeys(a, pending=0.3).claim("k", envelope, WINDOW)
        assert dead is not None and dead.mine
        assert 0 < await a.client.pttl(dead.redis_key) <= 300
        spool_b = _Spool("b")
        with anyio.fail_after(10):  # b would wait 31 s for a claim that never lapses
            got = await FleetKeys(b, pending=30).add_once(
                KeyFiles(tmp_path / "b"), "k", _batch(), NOW, WINDOW, spool_b.add()
            )
        assert got == (["b-1"], False)
        stored = json.loads(await b.client.get(redis_key("k")) or "{}")
        assert stored["node"] == "b" and stored["ids"] == ["b-1"]  # b's claim, settled


async def test_a_claim_ends_with_the_window(redis_server: RedisServer, tmp_path: Path) -> None:
    short = timedelta(milliseconds=300)
    async with _node(redis_server, "a") as a, _node(redis_server, "b") as b:
        spool_a, spool_b = _Spool("a"), _Spool("b")
        await FleetKeys(a).add_once(
            KeyFiles(tmp_path / "a"), "k", _batch(), NOW, short, spool_a.add()
        )
        assert 0 < await a.client.pttl(redis_key("k")) <= 300
        with anyio.fail_after(10):
            while await a.client.exists(redis_key("k")):
                await anyio.sleep(0.02)
        got = await FleetKeys(b).add_once(
            KeyFiles(tmp_path / "b"), "k", _batch(), NOW, short, spool_b.add()
        )
        assert got == (["b-1"], False)


async def test_another_envelope_under_a_key_is_refused_at_the_other_node(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _node(redis_server, "a") as a, _node(redis_server, "b") as b:
        spool_a, spool_b = _Spool("a"), _Spool("b")
        await FleetKeys(a).add_once(
            KeyFiles(tmp_path / "a"), "k", _batch(), NOW, WINDOW, spool_a.add()
        )
        with pytest.raises(IdempotencyKeyError, match="different envelope"):
            await FleetKeys(b).add_once(
                KeyFiles(tmp_path / "b"),
                "k",
                _batch("other@example.com"),
                NOW,
                WINDOW,
                spool_b.add(),
            )
        assert spool_b.queued == []


async def test_users_keys_stay_apart_fleet_wide(redis_server: RedisServer, tmp_path: Path) -> None:
    async with _node(redis_server, "a") as a, _node(redis_server, "b") as b:
        spool_a, spool_b = _Spool("a"), _Spool("b")
        await FleetKeys(a).add_once(
            KeyFiles(tmp_path / "a"), user_key("k", 1000), _batch(), NOW, WINDOW, spool_a.add()
        )
        got = await FleetKeys(b).add_once(
            KeyFiles(tmp_path / "b"), user_key("k", 1001), _batch(), NOW, WINDOW, spool_b.add()
        )
        assert got == (["b-1"], False)  # another user's key: not a duplicate


async def test_redis_down_leaves_the_nodes_own_keys(tmp_path: Path) -> None:
    # A closed port: every call fails at once; the node's keys go on.
    closed = "redis://127.0.0.1:1/0"
    files = KeyFiles(tmp_path / "a")
    spool = _Spool("a")
    async with _node(closed, "a", timeout=0.5) as a:
        keys = FleetKeys(a)
        assert await keys.add_once(files, "k", _batch(), NOW, WINDOW, spool.add()) == (
            ["a-1"],
            False,
        )
        assert a.health.up is False and a.health.outages == 1
        assert await keys.add_once(files, "k", _batch(), NOW, WINDOW, spool.add()) == (
            ["a-1"],
            True,
        )
        assert spool.queued == ["a-1"]


async def test_redis_stopped_then_back_claims_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    spool_a, spool_b = _Spool("a"), _Spool("b")
    async with (
        _node(redis_server, "a", retry_after=0) as a,
        _node(redis_server, "b", retry_after=0) as b,
    ):
        redis_server.stop()
        got = await FleetKeys(a).add_once(
            KeyFiles(tmp_path / "a"), "k1", _batch(), NOW, WINDOW, spool_a.add()
        )
        assert got == (["a-1"], False) and not a.health.up
        redis_server.start()  # same port, empty
        got = await FleetKeys(a).add_once(
            KeyFiles(tmp_path / "a"), "k2", _batch(), NOW, WINDOW, spool_a.add()
        )
        assert got == (["a-2"], False) and a.health.up
        got = await FleetKeys(b).add_once(
            KeyFiles(tmp_path / "b"), "k2", _batch(), NOW, WINDOW, spool_b.add()
        )
        assert got == (["a-2"], True)


@pytest.mark.parametrize(
    "value",
    [
        '{"ids":["fake-id"]}',  # ids, no envelope: not a claim this version wrote
        '{"ids":"abc"}',
        '{"node":"z","token":"t","ids":["x-1"],"envelope":""}',
        '{"node":"z","token":"t","ids":["not an id!"],"envelope":"' + "0" * 64 + '"}',
        '{"node":"z","token":"t","ids":[],"envelope":"nothex"}',  # never settles
        "not json",
        "[" * 100_000,
    ],
)
async def test_a_claim_this_version_did_not_write_means_acting_alone_at_once(
    redis_server: RedisServer, tmp_path: Path, value: str
) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await client.set(redis_key("k"), value, px=60_000)
    finally:
        await client.aclose()
    spool = _Spool("a")
    async with _node(redis_server, "a") as a:
        with anyio.fail_after(5):  # never the claim's 30 s of patience
            got = await FleetKeys(a).add_once(
                KeyFiles(tmp_path / "a"), "k", _batch(), NOW, WINDOW, spool.add()
            )
        assert got == (["a-1"], False)  # queued, never a false duplicate
        assert spool.queued == ["a-1"]
        found = await FleetKeys(a).claim("k", "", WINDOW)
        assert found is not None and found.unusable and found.ids == ()


async def test_a_key_file_that_cannot_be_written_still_settles_the_claim(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_record(*args: object, **kw: object) -> None:
        raise StoreError("disk full")

    spool_a, spool_b = _Spool("a"), _Spool("b")
    async with _node(redis_server, "a") as a, _node(redis_server, "b") as b:
        files_a = KeyFiles(tmp_path / "a")
        monkeypatch.setattr(files_a, "record", broken_record)
        with pytest.raises(StoreError):
            await FleetKeys(a).add_once(files_a, "k", _batch(), NOW, WINDOW, spool_a.add())
        assert spool_a.queued == ["a-1"]  # queued all the same
        stored = json.loads(await a.client.get(redis_key("k")) or "{}")
        assert stored["ids"] == ["a-1"]  # settled: never a lapse and a second copy
        got = await FleetKeys(b).add_once(
            KeyFiles(tmp_path / "b"), "k", _batch(), NOW, WINDOW, spool_b.add()
        )
        assert got == (["a-1"], True) and spool_b.queued == []


async def test_a_redis_that_hangs_costs_a_keyed_submission_one_timeout(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    files = KeyFiles(tmp_path / "a")
    spool = _Spool("a")
    async with _node(redis_server, "a", timeout=0.2, retry_after=0) as a:
        keys = FleetKeys(a)
        assert await keys.add_once(files, "k0", _batch(), NOW, WINDOW, spool.add())
        redis_server.pause()  # takes connections, never answers
        try:
            with anyio.fail_after(2):  # ten timeouts: bounded, not the claim's 30 s
                got = await keys.add_once(files, "k1", _batch(), NOW, WINDOW, spool.add())
            assert got == (["a-2"], False) and a.health.up is False
        finally:
            redis_server.resume()
        with anyio.fail_after(10):
            got = await keys.add_once(files, "k2", _batch(), NOW, WINDOW, spool.add())
        assert got == (["a-3"], False) and a.health.up is True
