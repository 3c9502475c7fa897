"""Delivery status notifications (RFC 3464): the report sent to a sender.

:func:`build_dsn` turns a :class:`~spoold.outcome.Notice` (which recipients
failed or are delayed, and why) about one spooled message into the
notification to send back to that message's envelope sender, as an
:class:`email.message.EmailMessage`; :func:`dsn_body` gives its wire form.
The spool adds it as a new message with the null sender ``<>`` (a
notification never causes another one).

The notification is a ``multipart/report; report-type=delivery-status``
with three parts:

1. ``text/plain``: what happened, for a person;
2. ``message/delivery-status``: one block of per-message fields
   (``Reporting-MTA``, ``Original-Envelope-Id`` when the submission gave
   one, ``Arrival-Date``), then one block per recipient
   (``Final-Recipient``, ``Action``, ``Status``, ``Remote-MTA`` and
   ``Diagnostic-Code`` when a next hop answered, ``Last-Attempt-Date``, and
   ``Will-Retry-Until`` for a delay when the message has a lifetime);
3. ``text/rfc822-headers``: the original message's header section.

This module is pure: no I/O, no clock (times are given). Header text that is
not ASCII (an SMTPUTF8 message) is carried in a UTF-8 part with a transfer
encoding, so the notification itself is 7-bit; so is text with a line longer
than RFC 5322 allows (998 characters), so that every line of the report fits.

What others wrote (a next hop's reply, the original's headers) never adds a
field or a part: in a field value every line break becomes a space and every
other control character a ``?`` (a multi-line reply from a hostile hop cannot
inject ``Bcc:`` into the report, nor make it unbuildable); the original's
header section is cut, at a line end, to :data:`MAX_ORIGINAL_HEADERS` bytes.
"""

from __future__ import annotations

import email.policy
import re
from collections.abc import Sequence
from datetime import datetime
from email.message import EmailMessage
from email.message import Message as EmailPart
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, make_msgid

from spoold.body import Body
from spoold.message import Message
from spoold.numerals import ascii_decimal
from spoold.outcome import Notice, NoticeKind, RecipientNotice

__all__ = ["build_dsn", "dsn_body", "header_section", "MAILER_DAEMON", "MAX_ORIGINAL_HEADERS"]

MAILER_DAEMON = "MAILER-DAEMON"
MAX_ORIGINAL_HEADERS = 64 * 1024
"""At most this many bytes of the original's header section are sent back."""

_MAX_LINE = 998  # RFC 5322 2.1.1, without the CRLF
_LINE_BREAKS = re.compile(r"[ \t]*[\r\n]+[ \t]*")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

_SUBJECT = {
    NoticeKind.FAILED: "Undelivered mail returned to sender",
    NoticeKind.DELAYED: "Delayed mail (still being retried)",
}


def header_section(content: bytes) -> bytes:
    """The header section of a message (``content`` with CRLF line
    endings): everything before the first empty line, with its last CRLF."""
    if content.startswith(b"\r\n"):
        return b""
    end = content.find(b"\r\n\r\n")
    return content if end < 0 else content[: end + 2]


