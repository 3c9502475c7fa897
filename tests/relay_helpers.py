"""Shared by the relay tests: messages on disk as the spool hands them to a
relay, route settings whose timeouts no answer on loopback comes near,
relays (on a :class:`ManualClock`) whose connections are closed at teardown,
and relay attempts bounded by a safety deadline."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from spoold.body import Body
from spoold.connection_cache import ConnectionCache, RouteSettings
from spoold.ids import new_id
from spoold.message import Message, RoutedEnvelope, message_for_envelope
from spoold.relay import AttemptFailed, BodyHandle, Delivery, RecipientResult, RelayOutcome
from spoold.smtp_relay import SmtpRelay
from spoold.times import utcnow
from tests.support import WAIT_TIMEOUT

__all__ = [
    "SENDER",
    "ALICE",
    "BOB",
    "CAROL",
    "CONTENT",
    "EIGHT_BIT",
    "UTF8_RCPT",
    "USER",
    "PASSWORD",
    "OK",
    "MakeRelay",
    "ManualClock",
    "route",
    "make_relay",
    "message_to",
    "relay_message",
    "delivery",
    "failure",
]

SENDER = "sender@example.org"
ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.com"
# Lines starting with "." are dot-stuffed on disk and must arrive unstuffed.
CONTENT = (
    b"From: sender@example.org\r\n"
    b"To: alice@example.com\r\n"
    b"Subject: relay test\r\n"
    b"\r\n"
    b"hello\r\n"
    b".hidden\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"last line\r\n"
)
EIGHT_BIT = (
    b"Subject: caf\xc3\xa9\r\nContent-Type: text/plain; charset=utf-8\r\n\r\ncaf\xc3\xa9\r\n"
)
UTF8_RCPT = "j\u00fcrgen@b\u00fccher.example"
USER, PASSWORD = "relay-user", "s3cret:with-colon"

MakeRelay = Callable[..., SmtpRelay]


def route(**changes: Any) -> RouteSettings:
    """Route settings for tests: no TLS, and timeouts long enough not to
    trip on a busy machine (a test of a timeout sets its own)."""
    options: dict[str, Any] = {
        "tls": "none",
        "connect_timeout": 2.0,
        "command_timeout": 2.0,
        "message_timeout": 10.0,
    }
    options.update(changes)
    return RouteSettings(**options)


class ManualClock:
    """A monotonic clock for the connection cache that moves only when a test
    moves it: how long a connection has been idle is then what the test says,
    not how fast the machine is."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def make_relay() -> AsyncIterator[MakeRelay]:
    """``make_relay(route(...), max_per_hop=...)``: a relay with its own
    connection cache, flushed at teardown (before the servers stop). The
    cache's clock is a :class:`ManualClock` unless ``monotonic`` is given:
    no connection is ever checked with NOOP or dropped for being idle unless
    a test moves the clock (the cache's idle timer itself runs on the event
    loop, after ``idle_timeout`` seconds)."""
    relays: list[SmtpRelay] = []

    def make(settings: RouteSettings | None = None, **cache_options: Any) -> SmtpRelay:
        cache_options.setdefault("monotonic", ManualClock())
        relay = SmtpRelay(settings or route(), ConnectionCache(**cache_options))
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        with anyio.move_on_after(5):
            await relay.close_and_flush()


def message_to(
    directory: Path,
    hops: Sequence[str],
    recipients: Sequence[str] = (ALICE,),
    content: bytes = CONTENT,
    *,
    sender: str = SENDER,
    mail_params: Sequence[str] = (),
) -> tuple[Message, BodyHandle]:
    """A message as the spool hands it to a relay: a record and the body
    file in its on-disk (dot-stuffed) form."""
    mid = new_id()
    path = directory / mid
    path.write_bytes(Body.from_content(content).wire)
    envelope = RoutedEnvelope(sender, list(recipients), list(hops), mail_params=list(mail_params))
    msg = message_for_envelope(envelope, id=mid, spool_date=utcnow(), parent_id=mid)
    return msg, BodyHandle(path)


async def relay_message(
    relay: SmtpRelay,
    directory: Path,
    hops: Sequence[str],
    recipients: Sequence[str] = (ALICE,),
    content: bytes = CONTENT,
    *,
    timeout: float = WAIT_TIMEOUT,
    **options: Any,
) -> RelayOutcome:
    """One relay attempt, bounded in time (a safety net)."""
    msg, body = message_to(directory, hops, recipients, content, **options)
    with anyio.fail_after(timeout):
        return await relay.relay(msg, body, list(recipients))


def delivery(outcome: RelayOutcome) -> Delivery:
    assert isinstance(outcome, Delivery), outcome
    return outcome


def failure(outcome: RelayOutcome) -> str:
    assert isinstance(outcome, AttemptFailed), outcome
    return outcome.error


OK = RecipientResult(250, "OK: queued", "2.0.0")
