"""The SMTP relay against a real SMTP server with injected faults.

Every test runs :class:`~spoold.smtp_relay.SmtpRelay` against aiosmtpd
servers in the test's own event loop (:mod:`tests.smtp_server`) and asserts
what the relay returns and what the server saw: replies per recipient,
which commands were sent, the exact bytes received, how many connections
were opened and closed. A timeout is tested against a hop that never
answers and asserted by the error naming it; a timeout that must not fire
is far longer than any answer on loopback takes (``PROMPT``). The cache's
idle clock is a :class:`~tests.relay_helpers.ManualClock`, so whether a
connection is checked or expired is what the test says, not how fast the
machine is. Every attempt runs under a safety deadline.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest

from spoold.body import Body
from spoold.connection_cache import ConnectionCache, RouteSettings
from spoold.credentials import load_auth_file
from spoold.errors import SpooldError
from spoold.hops import parse_hop
from spoold.relay import Delivery, RecipientResult, RelayOutcome
from spoold.smtp_relay import SmtpRelay
from tests.relay_helpers import (
    ALICE,
    BOB,
    CAROL,
    CONTENT,
    EIGHT_BIT,
    OK,
    PASSWORD,
    SENDER,
    USER,
    UTF8_RCPT,
    MakeRelay,
    ManualClock,
    delivery,
    failure,
    message_to,
    relay_message,
    route,
)
from tests.smtp_server import (
    DISCONNECT,
    HANG,
    Behaviour,
    Reply,
    SmtpTestServer,
    StartServer,
    TlsCertificate,
)
from tests.spool_helpers import settle
from tests.support import (
    ARABIC_TEN,
    NOT_ASCII_DIGITS,
    SUPERSCRIPT_TWO,
    WAIT_TIMEOUT,
    free_port,
    wait_until,
)


@pytest.fixture
def silent_hop() -> Iterator[str]:
    """A hop that completes the TCP handshake (the kernel queues it) but
    never accepts, never greets and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------------- delivery


async def test_delivers_the_original_content_to_every_recipient(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    relay = make_relay()
    msg, body = message_to(tmp_path, [smtp_server.hop], [ALICE, BOB])
    assert b"\r\n...two dots\r\n" in body.path.read_bytes()  # on disk: dot-stuffed

    with anyio.fail_after(WAIT_TIMEOUT):
        outcome = await relay.relay(msg, body, [ALICE, BOB])

    assert delivery(outcome) == Delivery({ALICE: OK, BOB: OK}, smtp_server.hop)
    (received,) = smtp_server.messages
    assert received.content == CONTENT
    assert received.mail_from == SENDER
    assert received.rcpt_tos == (ALICE, BOB)
    assert smtp_server.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "."]
    assert body.path.read_bytes() == Body.from_content(CONTENT).wire  # never rewritten


