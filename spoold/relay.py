"""What the spool asks of a relay, and an in-memory relay for tests.

A relay attempt is given a snapshot of the message, a handle on its body and
the recipients to deliver to. It returns a value, never raises for an SMTP
outcome:

* :class:`Delivery` — the attempt reached a next hop; one
  :class:`RecipientResult` per recipient (a refusal at MAIL FROM or DATA is
  given to every recipient);
* :class:`AttemptFailed` — no recipient got an answer (no hop reachable,
  timeout, give-up); the spool treats it as try-later.

An exception escaping a relay is a bug; the spool logs it and treats it as
:class:`AttemptFailed`, so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio

from spoold.body import Body
from spoold.message import Message

__all__ = [
    "RecipientResult",
    "Delivery",
    "AttemptFailed",
    "RelayOutcome",
    "BodyHandle",
    "Relay",
    "InMemoryRelay",
]


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The next hop's answer for one recipient."""

    code: int
    text: str = ""
    enhanced_status: str | None = None

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced_status:
            parts.append(self.enhanced_status)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Delivery:
    recipients: Mapping[str, RecipientResult]
    hop: str = ""


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    error: str


RelayOutcome = Delivery | AttemptFailed


class BodyHandle:
    """Where a message's body is on disk; reading it runs in a worker thread."""

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    async def read(self) -> Body:
        return Body(await anyio.Path(self.path).read_bytes())

    def __repr__(self) -> str:
        return f"BodyHandle({str(self.path)!r})"


class Relay(Protocol):
    async def relay(
        self, message: Message, body: BodyHandle, recipients: Sequence[str]
    ) -> RelayOutcome: ...


Responder = Callable[[Message, str], RecipientResult | AttemptFailed]


@dataclass
class InMemoryRelay:
    """A relay for tests: answers each recipient by ``respond`` (default 250)
    and keeps what it delivered. While ``gate`` is not set, attempts wait on
    it (to hold messages in ``sending``)."""

    respond: Responder = field(default=lambda _m, _r: RecipientResult(250, "ok"))
    gate: anyio.Event | None = None
    delivered: list[tuple[str, str, bytes]] = field(default_factory=list)
    attempts: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    started: anyio.Event = field(default_factory=anyio.Event)

    async def relay(
        self, message: Message, body: BodyHandle, recipients: Sequence[str]
    ) -> RelayOutcome:
        self.attempts.append((message.id, tuple(recipients)))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        wire = (await body.read()).wire
        results: dict[str, RecipientResult] = {}
        for rcpt in recipients:
            answer = self.respond(message, rcpt)
            if isinstance(answer, AttemptFailed):
                return answer
            results[rcpt] = answer
            if answer.accepted:
                self.delivered.append((message.id, rcpt, wire))
        return Delivery(results, hop="memory")
