"""Delivery status notifications (RFC 3464), parsed back with Python's own
``email`` package and checked field by field."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import msgspec
import pytest

from spoold.body import Body
from spoold.dsn import build_dsn, dsn_body, header_section
from spoold.message import Message
from spoold.outcome import Notice, NoticeKind, RecipientNotice
from spoold.relay import RecipientResult
from tests.factories import make_message

SPOOLED = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
NOW = SPOOLED + timedelta(days=5)
NO = RecipientResult(550, "no such user", "5.1.1")
LATER = RecipientResult(451, "greylisted, try later", "4.7.1")
A, B = "a@example.com", "b@example.net"
ORIGINAL = (
    b"From: App <app@example.org>\r\n"
    b"To: a@example.com, b@example.net\r\n"
    b"Subject: the monthly report\r\n"
    b"Message-ID: <report-1@example.org>\r\n"
    b"\r\n"
    b"the body is not sent back\r\n"
)


def original(envelope_id: str = "env-7") -> Message:
    msg = make_message("8DsiUFeJ098b3CijH", recipients=[A, B], spool_date=SPOOLED)
    msg.envelope_info = msgspec.structs.replace(
        msg.envelope_info, sender="app@example.org", envelope_id=envelope_id
    )
    return msg


def parse(dsn: EmailMessage) -> EmailMessage:
    """Through the wire form and back, as a receiving MUA would read it."""
    wire = dsn_body(dsn)
    parsed = email.message_from_bytes(wire.content(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def failed_notice() -> Notice:
    return Notice(
        NoticeKind.FAILED,
        (
            RecipientNotice(A, "5.1.1", "550 5.1.1 no such user", NO, "mx.example.com:25"),
            RecipientNotice(B, "4.4.7", "expired: not delivered within the queue lifetime (5d)"),
        ),
    )


def test_a_bounce_parsed_back_field_by_field() -> None:
    dsn = parse(
        build_dsn(
            original(),
            failed_notice(),
            original_headers=header_section(ORIGINAL),
            reporting_mta="mta.example.org",
            now=NOW,
        )
    )

    # the envelope of the report's own headers
    assert dsn["To"] == "app@example.org"
    assert dsn["From"] == "Mail Delivery System <MAILER-DAEMON@mta.example.org>"
    assert dsn["Subject"] == "Undelivered mail returned to sender"
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn["Date"].datetime == NOW
    assert dsn["Message-ID"].endswith("@mta.example.org>")
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"

    human, status, headers = dsn.iter_parts()

    assert human.get_content_type() == "text/plain"
    text = human.get_content()
    assert "Queue id: 8DsiUFeJ098b3CijH" in text
    assert f"<{A}>: 550 5.1.1 no such user" in text
    assert f"<{B}>: expired: not delivered within the queue lifetime (5d)" in text

    assert status.get_content_type() == "message/delivery-status"
    per_message, first, second = status.get_payload()
    assert dict(per_message) == {
        "Reporting-MTA": "dns; mta.example.org",
        "Original-Envelope-Id": "env-7",
        "Arrival-Date": "Thu, 02 Jan 2031 03:04:05 +0000",
    }
    assert dict(first) == {
        "Final-Recipient": f"rfc822; {A}",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.com",
        "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
        "Last-Attempt-Date": "Tue, 07 Jan 2031 03:04:05 +0000",
    }
    assert dict(second) == {
        "Final-Recipient": f"rfc822; {B}",
        "Action": "failed",
        "Status": "4.4.7",
        "Last-Attempt-Date": "Tue, 07 Jan 2031 03:04:05 +0000",
    }

    assert headers.get_content_type() == "text/rfc822-headers"
    returned = headers.get_content()
    assert returned.replace("\r\n", "\n") == (
        ORIGINAL.split(b"\r\n\r\n")[0].decode().replace("\r\n", "\n") + "\n"
    )
    assert "the body is not sent back" not in dsn.as_string()


def test_a_delay_warning_says_delayed_and_until_when() -> None:
    notice = Notice(
        NoticeKind.DELAYED,
        (RecipientNotice(A, "4.7.1", str(LATER), LATER, "[2001:db8::1]:25"),),
    )
    dsn = parse(
        build_dsn(
            original(envelope_id=""),
            notice,
            original_headers=header_section(ORIGINAL),
            reporting_mta="mta.example.org",
            now=NOW,
            retry_until=SPOOLED + timedelta(days=7),
        )
    )
    assert dsn["Subject"] == "Delayed mail (still being retried)"
    human, status, _headers = dsn.iter_parts()
    assert "still trying" in human.get_content()
    per_message, rcpt = status.get_payload()
    assert "Original-Envelope-Id" not in per_message
    assert dict(rcpt) == {
        "Final-Recipient": f"rfc822; {A}",
        "Action": "delayed",
        "Status": "4.7.1",
        "Remote-MTA": "dns; 2001:db8::1",
        "Diagnostic-Code": "smtp; 451 4.7.1 greylisted, try later",
        "Last-Attempt-Date": "Tue, 07 Jan 2031 03:04:05 +0000",
        "Will-Retry-Until": "Thu, 09 Jan 2031 03:04:05 +0000",
    }


def test_non_ascii_headers_come_back_whole_in_a_7bit_report() -> None:
    headers = "Subject: Grüße aus Köln\r\nFrom: jürgen@bücher.example\r\n\r\n".encode()
    dsn = build_dsn(
        original(),
        failed_notice(),
        original_headers=header_section(headers),
        reporting_mta="mta.example.org",
        now=NOW,
    )
    wire = dsn_body(dsn).wire
    assert wire.isascii()  # the report itself needs no 8BITMIME
    returned = parse(dsn).get_payload()[2].get_content()
    assert "Subject: Grüße aus Köln" in returned
    assert "From: jürgen@bücher.example" in returned


def test_the_wire_form_is_crlf_and_reads_back_as_the_same_report() -> None:
    dsn = build_dsn(
        original(),
        failed_notice(),
        original_headers=header_section(ORIGINAL),
        reporting_mta="mta.example.org",
        now=NOW,
    )
    wire = dsn_body(dsn).wire
    assert b"\n" not in wire.replace(b"\r\n", b"")
    assert Body.from_wire(wire) == dsn_body(dsn)


def test_no_report_to_the_null_sender() -> None:
    msg = original()
    msg.envelope_info = msgspec.structs.replace(msg.envelope_info, sender="")
    with pytest.raises(ValueError, match="null sender"):
        build_dsn(
            msg,
            failed_notice(),
            original_headers=b"",
            reporting_mta="mta.example.org",
            now=NOW,
        )


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\r\n", b"A: 1\r\n"),  # no body at all
        (b"\r\nonly a body\r\n", b""),
    ],
)
def test_header_section(content: bytes, headers: bytes) -> None:
    assert header_section(content) == headers
