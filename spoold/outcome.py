"""The rules that turn one relay attempt into a message's next state.

This module is pure: no I/O, no clock, no randomness of its own. The spool
gathers what an attempt produced (the relay's outcome, and ``on_error``'s
answer for each refused recipient), calls :func:`attempt_outcome`, writes
the record it returns and publishes its event. Every rule about what an
attempt means lives here, so it is tested as a table of cases.

The rules, for the recipients that were still to be delivered:

* a recipient the hop accepted (2xx) is done; so is one ``on_error``
  answers ``done`` for;
* ``fail_permanently`` moves a recipient to ``failed_recipients``; so does
  ``suppress``, and the recipient is a *hard bounce* (:func:`hard_bounces`:
  also ``fail_permanently`` on a ``5xx`` whose enhanced status is
  ``5.1.x``), which the spool puts on the suppression list when
  ``suppress_after_hard_bounce`` is set (:mod:`spoold.suppression`);
* ``try_later`` and ``try_later_rate_limited`` keep it in
  ``remaining_recipients``;
* a recipient the relay gave no result for counts as refused with
  ``451 no reply for this recipient`` (never as delivered);
* a recipient *in doubt* (the hop accepted it, the final ``.`` was sent,
  and no reply came: :attr:`~spoold.relay.RecipientResult.in_doubt`) is
  neither delivered nor refused: ``on_error`` is not asked, it stays to be
  tried, and the record is marked ``in_doubt``, as after a crash; with
  ``after_crash = freeze`` the message is frozen for an operator (the hop
  may already have it), with ``resend`` it is tried again as usual;
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

A :class:`DeliveryPolicy` adds the rules of queue lifetime, what happens
when the retry intervals are used up, bounces and delay warnings (its
default adds none of them: a policy without a lifetime keeps the rules
above alone, which are the seed's):

* retries exhausted (a policy with a lifetime): under ``repeat_last`` (the
  default) the last interval is never consumed, so a message whose other
  intervals are used up is retried at that last one until its lifetime
  ends (then the lifetime rule below applies); a repeated wait is at least
  :data:`MIN_REPEAT_WAIT`, so a last interval of ``0s`` never makes a tight
  loop. Under ``freeze`` the last interval is consumed like the others and
  the message is frozen when none is left (the seed's rule). A message with
  no interval at all (so set by hand, or used up under ``freeze``) is frozen
  at its next failure either way. Without a lifetime ``repeat_last`` has no
  end to repeat to and acts as ``freeze``: a message never retries for ever
  unless a lifetime that long is configured;
* throttling (a policy with a lifetime): a refusal kept for later that is
  a throttling reply (:attr:`~spoold.relay.RecipientResult.throttling`:
  ``421``, or an enhanced status ``4.7.x``), or an attempt that reached no
  hop while some hop throttled us
  (:attr:`~spoold.relay.AttemptFailed.throttled_hops`), is rate-limited as
  if ``on_error`` had answered ``try_later_rate_limited``: the head interval
  is waited but not consumed, event ``delayed_rate_limited`` (the hop's own
  backoff, :mod:`spoold.limits`, holds every message meanwhile). A hop that
  throttles for ever still ends with the lifetime. Without a lifetime a
  throttling reply counts as any temporary one (it uses up an interval), so
  that such a hop still ends in a freeze;

Every attempt that did not deliver to everyone adds a relay attempt (time,
error text) to the record.

* lifetime: an attempt made at or after ``spool_date + max_queue_lifetime``
  (one an operator asked for excepted) fails every recipient still to be
  tried permanently, with status ``4.4.7``; and a retry that would fall
  after that moment is brought forward to it, so the last attempt is made
  exactly when the lifetime ends;
* ``on_permanent_failure = bounce`` and a sender that is not null: the
  recipients that failed permanently in this attempt are reported to the
  sender (a :class:`Notice` of kind ``failed``), and a message with nobody
  left to try is ``removed`` (event ``bounced``) instead of frozen. A
  null-sender message is never bounced: it is frozen as without the policy
  (and when a report cannot be added, the spool puts those recipients back
  among those to try, so a failure is never dropped unreported);
* ``delay_warning``: the first attempt at or after ``spool_date +
  delay_warning`` that leaves someone for later reports them to the sender
  (a :class:`Notice` of kind ``delayed``), once: the record remembers it in
  ``delay_warned_at``. Never for a null sender.

The notices are values: the spool turns them into delivery status
notifications (:mod:`spoold.dsn`). :func:`retry_plan` foresees the attempts
of a message by applying :func:`attempt_outcome` to failing attempts, so the
plan and what happens follow the same rules; once the last interval repeats,
the attempts up to the lifetime's end are summed up (:class:`PlannedRepeats`)
instead of listed, so a plan stays small whatever the lifetime.

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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from spoold.events import MAX_REPLY, RecipientOutcome, RecipientOutcomeState
from spoold.hooks import ErrorAction
from spoold.kinds import EventKind
from spoold.message import (
    Delivered,
    Frozen,
    Message,
    RelayAttempt,
    Removed,
    RetryInterval,
    SendAt,
    Sending,
    SendNow,
    Status,
)
from spoold.relay import AttemptFailed, Delivery, RecipientResult, RelayOutcome

__all__ = [
    "NO_REPLY",
    "recipient_outcomes",
    "AttemptOutcome",
    "OutcomeEvent",
    "attempt_outcome",
    "refusals",
    "OnPermanentFailure",
    "RetriesExhausted",
    "MIN_REPEAT_WAIT",
    "DeliveryPolicy",
    "NoticeKind",
    "RecipientNotice",
    "Notice",
    "PlannedAttempt",
    "PlannedEnd",
    "PlannedRepeats",
    "RetryPlan",
    "retry_plan",
    "HopFeedback",
    "hop_feedback",
    "is_hard_bounce",
    "MAILBOX_GONE_STATUSES",
    "hard_bounces",
]

NO_REPLY = RecipientResult(451, "no reply for this recipient", "4.4.0", phase="local")
EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired
NO_ANSWER_STATUS = "4.4.1"  # RFC 3463: no answer from host
MIN_REPEAT_WAIT = timedelta(seconds=1)  # the shortest wait of a repeated last interval

AfterCrash = Literal["resend", "freeze"]
"""What a message in doubt does (the hop may have it): sent again, or frozen."""

OutcomeEvent = Literal[
    EventKind.DELIVERED,
    EventKind.FROZEN,
    EventKind.DELAYED,
    EventKind.DELAYED_RATE_LIMITED,
    EventKind.BOUNCED,
]


class OnPermanentFailure(StrEnum):
    """What becomes of a message whose recipients failed for good."""

    FREEZE = "freeze"  # kept in frozen/ for an operator (the seed's rule)
    BOUNCE = "bounce"  # reported to the sender, then moved to removed/


class RetriesExhausted(StrEnum):
    """What a message does once its retry intervals are used up (module
    docstring): needs a lifetime to repeat until."""

    REPEAT_LAST = "repeat_last"  # the last interval repeats until the lifetime ends
    FREEZE = "freeze"  # frozen when none is left (the seed's rule)


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """The rules of lifetime, retries exhausted, bounces and delay warnings
    for one message. ``None`` turns a rule off; without a lifetime the
    policy is the seed's rules alone."""

    max_queue_lifetime: timedelta | None = None
    on_permanent_failure: OnPermanentFailure = OnPermanentFailure.FREEZE
    delay_warning: timedelta | None = None
    retries_exhausted: RetriesExhausted = RetriesExhausted.REPEAT_LAST

    def expiry(self, record: Message) -> datetime | None:
        """When ``record``'s lifetime ends (None: never)."""
        if self.max_queue_lifetime is None:
            return None
        return record.spool_date + self.max_queue_lifetime

    @property
    def repeats_last(self) -> bool:
        """Whether the last retry interval repeats until the lifetime ends."""
        return (
            self.max_queue_lifetime is not None
            and self.retries_exhausted is RetriesExhausted.REPEAT_LAST
        )


