"""What a webhook posts: the kinds of events, the JSON body (schema
``version`` 1, documented in ``docs/configuration.md``), its id and its
HMAC-SHA256 signature, and the key they are signed with. Pure functions of
a spool event, apart from :func:`load_secret` (which reads its file)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgspec

from spoold.credentials import read_private_file
from spoold.errors import SpooldError
from spoold.events import BOUNCED_DETAIL, EventKind, RecipientOutcomeState, SpoolEvent

__all__ = [
    "WebhookKind",
    "DEFAULT_WEBHOOK_KINDS",
    "SCHEMA_VERSION",
    "TIMESTAMP_HEADER",
    "SIGNATURE_HEADER",
    "EVENT_ID_HEADER",
    "webhook_kind",
    "event_recipients",
    "event_body",
    "event_id_of",
    "event_time",
    "signature",
    "signature_headers",
    "load_secret",
]

SCHEMA_VERSION = 1
TIMESTAMP_HEADER = "Spoold-Timestamp"
SIGNATURE_HEADER = "Spoold-Signature"
EVENT_ID_HEADER = "Spoold-Event-Id"
_MAX_EVENT_ID = 256  # characters; an event_id is sent as a header


class WebhookKind(StrEnum):
    """The kinds a webhook's ``events`` filter names."""

    DELIVERED = "delivered"  # every recipient accepted
    BOUNCED = "bounced"  # failed; a notification went to the sender
    IN_DOUBT = "in_doubt"  # bounced after no reply to the end of the message
    REMOVED = "removed"  # removed by an operator or the presend hook
    DEFERRED = "deferred"  # an attempt failed for now; tried again at ``retry_at``
    FROZEN = "frozen"
    QUARANTINED = "quarantined"


DEFAULT_WEBHOOK_KINDS = (
    WebhookKind.DELIVERED,
    WebhookKind.BOUNCED,
    WebhookKind.IN_DOUBT,
    WebhookKind.REMOVED,
)
"""The final outcomes: the message has left the queue."""


def webhook_kind(event: SpoolEvent) -> WebhookKind | None:
    """The webhook kind of a stream event (in its stream form: a bounce
    is ``removed`` with detail ``bounced`` or an in-doubt detail); None for
    the steps a webhook is not told of (spooled, presend, ping, ...)."""
    match event.kind:
        case EventKind.DELIVERED:
            return WebhookKind.DELIVERED
        case EventKind.REMOVED:
            detail = event.detail or ""
            if detail == BOUNCED_DETAIL:
                return WebhookKind.BOUNCED
            if detail.startswith("in doubt"):
                return WebhookKind.IN_DOUBT
            return WebhookKind.REMOVED
        case EventKind.DELAYED | EventKind.DELAYED_RATE_LIMITED:
            return WebhookKind.DEFERRED
        case EventKind.FROZEN:
            return WebhookKind.FROZEN
        case EventKind.QUARANTINED:
            return WebhookKind.QUARANTINED
    return None


def event_time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


_CONCERNED: dict[WebhookKind, frozenset[RecipientOutcomeState]] = {
    WebhookKind.DELIVERED: frozenset({RecipientOutcomeState.DELIVERED}),
    WebhookKind.BOUNCED: frozenset({RecipientOutcomeState.FAILED}),
    WebhookKind.IN_DOUBT: frozenset({RecipientOutcomeState.FAILED}),
    WebhookKind.DEFERRED: frozenset({RecipientOutcomeState.DEFERRED}),
    WebhookKind.FROZEN: frozenset({RecipientOutcomeState.FAILED, RecipientOutcomeState.DEFERRED}),
}
"""The recipients an attempt's event of each kind is about (its ``recipients``)."""


def event_recipients(event: SpoolEvent, kind: WebhookKind) -> list[str]:
    """The ``recipients`` of the body: those whose outcome the event is
    (a bounce: the recipients that failed, not those delivered) for an
    attempt's event; for any other (an operator's removal, say), every
    recipient of the message."""
    states = _CONCERNED.get(kind)
    if event.results and states is not None:
        return [r.recipient for r in event.results if r.state in states]
    info = event.envelope_info
    return list(info.recipients) if info is not None else []


def event_body(
    event: SpoolEvent, kind: WebhookKind, webhook: str, event_id: str, routes: Sequence[str]
) -> bytes:
    """The JSON posted for ``event`` (schema version 1)."""
    info = event.envelope_info
    body: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "event_id": event_id,
        "webhook": webhook,
        "event": str(kind),
        "time": event_time(event.time),
        "message_id": event.id,
        "sender": info.sender if info is not None else None,
        "recipients": event_recipients(event, kind),
        "results": [
            {"recipient": r.recipient, "outcome": str(r.state), "code": r.code, "reply": r.reply}
            for r in event.results
        ],
        "routes": list(routes),
        "detail": event.detail,
        "retry_at": event_time(event.at),
    }
    return msgspec.json.encode(body)


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 of ``timestamp + "." + body`` under ``secret``, hex."""
    return hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def signature_headers(secret: bytes, body: bytes, event_id: str, now: float) -> dict[str, str]:
    """The headers of one POST: the timestamp (Unix seconds of this
    attempt), ``sha256=`` and the signature, and the event's id."""
    timestamp = str(int(now))
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: "sha256=" + signature(secret, timestamp, body),
        EVENT_ID_HEADER: event_id,
    }


def event_id_of(body: bytes) -> str | None:
    """The ``event_id`` of an outbox file's body; None if it is not one
    of ours (a file damaged or put there by hand): ours are printable
    ASCII (they go in a header) and short."""
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    event_id = decoded.get("event_id") if isinstance(decoded, dict) else None
    if not isinstance(event_id, str) or len(event_id) > _MAX_EVENT_ID:
        return None
    return event_id if event_id.isascii() and event_id.isprintable() else None


def load_secret(path: Path) -> bytes:
    """A webhook's key: the text of a file only its owner may read,
    without surrounding white space; at least 16 bytes."""
    secret = read_private_file(path, "webhook secret file").strip().encode("utf-8")
    if len(secret) < 16:
        raise SpooldError(f"webhook secret file {path}: expected at least 16 characters")
    return secret
