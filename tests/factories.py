"""Builders of test messages."""

from __future__ import annotations

from datetime import datetime

from spoold.body import Body
from spoold.message import (
    SEND_NOW,
    EnvelopeInfo,
    Message,
    RetryInterval,
    Status,
    utcnow,
)
from spoold.ondisk import NewMessage


def make_message(
    message_id: str,
    *,
    status: Status = SEND_NOW,
    recipients: list[str] | None = None,
    next_hops: list[str] | None = None,
    retry_intervals: list[RetryInterval] | None = None,
    spool_date: datetime | None = None,
) -> Message:
    rcpts = recipients or ["rcpt@example.com"]
    return Message(
        id=message_id,
        parent_id="parent-" + message_id,
        spool_date=spool_date or utcnow(),
        next_hop_choices=next_hops or ["127.0.0.1:25"],
        retry_intervals=retry_intervals or [],
        remaining_recipients=list(rcpts),
        status=status,
        envelope_info=EnvelopeInfo(sender="sender@example.org", recipients=list(rcpts)),
    )


def new_message(
    body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    *,
    status: Status = SEND_NOW,
    recipients: list[str] | None = None,
) -> NewMessage:
    def build(mid: str, related: list[str]) -> Message:
        return make_message(mid, status=status, recipients=recipients)

    return NewMessage(Body.from_content(body), status, build)
