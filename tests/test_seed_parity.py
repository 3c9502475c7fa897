"""Where spoold behaves as async_smtp's spool does (issue 13, point 7): a 421
goes through on_error, a presend "send at" is published as delayed, the
operator operations are refused after kill_and_flush, a directory that is
not a spool is not taken for one, and (issue 19) a message whose retry
intervals are used up is frozen, with the default policy (no lifetime) or
``retries_exhausted = freeze`` beside a lifetime."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from spoold.daemon.config import parse_config
from spoold.daemon.routing import Router
from spoold.errors import SpoolClosedError, StoreError
from spoold.events import EventKind
from spoold.hooks import ErrorAction
from spoold.message import (
    Message,
    RoutedBatch,
    RoutedEnvelope,
    SendAt,
    decode_record,
    encode_record,
)
from spoold.outcome import DeliveryPolicy, RetriesExhausted
from spoold.relay import RecipientResult
from spoold.spool import Spool
from spoold.testing import FakeClock
from tests.relay_helpers import MakeRelay, route
from tests.smtp_server import Reply, SmtpTestServer
from tests.spool_helpers import (
    BODY,
    MINUTE,
    SENDER,
    START,
    TRY_LATER,
    batch,
    intervals,
    next_events,
    open_spool,
    places,
    relay_answering,
    settle,
)

RCPT = "rcpt@example.com"


async def test_a_421_reaches_on_error_which_may_answer_rate_limited(
    smtp_server: SmtpTestServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    smtp_server.behaviour.rcpt[RCPT] = Reply("421 4.7.0 too fast, closing")
    asked: list[tuple[str, RecipientResult]] = []

    def on_error(message: Message, rcpt: str, result: RecipientResult) -> ErrorAction:
        asked.append((rcpt, result))
        return ErrorAction.TRY_LATER_RATE_LIMITED

    submission = RoutedBatch([RoutedEnvelope(SENDER, [RCPT], [smtp_server.hop])], BODY)
    async with (
        open_spool(tmp_path, make_relay(route()), FakeClock(START), on_error=on_error) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(submission)
        events = await next_events(stream, 4)

    assert asked == [(RCPT, RecipientResult(421, "too fast, closing", "4.7.0"))]
    assert [e.kind for e in events] == [
        EventKind.SPOOLED,
        EventKind.PRESEND,
        EventKind.DELAYED_RATE_LIMITED,
        EventKind.THROTTLED,
    ]
    assert (events[2].id, events[2].at) == (mid, START + MINUTE)
    assert (events[3].detail, events[3].at) == (smtp_server.hop, START + MINUTE)
    assert smtp_server.messages == []


@pytest.mark.parametrize(
    "policy",
    [
        DeliveryPolicy(),
        DeliveryPolicy(
            max_queue_lifetime=5 * 24 * 60 * MINUTE, retries_exhausted=RetriesExhausted.FREEZE
        ),
    ],
    ids=["no lifetime", "freeze beside a lifetime"],
)
async def test_a_message_whose_intervals_are_used_up_is_frozen(
    tmp_path: Path, policy: DeliveryPolicy
) -> None:
    clock = FakeClock(START)
    relay = relay_answering({RCPT: TRY_LATER})
    async with (
        open_spool(tmp_path, relay, clock, delivery_policy=policy) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(RCPT, retry_intervals=intervals(1, 5)))
        kinds = []
        while EventKind.FROZEN not in kinds and len(kinds) < 10:  # bounded
            (event,) = await next_events(stream, 1)
            kinds.append(event.kind)
            if event.kind is EventKind.DELAYED:
                assert event.at is not None
                clock.advance(event.at - clock.now())
    kinds = [k for k in kinds if k is not EventKind.PRESEND]
    # attempts at 0, 1m and 6m, then frozen
    assert kinds == [EventKind.SPOOLED, EventKind.DELAYED, EventKind.DELAYED, EventKind.FROZEN]
    assert places(tmp_path, mid) == ["frozen"]


async def test_a_presend_send_at_is_published_as_delayed(tmp_path: Path) -> None:
    later = START + 7 * MINUTE
    relay = relay_answering({})
    async with (
        open_spool(tmp_path, relay, FakeClock(START), presend=lambda _m: SendAt(at=later)) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(RCPT))
        events = await next_events(stream, 3)
    assert [(e.kind, e.id) for e in events] == [
        (EventKind.SPOOLED, mid),
        (EventKind.PRESEND, mid),
        (EventKind.DELAYED, mid),
    ]
    assert events[2].at == later
    assert relay.attempts == []


Operation = Callable[[Spool, str, str], Awaitable[object]]

OPERATIONS: dict[str, Operation] = {
    "freeze": lambda s, active, _frozen: s.freeze([active]),
    "send": lambda s, _active, frozen: s.send([frozen]),
    "send all": lambda s, _active, _frozen: s.send(which="all"),
    "remove": lambda s, _active, frozen: s.remove([frozen]),
    "recover": lambda s, _active, frozen: s.recover([frozen], from_="removed"),
    "reroute": lambda s, active, _frozen: s.reroute([active]),
    "add": lambda s, _active, _frozen: s.add(batch(RCPT)),
}


@pytest.mark.parametrize("operation", OPERATIONS.values(), ids=OPERATIONS.keys())
async def test_after_kill_and_flush_operator_operations_are_refused(
    tmp_path: Path, operation: Operation
) -> None:
    raw = {"spool": {"dir": "spool"}, "routes": {"r": {"next_hops": ["127.0.0.1:9"]}}}
    router = Router(parse_config(raw, tmp_path / "spoold.toml"))
    clock = FakeClock(START)
    # The active message waits for its next attempt (a minute away).
    relay = relay_answering({RCPT: RecipientResult(451, "later", "4.3.0")})
    spool_dir = tmp_path / "spool"
    async with open_spool(spool_dir, relay, clock, routes=router) as spool:
        async with spool.events() as stream:
            (active,) = await spool.add(batch(RCPT, retry_intervals=intervals(1)))
            (frozen,) = await spool.add(batch(RCPT), frozen=True)
            while (await next_events(stream, 1))[0].kind != EventKind.DELAYED:
                pass
        before = {m.id: m for m in spool.status()}
        await spool.kill_and_flush(5)

        with pytest.raises(SpoolClosedError, match=r"shutting down|closing"):
            await operation(spool, active, frozen)

        await settle()
        assert {m.id: m for m in spool.status()} == before  # nothing was changed
        assert places(spool_dir, active) == ["active"]
        assert places(spool_dir, frozen) == ["frozen"]
        assert sorted(os.listdir(spool_dir / "active")) == [".checkout", ".reasons", active]


async def test_a_directory_holding_other_files_is_not_taken_for_a_spool(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine\n")
    (home / "tmp").mkdir()  # a name a spool uses does not make it one

    with pytest.raises(StoreError, match="not a spool directory") as info:
        async with Spool.open(home, relay=relay_answering({}), clock=FakeClock(START)):
            pass

    assert "notes.txt" in str(info.value)
    assert sorted(os.listdir(home)) == ["notes.txt", "tmp"]  # nothing created


@pytest.mark.parametrize("state", ["missing", "empty", "existing spool"])
async def test_missing_empty_or_existing_spool_directories_open(tmp_path: Path, state: str) -> None:
    spool_dir = tmp_path / "spool"
    if state != "missing":
        spool_dir.mkdir()
    mid = None
    if state == "existing spool":
        async with open_spool(spool_dir, relay_answering({}), FakeClock(START)) as spool:
            (mid,) = await spool.add(batch(RCPT), frozen=True)
        (spool_dir / "control.sock").write_text("")  # the daemon keeps its socket here

    async with open_spool(spool_dir, relay_answering({}), FakeClock(START)) as spool:
        assert [m.id for m in spool.status()] == ([mid] if mid else [])


async def test_a_message_knows_its_spool_dir_without_storing_it(tmp_path: Path) -> None:
    """The seed's ``Message.spool_dir``: set on every message the spool
    reads or writes, never written into the record."""
    spool_dir = tmp_path / "spool"
    async with open_spool(spool_dir, relay_answering({}), FakeClock(START)) as spool:
        (mid,) = await spool.add(batch(RCPT), frozen=True)  # from add
        assert (await spool.get_message(mid)).spool_dir == spool_dir
        (listed,) = spool.status()
        assert listed.spool_dir == spool_dir
    record = (spool_dir / "frozen" / mid).read_bytes()
    assert b"spool_dir" not in record and str(tmp_path).encode() not in record

    async with open_spool(spool_dir, relay_answering({}), FakeClock(START)) as spool:
        (loaded,) = spool.status()  # from a reload of the spool
        assert (loaded.id, loaded.spool_dir) == (mid, spool_dir)
    (from_disk,), _ = await Spool.status_from_disk(spool_dir)
    assert from_disk.spool_dir == spool_dir

    made = decode_record(record)  # not from a spool: not known
    assert made.spool_dir is None
    made.spool_dir = tmp_path / "elsewhere"
    assert made.spool_dir == tmp_path / "elsewhere"
    assert encode_record(made) == record
