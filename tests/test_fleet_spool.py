"""A spool with shared rates (``Spool.shared_rates``, the fleet's GCRA in
the daemon): a send job of a route with a rate takes the shared token
after the local gate; without one it ends and the message goes back to the
head of its route's line, which waits until the token is due (no send job
waits, one message asks at a time); it goes ahead when the shared state
does not answer. A stand-in for Redis here (tests/test_fleet.py tests the
real one)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from spoold.daemon.routing import Router
from spoold.limits import Rate, SharedToken
from spoold.message import Queue
from spoold.spool import Spool
from spoold.testing import FakeClock
from tests.fleet_spool_helpers import fleet_spool, one_hop, two_hops
from tests.relay_helpers import MakeRelay
from tests.smtp_server import SmtpTestServer, StartServer
from tests.spool_helpers import START, places
from tests.support import wait_until
from tests.test_limits import add, delivered_through, router_for


class Shared:
    """Answers from a script: each call takes the next (the last repeats);
    a number is a wait with no token booked (ask again then), 0.0 a token
    now, a :class:`SharedToken` itself. With a ``clock``, each call takes
    ``round_trip`` seconds of it."""

    def __init__(
        self,
        *answers: float | SharedToken | None,
        clock: FakeClock | None = None,
        round_trip: float = 0.0,
    ) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, Rate]] = []
        self.clock = clock
        self.round_trip = round_trip

    async def gcra(self, destination: str, rate: Rate) -> SharedToken | None:
        self.calls.append((destination, rate))
        if self.clock is not None:
            self.clock.advance(self.round_trip)
        got = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if got is None or isinstance(got, SharedToken):
            return got
        return SharedToken(got, booked=got == 0.0)


async def _limited_line(
    tmp_path: Path, start_smtp_server: StartServer
) -> tuple[SmtpTestServer, SmtpTestServer, Router, FakeClock]:
    """The two next hops, the route to the first at ``rate = "10/s"``, and
    a clock at START."""
    limited, free, router = await two_hops(tmp_path, start_smtp_server, rate="10/s")
    return limited, free, router, FakeClock(START)


@asynccontextmanager
async def _head_waiting(
    tmp_path: Path,
    make_relay: MakeRelay,
    router: Router,
    clock: FakeClock,
    shared: Shared,
    asked: str = "the token to be asked",
) -> AsyncIterator[tuple[Spool, str]]:
    """A spool asking ``shared``, with ``first@limited.example`` queued and
    its token asked for (``asked`` says so while waiting): the spool and
    the first message's id."""
    async with fleet_spool(tmp_path, make_relay, router, clock, rates=shared) as spool:
        first = await add(spool, router, "first@limited.example")
        await wait_until(lambda: len(shared.calls) == 1, asked)
        yield spool, first


async def _arrive_in_turn(clock: FakeClock, hop: SmtpTestServer, count: int) -> None:
    """The head's token comes (0.5 s on), then ``count`` messages arrive
    at ``hop`` one by one, 100 ms apart (the route's own rate)."""
    clock.advance(0.5)
    for n in range(1, count + 1):
        await wait_until(lambda n=n: hop.transactions == n, "the next to arrive")
        clock.advance(0.1)


def _arrived(hop: SmtpTestServer) -> list[str]:
    """The local part of each message's recipient at ``hop``, in order."""
    return [m.rcpt_tos[0].split("@")[0] for m in hop.messages]


async def _one_message(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay, shared: Shared
) -> tuple[int, str]:
    hop, router = await one_hop(tmp_path, start_smtp_server, rate="10/s")
    async with fleet_spool(tmp_path, make_relay, router, rates=shared) as spool:
        mid = await add(spool, router, "ops@example.com")
        await wait_until(lambda: hop.transactions == 1, "the message to arrive")
    return hop.transactions, mid


