"""The relay on the wire: pipelining, the body as it is on disk, memory.

What these tests hold the relay to:

* with PIPELINING offered, MAIL, every RCPT and DATA leave in one write
  (the raw server of :mod:`tests.raw_smtp_server` answers nothing before
  DATA, and records the boundaries of each read); without it, one command
  per read;
* the bytes after 354 are the body file exactly, then ``.\\r\\n`` -- at
  chunk boundaries too;
* refusals and disconnects of a pipelined transaction end the same way as
  one by one (aiosmtpd with ``pipelining=True``);
* STARTTLS, AUTH and a multi-chunk body together;
* relaying a 30 MB message takes less than 10 MB of memory.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import anyio
import pytest

from spoold.body import Body
from spoold.relay import CHUNK_SIZE, BodyHandle, Delivery, RecipientResult
from tests.raw_smtp_server import StartRawServer
from tests.relay_helpers import (
    ALICE,
    BOB,
    CAROL,
    CONTENT,
    OK,
    PASSWORD,
    SENDER,
    USER,
    MakeRelay,
    delivery,
    failure,
    message_to,
    relay_message,
    route,
)
from tests.smtp_server import DISCONNECT, Behaviour, Reply, StartServer, TlsCertificate
from tests.support import WAIT_TIMEOUT, wait_until

QUEUED = RecipientResult(250, "queued", "2.0.0")  # the raw server's answer to "."
MiB = 1024 * 1024


def lines_up_to(offset: int, line: int = 80) -> bytes:
    """Filler lines (``x``... CRLF) of ``offset`` bytes in all."""
    assert offset >= 2
    full, rest = divmod(offset, line)
    if rest == 1:  # no line of one byte: make the last full one longer
        full, rest = full - 1, rest + line
    out = (b"x" * (line - 2) + b"\r\n") * full
    if rest:
        out += b"x" * (rest - 2) + b"\r\n"
    return out


def content_across_chunk_boundaries() -> bytes:
    """Content (over 256 KiB, so it is sent in chunks, not read whole)
    whose stuffed dot lines sit where the relay's chunks meet:
    one starts exactly at a boundary, and one boundary falls between the CR
    and the LF before a dot line."""
    first = lines_up_to(CHUNK_SIZE)
    content = first + b".starts the second chunk\r\n"
    wire_so_far = len(Body.from_content(content).wire)
    content += lines_up_to(2 * CHUNK_SIZE - wire_so_far + 1)  # "\r" last in chunk 2
    content += b".after the split CRLF\r\n" + b"..\r\n" + b"tail\r\n"
    content += lines_up_to(300_000)  # past what is read whole: chunks are used
    wire = Body.from_content(content).wire
    assert wire[CHUNK_SIZE : CHUNK_SIZE + 2] == b".."
    assert wire[2 * CHUNK_SIZE - 1 : 2 * CHUNK_SIZE + 2] == b"\r\n."
    return content


# ----------------------------------------------------------- pipelining


async def test_with_pipelining_mail_every_rcpt_and_data_go_in_one_write(
    start_raw_server: StartRawServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    # Nothing is answered before DATA arrives: a client that waited for the
    # MAIL reply would sit there until its command timeout.
    server = await start_raw_server(hold_until_data=True)

    outcome = await relay_message(make_relay(), tmp_path, [server.hop], [ALICE, BOB, CAROL])

    assert delivery(outcome).recipients == {ALICE: QUEUED, BOB: QUEUED, CAROL: QUEUED}
    ehlo, envelope = server.command_reads()
    assert ehlo.startswith(b"EHLO ")
    assert (
        envelope
        == (
            f"MAIL FROM:<{SENDER}> SIZE={len(CONTENT)}\r\n"
            f"RCPT TO:<{ALICE}>\r\nRCPT TO:<{BOB}>\r\nRCPT TO:<{CAROL}>\r\n"
            "DATA\r\n"
        ).encode()
    )
    assert len(server.messages) == 1


async def test_without_pipelining_each_command_waits_for_its_reply(
    start_raw_server: StartRawServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    server = await start_raw_server(extensions=["SIZE", "8BITMIME"])

    outcome = await relay_message(make_relay(), tmp_path, [server.hop], [ALICE, BOB])

    assert delivery(outcome).recipients == {ALICE: QUEUED, BOB: QUEUED}
    assert server.command_reads()[1:] == [
        f"MAIL FROM:<{SENDER}> SIZE={len(CONTENT)}\r\n".encode(),
        f"RCPT TO:<{ALICE}>\r\n".encode(),
        f"RCPT TO:<{BOB}>\r\n".encode(),
        b"DATA\r\n",
    ]


async def test_data_accepted_after_every_rcpt_was_refused_gets_a_lone_dot(
    start_raw_server: StartRawServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    # RFC 2920: a pipelining client must look at the DATA reply even when no
    # recipient was accepted; after a 354 it sends the "." line alone.
    server = await start_raw_server(replies={"RCPT": b"550 5.1.1 no such user\r\n"})
    relay = make_relay()

    outcome = await relay_message(relay, tmp_path, [server.hop], [ALICE, BOB])

    refused = RecipientResult(550, "no such user", "5.1.1")
    assert delivery(outcome).recipients == {ALICE: refused, BOB: refused}
    (empty,) = server.messages
    assert empty.wire == b".\r\n"
    assert [line for _, line in server.lines][-2:] == [b".", b"RSET"]
    assert relay.cache.idle_connections == 1


# ------------------------------------------------- the body on the wire


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(CONTENT, id="one-chunk"),
        pytest.param(content_across_chunk_boundaries(), id="dot-lines-at-chunk-boundaries"),
        pytest.param(b"", id="empty"),
    ],
)
async def test_the_body_on_the_wire_is_the_body_file_then_the_dot_line(
    start_raw_server: StartRawServer, make_relay: MakeRelay, tmp_path: Path, content: bytes
) -> None:
    server = await start_raw_server()
    msg, body = message_to(tmp_path, [server.hop], [ALICE], content)

    with anyio.fail_after(WAIT_TIMEOUT):
        outcome = await make_relay().relay(msg, body, [ALICE])

    assert delivery(outcome).recipients == {ALICE: QUEUED}
    (received,) = server.messages
    assert received.wire == body.path.read_bytes() + b".\r\n"


async def test_size_counts_the_content_without_stuffing_dots(
    start_raw_server: StartRawServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    content = content_across_chunk_boundaries()
    server = await start_raw_server()
    msg, body = message_to(tmp_path, [server.hop], [ALICE], content)
    assert body.path.stat().st_size > len(content)  # stuffed on disk

    with anyio.fail_after(WAIT_TIMEOUT):
        await make_relay().relay(msg, body, [ALICE])

    mail = next(line for _, line in server.lines if line.startswith(b"MAIL"))
    assert mail.endswith(f" SIZE={len(content)}".encode())


@pytest.mark.parametrize("offers_size", [True, False])
async def test_a_body_read_whole_reaches_a_real_hop_byte_exact_with_its_size(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path, offers_size: bool
) -> None:
    # Over 100 KiB, under what is read whole: dot lines at the start, at a
    # 64 KiB read's end and at the end. SIZE (when the hop offers it)
    # counts the content, not the stuffing dots.
    content = b".first line\r\n" + lines_up_to(CHUNK_SIZE) + b".\r\n..\r\n"
    content += lines_up_to(40_000) + b".last\r\n"
    assert 100 * 1024 < len(content) < 256 * 1024
    server = await start_smtp_server()
    if not offers_size:
        server.behaviour.ehlo_drop = {"SIZE"}
    msg, body = message_to(tmp_path, [server.hop], [ALICE], content)

    with anyio.fail_after(WAIT_TIMEOUT):
        outcome = await make_relay().relay(msg, body, [ALICE])

    assert delivery(outcome).recipients[ALICE].code == 250
    (received,) = server.messages
    assert received.content == content
    sizes = [o for o in received.mail_options if o.upper().startswith("SIZE=")]
    assert sizes == ([f"SIZE={len(content)}"] if offers_size else [])


async def test_a_body_file_that_cannot_be_read_fails_the_attempt_naming_it(
    start_raw_server: StartRawServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    server = await start_raw_server()
    msg, body = message_to(tmp_path, [server.hop], [ALICE])
    body.path.unlink()

    with anyio.fail_after(WAIT_TIMEOUT):
        error = failure(await make_relay().relay(msg, body, [ALICE]))

    assert str(body.path) in error
    assert "No such file" in error
    assert server.connections_opened == 0


# ------------------------------------------ pipelined refusals and faults


async def test_pipelined_refusal_at_mail_applies_to_every_recipient(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    server = await start_smtp_server(pipelining=True)
    server.behaviour.mail = Reply("550 5.7.1 sender rejected")
    relay = make_relay()

    outcome = await relay_message(relay, tmp_path, [server.hop], [ALICE, BOB])

    refused = RecipientResult(550, "sender rejected", "5.7.1")
    assert delivery(outcome).recipients == {ALICE: refused, BOB: refused}
    # The RCPTs and DATA went along (aiosmtpd refuses them without a MAIL),
    # then RSET; the connection carries the next message.
    assert server.verbs() == ["EHLO", "MAIL", "DATA", "RSET"]
    server.behaviour.mail = None
    assert delivery(await relay_message(relay, tmp_path, [server.hop])).recipients == {ALICE: OK}
    assert server.connections_opened == 1


async def test_pipelined_mixed_rcpt_replies_and_every_rcpt_refused(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    server = await start_smtp_server(pipelining=True)
    server.behaviour.rcpt[BOB] = Reply("550 5.1.1 no such user")
    server.behaviour.rcpt[CAROL] = Reply("450 4.2.1 mailbox busy")
    relay = make_relay()

    outcome = await relay_message(relay, tmp_path, [server.hop], [ALICE, BOB, CAROL])

    assert delivery(outcome).recipients == {
        ALICE: OK,
        BOB: RecipientResult(550, "no such user", "5.1.1"),
        CAROL: RecipientResult(450, "mailbox busy", "4.2.1"),
    }
    assert server.messages[0].rcpt_tos == (ALICE,)

    # Now nobody is accepted: DATA went along and was refused (503), RSET.
    outcome = await relay_message(relay, tmp_path, [server.hop], [BOB, CAROL])
    assert delivery(outcome).recipients == {
        BOB: RecipientResult(550, "no such user", "5.1.1"),
        CAROL: RecipientResult(450, "mailbox busy", "4.2.1"),
    }
    assert server.verbs()[-4:] == ["RCPT", "RCPT", "DATA", "RSET"]
    assert len(server.messages) == 1
    assert server.connections_opened == 1


async def test_pipelined_refusal_of_the_data_command_applies_to_the_accepted(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    server = await start_smtp_server(pipelining=True)
    server.behaviour.data = Reply("451 4.3.0 not now")
    server.behaviour.rcpt[BOB] = Reply("550 5.1.1 no such user")

    outcome = await relay_message(make_relay(), tmp_path, [server.hop], [ALICE, BOB])

    assert delivery(outcome).recipients == {
        ALICE: RecipientResult(451, "not now", "4.3.0"),
        BOB: RecipientResult(550, "no such user", "5.1.1"),
    }
    assert server.messages == []


@pytest.mark.parametrize("where", ["mail", "rcpt", "data", "data-end"])
async def test_pipelined_421_anywhere_answers_everyone_and_drops_the_connection(
    start_smtp_server: StartServer, make_relay: MakeRelay, tmp_path: Path, where: str
) -> None:
    server = await start_smtp_server(pipelining=True)
    closing = Reply("421 4.7.0 mx.test closing connection")
    behaviour = server.behaviour
    if where == "mail":
        behaviour.mail = closing
    elif where == "rcpt":
        behaviour.rcpt[BOB] = closing
    elif where == "data":
        behaviour.data = closing
    else:
        behaviour.data_end = closing
    relay = make_relay()

    got = delivery(await relay_message(relay, tmp_path, [server.hop], [ALICE, BOB]))

    answer = RecipientResult(421, "mx.test closing connection", "4.7.0")
    assert got.recipients == {ALICE: answer, BOB: answer}
    assert relay.cache.open_connections == 0
    # Once the client has hung up, nothing more can come on the connection.
    await wait_until(lambda: server.connections_closed == 1, "the client to hang up")
    assert "RSET" not in server.verbs()
    assert server.messages == []


def write_large_body(path: Path, size: int) -> str:
    """Overwrite ``path`` with ``size`` bytes or so of wire-form body (80-byte
    lines, one stuffed dot line per MiB); the SHA-256 of body plus ``.\\r\\n``."""
    block = b"..dot line\r\n" + lines_up_to(MiB - 12)
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(max(1, size // MiB)):
            f.write(block)
            digest.update(block)
    digest.update(b".\r\n")
    return digest.hexdigest()


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelining"])
@pytest.mark.parametrize("where", ["after-data-command", "mid-body", "before-final-reply"])
async def test_a_disconnect_in_data_fails_the_attempt_and_drops_the_connection(
    start_smtp_server: StartServer,
    make_relay: MakeRelay,
    tmp_path: Path,
    where: str,
    pipelining: bool,
) -> None:
    server = await start_smtp_server(pipelining=pipelining)
    relay = make_relay(route(command_timeout=5.0, message_timeout=20.0))
    msg, body = message_to(tmp_path, [server.hop], [ALICE, BOB])
    if where == "after-data-command":
        server.behaviour.data = DISCONNECT
    elif where == "mid-body":
        # 8 MiB: more than the socket buffers hold, so the client is still
        # writing when the server hangs up after the first line.
        write_large_body(body.path, 8 * MiB)
        server.behaviour.disconnect_in_data = True
    else:
        server.behaviour.data_end = DISCONNECT

    with anyio.fail_after(WAIT_TIMEOUT):
        outcome = await relay.relay(msg, body, [ALICE, BOB])

    if where == "before-final-reply":  # all was sent: the hop may have it
        results = delivery(outcome).recipients
        assert {r.in_doubt for r in results.values()} == {True}
        assert all("connection lost" in r.text for r in results.values())
    else:
        assert failure(outcome).startswith(f"{server.hop}: connection lost")
    assert server.messages == []
    assert relay.cache.open_connections == 0

    server.behaviour = Behaviour()
    assert delivery(await relay_message(relay, tmp_path, [server.hop])).recipients == {ALICE: OK}
    assert server.messages[0].connection == 2


# ---------------------------------------------------------- TLS and AUTH


async def test_starttls_then_auth_then_a_multi_chunk_body(
    start_smtp_server: StartServer,
    tls_certificate: TlsCertificate,
    make_relay: MakeRelay,
    tmp_path: Path,
) -> None:
    server = await start_smtp_server(
        tls_context=tls_certificate.server_context(),
        credentials=(USER, PASSWORD),
        auth_require_tls=True,
        pipelining=True,
    )
    relay = make_relay(route(tls="required", verify_certificates=False, auth=(USER, PASSWORD)))
    # Several chunks, dot lines at their boundaries, and an 8-bit byte only
    # well after the first chunk (found by the scan, not by the first read).
    content = content_across_chunk_boundaries() + lines_up_to(300_000) + b"caf\xc3\xa9\r\n"
    msg, body = message_to(tmp_path, [server.hop], [ALICE, BOB], content)
    assert body.path.read_bytes()[:CHUNK_SIZE].isascii()

    with anyio.fail_after(WAIT_TIMEOUT):
        outcome = await relay.relay(msg, body, [ALICE, BOB])

    assert delivery(outcome) == Delivery({ALICE: OK, BOB: OK}, server.hop)
    assert server.verbs()[:4] == ["EHLO", "STARTTLS", "EHLO", "MAIL"]
    assert server.auth_attempts == [(USER, True)]
    (received,) = server.messages
    assert received.tls
    assert received.login == USER
    assert received.content == content
    assert set(received.mail_options) == {f"SIZE={len(content)}", "BODY=8BITMIME"}


# ---------------------------------------------------------------- memory


async def test_relaying_a_30_mb_message_takes_less_than_10_mb(
    start_raw_server: StartRawServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    """Memory is measured with :mod:`tracemalloc`: the peak of Python
    allocations (all threads) during the attempt, above what was allocated
    when it began. It counts what the relay allocates -- chunks, transport
    buffers, copies -- whatever the timing, and nothing of the page cache or
    the kernel's socket buffers, so the number does not depend on machine
    load. The server is the raw one in the same loop with
    ``keep_content=False``: it keeps a size and a digest, never the content
    (aiosmtpd would hold all 30 MB itself). A connection is made with a
    small message first, so one-time costs (imports, the HELO name) are not
    in the measure. The same measure around ``BodyHandle.read`` shows that
    it does see a whole body held in memory."""
    server = await start_raw_server(keep_content=False)
    relay = make_relay(route(command_timeout=30.0, message_timeout=120.0))
    assert delivery(await relay_message(relay, tmp_path, [server.hop])).recipients == {
        ALICE: QUEUED
    }
    msg, body = message_to(tmp_path, [server.hop], [ALICE])
    digest = write_large_body(body.path, 30 * MiB)
    size = body.path.stat().st_size
    assert size >= 30 * MiB

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with anyio.fail_after(120):
            outcome = await relay.relay(msg, body, [ALICE])
        relay_peak = tracemalloc.get_traced_memory()[1] - before

        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        whole = await BodyHandle(body.path).read()
        read_peak = tracemalloc.get_traced_memory()[1] - before
        del whole
    finally:
        tracemalloc.stop()

    assert delivery(outcome).recipients == {ALICE: QUEUED}
    received = server.messages[-1]
    assert (received.size, received.sha256) == (size + 3, digest)
    assert read_peak > 30 * MiB  # the instrument sees a body held whole
    assert relay_peak < 10 * MiB, f"{relay_peak / MiB:.1f} MiB at the peak"
