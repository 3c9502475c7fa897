"""What became of a message, and waiting until something has.

A message *reaches an outcome* (:class:`~spoold.kinds.OutcomeKind`, the one
set that events, ``wait`` and the history journal share) when it stops
being sent on its own:

* ``delivered``: every recipient was accepted (the record is deleted);
* ``frozen``: it waits for an operator; ``failed_recipients`` names those
  that failed permanently (empty when an operator froze it, or when it ran
  out of retry intervals with recipients still to try);
* ``removed``: an operator removed it (the record is in ``removed``);
* ``quarantined``: it was set aside (``detail`` says why);
* ``bounced``: it was given back to its sender in a delivery status
  notification (when the spool bounces instead of freezing).

An outcome is the latest one, not always the last: an operator may thaw a
frozen message or recover a removed one, and it then goes on to another.

:class:`OutcomeBoard` remembers the latest outcome of the most recent
messages (a bounded map: the oldest entry is forgotten first) and wakes the
tasks watching a message when it reaches one. It is plain memory: no I/O,
no clock, no task of its own. :meth:`spoold.spool.Spool.wait` builds on it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

import anyio

from spoold.kinds import OutcomeKind
from spoold.message import EnvelopeInfo, Message

__all__ = ["OutcomeKind", "MessageOutcome", "OutcomeBoard", "DEFAULT_REMEMBERED_OUTCOMES"]

DEFAULT_REMEMBERED_OUTCOMES = 10_000


@dataclass(frozen=True, slots=True)
class MessageOutcome:
    """The outcome a message reached.

    ``time``: when it was reached (None when only the record says so, e.g.
    a message found frozen or removed on disk). ``failed_recipients``: the
    recipients that failed permanently. ``last_error``: the error of the
    latest relay attempt, if any. ``detail``: the quarantine reason, or
    what a bounce says about itself.
    """

    id: str
    kind: OutcomeKind
    time: datetime | None
    envelope_info: EnvelopeInfo | None
    failed_recipients: tuple[str, ...] = ()
    last_error: str | None = None
    detail: str | None = None

    @classmethod
    def of(
        cls,
        kind: OutcomeKind,
        message: Message,
        time: datetime | None,
        detail: str | None = None,
    ) -> MessageOutcome:
        """The outcome ``kind`` of ``message`` as its record stands."""
        last = message.last_relay_attempt
        return cls(
            id=message.id,
            kind=kind,
            time=time,
            envelope_info=message.envelope_info,
            failed_recipients=tuple(message.failed_recipients),
            last_error=last.error if last is not None else None,
            detail=detail,
        )


class OutcomeBoard:
    """The latest outcome of up to ``max_remembered`` recent messages, and
    the tasks waiting for one."""

    def __init__(self, max_remembered: int = DEFAULT_REMEMBERED_OUTCOMES) -> None:
        if max_remembered < 1:
            raise ValueError("max_remembered must be at least 1")
        self._max = max_remembered
        self._recent: OrderedDict[str, MessageOutcome] = OrderedDict()
        self._watchers: dict[str, list[anyio.Event]] = {}
        self._closed = False

    def reached(self, outcome: MessageOutcome) -> None:
        """Remember ``outcome`` (the newest) and wake whoever watches its
        message."""
        self._recent[outcome.id] = outcome
        self._recent.move_to_end(outcome.id)
        while len(self._recent) > self._max:
            self._recent.popitem(last=False)
        for event in self._watchers.pop(outcome.id, ()):
            event.set()

    def recent(self, message_id: str) -> MessageOutcome | None:
        """The latest outcome remembered for ``message_id``."""
        return self._recent.get(message_id)

    def watch(self, message_id: str) -> anyio.Event:
        """An event set at the next outcome of ``message_id`` (or when the
        board closes). Take it *before* looking at the message, so an
        outcome reached meanwhile is not missed; give it back with
        :meth:`unwatch`."""
        event = anyio.Event()
        if self._closed:
            event.set()
        else:
            self._watchers.setdefault(message_id, []).append(event)
        return event

    def unwatch(self, message_id: str, event: anyio.Event) -> None:
        events = self._watchers.get(message_id)
        if events is None:
            return
        if event in events:
            events.remove(event)
        if not events:
            del self._watchers[message_id]

    def close(self) -> None:
        """Wake every watcher; watches taken later are set at once."""
        self._closed = True
        for events in self._watchers.values():
            for event in events:
                event.set()
        self._watchers.clear()

    @property
    def watched(self) -> int:
        """How many watches are out (for tests: none may leak)."""
        return sum(len(events) for events in self._watchers.values())
