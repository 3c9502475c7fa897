"""The rules that turn one relay attempt into a message's next state.

This module is pure: no I/O, no clock, no randomness of its own. The spool
gathers what an attempt produced (the relay's outcome, and ``on_error``'s
answer for each refused recipient), calls :func:`attempt_outcome`, writes
the record it returns and publishes its event. Every rule about what an
attempt means lives here, so it is tested as a table of cases.

The rules, for the recipients that were still to be delivered:

* a recipient the hop accepted (2xx) is done; so is one ``on_error``
  answers ``done`` for;
* ``fail_permanently`` moves a recipient to ``failed_recipients``;
* ``try_later`` and ``try_later_rate_limited`` keep it in
  ``remaining_recipients``;
* a recipient the relay gave no result for counts as refused with
  ``451 no reply for this recipient`` (never as delivered);
* an attempt that reached no hop (:class:`~spoold.relay.AttemptFailed`)
  keeps every recipient for later.

Then the message's status:

* nobody left to try and nobody failed: ``delivered`` (files deleted);
* nobody left to try but someone failed: ``frozen``, for an operator;
* someone left to try and a retry interval left: ``send_at(now +
  interval)``, event ``delayed``; the head interval is consumed, except
  when the delay is rate-limited (``delayed_rate_limited``) or the attempt
  was one an operator asked for (``spoold send``): those reuse it, so an
  operator's kick never brings a message closer to freezing;
* someone left to try and no interval left: ``frozen``.

Every attempt that did not deliver to everyone adds a relay attempt (time,
error text) to the record.

What the attempt says about its next hop (:func:`hop_feedback`, in
:attr:`AttemptOutcome.hops`): the hop *throttled* us when a refusal is a
throttling reply (:attr:`~spoold.relay.RecipientResult.throttling`: ``421``,
or an enhanced status ``4.7.x``) or ``on_error`` answered
``try_later_rate_limited`` for one, and when the relay says a hop it could
not use turned us away so (:attr:`~spoold.relay.AttemptFailed.throttled_hops`);
the spool then backs that hop off for every message (:mod:`spoold.limits`).
A hop that answered without throttling has *answered*, which ends its
backoff. The hop is the one the relay names, else the message's first next
hop. None of this changes the message's own next state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from spoold.events import EventKind
from spoold.hooks import ErrorAction
from spoold.message import Delivered, Frozen, Message, RelayAttempt, RetryInterval, SendAt, Status
from spoold.relay import AttemptFailed, Delivery, RecipientResult, RelayOutcome

__all__ = [
    "NO_REPLY",
    "AttemptOutcome",
    "HopFeedback",
    "OutcomeEvent",
    "attempt_outcome",
    "hop_feedback",
    "refusals",
]

NO_REPLY = RecipientResult(451, "no reply for this recipient", "4.4.0")

OutcomeEvent = Literal[
    EventKind.DELIVERED, EventKind.FROZEN, EventKind.DELAYED, EventKind.DELAYED_RATE_LIMITED
]


@dataclass(frozen=True, slots=True)
class HopFeedback:
    """What an attempt says about next hops: ``answered``, the hop that
    answered without throttling (None if none did); ``throttled``, the hops
    that throttled us, with ``reason`` (the reply, for the log)."""

    answered: str | None = None
    throttled: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What one attempt did to a message: its new record (status
    included), the event to publish, and who ended where."""

    record: Message
    event: OutcomeEvent
    at: datetime | None
    delivered: tuple[str, ...]
    failed: tuple[str, ...]
    later: tuple[str, ...]
    hops: HopFeedback = field(default_factory=HopFeedback)


