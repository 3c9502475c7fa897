"""The spool and the SMTP relay against Postfix's ``smtp-sink``.

A real :class:`~spoold.spool.Spool` on a temp dir relays through
:class:`~spoold.smtp_relay.SmtpRelay` to ``smtp-sink`` (the
``start_smtp_sink`` fixture of :mod:`tests.smtp_sink`), with its fault
options (``-r`` soft reject, ``-f`` hard reject, ``-Q`` 421 and disconnect)
and its ``-d`` dump for byte-exact checks. Its ``sess= quit= mesg=``
counters tell how many SMTP sessions the relay opened.

The spool runs on a :class:`~spoold.testing.FakeClock`: messages are
``send_now`` so they go at once, and a delayed message stays delayed (the
clock never reaches its retry time). Every wait is bounded.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from spoold.body import Body
from spoold.connection_cache import RouteSettings
from spoold.events import SpoolEvent, Subscription
from spoold.message import Queue, RoutedBatch, RoutedEnvelope
from spoold.smtp_relay import SmtpRelay
from spoold.spool import Spool
from spoold.testing import FakeClock
from tests.smtp_sink import StartSmtpSink
from tests.spool_helpers import (
    MINUTE,
    START,
    is_gone,
    open_spool,
    read_record,
)
from tests.support import WAIT_TIMEOUT, spool_files, wait_until

pytestmark = pytest.mark.interop

SENDER = "sender@example.org"
ALICE = "alice@example.com"
BOB = "bob@example.com"
CONTENT = (
    b"From: sender@example.org\r\n"
    b"To: alice@example.com\r\n"
    b"Subject: interop\r\n"
    b"\r\n"
    b"first line\r\n"
    b".hidden\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b" . not at the start\r\n"
    b"last line\r\n"
)
OUTCOMES = frozenset({"delivered", "delayed", "delayed_rate_limited", "frozen"})
_COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


# ----------------------------------------------------------------- spool


def submission(
    hop: str, recipients: Sequence[str] = (ALICE,), content: bytes = CONTENT
) -> RoutedBatch:
    return RoutedBatch(
        [RoutedEnvelope(SENDER, list(recipients), [hop])], Body.from_content(content)
    )


@asynccontextmanager
async def spool_relaying_to_sink(
    spool_dir: Path, **options: object
) -> AsyncIterator[tuple[Spool, SmtpRelay]]:
    """A spool on a fake clock relaying with plain-text SMTP; the relay's
    connections are closed (QUIT) after the spool."""
    relay = SmtpRelay(
        RouteSettings(tls="none", connect_timeout=5, command_timeout=10, message_timeout=30)
    )
    try:
        async with open_spool(spool_dir, relay, FakeClock(START), **options) as spool:
            yield spool, relay
    finally:
        with anyio.move_on_after(5):
            await relay.close_and_flush()


async def outcome_of(stream: Subscription, message_id: str) -> SpoolEvent:
    """The event that ends the attempt on ``message_id``."""
    with anyio.fail_after(WAIT_TIMEOUT):
        async for event in stream:
            if event.id == message_id and event.kind in OUTCOMES:
                return event
    raise AssertionError(f"event stream closed before an outcome for {message_id}")


def assert_spool_empty(spool: Spool) -> None:
    """Nothing in memory, and no file left in data/, active/ (with its
    checkout) or the registry."""
    root = spool.spool_dir
    assert spool.counts() == {Queue.ACTIVE: 0, Queue.FROZEN: 0}
    assert spool_files(root, "data", "active", ".registry") == {}


# ----------------------------------------------------------------- tests


async def test_delivers_through_smtp_sink(start_smtp_sink: StartSmtpSink, tmp_path: Path) -> None:
    sink = await start_smtp_sink()
    async with spool_relaying_to_sink(tmp_path / "spool") as (spool, _relay):
        async with spool.events() as stream:
            (mid,) = await spool.add(submission(sink.hop, [ALICE, BOB]))
            event = await outcome_of(stream, mid)

        assert event.kind == "delivered"
        assert is_gone(spool.spool_dir, mid)
        assert_spool_empty(spool)
        assert await spool.ondisk.check(max_age=0) == []
    await wait_until(
        lambda: sink.counters()["mesg"] == 1, "smtp-sink to count the message", interval=0.02
    )


async def test_soft_reject_at_rcpt_delays_the_message(
    start_smtp_sink: StartSmtpSink, tmp_path: Path
) -> None:
    sink = await start_smtp_sink("-r", "RCPT")
    async with spool_relaying_to_sink(tmp_path / "spool") as (spool, _relay):
        async with spool.events() as stream:
            (mid,) = await spool.add(submission(sink.hop))
            event = await outcome_of(stream, mid)

        assert event.kind == "delayed"
        assert event.at == START + MINUTE
        record = read_record(spool.spool_dir, "active", mid)
        assert record.remaining_recipients == [ALICE]
        assert record.failed_recipients == []
        error = record.relay_attempts[0].error
        assert error.startswith(f"{ALICE}: 450 4.3.0 ")
        assert error.endswith(f"via {sink.hop}")
    assert sink.counters()["mesg"] == 0


async def test_hard_reject_at_rcpt_freezes_the_message(
    start_smtp_sink: StartSmtpSink, tmp_path: Path
) -> None:
    sink = await start_smtp_sink("-f", "RCPT")
    async with spool_relaying_to_sink(tmp_path / "spool") as (spool, _relay):
        async with spool.events() as stream:
            (mid,) = await spool.add(submission(sink.hop))
            event = await outcome_of(stream, mid)

        assert event.kind == "frozen"
        record = read_record(spool.spool_dir, "frozen", mid)
        assert record.remaining_recipients == []
        assert record.failed_recipients == [ALICE]
        assert record.relay_attempts[0].error.startswith(f"{ALICE}: 500 5.3.0 ")
        assert spool.counts() == {Queue.ACTIVE: 0, Queue.FROZEN: 1}
    assert sink.counters()["mesg"] == 0


async def test_421_at_data_delays_the_message(
    start_smtp_sink: StartSmtpSink, tmp_path: Path
) -> None:
    sink = await start_smtp_sink("-Q", "DATA")
    async with spool_relaying_to_sink(tmp_path / "spool") as (spool, _relay):
        async with spool.events() as stream:
            (mid,) = await spool.add(submission(sink.hop, [ALICE, BOB]))
            event = await outcome_of(stream, mid)

        assert event.kind == "delayed"
        record = read_record(spool.spool_dir, "active", mid)
        assert record.remaining_recipients == [ALICE, BOB]
        error = record.relay_attempts[0].error
        assert error.startswith(f"{ALICE}: 421 ")
        assert error.endswith(f" via {sink.hop}")
    assert sink.counters()["mesg"] == 0


async def test_message_arrives_byte_exact(start_smtp_sink: StartSmtpSink, tmp_path: Path) -> None:
    sink = await start_smtp_sink(dump=True)
    async with (
        spool_relaying_to_sink(tmp_path / "spool") as (spool, _relay),
        spool.events() as stream,
    ):
        (mid,) = await spool.add(submission(sink.hop, [ALICE, BOB]))
        assert (await outcome_of(stream, mid)).kind == "delivered"
    await wait_until(
        lambda: sink.counters()["mesg"] == 1, "smtp-sink to count the message", interval=0.02
    )

    (dump,) = sink.dumps()
    # The dump: smtp-sink's own headers ending with a three-line Received
    # header, then the message as received, one "\n" per line (CR dropped,
    # dot-stuffing undone), then an empty line.
    lines = dump.split(b"\n")
    received = next(i for i, line in enumerate(lines) if line.startswith(b"Received: "))
    assert lines[received + 1].startswith(b"\tby ")
    own = lines[:received]
    assert f"X-Mail-Args: <{SENDER}>".encode() in own
    assert [x for x in own if x.startswith(b"X-Rcpt-Args: ")] == [
        f"X-Rcpt-Args: <{ALICE}>".encode(),
        f"X-Rcpt-Args: <{BOB}>".encode(),
    ]
    message = b"\n".join(lines[received + 3 :])
    assert message == CONTENT.replace(b"\r\n", b"\n") + b"\n"


async def test_a_thousand_messages_through_a_few_sessions(
    start_smtp_sink: StartSmtpSink, tmp_path: Path
) -> None:
    sink = await start_smtp_sink()
    total, adders = 1000, 20
    async with spool_relaying_to_sink(tmp_path / "spool", max_concurrent_send_jobs=20) as (
        spool,
        relay,
    ):
        async with spool.events(max_buffer=10 * total) as stream:
            delivered: set[str] = set()
            added: list[str] = []

            async def add_some(worker: int) -> None:
                for n in range(total // adders):
                    rcpt = f"w{worker}-{n}@example.com"
                    added.extend(
                        await spool.add(submission(sink.hop, [rcpt], b"Subject: x\r\n\r\nhi\r\n"))
                    )

            async def collect() -> None:
                async for event in stream:
                    assert event.kind not in {"delayed", "frozen", "overflow"}, event
                    if event.kind == "delivered":
                        assert event.id is not None
                        delivered.add(event.id)
                        if len(delivered) == total:
                            return

            with anyio.fail_after(4 * WAIT_TIMEOUT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(collect)
                    for worker in range(adders):
                        tg.start_soon(add_some, worker)

        assert delivered == set(added)
        assert len(added) == total
        assert_spool_empty(spool)
        assert await spool.ondisk.check(max_age=0) == []
        assert relay.cache.connections_made <= relay.cache.max_per_hop

    counters = sink.stop()
    assert counters["mesg"] == total
    # One session was the fixture's readiness probe.
    assert counters["sess"] <= 1 + relay.cache.max_per_hop, counters
