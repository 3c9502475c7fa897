"""Hostile input to the features of issues 13 and 14: a next hop whose
replies try to inject fields into a bounce, a client whose headers would make
a malformed one, and SMTP clients whose Message-ID deduplication must not
drop mail that is not a retry. Everything runs on 127.0.0.1, bounded in time."""

from __future__ import annotations

import email
import email.policy
import functools
import json
from email.message import EmailMessage
from pathlib import Path

import anyio
import msgspec
import pytest

from spoold import history
from spoold.body import Body
from spoold.connection_cache import RouteSettings
from spoold.daemon.ingest import message_id_key
from spoold.dsn import MAX_ORIGINAL_HEADERS, build_dsn, dsn_body, header_section
from spoold.errors import OperationRefusedError
from spoold.limits import BACKOFF_FIRST, BACKOFF_MAX, DestinationGate
from spoold.message import Message, RoutedBatch, RoutedEnvelope
from spoold.outcome import DeliveryPolicy, Notice, NoticeKind, OnPermanentFailure, RecipientNotice
from spoold.relay import RecipientResult
from spoold.smtp_relay import SmtpRelay
from spoold.testing import FakeClock
from tests.factories import make_message
from tests.ingest_helpers import queued_ids, raw_smtp
from tests.smtp_server import Reply, SmtpTestServer
from tests.spool_helpers import (
    SENDER,
    START,
    TRY_LATER,
    batch,
    intervals,
    open_spool,
    places,
    relay_answering,
)
from tests.support import free_port, wait_until
from tests.test_control_limits import connect, one_reply, ping, read_all, serving
from tests.test_idempotency import listening

RCPT = "rcpt@example.com"


def report_of(content: bytes) -> EmailMessage:
    report = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(report, EmailMessage)
    return report


async def test_a_multiline_refusal_that_looks_like_headers_still_bounces(
    tmp_path: Path, smtp_server: SmtpTestServer
) -> None:
    """A next hop answers RCPT with a multi-line 550 whose second line reads
    like a header field: the bounce is still built and sent, the injected
    line stays inside Diagnostic-Code, and the spool keeps working."""
    smtp_server.behaviour.rcpt[RCPT] = Reply(
        "550-5.1.1 no such user\r\n550 Bcc: victim@example.net"
    )
    relay = SmtpRelay(RouteSettings(tls="none", connect_timeout=5.0, command_timeout=5.0))
    submission = RoutedBatch(
        [RoutedEnvelope(SENDER, [RCPT], [smtp_server.hop], intervals(1))],
        Body.from_content(b"Subject: s\r\n\r\nbody\r\n"),
    )
    policy = DeliveryPolicy(on_permanent_failure=OnPermanentFailure.BOUNCE)
    try:
        with anyio.fail_after(30):
            async with open_spool(
                tmp_path, relay, FakeClock(START), delivery_policy=policy, reporting_mta="mta.test"
            ) as spool:
                (mid,) = await spool.add(submission)
                await wait_until(lambda: smtp_server.transactions == 1, "the DSN to arrive")
                await wait_until(lambda: spool.status() == [], "the DSN to be delivered")
    finally:
        await relay.close_and_flush()

    assert places(tmp_path, mid) == ["removed"]
    (received,) = smtp_server.messages
    assert received.rcpt_tos == (SENDER,)
    report = report_of(received.content)
    _human, status, _headers = report.iter_parts()
    _per_message, block = status.get_payload()
    assert "Bcc" not in block
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user Bcc: victim@example.net"


# --------------------------------------------------------- reports, pure


def _original(envelope_id: str = "") -> Message:
    msg = make_message("8DsiUFeJ098b3CijH", recipients=[RCPT], spool_date=START)
    msg.envelope_info = msgspec.structs.replace(
        msg.envelope_info, sender=SENDER, envelope_id=envelope_id
    )
    return msg


def _report(headers: bytes, notice: Notice, envelope_id: str = "") -> bytes:
    dsn = build_dsn(
        _original(envelope_id),
        notice,
        original_headers=headers,
        reporting_mta="mta.test",
        now=START,
    )
    return dsn_body(dsn).content()


