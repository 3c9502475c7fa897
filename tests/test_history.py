"""The history journal and removed-message retention (issue 13, point 2).

The spool runs on a fake clock: retention is proven by moving the clock,
never by waiting. The periodic housekeeping is seen to act after the clock
passes its next round (no explicit call), across restarts of the spool.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from spoold import OutcomeKind
from spoold.daemon.control import ControlClient
from spoold.errors import NotFoundError
from spoold.history import (
    FinalOutcome,
    History,
    Outcome,
    RecipientReply,
    RecipientState,
    read_history,
)
from spoold.message import Frozen, Removed
from spoold.store.hops import WorkerHops
from spoold.testing import FakeClock
from spoold.times import utcnow
from tests.daemon_helpers import CliResult, DaemonFactory, cli, set_config_value, write_config
from tests.smtp_server import SmtpTestServer, StartServer
from tests.spool_helpers import (
    NO_SUCH_USER,
    OK,
    START,
    TRY_LATER,
    batch,
    intervals,
    is_gone,
    open_spool,
    read_record,
    relay_answering,
    status_of,
)
from tests.support import WAIT_TIMEOUT, free_port, records_in, wait_until
from tests.test_operator_recipes import submit

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)


# Where a test calls housekeeping() itself, the periodic rounds stay out of
# its way: the next one is a year off.
NO_ROUNDS = {"housekeeping_interval": timedelta(days=365)}


async def next_round_armed(clock: FakeClock, interval: timedelta = HOUR) -> None:
    """Wait until housekeeping has finished its round and waits, on the
    fake clock, for the next one (``interval`` on): only then is moving the
    clock sure to start exactly one more round."""
    await wait_until(
        lambda: clock.next_deadline == clock.now() + interval,
        "housekeeping to wait for its next round",
    )


async def test_a_delivery_is_journalled_with_each_reply_and_found_after_a_restart(
    tmp_path: Path,
) -> None:
    clock = FakeClock(START)
    relay = relay_answering({"b@example.com": TRY_LATER})
    async with open_spool(tmp_path, relay, clock) as spool:
        (mid,) = await spool.add(batch("a@example.com", "b@example.com"))
        await wait_until(
            lambda: [m.relay_attempts for m in spool.status()] != [[]], "first attempt written"
        )
        assert await spool.find_outcome(mid) is None  # not final: still queued
        relay.respond = lambda _m, _r: OK
        clock.advance(timedelta(minutes=1))
        await wait_until(functools.partial(spool.find_outcome, mid), "the delivery's outcome")
        assert is_gone(tmp_path, mid)
    assert (tmp_path / "history" / f"{START.date().isoformat()}.jsonl").exists()

    async with open_spool(tmp_path, relay, clock) as spool:
        outcome = await spool.find_outcome(mid)
        assert outcome is not None
        assert outcome.outcome is FinalOutcome.DELIVERED
        assert outcome.time == START + timedelta(minutes=1)
        assert outcome.spool_date == START
        assert outcome.hop == "memory"
        by_rcpt = {r.recipient: r for r in outcome.recipients}
        # a@ was accepted in the first attempt (no reply kept), b@ in the last
        assert by_rcpt["a@example.com"].state is RecipientState.DELIVERED
        assert by_rcpt["a@example.com"].code is None
        assert by_rcpt["b@example.com"].state is RecipientState.DELIVERED
        assert (by_rcpt["b@example.com"].code, by_rcpt["b@example.com"].text) == (250, "ok")
        assert by_rcpt["b@example.com"].enhanced_status == "2.0.0"
        assert [o.id for o in await spool.history(since=START)] == [mid]
        assert [o.id for o in await spool.history(recipient="B@EXAMPLE.COM")] == [mid]
        assert await spool.history(recipient="nobody@example.com") == []
        assert await spool.history(since=START + HOUR) == []
        with pytest.raises(NotFoundError):
            await spool.get_message(mid)


async def test_removed_messages_go_after_the_retention_and_their_outcome_stays(
    tmp_path: Path,
) -> None:
    clock = FakeClock(START)
    relay = relay_answering({"a@example.com": NO_SUCH_USER})
    options = {"removed_retention": timedelta(days=7), "housekeeping_interval": HOUR}
    async with open_spool(tmp_path, relay, clock, **options) as spool:
        (mid,) = await spool.add(batch("a@example.com"))
        await wait_until(lambda: status_of(spool, mid) == Frozen(), "frozen by the 550")
        clock.advance(HOUR)  # removed an hour after it was spooled
        await spool.remove([mid])
        assert read_record(tmp_path, "removed", mid).removed_at == START + HOUR
        outcome = await spool.find_outcome(mid)
        assert outcome is not None and outcome.outcome is FinalOutcome.REMOVED
        assert outcome.recipients[0].state is RecipientState.FAILED
        assert "550" in outcome.detail

    clock.advance(timedelta(days=6, hours=23))  # an hour short of 7 days since removal
    async with open_spool(tmp_path, relay, clock, **options) as spool:
        await next_round_armed(clock)  # the round at open is done: it kept the message
        assert (tmp_path / "removed" / mid).exists()
        clock.advance(HOUR)  # 7 days since removal, and the next round is due
        await wait_until(lambda: is_gone(tmp_path, mid), "the periodic round to delete it")
        with pytest.raises(NotFoundError):
            await spool.get_message(mid)
        outcome = await spool.find_outcome(mid)
        assert outcome is not None and outcome.outcome is FinalOutcome.REMOVED


async def test_recovered_messages_lose_their_removal_time(tmp_path: Path) -> None:
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay_answering({}), clock, **NO_ROUNDS) as spool:
        (mid,) = await spool.add(batch("a@example.com"), frozen=True)
        await spool.remove([mid])
        await spool.recover([mid], from_="removed")
        assert read_record(tmp_path, "frozen", mid).removed_at is None
        clock.advance(timedelta(days=30))
        assert (await spool.housekeeping())["removed"] == 0
        assert status_of(spool, mid) == Frozen()


async def test_a_removed_record_without_a_removal_time_is_kept_a_full_retention(
    tmp_path: Path,
) -> None:
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay_answering({}), clock) as spool:
        (mid,) = await spool.add(batch("a@example.com"), frozen=True)
        await spool.remove([mid])
    # as an older spoold wrote it: no removed_at
    path = tmp_path / "removed" / mid
    record = json.loads(path.read_bytes())
    del record["removed_at"]
    path.write_bytes(json.dumps(record).encode() + b"\n")

    clock.advance(timedelta(days=30))
    async with open_spool(tmp_path, relay_answering({}), clock, **NO_ROUNDS) as spool:
        await next_round_armed(clock, NO_ROUNDS["housekeeping_interval"])
        assert (await spool.housekeeping())["removed"] == 0
        assert read_record(tmp_path, "removed", mid).removed_at == clock.now()
        clock.advance(timedelta(days=7))
        assert (await spool.housekeeping())["removed"] == 1
        assert is_gone(tmp_path, mid)


async def test_history_older_than_its_retention_is_deleted(tmp_path: Path) -> None:
    clock = FakeClock(START)
    relay = relay_answering({})
    options = {"history_retention": timedelta(days=2), "housekeeping_interval": HOUR}
    async with open_spool(tmp_path, relay, clock, **options) as spool:
        (old,) = await spool.add(batch("a@example.com"))
        await wait_until(functools.partial(spool.find_outcome, old), "delivery")
        clock.advance(DAY)
        (new,) = await spool.add(batch("a@example.com"))
        await wait_until(functools.partial(spool.find_outcome, new), "delivery")
    clock.advance(timedelta(days=2))
    async with open_spool(tmp_path, relay, clock, **options) as spool:
        # the round at open: the first day's file is past two days, the second not
        await next_round_armed(clock)
        assert len(list((tmp_path / "history").iterdir())) == 1
        assert await spool.find_outcome(old) is None
        assert (await spool.find_outcome(new)) is not None
        clock.advance(DAY)
        await next_round_armed(clock)
        await wait_until(lambda: not list((tmp_path / "history").iterdir()), "pruning")
        assert await spool.history() == []


async def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay_answering({}), clock) as spool:
        (mid,) = await spool.add(batch("a@example.com"))
        await wait_until(functools.partial(spool.find_outcome, mid), "delivery")
    (day_file,) = (tmp_path / "history").iterdir()
    with day_file.open("ab") as f:
        f.write(b'{"id":"8Dsi')  # a crash in the middle of an append
    found = await read_history(tmp_path)
    assert [o.id for o in found] == [mid]


async def test_a_removal_by_the_presend_hook_is_journalled(tmp_path: Path) -> None:
    clock = FakeClock(START)
    relay = relay_answering({})
    decisions = iter([Removed()])

    def presend(_msg: object) -> object:
        return next(decisions)

    async with open_spool(tmp_path, relay, clock, presend=presend) as spool:
        (mid,) = await spool.add(batch("a@example.com", retry_intervals=intervals(1)))
        outcome = await wait_until(functools.partial(spool.find_outcome, mid), "its outcome")
    assert (tmp_path / "removed" / mid).exists()
    assert outcome.outcome is FinalOutcome.REMOVED
    assert outcome.detail == "removed by the presend hook"
    assert outcome.recipients[0].state is RecipientState.UNDELIVERED


# ------------------------------------------------------------ CLI, daemon


async def test_history_and_show_without_a_daemon(tmp_path: Path) -> None:
    clock = FakeClock(utcnow())  # the CLI's --since counts back from the wall clock
    async with open_spool(tmp_path, relay_answering({}), clock) as spool:
        (mid,) = await spool.add(batch("a@example.com"))
        await wait_until(functools.partial(spool.find_outcome, mid), "delivery")
    run = functools.partial(cli, "--spool-dir", str(tmp_path))
    listing = await anyio.to_thread.run_sync(run, "history", "--since", "1h", "--format", "json")
    assert listing.code == 0, listing
    assert len(listing.out.splitlines()) == 1, (listing.out, listing.err)
    (line,) = listing.out.splitlines()
    view = json.loads(line)
    assert (view["id"], view["outcome"], view["hop"]) == (mid, "delivered", "memory")
    shown = await anyio.to_thread.run_sync(run, "show", mid)
    assert shown.code == 0, shown
    assert json.loads(shown.out)["status"] == "delivered"
    assert json.loads(shown.out)["queue"] is None


async def test_spoold_history_and_show_of_a_delivered_message(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    with anyio.fail_after(60):
        config = write_config(tmp_path, next_hops=[smtp_server.hop])
        daemon = await start_daemon(config)
        base = ("--config", str(config))
        sent = await anyio.to_thread.run_sync(
            functools.partial(
                cli,
                *base,
                "sendmail",
                "-f",
                "app@example.org",
                "ops@example.com",
                stdin=b"Subject: hi\n\nhello\n",
            )
        )
        assert sent.code == 0, sent
        await wait_until(
            lambda: smtp_server.transactions == 1 and not records_in(daemon.spool_dir, "active"),
            "delivery",
            interval=0.05,
        )

        async def listed() -> list[dict[str, object]]:
            done = await anyio.to_thread.run_sync(
                functools.partial(cli, *base, "history", "--format", "json")
            )
            assert done.code == 0, done
            return [json.loads(line) for line in done.out.splitlines()]

        (view,) = await wait_until(listed, "the outcome in the history", interval=0.05)
        mid = str(view["id"])
        table = await anyio.to_thread.run_sync(
            functools.partial(
                cli, *base, "history", "--since", "1h", "--recipient", "ops@example.com"
            )
        )
        shown = await anyio.to_thread.run_sync(functools.partial(cli, *base, "show", mid))
    assert table.code == 0, table
    first, second = table.out.splitlines()
    assert first.endswith(f" {mid} delivered <app@example.org> via {smtp_server.hop}")
    assert second.startswith("    ops@example.com delivered 250")
    assert shown.code == 0, shown
    record = json.loads(shown.out)
    assert (record["id"], record["queue"], record["status"]) == (mid, None, "delivered")
    (rcpt,) = record["outcome"]["recipients"]
    assert (rcpt["recipient"], rcpt["state"], rcpt["code"]) == ("ops@example.com", "delivered", 250)
    when = datetime.fromisoformat(record["outcome"]["time"].replace("Z", "+00:00"))
    assert when.tzinfo == UTC or when.utcoffset() == timedelta(0)


async def test_the_journal_is_json_lines_of_outcomes(tmp_path: Path) -> None:
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay_answering({}), clock) as spool:
        (mid,) = await spool.add(batch("a@example.com"))
        await wait_until(functools.partial(spool.find_outcome, mid), "delivery")
    (day_file,) = (tmp_path / "history").iterdir()
    (line,) = day_file.read_bytes().splitlines()
    decoded = msgspec.json.decode(line)
    assert decoded["id"] == mid
    assert decoded["outcome"] == "delivered"
    assert set(decoded) == {
        "id",
        "outcome",
        "time",
        "spool_date",
        "sender",
        "recipients",
        "hop",
        "parent_id",
        "flows",
        "idempotency_key",
        "detail",
        "in_doubt",
        "submitter_uid",
    }


async def test_check_and_open_accept_the_history_and_key_directories(tmp_path: Path) -> None:
    from spoold.ondisk import OnDiskSpool

    clock = FakeClock(START)
    async with open_spool(tmp_path, relay_answering({}), clock) as spool:
        (mid,) = await spool.add(batch("a@example.com"), idempotency_key="k")
        await wait_until(functools.partial(spool.find_outcome, mid), "delivery")
    assert (tmp_path / "history").is_dir() and (tmp_path / "idempotency").is_dir()
    ondisk, _ = await OnDiskSpool.open(tmp_path, owner=False, create=False)
    async with ondisk:
        assert await ondisk.check(max_age=0.0) == []
    async with open_spool(tmp_path, relay_answering({}), clock) as spool:
        assert (await spool.find_outcome(mid)) is not None


# -----------------------------------------------------------------------------
# History after a reroute split, through a running daemon.
#
# A message to A and B waits on a dead smarthost; a new route takes B's
# domain (to a hop that is dead too); ``spoold reroute`` splits B off into
# a new message; the smarthost is fixed and A is delivered. The journal
# line of the original message must not say B was delivered: B is
# ``rerouted`` to the new message, which ``history --recipient B`` shows as
# still queued, and later as delivered once its own next hop took it.


A, B = "a@one.example", "b@partner.example"


async def run(config: Path, *args: str) -> CliResult:
    done: CliResult = await anyio.to_thread.run_sync(partial(cli, "--config", str(config), *args))
    assert done.code == 0, done.err
    return done


async def history_of(config: Path, recipient: str) -> list[dict[str, Any]]:
    done = await run(config, "history", "--recipient", recipient, "--format", "json")
    return [json.loads(line) for line in done.out.splitlines()]


def partners_route(hop: str) -> str:
    return (
        f'\n[routes.partners]\ndomains = ["partner.example"]\nnext_hops = ["{hop}"]\ntls = "none"\n'
    )


async def test_history_never_says_delivered_for_a_recipient_split_off_by_reroute(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer
) -> None:
    smart = await start_smtp_server()
    partner = await start_smtp_server()
    dead = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, next_hops=[dead])
    await start_daemon(config)
    client = ControlClient(tmp_path / "run" / "ctl.sock")
    (mid,) = await submit(client, A, B)

    async def attempts(message_id: str) -> int:
        view = await client.request("show", id=message_id)
        return len(view.get("relay_attempts") or [])

    await wait_until(lambda: attempts(mid), "the first attempt", interval=0.05)

    # B's domain gets a route of its own, to a hop that is dead too.
    set_config_value(config, "next_hops", f'["{smart.hop}"]')
    dead_partner = f"127.0.0.1:{free_port()}"
    with config.open("a") as f:
        f.write(partners_route(dead_partner))
    await run(config, "reload")
    rerouted = await run(config, "reroute", mid)
    assert rerouted.out.startswith("rerouted: 2 message(s)")
    listing = {v["id"]: v for v in await client.request("status", queue="all")}
    (other,) = [i for i in listing if i != mid]
    assert listing[mid]["rerouted_to"] == {B: other}
    assert listing[other]["envelope_info"]["recipients"] == [B]  # its own only
    assert "rerouted_to" not in listing[other]
    await run(config, "send", "--all")
    await wait_until(lambda: smart.transactions == 1, "A delivered", interval=0.05)
    await wait_until(lambda: attempts(other), "B's part tried its dead hop", interval=0.05)
    assert smart.messages[0].rcpt_tos == (A,)

    async def original_journalled() -> list[dict[str, Any]]:
        return await history_of(config, B)

    (line,) = await wait_until(original_journalled, "the original's outcome", interval=0.05)
    assert (line["id"], line["outcome"]) == (mid, "delivered")
    states = {r["recipient"]: r for r in line["recipients"]}
    assert states[A]["state"] == "delivered"
    assert states[B]["state"] == "rerouted"
    assert states[B]["rerouted_to"] == other
    # Still queued: its last retry interval repeats until the queue lifetime
    # ends (spool.retries_exhausted), so it waits for its next attempt.
    assert states[B]["rerouted_state"] == "send_at"
    table = (await run(config, "history", "--recipient", B)).out
    assert f"    {B} rerouted to {other} (now send_at)" in table.splitlines()
    assert f"{B} delivered" not in table
    assert [o["id"] for o in await history_of(config, A)] == [mid]  # only the original had A

    # B's route is fixed: its own message is delivered, and says so.
    config.write_text(config.read_text().replace(dead_partner, partner.hop))
    await run(config, "reload")
    await run(config, "send", other)
    await wait_until(lambda: partner.transactions == 1, "B delivered", interval=0.05)
    assert partner.messages[0].rcpt_tos == (B,)

    async def both_journalled() -> list[dict[str, Any]]:
        found = await history_of(config, B)
        return found if len(found) == 2 else []

    first, second = await wait_until(both_journalled, "B's own outcome", interval=0.05)
    assert first["id"] == mid
    (moved,) = [r for r in first["recipients"] if r["recipient"] == B]
    assert (moved["state"], moved["rerouted_state"]) == ("rerouted", "delivered")
    assert (second["id"], second["outcome"]) == (other, "delivered")
    assert [(r["recipient"], r["state"]) for r in second["recipients"]] == [(B, "delivered")]


async def test_a_flush_cancelled_while_it_writes_journals_each_line_once(tmp_path: Path) -> None:
    # At spool close the History task is cancelled, perhaps mid-write: a
    # store hop cancelled while it runs answers CancelledError after the
    # lines are written, and they must not be put back for the last flush.
    hops = WorkerHops(tmp_path, 2)
    history = History(tmp_path, hops.run_grouped)
    started, release = threading.Event(), threading.Event()
    append = history._append_sync

    def held_append(batch: Sequence[Outcome]) -> None:
        started.set()
        release.wait(WAIT_TIMEOUT)
        append(batch)

    history._append_sync = held_append  # type: ignore[method-assign]
    history.append(_journalled("msg1"))
    with anyio.fail_after(WAIT_TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(history.flush)
            await anyio.to_thread.run_sync(started.wait)
            tg.cancel_scope.cancel()
            release.set()
        await history.flush()
    await hops.drain()
    hops.stop_sync()
    assert [o.id for o in await read_history(tmp_path)] == ["msg1"]


def _journalled(message_id: str) -> Outcome:
    when = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    return Outcome(
        id=message_id,
        outcome=OutcomeKind.DELIVERED,
        time=when,
        spool_date=when,
        sender="app@example.org",
        recipients=[RecipientReply(recipient="ops@example.com", state=RecipientState.DELIVERED)],
    )
