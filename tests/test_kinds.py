"""The closed sets of spoold.kinds: one outcome kind for events, ``wait``
and the history journal, each spelled on the wire exactly as before.

What is pinned here is what a reader of the wire sees: the ``event`` names
of the event stream (a bounce there is ``removed`` with detail
``bounced``), the ``outcome`` of a ``wait`` reply, and the ``outcome`` of a
journal line, including lines written before the kinds were one set.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from spoold import EventKind, FinalOutcome, OutcomeKind
from spoold.daemon.control import outcome_view
from spoold.events import EVENT_KINDS, SpoolEvent, stream_form
from spoold.history import History, Outcome, RecipientReply, RecipientState, read_history
from spoold.kinds import FINAL_OUTCOMES
from spoold.message import EnvelopeInfo
from spoold.waiting import MessageOutcome

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
INFO = EnvelopeInfo(sender="app@example.org", recipients=["ops@example.com"])

# The wire's names, as docs/control-protocol.md lists them.
STREAM_EVENTS = {
    "spooled",
    "presend",
    "delivered",
    "delayed",
    "delayed_rate_limited",
    "frozen",
    "removed",
    "unfrozen",
    "recovered",
    "quarantined",
    "rerouted",
    "throttled",
    "ping",
    "overflow",
}
OUTCOMES = {"delivered", "frozen", "removed", "quarantined", "bounced"}
FINAL = {"delivered", "bounced", "removed"}


def test_the_sets_are_the_documented_ones() -> None:
    assert {k.value for k in OutcomeKind} == OUTCOMES
    assert {k.value for k in FINAL_OUTCOMES} == FINAL
    assert {k.value for k in EventKind} == STREAM_EVENTS | OUTCOMES
    assert {str(k) for k in EVENT_KINDS} == STREAM_EVENTS


def test_every_outcome_is_an_event_of_its_own_name() -> None:
    for kind in OutcomeKind:
        assert EventKind(kind.value).outcome is kind
    assert EventKind.RECOVERED.outcome is OutcomeKind.FROZEN  # back to frozen
    steps = set(EventKind) - {EventKind(k.value) for k in OutcomeKind} - {EventKind.RECOVERED}
    assert steps and all(step.outcome is None for step in steps)


def test_the_old_name_of_the_final_outcomes_still_names_them() -> None:
    assert FinalOutcome.DELIVERED is OutcomeKind.DELIVERED
    assert FinalOutcome("bounced") is OutcomeKind.BOUNCED


@pytest.mark.parametrize("kind", sorted(EventKind))
def test_every_event_kind_has_its_wire_form(kind: EventKind) -> None:
    shown, detail = stream_form(kind, None)
    wire = SpoolEvent(T0, shown, "msg1", INFO, detail).to_dict()
    if kind is EventKind.BOUNCED:  # as before bounces were a kind of their own
        assert (wire["event"], wire["detail"]) == ("removed", "bounced")
    else:
        assert wire["event"] == kind.value and "detail" not in wire
    assert wire["event"] in STREAM_EVENTS


def test_a_detail_passes_through_except_for_a_bounce() -> None:
    assert stream_form(EventKind.QUARANTINED, "unreadable") == (
        EventKind.QUARANTINED,
        "unreadable",
    )
    assert stream_form(EventKind.BOUNCED, None) == (EventKind.REMOVED, "bounced")


@pytest.mark.parametrize("kind", sorted(OutcomeKind))
def test_every_outcome_kind_round_trips_through_a_wait_reply(kind: OutcomeKind) -> None:
    view = outcome_view(MessageOutcome("msg1", kind, T0, INFO))
    assert view["outcome"] == kind.value
    assert OutcomeKind(json.loads(json.dumps(view))["outcome"]) is kind


def _outcome(kind: OutcomeKind, message_id: str) -> Outcome:
    return Outcome(
        id=message_id,
        outcome=kind,
        time=T0,
        spool_date=T0 - timedelta(minutes=5),
        sender="app@example.org",
        recipients=[RecipientReply(recipient="ops@example.com", state=RecipientState.DELIVERED)],
    )


async def test_every_final_outcome_round_trips_through_the_journal(tmp_path: Path) -> None:
    history = History(tmp_path)
    kinds = sorted(FINAL_OUTCOMES)
    for n, kind in enumerate(kinds):
        history.append(_outcome(kind, f"msg{n}"))
    await history.flush()
    lines = (tmp_path / "history" / "2026-11-25.jsonl").read_text().splitlines()
    assert [json.loads(line)["outcome"] for line in lines] == [k.value for k in kinds]
    found = await read_history(tmp_path)
    assert [(o.id, o.outcome) for o in found] == [(f"msg{n}", k) for n, k in enumerate(kinds)]
    assert all(type(o.outcome) is OutcomeKind for o in found)


@pytest.mark.parametrize("kind", sorted(set(OutcomeKind) - FINAL_OUTCOMES))
def test_an_outcome_that_is_not_final_is_never_journalled(kind: OutcomeKind) -> None:
    with pytest.raises(ValueError, match="not a final outcome"):
        _outcome(kind, "msg1")


async def test_journal_lines_written_before_still_read(tmp_path: Path) -> None:
    # Lines as an older spoold wrote them (no in_doubt, no submitter_uid),
    # one of each final outcome, and one that was never valid (skipped).
    (tmp_path / "history").mkdir()
    line = (
        '{"id":"%s","outcome":"%s","time":"2026-11-25T12:31:02.5Z",'
        '"spool_date":"2026-11-25T12:30:58.125093Z","sender":"app@example.org",'
        '"recipients":[{"recipient":"ops@example.com","state":"failed","code":550,'
        '"enhanced_status":"5.1.1","text":"no such user"}],"hop":"smtp.example.net:587",'
        '"parent_id":"","flows":[],"idempotency_key":null,"detail":"bounced"}\n'
    )
    names = ["delivered", "bounced", "removed", "frozen"]
    (tmp_path / "history" / "2026-11-25.jsonl").write_text(
        "".join(line % (f"old{n}", name) for n, name in enumerate(names))
    )
    found = await read_history(tmp_path)
    assert [(o.id, o.outcome) for o in found] == [
        ("old0", OutcomeKind.DELIVERED),
        ("old1", OutcomeKind.BOUNCED),
        ("old2", OutcomeKind.REMOVED),
    ]
