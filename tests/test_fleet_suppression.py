"""spoold.fleet_suppression against a real redis-server: two nodes' lists
(two spool directories, two SharedStates, two mirrors) kept in step:
additions, removals, expiry, a Redis that is down then back (catch-up both
ways), a change log trimmed past a node, and a node joining late."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import msgspec
import pytest

from spoold import fleet_suppression
from spoold.fleet import FleetSettings, SharedState
from spoold.fleet_suppression import (
    ENDS_KEY,
    HASH_KEY,
    LOG_KEY,
    PENDING_FILE,
    SuppressionMirror,
)
from spoold.suppression import MAX_REASON, Suppression, Suppressions, suppression_for
from tests.redis_server import RedisServer

pytestmark = pytest.mark.daemon  # starts redis-server


class _Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class _Node:
    shared: SharedState
    listed: Suppressions
    mirror: SuppressionMirror
    clock: _Clock

    async def suppress(self, address: str, span: timedelta = timedelta(days=1)) -> None:
        entry = suppression_for(
            address, now=self.clock(), span=span, reason="gone", source="operator"
        )
        await self.listed.add([entry], now=self.clock(), max_entries=1000, extend_only=False)

    def has(self, address: str) -> bool:
        return self.listed.find(address, self.clock()) is not None

    def span(self, address: str) -> timedelta | None:
        """How long the entry for ``address`` lasts, if it is listed."""
        entry = self.listed.find(address, self.clock())
        return None if entry is None else entry.until - entry.since

    @contextmanager
    def unmirrored(self) -> Iterator[None]:
        """Changes to the list made as if before the mirror existed."""
        self.listed.on_change = None
        yield
        self.listed.on_change = self.mirror._changed


@asynccontextmanager
async def _node(
    url: str, tmp_path: Path, name: str, clock: _Clock | None = None, **kw: float
) -> AsyncIterator[_Node]:
    """The node ``name``, its spool at ``tmp_path / name``."""
    spool = tmp_path / name
    (spool / "tmp").mkdir(parents=True, exist_ok=True)
    listed = Suppressions(spool, owner=True)
    await listed.load()
    clock = clock or _Clock()
    async with SharedState(FleetSettings(url=url, node=name, **kw)) as shared:
        mirror = SuppressionMirror(shared, listed, now=clock, max_entries=lambda: 1000)
        yield _Node(shared, listed, mirror, clock)


@asynccontextmanager
async def _two_nodes(
    redis_server: RedisServer,
    tmp_path: Path,
    clock: _Clock | None = None,
    *,
    a: dict[str, float] | None = None,
    b: dict[str, float] | None = None,
    synced: bool = True,
) -> AsyncIterator[tuple[_Node, _Node]]:
    """The nodes ``a`` and ``b`` (with ``a`` and ``b`` their fleet
    settings) on one Redis; each has made its first step unless not
    ``synced``."""
    async with (
        _node(redis_server.url, tmp_path, "a", clock, **(a or {})) as node_a,
        _node(redis_server.url, tmp_path, "b", clock, **(b or {})) as node_b,
    ):
        if synced:
            assert await node_a.mirror.step() and await node_b.mirror.step()
        yield node_a, node_b


async def _on_disk(spool: Path) -> Suppressions:
    """The list as the spool's file holds it."""
    again = Suppressions(spool, owner=False)
    await again.load()
    return again


async def _fleet_entry(node: _Node, address: str) -> Suppression:
    """The fleet's entry for ``address``, as its hash holds it."""
    raw = await node.shared.client.hget(HASH_KEY, address)
    return msgspec.json.decode(raw or "", type=Suppression)


