"""Faults inside the spool: disk errors mid-attempt, races with rescans."""

from __future__ import annotations

import errno
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from spoold.body import Body
from spoold.connection_cache import RouteSettings
from spoold.errors import AddressError, InsufficientStorageError, StoreError
from spoold.message import Frozen, Message, Queue, RoutedBatch, RoutedEnvelope, SendAt, Sending
from spoold.smtp_relay import SmtpRelay
from spoold.spool import Spool
from spoold.testing import FakeClock, Faults, InMemoryRelay
from tests.smtp_server import Reply, SmtpTestServer
from tests.spool_helpers import (
    attempts_for,
    intervals,
    is_delivered,
    open_spool,
    places,
    read_record,
    settle,
    status_of,
)
from tests.support import WAIT_TIMEOUT, spool_files, wait_until

BATCH = RoutedBatch(
    [RoutedEnvelope("s@example.org", ["r@example.com"], ["127.0.0.1:25"])],
    Body.from_content(b"Subject: f\r\n\r\nx\r\n"),
)


async def test_a_disk_error_after_presend_backs_off_instead_of_spinning(tmp_path: Path) -> None:
    calls = []

    def presend(message: Message) -> Frozen:
        calls.append(message.id)
        return Frozen()

    faults = Faults()
    clock = FakeClock()
    with anyio.fail_after(WAIT_TIMEOUT):
        async with Spool.open(
            tmp_path, relay=InMemoryRelay(), clock=clock, presend=presend, on_step=faults
        ) as spool:
            faults.fail("replace", OSError(errno.EIO, "Input/output error"))
            (mid,) = await spool.add(BATCH)
            await wait_until(
                lambda: isinstance(spool.status()[0].status, SendAt), "the retry in a minute"
            )
            # The fake clock stands still: a busy loop would call presend again
            # within these rounds of the event loop; a backing-off spool never.
            await settle(1000)
            assert calls == [mid]  # tried once, then waits a minute
            assert faults.raised["replace"] == 1
            faults.clear()
            async with spool.events() as events:
                clock.advance(timedelta(minutes=1, seconds=1))
                async for event in events:
                    if event.kind == "frozen":
                        break
            assert calls == [mid, mid]
            assert (tmp_path / "frozen" / mid).exists()


