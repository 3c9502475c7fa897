"""The metadata record: codec (round trips, on-disk format, errors), queues,
derived values and construction from a routed batch."""

from __future__ import annotations

import gc
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoold.body import Body
from spoold.errors import InvalidIdError, RecordError
from spoold.ids import new_id
from spoold.message import (
    RECORD_VERSION,
    SEND_NOW,
    Delivered,
    EnvelopeInfo,
    Frozen,
    Message,
    Quarantined,
    Queue,
    RelayAttempt,
    Removed,
    RetryInterval,
    RoutedBatch,
    RoutedEnvelope,
    SendAt,
    Sending,
    SendNow,
    Status,
    decode_record,
    encode_record,
    gc_paused,
    of_envelope_batch,
    queue_of,
)

FIXTURE = Path(__file__).parent / "fixtures" / "record_v1.json"
FIXTURE_V2 = Path(__file__).parent / "fixtures" / "record_v2.json"
T0 = datetime(2024, 3, 5, 6, 7, 8, 123456, tzinfo=UTC)

ALL_STATUSES: list[Status] = [
    SendNow(),
    SendAt(at=T0),
    Sending(),
    Frozen(),
    Removed(),
    Quarantined(reason="corrupt record: bad JSON"),
    Delivered(),
]


def make_message(mid: str = "msg-1", **overrides: Any) -> Message:
    fields: dict[str, Any] = {
        "id": mid,
        "parent_id": "parent-" + mid,
        "spool_date": T0,
        "next_hop_choices": ["127.0.0.1:25"],
        "remaining_recipients": ["rcpt@example.com"],
        "envelope_info": EnvelopeInfo(sender="sender@example.org", recipients=["rcpt@example.com"]),
    }
    fields.update(overrides)
    return Message(**fields)


def fixture_dict() -> dict[str, Any]:
    data = json.loads(FIXTURE.read_bytes())
    assert isinstance(data, dict)
    return data


def dumps(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode() + b"\n"


# --------------------------------------------------------------- strategies

aware_times = st.datetimes(
    min_value=datetime(1970, 1, 1),
    max_value=datetime(2200, 12, 31, 23, 59, 59, 999999),
    timezones=st.just(UTC),
)
ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
texts = st.text(max_size=20)
recipients = st.lists(
    st.sampled_from(["a@example.com", "ünï@exämple.org", "用户@例子.广告", '"q t"@x']) | texts,
    max_size=5,
)
statuses: st.SearchStrategy[Status] = st.one_of(
    st.just(SendNow()),
    st.builds(SendAt, at=aware_times),
    st.just(Sending()),
    st.just(Frozen()),
    st.just(Removed()),
    st.builds(Quarantined, reason=st.text()),
    st.just(Delivered()),
)
_nonneg = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=3650))
retry_intervals = st.builds(RetryInterval, span=_nonneg, jitter=st.none() | _nonneg)
relay_attempts = st.builds(RelayAttempt, time=aware_times, error=st.text(max_size=60))
envelopes = st.builds(
    EnvelopeInfo,
    sender=st.just("") | texts,
    recipients=recipients,
    mail_params=st.lists(st.sampled_from(["BODY=8BITMIME", "SMTPUTF8", "SIZE=10"]) | texts),
    envelope_id=texts,
)
messages = st.builds(
    Message,
    id=ids,
    parent_id=ids | texts,
    related_ids=st.lists(ids, max_size=4),
    flows=st.lists(texts, max_size=3),
    spool_date=aware_times,
    next_hop_choices=st.lists(st.sampled_from(["mx.example.net:25", "[::1]:587"]) | texts),
    retry_intervals=st.lists(retry_intervals, max_size=4),
    remaining_recipients=recipients,
    failed_recipients=recipients,
    relay_attempts=st.lists(relay_attempts, max_size=4),
    status=statuses,
    envelope_info=envelopes,
)


