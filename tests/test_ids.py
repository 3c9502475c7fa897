"""Message ids: generation (safe, unique, time-ordered) and validation."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoold.errors import InvalidIdError, SpooldError
from spoold.ids import MAX_ID_LENGTH, is_valid_id, new_id, validate_id

ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Generated ids hold a 9-digit base-62 timestamp: 62**9 microseconds after 1970
# is about the year 2398, far beyond any real clock.
MAX_STAMP_US = 62**9 - 1
YEAR_2200_US = 7_258_118_400 * 1_000_000


# ------------------------------------------------------------- generation


def test_generated_ids_are_filename_safe() -> None:
    for _ in range(1_000):
        mid = new_id()
        assert ID_RE.fullmatch(mid), mid
        assert validate_id(mid) == mid


def test_generated_ids_are_unique() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)


def test_ids_generated_in_the_same_microsecond_are_unique() -> None:
    ids = [new_id(now_us=1_700_000_000_000_000) for _ in range(10_000)]
    assert len(set(ids)) == len(ids)


def test_ids_sort_as_strings_in_time_order() -> None:
    start = 1_700_000_000_000_000
    stamps = [start + step * 997 for step in range(2_000)]
    ids = [new_id(now_us=t) for t in stamps]
    assert sorted(ids) == ids


def test_the_first_id_of_a_process_has_its_whole_timestamp_even_before_1970() -> None:
    """The timestamp's first digits are cached from one id to the next: a
    process's very first id (here, of a time just before 1970: its prefix
    is a negative number) gets them computed, not an empty cache's."""
    first = subprocess.run(
        [sys.executable, "-c", "from spoold.ids import new_id; print(new_id(-1))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    new_id(0)  # another prefix cached here: -1's is computed afresh
    assert len(first) == len(new_id(0))
    assert first[:9] == new_id(-1)[:9]


def test_ids_sort_in_time_order_across_digit_boundaries() -> None:
    # Times whose base-62 forms differ in length without zero padding.
    stamps = [0, 1, 61, 62, 62**2 - 1, 62**2, 62**5, 10**15, YEAR_2200_US, MAX_STAMP_US]
    ids = [new_id(now_us=t) for t in stamps]
    assert sorted(ids) == ids
    assert {len(i) for i in ids} == {17}


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=MAX_STAMP_US),
    st.integers(min_value=0, max_value=MAX_STAMP_US),
)
def test_id_order_follows_time_order(t1: int, t2: int) -> None:
    a, b = new_id(now_us=t1), new_id(now_us=t2)
    assert ID_RE.fullmatch(a)
    assert ID_RE.fullmatch(b)
    if t1 < t2:
        assert a < b
    elif t1 > t2:
        assert a > b
    else:
        assert a[:9] == b[:9]


# ------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("../x", "only letters, digits"),
        ("a/b", "only letters, digits"),
        ("", "empty"),
        ("a\x00b", "only letters, digits"),
        ("a" * 65, "at most 64"),
        (".", "only letters, digits"),
        ("..", "only letters, digits"),
        (" x", "only letters, digits"),
        ("x ", "only letters, digits"),
        ("x\n", "only letters, digits"),
        ("abc\\def", "only letters, digits"),
        ("é", "only letters, digits"),
    ],
)
def test_validate_id_refuses_non_ids(value: str, fragment: str) -> None:
    with pytest.raises(InvalidIdError) as info:
        validate_id(value)
    message = str(info.value)
    assert "not a message id" in message
    assert fragment in message
    assert not is_valid_id(value)


def test_validate_id_names_the_length_of_a_long_id() -> None:
    with pytest.raises(InvalidIdError, match=r"65 characters, at most 64 allowed"):
        validate_id("a" * 65)


def test_validate_id_quotes_the_refused_value() -> None:
    with pytest.raises(InvalidIdError) as info:
        validate_id("../x")
    assert "'../x'" in str(info.value)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(None, "NoneType"), (5, "int"), (b"abc", "bytes"), (["abc"], "list")],
)
def test_validate_id_refuses_non_strings(value: object, type_name: str) -> None:
    with pytest.raises(InvalidIdError) as info:
        validate_id(value)
    assert "expected a string" in str(info.value)
    assert type_name in str(info.value)
    assert not is_valid_id(value)


def test_invalid_id_error_is_a_value_error_and_a_spoold_error() -> None:
    with pytest.raises(ValueError):
        validate_id("../x")
    with pytest.raises(SpooldError):
        validate_id("")


@pytest.mark.parametrize(
    "value",
    [
        "a",
        "0",
        "-",
        "_",
        "A" * MAX_ID_LENGTH,
        "aZ09_-" * 10 + "abcd",
        "0Ab3xYz9Q_-kLmNoP",
    ],
)
def test_validate_id_accepts_ids(value: str) -> None:
    assert validate_id(value) is value
    assert is_valid_id(value)


def test_max_id_length_is_64() -> None:
    assert MAX_ID_LENGTH == 64
    assert validate_id("x" * 64) == "x" * 64


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_validate_id_returns_its_argument_or_refuses(value: str) -> None:
    try:
        result = validate_id(value)
    except InvalidIdError:
        assert not ID_RE.fullmatch(value)
        return
    assert result == value
    assert ID_RE.fullmatch(result)
    assert "/" not in result
    assert "\x00" not in result
    assert ".." not in result


@settings(max_examples=200, deadline=None)
@given(st.from_regex(ID_RE, fullmatch=True))
def test_validate_id_accepts_every_id(value: str) -> None:
    assert validate_id(value) == value


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9_-]{0,30}", fullmatch=True),
    st.sampled_from(["/", "\\", "\x00", ".", " ", "\n", ":", "é", "\u2028"]),
    st.from_regex(r"[A-Za-z0-9_-]{0,30}", fullmatch=True),
)
def test_validate_id_refuses_any_unsafe_character(prefix: str, bad: str, suffix: str) -> None:
    with pytest.raises(InvalidIdError):
        validate_id(prefix + bad + suffix)
