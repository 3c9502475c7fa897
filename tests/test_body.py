"""Message bodies: wire form (CRLF, dot-stuffed), round trips, bare line endings."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os
import re
from email.message import EmailMessage
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoold.body import _SMALL, Body, BodyCheck, LineEndingPolicy, find_bare_line_ending
from spoold.errors import BareLineEndingError, BodyDamagedError, SpooldError
from spoold.relay import BodyHandle, BodyReader
from spoold.smtp_relay import SmtpRelay
from tests.daemon_helpers import DaemonFactory, cli, prefill, spooled, write_config
from tests.relay_helpers import ALICE, message_to, route
from tests.smtp_server import Reply, SmtpTestServer
from tests.support import records_in, wait_until

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
        if wire == b"." or wire.endswith(b"\r\n."):  # would end the message
            with pytest.raises(ValueError, match="lone"):
                Body.from_wire(wire, REJECT)
            return
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
@pytest.mark.parametrize("policy", list(LineEndingPolicy))
def test_wire_holding_the_end_of_data_line_is_refused(
    wire: bytes, policy: LineEndingPolicy
) -> None:
    with pytest.raises(ValueError, match="end-of-data"):
        Body.from_wire(wire, policy)


def test_the_public_way_in_always_looks_for_the_end_of_data_line() -> None:
    """No keyword of the public API skips the one check that a body holds
    no end-of-data line (SMTP smuggling at the next hop): the session's
    fast way in is private."""
    assert list(inspect.signature(Body.from_wire).parameters) == ["wire", "policy"]


@pytest.mark.parametrize("wire", [b".", b"a\r\n.", b"a\r\nb\r\n."])
def test_a_last_line_of_a_lone_dot_without_its_crlf_is_refused(wire: bytes) -> None:
    # The CRLF that keeps an unterminated last line whole would turn it into
    # the end-of-data line: refused like one, not taken.
    with pytest.raises(ValueError, match="lone"):
        Body.from_wire(wire)


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


# -----------------------------------------------------------------------------
# A damaged body is never delivered.
#
# The record carries the body file's size and SHA-256 from the moment it is
# written; a relay checks them (:class:`~spoold.body.BodyCheck`) before it
# sends anything and again as it streams, and stops before the end of DATA
# when they differ: the next hop never gets a partial message, and the spool
# sets the message aside in ``quarantine`` with the reason. ``spoold check``
# finds such bodies too.


MiB = 1024 * 1024
LARGE = b"Subject: large\r\n\r\n" + (b"y" * 78 + b"\r\n") * 8000


def check_of(path: Path) -> BodyCheck:
    data = path.read_bytes()
    return BodyCheck(len(data), hashlib.sha256(data).hexdigest())


def change_one_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(b"Z" if old != b"Z" else b"W")


async def test_a_new_record_carries_the_size_and_checksum_of_its_body(tmp_path: Path) -> None:
    (mid,) = await prefill(tmp_path / "spool", [spooled("127.0.0.1:25")])
    record = json.loads((tmp_path / "spool" / "active" / mid).read_bytes())
    body = (tmp_path / "spool" / "data" / mid).read_bytes()
    assert record["size"] == len(body)
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("damage", ["truncated", "changed", "longer"])
async def test_a_small_body_is_checked_when_opened(tmp_path: Path, damage: str) -> None:
    msg, body = message_to(tmp_path, ["127.0.0.1:25"])
    check = check_of(body.path)
    if damage == "truncated":
        os.truncate(body.path, 50)
    elif damage == "changed":
        change_one_byte(body.path, 30)
    else:
        with body.path.open("ab") as f:
            f.write(b"more\r\n")
    handle = BodyHandle(body.path, check=check)
    # A body of the wrong size is told by its size on disk.
    told = "damaged body" if damage == "changed" else f" {body.path.stat().st_size} bytes where "
    with pytest.raises(BodyDamagedError, match=told):
        async with handle.open():
            pass
    with pytest.raises(BodyDamagedError, match=told):
        await handle.read()
    with pytest.raises(BodyDamagedError, match=told):
        BodyReader.open_sync(body.path, 64 * 1024, check)
    assert msg.id in str(body.path)


async def test_a_large_body_changed_while_it_is_sent_ends_before_the_final_dot(
    tmp_path: Path, smtp_server: SmtpTestServer
) -> None:
    """The body passes the check before MAIL; the hop is held at DATA while
    a byte in the middle changes; the stream's own check stops the
    transaction before the final dot: the hop has nothing."""
    msg, body = message_to(tmp_path, [smtp_server.hop], content=LARGE)
    assert body.path.stat().st_size > 256 * 1024  # streamed in chunks, not read whole
    handle = BodyHandle(body.path, check=check_of(body.path))
    gate = asyncio.Event()
    smtp_server.behaviour.data = Reply(gate=gate)
    relay = SmtpRelay(route())

    async def damage_then_release() -> None:
        await wait_until(lambda: smtp_server.count("DATA") == 1, "the relay to send DATA")
        await anyio.to_thread.run_sync(change_one_byte, body.path, 400_000)
        gate.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(damage_then_release)
            with pytest.raises(BodyDamagedError, match="SHA-256"):
                await relay.relay(msg, handle, [ALICE])
    await wait_until(lambda: smtp_server.connections_closed == 1, "the relay to hang up")
    assert smtp_server.messages == []  # no partial message accepted
    await relay.close_and_flush()


async def test_a_large_body_damaged_at_rest_is_refused_before_mail(
    tmp_path: Path, smtp_server: SmtpTestServer
) -> None:
    msg, body = message_to(tmp_path, [smtp_server.hop], content=LARGE)
    check = check_of(body.path)
    change_one_byte(body.path, 300_000)
    relay = SmtpRelay(route())
    with pytest.raises(BodyDamagedError):
        await relay.relay(msg, BodyHandle(body.path, check=check), [ALICE])
    assert smtp_server.count("MAIL") == 0
    await relay.close_and_flush()


async def test_a_truncated_body_is_quarantined_never_delivered(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    """The issue's case: ``truncate -s 50 data/ID`` with the daemon stopped."""
    config = write_config(tmp_path, next_hops=[smtp_server.hop])
    spool_dir = tmp_path / "spool"
    damaged, good = await prefill(spool_dir, [spooled(smtp_server.hop) for _ in range(2)])
    os.truncate(spool_dir / "data" / damaged, 50)

    found = cli("--spool-dir", str(spool_dir), "check")
    assert found.code == 1
    assert f"damaged_body: {damaged}: damaged body" in found.out
    assert good not in found.out

    await start_daemon(config)
    await wait_until(lambda: records_in(spool_dir, "quarantine") == {damaged}, "quarantine")
    await wait_until(lambda: smtp_server.transactions == 1, "the good one to be delivered")
    assert [m.rcpt_tos for m in smtp_server.messages] == [("rcpt@example.com",)]
    shown = json.loads(cli("--config", str(config), "show", damaged).out)
    assert shown["status"] == "quarantined"
    assert "50 bytes where" in shown["quarantine_reason"]
    history = cli("--config", str(config), "history", "--format", "json")
    assert damaged not in history.out  # never said delivered