# ------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None)
@given(messages)
def test_record_round_trips(message: Message) -> None:
    data = encode_record(message)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    decoded = decode_record(data, expected_id=message.id)
    assert decoded == message
    assert type(decoded.status) is type(message.status)
    assert encode_record(decoded) == data
    assert json.loads(data)["version"] == RECORD_VERSION


@pytest.mark.parametrize("status", ALL_STATUSES, ids=lambda s: s.name)
def test_every_status_round_trips_with_its_kind(status: Status) -> None:
    message = make_message(status=status)
    data = encode_record(message)
    assert json.loads(data)["status"]["kind"] == status.name
    decoded = decode_record(data)
    assert decoded.status == status
    assert type(decoded.status) is type(status)


def test_null_sender_round_trips() -> None:
    message = make_message(envelope_info=EnvelopeInfo(sender="", recipients=["a@b"]))
    assert decode_record(encode_record(message)).envelope_info.sender == ""


def test_copy_is_deep() -> None:
    message = make_message(relay_attempts=[RelayAttempt(time=T0, error="e")])
    clone = message.copy()
    assert clone == message
    clone.remaining_recipients.append("other@example.com")
    clone.status = Frozen()
    assert message.remaining_recipients == ["rcpt@example.com"]
    assert message.status == SEND_NOW


def test_times_with_another_offset_decode_to_the_same_instant() -> None:
    record = fixture_dict()
    record["spool_date"] = "2024-03-05T08:07:08.123456+02:00"
    message = decode_record(dumps(record))
    assert message.spool_date == T0
    assert message.spool_date.utcoffset() == timedelta(hours=2)


# ---------------------------------------------------- the on-disk format


def test_fixture_is_one_json_line() -> None:
    data = FIXTURE.read_bytes()
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1


def test_version_1_fixture_decodes_to_every_field() -> None:
    message = decode_record(FIXTURE.read_bytes(), expected_id="0Ab3xYz9Q_-kLmNoP")

    assert message.id == "0Ab3xYz9Q_-kLmNoP"
    assert message.parent_id == "0Ab3xYz9P-parent1"
    assert message.related_ids == ["0Ab3xYz9R_sibling", "0Ab3xYz9S_sibling"]
    assert message.flows == ["flow-1", "flow-2"]
    assert message.spool_date == datetime(2024, 3, 5, 6, 7, 8, 123456, tzinfo=UTC)
    assert message.spool_date.utcoffset() == timedelta(0)
    assert message.next_hop_choices == ["mx1.example.net:25", "[2001:db8::1]:587"]
    assert message.retry_intervals == [
        RetryInterval(span=timedelta(minutes=5), jitter=timedelta(seconds=30)),
        RetryInterval(span=timedelta(hours=1), jitter=None),
    ]
    assert message.remaining_recipients == ["alice@example.com", "ünïcode@exämple.org"]
    assert message.failed_recipients == ["bob@example.com"]
    assert message.relay_attempts == [
        RelayAttempt(
            time=datetime(2024, 3, 5, 7, 0, 0, 500000, tzinfo=UTC),
            error="451 4.3.0 try again later",
        ),
        RelayAttempt(time=datetime(2024, 3, 5, 6, 30, tzinfo=UTC), error="connection refused"),
    ]
    assert message.status == SendAt(at=datetime(2024, 3, 5, 8, 0, tzinfo=UTC))
    assert isinstance(message.status, SendAt)
    assert message.envelope_info == EnvelopeInfo(
        sender="sender@example.org",
        recipients=["alice@example.com", "bob@example.com", "ünïcode@exämple.org"],
        mail_params=["BODY=8BITMIME", "SMTPUTF8"],
        envelope_id="env-42",
    )
    assert message.queue is Queue.ACTIVE
    assert message.last_relay_attempt == message.relay_attempts[0]
    assert message.route is None  # version 1 did not know its route


# Fields added at the end of version 2 with a default: an older spoold ignores
# them without harm, so they need no new version (docs/on-disk-format.md).
NEW_FIELDS = {
    "in_doubt": False,
    "delay_warned_at": None,
    "removed_at": None,
    "idempotency_key": None,
    "rerouted_to": {},
    "submitter_uid": None,
    "body_sha256": None,
}