async def test_rescans_racing_adds_deliver_each_message_once(tmp_path: Path) -> None:
    relay = InMemoryRelay()
    count = 300
    with anyio.fail_after(60):
        async with (
            Spool.open(tmp_path, relay=relay, ping_interval=0.001) as spool,
            spool.events(max_buffer=10 * count) as events,
        ):
            async with anyio.create_task_group() as tg:
                for _ in range(10):

                    async def submit() -> None:
                        for _ in range(count // 10):
                            await spool.add(BATCH)

                    tg.start_soon(submit)
            delivered: set[str] = set()
            async for event in events:
                if event.kind == "delivered":
                    delivered.add(event.id or "")
                    if len(delivered) == count:
                        break
            assert spool.counts() == {Queue.ACTIVE: 0, Queue.FROZEN: 0}
    ids = [mid for mid, _, _ in relay.delivered]
    assert len(ids) == count
    assert len(set(ids)) == count
    assert spool_files(tmp_path, "active", "data", ".registry") == {}


# ------------------------------------------- the outcome of an attempt


async def backing_off(clock: FakeClock) -> None:
    """Wait until the spool sleeps on the clock before retrying a write (a
    deadline within the minute: the other loops wait for hours or for ever)."""
    await wait_until(
        lambda: (
            clock.next_deadline is not None
            and clock.next_deadline <= clock.now() + timedelta(minutes=1)
        ),
        "the spool to wait before trying the write again",
    )


async def test_a_full_disk_after_the_hop_answered_never_resends_what_it_accepted(
    tmp_path: Path, smtp_server: SmtpTestServer
) -> None:
    """The hop accepts A and defers B; writing the updated record fails with
    ENOSPC for a good while. A is delivered exactly once; once the disk has
    room the outcome is written as it was (B remaining, one interval used)
    and B goes out at the next attempt."""
    smtp_server.behaviour.rcpt["b@example.com"] = Reply("452 4.2.2 mailbox full")
    faults = Faults()
    # Full from the moment the hop has the message (the add went through).
    faults.fail(
        "write_record",
        OSError(errno.ENOSPC, "No space left on device"),
        when=lambda: bool(smtp_server.messages),
    )

    clock = FakeClock()
    batch = RoutedBatch(
        [RoutedEnvelope("s@example.org", ["a@example.com", "b@example.com"], [smtp_server.hop])],
        Body.from_content(b"Subject: full disk\r\n\r\nx\r\n"),
    )
    relay = SmtpRelay(RouteSettings(tls="none"))
    with anyio.fail_after(30):
        async with open_spool(tmp_path, relay, clock, on_step=faults, min_free_space=0) as spool:
            (mid,) = await spool.add(batch)
            await wait_until(
                lambda: faults.raised["write_record"] >= 1, "the outcome write to fail"
            )
            assert [m.rcpt_tos for m in smtp_server.messages] == [("a@example.com",)]
            # 2.5 minutes of a full disk: the write is retried, nothing is sent.
            for _ in range(5):
                seen = faults.raised["write_record"]
                await backing_off(clock)
                clock.advance(timedelta(seconds=30))
                await wait_until(
                    lambda seen=seen: faults.raised["write_record"] > seen, "another write attempt"
                )
                assert status_of(spool, mid) == Sending()
            assert [m.rcpt_tos for m in smtp_server.messages] == [("a@example.com",)]
            assert places(tmp_path, mid) == ["active/.checkout"]

            faults.clear()
            await backing_off(clock)
            clock.advance(timedelta(seconds=60))
            await wait_until(lambda: places(tmp_path, mid) == ["active"], "the outcome on disk")
            record = read_record(tmp_path, "active", mid)
            assert record.remaining_recipients == ["b@example.com"]
            assert record.failed_recipients == []
            (attempt,) = record.relay_attempts
            assert attempt.error == f"b@example.com: 452 4.2.2 mailbox full via {smtp_server.hop}"
            assert record.retry_intervals == intervals(5)  # the 1 minute one was used
            assert isinstance(record.status, SendAt)

            smtp_server.behaviour.rcpt.clear()
            clock.advance(timedelta(minutes=2))
            await wait_until(lambda: is_delivered(spool, tmp_path, mid), "B to be delivered")
    assert [m.rcpt_tos for m in smtp_server.messages] == [
        ("a@example.com",),
        ("b@example.com",),
    ]
    await relay.close_and_flush()


async def test_a_delivery_whose_record_delete_fails_is_not_sent_again(tmp_path: Path) -> None:
    """Everyone accepted, but deleting the files fails for a while: the
    message stays delivered-in-waiting, never attempted again."""
    faults = Faults()
    faults.fail("unlink_record", OSError(errno.EIO, "Input/output error"))
    relay = InMemoryRelay()
    clock = FakeClock()
    with anyio.fail_after(30):
        async with open_spool(tmp_path, relay, clock, on_step=faults, min_free_space=0) as spool:
            (mid,) = await spool.add(BATCH)  # an add unlinks nothing
            await wait_until(lambda: faults.raised["unlink_record"] >= 1, "the delete to fail")
            for _ in range(3):
                seen = faults.raised["unlink_record"]
                await backing_off(clock)
                clock.advance(timedelta(minutes=1))
                await wait_until(
                    lambda seen=seen: faults.raised["unlink_record"] > seen, "another try"
                )
            faults.clear()
            await backing_off(clock)
            clock.advance(timedelta(minutes=1))
            await wait_until(lambda: is_delivered(spool, tmp_path, mid), "the delete to finish")
    assert attempts_for(relay, mid) == [("r@example.com",)]


# ------------------------------------------------------ refused submissions


@pytest.mark.parametrize(
    ("sender", "recipients", "kind"),
    [
        ("s@example.org", [""], "null"),
        ("s@example.org", ["a\x00b@example.com"], "control"),
        ("s@example.org", ["ok@example.com", "a b@example.com"], "syntax"),
        ("s@example.org", ["bad\r\nDATA@example.com"], "control"),
        ("x\r\ny@example.org", ["ok@example.com"], "control"),
        ("s@example.org", [], "null"),
    ],
)
async def test_add_refuses_a_bad_address_and_writes_nothing(
    tmp_path: Path, sender: str, recipients: list[str], kind: str
) -> None:
    with anyio.fail_after(WAIT_TIMEOUT):
        async with Spool.open(tmp_path, relay=InMemoryRelay(), clock=FakeClock()) as spool:
            before = spool_files(tmp_path)
            batch = RoutedBatch([RoutedEnvelope(sender, recipients, ["127.0.0.1:25"])], BATCH.body)
            with pytest.raises(AddressError) as info:
                await spool.add(batch)
            assert info.value.kind == kind
            assert isinstance(info.value, ValueError)
            assert spool_files(tmp_path) == before
            assert spool.counts() == {Queue.ACTIVE: 0, Queue.FROZEN: 0}


async def test_the_null_sender_is_accepted(tmp_path: Path) -> None:
    relay = InMemoryRelay()
    with anyio.fail_after(WAIT_TIMEOUT):
        async with Spool.open(tmp_path, relay=relay) as spool:
            batch = RoutedBatch(
                [RoutedEnvelope("", ["r@example.com"], ["127.0.0.1:25"])], BATCH.body
            )
            (mid,) = await spool.add(batch)
            await wait_until(lambda: is_delivered(spool, tmp_path, mid), "delivery")
    assert relay.delivered == [(mid, "r@example.com", BATCH.body.wire)]


async def test_below_the_free_space_floor_add_is_refused_until_there_is_room(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(WAIT_TIMEOUT):
        async with Spool.open(tmp_path, relay=InMemoryRelay(), clock=FakeClock()) as spool:
            before = spool_files(tmp_path)
            spool.min_free_space = 2**62  # more than any disk has free
            with pytest.raises(InsufficientStorageError) as info:
                await spool.add(BATCH)
            assert info.value.disk_full
            assert isinstance(info.value, StoreError)
            assert "spool.min_free_space" in str(info.value)
            assert spool_files(tmp_path) == before
            spool.min_free_space = 64 * 1024 * 1024  # the space came back
            assert len(await spool.add(BATCH)) == 1
