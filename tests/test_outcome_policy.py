"""The delivery-policy rules of the attempt outcome, as a table: queue
lifetime, what happens when the retry intervals are used up, throttling
replies, bounce or freeze on permanent failure, the one delay warning, and
the retry plan worked out from the same rules. Pure: no spool, no disk, no
clock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from spoold.hooks import ErrorAction
from spoold.message import Frozen, Message, Removed, RetryInterval, SendAt
from spoold.outcome import (
    MIN_REPEAT_WAIT,
    DeliveryPolicy,
    NoticeKind,
    OnPermanentFailure,
    PlannedAttempt,
    PlannedEnd,
    PlannedRepeats,
    RecipientNotice,
    RetriesExhausted,
    attempt_outcome,
    retry_plan,
)
from spoold.relay import AttemptFailed, Delivery, RecipientResult
from tests.factories import make_message

SPOOLED = datetime(2031, 1, 2, 0, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
OK = RecipientResult(250, "ok", "2.0.0")
LATER = RecipientResult(451, "later", "4.3.0")
NO = RecipientResult(550, "no such user", "5.1.1")
A, B = "a@example.com", "b@example.com"
HOP = "mx.example.net:25"
FAIL = ErrorAction.FAIL_PERMANENTLY
TRY = ErrorAction.TRY_LATER
BOUNCE = OnPermanentFailure.BOUNCE
FREEZE = OnPermanentFailure.FREEZE
REPEAT = RetriesExhausted.REPEAT_LAST
USE_UP = RetriesExhausted.FREEZE
CLOSING = RecipientResult(421, "too many connections, closing", "4.7.0")
SLOW_DOWN = RecipientResult(450, "slow down", "4.7.1")
BARE_421 = RecipientResult(421, "closing")


def hours(*values: float) -> list[RetryInterval]:
    return [RetryInterval(timedelta(hours=h)) for h in values]


def record(
    recipients: list[str],
    *,
    sender: str = "sender@example.org",
    intervals: Sequence[float] = (1, 2),
) -> Message:
    msg = make_message(
        "M1", recipients=recipients, retry_intervals=hours(*intervals), spool_date=SPOOLED
    )
    msg.envelope_info = msgspec.structs.replace(msg.envelope_info, sender=sender)
    return msg


@dataclass
class Case:
    answers: dict[str, RecipientResult] | str  # a str: the attempt reached no hop
    actions: dict[str, ErrorAction] = field(default_factory=dict)
    age: float = 1  # hours since spooled, at the attempt
    lifetime: float | None = 48
    on_failure: OnPermanentFailure = FREEZE
    warning: float | None = None
    sender: str = "sender@example.org"
    warned_before: bool = False
    kick: bool = False
    intervals: tuple[float, ...] = (1, 2)
    retries: RetriesExhausted = REPEAT
    throttled_hops: tuple[str, ...] = ()  # of the attempt that reached no hop
    # expected
    event: str = "delayed"
    left: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    notices: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    wait: float | None = None  # hours after the attempt of send_at
    expired: bool = False
    intervals_after: tuple[float, ...] | None = None


CASES = {
    "before the lifetime a deferral waits": Case({A: LATER}, {A: TRY}, left=[A], wait=1),
    "at the lifetime a deferral fails with 4.4.7 and freezes": Case(
        {A: LATER}, {A: TRY}, age=48, event="frozen", failed=[A], expired=True
    ),
    "past the lifetime, no hop reached: fails with 4.4.7": Case(
        "connection refused", age=50, event="frozen", failed=[A, B], expired=True
    ),
    "expired under bounce: the sender is told, the message removed": Case(
        {A: LATER},
        {A: TRY},
        age=48,
        on_failure=BOUNCE,
        event="bounced",
        failed=[A],
        notices=[("failed", [(A, "4.4.7")])],
        expired=True,
    ),
    "a retry past the lifetime is brought forward to it": Case(
        {A: LATER}, {A: TRY}, age=47.5, left=[A], wait=0.5
    ),
    "an operator's kick is not expired": Case({A: LATER}, {A: TRY}, age=60, kick=True, left=[A]),
    "no lifetime: never expires": Case({A: LATER}, {A: TRY}, age=1000, lifetime=None, left=[A]),
    "a 5xx under freeze freezes, no notice": Case(
        {A: NO, B: OK}, {A: FAIL}, on_failure=FREEZE, event="frozen", failed=[A]
    ),
    "a 5xx under bounce is reported and the message removed": Case(
        {A: NO, B: OK},
        {A: FAIL},
        on_failure=BOUNCE,
        event="bounced",
        failed=[A],
        notices=[("failed", [(A, "5.1.1")])],
    ),
    "a 5xx beside a deferral is reported now, the rest retried": Case(
        {A: NO, B: LATER},
        {A: FAIL, B: TRY},
        on_failure=BOUNCE,
        left=[B],
        failed=[A],
        notices=[("failed", [(A, "5.1.1")])],
        wait=1,
    ),
    "a null-sender message is never bounced: frozen": Case(
        {A: NO, B: OK}, {A: FAIL}, on_failure=BOUNCE, sender="", event="frozen", failed=[A]
    ),
    "a null-sender message expires frozen, without a notice": Case(
        {A: LATER},
        {A: TRY},
        age=48,
        on_failure=BOUNCE,
        sender="",
        event="frozen",
        failed=[A],
        expired=True,
    ),
    "delay warning before its time: nothing": Case(
        {A: LATER}, {A: TRY}, warning=4, left=[A], wait=1
    ),
    "delay warning at its time: one delayed notice": Case(
        {A: LATER},
        {A: TRY},
        age=4,
        warning=4,
        left=[A],
        wait=1,
        notices=[("delayed", [(A, "4.3.0")])],
    ),
    "delay warning names the hop-less failure as 4.4.1": Case(
        "connection refused",
        age=5,
        warning=4,
        left=[A, B],
        wait=1,
        notices=[("delayed", [(A, "4.4.1"), (B, "4.4.1")])],
    ),
    "delay warning is sent once": Case(
        {A: LATER}, {A: TRY}, age=6, warning=4, warned_before=True, left=[A], wait=1
    ),
    "delay warning never for the null sender": Case(
        {A: LATER}, {A: TRY}, age=6, warning=4, sender="", left=[A], wait=1
    ),
    "delay warning and a bounce in one attempt": Case(
        {A: NO, B: LATER},
        {A: FAIL, B: TRY},
        age=5,
        warning=4,
        on_failure=BOUNCE,
        left=[B],
        failed=[A],
        wait=1,
        notices=[("failed", [(A, "5.1.1")]), ("delayed", [(B, "4.3.0")])],
    ),
    # --- retry intervals used up
    "an interval that is not the last is used up": Case(
        {A: LATER}, {A: TRY}, intervals=(1, 2), left=[A], wait=1, intervals_after=(2,)
    ),
    "the last interval repeats under a lifetime": Case(
        {A: LATER}, {A: TRY}, intervals=(2,), left=[A], wait=2, intervals_after=(2,)
    ),
    "the last interval repeats when no hop was reached": Case(
        "connection refused", intervals=(2,), left=[A, B], wait=2, intervals_after=(2,)
    ),
    "a repeat past the lifetime is brought forward to it": Case(
        {A: LATER}, {A: TRY}, age=47, intervals=(2,), left=[A], wait=1, intervals_after=(2,)
    ),
    "at the lifetime a repeating message expires as any other": Case(
        {A: LATER},
        {A: TRY},
        age=48,
        intervals=(2,),
        on_failure=BOUNCE,
        event="bounced",
        failed=[A],
        notices=[("failed", [(A, "4.4.7")])],
        expired=True,
    ),
    "under freeze the last interval is used up": Case(
        {A: LATER}, {A: TRY}, intervals=(2,), retries=USE_UP, left=[A], wait=2, intervals_after=()
    ),
    "under freeze no interval left freezes before the lifetime": Case(
        {A: LATER}, {A: TRY}, intervals=(), retries=USE_UP, event="frozen", left=[A]
    ),
    "no interval at all freezes under repeat_last too": Case(
        {A: LATER}, {A: TRY}, intervals=(), event="frozen", left=[A]
    ),
    "without a lifetime the last interval is used up": Case(
        {A: LATER}, {A: TRY}, lifetime=None, intervals=(2,), left=[A], wait=2, intervals_after=()
    ),
    "an operator's kick keeps the last interval": Case(
        {A: LATER}, {A: TRY}, kick=True, intervals=(2,), left=[A], wait=2, intervals_after=(2,)
    ),
    # --- throttling replies
    "a 421 kept for later waits the head interval without using it": Case(
        {A: CLOSING},
        {A: TRY},
        event="delayed_rate_limited",
        left=[A],
        wait=1,
        intervals_after=(1, 2),
    ),
    "a 421 without an enhanced status likewise": Case(
        {A: BARE_421},
        {A: TRY},
        event="delayed_rate_limited",
        left=[A],
        wait=1,
        intervals_after=(1, 2),
    ),
    "a 4.7.x deferral likewise, beside a plain one": Case(
        {A: LATER, B: SLOW_DOWN},
        {A: TRY, B: TRY},
        event="delayed_rate_limited",
        left=[A, B],
        wait=1,
        intervals_after=(1, 2),
    ),
    "an attempt failed because a hop throttled keeps the interval": Case(
        "no hops available: h1:25: 421 busy",
        throttled_hops=("h1:25",),
        event="delayed_rate_limited",
        left=[A, B],
        wait=1,
        intervals_after=(1, 2),
    ),
    "a 421 on_error fails for good is not retried": Case(
        {A: CLOSING}, {A: FAIL}, event="frozen", failed=[A]
    ),
    "a 421 at the lifetime expires: throttling never outlives it": Case(
        {A: CLOSING}, {A: TRY}, age=48, event="frozen", failed=[A], expired=True
    ),
    "a 421 near the lifetime is brought forward to it": Case(
        {A: CLOSING},
        {A: TRY},
        age=47.5,
        event="delayed_rate_limited",
        left=[A],
        wait=0.5,
        intervals_after=(1, 2),
    ),
    "without a lifetime a 421 uses up the interval as any deferral": Case(
        {A: CLOSING}, {A: TRY}, lifetime=None, left=[A], wait=1, intervals_after=(2,)
    ),
    "without a lifetime a hop that throttled still uses up the interval": Case(
        "no hops available: h1:25: 421 busy",
        throttled_hops=("h1:25",),
        lifetime=None,
        left=[A, B],
        wait=1,
        intervals_after=(2,),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_policy_table(case: Case) -> None:
    rec = record(
        [A, B] if isinstance(case.answers, str) else list(case.answers),
        sender=case.sender,
        intervals=case.intervals,
    )
    if case.warned_before:
        rec.delay_warned_at = SPOOLED + 5 * HOUR
    relay = (
        AttemptFailed(case.answers, case.throttled_hops)
        if isinstance(case.answers, str)
        else Delivery(case.answers, hop=HOP)
    )
    policy = DeliveryPolicy(
        max_queue_lifetime=case.lifetime * HOUR if case.lifetime is not None else None,
        on_permanent_failure=case.on_failure,
        delay_warning=case.warning * HOUR if case.warning is not None else None,
        retries_exhausted=case.retries,
    )
    now = SPOOLED + case.age * HOUR
    before = rec.copy()

    got = attempt_outcome(
        rec,
        relay,
        case.actions,
        now=now,
        draw=lambda i: i.span,
        operator_kick=case.kick,
        policy=policy,
    )

    assert rec == before  # the input is not changed
    new = got.record
    assert got.event == case.event
    assert got.expired is case.expired
    assert new.remaining_recipients == case.left
    assert new.failed_recipients == case.failed
    if case.event == "bounced":
        assert new.status == Removed()
    elif case.event == "frozen":
        assert new.status == Frozen()
    elif case.wait is not None:
        assert new.status == SendAt(at=now + case.wait * HOUR)
        assert got.at == now + case.wait * HOUR
    if case.intervals_after is not None:
        assert new.retry_intervals == hours(*case.intervals_after)
    assert [
        (n.kind.value, [(r.recipient, r.status) for r in n.recipients]) for n in got.notices
    ] == (case.notices)
    warned = any(n.kind is NoticeKind.DELAYED for n in got.notices)
    if warned:
        assert new.delay_warned_at == now
    else:
        assert new.delay_warned_at == before.delay_warned_at
    if case.expired:
        assert (
            "expired: not delivered within the queue lifetime (2d)" in new.relay_attempts[0].error
        )


def test_a_notice_carries_the_reply_the_hop_and_a_reason() -> None:
    rec = record([A])
    got = attempt_outcome(
        rec,
        Delivery({A: NO}, hop=HOP),
        {A: FAIL},
        now=SPOOLED,
        draw=lambda i: i.span,
        policy=DeliveryPolicy(on_permanent_failure=BOUNCE),
    )
    (notice,) = got.notices
    assert notice.recipients == (RecipientNotice(A, "5.1.1", "550 5.1.1 no such user", NO, HOP),)


def test_an_expired_recipient_keeps_its_last_reply_in_the_notice() -> None:
    rec = record([A])
    got = attempt_outcome(
        rec,
        Delivery({A: LATER}, hop=HOP),
        {A: TRY},
        now=SPOOLED + 48 * HOUR,
        draw=lambda i: i.span,
        policy=DeliveryPolicy(max_queue_lifetime=48 * HOUR, on_permanent_failure=BOUNCE),
    )
    (notice,) = got.notices
    (rcpt,) = notice.recipients
    assert (rcpt.status, rcpt.reply, rcpt.remote_mta) == ("4.4.7", LATER, HOP)
    assert rcpt.reason == (
        "expired: not delivered within the queue lifetime (2d); last error: 451 4.3.0 later"
    )


def test_a_reply_without_an_enhanced_code_gets_its_class() -> None:
    rec = record([A])
    got = attempt_outcome(
        rec,
        Delivery({A: RecipientResult(554, "rejected")}, hop=HOP),
        {A: FAIL},
        now=SPOOLED,
        draw=lambda i: i.span,
        policy=DeliveryPolicy(on_permanent_failure=BOUNCE),
    )
    assert got.notices[0].recipients[0].status == "5.0.0"


# ------------------------------------------------------------ retry plan


def plan_policy(**changes: object) -> DeliveryPolicy:
    options: dict[str, object] = {"max_queue_lifetime": 48 * HOUR}
    options.update(changes)
    return DeliveryPolicy(**options)  # type: ignore[arg-type]


def test_plan_under_freeze_lists_each_attempt_and_the_freeze() -> None:
    rec = record([A], intervals=[1, 2, 4])
    plan = retry_plan(rec, now=SPOOLED, policy=plan_policy(retries_exhausted=USE_UP))
    times = [SPOOLED + h * HOUR for h in (0, 1, 3, 7)]
    assert plan.attempts == tuple(PlannedAttempt(i + 1, t, t) for i, t in enumerate(times))
    assert plan.ends == (PlannedEnd("freeze", "intervals", times[-1], times[-1]),)
    assert plan.expiry == SPOOLED + 48 * HOUR
    assert plan.delay_warning is None
    assert plan.repeats is None


def test_plan_repeats_the_last_interval_until_the_lifetime() -> None:
    rec = record([A], intervals=[1, 2, 4])
    plan = retry_plan(rec, now=SPOOLED, policy=plan_policy())
    times = [SPOOLED + h * HOUR for h in (0, 1, 3)]
    assert plan.attempts == tuple(PlannedAttempt(i + 1, t, t) for i, t in enumerate(times))
    end = SPOOLED + 48 * HOUR
    # then at 7h, 11h, ... 47h (11 attempts) and at 48h, when the lifetime ends
    assert plan.repeats == PlannedRepeats(
        first=4,
        earliest=SPOOLED + 7 * HOUR,
        latest=SPOOLED + 7 * HOUR,
        shortest=4 * HOUR,
        longest=4 * HOUR,
        until=end,
        min_count=12,
        max_count=12,
    )
    assert plan.ends == (PlannedEnd("freeze", "lifetime", end, end),)


def test_plan_ends_at_the_lifetime_with_a_bounce() -> None:
    rec = record([A], intervals=[10, 20, 30])
    plan = retry_plan(rec, now=SPOOLED, policy=plan_policy(on_permanent_failure=BOUNCE))
    end = SPOOLED + 48 * HOUR
    assert [a.earliest for a in plan.attempts] == [
        SPOOLED,
        SPOOLED + 10 * HOUR,
        SPOOLED + 30 * HOUR,
    ]
    assert plan.repeats is not None
    assert (plan.repeats.first, plan.repeats.earliest, plan.repeats.max_count) == (4, end, 1)
    assert plan.ends == (PlannedEnd("bounce", "lifetime", end, end),)


def test_plan_is_what_failing_attempts_then_do() -> None:
    # The plan's attempts, listed and summed up, are those the rules make.
    rec = record([A], intervals=[1, 2, 5])
    policy = plan_policy(on_permanent_failure=BOUNCE)
    plan = retry_plan(rec, now=SPOOLED, policy=policy)
    seen: list[datetime] = []
    t = SPOOLED
    while True:
        seen.append(t)
        got = attempt_outcome(
            rec, AttemptFailed("refused"), {}, now=t, draw=lambda i: i.span, policy=policy
        )
        if got.at is None:
            break
        rec, t = got.record, got.at
    assert got.expired and got.event == "bounced"
    repeats = plan.repeats
    assert repeats is not None
    listed = [a.earliest for a in plan.attempts]
    assert seen[: len(listed)] == listed
    summed = [
        min(repeats.earliest + k * repeats.shortest, repeats.until)
        for k in range(repeats.max_count)
    ]
    assert seen[len(listed) :] == summed
    assert summed[-1] == repeats.until == plan.ends[0].earliest


def test_plan_of_a_short_interval_over_days_stays_small() -> None:
    rec = record([A], intervals=[])
    rec.retry_intervals = [RetryInterval(timedelta(seconds=1))]
    plan = retry_plan(rec, now=SPOOLED, policy=plan_policy(max_queue_lifetime=timedelta(days=5)))
    assert plan.attempts == (PlannedAttempt(1, SPOOLED, SPOOLED),)
    assert plan.repeats is not None
    assert plan.repeats.min_count == plan.repeats.max_count == 5 * 86400


def test_a_repeated_zero_interval_waits_a_second() -> None:
    rec = record([A], intervals=[0])
    policy = plan_policy()
    got = attempt_outcome(
        rec, AttemptFailed("refused"), {}, now=SPOOLED, draw=lambda i: i.span, policy=policy
    )
    assert got.at == SPOOLED + MIN_REPEAT_WAIT
    plan = retry_plan(rec, now=SPOOLED, policy=policy)
    assert plan.repeats is not None
    assert plan.repeats.shortest == MIN_REPEAT_WAIT
    assert plan.repeats.max_count == 48 * 3600


def test_plan_of_a_repeat_with_jitter_gives_bounds() -> None:
    rec = record([A], intervals=[])
    rec.retry_intervals = [RetryInterval(HOUR, timedelta(minutes=6))]
    plan = retry_plan(rec, now=SPOOLED, policy=plan_policy(max_queue_lifetime=10 * HOUR))
    early, late = timedelta(minutes=54), timedelta(minutes=66)
    assert plan.repeats == PlannedRepeats(
        first=2,
        earliest=SPOOLED + early,
        latest=SPOOLED + late,
        shortest=early,
        longest=late,
        until=SPOOLED + 10 * HOUR,
        min_count=10,  # 10h / 66m, rounded up
        max_count=12,  # 10h / 54m, rounded up
    )


def test_plan_shows_a_delay_warning_among_the_repeats() -> None:
    rec = record([A], intervals=[1])
    plan = retry_plan(
        rec, now=SPOOLED, policy=plan_policy(delay_warning=timedelta(hours=4, minutes=30))
    )
    assert len(plan.attempts) == 1
    assert plan.delay_warning == (SPOOLED + 5 * HOUR, SPOOLED + 5 * HOUR)


def test_plan_of_a_null_sender_message_freezes_at_the_lifetime() -> None:
    rec = record([A], intervals=[10, 20, 30], sender="")
    plan = retry_plan(rec, now=SPOOLED, policy=plan_policy(on_permanent_failure=BOUNCE))
    assert plan.ends == (
        PlannedEnd("freeze", "lifetime", SPOOLED + 48 * HOUR, SPOOLED + 48 * HOUR),
    )


def test_plan_bounds_follow_the_jitter() -> None:
    rec = record([A], intervals=[])
    rec.retry_intervals = [RetryInterval(HOUR, timedelta(minutes=6))] * 2
    plan = retry_plan(rec, now=SPOOLED, policy=plan_policy(retries_exhausted=USE_UP))
    six = timedelta(minutes=6)
    assert plan.attempts == (
        PlannedAttempt(1, SPOOLED, SPOOLED),
        PlannedAttempt(2, SPOOLED + HOUR - six, SPOOLED + HOUR + six),
        PlannedAttempt(3, SPOOLED + 2 * (HOUR - six), SPOOLED + 2 * (HOUR + six)),
    )
    assert plan.ends == (
        PlannedEnd("freeze", "intervals", SPOOLED + 2 * (HOUR - six), SPOOLED + 2 * (HOUR + six)),
    )


def test_plan_marks_an_attempt_only_the_early_path_reaches() -> None:
    rec = record([A], intervals=[])
    rec.retry_intervals = [RetryInterval(10 * HOUR, 2 * HOUR)] * 6
    lifetime = 30 * HOUR  # early path: 0, 8, 16, 24, 30; late path: 0, 12, 24, 30
    plan = retry_plan(rec, now=SPOOLED, policy=plan_policy(max_queue_lifetime=lifetime))
    end = SPOOLED + lifetime
    assert [(a.earliest, a.latest, a.conditional) for a in plan.attempts] == [
        (SPOOLED, SPOOLED, False),
        (SPOOLED + 8 * HOUR, SPOOLED + 12 * HOUR, False),
        (SPOOLED + 16 * HOUR, SPOOLED + 24 * HOUR, False),
        (SPOOLED + 24 * HOUR, end, False),
        (end, end, True),
    ]
    assert plan.ends == (PlannedEnd("freeze", "lifetime", end, end),)


def test_plan_starts_at_send_at_and_shows_the_delay_warning() -> None:
    rec = record([A], intervals=[1, 2, 4])
    rec.status = SendAt(at=SPOOLED + 2 * HOUR)
    plan = retry_plan(
        rec,
        now=SPOOLED + HOUR,
        policy=plan_policy(delay_warning=4 * HOUR, retries_exhausted=USE_UP),
    )
    assert [a.earliest for a in plan.attempts] == [SPOOLED + h * HOUR for h in (2, 3, 5, 9)]
    # the first attempt at or after 4h: the one at 5h
    assert plan.delay_warning == (SPOOLED + 5 * HOUR, SPOOLED + 5 * HOUR)


def test_plan_of_a_frozen_message_is_empty() -> None:
    rec = record([A])
    rec.status = Frozen()
    plan = retry_plan(rec, now=SPOOLED, policy=plan_policy())
    assert (plan.attempts, plan.ends) == ((), ())
    assert plan.note == "frozen: no attempt is planned"


def test_plan_does_not_change_the_record() -> None:
    rec = record([A], intervals=[1, 2])
    before = rec.copy()
    retry_plan(rec, now=SPOOLED, policy=plan_policy(on_permanent_failure=BOUNCE))
    assert rec == before


def test_a_hop_that_throttles_for_ever_ends_with_the_lifetime() -> None:
    rec = record([A], intervals=[1, 2])
    policy = plan_policy()
    expiry = SPOOLED + 48 * HOUR
    events: list[str] = []
    t = SPOOLED
    for _ in range(100):  # 48 attempts an hour apart, then the end
        got = attempt_outcome(
            rec,
            Delivery({A: CLOSING}, hop=HOP),
            {A: TRY},
            now=t,
            draw=lambda i: i.span,
            policy=policy,
        )
        events.append(got.event)
        if got.at is None:
            break
        assert got.at <= expiry
        assert got.record.retry_intervals == hours(1, 2)  # never used up
        rec, t = got.record, got.at
    assert events == ["delayed_rate_limited"] * 48 + ["frozen"]
    assert (t, got.expired, got.record.failed_recipients) == (expiry, True, [A])