async def test_the_message_is_held_until_the_shared_token_comes(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    hop, router = await one_hop(tmp_path, start_smtp_server, rate="10/s")
    shared = Shared(0.5, 0.5, 0.0)
    clock = FakeClock(START)
    async with fleet_spool(tmp_path, make_relay, router, clock, rates=shared) as spool:
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
    hop, router = await one_hop(tmp_path, start_smtp_server)
    shared = Shared(5.0)
    async with fleet_spool(tmp_path, make_relay, router, rates=shared) as spool:
        await add(spool, router, "ops@example.com")
        await wait_until(lambda: hop.transactions == 1, "the message to arrive")
    assert shared.calls == []


async def test_stopping_while_held_for_the_token_leaves_the_message_queued(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    hop, router = await one_hop(tmp_path, start_smtp_server, rate="10/s")
    shared = Shared(0.05)  # never a token
    with anyio.fail_after(10):
        async with fleet_spool(tmp_path, make_relay, router, rates=shared) as spool:
            mid = await add(spool, router, "ops@example.com")
            await wait_until(lambda: len(shared.calls) == 1, "the token to be asked")
    assert hop.transactions == 0
    # Still queued, as the disk says (a running spool would send it at once).
    assert places(tmp_path / "spool", mid) == ["active"]
    assert (tmp_path / "spool" / "data" / mid).exists()


async def test_a_message_waiting_for_the_shared_token_holds_no_send_job(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    limited, free, router = await two_hops(tmp_path, start_smtp_server, rate="10/s")
    shared = Shared(5.0)  # never a token
    async with fleet_spool(
        tmp_path, make_relay, router, rates=shared, max_concurrent_send_jobs=1
    ) as spool:
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


async def test_the_hold_is_the_shared_wait_from_when_it_was_asked(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    # The shared state answers "50 ms" after a 10 ms round trip: the message
    # waits until 50 ms after the question (not after the answer: the next
    # question takes the same way there), and not the route's own 100 ms
    # interval on top (its local token was given back: no attempt was made).
    hop, router = await one_hop(tmp_path, start_smtp_server, rate="10/s")
    clock = FakeClock(START)
    shared = Shared(0.05, 0.0, clock=clock, round_trip=0.01)
    async with fleet_spool(tmp_path, make_relay, router, clock, rates=shared) as spool:
        await add(spool, router, "ops@example.com")
        due = START + timedelta(seconds=0.05)
        await wait_until(lambda: clock.next_deadline == due, "the hold until the token")
        assert hop.transactions == 0 and len(shared.calls) == 1
        clock.advance(due - clock.now())
        await wait_until(lambda: hop.transactions == 1, "the message to arrive")
    assert len(shared.calls) == 2


async def test_a_line_waiting_for_the_shared_token_asks_once_and_keeps_its_order(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    limited, free, router, clock = await _limited_line(tmp_path, start_smtp_server)
    shared = Shared(0.5, 0.0)
    async with _head_waiting(
        tmp_path, make_relay, router, clock, shared, "the shared token to be asked"
    ) as (spool, _):
        await add(spool, router, "second@limited.example")
        await add(spool, router, "third@limited.example")
        await delivered_through(spool, router, free)  # the scheduler went round
        # the later ones wait behind the first; none of them asks meanwhile
        assert len(shared.calls) == 1 and limited.transactions == 0
        clock.advance(0.5)
        await wait_until(lambda: limited.transactions == 1, "the first to arrive")
        for n in (2, 3):  # then the route's own rate, 100 ms apart
            clock.advance(0.1)
            await wait_until(lambda n=n: limited.transactions == n, "the next to arrive")
    assert [m.rcpt_tos for m in limited.messages] == [
        ("first@limited.example",),
        ("second@limited.example",),
        ("third@limited.example",),
    ]
    assert len(shared.calls) == 4


async def test_the_shared_state_failing_lets_a_waiting_line_go_at_the_local_rate(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    # Three wait behind the first for the shared token; then the shared
    # state stops answering: they go on the route's own 10/s, one each
    # 100 ms, not all at once.
    limited, free, router, clock = await _limited_line(tmp_path, start_smtp_server)
    shared = Shared(0.5, None)
    async with _head_waiting(
        tmp_path, make_relay, router, clock, shared, "the shared token to be asked"
    ) as (spool, _):
        for name in ("second", "third", "fourth"):
            await add(spool, router, f"{name}@limited.example")
        clock.advance(0.5)
        for n in (1, 2, 3, 4):
            await wait_until(lambda n=n: limited.transactions == n, "the next to arrive")
            await delivered_through(spool, router, free)  # the scheduler went round
            assert limited.transactions == n  # no more before the next token
            clock.advance(0.1)
    assert _arrived(limited) == [
        "first",
        "second",
        "third",
        "fourth",
    ]


async def test_a_booked_token_is_used_at_its_time_without_asking_again(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    hop, router = await one_hop(tmp_path, start_smtp_server, rate="10/s")
    clock = FakeClock(START)
    shared = Shared(SharedToken(0.3))  # booked 300 ms on
    async with fleet_spool(tmp_path, make_relay, router, clock, rates=shared) as spool:
        await add(spool, router, "ops@example.com")
        due = START + timedelta(seconds=0.3)
        await wait_until(lambda: clock.next_deadline == due, "the hold until the booking")
        assert hop.transactions == 0
        clock.advance(0.3)
        await wait_until(lambda: hop.transactions == 1, "the message to arrive")
    assert len(shared.calls) == 1


async def test_a_booked_head_frozen_and_removed_gives_its_token_to_the_next(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    # The token booked for the head is the line's: the next message uses it
    # at the booked time, without asking.
    limited, free, router, clock = await _limited_line(tmp_path, start_smtp_server)
    shared = Shared(SharedToken(0.5), 0.0)
    async with _head_waiting(
        tmp_path, make_relay, router, clock, shared, "the token to be booked"
    ) as (spool, first):
        await add(spool, router, "second@limited.example")
        await spool.freeze([first])
        await spool.remove([first])
        await delivered_through(spool, router, free)
        assert limited.transactions == 0  # not before the booked time
        clock.advance(0.5)
        await wait_until(lambda: limited.transactions == 1, "the second to arrive")
        assert (await spool.get_message(first)).queue is Queue.REMOVED
    assert [m.rcpt_tos for m in limited.messages] == [("second@limited.example",)]
    assert len(shared.calls) == 1


async def test_a_booking_left_by_a_line_that_emptied_is_not_used_later(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    limited, free, router, clock = await _limited_line(tmp_path, start_smtp_server)
    shared = Shared(SharedToken(0.5), 0.0)
    async with _head_waiting(
        tmp_path, make_relay, router, clock, shared, "the token to be booked"
    ) as (spool, first):
        await spool.freeze([first])  # nobody behind it: the booking is lost
        clock.advance(10.0)
        await delivered_through(spool, router, free)
        await add(spool, router, "second@limited.example")
        await add(spool, router, "third@limited.example")  # waits for the local rate
        await wait_until(lambda: limited.transactions == 1, "the second to arrive")
        clock.advance(0.1)
        await wait_until(lambda: limited.transactions == 2, "the third to arrive")
    assert len(shared.calls) == 3  # each asked: the old booking went to neither


@pytest.mark.parametrize("frozen", [False, True], ids=["send-now", "freeze-then-thaw"])
async def test_sending_the_message_waiting_for_the_shared_token_keeps_it_first(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay, frozen: bool
) -> None:
    # The head waits for the fleet's token with three behind it: `spoold
    # send` (or a freeze and a send, which thaws it) puts it back at the
    # head of the line, not behind the three.
    limited, free, router, clock = await _limited_line(tmp_path, start_smtp_server)
    shared = Shared(0.5, 0.0)
    async with _head_waiting(tmp_path, make_relay, router, clock, shared) as (spool, first):
        for name in ("second", "third", "fourth"):
            await add(spool, router, f"{name}@limited.example")
        await delivered_through(spool, router, free)  # the scheduler went round
        if frozen:
            await spool.freeze([first])
        await spool.send([first])
        await delivered_through(spool, router, free)
        assert limited.transactions == 0  # still held for the token
        await _arrive_in_turn(clock, limited, 4)
    assert _arrived(limited) == [
        "first",
        "second",
        "third",
        "fourth",
    ]


async def test_sending_a_message_in_the_middle_of_a_waiting_line_puts_it_first(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    limited, free, router, clock = await _limited_line(tmp_path, start_smtp_server)
    shared = Shared(0.5, 0.0)
    async with _head_waiting(tmp_path, make_relay, router, clock, shared) as (spool, _):
        ids = [await add(spool, router, f"{n}@limited.example") for n in ("second", "third")]
        await delivered_through(spool, router, free)
        await spool.send([ids[1]])  # "third"
        await delivered_through(spool, router, free)
        await _arrive_in_turn(clock, limited, 3)
    assert _arrived(limited) == [
        "third",
        "first",
        "second",
    ]


async def test_removing_the_message_waiting_for_the_shared_token_lets_the_line_go_on(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    limited, _free, router, clock = await _limited_line(tmp_path, start_smtp_server)
    shared = Shared(0.5, 0.0)
    async with _head_waiting(tmp_path, make_relay, router, clock, shared) as (spool, first):
        for name in ("second", "third"):
            await add(spool, router, f"{name}@limited.example")
        await spool.freeze([first])
        await spool.remove([first])
        await _arrive_in_turn(clock, limited, 2)
        assert (await spool.get_message(first)).queue is Queue.REMOVED
    assert _arrived(limited) == ["second", "third"]


class SlowShared(Shared):
    """Answers only when the test lets it (``answer``): Redis slower than
    the route's own spacing."""

    def __init__(self, *answers: float | SharedToken | None) -> None:
        super().__init__(*answers)
        self.go = anyio.Event()
        self.asking = 0  # questions not answered yet

    def answer(self) -> None:
        self.go.set()
        self.go = anyio.Event()

    async def gcra(self, destination: str, rate: Rate) -> SharedToken | None:
        go = self.go
        self.asking += 1
        await go.wait()
        self.asking -= 1
        return await super().gcra(destination, rate)


async def test_a_slow_shared_state_still_has_one_of_a_line_ask_at_a_time(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    limited, free, router, clock = await _limited_line(tmp_path, start_smtp_server)
    shared = SlowShared(0.5, 0.0)
    async with fleet_spool(tmp_path, make_relay, router, clock, rates=shared) as spool:
        await add(spool, router, "first@limited.example")
        await wait_until(lambda: shared.asking == 1, "the first to ask")
        for name in ("second", "third"):
            await add(spool, router, f"{name}@limited.example")
        clock.advance(0.3)  # the route's own spacing passed, twice: no answer yet
        await delivered_through(spool, router, free)  # the scheduler went round
        assert shared.asking == 1  # the others wait for the answer
        shared.answer()  # "not before 0.5 s after it asked"
        await wait_until(lambda: len(shared.calls) == 1, "the answer")
        await delivered_through(spool, router, free)
        assert shared.asking == 0  # the line waits for the first's time
        clock.advance(0.2)
        for n in (1, 2, 3):
            await wait_until(lambda: shared.asking == 1, "the next to ask")
            shared.answer()
            await wait_until(lambda n=n: limited.transactions == n, "the next to arrive")
            clock.advance(0.1)
    assert _arrived(limited) == [
        "first",
        "second",
        "third",
    ]


async def test_a_reload_to_a_faster_rate_gives_up_a_booking_at_the_slower_one(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    # Booked an hour on at "1/h"; a reload makes the route "10/s": the head
    # asks again at once (the shared state's schedule at 1/h is far beyond
    # what 10/s books: it starts afresh) instead of waiting the hour.
    hop = await start_smtp_server()
    routes: dict[str, dict[str, Any]] = {"free": {"next_hops": [hop.hop], "rate": "1/h"}}
    router = router_for(tmp_path, routes)
    clock = FakeClock(START)
    shared = Shared(SharedToken(3599.0), 0.0)
    async with fleet_spool(tmp_path, make_relay, router, clock, rates=shared) as spool:
        await add(spool, router, "ops@example.com")
        await wait_until(lambda: len(shared.calls) == 1, "the token to be booked")
        routes["free"]["rate"] = "10/s"
        new = router_for(tmp_path, routes)
        spool.routes = new
        spool.limits = new
        await wait_until(lambda: hop.transactions == 1, "the message to arrive")
    assert [str(rate) for _, rate in shared.calls] == ["1/h", "10/s"]