async def _until(check: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not check():
            await anyio.sleep(0.02)


async def test_an_address_suppressed_at_one_node_is_at_the_other(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _two_nodes(redis_server, tmp_path) as (a, b):
        await a.suppress("Gone@Example.COM")
        assert await a.mirror.step()  # pushed
        assert not b.has("gone@example.com")
        assert await b.mirror.step()  # read and applied
        assert b.has("gone@example.com")
        # durable at b too: its file holds it
        again = await _on_disk(tmp_path / "b")
        assert again.find("gone@example.com", b.clock()) is not None
        # the entry as a made it
        assert b.listed.find("gone@example.com", b.clock()) == a.listed.find(
            "gone@example.com", a.clock()
        )
        # A removal at b reaches a.
        await b.listed.remove(["gone@example.com"], now=b.clock())
        assert await b.mirror.step() and await a.mirror.step()
        assert not a.has("gone@example.com")
        assert await a.shared.client.hlen(HASH_KEY) == 0


async def test_the_run_loop_carries_a_change_within_its_interval(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _two_nodes(redis_server, tmp_path, synced=False) as (a, b):
        a.mirror.interval = b.mirror.interval = 0.1
        async with anyio.create_task_group() as tg:
            await tg.start(a.mirror.run)
            await tg.start(b.mirror.run)
            with anyio.fail_after(10):
                await a.mirror.synced.wait()
                await b.mirror.synced.wait()
            await a.suppress("x@example.com")
            await _until(lambda: b.has("x@example.com"))
            await b.listed.remove_where(source="operator", since=None, now=b.clock())
            await _until(lambda: not a.has("x@example.com"))
            tg.cancel_scope.cancel()


async def test_entries_end_at_every_node_and_leave_the_fleets_hash(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    clock = _Clock()
    async with _two_nodes(redis_server, tmp_path, clock) as (a, b):
        await a.suppress("short@example.com", timedelta(minutes=5))
        await a.suppress("long@example.com", timedelta(days=5))
        assert await a.mirror.step() and await b.mirror.step()
        assert b.has("short@example.com") and b.has("long@example.com")
        clock.now += timedelta(minutes=6)
        assert not b.has("short@example.com") and b.has("long@example.com")
        a.mirror._pruned = float("-inf")  # the next step prunes
        assert await a.mirror.step()
        assert await a.shared.client.hkeys(HASH_KEY) == ["long@example.com"]
        assert await a.shared.client.zrange(ENDS_KEY, 0, -1) == ["long@example.com"]


async def test_an_ended_entry_is_not_taken_at_catch_up(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    clock = _Clock()
    async with _node(redis_server.url, tmp_path, "a", clock) as a:
        assert await a.mirror.step()
        await a.suppress("short@example.com", timedelta(minutes=5))
        assert await a.mirror.step()
    clock.now += timedelta(minutes=6)  # not pruned yet from the hash
    async with _node(redis_server.url, tmp_path, "b", clock) as b:
        assert await b.mirror.step()
        assert not b.listed.holds("short@example.com")


async def test_changes_made_while_redis_is_down_go_out_when_it_is_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _two_nodes(
        redis_server,
        tmp_path,
        a=dict(retry_after=0, timeout=0.5),
        b=dict(retry_after=0, timeout=0.5),
    ) as (a, b):
        await a.suppress("before@example.com")
        assert await a.mirror.step() and await b.mirror.step()
        redis_server.stop()
        await a.suppress("while-down@example.com")  # the local list takes it at once
        assert a.has("while-down@example.com")
        assert not await a.mirror.step()
        assert not a.shared.health.up
        redis_server.start()  # same port, empty: the fleet's list is gone too
        assert await a.mirror.step()  # pushes what waited, reads: a gap (log gone)
        assert await b.mirror.step()  # b finds the log gone: catches up, pushes its own
        assert b.has("while-down@example.com") and b.has("before@example.com")
        assert await a.mirror.step()
        fleet = set(await a.shared.client.hkeys(HASH_KEY))
        assert fleet == {"before@example.com", "while-down@example.com"}


async def test_a_node_that_joins_takes_the_fleets_list_and_adds_its_own(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _node(redis_server.url, tmp_path, "a") as a:
        await a.suppress("from-a@example.com")
        assert await a.mirror.step()
        async with _node(redis_server.url, tmp_path, "b") as b:
            # b had its own list before it joined
            await b.suppress("from-b@example.com")
            with b.unmirrored():  # as if made before the mirror existed
                b.mirror._pending.clear()
            assert await b.mirror.step()
            assert b.has("from-a@example.com") and b.has("from-b@example.com")
            assert await a.mirror.step()
            assert a.has("from-b@example.com")


async def test_a_log_trimmed_past_a_node_means_catching_up(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _two_nodes(redis_server, tmp_path) as (a, b):
        await a.suppress("one@example.com")
        assert await a.mirror.step() and await b.mirror.step()
        await a.suppress("two@example.com")
        await a.listed.remove(["one@example.com"], now=a.clock())
        assert await a.mirror.step()
        await a.shared.client.xtrim(LOG_KEY, maxlen=0)  # b's last line is gone
        assert await b.mirror.step()
        assert b.has("two@example.com")
        # The removal was in the lost lines: b kept its entry and put it back
        # (catch-up errs on the side of not sending; documented).
        assert b.has("one@example.com")
        assert await a.mirror.step()
        assert a.has("one@example.com")


async def test_the_last_change_to_an_address_wins_everywhere(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _two_nodes(redis_server, tmp_path) as (a, b):
        await a.suppress("x@example.com", timedelta(days=1))
        assert await a.mirror.step()
        await b.suppress("x@example.com", timedelta(days=9))  # b's change, not yet read a's
        assert await b.mirror.step()  # pushes its own after a's: b's is the last
        assert await a.mirror.step()
        for node in (a, b):
            assert node.span("x@example.com") == timedelta(days=9)


async def test_a_line_of_garbage_in_the_log_is_skipped(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _node(redis_server.url, tmp_path, "a") as a:
        assert await a.mirror.step()
        await a.shared.client.xadd(
            LOG_KEY, {"node": "z", "address": "bad@example.com", "entry": "{not json"}
        )
        await a.shared.client.xadd(LOG_KEY, {"node": "z"})
        entry = suppression_for(
            "ok@example.com", now=a.clock(), span=timedelta(days=1), reason="", source="bounce"
        )
        await a.shared.client.xadd(
            LOG_KEY, {"node": "z", "address": entry.address, "entry": _json(entry)}
        )
        # An entry with a reason no node would write: cleaned and cut.
        loud = msgspec.structs.replace(
            entry, address="loud@example.com", reason="\x1b[31m" + "x" * 5000
        )
        await a.shared.client.xadd(
            LOG_KEY, {"node": "z", "address": loud.address, "entry": _json(loud)}
        )
        assert await a.mirror.step()
        assert a.has("ok@example.com") and not a.listed.holds("bad@example.com")
        kept = a.listed.find("loud@example.com", a.clock())
        assert kept is not None and len(kept.reason) <= MAX_REASON and "\x1b" not in kept.reason


async def test_redis_down_costs_the_submit_path_nothing(tmp_path: Path) -> None:
    # A closed port: the mirror's step fails, the local list works as ever.
    async with _node("redis://127.0.0.1:1/0", tmp_path, "a", timeout=0.5) as a:
        assert not await a.mirror.step()
        await a.suppress("x@example.com")
        assert a.has("x@example.com")
        assert a.mirror._pending  # waits for Redis


def _json(entry: Suppression) -> str:
    return msgspec.json.encode(entry).decode()


async def test_what_ends_or_a_full_list_drops_is_not_a_change_for_the_fleet(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    clock = _Clock()
    async with _node(redis_server.url, tmp_path, "a", clock) as a:
        assert await a.mirror.step()
        await a.suppress("short@example.com", timedelta(minutes=1))
        await a.suppress("long@example.com", timedelta(days=1))
        assert await a.mirror.step()
        clock.now += timedelta(minutes=2)
        assert await a.listed.prune(clock(), max_entries=0) == 2  # ended, then the bound
        assert not a.mirror._pending
        assert await a.mirror.step()
        # still the fleet's: this node's own bound does not lift them elsewhere
        assert set(await a.shared.client.hkeys(HASH_KEY)) == {
            "short@example.com",
            "long@example.com",
        }


async def test_a_local_write_that_fails_never_ends_the_mirror(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _two_nodes(redis_server, tmp_path) as (a, b):
        (tmp_path / "b" / "tmp").rmdir()  # b's next write of its list fails
        await a.suppress("x@example.com")
        assert await a.mirror.step()
        b.mirror.interval = 0.05
        async with anyio.create_task_group() as tg:
            await tg.start(b.mirror.run)
            await _until(lambda: b.mirror._failing)
            await anyio.sleep(0.2)  # a few rounds that fail: the mirror goes on
            (tmp_path / "b" / "tmp").mkdir()
            await _until(lambda: not b.mirror._failing)
            tg.cancel_scope.cancel()
        again = await _on_disk(tmp_path / "b")  # on b's disk, not only in its memory
        assert again.find("x@example.com", b.clock()) is not None


async def test_the_last_change_wins_over_more_than_a_page_of_the_log(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _two_nodes(redis_server, tmp_path) as (a, b):
        await a.suppress("x@example.com")
        assert await a.mirror.step() and await b.mirror.step()
        await b.listed.remove(["x@example.com"], now=b.clock())
        assert await b.mirror.step()  # b's removal of x: a has not read it yet
        async with a.shared.client.pipeline(transaction=False) as pipe:
            for i in range(1200):  # more than a page of other changes
                pipe.xadd(LOG_KEY, {"node": "c", "address": f"n{i}@example.net", "entry": ""})
            await pipe.execute()
        await a.suppress("x@example.com")  # a's change, the last in the log
        assert await a.mirror.step()
        assert await b.mirror.step()
        assert a.has("x@example.com") and b.has("x@example.com")
        assert await a.shared.client.hexists(HASH_KEY, "x@example.com")


async def test_catch_up_puts_only_where_the_fleet_still_lacks_the_address(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _node(redis_server.url, tmp_path, "b") as b:
        assert await b.mirror.step()
        async with _node(redis_server.url, tmp_path, "a") as a:
            # a held x (a day) before it joined
            with a.unmirrored():
                await a.suppress("x@example.com", timedelta(days=1))
            apply = a.mirror._apply

            async def apply_then_b_changes(added: list[Suppression], removed: list[str]) -> None:
                await apply(added, removed)
                a.mirror._apply = apply  # once: between a's read of the fleet and its put
                await b.suppress("x@example.com", timedelta(days=365))  # an operator at b
                assert await b.mirror.step()

            a.mirror._apply = apply_then_b_changes  # type: ignore[method-assign]
            assert await a.mirror.step()  # a's catch-up
            assert await b.mirror.step()
            for node in (a, b):
                assert node.span("x@example.com") == timedelta(days=365)
            fleet = await _fleet_entry(a, "x@example.com")
            assert fleet.until - fleet.since == timedelta(days=365)


async def test_changes_made_while_redis_is_down_outlive_a_restart(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    closed = "redis://127.0.0.1:1/0"
    async with _node(redis_server.url, tmp_path, "a") as a:
        assert await a.mirror.step()
        await a.suppress("lift-me@example.com")
        await a.suppress("extend-me@example.com", timedelta(days=1))
        assert await a.mirror.step()
    # Redis cut off from a; an operator lifts one and extends the other; a stops.
    async with _node(closed, tmp_path, "a", timeout=0.2) as a:
        await a.listed.remove(["lift-me@example.com"], now=a.clock())
        await a.suppress("extend-me@example.com", timedelta(days=365))
        assert not await a.mirror.step()
        assert (tmp_path / "a" / PENDING_FILE).exists()
    async with _node(redis_server.url, tmp_path, "a") as a:  # Redis back
        assert await a.mirror.step()  # catch-up: the kept changes go first and win
        assert not a.has("lift-me@example.com")
        assert a.span("extend-me@example.com") == timedelta(days=365)
        assert not (tmp_path / "a" / PENDING_FILE).exists()  # all went out
        async with _node(redis_server.url, tmp_path, "b") as b:
            assert await b.mirror.step()  # the fleet has a's changes
            assert not b.has("lift-me@example.com")
            assert b.span("extend-me@example.com") == timedelta(days=365)


async def test_a_key_of_another_type_is_that_keys_problem_not_redis_down(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _node(redis_server.url, tmp_path, "a", retry_after=0) as a:
        assert await a.mirror.step()
        await a.shared.client.delete(LOG_KEY)
        await a.shared.client.set(LOG_KEY, "not a stream")  # WRONGTYPE for every call on it
        for _ in range(3):
            assert not await a.mirror.step()
            assert await a.shared.ping()
        assert a.shared.health.up is True and a.shared.health.outages == 0


async def test_catch_up_takes_at_most_the_nodes_bound_those_that_last_longest(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    clock = _Clock()
    async with _node(redis_server.url, tmp_path, "a", clock) as a:
        entries = [
            suppression_for(
                f"n{i}@example.net",
                now=clock(),
                span=timedelta(days=1 + i),
                reason="",
                source="bounce",
            )
            for i in range(2500)  # more than a page of the fleet's hash
        ]
        await a.shared.client.hset(HASH_KEY, mapping={e.address: _json(e) for e in entries})
        (tmp_path / "b" / "tmp").mkdir(parents=True)
        listed = Suppressions(tmp_path / "b", owner=True)
        await listed.load()
        mirror = SuppressionMirror(a.shared, listed, now=clock, max_entries=lambda: 100)
        assert await mirror.step()
        assert {e.address for e in listed.snapshot()} == {e.address for e in entries[-100:]}
        again = await _on_disk(tmp_path / "b")  # durable: one write for all the slices
        assert len(again) == 100


async def test_catch_up_puts_an_entry_where_the_fleets_one_ended(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    clock = _Clock()
    async with _node(redis_server.url, tmp_path, "b", clock) as b:
        assert await b.mirror.step()
        await b.suppress("x@example.com", timedelta(minutes=5))
        assert await b.mirror.step()
        clock.now += timedelta(minutes=6)  # ended, not pruned from the hash yet
        async with _node(redis_server.url, tmp_path, "a", clock) as a:
            with a.unmirrored():  # a held x before it joined
                await a.suppress("x@example.com", timedelta(days=1))
            assert await a.mirror.step()
            assert await b.mirror.step()
            assert b.has("x@example.com")
            fleet = await _fleet_entry(a, "x@example.com")
            assert fleet.until - fleet.since == timedelta(days=1)


async def test_an_error_reply_about_the_whole_server_is_redis_down(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _node(redis_server.url, tmp_path, "a", retry_after=0) as a:
        assert await a.mirror.step()
        await a.shared.client.config_set("maxmemory", 1)  # every write: OOM
        try:
            await a.suppress("x@example.com")
            assert not await a.mirror.step()
            assert a.shared.health.up is False and a.shared.health.outages == 1
        finally:
            await a.shared.client.config_set("maxmemory", 0)
        assert await a.mirror.step()
        assert a.shared.health.up is True


async def test_a_redis_that_hangs_costs_a_round_one_timeout(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _two_nodes(redis_server, tmp_path, a=dict(timeout=0.2, retry_after=0)) as (a, b):
        redis_server.pause()  # takes connections, never answers
        try:
            await a.suppress("x@example.com")
            with anyio.fail_after(2):  # ten timeouts
                assert not await a.mirror.step()
            assert a.shared.health.up is False and a.has("x@example.com")
        finally:
            redis_server.resume()
        with anyio.fail_after(10):
            assert await a.mirror.step()
        assert a.shared.health.up is True
        assert await b.mirror.step() and b.has("x@example.com")


async def test_a_catch_up_puts_all_but_logs_a_bounded_number_operators_first(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet_suppression, "CATCH_UP_LINES", 3)
    clock = _Clock()
    async with _node(redis_server.url, tmp_path, "a", clock) as a:
        with a.unmirrored():  # a held these before it joined
            entries = [
                suppression_for(
                    f"{source}{i}@example.net",
                    now=clock(),
                    span=timedelta(days=1),
                    reason="",
                    source=source,
                )
                for i in range(5)
                for source in ("bounce", "operator")
            ]
            await a.listed.add(entries, now=clock(), max_entries=1000, extend_only=False)
        assert await a.mirror.step()
        assert await a.shared.client.hlen(HASH_KEY) == 10
        lines = await a.shared.client.xrange(LOG_KEY)
        assert len(lines) == 3
        assert all(f["address"].startswith("operator") for _, f in lines)


async def test_a_local_change_made_during_a_catch_up_wins_over_what_it_read(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with _node(redis_server.url, tmp_path, "b") as b:
        assert await b.mirror.step()
        await b.suppress("x@example.com", timedelta(days=1))
        assert await b.mirror.step()
        async with _node(redis_server.url, tmp_path, "a") as a:
            apply = a.mirror._apply

            async def change_then_apply(added: list[Suppression], removed: list[str]) -> None:
                a.mirror._apply = apply  # once: after a read the fleet's x
                await a.suppress("x@example.com", timedelta(days=365))  # an operator at a
                await apply(added, removed)

            a.mirror._apply = change_then_apply  # type: ignore[method-assign]
            assert await a.mirror.step()  # catch-up, then a's change goes out
            assert await b.mirror.step()
            for node in (a, b):
                assert node.span("x@example.com") == timedelta(days=365)
