"""A spool with shared rates (``Spool.shared_rates``, the fleet's GCRA in
the daemon): a send job of a route with a rate takes the shared token
after the local gate, waits for it, goes ahead when the shared state does
not answer, and gives up its wait when the spool stops. A stand-in for
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


async def test_the_job_waits_for_the_shared_token(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    shared = Shared(0.01, 0.01, 0.0)
    assert (await _one_message(tmp_path, start_smtp_server, make_relay, shared))[0] == 1
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


async def test_stopping_ends_the_wait_and_the_message_stays_queued(
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
            await wait_until(lambda: len(shared.calls) >= 2, "the job to wait for a token")
    assert hop.transactions == 0
    async with spool_with(tmp_path, make_relay(route()), router, FakeClock(START)) as (spool, _):
        assert (await spool.get_message(mid)).queue is Queue.ACTIVE
