"""A spool with shared connection slots (``Spool.shared_slots``, the
fleet's leases in the daemon): a send job of a route with limits takes a
slot after the local gate (and after the fleet's rate token, so a message
the rate holds takes none); none free, it ends and the message is held a
moment (no send job waits); the attempt's connection is closed after it
(the slot is one attempt, never an idle connection); the slot is given
back when the attempt ends. A stand-in for Redis here
(tests/test_fleet_slots.py tests the real one)."""

from __future__ import annotations

from pathlib import Path

import anyio

from spoold.limits import Rate, SharedToken, SlotWait
from spoold.message import Queue, RoutedBatch
from spoold.testing import FakeClock
from tests.fleet_spool_helpers import fleet_spool, one_hop, two_hops
from tests.relay_helpers import MakeRelay
from tests.smtp_server import StartServer
from tests.spool_helpers import BODY, SENDER, START, settle
from tests.support import wait_until
from tests.test_limits import add


class Slots:
    """Answers ``take`` from a script (a float: wait; else a slot named
    after the call), and keeps what was taken and given back."""

    def __init__(self, *answers: float | None) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, int]] = []
        self.given_back: list[str] = []

    async def take(self, destination: str, limit: int) -> str | SlotWait:
        self.asked.append((destination, limit))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return f"slot-{len(self.asked)}" if answer is None else SlotWait(answer)

    async def give_back(self, holder: str) -> None:
        self.given_back.append(holder)


class NoRate:
    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.calls = 0

    async def gcra(self, destination: str, rate: Rate) -> SharedToken | None:
        self.calls += 1
        return SharedToken(self.wait)