def test_version_1_fixture_upgrades_to_version_2() -> None:
    data = FIXTURE.read_bytes()
    again = json.loads(encode_record(decode_record(data)))
    assert again == {
        **json.loads(data),
        "version": 2,
        "route": None,
        "size": None,
        **NEW_FIELDS,
    }


def test_version_2_fixture_is_version_1_plus_the_route() -> None:
    v1 = decode_record(FIXTURE.read_bytes())
    v2 = decode_record(FIXTURE_V2.read_bytes())
    assert (v2.route, v2.size) == ("partners", 4398)
    v1.route, v1.size = "partners", 4398
    assert v2 == v1


def test_version_2_fixture_re_encodes_to_the_same_json() -> None:
    data = FIXTURE_V2.read_bytes()
    assert json.loads(encode_record(decode_record(data))) == {**json.loads(data), **NEW_FIELDS}


def test_version_2_fields_are_exactly_the_record_fields() -> None:
    # A field added or renamed without a new schema version shows up here.
    assert set(json.loads(FIXTURE_V2.read_bytes())) | set(NEW_FIELDS) == {
        "version",
        *(f for f in Message.__struct_fields__ if f != "_spool_dir"),  # never stored
    }
    assert RECORD_VERSION == 2


def test_a_field_added_later_is_dropped_by_a_reader_that_predates_it() -> None:
    # What a spoold of this version does with a record written by a newer
    # one that added a field at the end: reads it, keeps everything else.
    record = json.loads(FIXTURE_V2.read_bytes())
    newer = json.dumps({**record, "added_by_a_newer_spoold": {"x": 1}}).encode()
    assert decode_record(newer) == decode_record(FIXTURE_V2.read_bytes())


# -------------------------------------------------------------- bad records


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\xff\xfe garbage",
        b"not json at all",
        b'{"version":1',
        b"[1, 2, 3]",
        b"null",
        b'"a string"',
    ],
)
def test_garbage_is_a_record_error(data: bytes) -> None:
    with pytest.raises(RecordError, match="corrupt record"):
        decode_record(data)


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b'{"version": 99}', "99"),
        (b'{"version": 0}', "0"),
        (b'{"version": "1"}', "'1'"),
        (b"{}", "None"),
    ],
)
def test_unknown_version_is_a_record_error(data: bytes, shown: str) -> None:
    with pytest.raises(RecordError) as info:
        decode_record(data)
    assert f"unknown record version {shown}" in str(info.value)


def test_a_future_version_of_a_whole_record_is_refused() -> None:
    record = fixture_dict()
    record["version"] = 99
    with pytest.raises(RecordError, match="unknown record version 99"):
        decode_record(dumps(record))


@pytest.mark.parametrize(
    "missing",
    ["id", "parent_id", "spool_date", "next_hop_choices", "remaining_recipients", "envelope_info"],
)
def test_record_missing_a_required_field_is_a_record_error(missing: str) -> None:
    record = fixture_dict()
    del record[missing]
    with pytest.raises(RecordError) as info:
        decode_record(dumps(record))
    assert "invalid version 1 record" in str(info.value)
    assert missing in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", 5),
        ("spool_date", "yesterday"),
        ("status", {"kind": "exploded"}),
        ("status", {"kind": "send_at"}),
        ("retry_intervals", [{"span": "five minutes"}]),
        ("relay_attempts", [{"time": "2024-03-05T06:30:00Z"}]),
    ],
)
def test_record_with_a_bad_field_is_a_record_error(field: str, value: object) -> None:
    record = fixture_dict()
    record[field] = value
    with pytest.raises(RecordError, match="invalid version 1 record"):
        decode_record(dumps(record))


def test_optional_fields_take_their_defaults() -> None:
    record = fixture_dict()
    for name in [
        "related_ids",
        "flows",
        "retry_intervals",
        "failed_recipients",
        "relay_attempts",
        "status",
    ]:
        del record[name]
    message = decode_record(dumps(record))
    assert message.related_ids == []
    assert message.flows == []
    assert message.retry_intervals == []
    assert message.failed_recipients == []
    assert message.relay_attempts == []
    assert message.status == SendNow()