def _refused(reason: str = "refused", text: str = "no such user") -> Notice:
    reply = RecipientResult(550, text, "5.1.1")
    return Notice(NoticeKind.FAILED, (RecipientNotice(RCPT, "5.1.1", reason, reply, "mx:25"),))


def test_an_envelope_id_with_line_breaks_adds_no_field() -> None:
    wire = _report(b"Subject: s\r\n\r\n", _refused(), "env\r\nX-Injected: 1")
    report = report_of(wire)
    _human, status, _headers = report.iter_parts()
    per_message, _block = status.get_payload()
    assert per_message["Original-Envelope-Id"] == "env X-Injected: 1"
    assert b"\r\nX-Injected" not in wire


def test_overlong_lines_from_the_original_or_the_hop_are_encoded() -> None:
    """A 5,000-character header line and reply stay whole in the report,
    yet no line of the report is longer than RFC 5322 allows."""
    subject = "Subject: " + "x" * 5000
    wire = _report(f"{subject}\r\n\r\n".encode(), _refused("y" * 3000))
    assert max(len(line) for line in wire.split(b"\r\n")) <= 998
    human, _status, headers = report_of(wire).iter_parts()
    assert subject in headers.get_content()
    assert "y" * 3000 in human.get_content()


def test_a_huge_header_section_is_cut_at_a_line_end() -> None:
    line = b"X-Filler: " + b"z" * 90 + b"\r\n"
    headers = b"Subject: big\r\n" + line * 10_000  # ~1 MB, no body
    wire = _report(header_section(headers), _refused())
    assert len(wire) < 2 * MAX_ORIGINAL_HEADERS
    sent_back = list(report_of(wire).iter_parts())[2].get_content()
    assert sent_back.startswith("Subject: big\r\n")
    assert sent_back.endswith("z" * 90 + "\r\n")  # whole lines only


# ------------------------------------------- SMTP deduplicate = "message-id"

SPLIT = b"Message-ID: <split-1@client.example>\r\nSubject: to many\r\n\r\nbody\r\n.\r\n"


async def test_one_message_split_over_two_transactions_is_queued_for_both(
    tmp_path: Path,
) -> None:
    """A sending MTA splits one message's recipients over two transactions
    (Postfix does past its recipient limit): same sender, same Message-ID,
    other recipients. That is not a retry: both are queued."""
    port = free_port()
    with anyio.fail_after(60):
        async with listening(tmp_path, port, "message-id") as spool, raw_smtp(port) as c:
            code, first = await c.transaction(SENDER, ["a@example.com"], SPLIT)
            assert code == 250, first
            code, second = await c.transaction(SENDER, ["b@example.com"], SPLIT)
            assert code == 250, second
            code, again = await c.transaction(SENDER, ["b@example.com"], SPLIT)
            assert code == 250, again  # a true retry of the second is still one
            await c.quit()
            queued = {m.id: m.remaining_recipients for m in spool.status()}
    assert queued_ids(first) != queued_ids(second) == queued_ids(again)
    assert sorted(queued.values()) == [["a@example.com"], ["b@example.com"]]


async def test_a_long_sender_and_message_id_are_accepted_once(tmp_path: Path) -> None:
    """A 198-character sender and a 950-character Message-ID (both legal)
    make a key longer than a client key may be: the message is still taken
    (not 451 for ever), and a retry is still recognised."""
    sender = "s" * 64 + "@" + "d" * 60 + "." + "e" * 60 + ".example.org"
    message_id = b"<" + b"m" * 940 + b"@client.example>"
    data = b"Message-ID: " + message_id + b"\r\nSubject: long\r\n\r\nbody\r\n.\r\n"
    port = free_port()
    with anyio.fail_after(60):
        async with listening(tmp_path, port, "message-id") as spool, raw_smtp(port) as c:
            code, first = await c.transaction(sender, [RCPT], data)
            assert code == 250, first
            code, again = await c.transaction(sender, [RCPT], data)
            assert code == 250, again
            await c.quit()
            assert len(spool.status()) == 1
    assert queued_ids(first) == queued_ids(again)


