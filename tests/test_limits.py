"""The destination gate on its own: rates, connections at once, lines of
waiting messages and hop backoffs, with times given by the test (no clock,
no spool)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from spoold.limits import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    DestinationGate,
    DestinationLimits,
    Hold,
    Rate,
    parse_rate,
)

H1, H2 = "mx1.example:25", "mx2.example:25"


@pytest.mark.parametrize(
    ("text", "count", "per"),
    [
        ("50/s", 50, timedelta(seconds=1)),
        ("1000/h", 1000, timedelta(hours=1)),
        (" 3 / m ", 3, timedelta(minutes=1)),
        ("10/5m", 10, timedelta(minutes=5)),
        ("1/d", 1, timedelta(days=1)),
    ],
)
def test_parse_rate(text: str, count: int, per: timedelta) -> None:
    rate = parse_rate(text)
    assert rate == Rate(count, per)
    assert rate.spacing == per.total_seconds() / count
    assert str(rate) == text.strip()


def test_an_empty_rate_is_no_limit() -> None:
    assert parse_rate("") is None


@pytest.mark.parametrize("text", ["fast", "50", "50/", "0/s", "5/x", "-1/s", "5/0s", 50])
def test_parse_rate_refuses_with_the_expected_form(text: object) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def limited(max_connections: int = 10, rate: str = "") -> tuple[str, DestinationLimits]:
    return "d", DestinationLimits(max_connections, parse_rate(rate))


def test_a_rate_spaces_attempts_evenly() -> None:
    gate: DestinationGate[str] = DestinationGate()
    dest = limited(rate="2/s")
    assert gate.admit(dest, [H1], 100.0) is None
    hold = gate.admit(dest, [H1], 100.0)
    assert hold == Hold("d", None, "rate 2/s")
    gate.wait("d", "m2")
    gate.wait("d", "m3")
    assert gate.next_wake(100.0) == 100.5
    assert list(gate.ready(100.4)) == []
    assert list(gate.ready(100.5)) == [("d", "m2")]
    assert gate.next_wake(100.5) == 101.0
    # Late: one token only (depth one), never a burst to catch up.
    assert list(gate.ready(105.0)) == [("d", "m3")]
    assert gate.admit(dest, [H1], 105.0) == Hold("d", None, "rate 2/s")


def test_in_any_span_of_the_rate_at_most_count_start() -> None:
    gate: DestinationGate[int] = DestinationGate()
    dest = limited(rate="4/s")  # a spacing that floats hold exactly
    starts: list[float] = []
    for i in range(40):
        if gate.admit(dest, [], 0.0) is None:
            starts.append(0.0)
        else:
            gate.wait("d", i)
    t = 0.0
    while gate.waiting("d"):
        wake = gate.next_wake(t)
        assert wake is not None and wake > t
        t = wake
        starts += [t for _ in gate.ready(t)]
        for _ in range(len(starts)):
            gate.done("d")
    assert len(starts) == 40
    for first in starts:
        assert sum(1 for s in starts if first <= s < first + 1.0) <= 4
    assert starts == [i * 0.25 for i in range(40)]  # and the rate is used in full


def test_max_connections_holds_until_one_is_done() -> None:
    gate: DestinationGate[str] = DestinationGate()
    dest = limited(max_connections=2)
    assert gate.admit(dest, [H1], 0.0) is None
    assert gate.admit(dest, [H1], 0.0) is None
    assert gate.admit(dest, [H1], 0.0) == Hold("d", None, "2 connections at once")
    gate.wait("d", "m3")
    assert gate.next_wake(0.0) is None  # the clock cannot help: a connection must end
    assert list(gate.ready(50.0)) == []
    gate.done("d")
    assert list(gate.ready(50.0)) == [("d", "m3")]
    assert gate.running("d") == 2


def test_the_line_is_first_come_first_served() -> None:
    gate: DestinationGate[str] = DestinationGate()
    dest = limited(max_connections=1)
    assert gate.admit(dest, [H1], 0.0) is None
    gate.wait("d", "first")
    gate.done("d")
    # A connection is free, but someone waits already: a newcomer queues behind.
    assert gate.admit(dest, [H1], 0.0) == Hold("d", None, "behind others in the destination's line")
    gate.wait("d", "second")
    assert [item for _, item in gate.ready(0.0)] == ["first"]


def test_give_back_returns_the_connection_and_the_token() -> None:
    gate: DestinationGate[str] = DestinationGate()
    dest = limited(max_connections=1, rate="1/s")
    assert gate.admit(dest, [], 0.0) is None
    gate.wait("d", "stale")
    gate.wait("d", "live")
    gate.done("d")
    ((_, stale),) = gate.ready(1.0)
    assert stale == "stale"
    gate.give_back("d")
    assert list(gate.ready(1.0)) == [("d", "live")]


def test_new_limits_apply_to_those_waiting() -> None:
    gate: DestinationGate[str] = DestinationGate()
    assert gate.admit(limited(max_connections=1), [], 0.0) is None
    gate.wait("d", "m2")
    assert list(gate.heads()) == [("d", "m2")]
    gate.set_limits("d", DestinationLimits(max_connections=2))
    assert list(gate.ready(0.0)) == [("d", "m2")]


def test_no_destination_means_no_limits() -> None:
    gate: DestinationGate[str] = DestinationGate()
    assert all(gate.admit(None, [H1], 0.0) is None for _ in range(100))


def test_backoff_doubles_up_to_its_cap_and_an_answer_ends_it() -> None:
    gate: DestinationGate[str] = DestinationGate()
    first = BACKOFF_FIRST.total_seconds()
    b = gate.throttled(H1, 1000.0, "421 slow down")
    assert (b.until, b.window, b.reason) == (1000.0 + first, first, "421 slow down")
    assert gate.backoff(H1, 1000.0 + first - 1) is b
    assert gate.backoff(H1, 1000.0 + first) is None  # the window is over
    windows = [gate.throttled(H1, 2000.0, "421").window for _ in range(10)]
    assert windows[:3] == [2 * first, 4 * first, 8 * first]
    assert windows[-1] == BACKOFF_MAX.total_seconds()
    assert gate.answered(H1) is True
    assert gate.backoff(H1, 2000.0) is None
    assert gate.answered(H1) is False
    assert gate.throttled(H1, 3000.0, "421").window == first  # starts over


def test_a_message_waits_only_when_every_hop_is_backed_off() -> None:
    gate: DestinationGate[str] = DestinationGate()
    gate.throttled(H1, 0.0, "421")
    assert gate.admit(None, [H1, H2], 1.0) is None
    assert gate.order_hops([H1, H2], 1.0) == [H2, H1]
    gate.throttled(H2, 30.0, "421")
    hold = gate.admit(limited(), [H1, H2], 31.0)
    assert hold is not None and hold.until == 60.0 and hold.destination is None
    assert gate.running("d") == 0  # held: nothing taken
    assert gate.admit(limited(), [H1, H2], 60.0) is None
    assert gate.order_hops([H1, H2], 60.0) == [H1, H2]
