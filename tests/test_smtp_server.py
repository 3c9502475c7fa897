"""The ESMTP session protocol on its own: a :class:`SmtpSession` fed bytes
directly, with a transport that records every ``write`` and a host that
records every delivery. What only shows at this level: how many writes a
batch of replies takes, how reads split at awkward places are put together,
and how much of an oversized message is kept.

The listener over real sockets is tested in ``test_smtp_listener.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoold.body import Body, LineEndingPolicy
from spoold.daemon.smtp_server import (
    Delivery,
    SessionPolicy,
    SmtpSession,
    has_long_line,
    parse_path,
    reply_line,
)
from tests.support import wait_until


class RecordingTransport(asyncio.Transport):
    """Collects what the session writes; one entry per ``write`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class RecordingHost:
    """A :class:`~spoold.daemon.smtp_server.SessionHost` that accepts everything."""

    def __init__(self, tg: anyio.abc.TaskGroup, policy: SessionPolicy) -> None:
        self.tg = tg
        self.policy = policy
        self.deliveries: list[Delivery] = []
        self.sleeps: list[float] = []
        self.short_of_space = False
        self.sizes_asked: list[int | None] = []

    def open_session(self, session: SmtpSession, peer: str) -> tuple[SessionPolicy, bool]:
        return self.policy, True

    def close_session(self, session: SmtpSession, peer: str) -> None:
        pass

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.tg.start_soon(work)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def check_password(self, login: str, password: bytes) -> bool:
        return (login, password) == ("alice", b"right")

    def auth_refused(self, peer: str) -> bool:
        return False

    def auth_failed(self, peer: str) -> int:
        return 1

    async def deliver(self, delivery: Delivery) -> str:
        self.deliveries.append(delivery)
        return f"250 2.0.0 OK queued as M{len(self.deliveries)}"

    def space_refusal(self, size: int | None) -> bytes | None:
        self.sizes_asked.append(size)
        return b"452 4.3.1 no room\r\n" if self.short_of_space else None

    # The suppression list: ``suppressed`` as last read; ``on_disk`` what a
    # refresh reads (a refresh is due while they differ).
    suppressed: frozenset[str] = frozenset()
    on_disk: frozenset[str] = frozenset()
    refreshes = 0

    def suppressions_stale(self) -> bool:
        return self.suppressed != self.on_disk

    async def refresh_suppressions(self) -> None:
        await anyio.sleep(0)
        self.refreshes += 1
        self.suppressed = self.on_disk

    def recipient_refusal(self, address: str) -> bytes | None:
        if address in self.suppressed:
            return b"550 5.7.1 Recipient suppressed until 2031-01-31T00:00:00Z\r\n"
        return None


def policy(**changes: Any) -> SessionPolicy:
    values: dict[str, Any] = {
        "hostname": "mx.test.example",
        "max_message_size": 10_000,
        "max_recipients": 10,
        "max_line_length": 998,
        "timeout": 3600.0,
        "max_junk_commands": 100,
        "max_auth_failures": 3,
        "auth_failure_delay": 1.0,
    }
    values.update(changes)
    return SessionPolicy(**values)


@asynccontextmanager
async def session(
    **changes: Any,
) -> AsyncIterator[tuple[SmtpSession, RecordingTransport, RecordingHost]]:
    async with anyio.create_task_group() as tg:
        host = RecordingHost(tg, policy(**changes))
        transport = RecordingTransport()
        smtp = SmtpSession(host)
        smtp.connection_made(transport)
        assert transport.writes == [b"220 mx.test.example ESMTP spoold\r\n"]
        transport.writes.clear()
        try:
            yield smtp, transport, host
        finally:
            smtp.connection_lost(None)
            tg.cancel_scope.cancel()


async def next_write(transport: RecordingTransport, count: int) -> None:
    """Yield to the loop until ``count`` writes were made."""
    await wait_until(lambda: len(transport.writes) >= count, f"{count} writes")


def codes(write: bytes) -> list[str]:
    return [line[:3].decode() for line in write.split(b"\r\n") if line and line[3:4] == b" "]


# ------------------------------------------------------------ pipelining


async def test_the_ehlo_reply_is_one_write() -> None:
    async with session() as (smtp, transport, _host):
        smtp.data_received(b"EHLO client.example\r\n")
        (reply,) = transport.writes
        assert reply == (
            b"250-mx.test.example\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
            b"250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 HELP\r\n"
        )


async def test_a_pipelined_batch_is_answered_in_order_in_one_write() -> None:
    async with session() as (smtp, transport, host):
        smtp.data_received(b"EHLO client.example\r\n")
        transport.writes.clear()
        smtp.data_received(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
            b"RCPT TO:<>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
        )
        (batch,) = transport.writes
        assert batch == (
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n553 5.1.3 Recipient address not allowed\r\n"
            b"250 2.1.5 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        )
        # The message, and QUIT in the same read: the 250 (after the host
        # took the message) and the 221 leave together.
        smtp.data_received(b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        await next_write(transport, 2)
        assert transport.writes[1] == b"250 2.0.0 OK queued as M1\r\n221 2.0.0 Bye\r\n"
        assert transport.closed
        (delivery,) = host.deliveries
        assert delivery.recipients == ("b@example.com", "c@example.com")
        assert delivery.wire == b"Subject: x\r\n\r\nhi\r\n"


async def test_mail_asks_the_host_for_room_with_the_declared_size() -> None:
    async with session() as (smtp, transport, host):
        smtp.data_received(b"EHLO client.example\r\n")
        transport.writes.clear()
        host.short_of_space = True
        smtp.data_received(b"MAIL FROM:<a@example.org> SIZE=5000\r\nRCPT TO:<b@example.com>\r\n")
        assert transport.writes[-1] == b"452 4.3.1 no room\r\n503 5.5.1 Need MAIL before RCPT\r\n"
        host.short_of_space = False
        smtp.data_received(b"MAIL FROM:<a@example.org>\r\n")
        assert transport.writes[-1] == b"250 2.1.0 OK\r\n"
        assert host.sizes_asked == [5000, None]
        assert host.deliveries == []


async def test_a_suppressed_recipient_is_refused_and_the_others_taken() -> None:
    async with session() as (smtp, transport, host):
        smtp.data_received(b"EHLO client.example\r\n")
        transport.writes.clear()
        host.suppressed = host.on_disk = frozenset({"gone@example.com"})
        smtp.data_received(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<gone@example.com>\r\n"
            b"RCPT TO:<b@example.com>\r\nDATA\r\n"
        )
        assert transport.writes == [
            b"250 2.1.0 OK\r\n550 5.7.1 Recipient suppressed until 2031-01-31T00:00:00Z\r\n"
            b"250 2.1.5 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        ]
        smtp.data_received(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        await next_write(transport, 2)
        assert host.deliveries[0].recipients == ("b@example.com",)
        assert host.refreshes == 0  # nothing changed: no reading


async def test_suppressed_recipients_are_not_junk_but_count_as_recipients() -> None:
    async with session(max_junk_commands=2, max_recipients=5) as (smtp, transport, host):
        host.suppressed = host.on_disk = frozenset(f"s{i}@example.com" for i in range(10))
        smtp.data_received(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n")
        transport.writes.clear()
        rcpts = b"".join(b"RCPT TO:<s%d@example.com>\r\n" % i for i in range(4))
        smtp.data_received(rcpts + b"RCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n")
        assert codes(b"".join(transport.writes)) == ["550"] * 4 + ["250", "452"]
        assert not transport.closed  # 4 refusals, 2 junk allowed: none of them junk


async def test_a_changed_list_is_read_before_the_rcpt_is_answered() -> None:
    async with session() as (smtp, transport, host):
        smtp.data_received(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n")
        transport.writes.clear()
        host.on_disk = frozenset({"gone@example.com"})  # just added by an operator
        smtp.data_received(b"RCPT TO:<gone@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        await next_write(transport, 1)
        await wait_until(lambda: b"".join(transport.writes).count(b"\r\n") == 2, "2 replies")
        assert b"".join(transport.writes) == (
            b"550 5.7.1 Recipient suppressed until 2031-01-31T00:00:00Z\r\n250 2.1.5 OK\r\n"
        )
        assert host.refreshes == 1


async def test_commands_split_across_reads_wait_for_their_line_end() -> None:
    async with session() as (smtp, transport, _host):
        for byte in b"HELO client.example\r\nNO":
            smtp.data_received(bytes([byte]))
        assert transport.writes == [b"250 mx.test.example\r\n"]
        smtp.data_received(b"OP\r\n")
        assert transport.writes[1:] == [b"250 2.0.0 OK\r\n"]


# ------------------------------------------------------------ DATA


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 4096])
async def test_the_end_of_data_is_found_however_the_reads_split_it(chunk: int) -> None:
    wire = b"Subject: split\r\n\r\n..leading dot\r\n..\r\n\r\n...\r\nend\r\n"
    stream = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    stream += wire + b".\r\nNOOP\r\n"
    async with session() as (smtp, transport, host):
        for i in range(0, len(stream), chunk):
            smtp.data_received(stream[i : i + chunk])
        await wait_until(
            lambda: any(b"250 2.0.0 OK\r\n" in w for w in transport.writes), "the NOOP's reply"
        )
        (delivery,) = host.deliveries
        assert delivery.wire == wire  # as received: still dot-stuffed


def _large_wire() -> bytes:
    """Over 100 KiB in wire form: dot-stuffed lines at the start, around the
    64 KiB mark and at the end, an empty line and a lone ``..`` line."""
    line = b"x" * 78 + b"\r\n"
    wire = b"Subject: big\r\n\r\n..first\r\n" + line * 830 + b"..\r\n\r\n"
    wire += b"..near 64 KiB\r\n" + line * 500 + b"...\r\nlast\r\n"
    assert len(wire) > 100 * 1024
    return wire


_ENVELOPE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shift", [0, 1, 2, 3, 4, 5])
async def test_a_large_message_is_taken_whole_however_the_reads_split_it(
    seed: int, shift: int
) -> None:
    # Two messages and a NOOP in one stream, cut into reads at random
    # places and once ``shift`` octets into the first end-of-data line: the
    # second message comes while the first is being taken (buffered input),
    # the first straight from the reads.
    wire = _large_wire()
    second = b"Subject: two\r\n\r\n..\r\n" if seed % 2 else b""  # (b"": an empty one)
    stream = b"EHLO c\r\n" + _ENVELOPE + wire + b".\r\n" + _ENVELOPE + second + b".\r\nNOOP\r\n"
    rng = random.Random(seed)
    end = stream.index(b"\r\n.\r\n") + shift
    cuts = sorted(
        {end, 65536, *(rng.randrange(1, len(stream)) for _ in range(rng.randrange(1, 9)))}
    )
    cuts = [0, *cuts, len(stream)]
    async with session(max_message_size=200_000) as (smtp, transport, host):
        for a, b in itertools.pairwise(cuts):
            if b > a:
                smtp.data_received(stream[a:b])
        await wait_until(
            lambda: b"".join(transport.writes).endswith(b"250 2.0.0 OK\r\n"), "the NOOP's reply"
        )
        assert [d.wire for d in host.deliveries] == [wire, second]
        assert codes(b"".join(transport.writes)).count("250") == 1 + 3 * 2 + 1  # EHLO, 2x3, NOOP


# Pieces of message bodies: line ends whole and bare, dots alone and after
# line ends, end-of-data lines whole and near-miss, and commands.
_BODY_PIECES = [
    b"\r\n", b".", b"..", b"\r", b"\n", b"x", b"Subject: s\r\n",
    b"\r\n.\r\n", b".\r\n", b"\r\n.", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\n.\n",
    _ENVELOPE, b"NOOP\r\n", b"RSET\r\n",
]  # fmt: skip


async def _deliveries_of(stream: bytes, reads: list[int]) -> list[Delivery]:
    """What a session delivers of ``stream`` read in pieces of the sizes
    ``reads`` (over and over); after an odd one, the loop runs a turn."""
    async with session() as (smtp, _transport, host):
        at = 0
        for size in itertools.cycle(reads):
            if at >= len(stream):
                break
            smtp.data_received(stream[at : at + size])
            at += size
            if size % 2:
                await anyio.sleep(0)
        await anyio.wait_all_tasks_blocked()
        return host.deliveries


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(_BODY_PIECES), max_size=30), min_size=1, max_size=4),
    st.lists(st.integers(1, 40), min_size=1, max_size=12),
)
def test_a_delivered_wire_never_holds_an_end_of_data_line(
    bodies: list[list[bytes]], reads: list[int]
) -> None:
    """The listener takes a delivery's wire without searching it for an
    end-of-data line again (the session cut it at the first): whatever the
    client sends and however the reads split it (a CRLF, a dot line), no
    wire holds one, and it is taken as the search would take it."""
    stream = b"EHLO c\r\n"
    stream += b"".join(_ENVELOPE + b"".join(body) + b"\r\n.\r\n" for body in bodies)
    deliveries = anyio.run(_deliveries_of, stream, reads)
    assert deliveries  # (the first message at least)
    for delivery in deliveries:
        wire = delivery.wire
        assert not wire.startswith(b".\r\n"), wire
        assert b"\r\n.\r\n" not in wire, wire
        for line_endings in LineEndingPolicy:
            try:
                searched: Body | str = Body.from_wire(wire, line_endings)
            except ValueError as exc:  # (a bare CR or LF under REJECT)
                searched = str(exc)
            try:
                cut: Body | str = Body._from_cut_wire(wire, line_endings)
            except ValueError as exc:
                cut = str(exc)
            assert cut == searched


async def test_a_message_at_exactly_a_read_long_is_taken() -> None:
    # The message and its end in reads of exactly 64 KiB: the end-of-data
    # line starts the next read, then ends one.
    line = b"y" * 62 + b"\r\n"
    wire = line * 1024  # 65536 octets
    async with session(max_message_size=200_000) as (smtp, transport, host):
        smtp.data_received(b"EHLO c\r\n" + _ENVELOPE)
        smtp.data_received(wire)
        smtp.data_received(b".\r\n")
        smtp.data_received(_ENVELOPE)
        smtp.data_received(wire[:-2])
        smtp.data_received(b"\r\n.\r\nNOOP\r\n")
        await wait_until(
            lambda: b"".join(transport.writes).endswith(b"250 2.0.0 OK\r\n"), "the NOOP's reply"
        )
        assert [d.wire for d in host.deliveries] == [wire, wire]


async def test_an_empty_message_is_one_too() -> None:
    async with session() as (smtp, transport, host):
        smtp.data_received(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert codes(transport.writes[0]) == ["250", "250", "250", "354"]
        smtp.data_received(b".\r\n")
        await next_write(transport, 2)
        assert transport.writes[1] == b"250 2.0.0 OK queued as M1\r\n"
        (delivery,) = host.deliveries
        assert delivery.wire == b""
        assert delivery.sender == ""


async def test_an_oversized_message_is_dropped_as_it_comes() -> None:
    limit = 10_000
    async with session(max_message_size=limit) as (smtp, transport, host):
        smtp.data_received(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
        smtp.data_received(b"DATA\r\n")
        line = b"x" * 70 + b"\r\n"
        kept = []
        for _ in range(2000):  # 144 kB, 14 times the limit, in reads of 720 bytes
            smtp.data_received(line * 10)
            kept.append(smtp.buffered)
        assert max(kept) <= limit + 720 + 4
        smtp.data_received(b".\r\nNOOP\r\n")
        assert transport.writes[-1] == (
            b"552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 OK\r\n"
        )
        assert host.deliveries == []


def test_long_lines_are_found_wherever_they_are() -> None:
    assert not has_long_line(b"x" * 10 + b"\r\n", 10)
    assert has_long_line(b"x" * 11 + b"\r\n", 10)
    assert has_long_line(b"ok\r\n" + b"x" * 11, 10)
    assert has_long_line(b"x" * 11 + b"\n", 10)
    assert not has_long_line(b"x" * 10 + b"\r" + b"y" * 10 + b"\r\n", 10)  # a bare CR ends a line
    assert not has_long_line(b"ok\r\n" * 100, 10)
    # Past the first window: a line of exactly the limit (CRLF), one over
    # it with a bare LF, one over it split by a bare CR, a long last line.
    lines = b"ab\r\n" * 7
    assert not has_long_line(lines + b"x" * 10 + b"\r\n" + lines, 10)
    assert has_long_line(lines + b"x" * 11 + b"\n" + lines, 10)
    assert not has_long_line(lines + b"x" * 5 + b"\r" + b"x" * 6 + b"\r\n" + lines, 10)
    assert has_long_line(lines + b"x" * 11, 10)
    assert not has_long_line(lines + b"x" * 10, 10)


@given(
    st.lists(
        st.tuples(st.integers(0, 25), st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b""])),
        max_size=20,
    ),
    st.integers(1, 12),
)
def test_long_lines_found_as_by_the_exact_search(
    parts: list[tuple[int, bytes]], limit: int
) -> None:
    wire = b"".join(b"x" * n + end for n, end in parts)
    exact = re.search(rb"(?<![^\r\n])[^\r\n]{%d}" % (limit + 1), wire) is not None
    assert has_long_line(wire, limit) == exact


def test_reply_lines_are_printable_ascii_and_cut_short() -> None:
    assert reply_line("250 2.0.0 OK queued as 8EAG") == b"250 2.0.0 OK queued as 8EAG\r\n"
    assert reply_line("550 bad\r\nDATA\x7f\u00e9") == b"550 bad??DATA??\r\n"
    assert reply_line("x" * 500) == b"x" * 400 + b"\r\n"
    assert reply_line("451 \u00e9" + "y" * 500, limit=6) == b"451 ?y\r\n"


# ------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("<a@example.org>", ("a@example.org", "")),
        ("<>", ("", "")),
        ("<a@example.org> SIZE=10 BODY=8BITMIME", ("a@example.org", "SIZE=10 BODY=8BITMIME")),
        ("<@relay.example,@b.example:a@example.org>", ("a@example.org", "")),
        ('<"odd > quoted"@example.org>', ('"odd > quoted"@example.org', "")),
        ("a@example.org", None),
        ("<a@example.org", None),
        ("<a@example.org>SIZE=10", None),
        ('<"unterminated@example.org>', None),
        ("<@relay.example:>", None),
        ("<@relay.example a@example.org>", None),
    ],
)
def test_parse_path(text: str, parsed: tuple[str, str] | None) -> None:
    assert parse_path(text) == parsed


def _parse_path_by_scanning(text: str) -> tuple[str, str] | None:
    """parse_path as it was, scanning every character (its reference)."""
    if not text.startswith("<"):
        return None
    i = 1
    if text.startswith("@", i):
        route = re.compile(r"@[^,:@<>\s]+(?:,@[^,:@<>\s]+)*:").match(text, i)
        if route is None:
            return None
        i = route.end()
    start = i
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            if i >= n:
                return None
        elif c == ">":
            break
        i += 1
    else:
        return None
    mailbox, rest = text[start:i], text[i + 1 :]
    if rest and not rest.startswith(" "):
        return None
    if start > 1 and not mailbox:
        return None
    return mailbox, rest.strip(" ")


@given(
    st.lists(
        st.sampled_from(["<", ">", '"', "\\", "@", "a", ".", ":", ",", " ", "x=1"]), max_size=16
    )
)
def test_parse_path_finds_the_end_as_a_scan_of_every_character_does(parts: list[str]) -> None:
    """The usual path (no quote before its first ">") is cut at that ">"
    in one find; the answer is the full scan's, for any text."""
    text = "<" + "".join(parts)
    assert parse_path(text) == _parse_path_by_scanning(text)


# ------------------------------------------------------------ AUTH


async def test_auth_plain_with_an_initial_response_and_login_in_steps() -> None:
    import base64

    def b64(data: bytes) -> bytes:
        return base64.b64encode(data)

    async with session(auth=True) as (smtp, transport, host):
        smtp.data_received(b"EHLO c\r\n")
        assert b"250-AUTH PLAIN LOGIN\r\n" in transport.writes[-1]  # no TLS configured
        smtp.data_received(b"AUTH LOGIN\r\n")
        assert transport.writes[-1] == b"334 VXNlcm5hbWU6\r\n"
        smtp.data_received(b"*\r\n")
        assert transport.writes[-1] == b"501 5.7.0 Authentication cancelled\r\n"
        smtp.data_received(b"AUTH LOGIN " + b64(b"alice") + b"\r\n")
        assert transport.writes[-1] == b"334 UGFzc3dvcmQ6\r\n"
        smtp.data_received(b64(b"right") + b"\r\n")
        assert transport.writes[-1] == b"235 2.7.0 Authentication successful\r\n"
        smtp.data_received(b"AUTH PLAIN " + b64(b"\0alice\0right") + b"\r\n")
        assert transport.writes[-1] == b"503 5.5.1 Already authenticated\r\n"
        assert host.sleeps == []


async def test_an_overlong_auth_response_ends_the_exchange() -> None:
    async with session(auth=True) as (smtp, transport, host):
        smtp.data_received(b"EHLO c\r\nAUTH PLAIN\r\n")
        assert transport.writes[-1].endswith(b"334 \r\n")
        smtp.data_received(b"A" * 20_000)
        assert transport.writes[-1] == b"500 5.5.2 Line too long\r\n"
        smtp.data_received(b"AAAA\r\nNOOP\r\n")  # the end of it is dropped; NOOP is a command
        assert transport.writes[-1] == b"250 2.0.0 OK\r\n"
        assert host.sleeps == []
