"""Fleet-wide connection slots against a real redis-server on a loopback
port: the lease scripts (take, renew all in one call, give back, expiry,
the slot set's lifetime) with an injected clock, and :class:`FleetSlots`
(a node's slots: refusals, renewal, Redis down and back)."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio

from spoold.fleet import KEY_PREFIX, FleetSettings, SharedState
from spoold.fleet_slots import FleetSlots
from spoold.limits import SlotWait
from tests.redis_server import RedisServer

pytestmark = pytest.mark.daemon  # starts redis-server


def _settings(server: RedisServer, node: str = "relay-1", **kw: float) -> FleetSettings:
    return FleetSettings(url=server.url, node=node, **kw)


async def _holders(server: RedisServer, destination: str = "r") -> list[str]:
    async with redis.asyncio.Redis.from_url(server.url, decode_responses=True) as r:
        return sorted(await r.zrange(f"{KEY_PREFIX}slots:{destination}", 0, -1))


async def _pttl(server: RedisServer, destination: str = "r") -> int:
    async with redis.asyncio.Redis.from_url(server.url) as r:
        return int(await r.pttl(f"{KEY_PREFIX}slots:{destination}"))


async def test_renew_all_keeps_retakes_and_loses_in_one_call(redis_server: RedisServer) -> None:
    async with (
        SharedState(_settings(redis_server, "a", lease=10.0)) as a,
        SharedState(_settings(redis_server, "b", lease=10.0)) as b,
    ):
        assert await a.acquire("r", 2, "a:1", now_ms=0) is True
        assert await a.acquire("s", 1, "a:2", now_ms=0) is True
        # Renewed at 9 s: both leases now end at 19 s, not 10 s.
        assert await a.renew_all([("r", "a:1", 2), ("s", "a:2", 1)], now_ms=9_000) == [True, True]
        assert await b.acquire("s", 1, "b:1", now_ms=18_999) is False
        # b's view at 20 s: a's leases ran out; a slot of s is b's now.
        assert await b.acquire("s", 1, "b:1", now_ms=20_000) is True
        # a renews late: r had room, so a:1 is taken again; s is full: lost.
        assert await a.renew_all([("r", "a:1", 2), ("s", "a:2", 1)], now_ms=20_001) == [
            True,
            False,
        ]
        assert await _holders(redis_server, "r") == ["a:1"]
        assert await _holders(redis_server, "s") == ["b:1"]
        assert await a.renew_all([]) == []


async def test_a_dead_holder_is_swept_out_by_the_next_one_to_ask(
    redis_server: RedisServer,
) -> None:
    async with SharedState(_settings(redis_server, "b", lease=2.0)) as b:
        assert await b.acquire("r", 4, "dead:1", now_ms=0) is True
        assert await b.acquire("r", 4, "dead:2", now_ms=0) is True
        assert await b.acquire("r", 4, "b:1", now_ms=1_000) is True
        assert await _holders(redis_server) == ["b:1", "dead:1", "dead:2"]
        assert await b.renew_all([("r", "b:1", 4)], now_ms=2_000) == [True]
        assert await _holders(redis_server) == ["b:1"]


async def test_the_slot_set_lives_as_long_as_its_furthest_lease(
    redis_server: RedisServer,
) -> None:
    # A node with a short lease must not cut a longer lease of another.
    async with (
        SharedState(_settings(redis_server, "long", lease=60.0)) as long,
        SharedState(_settings(redis_server, "short", lease=1.0)) as short,
    ):
        assert await long.acquire("r", 4, "long:1") is True
        assert await short.acquire("r", 4, "short:1") is True
        assert await short.renew("r", "short:1") is True
        assert await _pttl(redis_server) > 30_000
        assert await long.release("r", "long:1") is True
        assert await short.renew("r", "short:1") is True
        assert 0 < await _pttl(redis_server) <= 1_001


async def test_a_node_takes_up_to_the_limit_and_gives_back(redis_server: RedisServer) -> None:
    now = [100.0]
    async with (
        SharedState(_settings(redis_server, "a")) as a,
        SharedState(_settings(redis_server, "b")) as b,
    ):
        one, two = FleetSlots(a, clock=lambda: now[0]), FleetSlots(b, clock=lambda: now[0])
        first = await one.take("r", 2)
        second = await two.take("r", 2)
        assert isinstance(first, str) and isinstance(second, str)
        assert first.startswith("a:") and second.startswith("b:")
        assert one.held == {"r": 1} and one.leased == 1
        refused = await one.take("r", 2)
        assert isinstance(refused, SlotWait) and 0 < refused.seconds <= 1.5 * one.retry
        assert one.refusals == 1
        await two.give_back(second)
        assert await _holders(redis_server) == [first]
        # Refused a moment ago: not asked again before the wait is over ...
        assert isinstance(await one.take("r", 2), SlotWait)
        now[0] += 1.0
        third = await one.take("r", 2)  # ... then a slot is free
        assert isinstance(third, str) and one.held == {"r": 2}
        # A slot given back at this node lets its next attempt ask at once.
        assert isinstance(await one.take("r", 2), SlotWait)
        await one.give_back(third)
        fourth = await one.take("r", 2)
        assert isinstance(fourth, str)
        assert sorted(one.holders()) == sorted([first, fourth])
        await one.give_back(first)
        await one.give_back(fourth)
        await one.give_back(fourth)  # twice: nothing more happens
        assert one.held == {} and await _holders(redis_server) == []


async def test_renewal_holds_the_slots_past_the_lease(redis_server: RedisServer) -> None:
    async with (
        SharedState(_settings(redis_server, "a", lease=10.0)) as a,
        SharedState(_settings(redis_server, "b", lease=10.0)) as b,
    ):
        node = FleetSlots(a)
        # Taken on Redis's clock; renewed as if 9 s later, then checked at 15 s.
        async with redis.asyncio.Redis.from_url(redis_server.url) as r:
            seconds, micros = await r.time()
        now_ms = seconds * 1000 + micros // 1000
        held = [await node.take("r", 1)]
        await node.renew(now_ms=now_ms + 9_000)
        assert await b.acquire("r", 1, "b:1", now_ms=now_ms + 15_000) is False
        assert await b.acquire("r", 1, "b:1", now_ms=now_ms + 19_001) is True
        assert node.leased == 1 and node.holders() == held
        # Its lease was gone: the next renewal cannot take it back (full).
        await node.renew(now_ms=now_ms + 19_002)
        assert node.leased == 0 and node.held == {"r": 1}


async def test_redis_down_the_node_goes_on_alone_and_counts_again_when_back(
    redis_server: RedisServer,
) -> None:
    async with SharedState(_settings(redis_server, "a", timeout=0.5, retry_after=0.0)) as a:
        node = FleetSlots(a)
        redis_server.stop()
        alone = [await node.take("r", 2) for _ in range(3)]
        assert all(isinstance(h, str) for h in alone)  # local max_connections holds
        assert node.held == {"r": 3} and node.leased == 0
        redis_server.start()  # empty, on the same port
        with anyio.fail_after(10):
            while not a.health.up:
                await a.ping()
        await node.renew()  # takes back what the limit has room for
        assert node.leased == 2 and len(await _holders(redis_server)) == 2
        for holder in alone:
            await node.give_back(holder)
        assert node.held == {} and await _holders(redis_server) == []


async def test_a_slot_given_back_while_redis_is_down_is_given_back_when_it_answers(
    redis_server: RedisServer,
) -> None:
    # A blip marks Redis down: a give-back meanwhile is not sent (or fails).
    # The slot is kept aside and given back at the next renewal, not left
    # in Redis for a lease to block the other nodes.
    async with SharedState(_settings(redis_server, "a", retry_after=60.0)) as a:
        node = FleetSlots(a)
        holder = await node.take("r", 2)
        assert isinstance(holder, str) and await _holders(redis_server) == [holder]
        redis_server.pause()
        assert await a.ping() is False  # a timeout marks it down: not asked for 60 s
        redis_server.resume()
        await node.give_back(holder)
        assert node.held == {} and await _holders(redis_server) == [holder]
        await a.ping()  # an operator's question: it answers, up again
        assert a.health.up
        await node.renew()
        assert await _holders(redis_server) == []
        # One given back a lease ago or more is not asked for: it has ended.
        now = [0.0]
        late = FleetSlots(a, clock=lambda: now[0])
        holder = await late.take("r", 2)
        assert isinstance(holder, str)
        redis_server.pause()
        assert await a.ping() is False
        redis_server.resume()
        await late.give_back(holder)
        assert await a.ping() is True
        now[0] += a.settings.lease
        await late.renew()
        assert await _holders(redis_server) == [holder]  # left to expire


async def test_a_full_route_is_not_asked_again_until_the_retry_or_a_give_back(
    redis_server: RedisServer,
) -> None:
    now = [100.0]
    async with SharedState(_settings(redis_server, "a")) as a:
        node = FleetSlots(a, retry=0.1, clock=lambda: now[0])
        assert await a.acquire("r", 3, "other:1") and await a.acquire("r", 3, "other:2")
        mine = await node.take("r", 3)
        assert isinstance(mine, str)
        first = await node.take("r", 3)
        assert isinstance(first, SlotWait) and 0.05 <= first.seconds <= 0.15
        now[0] += 0.04
        # Asked meanwhile: told the rest of the while, Redis not asked.
        again = await node.take("r", 3)
        assert isinstance(again, SlotWait) and again.seconds == pytest.approx(first.seconds - 0.04)
        await a.release("r", "other:1")
        now[0] += 0.01
        assert isinstance(await node.take("r", 3), SlotWait)  # still the cached refusal
        await node.give_back(mine)  # ends the while: the next asks at once
        assert isinstance(await node.take("r", 3), str)
        assert node.refusals == 3


async def test_take_never_waits_for_a_slow_give_back_and_asks_at_once_after_it() -> None:
    # Redis slow to take a slot back: a take meanwhile asks at once (the
    # slot not yet gone, the fleet says full); once the give-back is done,
    # the next take asks again at once, not after the retry.
    let_go = anyio.Event()

    class Shared:
        settings = FleetSettings(url="redis://127.0.0.1:9/0", node="a", lease=3.0)

        def __init__(self) -> None:
            self.releasing = anyio.Event()
            self.holders: set[str] = set()

        async def acquire(self, destination: str, limit: int, holder: str) -> bool:
            if len(self.holders) >= limit:
                return False
            self.holders.add(holder)
            return True

        async def release(self, destination: str, holder: str) -> bool:
            self.releasing.set()
            await let_go.wait()
            self.holders.discard(holder)
            return True

    shared = Shared()
    node = FleetSlots(shared)  # type: ignore[arg-type]
    first = await node.take("r", 1)
    assert isinstance(first, str)
    async with anyio.create_task_group() as tg:
        tg.start_soon(node.give_back, first)
        await shared.releasing.wait()
        try:
            with anyio.fail_after(5):  # generous: it must not wait for let_go at all
                refused = await node.take("r", 1)
        finally:
            let_go.set()
        assert isinstance(refused, SlotWait)
    assert isinstance(await node.take("r", 1), str)


async def test_a_slot_given_back_while_its_renewal_is_under_way_is_given_back_again() -> None:
    # The renewal may reach Redis after the give-back and take the slot
    # again (it re-takes what is not there): the node removes it once more.
    class Shared:
        settings = FleetSettings(url="redis://127.0.0.1:9/0", node="a", lease=3.0)
        node: FleetSlots

        def __init__(self) -> None:
            self.released: list[str] = []

        async def acquire(self, destination: str, limit: int, holder: str) -> bool:
            return True

        async def release(self, destination: str, holder: str) -> bool:
            self.released.append(holder)
            return True

        async def renew_all(
            self, held: list[tuple[str, str, int]], *, now_ms: int | None = None
        ) -> list[bool]:
            for _destination, holder, _limit in held:
                await self.node.give_back(holder)  # meanwhile, the attempt ended
            return [True] * len(held)

    shared = Shared()
    node = shared.node = FleetSlots(shared)  # type: ignore[arg-type]
    holder = await node.take("r", 4)
    assert isinstance(holder, str)
    await node.renew()
    assert shared.released == [holder, holder] and node.held == {}