class NoticeKind(StrEnum):
    """The ``Action`` of a delivery status notification."""

    FAILED = "failed"
    DELAYED = "delayed"


@dataclass(frozen=True, slots=True)
class RecipientNotice:
    """What to tell the sender about one recipient. ``status`` is an RFC
    3463 code (``5.1.1``); ``reply`` the next hop's answer, when there was
    one; ``remote_mta`` the hop that gave it; ``reason`` a sentence for a
    person."""

    recipient: str
    status: str
    reason: str
    reply: RecipientResult | None = None
    remote_mta: str | None = None


@dataclass(frozen=True, slots=True)
class Notice:
    """A delivery status notification to send to the message's sender."""

    kind: NoticeKind
    recipients: tuple[RecipientNotice, ...]


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
    notices: tuple[Notice, ...] = ()
    expired: bool = False  # the lifetime ended: who was left failed with 4.4.7
    hops: HopFeedback = field(default_factory=HopFeedback)
    in_doubt: bool = False  # the hop may have the message (no reply to its end)
    hard_bounces: tuple[str, ...] = ()  # failed in a way that suppresses them (hard_bounces)


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
    policy: DeliveryPolicy = DeliveryPolicy(),
    after_crash: AfterCrash = "resend",
) -> AttemptOutcome:
    """The next state of ``record`` after an attempt.

    ``actions`` holds ``on_error``'s answer for each recipient of
    :func:`refusals`; a refused recipient missing from it is tried later.
    ``draw`` turns a retry interval into a wait (jitter applied).
    ``operator_kick`` says an operator asked for this attempt. ``policy``
    adds the lifetime, retries-exhausted, throttling, bounce and
    delay-warning rules. ``after_crash`` is what a message in doubt does
    (a result with ``in_doubt``: no reply to the end of the message).
    ``record`` is not changed.
    """
    if isinstance(outcome, Delivery) and not record.failed_recipients:
        replies = outcome.recipients
        if all(rcpt in replies and replies[rcpt].accepted for rcpt in record.remaining_recipients):
            return _all_accepted(record, outcome)
    new = record.copy()
    remaining = list(record.remaining_recipients)
    later: list[str] = []
    permanent: list[str] = []
    errors: list[str] = []
    answers: dict[str, RecipientResult] = {}
    rate_limited = False
    # Throttling keeps the interval only when a lifetime ends the message.
    throttle_keeps = policy.max_queue_lifetime is not None
    in_doubt = False  # the hop may have the message: no reply to its end
    hop = outcome.hop if isinstance(outcome, Delivery) else None
    if isinstance(outcome, AttemptFailed):
        later = remaining
        errors.append(outcome.error)
        rate_limited = throttle_keeps and bool(outcome.throttled_hops)
    else:
        refused = refusals(record, outcome)
        for rcpt in remaining:
            result = refused.get(rcpt)
            if result is None:
                continue  # accepted
            answers[rcpt] = result
            errors.append(f"{rcpt}: {result}")
            action = actions.get(rcpt, ErrorAction.TRY_LATER)
            if action in (ErrorAction.FAIL_PERMANENTLY, ErrorAction.SUPPRESS):
                permanent.append(rcpt)
            elif action is ErrorAction.TRY_LATER_RATE_LIMITED:
                later.append(rcpt)
                rate_limited = True
            elif action is ErrorAction.TRY_LATER:
                later.append(rcpt)
                if result.in_doubt:
                    in_doubt = True
                else:
                    rate_limited = rate_limited or (throttle_keeps and result.throttling)
            # ErrorAction.DONE: dealt with, neither retried nor failed
    notes = {
        rcpt: _recipient_notice(rcpt, answers.get(rcpt), hop, outcome)
        for rcpt in [*permanent, *later]
    }
    expiry = policy.expiry(record)
    expired = bool(later) and expiry is not None and now >= expiry and not operator_kick
    if expired:
        assert policy.max_queue_lifetime is not None
        lifetime = _span_text(policy.max_queue_lifetime)
        why = f"expired: not delivered within the queue lifetime ({lifetime})"
        errors.append(f"{EXPIRED_STATUS} {why}")
        for rcpt in later:
            last = notes[rcpt]
            reason = f"{why}; last error: {last.reason}"
            notes[rcpt] = RecipientNotice(rcpt, EXPIRED_STATUS, reason, last.reply, last.remote_mta)
        permanent += later
        later = []
    new.remaining_recipients = later
    new.failed_recipients = list(dict.fromkeys([*record.failed_recipients, *permanent]))
    if in_doubt:
        new.in_doubt = True  # stays so while the message is on the spool
    if errors:
        # Only a hop's own answers are credited to it (not, say, a suppressed recipient).
        from_hop = any(r.phase != "local" for r in answers.values())
        via = f" via {hop}" if hop and from_hop else ""
        new.add_relay_attempt(RelayAttempt(now, "; ".join(errors) + via))
    bounce = (
        policy.on_permanent_failure is OnPermanentFailure.BOUNCE
        and record.envelope_info.sender != ""
    )
    notices: list[Notice] = []
    if bounce and permanent:
        notices.append(Notice(NoticeKind.FAILED, tuple(notes[r] for r in permanent)))
    event: OutcomeEvent
    at: datetime | None = None
    status: Status
    if not later and new.failed_recipients:
        if bounce:
            status, event = Removed(), EventKind.BOUNCED
        else:
            status, event = Frozen(), EventKind.FROZEN
    elif not later:
        status, event = Delivered(), EventKind.DELIVERED
    elif in_doubt and after_crash == "freeze":
        status, event = Frozen(), EventKind.FROZEN  # for an operator, as after a crash
    elif not new.retry_intervals:
        status, event = Frozen(), EventKind.FROZEN
    else:
        interval = new.retry_intervals[0]
        repeating = len(new.retry_intervals) == 1 and policy.repeats_last
        if not rate_limited and not operator_kick and not repeating:
            new.retry_intervals = new.retry_intervals[1:]
        wait = draw(interval)
        if repeating:
            wait = max(wait, MIN_REPEAT_WAIT)
        at = now + wait
        if expiry is not None and at > expiry:
            at = max(expiry, now)  # the last attempt is made when the lifetime ends
        status = SendAt(at=at)
        event = EventKind.DELAYED_RATE_LIMITED if rate_limited else EventKind.DELAYED
        warn_after = policy.delay_warning
        if (
            warn_after is not None
            and record.delay_warned_at is None
            and record.envelope_info.sender != ""
            and now >= record.spool_date + warn_after
        ):
            notices.append(Notice(NoticeKind.DELAYED, tuple(notes[r] for r in later)))
            new.delay_warned_at = now
    new.status = status
    delivered = tuple(r for r in remaining if r not in later and r not in permanent)
    return AttemptOutcome(
        new,
        event,
        at,
        delivered,
        tuple(permanent),
        tuple(later),
        tuple(notices),
        expired,
        hop_feedback(record, outcome, actions),
        in_doubt,
        hard_bounces(answers, actions, permanent),
    )