@pytest.mark.parametrize("bad_id", ["../x", "a/b", "", "..", "a" * 65, "a\x00b"])
def test_record_with_a_bad_id_is_a_record_error(bad_id: str) -> None:
    record = fixture_dict()
    record["id"] = bad_id
    with pytest.raises(RecordError, match="bad id"):
        decode_record(dumps(record))


def test_record_stored_under_another_id_is_a_record_error() -> None:
    with pytest.raises(RecordError) as info:
        decode_record(FIXTURE.read_bytes(), expected_id="someone-else")
    assert "0Ab3xYz9Q_-kLmNoP" in str(info.value)
    assert "someone-else" in str(info.value)


def test_expected_id_that_matches_is_accepted() -> None:
    message = decode_record(FIXTURE.read_bytes(), expected_id="0Ab3xYz9Q_-kLmNoP")
    assert message.id == "0Ab3xYz9Q_-kLmNoP"


def _naive_spool_date(record: dict[str, Any]) -> None:
    record["spool_date"] = "2024-03-05T06:07:08"


def _naive_relay_attempt(record: dict[str, Any]) -> None:
    record["relay_attempts"][1]["time"] = "2024-03-05T06:30:00"


def _naive_send_at(record: dict[str, Any]) -> None:
    record["status"] = {"kind": "send_at", "at": "2024-03-05T08:00:00"}


@pytest.mark.parametrize(
    "make_naive",
    [_naive_spool_date, _naive_relay_attempt, _naive_send_at],
    ids=["spool_date", "relay_attempt", "send_at"],
)
def test_naive_datetime_is_a_record_error(make_naive: Any) -> None:
    record = fixture_dict()
    make_naive(record)
    with pytest.raises(RecordError, match="time zone"):
        decode_record(dumps(record))


def test_record_read_from_disk_cannot_crash_effective_status() -> None:
    record = fixture_dict()
    _naive_send_at(record)
    try:
        message = decode_record(dumps(record))
    except RecordError:
        return  # refused at the door: the right outcome
    # Accepted: then the scheduler's comparison must still work.
    assert message.effective_status(datetime(2030, 1, 1, tzinfo=UTC)) == SendNow()


def test_record_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        decode_record(b"garbage")


# ------------------------------------------------------------------ queues


