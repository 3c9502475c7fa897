"""The spool's event stream: fan-out to any number of subscribers.

Each subscriber has its own bounded buffer. Publishing never waits: when a
subscriber's buffer is full, further events for it are counted instead of
queued, and before its next event it receives one ``overflow`` event saying
how many it missed. A slow subscriber therefore never stalls the spool, and
never loses events without being told.

Event kinds (:class:`~spoold.kinds.EventKind`, declared with the outcomes
in :mod:`spoold.kinds`): ``spooled``, ``presend`` (detail: the decision),
``delivered``, ``frozen``, ``removed``, ``unfrozen``, ``recovered`` (detail:
from which queue), ``quarantined`` (detail: the reason), ``delayed`` and
``delayed_rate_limited`` (``at``: when it will be tried), ``rerouted``
(detail: the new next hops), ``throttled`` (a next hop turned an attempt
of the message away with a throttling reply; detail: the hop, ``at``: the
end of the hop's backoff, during which no message goes to it), ``ping`` (every
30 s, no message), and ``overflow`` (detail: how many were missed).

An event that ends a delivery attempt (``delivered``, a bounce,
``delayed``, ``delayed_rate_limited``, ``frozen`` after an attempt) also
carries :attr:`SpoolEvent.results`: one :class:`RecipientOutcome` per
recipient of the message, what the attempt left it at (``delivered``,
``failed`` or ``deferred``) and, for a recipient of this attempt, the
next hop's reply. Other events have none. The JSON form of ``spoold
events`` (:meth:`SpoolEvent.to_dict`) does not show them.

A bounce (kind ``bounced``: the message failed and its sender was sent a
delivery status notification) is published in its stream form,
:func:`stream_form`: kind ``removed`` with detail ``bounced`` (or, after
no reply to the end of the message, the in-doubt detail), as it has always
been shown to subscribers, on the control socket, in the metrics and in
the logs. So a :class:`SpoolEvent` never has kind ``bounced``.

Ordering, as a subscriber sees it:

* A subscription starts when :meth:`EventHub.subscribe` (``spool.events()``)
  returns, not when it is first iterated; it gets every event published
  from then on, in the order published, and none from before.
* The spool publishes a message's events in the order its changes happen,
  each once the change is on disk. ``add`` publishes ``spooled`` (then
  ``frozen`` for a frozen add) before it returns and before any attempt on
  the message can start; a message another process added is ``spooled``
  when the spool adopts it, before its first attempt too. So a
  subscription opened before ``add`` is called sees that message's
  ``spooled`` event first, then every later event of it (``presend``,
  ``delivered``, ``delayed``, ``frozen``, ...).
* Events of different messages interleave in the order they happened.
* The one exception is overflow: a subscriber too slow to keep its buffer
  below ``max_buffer`` misses events, and the ``overflow`` event stands
  exactly where they are missing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import anyio

from spoold.kinds import EventKind
from spoold.message import EnvelopeInfo

__all__ = [
    "EventKind",
    "RecipientOutcomeState",
    "RecipientOutcome",
    "SpoolEvent",
    "EventHub",
    "Subscription",
    "EVENT_KINDS",
    "BOUNCED_DETAIL",
    "stream_form",
]

BOUNCED_DETAIL = "bounced"
"""The detail of a ``removed`` event that stands for a bounce."""


def stream_form(kind: EventKind, detail: str | None) -> tuple[EventKind, str | None]:
    """The kind and detail an event of ``kind`` is published with: a bounce
    is ``removed`` with detail ``bounced`` (or the detail it has, such as a
    bounce after no reply to the end of the message: "in doubt: ...");
    every other kind is itself."""
    if kind is EventKind.BOUNCED:
        return EventKind.REMOVED, detail or BOUNCED_DETAIL
    return kind, detail


EVENT_KINDS = frozenset(kind for kind in EventKind if stream_form(kind, None)[0] is kind)
"""The kinds a :class:`SpoolEvent` has (the ``event`` of the JSON form)."""


class RecipientOutcomeState(StrEnum):
    """Where a delivery attempt left one recipient (the words of
    :class:`spoold.history.RecipientState`, and ``deferred``)."""

    DELIVERED = "delivered"  # a next hop accepted it (in this attempt or before)
    FAILED = "failed"  # refused for good (reported to the sender if the message bounces)
    DEFERRED = "deferred"  # to be tried again


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """One recipient's part of an attempt's event. ``reply``: the next
    hop's reply to it in this attempt (``"550 5.1.1 no such user"``, its
    code in ``code``), or why no hop answered (``code`` None); None for a
    recipient settled by an earlier attempt. At most :data:`MAX_REPLY`
    characters."""

    recipient: str
    state: RecipientOutcomeState
    code: int | None = None
    reply: str | None = None


MAX_REPLY = 500
"""The longest reply a :class:`RecipientOutcome` carries (a longer one is cut, ``...`` added)."""


@dataclass(frozen=True, slots=True)
class SpoolEvent:
    """One event as a subscriber gets it; ``kind`` is in its stream form
    (:func:`stream_form`: never ``bounced``)."""

    time: datetime
    kind: EventKind
    id: str | None = None
    envelope_info: EnvelopeInfo | None = None
    detail: str | None = None
    at: datetime | None = None
    results: tuple[RecipientOutcome, ...] = ()  # an attempt's event only (module docstring)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"time": self.time, "event": str(self.kind)}
        if self.id is not None:
            out["id"] = self.id
        if self.detail is not None:
            out["detail"] = self.detail
        if self.at is not None:
            out["at"] = self.at
        if self.envelope_info is not None:
            out["sender"] = self.envelope_info.sender
            out["recipients"] = self.envelope_info.recipients
        return out


class Subscription:
    """One subscriber's view of the stream; iterate it with ``async for``."""

    def __init__(self, hub: EventHub, max_buffer: int) -> None:
        self._hub = hub
        self._buffer: deque[SpoolEvent] = deque()
        self._max = max_buffer
        self._missed = 0
        self._wake = anyio.Event()
        self._closed = False

    def _offer(self, event: SpoolEvent) -> None:
        # Once a gap has opened, keep counting until the consumer has been
        # told, so the overflow event stands exactly where events are missing.
        if self._missed or len(self._buffer) >= self._max:
            self._missed += 1
        else:
            self._buffer.append(event)
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._hub._subscribers.discard(self)
        self._wake.set()

    def __aiter__(self) -> AsyncIterator[SpoolEvent]:
        return self

    async def __anext__(self) -> SpoolEvent:
        while True:
            if self._buffer:
                event = self._buffer.popleft()
                if self._missed and not self._buffer:
                    # Everything queued before the gap is out: say what was lost.
                    self._buffer.append(
                        SpoolEvent(event.time, EventKind.OVERFLOW, detail=str(self._missed))
                    )
                    self._missed = 0
                return event
            if self._closed:
                raise StopAsyncIteration
            self._wake = anyio.Event()
            await self._wake.wait()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """Fans each published event out to every subscriber. Publishing never
    waits and never fails: a subscriber whose buffer (``max_buffer`` events)
    is full misses events and is told how many with one ``overflow`` event.
    Events reach a subscriber in the order they were published; a
    subscription sees only events published after it was made."""

    def __init__(self, max_buffer: int = 10_000) -> None:
        self._subscribers: set[Subscription] = set()
        self._max_buffer = max_buffer

    def subscribe(self, max_buffer: int | None = None) -> Subscription:
        if max_buffer is not None and max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        sub = Subscription(self, self._max_buffer if max_buffer is None else max_buffer)
        self._subscribers.add(sub)
        return sub

    def publish(self, event: SpoolEvent) -> None:
        for sub in list(self._subscribers):
            sub._offer(event)

    def close(self) -> None:
        for sub in list(self._subscribers):
            sub.close()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
