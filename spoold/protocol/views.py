"""What the control protocol shows of the spool: the views.

Each view is declared here once, as a :class:`msgspec.Struct` of the shape a
reply carries (field order is key order on the wire; a field whose default
is ``UNSET`` is a key present only when it applies), next to the function
that builds it from the spool's own objects. The daemon builds views, the
clients decode them, and the CLI builds the same views from the disk when no
daemon runs (``spoold status --spool-dir``), so the JSON is one whatever
its source.

The shapes are open: a client decodes a view from a newer daemon without
refusing a key it does not know (no ``forbid_unknown_fields``). Views are
plain data: nothing here reads a file, a clock or the network.

:func:`message_view` is the listing object (``status --format json``); it
is built as a dict (a large listing's cost is mostly here, see
:func:`listing_view`) and :class:`MessageView` declares its shape, which
the protocol's tests check it against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from spoold.history import Outcome
from spoold.message import Message, Quarantined, Queue, RetryInterval, SendAt, Status, queue_of
from spoold.ondisk import Unreadable
from spoold.outcome import RetryPlan
from spoold.suppression import Suppression
from spoold.times import rfc3339
from spoold.waiting import MessageOutcome

__all__ = [
    "MessageView",
    "EnvelopeView",
    "RetryIntervalView",
    "RelayAttemptView",
    "UnreadableView",
    "DepartedView",
    "HistoryView",
    "HistoryRecipientView",
    "OutcomeView",
    "RetryPlanView",
    "PlannedAttemptView",
    "PlannedRepeatsView",
    "PlannedEndView",
    "DelayWarningView",
    "EventView",
    "SuppressionView",
    "SuppressionCountsView",
    "SuppressionListView",
    "suppression_view",
    "message_view",
    "listing_view",
    "unreadable_view",
    "describe_view",
    "retry_plan_view",
    "outcome_view",
    "history_view",
    "departed_view",
]

_UNSET: Any = msgspec.UNSET  # a key left out of the view


# ------------------------------------------------------------ the shapes


class View(msgspec.Struct):
    """Base of the views (open shapes: unknown keys are kept out, not refused)."""


class RetryIntervalView(View):
    span: float  # seconds
    jitter: float | None


class RelayAttemptView(View):
    time: str  # RFC 3339 UTC
    error: str


class EnvelopeView(View):
    sender: str
    recipients: list[str]
    mail_params: list[str]
    envelope_id: str


class MessageView(View):
    """The listing object of a queued message: the record's fields, its
    ``queue`` and ``status`` (a name), times RFC 3339 UTC."""

    id: str
    queue: str | None
    status: str
    parent_id: str
    related_ids: list[str]
    flows: list[str]
    spool_date: str
    next_hop_choices: list[str]
    retry_intervals: list[RetryIntervalView]
    remaining_recipients: list[str]
    failed_recipients: list[str]
    relay_attempts: list[RelayAttemptView]
    envelope_info: EnvelopeView
    route: str | None
    size: int | None
    in_doubt: bool
    delay_warned_at: str | None
    rerouted_to: dict[str, str] | msgspec.UnsetType = _UNSET  # recipient -> message id
    send_at: str | msgspec.UnsetType = _UNSET
    quarantine_reason: str | msgspec.UnsetType = _UNSET
    removed_at: str | msgspec.UnsetType = _UNSET
    idempotency_key: str | msgspec.UnsetType = _UNSET
    submitter_uid: int | msgspec.UnsetType = _UNSET
    body: str | msgspec.UnsetType = _UNSET  # ``show`` with ``body``: base64


class UnreadableView(View):
    """The listing object of a record that cannot be read."""

    id: str
    queue: str
    status: Literal["quarantined", "unreadable"]
    quarantine_reason: str
    unreadable: Literal[True]
    path: str


class HistoryRecipientView(View):
    recipient: str
    state: str
    code: int | None
    enhanced_status: str | None
    text: str
    rerouted_to: str | msgspec.UnsetType = _UNSET  # state ``rerouted`` only
    rerouted_state: str | msgspec.UnsetType = _UNSET  # ``history`` from the daemon


class HistoryView(View):
    """A journalled final outcome (``history``): the journal line."""

    id: str
    outcome: str
    time: str
    spool_date: str
    sender: str
    recipients: list[HistoryRecipientView]
    hop: str
    parent_id: str
    flows: list[str]
    idempotency_key: str | None
    detail: str
    in_doubt: bool
    submitter_uid: int | None


class DepartedView(View):
    """``show`` of a message no queue holds any more, from the journal."""

    id: str
    queue: None
    status: str
    outcome: HistoryView


class OutcomeView(View):
    """The ``wait`` result."""

    id: str
    outcome: str
    time: str | None
    failed_recipients: list[str]
    last_error: str | None
    detail: str | None
    sender: str | msgspec.UnsetType = _UNSET
    recipients: list[str] | msgspec.UnsetType = _UNSET


class PlannedAttemptView(View):
    number: int
    earliest: str
    latest: str
    conditional: bool


class PlannedRepeatsView(View):
    first: int
    earliest: str
    latest: str
    shortest_wait: float  # seconds
    longest_wait: float
    until: str
    min_count: int
    max_count: int


class PlannedEndView(View):
    action: Literal["freeze", "bounce"]
    reason: Literal["lifetime", "intervals"]
    earliest: str
    latest: str


class DelayWarningView(View):
    earliest: str
    latest: str


class RetryPlanView(View):
    """The ``retry_plan`` result (``spoold retry-plan --format json``)."""

    id: str
    now: str
    expiry: str | None
    on_permanent_failure: str
    retries_exhausted: str
    attempts: list[PlannedAttemptView]
    repeats: PlannedRepeatsView | None
    ends: list[PlannedEndView]
    delay_warning: DelayWarningView | None
    note: str


class EventView(View):
    """One line of ``events``: what :meth:`~spoold.events.SpoolEvent.to_dict` gives."""

    time: str
    event: str
    id: str | msgspec.UnsetType = _UNSET  # absent for ping and overflow
    detail: str | msgspec.UnsetType = _UNSET
    at: str | msgspec.UnsetType = _UNSET
    sender: str | msgspec.UnsetType = _UNSET
    recipients: list[str] | msgspec.UnsetType = _UNSET


class SuppressionView(View):
    """One entry of the suppression list."""

    address: str  # normalised: the whole address in lower case
    since: str  # RFC 3339 UTC
    until: str  # RFC 3339 UTC: suppressed before this time
    reason: str  # the next hop's reply, or an operator's words
    source: Literal["bounce", "operator"]


class SuppressionCountsView(View):
    """What the list did since the daemon started: the daemon's own counts
    and those its SMTP ingest workers report to it over their pipe."""

    refused: int  # recipients refused (at RCPT in any process, submit, Spool.add)
    failed: int  # recipients taken and failed unsent (suppressed_recipients = "fail")
    bounced: int  # recipients put on the list by a hard bounce


class SuppressionListView(View):
    """The ``suppress_list`` result."""

    entries: list[SuppressionView]
    total: int  # entries in force
    max_suppressed: int
    counts: SuppressionCountsView


# ------------------------------------------------------- building them


@functools.lru_cache(maxsize=64)
def _intervals_view(intervals: tuple[RetryInterval, ...]) -> tuple[dict[str, Any], ...]:
    """Retry intervals as seconds (most messages share a few lists of them:
    shared views, to encode and never to change)."""
    return tuple(
        {"span": r.span.total_seconds(), "jitter": r.jitter.total_seconds() if r.jitter else None}
        for r in intervals
    )


def _as_is(value: Any) -> Any:
    return value


def _utc_time(t: datetime) -> Any:
    """A time for msgspec to encode: it writes a UTC time exactly as
    :func:`~spoold.times.rfc3339` does."""
    return t if t.tzinfo is UTC else rfc3339(t)


def message_view(msg: Message, status: Status | None = None) -> dict[str, Any]:
    """The JSON listing of a message (``status --format json``,
    :class:`MessageView`): the record's fields plus ``queue``; ``status``
    as a string (``status``, when given, instead of the record's), with
    ``send_at`` and ``quarantine_reason`` when they apply (and
    ``removed_at``, ``idempotency_key``, ``rerouted_to``,
    ``submitter_uid`` when set); times RFC 3339 UTC; retry intervals as
    seconds. Nothing of ``msg`` is kept: the view is new."""
    return _view(msg, status, shared=False)


def listing_view(item: tuple[Message, Status]) -> dict[str, Any]:
    """:func:`message_view` of a record of the spool's, to encode with
    msgspec at once (before any ``await``) and drop: it shares the record's
    lists and leaves UTC times to the encoder (a large listing's cost is
    mostly here)."""
    return _view(*item, shared=True)


def _view(msg: Message, status: Status | None, *, shared: bool) -> dict[str, Any]:
    if status is None:
        status = msg.status
    some: Callable[[Any], Any] = _as_is if shared else list
    when: Callable[[datetime], Any] = _utc_time if shared else rfc3339
    intervals = _intervals_view(tuple(msg.retry_intervals))
    queue = queue_of(status)
    env = msg.envelope_info
    view: dict[str, Any] = {
        "id": msg.id,
        "queue": queue.value if queue else None,
        "status": status.name,
        "parent_id": msg.parent_id,
        "related_ids": some(msg.related_ids),
        "flows": some(msg.flows),
        "spool_date": when(msg.spool_date),
        "next_hop_choices": some(msg.next_hop_choices),
        "retry_intervals": intervals if shared else [dict(i) for i in intervals],
        "remaining_recipients": some(msg.remaining_recipients),
        "failed_recipients": some(msg.failed_recipients),
        "relay_attempts": [{"time": when(a.time), "error": a.error} for a in msg.relay_attempts],
        "envelope_info": {
            "sender": env.sender,
            "recipients": some(env.recipients),
            "mail_params": some(env.mail_params),
            "envelope_id": env.envelope_id,
        },
        "route": msg.route,
        "size": msg.size,
        "in_doubt": msg.in_doubt,
        "delay_warned_at": when(msg.delay_warned_at) if msg.delay_warned_at else None,
    }
    if msg.rerouted_to:
        view["rerouted_to"] = dict(msg.rerouted_to)
    if isinstance(status, SendAt):
        view["send_at"] = when(status.at)
    if isinstance(status, Quarantined):
        view["quarantine_reason"] = status.reason
    if msg.removed_at is not None:
        view["removed_at"] = when(msg.removed_at)
    if msg.idempotency_key is not None:
        view["idempotency_key"] = msg.idempotency_key
    if msg.submitter_uid is not None:
        view["submitter_uid"] = msg.submitter_uid
    return view


def _builtins(view: View) -> dict[str, Any]:
    """A view as the dict a reply carries (keys in field order, unset ones left out)."""
    out: dict[str, Any] = msgspec.to_builtins(view)
    return out


def retry_plan_view(plan: RetryPlan) -> dict[str, Any]:
    """The JSON form of a :class:`~spoold.outcome.RetryPlan`
    (:class:`RetryPlanView`; times RFC 3339 UTC): ``attempts``
    (``number``, ``earliest``, ``latest``, ``conditional``), ``repeats``
    (the attempts of a repeating last interval, summed up:
    ``first``, ``earliest``, ``latest``, ``shortest_wait`` and
    ``longest_wait`` in seconds, ``until``, ``min_count``, ``max_count``;
    or null), ``ends`` (``action`` freeze|bounce, ``reason``
    lifetime|intervals, ``earliest``, ``latest``), ``delay_warning``
    (``earliest``, ``latest``, or null), ``expiry``, the policy's
    ``on_permanent_failure`` and ``retries_exhausted``, and ``note`` when
    nothing is planned."""
    warning = plan.delay_warning
    repeats = plan.repeats
    return _builtins(
        RetryPlanView(
            id=plan.id,
            now=rfc3339(plan.now),
            expiry=rfc3339(plan.expiry) if plan.expiry else None,
            on_permanent_failure=plan.policy.on_permanent_failure.value,
            retries_exhausted=plan.policy.retries_exhausted.value,
            attempts=[
                PlannedAttemptView(
                    number=a.number,
                    earliest=rfc3339(a.earliest),
                    latest=rfc3339(a.latest),
                    conditional=a.conditional,
                )
                for a in plan.attempts
            ],
            repeats=(
                PlannedRepeatsView(
                    first=repeats.first,
                    earliest=rfc3339(repeats.earliest),
                    latest=rfc3339(repeats.latest),
                    shortest_wait=repeats.shortest.total_seconds(),
                    longest_wait=repeats.longest.total_seconds(),
                    until=rfc3339(repeats.until),
                    min_count=repeats.min_count,
                    max_count=repeats.max_count,
                )
                if repeats
                else None
            ),
            ends=[
                PlannedEndView(
                    action=e.action,
                    reason=e.reason,
                    earliest=rfc3339(e.earliest),
                    latest=rfc3339(e.latest),
                )
                for e in plan.ends
            ],
            delay_warning=(
                DelayWarningView(earliest=rfc3339(warning[0]), latest=rfc3339(warning[1]))
                if warning
                else None
            ),
            note=plan.note,
        )
    )


def unreadable_view(item: Unreadable) -> dict[str, Any]:
    """The listing of a record that cannot be read: what is known of it."""
    return _builtins(
        UnreadableView(
            id=item.id,
            queue=item.queue.value,
            status="quarantined" if item.queue is Queue.QUARANTINE else "unreadable",
            quarantine_reason=item.reason,
            unreadable=True,
            path=str(item.path),
        )
    )


def describe_view(found: Message | Unreadable) -> dict[str, Any]:
    """The listing object of whatever a queue holds under an id."""
    return unreadable_view(found) if isinstance(found, Unreadable) else message_view(found)


def outcome_view(outcome: MessageOutcome) -> dict[str, Any]:
    """The ``wait`` result (:class:`OutcomeView`): a
    :class:`~spoold.waiting.MessageOutcome` as JSON (``outcome`` is its
    kind; ``sender`` and ``recipients`` are the envelope's, when known)."""
    env = outcome.envelope_info
    return _builtins(
        OutcomeView(
            id=outcome.id,
            outcome=outcome.kind.value,
            time=rfc3339(outcome.time) if outcome.time else None,
            failed_recipients=list(outcome.failed_recipients),
            last_error=outcome.last_error,
            detail=outcome.detail,
            sender=env.sender if env is not None else _UNSET,
            recipients=list(env.recipients) if env is not None else _UNSET,
        )
    )


def history_view(outcome: Outcome) -> dict[str, Any]:
    """A journalled final outcome (``history``, and ``show`` of a message
    that left the queue; :class:`HistoryView`): the journal line's fields,
    times RFC 3339 UTC."""
    view: dict[str, Any] = msgspec.to_builtins(outcome)
    view["time"] = rfc3339(outcome.time)
    view["spool_date"] = rfc3339(outcome.spool_date)
    for rcpt in view["recipients"]:
        if rcpt.get("rerouted_to") is None:
            rcpt.pop("rerouted_to", None)  # only a rerouted recipient has one
    return view


def departed_view(outcome: Outcome) -> dict[str, Any]:
    """``show`` of a message no queue holds any more (:class:`DepartedView`)."""
    return {
        "id": outcome.id,
        "queue": None,
        "status": outcome.outcome.value,
        "outcome": history_view(outcome),
    }


def suppression_view(entry: Suppression) -> dict[str, Any]:
    """An entry of the suppression list as a reply shows it."""
    return {
        "address": entry.address,
        "since": rfc3339(entry.since),
        "until": rfc3339(entry.until),
        "reason": entry.reason,
        "source": entry.source,
    }