@pytest.mark.parametrize(
    ("status", "queue"),
    [
        (SendNow(), Queue.ACTIVE),
        (SendAt(at=T0), Queue.ACTIVE),
        (Sending(), Queue.ACTIVE),
        (Frozen(), Queue.FROZEN),
        (Removed(), Queue.REMOVED),
        (Quarantined(reason="r"), Queue.QUARANTINE),
        (Delivered(), None),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_queue_of_every_status(status: Status, queue: Queue | None) -> None:
    assert queue_of(status) is queue
    assert make_message(status=status).queue is queue


def test_queue_names_are_the_directory_names() -> None:
    assert [q.value for q in Queue] == ["active", "frozen", "removed", "quarantine"]


# ------------------------------------------------------------ derived values


def test_past_send_at_reads_as_send_now() -> None:
    message = make_message(status=SendAt(at=T0))
    assert message.effective_status(T0 + timedelta(seconds=1)) == SendNow()
    assert message.status == SendAt(at=T0)  # the record itself is unchanged


def test_future_send_at_reads_as_itself() -> None:
    message = make_message(status=SendAt(at=T0))
    assert message.effective_status(T0 - timedelta(microseconds=1)) == SendAt(at=T0)


def test_effective_status_defaults_to_the_current_time() -> None:
    past = make_message(status=SendAt(at=datetime(2000, 1, 1, tzinfo=UTC)))
    future = make_message(status=SendAt(at=datetime(2200, 1, 1, tzinfo=UTC)))
    assert past.effective_status() == SendNow()
    assert future.effective_status() == SendAt(at=datetime(2200, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    "status", [s for s in ALL_STATUSES if not isinstance(s, SendAt)], ids=lambda s: s.name
)
def test_other_statuses_read_as_themselves(status: Status) -> None:
    assert make_message(status=status).effective_status(T0 + timedelta(days=1)) == status


def test_time_on_spool() -> None:
    message = make_message(spool_date=T0)
    assert message.time_on_spool(T0 + timedelta(hours=2, seconds=3)) == timedelta(
        hours=2, seconds=3
    )
    assert message.time_on_spool(T0) == timedelta(0)


def test_time_on_spool_defaults_to_the_current_time() -> None:
    before = datetime.now(UTC)
    message = make_message(spool_date=before - timedelta(hours=1))
    on_spool = message.time_on_spool()
    assert timedelta(hours=1) <= on_spool <= datetime.now(UTC) - before + timedelta(hours=1)


def test_last_relay_attempt_is_the_newest() -> None:
    message = make_message()
    assert message.last_relay_attempt is None
    first = RelayAttempt(time=T0, error="first")
    second = RelayAttempt(time=T0 + timedelta(minutes=1), error="second")
    message.add_relay_attempt(first)
    assert message.last_relay_attempt == first
    message.add_relay_attempt(second)
    assert message.last_relay_attempt == second
    assert message.relay_attempts == [second, first]


def test_add_retry_intervals_puts_them_at_the_head() -> None:
    old = RetryInterval(span=timedelta(hours=1))
    a = RetryInterval(span=timedelta(minutes=1), jitter=timedelta(seconds=5))
    b = RetryInterval(span=timedelta(minutes=2))
    message = make_message(retry_intervals=[old])
    message.add_retry_intervals([a, b])
    assert message.retry_intervals == [a, b, old]
    message.add_retry_intervals([])
    assert message.retry_intervals == [a, b, old]


def test_move_failed_to_remaining() -> None:
    message = make_message(remaining_recipients=["x", "y"], failed_recipients=["y", "z"])
    message.move_failed_to_remaining()
    assert message.remaining_recipients == ["x", "y", "z"]
    assert message.failed_recipients == []


def test_move_failed_to_remaining_does_not_duplicate_a_repeated_failure() -> None:
    message = make_message(remaining_recipients=["a"], failed_recipients=["b", "b"])
    message.move_failed_to_remaining()
    assert message.remaining_recipients == ["a", "b"]
    assert message.failed_recipients == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from("abcdef"), max_size=6, unique=True),
    st.lists(st.sampled_from("abcdef"), max_size=6, unique=True),
)
def test_move_failed_to_remaining_adds_each_new_recipient_once(
    remaining: list[str], failed: list[str]
) -> None:
    message = make_message(remaining_recipients=list(remaining), failed_recipients=list(failed))
    message.move_failed_to_remaining()
    new = [r for r in dict.fromkeys(failed) if r not in remaining]
    assert message.remaining_recipients == remaining + new
    assert len(set(message.remaining_recipients)) == len(message.remaining_recipients)
    assert message.failed_recipients == []


# ----------------------------------------------------------- retry intervals

spans = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=30))


@settings(max_examples=200, deadline=None)
@given(spans, st.none() | spans, st.integers(min_value=0, max_value=2**32))
def test_draw_stays_within_span_plus_or_minus_jitter(
    span: timedelta, jitter: timedelta | None, seed: int
) -> None:
    interval = RetryInterval(span=span, jitter=jitter)
    drawn = interval.draw(random.Random(seed))
    assert drawn >= timedelta(0)
    if not jitter:
        assert drawn == span
    else:
        assert max(timedelta(0), span - jitter) <= drawn <= span + jitter
    assert interval.draw(random.Random(seed)) == drawn  # same seed, same draw


def test_draw_varies_with_jitter() -> None:
    interval = RetryInterval(span=timedelta(minutes=10), jitter=timedelta(minutes=1))
    rng = random.Random(1234)
    draws = [interval.draw(rng) for _ in range(200)]
    assert len(set(draws)) > 100
    assert min(draws) < timedelta(minutes=9, seconds=30)
    assert max(draws) > timedelta(minutes=10, seconds=30)


