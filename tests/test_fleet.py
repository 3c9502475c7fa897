"""spoold.fleet against a real redis-server on a loopback port: the GCRA
throttle, connection-slot leases, heartbeats, and what a node does when
Redis is down, stopped, or back."""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
import redis.asyncio

from spoold.fleet import (
    BOOKED_INTERVALS,
    KEY_PREFIX,
    NODES_KEPT,
    TOLERANCE_LATE,
    TOLERANCE_MAX,
    FleetSettings,
    SharedState,
    gcra_tolerance,
    redacted_url,
)
from spoold.limits import Rate, SharedToken
from tests.redis_server import INSTALL_HINT, RedisServer, redis_server_path

pytestmark = pytest.mark.daemon  # starts redis-server


def _settings(server: RedisServer, node: str = "relay-1", **kw: float) -> FleetSettings:
    return FleetSettings(url=server.url, node=node, **kw)


TEN_PER_SECOND = Rate(10, timedelta(seconds=1), "10/s")
NOW = SharedToken(0.0)  # a token to use at once


def again(wait: float) -> SharedToken:
    """No token booked: ask again after ``wait``."""
    return SharedToken(wait, booked=False)


async def _token_at(node: SharedState, rate: Rate, t: int, key: str = "r") -> tuple[int, bool]:
    """Ask at ``t`` (ms): the time of the token booked (ms), or when to ask
    again, and whether it was booked."""
    token = await node.gcra(key, rate, now_ms=t)
    assert token is not None
    return t + math.ceil(token.wait * 1000), token.booked


async def test_gcra_books_tokens_one_interval_apart_as_far_as_a_bound(
    redis_server: RedisServer,
) -> None:
    async with SharedState(_settings(redis_server)) as s:
        got = [await s.gcra("r", TEN_PER_SECOND, now_ms=1_000_000) for _ in range(12)]
        # the first and the tolerance's (one interval) at once, then one
        # booked every 100 ms as far as the tolerance and BOOKED_INTERVALS
        # intervals; then none booked: ask again when the schedule is
        # within that bound
        booked = [SharedToken(k / 10) for k in range(1, BOOKED_INTERVALS + 2)]
        assert got == [NOW, NOW, *booked, again(0.1)]
        assert await s.gcra("r", TEN_PER_SECOND, now_ms=1_000_100) == SharedToken(0.9)
        # 40 ms later the next is 1.06 s on: not booked, ask again in 60 ms
        assert await s.gcra("r", TEN_PER_SECOND, now_ms=1_000_140) == again(0.06)


def test_the_tolerance_is_one_interval_within_bounds() -> None:
    assert gcra_tolerance(0.1) == 0.1  # 10/s
    assert gcra_tolerance(0.05) == 0.05  # 20/s
    assert gcra_tolerance(0.02) == TOLERANCE_LATE  # 50/s: lateness is milliseconds
    assert gcra_tolerance(0.01) == 0.04  # 100/s: but four intervals at most
    assert gcra_tolerance(0.001) == 0.004  # 1000/s: five at once at most, not 51
    assert gcra_tolerance(3600.0) == TOLERANCE_MAX  # 1/h: not a second token an hour early


async def test_gcra_admits_count_per_window_whatever_the_asking(
    redis_server: RedisServer,
) -> None:
    # Asked every 10 ms for 2 s: the tokens booked are 21 in the 2 s (10/s
    # and the one of the tolerance), then 100 ms apart.
    async with SharedState(_settings(redis_server)) as s:
        times = []
        for t in range(0, 2000, 10):
            at, booked = await _token_at(s, TEN_PER_SECOND, t)
            if booked:
                times.append(at)
    assert [t for t in times if t < 2000] == [0, 10, *range(100, 2000, 100)]
    _conforms(times, 100, 100)


