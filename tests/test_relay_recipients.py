"""One bad recipient never blocks the others.

The relay checks the sender and every recipient with
:func:`spoold.address.validate_address` before MAIL. A record that somehow
holds an address the validator refuses (written by an older version, edited
by hand) gets a permanent result for that recipient alone; the others of the
message are sent. An invalid sender fails every recipient without a
connection. Run against aiosmtpd (:mod:`tests.smtp_server`), and once
through a real :class:`~spoold.spool.Spool` on a fake clock to show what
the operator ends up with: the good recipient delivered, the message frozen
with the bad one in ``failed_recipients``.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from spoold.body import Body
from spoold.connection_cache import ConnectionCache
from spoold.message import SEND_NOW, Message, RoutedEnvelope, message_for_envelope
from spoold.ondisk import NewMessage, OnDiskSpool
from spoold.smtp_relay import SmtpRelay
from spoold.testing import FakeClock
from tests.relay_helpers import (
    ALICE,
    BOB,
    CONTENT,
    OK,
    SENDER,
    MakeRelay,
    delivery,
    relay_message,
    route,
)
from tests.smtp_server import SmtpTestServer, StartServer
from tests.spool_helpers import START, open_spool, places, read_record
from tests.support import wait_until

BAD_RECIPIENTS = [
    pytest.param("a\x00b@example.com", "control character", id="nul"),
    pytest.param("", "null address", id="empty"),
    pytest.param("no-at-sign", "not an address", id="no-at"),
    pytest.param("x@exa mple.com", "not a valid domain label", id="space-in-domain"),
    pytest.param(
        "a@example.com>\r\nRCPT TO:<evil@example.net", "control character", id="crlf-injection"
    ),
]


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelining"])
@pytest.mark.parametrize(("bad", "why"), BAD_RECIPIENTS)
async def test_an_invalid_recipient_fails_alone_and_the_others_are_delivered(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    bad: str,
    why: str,
    pipelining: bool,
) -> None:
    server = await start_smtp_server(pipelining=pipelining)

    outcome = await relay_message(make_relay(), tmp_path, [server.hop], [ALICE, bad, BOB])

    results = delivery(outcome).recipients
    assert results[ALICE] == OK
    assert results[BOB] == OK
    refused = results[bad]
    assert (refused.code, refused.enhanced_status) == (553, "5.1.3")
    assert refused.text.startswith("recipient cannot be relayed: ")
    assert why in refused.text
    assert refused.permanent
    assert server.args("RCPT") == [ALICE, BOB]
    (received,) = server.messages
    assert received.rcpt_tos == (ALICE, BOB)
    assert received.content == CONTENT


async def test_only_invalid_recipients_contact_no_hop(
    smtp_server: SmtpTestServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    outcome = await relay_message(
        make_relay(), tmp_path, [smtp_server.hop], ["", "a\x00b@example.com"]
    )

    results = delivery(outcome).recipients
    assert set(results) == {"", "a\x00b@example.com"}
    assert {(r.code, r.enhanced_status) for r in results.values()} == {(553, "5.1.3")}
    assert smtp_server.connections_opened == 0


@pytest.mark.parametrize(
    ("sender", "why"),
    [
        pytest.param("s\x00@example.org", "control character", id="nul"),
        pytest.param("two words@example.org", "not allowed in a local part", id="space"),
        pytest.param("sender@", "no domain", id="no-domain"),
    ],
)
async def test_an_invalid_sender_fails_every_recipient_without_contacting_a_hop(
    smtp_server: SmtpTestServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    sender: str,
    why: str,
) -> None:
    outcome = await relay_message(
        make_relay(), tmp_path, [smtp_server.hop], [ALICE, BOB], sender=sender
    )

    results = delivery(outcome).recipients
    assert set(results) == {ALICE, BOB}
    for result in results.values():
        assert (result.code, result.enhanced_status) == (553, "5.1.7")
        assert result.text.startswith("sender cannot be relayed: ")
        assert why in result.text
    assert smtp_server.connections_opened == 0


async def test_a_recipient_listed_twice_gets_one_rcpt(
    smtp_server: SmtpTestServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    outcome = await relay_message(make_relay(), tmp_path, [smtp_server.hop], [ALICE, ALICE, BOB])

    assert delivery(outcome).recipients == {ALICE: OK, BOB: OK}
    assert smtp_server.args("RCPT") == [ALICE, BOB]


# ------------------------------------------------------------ the spool


async def spooled_record(spool_dir: Path, envelope: RoutedEnvelope) -> Message:
    """Write a record straight through the on-disk layer, below the checks
    of ``Spool.add``: what an older version or a hand edit may leave."""
    od, _ = await OnDiskSpool.open(spool_dir)
    async with od:
        (msg,) = await od.add(
            [
                NewMessage(
                    Body.from_content(CONTENT),
                    SEND_NOW,
                    lambda mid, related: message_for_envelope(
                        envelope, id=mid, spool_date=START, parent_id=mid, related_ids=related
                    ),
                )
            ]
        )
    return msg


@pytest.mark.parametrize("bad", ["a\x00b@example.com", ""], ids=["nul", "empty"])
async def test_through_the_spool_the_good_recipient_is_delivered_and_the_bad_one_frozen(
    smtp_server: SmtpTestServer, tmp_path: Path, bad: str
) -> None:
    spool_dir = tmp_path / "spool"
    msg = await spooled_record(spool_dir, RoutedEnvelope(SENDER, [ALICE, bad], [smtp_server.hop]))
    relay = SmtpRelay(route(), ConnectionCache())
    try:
        async with open_spool(spool_dir, relay, FakeClock(START)):
            await wait_until(
                lambda: places(spool_dir, msg.id) == ["frozen"],
                lambda: f"the message to be frozen; it is in {places(spool_dir, msg.id)}",
            )
    finally:
        with anyio.move_on_after(5):
            await relay.close_and_flush()

    record = read_record(spool_dir, "frozen", msg.id)
    assert record.remaining_recipients == []
    assert record.failed_recipients == [bad]
    (attempt,) = record.relay_attempts
    assert "553 5.1.3 recipient cannot be relayed: " in attempt.error
    assert ALICE not in attempt.error
    (received,) = smtp_server.messages
    assert received.rcpt_tos == (ALICE,)
    assert received.content == CONTENT