def test_draw_never_goes_below_zero() -> None:
    interval = RetryInterval(span=timedelta(seconds=1), jitter=timedelta(hours=1))
    rng = random.Random(7)
    draws = [interval.draw(rng) for _ in range(200)]
    assert min(draws) == timedelta(0)
    assert all(d <= timedelta(hours=1, seconds=1) for d in draws)


def test_draw_without_a_random_generator() -> None:
    interval = RetryInterval(span=timedelta(minutes=5), jitter=timedelta(seconds=30))
    drawn = interval.draw()
    assert timedelta(minutes=4, seconds=30) <= drawn <= timedelta(minutes=5, seconds=30)


# ----------------------------------------------------------------- ordering


@settings(max_examples=200, deadline=None)
@given(st.lists(ids, unique=True, max_size=10), st.randoms(use_true_random=False))
def test_messages_order_by_id(message_ids: list[str], rng: random.Random) -> None:
    shuffled = list(message_ids)
    rng.shuffle(shuffled)
    ordered = sorted(make_message(mid) for mid in shuffled)
    assert [m.id for m in ordered] == sorted(message_ids)


def test_messages_with_generated_ids_order_by_time_of_spooling() -> None:
    start = 1_700_000_000_000_000
    msgs = [make_message(new_id(now_us=start + i * 1_000)) for i in range(50)]
    shuffled = list(reversed(msgs))
    assert sorted(shuffled) == msgs
    assert msgs[0] < msgs[1]
    assert not msgs[1] < msgs[0]


# ---------------------------------------------------------- routed batches


def test_of_envelope_batch_makes_one_message_per_envelope() -> None:
    body = Body.from_content(b"Subject: hi\r\n\r\nhello\r\n")
    interval = RetryInterval(span=timedelta(minutes=1), jitter=timedelta(seconds=6))
    envelopes = [
        RoutedEnvelope(
            sender="",
            recipients=["a@one.example"],
            next_hop_choices=["one.example:25"],
            retry_intervals=[interval],
            mail_params=["SMTPUTF8"],
            envelope_id="env-a",
        ),
        RoutedEnvelope(
            sender="s@example.org",
            recipients=["b@two.example", "c@two.example"],
            next_hop_choices=["two.example:25", "backup.example:25"],
        ),
        RoutedEnvelope(
            sender="s@example.org",
            recipients=["d@three.example"],
            next_hop_choices=["three.example:587"],
        ),
    ]
    batch = RoutedBatch(envelopes=envelopes, body=body)
    generated = iter(["id-1", "id-2", "id-3"])
    attempt = RelayAttempt(time=T0, error="earlier failure")

    out = of_envelope_batch(
        batch,
        gen_id=lambda: next(generated),
        spool_date=T0,
        parent_id="parent-0",
        status=Frozen(),
        flows=["flow-x"],
        failed_recipients=["gone@example.com"],
        relay_attempts=[attempt],
    )

    assert len(out) == 3
    msgs = [m for m, _ in out]
    assert [m.id for m in msgs] == ["id-1", "id-2", "id-3"]
    assert all(b is body for _, b in out)
    assert {m.parent_id for m in msgs} == {"parent-0"}
    assert msgs[0].related_ids == ["id-2", "id-3"]
    assert msgs[1].related_ids == ["id-1", "id-3"]
    assert msgs[2].related_ids == ["id-1", "id-2"]
    for message, envelope in zip(msgs, envelopes, strict=True):
        assert message.spool_date == T0
        assert message.status == Frozen()
        assert message.flows == ["flow-x"]
        assert message.failed_recipients == ["gone@example.com"]
        assert message.relay_attempts == [attempt]
        assert message.next_hop_choices == list(envelope.next_hop_choices)
        assert message.retry_intervals == list(envelope.retry_intervals)
        assert message.remaining_recipients == list(envelope.recipients)
        assert message.envelope_info == EnvelopeInfo(
            sender=envelope.sender,
            recipients=list(envelope.recipients),
            mail_params=list(envelope.mail_params),
            envelope_id=envelope.envelope_id,
        )
        # Every message is a valid record on its own.
        assert decode_record(encode_record(message), expected_id=message.id) == message
    assert msgs[0].envelope_info.sender == ""
    # The messages do not share mutable lists.
    msgs[0].flows.append("more")
    msgs[0].relay_attempts.clear()
    assert msgs[1].flows == ["flow-x"]
    assert msgs[1].relay_attempts == [attempt]


