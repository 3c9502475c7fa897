"""What can become of a message, and what can happen to it on the way: the
closed sets that the event stream, :meth:`~spoold.spool.Spool.wait` and the
history journal share.

:class:`OutcomeKind` is the one set of outcomes. A message *reaches an
outcome* when it stops being sent on its own:

* ``delivered``: every recipient was accepted (the record is deleted);
* ``bounced``: it failed, and it was given back to its sender in a delivery
  status notification (the record is in ``removed``);
* ``removed``: an operator (or the presend hook) removed it;
* ``frozen``: it waits for an operator;
* ``quarantined``: it was set aside.

The first three are *final* (:data:`FinalOutcomeKind`): the message has
left the queue, and the history journal keeps a line for it. ``frozen`` and
``quarantined`` are not: an operator may still send the message again.

:class:`EventKind` is that set plus the steps on the way (``spooled``,
``presend``, ``delayed``, ...): each outcome is an event of its own name,
and :attr:`EventKind.outcome` says which outcome an event stands for.

The one place where a kind is not spelled as itself: on the event stream
(and so on the control socket, in the metrics and the logs) a bounce is
shown as ``removed`` with the detail ``bounced`` (the in-doubt detail
after no reply to the end of the message), the form it had before it was a
kind of its own; :func:`spoold.events.stream_form` maps it there.
Everywhere else (``wait`` results, journal lines) ``bounced`` is spelled
``bounced``.

This module imports nothing of spoold: every other module can use it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, assert_never

__all__ = ["OutcomeKind", "FinalOutcomeKind", "FINAL_OUTCOMES", "EventKind"]


class OutcomeKind(StrEnum):
    """What became of a message (module docstring); the names are those of
    the matching events."""

    DELIVERED = "delivered"
    BOUNCED = "bounced"
    REMOVED = "removed"
    FROZEN = "frozen"
    QUARANTINED = "quarantined"


FinalOutcomeKind = Literal[OutcomeKind.DELIVERED, OutcomeKind.BOUNCED, OutcomeKind.REMOVED]
"""The outcomes after which a message has left the queue (journalled)."""

FINAL_OUTCOMES: frozenset[OutcomeKind] = frozenset(
    {OutcomeKind.DELIVERED, OutcomeKind.BOUNCED, OutcomeKind.REMOVED}
)


class EventKind(StrEnum):
    """What happened to a message (or to the stream): every outcome, under
    its own name, and the steps on the way."""

    # The outcomes: the values are OutcomeKind's, so the two never drift.
    DELIVERED = OutcomeKind.DELIVERED.value
    BOUNCED = OutcomeKind.BOUNCED.value
    REMOVED = OutcomeKind.REMOVED.value
    FROZEN = OutcomeKind.FROZEN.value
    QUARANTINED = OutcomeKind.QUARANTINED.value
    # The steps on the way.
    SPOOLED = "spooled"
    PRESEND = "presend"
    UNFROZEN = "unfrozen"
    RECOVERED = "recovered"
    DELAYED = "delayed"
    DELAYED_RATE_LIMITED = "delayed_rate_limited"
    REROUTED = "rerouted"
    THROTTLED = "throttled"
    # The stream's own (no message).
    PING = "ping"
    OVERFLOW = "overflow"

    @property
    def outcome(self) -> OutcomeKind | None:
        """The outcome a message has reached by this event; None for a step
        on the way. ``recovered`` leaves a message frozen."""
        return _OUTCOMES[self]  # looked up: it is asked at every event published

    def _outcome(self) -> OutcomeKind | None:
        match self:
            case EventKind.DELIVERED:
                return OutcomeKind.DELIVERED
            case EventKind.BOUNCED:
                return OutcomeKind.BOUNCED
            case EventKind.REMOVED:
                return OutcomeKind.REMOVED
            case EventKind.FROZEN | EventKind.RECOVERED:
                return OutcomeKind.FROZEN
            case EventKind.QUARANTINED:
                return OutcomeKind.QUARANTINED
            case (
                EventKind.SPOOLED
                | EventKind.PRESEND
                | EventKind.UNFROZEN
                | EventKind.DELAYED
                | EventKind.DELAYED_RATE_LIMITED
                | EventKind.REROUTED
                | EventKind.THROTTLED
                | EventKind.PING
                | EventKind.OVERFLOW
            ):
                return None
            case _:
                assert_never(self)


_OUTCOMES = {kind: kind._outcome() for kind in EventKind}