def _all_accepted(record: Message, outcome: Delivery) -> AttemptOutcome:
    """:func:`attempt_outcome` of the usual end, told apart for speed: the
    hop accepted every recipient left and none failed before, so the
    message is delivered (the rules above give the same: nobody later,
    nobody failed, no error, no notice, no refusal to tell the hop of)."""
    new = record.copy()
    delivered = tuple(record.remaining_recipients)
    new.remaining_recipients = []
    new.status = Delivered()
    hop = outcome.hop or (record.next_hop_choices[0] if record.next_hop_choices else None)
    return AttemptOutcome(
        new,
        EventKind.DELIVERED,
        None,
        delivered,
        (),
        (),
        hops=HopFeedback() if hop is None else HopFeedback(hop),
    )


MAILBOX_GONE_STATUSES = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10"})
"""The enhanced statuses that say a recipient's address is bad for good:
no such mailbox (5.1.1), no such domain (5.1.2), a bad address (5.1.3),
the mailbox moved (5.1.6), a null MX (5.1.10). Not the other ``5.1.x``:
5.1.0 is what Postfix says of a refused *sender*, 5.1.7 and 5.1.8 are
about the sender, 5.1.5 means the address is valid."""


def is_hard_bounce(result: RecipientResult, action: ErrorAction) -> bool:
    """Whether a refusal answered ``action`` puts the recipient on the
    suppression list: ``on_error`` said ``suppress``; or it said
    ``fail_permanently`` to the hop's 5xx reply to this recipient's own
    ``RCPT`` (:attr:`~spoold.relay.RecipientResult.phase` ``rcpt``) with
    one of :data:`MAILBOX_GONE_STATUSES`. A reply to ``MAIL FROM`` or to
    the message (given to every recipient: it says nothing about one
    mailbox), an answer spoold made itself, a 4xx, a 5xx without an
    enhanced status and a policy refusal (``5.7.x``) never are; nor is
    ``on_error``'s ``suppress`` of an answer spoold made itself."""
    if result.phase == "local":
        return False
    if action is ErrorAction.SUPPRESS:
        return True
    return (
        action is ErrorAction.FAIL_PERMANENTLY
        and result.phase == "rcpt"
        and result.permanent
        and result.enhanced_status in MAILBOX_GONE_STATUSES
    )


