"""What :func:`spoold.outcome.attempt_outcome` says about each recipient
(the ``delivered``, ``failed`` and ``later`` it returns, which the spool
logs), and its defaults, beside the table of tests/test_outcome.py.

Found by a mutation run: these lines changed without any test noticing
(``delivered`` counting deferred recipients as delivered; a call that does
not say ``operator_kick`` treated as an operator's kick).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from spoold.hooks import ErrorAction
from spoold.message import RetryInterval, SendAt
from spoold.outcome import attempt_outcome
from spoold.relay import AttemptFailed, Delivery, RecipientResult
from tests.factories import make_message

NOW = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
OK = RecipientResult(250, "ok", "2.0.0")
LATER = RecipientResult(451, "later", "4.3.0")
NO = RecipientResult(550, "no such user", "5.1.1")
A, B, C, D = "a@example.com", "b@example.com", "c@example.com", "d@example.com"


def minutes(*values: int) -> list[RetryInterval]:
    return [RetryInterval(timedelta(minutes=m)) for m in values]


FAIL, DONE = ErrorAction.FAIL_PERMANENTLY, ErrorAction.DONE


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
