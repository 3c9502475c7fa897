"""The delivery-policy rules of the attempt outcome, as a table: queue
lifetime, bounce or freeze on permanent failure, the one delay warning,
and the retry plan worked out from the same rules. Pure: no spool, no
disk, no clock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from spoold.hooks import ErrorAction
from spoold.message import Frozen, Message, Removed, RetryInterval, SendAt
from spoold.outcome import (
    DeliveryPolicy,
    NoticeKind,
    OnPermanentFailure,
    PlannedAttempt,
    PlannedEnd,
    RecipientNotice,
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
    # expected
    event: str = "delayed"
    left: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    notices: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    wait: float | None = None  # hours after the attempt of send_at
    expired: bool = False


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
        event="removed",
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
        event="removed",
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
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_policy_table(case: Case) -> None:
    rec = record(
        [A, B] if isinstance(case.answers, str) else list(case.answers), sender=case.sender
    )
    if case.warned_before:
        rec.delay_warned_at = SPOOLED + 5 * HOUR
    relay = (
        AttemptFailed(case.answers)
        if isinstance(case.answers, str)
        else Delivery(case.answers, hop=HOP)
    )
    policy = DeliveryPolicy(
        max_queue_lifetime=case.lifetime * HOUR if case.lifetime is not None else None,
        on_permanent_failure=case.on_failure,
        delay_warning=case.warning * HOUR if case.warning is not None else None,
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
    if case.event == "removed":
        assert new.status == Removed()
    elif case.event == "frozen":
        assert new.status == Frozen()
    elif case.wait is not None:
        assert new.status == SendAt(at=now + case.wait * HOUR)
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


def test_plan_without_jitter_lists_each_attempt_and_the_freeze() -> None:
    rec = record([A], intervals=[1, 2, 4])
    plan = retry_plan(rec, now=SPOOLED, policy=plan_policy())
    times = [SPOOLED + h * HOUR for h in (0, 1, 3, 7)]
    assert plan.attempts == tuple(PlannedAttempt(i + 1, t, t) for i, t in enumerate(times))
    assert plan.ends == (PlannedEnd("freeze", "intervals", times[-1], times[-1]),)
    assert plan.expiry == SPOOLED + 48 * HOUR
    assert plan.delay_warning is None


def test_plan_ends_at_the_lifetime_with_a_bounce() -> None:
    rec = record([A], intervals=[10, 20, 30])
    plan = retry_plan(rec, now=SPOOLED, policy=plan_policy(on_permanent_failure=BOUNCE))
    times = [SPOOLED, SPOOLED + 10 * HOUR, SPOOLED + 30 * HOUR, SPOOLED + 48 * HOUR]
    assert [a.earliest for a in plan.attempts] == times
    assert plan.ends == (PlannedEnd("bounce", "lifetime", times[-1], times[-1]),)


def test_plan_of_a_null_sender_message_freezes_at_the_lifetime() -> None:
    rec = record([A], intervals=[10, 20, 30], sender="")
    plan = retry_plan(rec, now=SPOOLED, policy=plan_policy(on_permanent_failure=BOUNCE))
    assert plan.ends == (
        PlannedEnd("freeze", "lifetime", SPOOLED + 48 * HOUR, SPOOLED + 48 * HOUR),
    )


def test_plan_bounds_follow_the_jitter() -> None:
    rec = record([A], intervals=[])
    rec.retry_intervals = [RetryInterval(HOUR, timedelta(minutes=6))] * 2
    plan = retry_plan(rec, now=SPOOLED, policy=plan_policy())
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
    plan = retry_plan(rec, now=SPOOLED + HOUR, policy=plan_policy(delay_warning=4 * HOUR))
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