def test_of_envelope_batch_defaults() -> None:
    body = Body.from_content(b"x\r\n")
    batch = RoutedBatch(
        envelopes=[RoutedEnvelope(sender="s@x", recipients=["r@y"], next_hop_choices=["y:25"])],
        body=body,
    )
    [(message, out_body)] = of_envelope_batch(
        batch, gen_id=lambda: "only-one", spool_date=T0, parent_id="p"
    )
    assert out_body is body
    assert message.id == "only-one"
    assert message.related_ids == []
    assert message.status == SendNow()
    assert message.failed_recipients == []
    assert message.relay_attempts == []
    assert message.flows == []


def test_of_envelope_batch_refuses_a_bad_generated_id() -> None:
    batch = RoutedBatch(
        envelopes=[RoutedEnvelope(sender="s@x", recipients=["r@y"], next_hop_choices=["y:25"])],
        body=Body.from_content(b"x\r\n"),
    )
    with pytest.raises(InvalidIdError):
        of_envelope_batch(batch, gen_id=lambda: "../escape", spool_date=T0, parent_id="p")


def test_of_envelope_batch_with_generated_ids_gives_unique_related_ids() -> None:
    batch = RoutedBatch(
        envelopes=[
            RoutedEnvelope(sender="s@x", recipients=[f"r{i}@y"], next_hop_choices=["y:25"])
            for i in range(5)
        ],
        body=Body.from_content(b"x\r\n"),
    )
    out = of_envelope_batch(batch, gen_id=new_id, spool_date=T0, parent_id="p")
    all_ids = {m.id for m, _ in out}
    assert len(all_ids) == 5
    for message, _ in out:
        assert set(message.related_ids) == all_ids - {message.id}


def test_explicit_zero_offset_reads_as_utc() -> None:
    record = fixture_dict()
    record["spool_date"] = "2024-03-05T06:07:08.123456+00:00"
    message = decode_record(dumps(record))
    assert message.spool_date == T0
    assert message.spool_date.utcoffset() == timedelta(0)


def test_negative_retry_interval_is_a_record_error() -> None:
    msg = Message(
        id="neg",
        parent_id="p",
        spool_date=datetime(2026, 1, 1, tzinfo=UTC),
        next_hop_choices=["127.0.0.1:25"],
        retry_intervals=[RetryInterval(span=timedelta(seconds=-5))],
        remaining_recipients=["a@example.com"],
        envelope_info=EnvelopeInfo(sender="", recipients=["a@example.com"]),
    )
    with pytest.raises(RecordError, match="negative retry interval"):
        decode_record(encode_record(msg))


@pytest.mark.parametrize("enabled_before", [True, False])
def test_gc_paused_is_counted_across_users(enabled_before: bool) -> None:
    """Several threads (the load's readers and the event loop) pause the
    collector at once, leaving in any order: it stays off while any of them
    is in, and is back as it was when the last one leaves (never left off
    for the daemon's life)."""
    was = gc.isenabled()
    (gc.enable if enabled_before else gc.disable)()
    try:
        first, second = gc_paused(), gc_paused()
        first.__enter__()
        second.__enter__()
        assert not gc.isenabled()
        first.__exit__(None, None, None)  # the first to come leaves first
        assert not gc.isenabled()
        second.__exit__(None, None, None)
        assert gc.isenabled() is enabled_before
        with gc_paused():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled_before
    finally:
        (gc.enable if was else gc.disable)()
