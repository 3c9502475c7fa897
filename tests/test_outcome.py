"""The attempt-outcome rules as a table: relay answers and on_error's
choices in, the next record and event out. No spool, no disk, no clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from spoold.events import MAX_REPLY, RecipientOutcome, RecipientOutcomeState
from spoold.hooks import ErrorAction
from spoold.message import Delivered, Frozen, RetryInterval, SendAt
from spoold.outcome import NO_REPLY, AfterCrash, attempt_outcome, recipient_outcomes, refusals
from spoold.relay import AttemptFailed, Delivery, RecipientResult
from tests.factories import make_message

NOW = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
OK = RecipientResult(250, "ok", "2.0.0")
LATER = RecipientResult(451, "later", "4.3.0")
NO = RecipientResult(550, "no such user", "5.1.1")
A, B, C = "a@example.com", "b@example.com", "c@example.com"
FAIL = ErrorAction.FAIL_PERMANENTLY
TRY = ErrorAction.TRY_LATER
RATE = ErrorAction.TRY_LATER_RATE_LIMITED
DONE = ErrorAction.DONE


def minutes(*values: int) -> list[RetryInterval]:
    return [RetryInterval(timedelta(minutes=m)) for m in values]


@dataclass
class Case:
    remaining: list[str]
    answers: dict[str, RecipientResult] | str  # a str: the attempt reached no hop
    actions: dict[str, ErrorAction] = field(default_factory=dict)
    intervals: list[int] = field(default_factory=lambda: [1, 5])
    failed_before: list[str] = field(default_factory=list)
    kick: bool = False
    # expected
    event: str = "delivered"
    left: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    intervals_after: list[int] | None = None
    wait: int | None = None  # minutes until send_at
    attempt_logged: bool = True


CASES = {
    "everyone accepted": Case([A, B], {A: OK, B: OK}, attempt_logged=False),
    "one refused for good freezes": Case(
        [A, B], {A: OK, B: NO}, {B: FAIL}, event="frozen", failed=[B]
    ),
    "one deferred waits the head interval and uses it": Case(
        [A, B], {A: OK, B: LATER}, {B: TRY}, event="delayed", left=[B], intervals_after=[5], wait=1
    ),
    "a permanent failure beside a deferral keeps retrying the deferral": Case(
        [A, B],
        {A: NO, B: LATER},
        {A: FAIL, B: TRY},
        event="delayed",
        left=[B],
        failed=[A],
        intervals_after=[5],
        wait=1,
    ),
    "rate limited reuses the head interval": Case(
        [A],
        {A: LATER},
        {A: RATE},
        event="delayed_rate_limited",
        left=[A],
        intervals_after=[1, 5],
        wait=1,
    ),
    "an operator's kick reuses the head interval": Case(
        [A],
        {A: LATER},
        {A: TRY},
        kick=True,
        event="delayed",
        left=[A],
        intervals_after=[1, 5],
        wait=1,
    ),
    "an operator's kick that fails for good still freezes": Case(
        [A], {A: NO}, {A: FAIL}, kick=True, event="frozen", failed=[A]
    ),
    "no interval left freezes": Case(
        [A], {A: LATER}, {A: TRY}, intervals=[], event="frozen", left=[A]
    ),
    "a kick with no interval left freezes again": Case(
        [A], {A: LATER}, {A: TRY}, intervals=[], kick=True, event="frozen", left=[A]
    ),
    "no hop reached keeps everyone": Case(
        [A, B],
        "no hops available: refused",
        event="delayed",
        left=[A, B],
        intervals_after=[5],
        wait=1,
    ),
    "a recipient with no reply is tried later, never delivered": Case(
        [A, B], {A: OK}, event="delayed", left=[B], intervals_after=[5], wait=1
    ),
    "done counts as dealt with": Case([A, B], {A: OK, B: NO}, {B: DONE}),
    "earlier failures keep the message frozen once the rest is delivered": Case(
        [A], {A: OK}, failed_before=[C], event="frozen", failed=[C], attempt_logged=False
    ),
    "a failure already recorded is not recorded twice": Case(
        [A], {A: NO}, {A: FAIL}, failed_before=[A], event="frozen", failed=[A]
    ),
    "a refusal on_error gave no answer for is tried later": Case(
        [A], {A: NO}, {}, event="delayed", left=[A], intervals_after=[5], wait=1
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_outcome_table(case: Case) -> None:
    record = make_message("M1", recipients=case.remaining, retry_intervals=minutes(*case.intervals))
    record.failed_recipients = list(case.failed_before)
    if isinstance(case.answers, str):
        relay = AttemptFailed(case.answers)
    else:
        relay = Delivery(case.answers, hop="mx.example.net:25")
    before = record.copy()

    got = attempt_outcome(
        record, relay, case.actions, now=NOW, draw=lambda i: i.span, operator_kick=case.kick
    )

    assert record == before  # the input is not changed
    new = got.record
    assert got.event == case.event
    assert new.remaining_recipients == case.left
    assert new.failed_recipients == case.failed
    if case.event == "delivered":
        assert new.status == Delivered()
    elif case.event == "frozen":
        assert new.status == Frozen()
    else:
        assert case.wait is not None
        assert new.status == SendAt(at=NOW + timedelta(minutes=case.wait))
        assert got.at == NOW + timedelta(minutes=case.wait)
    if case.intervals_after is not None:
        assert new.retry_intervals == minutes(*case.intervals_after)
    if case.attempt_logged:
        assert len(new.relay_attempts) == 1
        assert new.relay_attempts[0].time == NOW
    else:
        assert new.relay_attempts == []
    assert set(got.delivered) | set(got.failed) | set(got.later) == set(case.remaining)


def test_the_relay_attempt_text_names_each_refusal_and_the_hop() -> None:
    record = make_message("M1", recipients=[A, B], retry_intervals=minutes(1))
    got = attempt_outcome(
        record,
        Delivery({A: NO, B: LATER}, hop="mx.example.net:25"),
        {A: FAIL, B: TRY},
        now=NOW,
        draw=lambda i: i.span,
    )
    assert got.record.relay_attempts[0].error == (
        f"{A}: 550 5.1.1 no such user; {B}: 451 4.3.0 later via mx.example.net:25"
    )


def test_refusals_name_the_recipients_on_error_is_asked_about() -> None:
    record = make_message("M1", recipients=[A, B, C])
    assert refusals(record, Delivery({A: OK, B: NO})) == {B: NO, C: NO_REPLY}
    assert refusals(record, AttemptFailed("down")) == {}


def test_jitter_comes_from_draw() -> None:
    record = make_message("M1", recipients=[A], retry_intervals=minutes(10))
    got = attempt_outcome(
        record,
        Delivery({A: LATER}),
        {A: TRY},
        now=NOW,
        draw=lambda i: i.span + timedelta(seconds=7),
    )
    assert got.at == NOW + timedelta(minutes=10, seconds=7)


# ------------------------------------------------- what it says of next hops

HOP = "mx.example.net:25"
CLOSING = RecipientResult(421, "closing", "4.7.0")
POLICY = RecipientResult(450, "slow down", "4.7.1")
BARE_421 = RecipientResult(421, "closing")


@dataclass
class HopCase:
    answers: dict[str, RecipientResult] | AttemptFailed
    actions: dict[str, ErrorAction] = field(default_factory=dict)
    relay_hop: str = HOP  # the hop the relay names ("" : none)
    # expected
    answered: str | None = None
    throttled: tuple[str, ...] = ()


HOP_CASES = {
    "a delivery is an answer": HopCase({A: OK}, answered=HOP),
    "a plain deferral is an answer": HopCase({A: LATER}, {A: TRY}, answered=HOP),
    "a permanent refusal is an answer": HopCase({A: NO}, {A: FAIL}, answered=HOP),
    "421 throttles, whatever on_error answered": HopCase({A: CLOSING}, {A: TRY}, throttled=(HOP,)),
    "421 without an enhanced status throttles": HopCase({A: BARE_421}, {A: DONE}, throttled=(HOP,)),
    "4.7.x throttles": HopCase({A: OK, B: POLICY}, {B: TRY}, throttled=(HOP,)),
    "on_error answering rate limited throttles": HopCase({A: LATER}, {A: RATE}, throttled=(HOP,)),
    "a delivery naming no hop: the message's first answered": HopCase(
        {A: OK}, relay_hop="", answered="first.example:25"
    ),
    "an accepted recipient never throttles": HopCase(
        {A: RecipientResult(250, "ok", "4.7.0")}, answered=HOP
    ),
    "no hop named: the message's first": HopCase(
        {A: CLOSING}, relay_hop="", throttled=("first.example:25",)
    ),
    "no hop reached: nobody answered": HopCase(AttemptFailed("no hops available: refused")),
    "a hop that greeted with 421: throttled": HopCase(
        AttemptFailed("no hops available: 421", throttled_hops=("h1:25",)), throttled=("h1:25",)
    ),
}


@pytest.mark.parametrize("case", HOP_CASES.values(), ids=HOP_CASES.keys())
def test_hop_feedback_table(case: HopCase) -> None:
    record = make_message("M1", recipients=[A, B], retry_intervals=minutes(1))
    record.next_hop_choices = ["first.example:25", "second.example:25"]
    relay: AttemptFailed | Delivery
    if isinstance(case.answers, AttemptFailed):
        relay = case.answers
    else:
        relay = Delivery({B: OK, **case.answers}, hop=case.relay_hop)
    before = record.copy()

    got = attempt_outcome(record, relay, case.actions, now=NOW, draw=lambda i: i.span).hops

    assert (got.answered, got.throttled) == (case.answered, case.throttled)
    assert bool(got.reason) == bool(case.throttled)
    assert record == before


def test_without_a_lifetime_a_throttled_attempt_uses_up_an_interval() -> None:
    # The backoff is for the hop; with no lifetime to end the message, a
    # throttling deferral counts as any other (the lifetime cases are in
    # test_outcome_policy.py).
    record = make_message("M1", recipients=[A], retry_intervals=minutes(1, 5))
    got = attempt_outcome(
        record, Delivery({A: CLOSING}, hop=HOP), {A: TRY}, now=NOW, draw=lambda i: i.span
    )
    assert (got.event, got.at, got.hops.throttled) == (
        "delayed",
        NOW + timedelta(minutes=1),
        (HOP,),
    )
    assert got.record.retry_intervals == minutes(5)
    assert got.hops.reason == "421 4.7.0 closing"


DOUBT = RecipientResult(451, "in doubt: no reply to the end of the message", "4.4.2", in_doubt=True)


@pytest.mark.parametrize("after_crash", ["resend", "freeze"])
def test_a_recipient_in_doubt_marks_the_message_and_follows_after_crash(
    after_crash: AfterCrash,
) -> None:
    """No reply after the final dot: the hop may have it. Neither delivered
    nor refused: kept for later, the record marked in doubt; frozen for an
    operator (``freeze``) or tried again (``resend``), as after a crash."""
    record = make_message("M1", recipients=[A, B, C], retry_intervals=minutes(1, 5))
    got = attempt_outcome(
        record,
        Delivery({A: DOUBT, B: NO, C: DOUBT}, hop="mx.example.net:25"),
        {B: FAIL},  # the spool never asks on_error about A and C
        now=NOW,
        draw=lambda i: i.span,
        after_crash=after_crash,
    )
    new = got.record
    assert got.in_doubt
    assert new.in_doubt
    assert got.later == (A, C)
    assert got.failed == (B,)
    assert got.delivered == ()
    assert new.remaining_recipients == [A, C]
    assert "in doubt" in new.relay_attempts[0].error
    if after_crash == "freeze":
        assert (got.event, new.status) == ("frozen", Frozen())
    else:
        assert (got.event, new.status) == ("delayed", SendAt(at=NOW + timedelta(minutes=1)))
        assert new.retry_intervals == minutes(5)


def test_an_answer_in_a_later_attempt_leaves_the_mark() -> None:
    """The mark stays while the message is on the spool: the recipient may
    get it twice, whatever the next attempt says."""
    record = make_message("M1", recipients=[A], retry_intervals=minutes(1))
    record.in_doubt = True
    got = attempt_outcome(record, Delivery({A: LATER}), {A: TRY}, now=NOW, draw=lambda i: i.span)
    assert got.record.in_doubt
    assert not got.in_doubt  # this attempt itself had answers


# -----------------------------------------------------------------------------
# What :func:`spoold.outcome.attempt_outcome` says about each recipient
# (the ``delivered``, ``failed`` and ``later`` it returns, which the spool
# logs), and its defaults, beside the table above.
#
# Found by a mutation run: these lines changed without any test noticing
# (``delivered`` counting deferred recipients as delivered; a call that does
# not say ``operator_kick`` treated as an operator's kick).


D = "d@example.com"


@pytest.mark.parametrize(
    ("answers", "actions", "delivered", "failed", "later"),
    [
        ({A: OK, B: NO, C: LATER, D: OK}, {B: FAIL}, (A, D), (B,), (C,)),
        ({A: LATER, B: LATER, C: OK, D: LATER}, {}, (C,), (), (A, B, D)),
        ({A: NO, B: NO, C: OK, D: NO}, {A: FAIL, B: DONE, D: FAIL}, (B, C), (A, D), ()),
        ({A: OK}, {}, (A,), (), (B, C, D)),  # no reply for B, C, D: later
    ],
    ids=["mixed", "mostly-later", "failed-and-done", "missing-replies"],
)
def test_each_recipient_is_delivered_failed_or_later_exactly_once(
    answers: dict[str, RecipientResult],
    actions: dict[str, ErrorAction],
    delivered: tuple[str, ...],
    failed: tuple[str, ...],
    later: tuple[str, ...],
) -> None:
    record = make_message("M1", recipients=[A, B, C, D], retry_intervals=minutes(1))
    got = attempt_outcome(record, Delivery(answers), actions, now=NOW, draw=lambda i: i.span)
    assert got.delivered == delivered
    assert got.failed == failed
    assert got.later == later


def test_everyone_accepted_delivers_and_leaves_the_rest_of_the_record_as_it_was() -> None:
    # The usual end (told apart for speed): the same outcome as the rules give.
    record = make_message("M1", recipients=[A, B, C], retry_intervals=minutes(1, 5))
    record.remaining_recipients = [A, C]  # B accepted by an earlier attempt
    record.in_doubt = True
    before = record.copy()
    relay = Delivery({A: OK, C: OK}, hop=HOP)

    got = attempt_outcome(record, relay, {}, now=NOW, draw=lambda i: i.span, operator_kick=True)

    expected = before.copy()
    expected.remaining_recipients = []
    expected.status = Delivered()
    assert got.record == expected
    assert (got.event, got.at, got.delivered, got.failed, got.later) == (
        "delivered",
        None,
        (A, C),
        (),
        (),
    )
    assert (got.notices, got.expired, got.in_doubt, got.hard_bounces) == ((), False, False, ())
    assert (got.hops.answered, got.hops.throttled, got.hops.reason) == (HOP, (), "")
    assert record == before


def test_an_attempt_that_reached_no_hop_delivers_nobody() -> None:
    record = make_message("M1", recipients=[A, B], retry_intervals=minutes(1))
    got = attempt_outcome(record, AttemptFailed("down"), {}, now=NOW, draw=lambda i: i.span)
    assert (got.delivered, got.failed, got.later) == ((), (), (A, B))


def test_by_default_an_attempt_is_not_an_operators_kick() -> None:
    """Without ``operator_kick`` the head interval is used up."""
    record = make_message("M1", recipients=[A], retry_intervals=minutes(1, 5))
    got = attempt_outcome(record, Delivery({A: LATER}), {}, now=NOW, draw=lambda i: i.span)
    assert got.record.retry_intervals == minutes(5)
    assert got.record.status == SendAt(at=NOW + timedelta(minutes=1))


def test_recipient_outcomes_give_each_recipient_its_state_and_this_attempts_reply() -> None:
    """A partial refusal: a delivered, b refused for good, c left for
    later; in a second attempt c is delivered and a, settled before, has
    no reply of this attempt."""
    record = make_message("M1", recipients=[A, B, C], retry_intervals=minutes(1))
    outcome = Delivery({A: OK, B: NO, C: LATER}, hop="mx.example.net:25")
    first = attempt_outcome(record, outcome, {B: FAIL, C: TRY}, now=NOW, draw=lambda i: i.span)
    state = RecipientOutcomeState
    assert recipient_outcomes(record, outcome, first) == (
        RecipientOutcome(A, state.DELIVERED, 250, "250 2.0.0 ok"),
        RecipientOutcome(B, state.FAILED, 550, "550 5.1.1 no such user"),
        RecipientOutcome(C, state.DEFERRED, 451, "451 4.3.0 later"),
    )
    again = Delivery({C: OK})
    second = attempt_outcome(first.record, again, {}, now=NOW, draw=lambda i: i.span)
    assert recipient_outcomes(first.record, again, second) == (
        RecipientOutcome(A, state.DELIVERED),
        RecipientOutcome(B, state.FAILED),
        RecipientOutcome(C, state.DELIVERED, 250, "250 2.0.0 ok"),
    )


def test_recipient_outcomes_of_an_attempt_that_reached_no_hop_or_got_a_long_reply() -> None:
    record = make_message("M1", recipients=[A, B], retry_intervals=minutes(1))
    failed = AttemptFailed("connection refused")
    got = attempt_outcome(record, failed, {}, now=NOW, draw=lambda i: i.span)
    assert recipient_outcomes(record, failed, got) == (
        RecipientOutcome(A, RecipientOutcomeState.DEFERRED, None, "connection refused"),
        RecipientOutcome(B, RecipientOutcomeState.DEFERRED, None, "connection refused"),
    )
    long = Delivery({A: OK, B: RecipientResult(550, "x" * 5000, "5.7.1")})
    got = attempt_outcome(record, long, {B: FAIL}, now=NOW, draw=lambda i: i.span)
    reply = recipient_outcomes(record, long, got)[1].reply
    assert reply is not None and len(reply) == MAX_REPLY and reply.startswith("550 5.7.1 xxx")
    assert reply.endswith("...")
    # A recipient the hop did not answer for is counted as refused, "no reply".
    silent = Delivery({A: OK})
    got = attempt_outcome(record, silent, {}, now=NOW, draw=lambda i: i.span)
    assert recipient_outcomes(record, silent, got)[1] == RecipientOutcome(
        B, RecipientOutcomeState.DEFERRED, 451, "451 4.4.0 no reply for this recipient"
    )