async def test_check_quick_compares_sizes_only(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    changed, truncated = await prefill(spool_dir, [spooled("127.0.0.1:25") for _ in range(2)])
    change_one_byte(spool_dir / "data" / changed, 10)
    os.truncate(spool_dir / "data" / truncated, 20)
    full = cli("--spool-dir", str(spool_dir), "check")
    quick = cli("--spool-dir", str(spool_dir), "check", "--quick")
    assert f"damaged_body: {changed}:" in full.out
    assert f"damaged_body: {truncated}:" in full.out
    assert f"damaged_body: {changed}:" not in quick.out
    assert f"damaged_body: {truncated}:" in quick.out
    assert (full.code, quick.code) == (1, 1)


_BARE_PATTERN = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@settings(max_examples=500)
@given(
    st.lists(
        st.sampled_from([b"\r\n", b"\r", b"\n", b"x", b"ab", b".", b"\r\r\n", b"\r\n\n"]),
        max_size=40,
    ),
    st.booleans(),
)
def test_a_bare_line_ending_is_found_where_the_pattern_finds_it(
    parts: list[bytes], large: bool
) -> None:
    """Both ways of the common case (a copy without CRLFs for a small
    message, counts for a large one) agree with the exact pattern."""
    content = b"".join(parts)
    if large:  # past the small size: the counts decide
        content = b"y\r\n" * (_SMALL // 3 + 1) + content
    m = _BARE_PATTERN.search(content)
    assert find_bare_line_ending(content) == (-1 if m is None else m.start())


@given(st.binary(max_size=300))
def test_wire_cut_at_its_end_is_taken_as_without_the_promise(content: bytes) -> None:
    """``_from_cut_wire`` only skips the search for an end-of-data line the
    caller vouches is not there: the same body, or the same refusal."""
    wire = Body.from_content(content, LineEndingPolicy.NORMALIZE).wire
    for policy in LineEndingPolicy:
        assert Body._from_cut_wire(wire, policy) == Body.from_wire(wire, policy)
    bare = wire + b"x\ny\r\n"
    with pytest.raises(BareLineEndingError):
        Body._from_cut_wire(bare, LineEndingPolicy.REJECT)