async def test_two_clients_share_one_throttle(redis_server: RedisServer) -> None:
    # Two nodes asking at the same times, each first in turn: the fleet
    # gets 10/s (and the one of the tolerance), not 10/s each.
    async with (
        SharedState(_settings(redis_server, "a")) as a,
        SharedState(_settings(redis_server, "b")) as b,
    ):
        went: dict[str, list[int]] = {"a": [], "b": []}
        for t in range(0, 1000, 5):
            order = [("a", a), ("b", b)] if (t // 100) % 2 else [("b", b), ("a", a)]
            for name, node in order:
                at, booked = await _token_at(node, TEN_PER_SECOND, t)
                if booked and at < 1000:
                    went[name].append(at)
    assert len(went["a"]) + len(went["b"]) == 11
    assert went["a"] and went["b"]


TWENTY_PER_SECOND = Rate(20, timedelta(seconds=1), "20/s")


def _conforms(times: list[int], interval_ms: int, tolerance_ms: int) -> None:
    """Every run of tokens in ``times`` (ms, sorted) is spread over at least
    its intervals less the tolerance: so in any span W there are at most
    rate * (W + tolerance) + 1."""
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            assert times[j] - times[i] >= (j - i) * interval_ms - tolerance_ms, (i, j)


async def test_nodes_asking_at_random_never_exceed_the_rate_and_tolerance(
    redis_server: RedisServer,
) -> None:
    # 600 attempts of three nodes at random times over 10 s (60/s asked),
    # on the script's clock: the tokens taken obey the bound in every span.
    rng = random.Random(23)
    asks = sorted((rng.randrange(0, 10_000), rng.randrange(3)) for _ in range(600))
    async with (
        SharedState(_settings(redis_server, "a")) as a,
        SharedState(_settings(redis_server, "b")) as b,
        SharedState(_settings(redis_server, "c")) as c,
    ):
        nodes, went = [a, b, c], []
        for t, n in asks:
            at, booked = await _token_at(nodes[n], TWENTY_PER_SECOND, t)
            if booked:
                went.append(at)
    went.sort()
    _conforms(went, 50, 50)
    assert len([t for t in went if t <= 10_000]) <= 20 * (10 + 0.05) + 1
    # (random asks leave gaps: some tokens nobody came for)
    assert len(went) >= 150


async def test_a_node_late_by_less_than_the_tolerance_loses_no_token(
    redis_server: RedisServer,
) -> None:
    # Three nodes with mail waiting, each coming back for the token when it
    # was told, plus a lateness (event loop, round trip) of up to 45 ms, for
    # 30 s of the script's clock: the fleet gets exactly 20/s over the
    # window (a GCRA with a burst of one loses every lateness: about 16/s
    # here: about 16.6/s).
    rng = random.Random(5)
    window = 30_000
    async with (
        SharedState(_settings(redis_server, "a")) as a,
        SharedState(_settings(redis_server, "b")) as b,
        SharedState(_settings(redis_server, "c")) as c,
    ):
        due = [(rng.randrange(0, 45), n) for n in range(3)]  # (next ask in ms, node)
        heapq.heapify(due)
        nodes, went = [a, b, c], []
        while due[0][0] < window:
            t, n = heapq.heappop(due)
            at, booked = await _token_at(nodes[n], TWENTY_PER_SECOND, t)
            if booked:
                went.append(at)
            heapq.heappush(due, (at + rng.randrange(0, 45), n))
    went = sorted(t for t in went if t < window)
    _conforms(went, 50, 50)
    # the first two at once (the tolerance), then one every 50 ms to the end
    assert 20 * window // 1000 <= len(went) <= 20 * window // 1000 + 1


async def test_a_node_farther_from_redis_gets_its_share(redis_server: RedisServer) -> None:
    # Three nodes with a backlog each, each at its own rate 20/s as the
    # fleet's, one 2 ms farther from Redis (another rack), all with up to
    # 2 ms of jitter, for 30 s of the script's clock. Racing for tokens,
    # the nearer nodes win every tie and the far one gets none; booked,
    # each gets its turn, and the fleet still keeps to 20/s.
    rng = random.Random(7)
    farther = [0, 0, 2]
    window = 30_000
    async with (
        SharedState(_settings(redis_server, "a")) as a,
        SharedState(_settings(redis_server, "b")) as b,
        SharedState(_settings(redis_server, "c")) as c,
    ):
        nodes = [a, b, c]
        due = [(farther[n] + rng.randrange(0, 3), n) for n in range(3)]
        heapq.heapify(due)
        went: list[list[int]] = [[], [], []]
        while due[0][0] < window:
            t, n = heapq.heappop(due)
            at, booked = await _token_at(nodes[n], TWENTY_PER_SECOND, t)
            if booked:  # sent then; its next message asks after its own spacing
                went[n].append(at)
                at += 50
            heapq.heappush(due, (at + farther[n] + rng.randrange(0, 3), n))
    shares = [len([t for t in w if t < window]) for w in went]
    total = sum(shares)
    assert all(share >= 0.25 * total for share in shares), shares
    fleet = sorted(t for w in went for t in w)
    _conforms(fleet, 50, 50)
    assert total <= 20 * window // 1000 + 1
    assert total >= 0.95 * 20 * window // 1000  # and no rate lost


async def test_gcra_keys_are_per_destination(redis_server: RedisServer) -> None:
    async with SharedState(_settings(redis_server)) as s:
        for _ in range(2):  # the first and the tolerance's
            assert await s.gcra("one", TEN_PER_SECOND, now_ms=0) == NOW
        assert await s.gcra("two", TEN_PER_SECOND, now_ms=0) == NOW
        assert await s.gcra("one", TEN_PER_SECOND, now_ms=0) == SharedToken(0.1)


async def test_leases_up_to_the_limit_and_expiry_returns_slots(
    redis_server: RedisServer,
) -> None:
    async with (
        SharedState(_settings(redis_server, "a", lease=10.0)) as a,
        SharedState(_settings(redis_server, "b", lease=10.0)) as b,
    ):
        assert await a.acquire("r", 3, "a:1", now_ms=0) is True
        assert await a.acquire("r", 3, "a:2", now_ms=0) is True
        assert await b.acquire("r", 3, "b:1", now_ms=1000) is True
        assert await b.acquire("r", 3, "b:2", now_ms=1000) is False  # 3 held fleet-wide
        # renewing one already held is not a new slot
        assert await a.acquire("r", 3, "a:1", now_ms=2000) is True
        # released: one free
        assert await a.release("r", "a:2") is True
        assert await b.acquire("r", 3, "b:2", now_ms=3000) is True
        assert await b.acquire("r", 3, "b:3", now_ms=3000) is False
        # b renews its slots; node a dies: its lease (a:1, renewed at 2 s)
        # ends at 12 s
        assert await b.renew("r", "b:1", now_ms=10_000) is True
        assert await b.renew("r", "b:2", now_ms=10_000) is True
        assert await b.acquire("r", 3, "b:3", now_ms=11_999) is False
        assert await b.acquire("r", 3, "b:3", now_ms=12_000) is True
        assert await a.renew("r", "a:1", now_ms=12_000) is False  # its lease was gone
        assert await b.renew("r", "b:1", now_ms=12_000) is True


async def test_heartbeats_list_live_nodes(redis_server: RedisServer) -> None:
    async with (
        SharedState(_settings(redis_server, "relay-1")) as a,
        SharedState(_settings(redis_server, "relay-2")) as b,
        SharedState(_settings(redis_server, "relay-2", heartbeat_ttl=0.05)) as b_short,
    ):
        assert await a.beat({"active": 3, "deferred": 1}, at=100.0)
        assert await b.beat({"active": 0}, at=101.0)
        beats = await a.nodes()
        assert beats is not None
        assert [(n.node, n.at, dict(n.queues)) for n in beats] == [
            ("relay-1", 100.0, {"active": 3, "deferred": 1}),
            ("relay-2", 101.0, {"active": 0}),
        ]
        # relay-2 beats again with a short life (after the listing above, so
        # a slow machine cannot make it expire before it is read)
        assert await b_short.beat({"active": 0}, at=102.0)
        with anyio.fail_after(5):
            while (beats := await a.nodes()) is not None and len(beats) == 2:
                await anyio.sleep(0.02)  # relay-2's heartbeat expires in Redis
        assert beats is not None and [n.node for n in beats] == ["relay-1"]


async def test_a_heartbeat_is_timed_by_redis_not_by_the_node(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        async with SharedState(_settings(redis_server, "skewed")) as s:
            real = time.time
            monkeypatch.setattr(time, "time", lambda: real() - 86_400.0)  # a day behind
            try:
                assert await s.beat({"active": 1})
            finally:
                monkeypatch.setattr(time, "time", real)
            seconds, micros = await client.time()
            beats = await s.nodes()
        assert beats is not None and [b.node for b in beats] == ["skewed"]
        assert abs(beats[0].at - (seconds + micros / 1e6)) < 60  # Redis's time, not a day ago
        assert await client.zscore(f"{KEY_PREFIX}nodes", "skewed") == beats[0].at
    finally:
        await client.aclose()


async def test_nodes_silent_for_a_day_are_dropped_from_the_set(
    redis_server: RedisServer,
) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with (
            SharedState(_settings(redis_server, "gone")) as gone,
            SharedState(_settings(redis_server, "alive")) as alive,
        ):
            assert await gone.beat({}, at=1_000.0)
            assert await alive.beat({}, at=1_000.0 + NODES_KEPT)  # a day: still kept
            assert await client.zrange(f"{KEY_PREFIX}nodes", 0, -1) == ["gone", "alive"]
            assert await alive.beat({}, at=1_000.5 + NODES_KEPT)
            assert await client.zrange(f"{KEY_PREFIX}nodes", 0, -1) == ["alive"]
    finally:
        await client.aclose()


async def test_a_node_that_leaves_is_no_longer_listed(redis_server: RedisServer) -> None:
    async with (
        SharedState(_settings(redis_server, "relay-1")) as a,
        SharedState(_settings(redis_server, "relay-2")) as b,
    ):
        assert await a.beat({"active": 0}) and await b.beat({"active": 0})
        assert await b.leave()
        beats = await a.nodes()
        assert beats is not None and [n.node for n in beats] == ["relay-1"]


async def test_redis_is_not_said_up_before_it_answered(redis_server: RedisServer) -> None:
    async with SharedState(_settings(redis_server)) as s:
        assert s.health.up is None and s.health.outages == 0  # not known yet
        assert await s.ping() is True
        assert s.health.up is True and s.health.outages == 0
    redis_server.stop()
    async with SharedState(_settings(redis_server)) as s:
        assert s.health.up is None
        assert await s.gcra("r", TEN_PER_SECOND) is None
        assert s.health.up is False and s.health.outages == 1  # down from the start


async def test_redis_down_falls_back_and_comes_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "spoold.fleet")
    async with SharedState(_settings(redis_server, timeout=0.5, retry_after=3600)) as s:
        assert await s.ping() is True
        redis_server.stop()
        # every call says "no answer" (None), quickly; logged once
        assert await s.gcra("r", TEN_PER_SECOND) is None
        assert await s.acquire("r", 4, "x") is None
        assert await s.beat({}) is False
        assert s.health.up is False and s.health.outages == 1
        downs = [r for r in caplog.records if "fleet redis down" in r.getMessage()]
        assert len(downs) == 1
        redis_server.start()  # same port, empty
        # Not asked again within retry_after of the last try...
        assert await s.gcra("r", TEN_PER_SECOND) is None
        # ...but an operator's question (fleet status: ping, nodes) asks.
        assert await s.ping() is True
        assert await s.gcra("r", TEN_PER_SECOND) == NOW
        assert s.health.up is True
        said = [r.getMessage().split(" redis=")[0] for r in caplog.records]
        # up at the first answer, once down, once up again
        assert said == ["fleet redis up", "fleet redis down", "fleet redis up"]


async def test_a_stopped_redis_costs_at_most_the_timeout(redis_server: RedisServer) -> None:
    async with SharedState(_settings(redis_server, timeout=0.3, retry_after=3600)) as s:
        assert await s.ping() is True
        redis_server.pause()
        try:
            with anyio.fail_after(5):  # far above 0.3 s: the bound is the timeout's
                assert await s.gcra("r", TEN_PER_SECOND) is None
            assert s.health.up is False and "Timeout" in s.health.last_error
        finally:
            redis_server.resume()
        # Down: the next calls do not ask Redis again within retry_after
        # (it answers again, and still they say "no answer")
        assert await s.acquire("r", 1, "x") is None
        assert await s.gcra("r", TEN_PER_SECOND) is None
        assert await s.ping() is True
        assert await s.gcra("r", TEN_PER_SECOND) == NOW
        assert s.health.up is True and s.health.outages == 1


def test_a_password_never_reaches_a_log_line() -> None:
    assert redacted_url("redis://:s3cret@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert redacted_url("rediss://u:s3cret@r.example:6380/1") == "rediss://u:***@r.example:6380/1"
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redacted_url("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"


async def test_gcra_stays_exact_above_a_thousand_per_second(redis_server: RedisServer) -> None:
    fast = Rate(4000, timedelta(seconds=1), "4000/s")  # one every 250 microseconds
    async with SharedState(_settings(redis_server)) as s:
        # at once: the first and a tolerance's worth (four intervals at
        # this rate), no more; the next booked 250 microseconds on
        went = 0
        while (token := await s.gcra("fast", fast, now_ms=10)) == NOW:
            went += 1
        assert went == 5 and token == SharedToken(0.00025)
        # a millisecond on: four more due (one each 250 microseconds), one
        # of them booked already
        went = 0
        while await s.gcra("fast", fast, now_ms=11) == NOW:
            went += 1
        assert went == 3


async def test_a_password_is_used_and_a_wrong_one_is_redis_down(tmp_path: Path) -> None:
    binary = redis_server_path()
    if binary is None:
        pytest.skip(INSTALL_HINT)
    server = RedisServer(tmp_path, binary, "--requirepass", "s3cret")
    server.start()
    try:
        good = FleetSettings(url=server.url, node="a", password="s3cret")
        async with SharedState(good) as s:
            assert await s.gcra("r", TEN_PER_SECOND) == NOW
        async with SharedState(FleetSettings(url=server.url, node="a", password="wrong")) as s:
            assert await s.gcra("r", TEN_PER_SECOND) is None
            assert s.health.up is False and "s3cret" not in s.health.last_error
            assert "Redis refused the password (the one in fleet.password_file)" in (
                s.health.last_error
            )
        async with SharedState(FleetSettings(url=server.url, node="a")) as s:
            assert await s.ping() is False
            assert "(none set: put it in fleet.password_file)" in s.health.last_error
    finally:
        server.stop()


async def test_a_faster_rate_or_a_clock_gone_back_holds_nothing(
    redis_server: RedisServer,
) -> None:
    slow = Rate(1, timedelta(hours=1), "1/h")
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        async with SharedState(_settings(redis_server)) as s:
            assert await s.gcra("r", slow, now_ms=1_000_000) == NOW
            # the next an hour later, less the tolerance (a second at most)
            assert await s.gcra("r", slow, now_ms=1_000_000) == SharedToken(3599.0)
            # a reload made it 10/s: the schedule of 1/h is far beyond what
            # 10/s books, so it starts afresh (and is written so): a token
            # at once and one an interval later, not an hour on
            assert await s.gcra("r", TEN_PER_SECOND, now_ms=1_000_000) == NOW
            assert await client.pttl(f"{KEY_PREFIX}gcra:r") < 61_000
            assert await s.gcra("r", TEN_PER_SECOND, now_ms=1_000_100) == NOW
            # Redis's clock went back a day: the same
            assert await s.gcra("r", TEN_PER_SECOND, now_ms=1_000_000 - 86_400_000) == NOW
            assert await s.gcra("r", TEN_PER_SECOND, now_ms=1_000_100 - 86_400_000) == NOW
    finally:
        await client.aclose()


@pytest.mark.parametrize("stored", ["inf", "-inf", "nan", "1e300"])
async def test_a_throttle_key_that_is_not_a_finite_time_holds_nothing(
    redis_server: RedisServer, stored: str
) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await client.set(f"{KEY_PREFIX}gcra:r", stored)  # no TTL: it would last for ever
        async with SharedState(_settings(redis_server)) as s:
            assert await s.gcra("r", TEN_PER_SECOND, now_ms=5_000) == NOW
            assert await s.gcra("r", TEN_PER_SECOND, now_ms=5_100) == NOW
        assert await client.pttl(f"{KEY_PREFIX}gcra:r") > 0  # and it expires again
    finally:
        await client.aclose()


def test_a_server_that_never_answers_is_not_left_running(tmp_path: Path) -> None:
    silent = tmp_path / "silent-redis"
    silent.write_text("#!/bin/sh\nexec sleep 60\n")  # takes the arguments, never listens
    silent.chmod(0o755)
    server = RedisServer(tmp_path, str(silent), start_timeout=0.3)
    with pytest.raises(RuntimeError, match="did not answer"):
        server.start()
    assert server.proc is None  # stopped and reaped, not leaked


async def test_a_throttle_outlives_a_pause_of_real_time(redis_server: RedisServer) -> None:
    fast = Rate(4000, timedelta(seconds=1), "4000/s")
    async with SharedState(_settings(redis_server)) as s:
        while await s.gcra("fast", fast, now_ms=10) == NOW:
            pass
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            # the TAT's own distance would be 1.5 ms of real time: any pause
            # would forget the tokens just taken
            assert await client.pttl(f"{KEY_PREFIX}gcra:fast") > 50_000
        finally:
            await client.aclose()
        # (the loop's last ask booked the next: this one is the one after)
        assert await s.gcra("fast", fast, now_ms=10) == SharedToken(0.0005)


async def test_an_answer_that_cannot_be_read_is_no_answer(redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await client.zadd(f"{KEY_PREFIX}nodes", {b"\xff": 1.0})  # not UTF-8
    finally:
        await client.aclose()
    async with SharedState(_settings(redis_server)) as s:
        assert await s.nodes() is None  # not an exception that ends the daemon
        assert s.health.up is False and "UnicodeDecodeError" in s.health.last_error


async def test_a_throttle_key_that_is_not_a_time_is_started_afresh(
    redis_server: RedisServer,
) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await client.set(f"{KEY_PREFIX}gcra:r", "not a time")  # another program's, or damaged
    finally:
        await client.aclose()
    async with SharedState(_settings(redis_server)) as s:
        assert await s.gcra("r", TEN_PER_SECOND, now_ms=5_000) == NOW
        assert await s.gcra("r", TEN_PER_SECOND, now_ms=5_000) == NOW
        assert await s.gcra("r", TEN_PER_SECOND, now_ms=5_000) == SharedToken(0.1)
        assert s.health.up is True