def build_dsn(
    original: Message,
    notice: Notice,
    *,
    original_headers: bytes,
    reporting_mta: str,
    now: datetime,
    retry_until: datetime | None = None,
) -> EmailMessage:
    """The notification about ``original`` saying ``notice``, addressed to
    its envelope sender (which must not be null). ``original_headers`` is
    the header section of the original message (:func:`header_section`);
    ``reporting_mta`` the host name this spool reports as; ``now`` the time
    of the report; ``retry_until`` when a delayed message gives up."""
    sender = original.envelope_info.sender
    if not sender:
        raise ValueError(f"{original.id}: no notification is sent to the null sender")
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <{MAILER_DAEMON}@{reporting_mta}>"
    report["To"] = sender
    report["Subject"] = _SUBJECT[notice.kind]
    report["Date"] = format_datetime(now)
    report["Message-ID"] = make_msgid(idstring=original.id, domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: no replies to this
    report.attach(_text_part(_human_text(original, notice, reporting_mta, retry_until)))
    report.attach(_status_part(original, notice, reporting_mta, now, retry_until))
    report.attach(_headers_part(original_headers))
    parsed = email.message_from_bytes(report.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def dsn_body(dsn: EmailMessage) -> Body:
    """The wire form of a notification made by :func:`build_dsn`."""
    return Body.from_email(dsn)


def _text_part(text: str) -> MIMEText:
    return MIMEText(text, "plain", _charset_for(text))


def _human_text(
    original: Message, notice: Notice, reporting_mta: str, retry_until: datetime | None
) -> str:
    lines = [f"This is the mail system at {reporting_mta}.", ""]
    if notice.kind is NoticeKind.FAILED:
        lines.append(
            "Your message could not be delivered to the recipients below, and "
            "the mail system has stopped trying."
        )
    else:
        lines.append(
            "Your message has not been delivered yet to the recipients below. "
            "The mail system is still trying; you need not send it again."
        )
        if retry_until is not None:
            lines.append(f"It will keep trying until {format_datetime(retry_until)}.")
    lines += ["", f"Queue id: {original.id}", ""]
    for rcpt in notice.recipients:
        lines.append(f"<{rcpt.recipient}>: {rcpt.reason}")
    lines += ["", "The headers of your message are attached."]
    return "\r\n".join(lines) + "\r\n"


def _fields(pairs: Sequence[tuple[str, str]]) -> EmailPart:
    block = EmailPart()
    for name, value in pairs:
        block[name] = _one_line(value)
    return block


def _one_line(value: str) -> str:
    """``value`` fit for one header field: line breaks (and the blanks
    around them) become one space, other control characters ``?``."""
    return _CONTROL.sub("?", _LINE_BREAKS.sub(" ", value))


def _charset_for(text: str) -> str:
    """``us-ascii`` (sent as it is) when every line of ``text`` can go
    as it is, else ``utf-8`` (sent with a transfer encoding)."""
    fits = text.isascii() and all(len(line) <= _MAX_LINE for line in text.splitlines())
    return "us-ascii" if fits else "utf-8"


def _status_part(
    original: Message,
    notice: Notice,
    reporting_mta: str,
    now: datetime,
    retry_until: datetime | None,
) -> MIMEBase:
    part = MIMEBase("message", "delivery-status")
    per_message = [("Reporting-MTA", f"dns; {reporting_mta}")]
    if original.envelope_info.envelope_id:
        per_message.append(("Original-Envelope-Id", original.envelope_info.envelope_id))
    per_message.append(("Arrival-Date", format_datetime(original.spool_date)))
    blocks: list[EmailPart | str] = [_fields(per_message)]
    for rcpt in notice.recipients:
        blocks.append(_fields(_recipient_fields(rcpt, notice.kind, now, retry_until)))
    part.set_payload(blocks)
    return part


def _recipient_fields(
    rcpt: RecipientNotice, kind: NoticeKind, now: datetime, retry_until: datetime | None
) -> list[tuple[str, str]]:
    fields = [
        ("Final-Recipient", f"rfc822; {rcpt.recipient}"),
        ("Action", kind.value),
        ("Status", rcpt.status),
    ]
    if rcpt.remote_mta:
        fields.append(("Remote-MTA", f"dns; {_host_of(rcpt.remote_mta)}"))
    if rcpt.reply is not None:
        fields.append(("Diagnostic-Code", f"smtp; {rcpt.reply}"))
    fields.append(("Last-Attempt-Date", format_datetime(now)))
    if kind is NoticeKind.DELAYED and retry_until is not None:
        fields.append(("Will-Retry-Until", format_datetime(retry_until)))
    return fields


def _host_of(hop: str) -> str:
    """``host`` of a next hop written ``host:port`` or ``[v6]:port``."""
    host, sep, port = hop.rpartition(":")
    if not sep or ascii_decimal(port) is None:
        return hop
    return host.strip("[]")


def _headers_part(headers: bytes) -> MIMEText:
    if len(headers) > MAX_ORIGINAL_HEADERS:
        cut = headers.rfind(b"\r\n", 0, MAX_ORIGINAL_HEADERS - 1)
        headers = headers[: cut + 2] if cut >= 0 else headers[:MAX_ORIGINAL_HEADERS]
    text = headers.decode("utf-8", errors="replace")
    return MIMEText(text, "rfc822-headers", _charset_for(text))
