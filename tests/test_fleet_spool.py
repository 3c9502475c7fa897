"""A spool with shared rates (``Spool.shared_rates``, the fleet's GCRA in
the daemon): a send job of a route with a rate takes the shared token
after the local gate; without one it ends and the message is held until
the token comes (no send job waits); it goes ahead when the shared state
does not answer. A stand-in for
Redis here (tests/test_fleet.py tests the real one)."""

from __future__ import annotations

from pathlib import Path

import anyio

from spoold.limits import Rate
from spoold.message import Queue
from spoold.testing import FakeClock
from tests.relay_helpers import MakeRelay, route
from tests.smtp_server import StartServer
from tests.spool_helpers import START
from tests.support import wait_until
from tests.test_limits import add, router_for, spool_with


class Shared:
    """Answers from a script: each call takes the next (the last repeats)."""

    def __init__(self, *answers: float | None) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, Rate]] = []

    async def gcra(self, destination: str, rate: Rate) -> float | None:
        self.calls.append((destination, rate))
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


async def _one_message(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay, shared: Shared
) -> tuple[int, str]:
    hop = await start_smtp_server()
    router = router_for(tmp_path, {"free": {"next_hops": [hop.hop], "rate": "10/s"}})
    async with spool_with(tmp_path, make_relay(route()), router, FakeClock(START)) as (spool, _):
        spool.shared_rates = shared
        mid = await add(spool, router, "ops@example.com")
        await wait_until(lambda: hop.transactions == 1, "the message to arrive")
    return hop.transactions, mid


async def test_the_message_is_held_until_the_shared_token_comes(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    hop = await start_smtp_server()
    router = router_for(tmp_path, {"free": {"next_hops": [hop.hop], "rate": "10/s"}})
    shared = Shared(0.5, 0.5, 0.0)
    clock = FakeClock(START)
    async with spool_with(tmp_path, make_relay(route()), router, clock) as (spool, _):
        spool.shared_rates = shared
        await add(spool, router, "ops@example.com")
        for asked in (1, 2):
            await wait_until(lambda n=asked: len(shared.calls) == n, "the token to be asked")
            assert hop.transactions == 0
            clock.advance(0.5)  # held for the wait the shared state gave
        await wait_until(lambda: hop.transactions == 1, "the message to arrive")
    assert [(d, str(r)) for d, r in shared.calls] == [("free", "10/s")] * 3


async def test_no_answer_from_the_shared_state_is_the_local_rate_alone(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    shared = Shared(None)
    assert (await _one_message(tmp_path, start_smtp_server, make_relay, shared))[0] == 1
    assert len(shared.calls) == 1


async def test_a_route_without_a_rate_never_asks(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    hop = await start_smtp_server()
    router = router_for(tmp_path, {"free": {"next_hops": [hop.hop]}})
    shared = Shared(5.0)
    async with spool_with(tmp_path, make_relay(route()), router, FakeClock(START)) as (spool, _):
        spool.shared_rates = shared
        await add(spool, router, "ops@example.com")
        await wait_until(lambda: hop.transactions == 1, "the message to arrive")
    assert shared.calls == []


async def test_stopping_while_held_for_the_token_leaves_the_message_queued(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    hop = await start_smtp_server()
    router = router_for(tmp_path, {"free": {"next_hops": [hop.hop], "rate": "10/s"}})
    shared = Shared(0.05)  # never a token
    with anyio.fail_after(10):
        async with spool_with(tmp_path, make_relay(route()), router, FakeClock(START)) as (
            spool,
            _,
        ):
            spool.shared_rates = shared
            mid = await add(spool, router, "ops@example.com")
            await wait_until(lambda: len(shared.calls) == 1, "the token to be asked")
    assert hop.transactions == 0
    async with spool_with(tmp_path, make_relay(route()), router, FakeClock(START)) as (spool, _):
        assert (await spool.get_message(mid)).queue is Queue.ACTIVE


async def test_a_message_waiting_for_the_shared_token_holds_no_send_job(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    limited, free = await start_smtp_server(), await start_smtp_server()
    router = router_for(
        tmp_path,
        {
            "limited": {"domains": ["limited.example"], "next_hops": [limited.hop], "rate": "10/s"},
            "free": {"next_hops": [free.hop]},
        },
    )
    shared = Shared(5.0)  # never a token
    async with spool_with(
        tmp_path, make_relay(route()), router, FakeClock(START), max_concurrent_send_jobs=1
    ) as (spool, _):
        spool.shared_rates = shared
        mid = await add(spool, router, "ops@limited.example")
        await wait_until(lambda: len(shared.calls) == 1, "the shared token to be asked")
        # the one send job is free: another route's mail goes
        await add(spool, router, "ops@free.example")
        await wait_until(lambda: free.transactions == 1, "the other route's message")
        # the waiting message is not being sent: an operator can freeze it
        with anyio.fail_after(10):  # a job waiting for the token would hold it up
            await spool.freeze([mid])
        assert (await spool.get_message(mid)).queue is Queue.FROZEN
    assert limited.transactions == 0
