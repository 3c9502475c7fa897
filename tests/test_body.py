"""Message bodies: wire form (CRLF, dot-stuffed), round trips, bare line endings."""

from __future__ import annotations

from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoold.body import Body, LineEndingPolicy
from spoold.errors import BareLineEndingError, SpooldError

REJECT = LineEndingPolicy.REJECT
NORMALIZE = LineEndingPolicy.NORMALIZE

# ------------------------------------------------------------------ models
# Independent descriptions of what the wire form must be, written without the
# regular expressions of spoold.body.


def has_bare_line_ending(data: bytes) -> bool:
    """True if a CR or LF remains once every CRLF pair is taken out."""
    rest = data.replace(b"\r\n", b"")
    return b"\r" in rest or b"\n" in rest


def first_bare_offset(data: bytes) -> tuple[int, str] | None:
    i = 0
    while i < len(data):
        if data[i : i + 2] == b"\r\n":
            i += 2
            continue
        if data[i : i + 1] == b"\r":
            return i, "CR"
        if data[i : i + 1] == b"\n":
            return i, "LF"
        i += 1
    return None


def normalized(data: bytes) -> bytes:
    """Every CRLF, CR or LF becomes CRLF."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def with_final_crlf(content: bytes) -> bytes:
    return content if not content or content.endswith(b"\r\n") else content + b"\r\n"


def expected_wire(content: bytes) -> bytes:
    """Dot-stuff content that has CRLF line endings and ends with CRLF (or is empty)."""
    if not content:
        return b""
    lines = content[:-2].split(b"\r\n")
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def assert_safe_wire(wire: bytes) -> None:
    """What the DATA phase needs: CRLF only, no line that ends the data early."""
    assert not has_bare_line_ending(wire)
    assert b"." not in wire.split(b"\r\n")
    if wire:
        assert wire.endswith(b"\r\n")
    # The end-of-data sequence appears once, at the very end of what is sent.
    transmitted = b"\r\n" + wire + b".\r\n"
    assert transmitted.find(b"\r\n.\r\n") == len(transmitted) - 5


# --------------------------------------------------------------- strategies

line_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
lines = st.one_of(
    line_bytes,
    st.sampled_from([b"", b".", b"..", b"...", b". ", b".\x00", b"\x00"]),
    line_bytes.map(lambda b: b"." + b),
    line_bytes.map(lambda b: b".." + b),
)
crlf_content = st.lists(lines, max_size=20).map(b"\r\n".join)
any_bytes = st.binary(max_size=200) | st.lists(
    st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\x00", b"\xff"]), max_size=40
).map(b"".join)


# ----------------------------------------------------------- round trips


@settings(max_examples=200, deadline=None)
@given(crlf_content)
def test_content_round_trips(content: bytes) -> None:
    body = Body.from_content(content)
    assert body.content() == with_final_crlf(content)
    assert Body.from_content(content, NORMALIZE) == body


@settings(max_examples=200, deadline=None)
@given(crlf_content)
def test_wire_form_is_crlf_and_dot_stuffed(content: bytes) -> None:
    body = Body.from_content(content)
    assert body.wire == expected_wire(with_final_crlf(content))
    assert_safe_wire(body.wire)
    assert len(body) == len(body.wire)


@settings(max_examples=200, deadline=None)
@given(crlf_content)
def test_body_loaded_from_wire_round_trips(content: bytes) -> None:
    body = Body.from_content(content)
    loaded = Body(bytes(body.wire))
    assert loaded == body
    assert hash(loaded) == hash(body)
    assert loaded.content() == with_final_crlf(content)
    # Encoding the content again gives the same wire form (a fixed point).
    assert Body.from_content(loaded.content()).wire == body.wire


def test_empty_body_has_empty_wire() -> None:
    body = Body.from_content(b"")
    assert body.wire == b""
    assert body.content() == b""
    assert len(body) == 0


def test_missing_final_newline_gets_crlf() -> None:
    body = Body.from_content(b"Subject: x\r\n\r\nno newline at the end")
    assert body.wire == b"Subject: x\r\n\r\nno newline at the end\r\n"
    assert body.content() == b"Subject: x\r\n\r\nno newline at the end\r\n"


def test_final_crlf_is_not_doubled() -> None:
    assert Body.from_content(b"x\r\n").wire == b"x\r\n"


@pytest.mark.parametrize(
    ("content", "wire"),
    [
        (b".", b"..\r\n"),
        (b".\r\n", b"..\r\n"),
        (b"..\r\n", b"...\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n"),
        (b".start\r\nmid.dle\r\n.end", b"..start\r\nmid.dle\r\n..end\r\n"),
        (b"\r\n", b"\r\n"),
        (b"\r\n.\r\n", b"\r\n..\r\n"),
    ],
)
def test_dot_stuffing_examples(content: bytes, wire: bytes) -> None:
    body = Body.from_content(content)
    assert body.wire == wire
    assert body.content() == with_final_crlf(content)


def test_repr_gives_the_size() -> None:
    assert repr(Body.from_content(b"abc")) == "Body(5 bytes)"


def test_body_is_not_equal_to_bytes() -> None:
    assert Body(b"x\r\n") != b"x\r\n"
    assert Body(b"x\r\n") != Body(b"y\r\n")


# ----------------------------------------------------- bare line endings


@pytest.mark.parametrize(
    ("content", "kind", "offset"),
    [
        (b"ab\ncd", "LF", 2),
        (b"ab\rcd", "CR", 2),
        (b"\n", "LF", 0),
        (b"\r", "CR", 0),
        (b"a\r\n\rb", "CR", 3),
        (b"a\r\nb\n", "LF", 4),
        (b"a\r\r\n", "CR", 1),
        (b"a\r\n\n", "LF", 3),
        (b"a\n\r", "LF", 1),
    ],
)
def test_reject_names_the_bare_line_ending(content: bytes, kind: str, offset: int) -> None:
    with pytest.raises(BareLineEndingError) as info:
        Body.from_content(content, REJECT)
    message = str(info.value)
    assert f"bare {kind}" in message
    assert f"byte {offset}" in message


def test_reject_is_the_default_policy() -> None:
    with pytest.raises(BareLineEndingError):
        Body.from_content(b"a\nb")


def test_bare_line_ending_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Body.from_content(b"a\rb")
    with pytest.raises(SpooldError):
        Body.from_content(b"a\rb")


@settings(max_examples=200, deadline=None)
@given(any_bytes)
def test_reject_refuses_exactly_the_bare_line_endings(content: bytes) -> None:
    bare = first_bare_offset(content)
    if bare is None:
        assert Body.from_content(content, REJECT).content() == with_final_crlf(content)
        return
    offset, kind = bare
    with pytest.raises(BareLineEndingError) as info:
        Body.from_content(content, REJECT)
    assert f"bare {kind} at byte {offset}" in str(info.value)


@settings(max_examples=200, deadline=None)
@given(any_bytes)
def test_normalize_turns_bare_line_endings_into_crlf(content: bytes) -> None:
    body = Body.from_content(content, NORMALIZE)
    assert_safe_wire(body.wire)
    assert not has_bare_line_ending(body.content())
    assert body.content() == with_final_crlf(normalized(content))
    assert body.wire == expected_wire(with_final_crlf(normalized(content)))


@pytest.mark.parametrize(
    ("content", "normalized_content"),
    [
        (b"a\nb", b"a\r\nb\r\n"),
        (b"a\rb", b"a\r\nb\r\n"),
        (b"a\r\r\nb", b"a\r\n\r\nb\r\n"),
        (b"a\n\rb", b"a\r\n\r\nb\r\n"),
        (b"a\r", b"a\r\n"),
    ],
)
def test_normalize_examples(content: bytes, normalized_content: bytes) -> None:
    assert Body.from_content(content, NORMALIZE).content() == normalized_content


SMUGGLING = [b"a\n.\nb", b"a\r\n.\nb", b"a\n.\r\nb", b"a\r.\r\nb"]


@pytest.mark.parametrize("content", SMUGGLING)
def test_reject_refuses_smuggling_sequences(content: bytes) -> None:
    with pytest.raises(BareLineEndingError, match="bare"):
        Body.from_content(content, REJECT)


@pytest.mark.parametrize("content", SMUGGLING)
def test_normalize_stuffs_the_lone_dot_of_smuggling_sequences(content: bytes) -> None:
    body = Body.from_content(content, NORMALIZE)
    assert body.wire == b"a\r\n..\r\nb\r\n"
    assert b"." not in body.wire.split(b"\r\n")
    assert_safe_wire(body.wire)
    assert body.content() == b"a\r\n.\r\nb\r\n"


# ------------------------------------------------- as an SMTP client sent it


def unstuffed(wire: bytes) -> bytes:
    """Undo dot-stuffing per CRLF-delimited line (RFC 5321 4.5.2)."""
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in wire.split(b"\r\n"))


received_wire = any_bytes.filter(lambda b: not b.startswith(b".\r\n") and b"\r\n.\r\n" not in b)


@settings(max_examples=200, deadline=None)
@given(crlf_content)
def test_received_wire_without_bare_line_endings_is_kept_as_it_is(content: bytes) -> None:
    wire = Body.from_content(content).wire
    for policy in (REJECT, NORMALIZE):
        body = Body.from_wire(wire, policy)
        assert body.wire is wire  # no copy, no re-encoding
        assert body.content() == with_final_crlf(content)


@settings(max_examples=300, deadline=None)
@given(received_wire)
def test_received_wire_with_bare_line_endings(wire: bytes) -> None:
    if not has_bare_line_ending(wire):
        assert Body.from_wire(wire, REJECT).wire == with_final_crlf(wire)
        return
    with pytest.raises(BareLineEndingError):
        Body.from_wire(wire, REJECT)
    body = Body.from_wire(wire, NORMALIZE)
    assert_safe_wire(body.wire)
    assert body.content() == with_final_crlf(normalized(unstuffed(wire)))


@pytest.mark.parametrize(
    ("probe", "wire"),
    [
        (b"a\n.\nb", b"a\r\n..\r\nb\r\n"),
        (b"a\r\n.\nb", b"a\r\n\r\nb\r\n"),  # that dot starts a CRLF line: the client's stuffing
        (b"a\n.\r\nb", b"a\r\n..\r\nb\r\n"),
        (b"a\r.\r\nb", b"a\r\n..\r\nb\r\n"),
    ],
)
def test_normalized_wire_never_holds_a_lone_dot_line(probe: bytes, wire: bytes) -> None:
    assert Body.from_wire(probe + b"\r\n", NORMALIZE).wire == wire


@pytest.mark.parametrize("wire", [b".\r\n", b"a\r\n.\r\n", b"a\r\n.\r\nb\r\n"])
def test_wire_holding_the_end_of_data_line_is_refused(wire: bytes) -> None:
    with pytest.raises(ValueError, match="end-of-data"):
        Body.from_wire(wire, NORMALIZE)


# ------------------------------------------------------------ email objects


def test_email_round_trip_keeps_subject_and_text() -> None:
    message = EmailMessage()
    message["From"] = "sender@example.org"
    message["To"] = "rcpt@example.com"
    message["Subject"] = "Héllo wörld"
    text = "line one\n.line two\n\n..\n.\nend\n"
    message.set_content(text)

    body = Body.from_email(message)
    assert_safe_wire(body.wire)
    # The lone "." line of the text is stuffed on the wire.
    assert b"\r\n..\r\n" in body.wire

    parsed = Body(body.wire).to_email()
    assert isinstance(parsed, EmailMessage)
    assert parsed["subject"] == "Héllo wörld"
    assert parsed["from"] == "sender@example.org"
    assert parsed["to"] == "rcpt@example.com"
    assert parsed.get_content().replace("\r\n", "\n") == text


def test_email_with_lf_line_endings_is_normalized() -> None:
    message = EmailMessage()
    message["Subject"] = "plain"
    message.set_content("a\nb\n")
    body = Body.from_email(message)
    assert not has_bare_line_ending(body.wire)
    assert body.to_email()["subject"] == "plain"
