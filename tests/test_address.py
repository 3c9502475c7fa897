"""The address validator: what every way in accepts and refuses."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

import spoold.address
from spoold.address import validate_address, validate_recipients
from spoold.errors import AddressError, SpooldError

GOOD = [
    "a@example.com",
    "user+tag@sub.example.co.uk",
    "first.last@example.org",
    "!#$%&'*+-/=?^_`{|}~@example.com",
    '"a b"@example.com',
    '"quoted\\"quote"@example.com',
    "x@[192.0.2.1]",
    "x@[IPv6:2001:db8::1]",
    "postmaster@localhost",
    "a@b",
    "1@2.3",
    "a" * 64 + "@example.com",
]

BAD = [
    # (address, kind, words the error names)
    ("a b@example.com", "syntax", "' ' is not allowed"),
    ("not an address", "syntax", "expected local-part@domain"),
    ("bad@@example.com", "syntax", "more than one '@'"),
    ("root", "syntax", "expected local-part@domain"),
    ("@example.com", "syntax", "no local part"),
    ("a@", "syntax", "no domain"),
    ("a.@example.com", "syntax", "empty part between dots"),
    (".a@example.com", "syntax", "empty part between dots"),
    ("a..b@example.com", "syntax", "empty part between dots"),
    ("a@b..com", "syntax", "empty label"),
    ("a@example.com.", "syntax", "empty label"),
    ("a@-b.com", "syntax", "not a valid domain label"),
    ("a@b_c.com", "syntax", "not a valid domain label"),
    ("a@[300.1.1.1]", "syntax", "not an address literal"),
    ("a@[IPv6:zz::1]", "syntax", "not an IPv6 address"),
    ("a@[1.2.3.4", "syntax", "unterminated"),
    ('"unterminated@example.com', "syntax", "quoted local part is malformed"),
    ("<a@example.com>", "syntax", "not allowed in a local part"),
    ("a\x00b@example.com", "control", "control character"),
    ("bad\r\nDATA@example.com", "control", "control character"),
    ("tab\there@example.com", "control", "control character"),
    ("del\x7f@example.com", "control", "control character"),
    ("c1\x85@example.com", "control", "control character"),
    ("a" * 65 + "@example.com", "too_long", "local part of 65 octets"),
    ("a@" + "b" * 64 + ".com", "too_long", "label of 64 octets"),
    ("a@" + ".".join(["b" * 60] * 5), "too_long", "at most 254"),
    ("\udcff\udcfe@example.com", "non_ascii", "not valid UTF-8"),
]


@pytest.mark.parametrize("address", GOOD)
def test_good_addresses_are_returned_unchanged(address: str) -> None:
    assert validate_address(address) == address
    assert validate_address(address, role="sender") == address


@pytest.mark.parametrize(("address", "kind", "words"), BAD)
def test_bad_addresses_are_refused_with_a_reason(address: str, kind: str, words: str) -> None:
    with pytest.raises(AddressError) as info:
        validate_address(address)
    assert info.value.kind == kind
    assert words in str(info.value)
    assert info.value.address == address
    # Both families of except clauses catch it.
    assert isinstance(info.value, SpooldError)
    assert isinstance(info.value, ValueError)


def test_the_null_address_is_a_sender_only() -> None:
    assert validate_address("", role="sender") == ""
    with pytest.raises(AddressError) as info:
        validate_address("", role="recipient")
    assert info.value.kind == "null"
    assert "<>" in str(info.value)


def test_non_ascii_needs_smtputf8() -> None:
    address = "jörg@exämple.de"
    assert validate_address(address, smtputf8=True) == address
    with pytest.raises(AddressError) as info:
        validate_address(address, smtputf8=False)
    assert info.value.kind == "non_ascii"
    assert "SMTPUTF8" in str(info.value)


def test_non_ascii_length_counts_octets() -> None:
    local = "ä" * 33  # 66 octets in UTF-8, 33 characters
    with pytest.raises(AddressError) as info:
        validate_address(f"{local}@example.com")
    assert info.value.kind == "too_long"
    assert "66 octets" in str(info.value)


def test_non_strings_are_refused() -> None:
    with pytest.raises(AddressError, match="must be a string"):
        validate_address(b"a@example.com")
    with pytest.raises(AddressError, match="must be a string"):
        validate_address(None)


def test_recipient_lists() -> None:
    assert validate_recipients(["a@example.com", "b@example.com"]) == [
        "a@example.com",
        "b@example.com",
    ]
    with pytest.raises(AddressError, match="at least one recipient"):
        validate_recipients([])
    with pytest.raises(AddressError, match="list of addresses"):
        validate_recipients("a@example.com")
    with pytest.raises(AddressError) as info:
        validate_recipients(["a@example.com", ""])
    assert info.value.kind == "null"


_ATOM = st.text(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~", min_size=1)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_ADDRESS = st.builds(
    lambda atoms, labels: ".".join(atoms) + "@" + ".".join(labels),
    st.lists(_ATOM, min_size=1, max_size=3),
    st.lists(_LABEL, min_size=1, max_size=4),
).filter(lambda a: len(a.partition("@")[0]) <= 64)


@given(_ADDRESS)
def test_every_well_formed_address_is_accepted_as_is(address: str) -> None:
    assert validate_address(address, smtputf8=False) == address


@given(
    _ADDRESS,
    st.integers(min_value=0, max_value=400),
    st.sampled_from(["\r", "\n", "\x00", "\x1b", "\x7f", "\x85"]),
)
def test_a_control_character_anywhere_is_refused(address: str, where: int, control: str) -> None:
    at = where % (len(address) + 1)
    poisoned = address[:at] + control + address[at:]
    with pytest.raises(AddressError) as info:
        validate_address(poisoned)
    assert info.value.kind == "control"


def _full_check(address: str) -> str | None:
    """The error kind of the full checks (None: accepted), without the
    one-match path taken by the usual addresses (nor the addresses it
    remembers)."""
    saved = spoold.address._PLAIN, spoold.address._usual
    spoold.address._PLAIN = re.compile(r"(?!)")  # never matches
    spoold.address._usual = {}
    try:
        validate_address(address)
    except AddressError as exc:
        return exc.kind
    finally:
        spoold.address._PLAIN, spoold.address._usual = saved
    return None


def _kind(address: str) -> str | None:
    try:
        validate_address(address)
    except AddressError as exc:
        return exc.kind
    return None


_NEAR_ADDRESS = st.builds(
    lambda local, labels: local + "@" + ".".join(labels),
    st.text('ab.-_+"@[]: \x01é', max_size=70),
    st.lists(st.text("ab9-_.[]é", max_size=66), min_size=1, max_size=5),
)


@given(st.one_of(_NEAR_ADDRESS, _ADDRESS, st.text(max_size=300)))
def test_the_one_match_path_for_usual_addresses_agrees_with_the_full_checks(
    address: str,
) -> None:
    assert _kind(address) == _full_check(address)


@pytest.mark.parametrize(
    "address",
    [
        "a" * 64 + "@b.c",
        "a" * 65 + "@b.c",
        "a@" + "b" * 63 + ".c",
        "a@" + "b" * 64 + ".c",
        "a@" + ".".join(["b" * 63] * 4),  # a domain of 255
        "a@" + ".".join(["b" * 63] * 4) + "c",  # of 256
        "a" * 60 + "@" + ".".join(["b" * 62] * 3) + ".ccccc",  # a path of 256
    ],
)
def test_the_one_match_path_keeps_every_length_limit(address: str) -> None:
    assert _kind(address) == _full_check(address)
    assert _kind(address) == _full_check(address)  # remembered, if it passed


def test_the_addresses_remembered_are_bounded() -> None:
    for n in range(spoold.address._USUAL_KEPT + 10):
        validate_address(f"user{n}@example.com")
    assert len(spoold.address._usual) <= spoold.address._USUAL_KEPT
    assert validate_address("user1@example.com") == "user1@example.com"