def hop_feedback(
    record: Message, outcome: RelayOutcome, actions: Mapping[str, ErrorAction]
) -> HopFeedback:
    """The next hop part of an attempt's outcome (module docstring)."""
    if isinstance(outcome, AttemptFailed):
        throttled = tuple(outcome.throttled_hops)
        return HopFeedback(None, throttled, outcome.error if throttled else "")
    hop = outcome.hop or (record.next_hop_choices[0] if record.next_hop_choices else None)
    if hop is None:
        return HopFeedback()
    for rcpt, result in refusals(record, outcome).items():
        if result.throttling:
            return HopFeedback(None, (hop,), str(result))
        if actions.get(rcpt) is ErrorAction.TRY_LATER_RATE_LIMITED:
            return HopFeedback(None, (hop,), f"{result} (on_error: rate limited)")
    return HopFeedback(hop)


def refusals(record: Message, outcome: RelayOutcome) -> dict[str, RecipientResult]:
    """The recipients of ``record`` the hop did not accept, with its answer
    (``NO_REPLY`` for one it gave no answer for); empty when the attempt
    reached no hop. These are the ones ``on_error`` is asked about."""
    if isinstance(outcome, AttemptFailed):
        return {}
    out: dict[str, RecipientResult] = {}
    for rcpt in record.remaining_recipients:
        result = outcome.recipients.get(rcpt, NO_REPLY)
        if not result.accepted:
            out[rcpt] = result
    return out


def attempt_outcome(
    record: Message,
    outcome: RelayOutcome,
    actions: Mapping[str, ErrorAction],
    *,
    now: datetime,
    draw: Callable[[RetryInterval], timedelta],
    operator_kick: bool = False,
) -> AttemptOutcome:
    """The next state of ``record`` after an attempt.

    ``actions`` holds ``on_error``'s answer for each recipient of
    :func:`refusals`; a refused recipient missing from it is tried later.
    ``draw`` turns a retry interval into a wait (jitter applied).
    ``operator_kick`` says an operator asked for this attempt. ``record``
    is not changed.
    """
    new = record.copy()
    remaining = list(record.remaining_recipients)
    later: list[str] = []
    permanent: list[str] = []
    errors: list[str] = []
    rate_limited = False
    if isinstance(outcome, AttemptFailed):
        later = remaining
        errors.append(outcome.error)
    else:
        refused = refusals(record, outcome)
        for rcpt in remaining:
            result = refused.get(rcpt)
            if result is None:
                continue  # accepted
            errors.append(f"{rcpt}: {result}")
            action = actions.get(rcpt, ErrorAction.TRY_LATER)
            if action is ErrorAction.FAIL_PERMANENTLY:
                permanent.append(rcpt)
            elif action is ErrorAction.TRY_LATER_RATE_LIMITED:
                later.append(rcpt)
                rate_limited = True
            elif action is ErrorAction.TRY_LATER:
                later.append(rcpt)
            # ErrorAction.DONE: dealt with, neither retried nor failed
    new.remaining_recipients = later
    new.failed_recipients = list(dict.fromkeys([*record.failed_recipients, *permanent]))
    if errors:
        via = f" via {outcome.hop}" if isinstance(outcome, Delivery) and outcome.hop else ""
        new.add_relay_attempt(RelayAttempt(now, "; ".join(errors) + via))
    event: OutcomeEvent
    at: datetime | None = None
    status: Status
    if not later and new.failed_recipients:
        status, event = Frozen(), EventKind.FROZEN
    elif not later:
        status, event = Delivered(), EventKind.DELIVERED
    elif not new.retry_intervals:
        status, event = Frozen(), EventKind.FROZEN
    else:
        interval = new.retry_intervals[0]
        if not rate_limited and not operator_kick:
            new.retry_intervals = new.retry_intervals[1:]
        at = now + draw(interval)
        status = SendAt(at=at)
        event = EventKind.DELAYED_RATE_LIMITED if rate_limited else EventKind.DELAYED
    new.status = status
    delivered = tuple(r for r in remaining if r not in later and r not in permanent)
    return AttemptOutcome(
        new,
        event,
        at,
        delivered,
        tuple(permanent),
        tuple(later),
        hop_feedback(record, outcome, actions),
    )