async def test_a_slot_per_attempt_and_its_connection_closed_after_it(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    hop, router = await one_hop(tmp_path, start_smtp_server, max_connections=3)
    slots = Slots(None)
    async with fleet_spool(tmp_path, make_relay, router, slots=slots) as spool:
        await add(spool, router, "a@example.com")
        await wait_until(lambda: hop.transactions == 1, "the first message")
        await wait_until(lambda: slots.given_back == ["slot-1"], "its slot given back")
        await add(spool, router, "b@example.com")
        await wait_until(lambda: slots.given_back == ["slot-1", "slot-2"], "the second slot back")
        # Each attempt said QUIT and closed: no connection is kept idle.
        assert hop.transactions == 2 and hop.count("QUIT") == 2
        assert hop.connections_opened == 2 and hop.open_connections == 0
    assert slots.asked == [("free", 3), ("free", 3)]


async def test_no_free_slot_holds_the_message_a_moment_then_it_goes(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    hop, router = await one_hop(tmp_path, start_smtp_server, max_connections=4)
    slots = Slots(0.5, 0.5, None)
    clock = FakeClock(START)
    async with fleet_spool(tmp_path, make_relay, router, clock, slots=slots) as spool:
        await add(spool, router, "ops@example.com")
        for asked in (1, 2):
            await wait_until(lambda n=asked: len(slots.asked) == n, "a slot to be asked")
            assert hop.transactions == 0 and spool.sending == 0  # no job waits
            clock.advance(0.5)
        await wait_until(lambda: hop.transactions == 1, "the message to arrive")
        await wait_until(lambda: slots.given_back == ["slot-3"], "the slot given back")


async def test_a_message_waiting_for_a_slot_holds_no_send_job(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    limited, free, router = await two_hops(
        tmp_path, start_smtp_server, {"max_connections": 4}, max_connections=4
    )

    class OnlyFree(Slots):
        async def take(self, destination: str, limit: int) -> str | SlotWait:
            self.asked.append((destination, limit))
            return SlotWait(5.0) if destination == "limited" else f"slot-{len(self.asked)}"

    slots = OnlyFree()
    async with fleet_spool(
        tmp_path, make_relay, router, slots=slots, max_concurrent_send_jobs=1
    ) as spool:
        mid = await add(spool, router, "ops@limited.example")
        await wait_until(lambda: len(slots.asked) == 1, "a slot to be asked")
        await add(spool, router, "ops@free.example")
        await wait_until(lambda: free.transactions == 1, "the other route's message")
        await spool.freeze([mid])  # not being sent: an operator can freeze it
        assert (await spool.get_message(mid)).queue is Queue.FROZEN
    assert limited.transactions == 0


async def test_a_message_the_rate_holds_takes_no_slot(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    hop, router = await one_hop(tmp_path, start_smtp_server, rate="10/s", max_connections=4)
    slots, rate = Slots(None), NoRate(5.0)
    async with fleet_spool(tmp_path, make_relay, router, slots=slots, rates=rate) as spool:
        await add(spool, router, "ops@example.com")
        await wait_until(lambda: rate.calls == 1 and spool.sending == 0, "the rate's hold")
    assert slots.asked == [] and hop.transactions == 0


async def test_a_slot_given_back_slowly_holds_nothing_up(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    # The first message's slot takes long to go back (Redis slow): the
    # message is no longer busy meanwhile, and the next one, held by the
    # rate and then due, goes.
    hop, router = await one_hop(tmp_path, start_smtp_server, rate="10/s", max_connections=4)
    let_go = anyio.Event()

    class SlowBack(Slots):
        async def give_back(self, holder: str) -> None:
            if holder == "slot-1":
                await let_go.wait()
            self.given_back.append(holder)

    slots, rate, clock = SlowBack(None), NoRate(0.0), FakeClock(START)
    async with fleet_spool(tmp_path, make_relay, router, clock, slots=slots, rates=rate) as spool:
        await add(spool, router, "a@example.com")
        await wait_until(lambda: hop.transactions == 1 and spool.sending == 0, "the first")
        rate.wait = 0.5
        await add(spool, router, "b@example.com")
        clock.advance(0.1)  # the local rate's spacing
        await wait_until(lambda: rate.calls == 2, "the second held by the rate")
        rate.wait = 0.0
        clock.advance(0.5)
        await wait_until(lambda: hop.transactions == 2, "the second message")
        await wait_until(lambda: slots.given_back == ["slot-2"], "its slot back, not the first")
        let_go.set()
        await wait_until(lambda: sorted(slots.given_back) == ["slot-1", "slot-2"], "both back")


async def test_a_backlog_on_a_full_route_waits_in_its_line_and_asks_sparingly(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    # 2000 messages queued for a route whose fleet is always full: each
    # refusal sends the message back to the head of the route's line, and
    # the line waits the retry the fleet suggests; the rest of the backlog
    # takes no send job and asks nothing meanwhile.
    hop, router = await one_hop(tmp_path, start_smtp_server, max_connections=4)
    slots, clock = Slots(0.1), FakeClock(START)
    async with fleet_spool(tmp_path, make_relay, router, clock, slots=slots) as spool:
        (envelope,) = router.route(SENDER, ["ops@example.com"])
        await spool.add(RoutedBatch([envelope] * 2000, BODY))
        for _ in range(5):
            asked = len(slots.asked)
            await wait_until(lambda a=asked: len(slots.asked) > a, "the line to ask again")
            await wait_until(lambda: spool.sending == 0, "the refused jobs to end")
            await settle()
            clock.advance(0.1)
        await settle()
        # About max_connections asks per retry, not one per message.
        assert len(slots.asked) <= 6 * 4, len(slots.asked)
    assert hop.transactions == 0


async def test_a_route_left_at_the_default_max_connections_is_not_counted_and_reuses(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    # Only a route whose max_connections is set is counted with the others
    # (and gives up connection reuse for it); one left at the default
    # keeps its own limit and reuses its connection.
    hop, router = await one_hop(tmp_path, start_smtp_server)
    slots = Slots(None)
    async with fleet_spool(tmp_path, make_relay, router, slots=slots) as spool:
        await add(spool, router, "a@example.com")
        await wait_until(lambda: hop.transactions == 1 and spool.sending == 0, "the first")
        await add(spool, router, "b@example.com")
        await wait_until(lambda: hop.transactions == 2, "the second message")
        assert hop.connections_opened == 1  # the first one's connection, reused
    assert slots.asked == [] and slots.given_back == []


async def test_no_fleet_token_is_made_up_for_a_line_refused_a_slot(
    tmp_path: Path, start_smtp_server: StartServer, make_relay: MakeRelay
) -> None:
    """Redis did not answer for the rate (None) and the slot was refused:
    the message waits for a slot with no token booked, so when its turn
    comes it asks the fleet's rate again instead of going on a token
    nobody took."""

    class SilentOnce:
        def __init__(self) -> None:
            self.calls = 0

        async def gcra(self, destination: str, rate: Rate) -> SharedToken | None:
            self.calls += 1
            return None if self.calls == 1 else SharedToken(0.0)

    hop, router = await one_hop(tmp_path, start_smtp_server, max_connections=4, rate="100/s")
    rates, slots, clock = SilentOnce(), Slots(0.5, None), FakeClock(START)
    async with fleet_spool(tmp_path, make_relay, router, clock, rates=rates, slots=slots) as spool:
        await add(spool, router, "a@example.com")
        await wait_until(lambda: len(slots.asked) == 1, "the slot refused")
        clock.advance(0.6)
        await wait_until(lambda: hop.transactions == 1, "sent")
    assert rates.calls == 2  # the token it went on was taken, not assumed