def test_the_smtp_key_differs_by_recipients_not_their_order() -> None:
    key = functools.partial(message_id_key, SENDER, SPLIT)
    assert key(["a@x.example", "b@x.example"]) == key(["b@x.example", "a@x.example"])
    assert key(["a@x.example"]) != key(["b@x.example"])
    long_id = b"Message-ID: <" + b"a" * 900 + b"x>\r\n\r\n"
    other = b"Message-ID: <" + b"a" * 900 + b"y>\r\n\r\n"
    assert message_id_key(SENDER, long_id, [RCPT]) != message_id_key(SENDER, other, [RCPT])


# ------------------------------------------------- idempotency keys, at once


async def test_more_submissions_of_one_key_at_once_than_worker_threads_queue_once(
    tmp_path: Path,
) -> None:
    """60 submissions of the same key at once (more than anyio's 40 default
    worker threads, and fewer than the control socket's 64 clients): none
    may wait for the key's lock in a thread the holder needs to record its
    ids, so all end, with one message."""
    clock = FakeClock(START)
    answers: list[list[str]] = []
    async with open_spool(tmp_path, relay_answering({RCPT: TRY_LATER}), clock) as spool:

        async def submit() -> None:
            answers.append(await spool.add(batch(RCPT), idempotency_key="same key"))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(60):
                    tg.start_soon(submit)
        assert len(spool.status()) == 1
    assert len(answers) == 60 and all(a == answers[0] for a in answers)


# ------------------------------------------------------------ history query


async def test_a_history_query_past_its_limit_is_refused_not_held_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client asking for the whole journal of a busy spool (no since) is
    refused once more than MAX_QUERY_RESULTS outcomes match; a narrower
    query still answers, and reading the directory itself has no limit."""
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay_answering({}), clock) as spool:
        (mid,) = await spool.add(batch("a@example.com"))
        await wait_until(functools.partial(spool.find_outcome, mid), "delivery")
    (day_file,) = (tmp_path / "history").iterdir()
    day_file.write_bytes(day_file.read_bytes() * 12)
    monkeypatch.setattr(history, "MAX_QUERY_RESULTS", 10)
    async with open_spool(tmp_path, relay_answering({}), clock) as spool:
        with pytest.raises(OperationRefusedError, match="more than 10 outcomes"):
            await spool.history()
        assert await spool.history(recipient="b@example.com") == []
    assert len(await history.read_history(tmp_path)) == 12


# ------------------------------------------------- control: clients that stay


async def test_clients_that_wait_for_ever_leave_places_for_the_operator(
    tmp_path: Path,
) -> None:
    """With 8 places, 6 clients may wait (or stream events) at once; the
    7th waiter is told busy at once, and a ping still gets through."""
    with anyio.fail_after(60):
        async with serving(tmp_path, max_clients=8) as (server, path):
            (mid,) = await server.spool.add(batch(RCPT))  # held: its relay never answers
            wait = json.dumps({"v": 1, "op": "wait", "id": mid, "timeout": None}).encode()
            waiters = [connect(path) for _ in range(6)]
            for s in waiters:
                s.sendall(wait + b"\n")
            await wait_until(lambda: server.staying == 6, "six waiters")
            extra = connect(path)
            extra.sendall(wait + b"\n")
            reply = one_reply(await anyio.to_thread.run_sync(read_all, extra))
            assert reply["kind"] == "busy", reply
            assert "waiting or streaming events" in reply["error"]
            assert await ping(path) == "pong"
            for s in waiters:
                s.close()
            await wait_until(lambda: server.staying == 0, "the waits to end")


# ------------------------------------------------------------- hop backoff


def test_backoffs_of_hops_never_tried_again_are_forgotten() -> None:
    """10,000 hops (a hostile domain each) throttle us once and are never
    tried again: an hour after their windows ended, the gate keeps none of
    them; a hop still backed off is kept, and one throttling again within
    the hour still doubles its window."""
    gate: DestinationGate[str] = DestinationGate()
    for n in range(10_000):
        gate.throttled(f"[2001:db8::{n:x}]:25", 0.0, "421 4.7.0 go away")
    first = BACKOFF_FIRST.total_seconds()
    later = first + BACKOFF_MAX.total_seconds()
    assert gate.throttled("[2001:db8::1]:25", later - 1, "421").window == 2 * first
    gate.throttled("mx.example.com:25", later, "421")
    assert gate.remembered() == {"[2001:db8::1]:25", "mx.example.com:25"}