async def test_delivers_only_to_the_recipients_it_is_given(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    msg, body = message_to(tmp_path, [smtp_server.hop], [ALICE, BOB, CAROL])
    with anyio.fail_after(WAIT_TIMEOUT):
        outcome = await make_relay().relay(msg, body, [CAROL])
    assert delivery(outcome).recipients == {CAROL: OK}
    assert smtp_server.messages[0].rcpt_tos == (CAROL,)


async def test_null_sender_is_sent_as_empty_reverse_path(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    outcome = await relay_message(make_relay(), tmp_path, [smtp_server.hop], sender="")
    assert delivery(outcome).recipients == {ALICE: OK}
    assert smtp_server.args("MAIL")[0].split()[0] == "<>"


# ------------------------------------------------------------- refusals

REFUSALS = [
    pytest.param("451 4.3.0 try later", RecipientResult(451, "try later", "4.3.0"), id="451"),
    pytest.param(
        "550 5.7.1 sender rejected", RecipientResult(550, "sender rejected", "5.7.1"), id="550"
    ),
    pytest.param("554 no enhanced code", RecipientResult(554, "no enhanced code"), id="554-plain"),
]


@pytest.mark.parametrize(("reply", "expected"), REFUSALS)
async def test_refusal_at_mail_applies_to_every_recipient(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    reply: str,
    expected: RecipientResult,
) -> None:
    relay = make_relay()
    smtp_server.behaviour.mail = Reply(reply)

    outcome = await relay_message(relay, tmp_path, [smtp_server.hop], [ALICE, BOB])

    assert delivery(outcome) == Delivery({ALICE: expected, BOB: expected}, smtp_server.hop)
    assert smtp_server.verbs() == ["EHLO", "MAIL", "RSET"]
    assert smtp_server.messages == []

    # The connection was reset, kept, and carries the next message.
    smtp_server.behaviour.mail = None
    assert delivery(await relay_message(relay, tmp_path, [smtp_server.hop])).recipients == {
        ALICE: OK
    }
    assert smtp_server.connections_opened == 1


@pytest.mark.parametrize(("reply", "expected"), REFUSALS)
async def test_refusal_at_end_of_data_applies_to_every_recipient(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    reply: str,
    expected: RecipientResult,
) -> None:
    relay = make_relay()
    smtp_server.behaviour.data_end = Reply(reply)

    outcome = await relay_message(relay, tmp_path, [smtp_server.hop], [ALICE, BOB])

    assert delivery(outcome) == Delivery({ALICE: expected, BOB: expected}, smtp_server.hop)
    assert smtp_server.messages == []
    assert smtp_server.verbs()[-3:] == ["DATA", ".", "RSET"]

    smtp_server.behaviour.data_end = None
    assert delivery(await relay_message(relay, tmp_path, [smtp_server.hop])).recipients == {
        ALICE: OK
    }
    assert smtp_server.connections_opened == 1


async def test_refusal_of_the_data_command_applies_to_every_accepted_recipient(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    smtp_server.behaviour.data = Reply("554 5.5.1 no valid recipients")
    smtp_server.behaviour.rcpt[BOB] = Reply("550 5.1.1 no such user")

    outcome = await relay_message(make_relay(), tmp_path, [smtp_server.hop], [ALICE, BOB])

    assert delivery(outcome).recipients == {
        ALICE: RecipientResult(554, "no valid recipients", "5.5.1"),
        BOB: RecipientResult(550, "no such user", "5.1.1"),
    }
    assert smtp_server.messages == []
    assert smtp_server.count(".") == 0


async def test_mixed_rcpt_replies_give_one_result_per_recipient(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    smtp_server.behaviour.rcpt[BOB] = Reply("550 5.1.1 no such user")
    smtp_server.behaviour.rcpt[CAROL] = Reply("450 4.2.1 mailbox busy")

    outcome = await relay_message(make_relay(), tmp_path, [smtp_server.hop], [ALICE, BOB, CAROL])

    assert delivery(outcome) == Delivery(
        {
            ALICE: OK,
            BOB: RecipientResult(550, "no such user", "5.1.1"),
            CAROL: RecipientResult(450, "mailbox busy", "4.2.1"),
        },
        smtp_server.hop,
    )
    # DATA went out once, for the one recipient the hop took.
    (received,) = smtp_server.messages
    assert received.rcpt_tos == (ALICE,)
    assert received.content == CONTENT


async def test_every_rcpt_refused_sends_no_data_and_keeps_the_connection(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    relay = make_relay()
    smtp_server.behaviour.rcpt[ALICE] = Reply("550 5.1.1 no such user")
    smtp_server.behaviour.rcpt[BOB] = Reply("452 4.5.3 too many recipients")

    outcome = await relay_message(relay, tmp_path, [smtp_server.hop], [ALICE, BOB])

    assert delivery(outcome).recipients == {
        ALICE: RecipientResult(550, "no such user", "5.1.1"),
        BOB: RecipientResult(452, "too many recipients", "4.5.3"),
    }
    assert smtp_server.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "RSET"]

    assert delivery(
        await relay_message(relay, tmp_path, [smtp_server.hop], [CAROL])
    ).recipients == {CAROL: OK}
    assert smtp_server.connections_opened == 1


# ----------------------------------------------------------- disconnects


async def test_disconnect_before_greeting_tries_the_next_hop(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    rude, good = await start_smtp_server(), await start_smtp_server()
    rude.behaviour.greeting = DISCONNECT

    outcome = await relay_message(make_relay(), tmp_path, [rude.hop, good.hop])

    assert delivery(outcome) == Delivery({ALICE: OK}, good.hop)
    assert rude.connections_opened == 1
    assert rude.commands == []
    assert len(good.messages) == 1


async def test_disconnect_before_greeting_on_the_only_hop_fails_naming_it(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    smtp_server.behaviour.greeting = DISCONNECT

    error = failure(await relay_message(make_relay(), tmp_path, [smtp_server.hop]))

    assert error.startswith("no hops available: ")
    assert smtp_server.hop in error


async def test_refusing_greeting_makes_the_hop_unavailable(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    smtp_server.behaviour.greeting = Reply("554 5.3.2 no service today")

    error = failure(await relay_message(make_relay(), tmp_path, [smtp_server.hop]))

    assert error.startswith("no hops available: ")
    assert f"{smtp_server.hop}: 554" in error
    assert "no service today" in error


@pytest.mark.parametrize(
    "where",
    ["at-rcpt", "in-data", "instead-of-data-end-reply"],
)
async def test_disconnect_mid_transaction_fails_and_the_next_message_reconnects(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    where: str,
) -> None:
    relay = make_relay()
    behaviour = smtp_server.behaviour
    if where == "at-rcpt":
        behaviour.rcpt[BOB] = DISCONNECT
    elif where == "in-data":
        behaviour.disconnect_in_data = True
    else:
        behaviour.data_end = DISCONNECT

    outcome = await relay_message(relay, tmp_path, [smtp_server.hop], [ALICE, BOB])

    if where != "at-rcpt":
        # The whole (small) message, final dot included, went in one write
        # before the hop hung up: it may have it. In doubt, not failed.
        results = delivery(outcome).recipients
        assert {r.in_doubt for r in results.values()} == {True}
        assert all("connection lost" in r.text for r in results.values())
    else:
        error = failure(outcome)
        assert error.startswith(f"{smtp_server.hop}: ")
        assert "connection lost" in error
    assert smtp_server.messages == []
    assert relay.cache.open_connections == 0

    smtp_server.behaviour = Behaviour()
    outcome = await relay_message(relay, tmp_path, [smtp_server.hop], [ALICE, BOB])
    assert delivery(outcome).recipients == {ALICE: OK, BOB: OK}
    assert smtp_server.connections_opened == 2
    assert smtp_server.messages[0].connection == 2


# -------------------------------------------------------------- timeouts
#
# A timeout is tested with a hop that never answers (HANG), so that the test
# does not depend on how late a late answer is, and asserted by the error,
# which names the timeout that fired. Where an answer slower than one
# timeout must still be taken, it comes a little after that timeout (a lower
# bound the server's sleep guarantees) and well within the other one.

PROMPT = 2.0
"""A timeout that no answer of a hop on loopback comes near, however busy
the machine: for commands that must not time out in a test of another."""


async def test_connect_timeout_when_the_hop_never_greets(
    silent_hop: str, make_relay: MakeRelay, tmp_path: Path
) -> None:
    relay = make_relay(route(connect_timeout=0.3))
    started = anyio.current_time()

    error = failure(await relay_message(relay, tmp_path, [silent_hop]))

    assert error == f"no hops available: {silent_hop}: timeout: no greeting within 0.3s"
    assert anyio.current_time() - started >= 0.3


async def test_greeting_slower_than_connect_timeout_makes_the_hop_unavailable(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    slow, good = await start_smtp_server(), await start_smtp_server()
    slow.behaviour.greeting = HANG

    error = failure(
        await relay_message(make_relay(route(connect_timeout=0.3)), tmp_path, [slow.hop])
    )
    assert error == f"no hops available: {slow.hop}: timeout: no greeting within 0.3s"

    # With a second hop, the slow one is skipped.
    relay = make_relay(route(connect_timeout=PROMPT))
    outcome = await relay_message(relay, tmp_path, [slow.hop, good.hop])
    assert delivery(outcome) == Delivery({ALICE: OK}, good.hop)
    assert slow.connections_opened == 2
    assert slow.commands == []


async def test_command_timeout_fails_the_attempt_and_drops_the_connection(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    relay = make_relay(route(command_timeout=PROMPT))
    smtp_server.behaviour.mail = HANG

    error = failure(await relay_message(relay, tmp_path, [smtp_server.hop]))

    assert error == f"{smtp_server.hop}: timeout: no reply to MAIL within {PROMPT:g}s"
    await wait_until(lambda: smtp_server.connections_closed == 1, "the client to hang up")
    assert relay.cache.open_connections == 0

    # The next message takes a new connection.
    smtp_server.behaviour.mail = None
    assert delivery(await relay_message(relay, tmp_path, [smtp_server.hop])).recipients == {
        ALICE: OK
    }
    assert smtp_server.connections_opened == 2
    assert smtp_server.messages[0].connection == 2


async def test_the_final_reply_waits_for_its_own_timeout_not_the_command_timeout(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    # the final reply's wait = final_reply_timeout + size / data_rate, the
    # size of the body file (dot-stuffed): here PROMPT + 117 s.
    size = len(Body.from_content(CONTENT).wire)
    patient = route(command_timeout=PROMPT, final_reply_timeout=PROMPT, data_rate=1)
    assert patient.final_reply_wait(size) == PROMPT + 117

    # Later than the command timeout, well within the data timeout: taken.
    smtp_server.behaviour.data_end = Reply(delay=PROMPT + 0.5)
    outcome = await relay_message(make_relay(patient), tmp_path, [smtp_server.hop])
    assert delivery(outcome).recipients == {ALICE: OK}

    # No answer: the data timeout (PROMPT + 0.5 s here) is the one that
    # fires; the whole message was sent, so the recipient is in doubt.
    short = route(command_timeout=PROMPT, data_rate=size * 2, final_reply_timeout=PROMPT)
    assert short.final_reply_wait(size) == PROMPT + 0.5
    smtp_server.behaviour.data_end = HANG
    outcome = await relay_message(make_relay(short), tmp_path, [smtp_server.hop])
    (result,) = delivery(outcome).recipients.values()
    assert result.in_doubt
    assert (result.code, result.enhanced_status) == (451, "4.4.2")
    assert f"no reply to the end of the message within {PROMPT + 0.5:g}s" in result.text
    await wait_until(lambda: smtp_server.connections_closed == 1, "the client to hang up")
    assert len(smtp_server.messages) == 1


async def test_message_timeout_bounds_the_whole_attempt(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    # Each reply is well within the command timeout; together they take
    # longer than the message timeout (the server's sleeps guarantee 0.6 s).
    relay = make_relay(route(command_timeout=10 * PROMPT, message_timeout=0.5))
    smtp_server.behaviour.mail = Reply(delay=0.3)
    smtp_server.behaviour.rcpt[ALICE] = Reply(delay=0.3)

    error = failure(await relay_message(relay, tmp_path, [smtp_server.hop]))

    assert error == f"{smtp_server.hop}: timeout: no answer within the message timeout of 0.5s"
    assert smtp_server.messages == []
    await wait_until(lambda: smtp_server.connections_closed == 1, "the client to hang up")
    assert relay.cache.open_connections == 0


async def test_message_timeout_bounds_the_wait_for_a_free_connection(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    """The only connection is held elsewhere: the attempt waits for it no
    longer than its message timeout, fails with the timeout's text and
    leaves no waiter behind (the held connection, given back, is idle)."""
    settings = route(message_timeout=0.3)
    relay = make_relay(settings, max_per_hop=1, acquire_timeout=10 * PROMPT)
    async with relay.cache.connection(smtp_server.hop, settings):
        error = failure(await relay_message(relay, tmp_path, [smtp_server.hop]))
    assert error == f"{smtp_server.hop}: timeout: no answer within the message timeout of 0.3s"
    assert (relay.cache.open_connections, relay.cache.idle_connections) == (1, 1)
    outcome = await relay_message(relay, tmp_path, [smtp_server.hop])
    assert delivery(outcome).recipients == {ALICE: OK}


async def test_message_timeout_bounds_the_greeting(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    server = await start_smtp_server()
    server.behaviour.greeting = HANG
    relay = make_relay(route(connect_timeout=10 * PROMPT, message_timeout=0.3))
    error = failure(await relay_message(relay, tmp_path, [server.hop]))
    assert error == f"{server.hop}: timeout: no answer within the message timeout of 0.3s"
    assert relay.cache.open_connections == 0
    await wait_until(lambda: server.connections_closed == 1, "the client to hang up")


async def test_a_stop_in_the_middle_of_a_transaction_drops_the_connection(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    """Cancelled while waiting for a reply (a daemon stopping): the
    connection is dropped, never lent again half-way through a
    transaction, and its slot is free for the next attempt."""
    relay = make_relay(max_per_hop=1)
    gate = asyncio.Event()
    smtp_server.behaviour.rcpt[ALICE] = Reply(gate=gate)
    msg, body = message_to(tmp_path, [smtp_server.hop])
    with anyio.move_on_after(WAIT_TIMEOUT) as safety:
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay.relay, msg, body, [ALICE])
            await wait_until(lambda: smtp_server.count("RCPT") == 1, "RCPT to arrive")
            tg.cancel_scope.cancel()
    assert not safety.cancelled_caught
    assert relay.cache.open_connections == 0
    await wait_until(lambda: smtp_server.connections_closed == 1, "the client to hang up")
    gate.set()
    smtp_server.behaviour.rcpt.clear()
    outcome = await relay_message(relay, tmp_path, [smtp_server.hop])
    assert delivery(outcome).recipients == {ALICE: OK}
    assert smtp_server.messages[0].connection == 2


async def test_the_message_timeout_starts_afresh_for_each_message_on_a_reused_connection(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    """Three messages in a row on one connection, each taking more than
    half its message timeout (the hop is slow to accept the recipient):
    each has its own timeout, so none fails on the deadline of the one
    before it."""
    relay = make_relay(route(message_timeout=0.5))
    smtp_server.behaviour.rcpt[ALICE] = Reply(delay=0.3)
    outcomes = [await relay_message(relay, tmp_path, [smtp_server.hop]) for _ in range(3)]
    assert [delivery(o).recipients for o in outcomes] == [{ALICE: OK}] * 3
    assert [m.connection for m in smtp_server.messages] == [1, 1, 1]
    assert smtp_server.connections_opened == 1


async def test_the_final_reply_is_waited_for_past_the_message_timeout(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    """Once the final dot is sent the hop may have the message: its reply
    gets ``final_reply_timeout`` (RFC 5321: 10 minutes), whatever is left of
    the message timeout (the server's sleep guarantees 0.6 s > 0.5 s)."""
    relay = make_relay(route(message_timeout=0.5, final_reply_timeout=10 * PROMPT))
    smtp_server.behaviour.data_end = Reply(delay=0.6)
    outcome = await relay_message(relay, tmp_path, [smtp_server.hop])
    assert delivery(outcome).recipients == {ALICE: OK}


async def test_no_final_reply_leaves_only_the_accepted_recipients_in_doubt(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    relay = make_relay(route(final_reply_timeout=0.2, data_rate=10**9))
    smtp_server.behaviour.rcpt[BOB] = Reply("550 5.1.1 no such user")
    smtp_server.behaviour.data_end = HANG
    outcome = await relay_message(relay, tmp_path, [smtp_server.hop], [ALICE, BOB, CAROL])
    results = delivery(outcome).recipients
    assert results[BOB] == RecipientResult(550, "no such user", "5.1.1")  # a real refusal
    for rcpt in (ALICE, CAROL):
        assert results[rcpt].in_doubt
        assert not results[rcpt].accepted
        assert "no reply to the end of the message" in results[rcpt].text
    assert delivery(outcome).hop == smtp_server.hop
    await wait_until(lambda: smtp_server.connections_closed == 1, "the client to hang up")
    assert relay.cache.open_connections == 0


# ------------------------------------------------------------------ 421


@pytest.mark.parametrize("where", ["mail", "rcpt", "data-end"])
async def test_421_is_every_recipients_answer_and_drops_the_connection(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    where: str,
) -> None:
    relay = make_relay()
    closing = Reply("421 4.7.0 mx.test closing connection")
    if where == "mail":
        smtp_server.behaviour.mail = closing
    elif where == "rcpt":
        smtp_server.behaviour.rcpt[ALICE] = closing
    else:
        smtp_server.behaviour.data_end = closing

    got = delivery(await relay_message(relay, tmp_path, [smtp_server.hop], [ALICE, BOB]))

    # A reply like any other, so on_error is asked about it (seed parity).
    answer = RecipientResult(421, "mx.test closing connection", "4.7.0")
    assert got.recipients == {ALICE: answer, BOB: answer}
    assert got.hop == smtp_server.hop
    assert smtp_server.messages == []
    # The server keeps the connection open; the client must hang up.
    await wait_until(lambda: smtp_server.connections_closed == 1, "the client to hang up")
    assert "RSET" not in smtp_server.verbs()
    assert relay.cache.open_connections == 0

    smtp_server.behaviour = Behaviour()
    assert delivery(await relay_message(relay, tmp_path, [smtp_server.hop])).recipients == {
        ALICE: OK
    }
    assert smtp_server.connections_opened == 2


# ------------------------------------------------------------- STARTTLS


async def test_required_tls_with_verification_refuses_a_self_signed_certificate(
    start_smtp_server: StartServer,
    tls_certificate: TlsCertificate,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    server = await start_smtp_server(tls_context=tls_certificate.server_context())
    relay = make_relay(route(tls="required", verify_certificates=True))

    error = failure(await relay_message(relay, tmp_path, [server.hop]))

    assert error.startswith("no hops available: ")
    assert server.hop in error
    assert "certificate" in error.lower()
    assert "MAIL" not in server.verbs()
    assert server.messages == []


async def test_required_tls_with_the_certificate_as_ca_file_delivers_over_tls(
    start_smtp_server: StartServer,
    tls_certificate: TlsCertificate,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    server = await start_smtp_server(tls_context=tls_certificate.server_context())
    relay = make_relay(route(tls="required", ca_file=str(tls_certificate.cert)))

    assert delivery(await relay_message(relay, tmp_path, [server.hop])).recipients == {ALICE: OK}
    (received,) = server.messages
    assert received.tls
    assert received.content == CONTENT


async def test_opportunistic_tls_without_verification_delivers_over_tls(
    start_smtp_server: StartServer,
    tls_certificate: TlsCertificate,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    server = await start_smtp_server(tls_context=tls_certificate.server_context())
    relay = make_relay(route(tls="opportunistic", verify_certificates=False))

    assert delivery(await relay_message(relay, tmp_path, [server.hop])).recipients == {ALICE: OK}
    assert server.verbs()[:3] == ["EHLO", "STARTTLS", "EHLO"]
    (received,) = server.messages
    assert received.tls
    assert received.content == CONTENT


async def test_opportunistic_tls_falls_back_to_plain_text_when_not_offered(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    relay = make_relay(route(tls="opportunistic"))
    assert delivery(await relay_message(relay, tmp_path, [smtp_server.hop])).recipients == {
        ALICE: OK
    }
    assert smtp_server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "."]
    assert not smtp_server.messages[0].tls


async def test_required_tls_against_a_hop_without_starttls_makes_it_unavailable(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    relay = make_relay(route(tls="required"))

    error = failure(await relay_message(relay, tmp_path, [smtp_server.hop]))

    assert error == (
        f"no hops available: {smtp_server.hop}: TLS is required but the hop does not offer STARTTLS"
    )
    assert "MAIL" not in smtp_server.verbs()


# ------------------------------------------------------------------ AUTH


@pytest.mark.parametrize("tls", ["none", "opportunistic"])
async def test_credentials_are_never_sent_without_tls(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    tls: Literal["none", "opportunistic"],
) -> None:
    # A plain-text hop that offers AUTH: someone may have stripped STARTTLS.
    server = await start_smtp_server(credentials=(USER, PASSWORD))
    relay = make_relay(route(tls=tls, auth=(USER, PASSWORD)))

    error = failure(await relay_message(relay, tmp_path, [server.hop]))

    assert error == (
        f"no hops available: {server.hop}: "
        "refusing to send credentials without TLS (STARTTLS not offered)"
    )
    assert server.auth_attempts == []
    assert "MAIL" not in server.verbs()


async def test_auth_after_starttls_delivers(
    start_smtp_server: StartServer,
    tls_certificate: TlsCertificate,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    # The usual submission set-up: AUTH is offered only once TLS is on.
    server = await start_smtp_server(
        tls_context=tls_certificate.server_context(),
        credentials=(USER, PASSWORD),
        auth_require_tls=True,
    )
    relay = make_relay(route(tls="required", verify_certificates=False, auth=(USER, PASSWORD)))

    outcome = await relay_message(relay, tmp_path, [server.hop])

    assert delivery(outcome).recipients == {ALICE: OK}
    assert server.auth_attempts == [(USER, True)]
    (received,) = server.messages
    assert received.tls
    assert received.login == USER


async def test_auth_with_a_wrong_password_makes_the_hop_unavailable(
    start_smtp_server: StartServer,
    tls_certificate: TlsCertificate,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    server = await start_smtp_server(
        tls_context=tls_certificate.server_context(),
        credentials=(USER, PASSWORD),
        auth_require_tls=True,
    )
    relay = make_relay(route(tls="opportunistic", verify_certificates=False, auth=(USER, "wrong")))

    error = failure(await relay_message(relay, tmp_path, [server.hop]))

    assert error == f"no hops available: {server.hop}: 535 5.7.8 Authentication credentials invalid"
    assert server.auth_attempts == [(USER, False)]
    assert "MAIL" not in server.verbs()


def test_route_settings_do_not_show_the_password() -> None:
    assert PASSWORD not in repr(route(auth=(USER, PASSWORD)))


def test_load_auth_file_accepts_an_owner_only_file(tmp_path: Path) -> None:
    path = tmp_path / "auth"
    path.write_text(f"{USER}:{PASSWORD}\n")
    path.chmod(0o600)
    assert load_auth_file(path) == (USER, PASSWORD)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_load_auth_file_refuses_a_file_others_can_read(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "auth"
    path.write_text(f"{USER}:{PASSWORD}\n")
    path.chmod(mode)
    with pytest.raises(SpooldError) as info:
        load_auth_file(path)
    message = str(info.value)
    assert str(path) in message
    assert f"mode {mode:04o}" in message
    assert "0600" in message


@pytest.mark.parametrize("text", ["just-a-user\n", ":password-only\n", ""])
def test_load_auth_file_refuses_a_file_without_user_colon_password(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "auth"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(SpooldError, match="expected one line 'user:password'"):
        load_auth_file(path)


def test_load_auth_file_names_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere"
    with pytest.raises(SpooldError, match="No such file") as info:
        load_auth_file(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------ next hops


async def test_falls_back_to_the_second_hop_when_the_first_refuses_connections(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    dead = f"127.0.0.1:{free_port()}"

    outcome = await relay_message(make_relay(), tmp_path, [dead, smtp_server.hop])

    assert delivery(outcome) == Delivery({ALICE: OK}, smtp_server.hop)
    assert len(smtp_server.messages) == 1


async def test_no_hop_reachable_names_every_hop(make_relay: MakeRelay, tmp_path: Path) -> None:
    first, second = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"

    error = failure(await relay_message(make_relay(), tmp_path, [first, second]))

    assert error.startswith("no hops available: ")
    assert error.index(first) < error.index(second)


async def test_a_hop_that_greeted_ends_the_attempt_even_on_refusal(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    first, second = await start_smtp_server(), await start_smtp_server()
    first.behaviour.mail = Reply("451 4.3.0 try later")

    outcome = await relay_message(make_relay(), tmp_path, [first.hop, second.hop])

    assert delivery(outcome).hop == first.hop
    assert second.connections_opened == 0


# ------------------------------------------------------ connection cache


async def test_sequential_messages_share_one_connection(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    relay = make_relay()
    for n in range(50):
        outcome = await relay_message(relay, tmp_path, [smtp_server.hop], [f"r{n}@example.com"])
        assert delivery(outcome).recipients == {f"r{n}@example.com": OK}

    assert smtp_server.connections_opened == 1
    assert smtp_server.transactions == 50
    assert smtp_server.count("MAIL") == 50
    assert smtp_server.count("EHLO") == 1
    assert relay.cache.connections_made == 1
    assert relay.cache.idle_connections == 1


async def test_concurrent_messages_use_at_most_max_per_hop_connections(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    relay = make_relay(max_per_hop=3)
    # The first messages are held at the end of DATA until five senders
    # want a connection: three have one, two wait for theirs.
    gate = asyncio.Event()
    smtp_server.behaviour.data_end = Reply(gate=gate)
    outcomes: list[RelayOutcome] = []

    async def sender(worker: int) -> None:
        for n in range(10):
            rcpt = f"w{worker}-{n}@example.com"
            outcomes.append(await relay_message(relay, tmp_path, [smtp_server.hop], [rcpt]))

    async with anyio.create_task_group() as tg:
        for worker in range(5):
            tg.start_soon(sender, worker)
        await wait_until(lambda: smtp_server.count(".") == 3, "three messages held")
        assert smtp_server.open_connections == 3
        assert relay.cache.open_connections == 3
        gate.set()

    assert len(outcomes) == 50
    assert all(isinstance(o, Delivery) for o in outcomes)
    assert smtp_server.transactions == 50
    assert smtp_server.connections_opened == 3
    assert smtp_server.max_open_connections == 3
    assert relay.cache.open_connections == 3


async def test_a_connection_idle_longer_than_check_after_is_checked_with_noop(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    relay = make_relay(check_after=10, monotonic=clock)
    await relay_message(relay, tmp_path, [smtp_server.hop])
    clock.advance(10)
    await relay_message(relay, tmp_path, [smtp_server.hop])
    assert smtp_server.verbs(1)[5:] == ["MAIL", "RCPT", "DATA", "."]  # 10 s: no check yet
    clock.advance(10.5)
    await relay_message(relay, tmp_path, [smtp_server.hop])

    assert smtp_server.connections_opened == 1
    assert smtp_server.verbs(1)[9:] == ["NOOP", "MAIL", "RCPT", "DATA", "."]
    assert smtp_server.transactions == 3


@pytest.mark.parametrize("noop", [Reply("421 4.4.2 idle too long"), Reply("500 what?"), DISCONNECT])
async def test_a_connection_failing_the_noop_check_is_replaced(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    noop: Reply,
) -> None:
    clock = ManualClock()
    relay = make_relay(check_after=10, monotonic=clock)
    await relay_message(relay, tmp_path, [smtp_server.hop])
    smtp_server.behaviour.noop = noop
    clock.advance(11)

    outcome = await relay_message(relay, tmp_path, [smtp_server.hop])

    assert delivery(outcome).recipients == {ALICE: OK}
    assert smtp_server.connections_opened == 2
    assert [m.connection for m in smtp_server.messages] == [1, 2]
    await wait_until(lambda: smtp_server.connections_closed == 1, "the old connection to close")


async def test_a_connection_idle_longer_than_idle_timeout_is_closed_and_replaced(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    relay = make_relay(idle_timeout=30, check_after=0, monotonic=clock)
    await relay_message(relay, tmp_path, [smtp_server.hop])
    assert relay.cache.idle_connections == 1

    clock.advance(31)
    outcome = await relay_message(relay, tmp_path, [smtp_server.hop])

    assert delivery(outcome).recipients == {ALICE: OK}
    assert smtp_server.connections_opened == 2
    assert "NOOP" not in smtp_server.verbs()  # closed unasked, not checked
    await wait_until(lambda: smtp_server.connections_closed == 1, "the idle connection to close")
    assert [m.connection for m in smtp_server.messages] == [1, 2]


async def test_an_idle_connection_is_closed_after_idle_timeout_without_more_traffic(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    # The contract: "an idle connection is closed after idle_timeout", not
    # only when the next message for the hop comes along.
    relay = make_relay(idle_timeout=0.1)
    await relay_message(relay, tmp_path, [smtp_server.hop])
    assert smtp_server.open_connections == 1

    await wait_until(
        lambda: smtp_server.connections_closed == 1,
        lambda: f"the idle connection to close; {relay.cache.idle_connections} still idle",
    )
    assert relay.cache.open_connections == 0


async def test_idle_timeout_counts_from_the_last_use(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    """A connection used again before its idle timer fires is not closed
    by that timer: it closes ``idle_timeout`` after its last use (a lower
    bound, whatever the machine's speed)."""
    loop = asyncio.get_running_loop()
    relay = make_relay(idle_timeout=0.5)
    await relay_message(relay, tmp_path, [smtp_server.hop])
    await anyio.sleep(0.3)
    await relay_message(relay, tmp_path, [smtp_server.hop])
    last_use = loop.time()
    assert smtp_server.connections_opened == 1
    await wait_until(lambda: smtp_server.connections_closed == 1, "the idle connection to close")
    assert loop.time() >= last_use + 0.5 - 0.01
    assert relay.cache.open_connections == 0


async def test_a_connection_the_server_closed_while_idle_is_replaced(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    relay = make_relay()  # check_after=2: no NOOP for a connection just used
    await relay_message(relay, tmp_path, [smtp_server.hop])
    await smtp_server.cut_connections()
    await wait_until(lambda: smtp_server.connections_closed == 1, "the server to hang up")
    await settle()  # the client reads the end of the stream

    outcome = await relay_message(relay, tmp_path, [smtp_server.hop])

    assert delivery(outcome).recipients == {ALICE: OK}
    assert smtp_server.connections_opened == 2


async def test_close_and_flush_says_quit_to_idle_connections(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    one, two = await start_smtp_server(), await start_smtp_server()
    relay = make_relay()
    await relay_message(relay, tmp_path, [one.hop])
    await relay_message(relay, tmp_path, [two.hop])
    assert relay.cache.idle_connections == 2

    with anyio.fail_after(WAIT_TIMEOUT):
        await relay.close_and_flush()

    for server in (one, two):
        assert server.verbs()[-1] == "QUIT"
        await wait_until(lambda s=server: s.connections_closed == 1, "the connection to close")
    assert relay.cache.open_connections == 0

    # A closed relay takes no more connections out.
    error = failure(await relay_message(relay, tmp_path, [one.hop]))
    assert "shutting down" in error
    assert one.connections_opened == 1


async def test_route_settings_are_part_of_the_cache_key(
    smtp_server: SmtpTestServer,
    tmp_path: Path,
) -> None:
    first = route()
    settings = {"now": first}
    relay = SmtpRelay(lambda _hop, _message: settings["now"], ConnectionCache())
    try:
        await relay_message(relay, tmp_path, [smtp_server.hop])
        await relay_message(relay, tmp_path, [smtp_server.hop])
        assert smtp_server.connections_opened == 1
        settings["now"] = replace(first, command_timeout=3.0)  # a reload
        await relay_message(relay, tmp_path, [smtp_server.hop])
        assert smtp_server.connections_opened == 2
    finally:
        await relay.close_and_flush()


# ------------------------------------------------------------ extensions
#
# The relay decides on SIZE, 8BITMIME and SMTPUTF8 from the hop's EHLO
# reply. Each such test runs on a connection in three states: "new" (the
# message is the first on a fresh plain-text connection), "reused" (a
# plain ASCII message went first on the same connection) and "starttls" (the
# first message after STARTTLS, opportunistic without verification).

WAYS = ["new", "reused", "starttls"]


async def server_for(
    way: str,
    start: StartServer,
    request: pytest.FixtureRequest,
    **options: Any,
) -> tuple[SmtpTestServer, RouteSettings]:
    if way == "starttls":
        cert: TlsCertificate = request.getfixturevalue("tls_certificate")
        server = await start(tls_context=cert.server_context(), **options)
        return server, route(tls="opportunistic", verify_certificates=False)
    return await start(**options), route()


async def warm_up(way: str, relay: SmtpRelay, server: SmtpTestServer, directory: Path) -> None:
    if way == "reused":
        outcome = await relay_message(
            relay, directory, [server.hop], [CAROL], b"Subject: a\r\n\r\n"
        )
        assert delivery(outcome).recipients == {CAROL: OK}
        server.commands.clear()
        server.messages.clear()


@pytest.mark.parametrize("way", WAYS)
async def test_message_over_the_size_limit_is_refused_without_sending(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    way: str,
) -> None:
    server, settings = await server_for(way, start_smtp_server, request, data_size_limit=100)
    relay = make_relay(settings)
    await warm_up(way, relay, server, tmp_path)
    assert len(CONTENT) > 100

    outcome = await relay_message(relay, tmp_path, [server.hop], [ALICE, BOB])

    results = delivery(outcome).recipients
    assert set(results) == {ALICE, BOB}
    for result in results.values():
        assert (result.code, result.enhanced_status) == (552, "5.3.4")
        assert f"{len(CONTENT)} bytes" in result.text
        assert "limit of 100" in result.text
    assert "MAIL" not in server.verbs()


@pytest.mark.parametrize("way", WAYS)
async def test_size_is_declared_on_mail_when_offered(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    way: str,
) -> None:
    server, settings = await server_for(way, start_smtp_server, request)
    relay = make_relay(settings)
    await warm_up(way, relay, server, tmp_path)

    assert delivery(await relay_message(relay, tmp_path, [server.hop])).recipients == {ALICE: OK}
    assert server.messages[0].mail_options == (f"SIZE={len(CONTENT)}",)


async def test_size_is_not_declared_when_not_offered(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    server = await start_smtp_server(data_size_limit=None)
    relay = make_relay()
    await warm_up("reused", relay, server, tmp_path)

    assert delivery(await relay_message(relay, tmp_path, [server.hop])).recipients == {ALICE: OK}
    assert server.messages[0].mail_options == ()


@pytest.mark.parametrize("way", ["new", "reused"])
async def test_8bit_message_to_a_hop_without_8bitmime_is_refused(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    way: str,
) -> None:
    # aiosmtpd leaves 8BITMIME out of EHLO when it decodes data.
    server, settings = await server_for(way, start_smtp_server, request, decode_data=True)
    relay = make_relay(settings)
    await warm_up(way, relay, server, tmp_path)

    outcome = await relay_message(relay, tmp_path, [server.hop], [ALICE, BOB], EIGHT_BIT)

    results = delivery(outcome).recipients
    assert set(results) == {ALICE, BOB}
    for result in results.values():
        assert (result.code, result.enhanced_status) == (554, "5.6.3")
        assert "8BITMIME" in result.text
    assert "MAIL" not in server.verbs()


@pytest.mark.parametrize("way", WAYS)
async def test_8bit_message_goes_as_body_8bitmime_when_offered(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    way: str,
) -> None:
    server, settings = await server_for(way, start_smtp_server, request)
    relay = make_relay(settings)
    await warm_up(way, relay, server, tmp_path)

    outcome = await relay_message(relay, tmp_path, [server.hop], [ALICE], EIGHT_BIT)

    assert delivery(outcome).recipients == {ALICE: OK}
    (received,) = server.messages
    assert "BODY=8BITMIME" in received.mail_options
    assert received.content == EIGHT_BIT


async def test_body_8bitmime_is_sent_when_the_submission_asked_for_it(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    server = await start_smtp_server()
    relay = make_relay()
    await warm_up("reused", relay, server, tmp_path)

    outcome = await relay_message(relay, tmp_path, [server.hop], mail_params=["BODY=8BITMIME"])

    assert delivery(outcome).recipients == {ALICE: OK}
    assert "BODY=8BITMIME" in server.messages[0].mail_options


@pytest.mark.parametrize("way", WAYS)
async def test_non_ascii_recipient_goes_with_smtputf8_when_offered(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    way: str,
) -> None:
    server, settings = await server_for(way, start_smtp_server, request, smtputf8=True)
    relay = make_relay(settings)
    await warm_up(way, relay, server, tmp_path)

    outcome = await relay_message(relay, tmp_path, [server.hop], [UTF8_RCPT])

    assert delivery(outcome).recipients == {UTF8_RCPT: OK}
    (received,) = server.messages
    assert "SMTPUTF8" in received.mail_options
    assert received.rcpt_tos == (UTF8_RCPT,)


@pytest.mark.parametrize("way", ["new", "reused"])
async def test_non_ascii_recipient_to_a_hop_without_smtputf8_fails_alone(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    way: str,
) -> None:
    # The message itself is ASCII (sender, no SMTPUTF8 asked for): only the
    # recipient that needs SMTPUTF8 fails; the others are delivered.
    server, settings = await server_for(way, start_smtp_server, request)
    relay = make_relay(settings)
    await warm_up(way, relay, server, tmp_path)

    outcome = await relay_message(relay, tmp_path, [server.hop], [ALICE, UTF8_RCPT])

    results = delivery(outcome).recipients
    assert results[ALICE] == OK
    refused = results[UTF8_RCPT]
    assert (refused.code, refused.enhanced_status) == (553, "5.6.7")
    assert "SMTPUTF8" in refused.text
    (received,) = server.messages
    assert received.rcpt_tos == (ALICE,)
    assert "SMTPUTF8" not in received.mail_options
    assert server.args("RCPT") == [ALICE]


@pytest.mark.parametrize(
    "needs",
    [
        pytest.param({"sender": "j\u00fcrgen@example.org"}, id="non-ascii-sender"),
        pytest.param({"mail_params": ["SMTPUTF8"]}, id="smtputf8-submission"),
    ],
)
async def test_message_needing_smtputf8_to_a_hop_without_it_is_refused_for_everyone(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    needs: dict[str, Any],
) -> None:
    outcome = await relay_message(
        make_relay(), tmp_path, [smtp_server.hop], [ALICE, UTF8_RCPT], **needs
    )

    results = delivery(outcome).recipients
    assert set(results) == {ALICE, UTF8_RCPT}
    for result in results.values():
        assert (result.code, result.enhanced_status) == (554, "5.6.7")
        assert "SMTPUTF8" in result.text
    assert "MAIL" not in smtp_server.verbs()


# ------------------------------------------------------------- parse_hop


@pytest.mark.parametrize(
    ("hop", "expected"),
    [
        ("h:25", ("h", 25)),
        ("mx.example.com:2525", ("mx.example.com", 2525)),
        ("host", ("host", 25)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
        ("[::1]:2525", ("::1", 2525)),
        ("[::1]", ("::1", 25)),
        ("[2001:db8::1]:1", ("2001:db8::1", 1)),
    ],
)
def test_parse_hop(hop: str, expected: tuple[str, int]) -> None:
    assert parse_hop(hop) == expected


@pytest.mark.parametrize(
    ("hop", "complaint"),
    [
        ("h:0", "port out of range"),
        ("h:65536", "port out of range"),
        ("h:-1", "port is not a number"),  # a sign: int() took it
        ("h: 25", "port is not a number"),
        ("h:2_5", "port is not a number"),
        (f"h:{ARABIC_TEN}", "port is not a number"),
        (f"h:{SUPERSCRIPT_TWO}", "port is not a number"),
        ("h:smtp", "port is not a number"),
        ("[::1]:x", "port is not a number"),
        (":25", "no host"),
        ("[]:25", "no host"),
    ],
)
def test_parse_hop_refuses_bad_hops(hop: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as info:
        parse_hop(hop)
    assert repr(hop) in str(info.value)


@pytest.mark.parametrize("hop", ["h:", "[::1]:", "[::1]junk", "[::1"])
def test_parse_hop_refuses_malformed_hops(hop: str) -> None:
    # Neither "host:port" nor "[v6addr]:port" nor a bare host.
    with pytest.raises(ValueError, match=r"next hop"):
        parse_hop(hop)


@pytest.mark.parametrize("size", NOT_ASCII_DIGITS)
async def test_a_size_that_is_not_ascii_digits_is_no_limit(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path, size: str
) -> None:
    """A hop whose EHLO offers ``SIZE`` with a value that is not ASCII
    digits (superscript two and Arabic-Indic ten pass :meth:`str.isdigit`;
    :func:`int` refuses the one and reads the other as 10) offers SIZE
    without a limit: the message is sent, with its size declared, not failed
    or refused for a limit the hop never wrote."""
    server = await start_smtp_server(smtputf8=True)
    server.behaviour.ehlo_lines = [f"SIZE {size}"]
    msg, body = message_to(tmp_path, [server.hop], [ALICE])

    with anyio.fail_after(WAIT_TIMEOUT):
        outcome = await make_relay().relay(msg, body, [ALICE])

    assert delivery(outcome).recipients == {ALICE: OK}
    (received,) = server.messages
    assert received.content == CONTENT
    assert f"SIZE={len(CONTENT)}" in received.mail_options