def hard_bounces(
    answers: Mapping[str, RecipientResult],
    actions: Mapping[str, ErrorAction],
    failed: Iterable[str],
) -> tuple[str, ...]:
    """The recipients of ``failed`` (failed for good in this attempt) whose
    refusal is a hard bounce (:func:`is_hard_bounce`). A recipient failed by
    the queue lifetime (4.4.7) or an attempt that reached no hop is not."""
    return tuple(
        rcpt
        for rcpt in failed
        if rcpt in answers
        and is_hard_bounce(answers[rcpt], actions.get(rcpt, ErrorAction.TRY_LATER))
    )


def _recipient_notice(
    rcpt: str, reply: RecipientResult | None, hop: str | None, outcome: RelayOutcome
) -> RecipientNotice:
    if reply is None:  # the attempt reached no hop
        error = outcome.error if isinstance(outcome, AttemptFailed) else "no answer"
        return RecipientNotice(rcpt, NO_ANSWER_STATUS, error)
    status = reply.enhanced_status or f"{reply.code // 100}.0.0"
    if reply.phase == "local":  # spoold's own answer: no hop said it
        hop = None
    return RecipientNotice(rcpt, status, str(reply), reply, hop)


def _span_text(span: timedelta) -> str:
    """A span as an operator writes it (``5d``, ``4h``, ``90s``)."""
    seconds = int(span.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# ------------------------------------------------------------ retry plan


@dataclass(frozen=True, slots=True)
class PlannedAttempt:
    """One future attempt: it starts between ``earliest`` and ``latest``
    (retry jitter). ``conditional``: only when the jitter brings it before
    the message's end (it happens on the early path, not the late one)."""

    number: int
    earliest: datetime
    latest: datetime
    conditional: bool = False


@dataclass(frozen=True, slots=True)
class PlannedEnd:
    """How the message ends if every attempt fails: ``action`` is
    ``freeze`` or ``bounce``; ``reason`` is ``lifetime`` (the queue lifetime
    ends) or ``intervals`` (no retry interval left); between ``earliest``
    and ``latest``."""

    action: Literal["freeze", "bounce"]
    reason: Literal["lifetime", "intervals"]
    earliest: datetime
    latest: datetime


@dataclass(frozen=True, slots=True)
class PlannedRepeats:
    """The attempts after those listed, once the last retry interval repeats
    (``repeat_last``): attempt number ``first`` comes between ``earliest``
    and ``latest``, each further one ``shortest`` to ``longest`` after the
    one before (the interval with its jitter), and the last one when the
    lifetime ends at ``until``. They are ``min_count`` to ``max_count``
    attempts, that last one included (equal without jitter; ``min_count``
    0: only when the jitter brings the earlier attempts early enough)."""

    first: int
    earliest: datetime
    latest: datetime
    shortest: timedelta
    longest: timedelta
    until: datetime
    min_count: int
    max_count: int


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """What would happen to a message if every attempt from now on failed
    with a temporary error (nothing is sent to find out). ``attempts`` lists
    each attempt up to the one from which the last retry interval repeats;
    ``repeats`` sums up those that follow, to the lifetime's end (None when
    the interval does not repeat). A message that is not waiting to be sent
    (frozen, removed, ...) has no attempts and no end; ``note`` says why."""

    id: str
    now: datetime
    attempts: tuple[PlannedAttempt, ...] = ()
    ends: tuple[PlannedEnd, ...] = ()
    delay_warning: tuple[datetime, datetime] | None = None
    expiry: datetime | None = None
    note: str = ""
    policy: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    repeats: PlannedRepeats | None = None


_PLANNED_FAILURE = AttemptFailed("planned attempt (assumed to fail)")


@dataclass(slots=True)
class _Repeats:
    first: datetime  # the first repeated attempt
    wait: timedelta  # between two of them
    count: int  # the last one, at the lifetime's end, included


@dataclass(slots=True)
class _Path:
    times: list[datetime]
    end: PlannedEnd
    warned: datetime | None
    repeats: _Repeats | None = None


def _ceil_div(a: timedelta, b: timedelta) -> int:
    return -(-a // b)


def _follow(
    record: Message,
    first: datetime,
    policy: DeliveryPolicy,
    draw: Callable[[RetryInterval], timedelta],
) -> _Path:
    """Apply failing attempts to ``record`` from ``first`` until it ends, or
    until its last interval repeats: from there on every attempt is alike,
    so the rest is counted, not followed one by one."""
    rec, t = record, first
    times: list[datetime] = []
    warned: datetime | None = None
    while True:  # ends: each delayed attempt consumes an interval, or one repeats
        times.append(t)
        result = attempt_outcome(rec, _PLANNED_FAILURE, {}, now=t, draw=draw, policy=policy)
        if any(n.kind is NoticeKind.DELAYED for n in result.notices):
            warned = t
        if not isinstance(result.record.status, SendAt):
            return _Path(times, _planned_end(result, t), warned)
        assert result.at is not None
        if result.record.retry_intervals != rec.retry_intervals:
            rec, t = result.record, result.at
            continue
        # The last interval repeats: attempts every ``wait`` until the
        # lifetime ends, the last one made then (attempt_outcome's rules).
        expiry = policy.expiry(rec)
        assert expiry is not None and t < expiry  # repeating needs a lifetime
        wait = max(draw(result.record.retry_intervals[0]), MIN_REPEAT_WAIT)
        count = _ceil_div(expiry - t, wait)
        rec = result.record
        warn_after = policy.delay_warning
        if (
            warned is None
            and warn_after is not None
            and rec.delay_warned_at is None
            and rec.envelope_info.sender != ""
        ):
            step = max(1, _ceil_div(rec.spool_date + warn_after - t, wait))
            if t + step * wait < expiry:
                warned = t + step * wait
        last = attempt_outcome(rec, _PLANNED_FAILURE, {}, now=expiry, draw=draw, policy=policy)
        assert last.expired
        return _Path(times, _planned_end(last, expiry), warned, _Repeats(result.at, wait, count))


def _planned_end(result: AttemptOutcome, at: datetime) -> PlannedEnd:
    action: Literal["freeze", "bounce"] = (
        "bounce" if isinstance(result.record.status, Removed) else "freeze"
    )
    reason: Literal["lifetime", "intervals"] = "lifetime" if result.expired else "intervals"
    return PlannedEnd(action, reason, at, at)


def _early(interval: RetryInterval) -> timedelta:
    return max(timedelta(0), interval.span - (interval.jitter or timedelta(0)))


def _late(interval: RetryInterval) -> timedelta:
    return interval.span + (interval.jitter or timedelta(0))


def retry_plan(record: Message, *, now: datetime, policy: DeliveryPolicy) -> RetryPlan:
    """The attempts ``record`` would get from ``now`` if each failed with a
    temporary error, with their jitter bounds, and how and when it would
    end (frozen or bounced). Worked out by applying :func:`attempt_outcome`
    to failing attempts twice: once with every wait as short as the jitter
    allows, once as long; times between are what can happen. The attempts
    of a repeating last interval are summed up in :attr:`RetryPlan.repeats`
    (so a plan is small even for a ``1s`` interval over days)."""
    plan = RetryPlan(record.id, now, expiry=policy.expiry(record), policy=policy)
    status = record.status
    if isinstance(status, SendAt):
        first = max(status.at, now)
    elif isinstance(status, SendNow | Sending):
        first = now
    else:
        return replace(plan, note=f"{status.name}: no attempt is planned")
    if not record.remaining_recipients:
        return replace(plan, note="no recipient is left to try")
    early = _follow(record, first, policy, _early)
    late = _follow(record, first, policy, _late)
    attempts = []
    for i, t in enumerate(early.times):
        if i < len(late.times):
            attempts.append(PlannedAttempt(i + 1, t, late.times[i]))
        else:
            attempts.append(PlannedAttempt(i + 1, t, late.end.latest, conditional=True))
    ends: tuple[PlannedEnd, ...]
    if (early.end.action, early.end.reason) == (late.end.action, late.end.reason):
        ends = (
            PlannedEnd(early.end.action, early.end.reason, early.end.earliest, late.end.latest),
        )
    else:
        ends = (early.end, late.end)
    repeats = None
    if early.repeats is not None:  # the late path never repeats when the early one does not
        late_repeats = late.repeats
        repeats = PlannedRepeats(
            first=len(early.times) + 1,
            earliest=early.repeats.first,
            latest=late_repeats.first if late_repeats else late.end.latest,
            shortest=early.repeats.wait,
            longest=late_repeats.wait if late_repeats else early.repeats.wait,
            until=early.end.latest,
            min_count=late_repeats.count if late_repeats else 0,
            max_count=early.repeats.count,
        )
    warning = None
    if early.warned is not None:
        warning = (early.warned, late.warned or early.warned)
    return replace(
        plan, attempts=tuple(attempts), ends=ends, delay_warning=warning, repeats=repeats
    )


def recipient_outcomes(
    record: Message, outcome: RelayOutcome, result: AttemptOutcome
) -> tuple[RecipientOutcome, ...]:
    """Each recipient of ``record`` (as it was before the attempt) and
    where the attempt ``result`` left it, with the hop's reply for those
    this attempt tried (or why no hop answered): the ``results`` of the
    attempt's event. A recipient settled before keeps its state, without
    a reply."""
    replies = outcome.recipients if isinstance(outcome, Delivery) else {}
    tried = set(record.remaining_recipients)
    delivered, failed, later = set(result.delivered), set(result.failed), set(result.later)
    out = []
    for rcpt in dict.fromkeys(record.envelope_info.recipients):
        if rcpt in delivered:
            state = RecipientOutcomeState.DELIVERED
        elif rcpt in failed or (rcpt not in tried and rcpt in record.failed_recipients):
            state = RecipientOutcomeState.FAILED
        elif rcpt in later:
            state = RecipientOutcomeState.DEFERRED
        else:
            state = RecipientOutcomeState.DELIVERED  # by an earlier attempt
        code: int | None = None
        reply: str | None = None
        if rcpt in tried:
            if isinstance(outcome, AttemptFailed):
                reply = outcome.error
            else:
                answer = replies.get(rcpt, NO_REPLY)
                code, reply = answer.code, str(answer)
        out.append(RecipientOutcome(rcpt, state, code, _shortened(reply)))
    return tuple(out)


def _shortened(reply: str | None) -> str | None:
    if reply is None or len(reply) <= MAX_REPLY:
        return reply
    return reply[: MAX_REPLY - 3] + "..."
