"""The SMTP client on its own, against a raw scripted server.

:class:`~spoold.smtp_client.SmtpClient` is driven directly against
:class:`tests.raw_smtp_server.RawSmtpServer`, which can send any reply
(multi-line, malformed, overlong, refusing) and records every command line
and the boundaries of each read. What the relay makes of the client is in
``test_smtp_relay.py`` and ``test_relay_*.py``.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator

import pytest

from spoold.errors import (
    SmtpConnectionError,
    SmtpError,
    SmtpProtocolError,
    SmtpReplyError,
    SmtpServiceClosingError,
    SmtpTimeoutError,
)
from spoold.smtp_client import (
    _KNOWN_MOST,
    MAX_REPLY_SIZE,
    EnvelopeReplies,
    SmtpClient,
    SmtpReply,
    _ReplyReader,
)
from tests.raw_smtp_server import NO_REPLY, RawSmtpServer, StartRawServer
from tests.smtp_server import Reply, StartServer
from tests.support import free_port, wait_until

PATIENT = 10.0
"""The timeouts of every wait that must not time out: far longer than any
answer on loopback takes, however busy the machine. A test of a timeout
gives its own short one to the one command it is about."""


async def connect(server: RawSmtpServer, max_reply_size: int = MAX_REPLY_SIZE) -> SmtpClient:
    return await SmtpClient.connect(
        "127.0.0.1",
        server.port,
        connect_timeout=PATIENT,
        command_timeout=PATIENT,
        max_reply_size=max_reply_size,
    )


def commands(server: RawSmtpServer) -> list[bytes]:
    return [line for _, line in server.lines]


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


# ----------------------------------------------------------------- replies


async def test_multi_line_reply_keeps_every_line_and_splits_the_enhanced_code(
    start_raw_server: StartRawServer,
) -> None:
    server = await start_raw_server(
        replies={"NOOP": b"250-2.0.0 first line\r\n250-2.0.0 second\r\n250 2.0.0 last\r\n"}
    )
    client = await connect(server)

    reply = await client.noop()

    assert reply == SmtpReply(250, ("first line", "second", "last"), "2.0.0")
    assert reply.text == "first line\nsecond\nlast"
    assert str(reply) == "250 2.0.0 first line second last"
    assert client.usable


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"250 ok\r\n", SmtpReply(250, ("ok",))),
        (b"250\r\n", SmtpReply(250, ("",))),
        (b"250 2.1.0\r\n", SmtpReply(250, ("",), "2.1.0")),
        (b"550 5.1.1 <x@y> no such user\r\n", SmtpReply(550, ("<x@y> no such user",), "5.1.1")),
        # An enhanced code of another class than the reply is left in the text.
        (b"250 4.0.0 odd\r\n", SmtpReply(250, ("4.0.0 odd",))),
        # A bare LF ends a line too.
        (b"250 lenient\n", SmtpReply(250, ("lenient",))),
        (b"250 caf\xc3\xa9\r\n", SmtpReply(250, ("caf\u00e9",))),
    ],
)
async def test_reply_forms(
    start_raw_server: StartRawServer, raw: bytes, expected: SmtpReply
) -> None:
    server = await start_raw_server(replies={"NOOP": raw})
    client = await connect(server)
    assert await client.noop() == expected


def fed(*chunks: bytes) -> tuple[_ReplyReader, list[SmtpReply]]:
    """A reply reader fed ``chunks`` as if each came in one read; the
    replies it parsed, in order."""
    reader = _ReplyReader(asyncio.get_running_loop(), MAX_REPLY_SIZE)
    for chunk in chunks:
        reader.data_received(chunk)
    assert reader.error is None
    return reader, list(reader.replies)


async def test_a_multi_line_reply_after_a_known_one_line_reply_keeps_its_lines() -> None:
    """One-line replies are kept parsed by their line; a line of a
    multi-line reply equal to one of them (its last one here) is still a
    line of that reply, not a reply of its own."""
    _, replies = fed(
        b"250 OK\r\n",
        b"250-OK\r\n250 second line\r\n",
        b"250-first\r\n250 OK\r\n",
        b"250 OK\r\n",
    )
    assert replies == [
        SmtpReply(250, ("OK",)),
        SmtpReply(250, ("OK", "second line")),
        SmtpReply(250, ("first", "OK")),
        SmtpReply(250, ("OK",)),
    ]


async def test_known_one_line_replies_with_the_same_text_keep_their_codes() -> None:
    _, replies = fed(*[b"250 OK\r\n", b"550 OK\r\n", b"251 OK\r\n"] * 2, b"450 4.2.0 OK\r\n")
    assert [(r.code, r.lines, r.enhanced_status) for r in replies] == [
        *[(250, ("OK",), None), (550, ("OK",), None), (251, ("OK",), None)] * 2,
        (450, ("OK",), "4.2.0"),
    ]


async def test_the_known_replies_of_a_connection_are_bounded() -> None:
    """A hop whose every reply differs (a queue id in each) makes the
    reader keep no more than a few of them; every reply is still parsed."""
    lines = [f"250 2.0.0 queued as {n:06d}\r\n".encode() for n in range(3 * _KNOWN_MOST)]
    reader, replies = fed(*lines, lines[0], lines[-1])
    assert [r.lines for r in replies] == [
        *[(f"queued as {n:06d}",) for n in range(3 * _KNOWN_MOST)],
        ("queued as 000000",),
        (f"queued as {3 * _KNOWN_MOST - 1:06d}",),
    ]
    assert len(reader._known) == _KNOWN_MOST


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (b"hello there\r\n", "malformed reply line"),
        (b"25 short\r\n", "malformed reply line"),
        (b"650 no such class\r\n", "malformed reply line"),
        (b"250_no separator\r\n", "malformed reply line"),
        (b"250-one\r\n251 two\r\n", "different codes"),
    ],
)
async def test_a_malformed_reply_is_a_protocol_error_and_closes_the_client(
    start_raw_server: StartRawServer, raw: bytes, complaint: str
) -> None:
    server = await start_raw_server(replies={"NOOP": raw})
    client = await connect(server)

    with pytest.raises(SmtpProtocolError, match=complaint):
        await client.noop()

    assert not client.usable
    await wait_until(lambda: server.connections_closed == 1, "the client to hang up")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"250-" + b"x" * 300 + b"\r\n" + b"250 end\r\n", id="many-lines"),
        pytest.param(b"250 " + b"x" * 2000 + b"\r\n", id="one-long-line"),
        pytest.param(b"250 " + b"x" * 2000, id="no-line-end"),
    ],
)
async def test_a_reply_over_the_cap_is_a_protocol_error(
    start_raw_server: StartRawServer, raw: bytes
) -> None:
    server = await start_raw_server(replies={"NOOP": raw})
    client = await connect(server, max_reply_size=256)

    with pytest.raises(SmtpProtocolError, match="longer than 256 bytes"):
        await client.noop()
    assert not client.usable


async def test_a_reply_that_never_comes_times_out_and_closes_the_client(
    start_raw_server: StartRawServer,
) -> None:
    server = await start_raw_server(replies={"NOOP": NO_REPLY})
    client = await connect(server)

    with pytest.raises(SmtpTimeoutError, match=r"timeout: no reply to NOOP within 0\.2s"):
        await client.noop(timeout=0.2)

    assert not client.usable
    await wait_until(lambda: server.connections_closed == 1, "the client to hang up")


async def test_421_to_any_command_is_service_closing(start_raw_server: StartRawServer) -> None:
    server = await start_raw_server(replies={"RSET": b"421 4.4.2 idle too long\r\n"})
    client = await connect(server)

    with pytest.raises(SmtpServiceClosingError) as info:
        await client.rset()

    assert (info.value.code, info.value.enhanced_status) == (421, "4.4.2")
    assert str(info.value) == "421 4.4.2 idle too long"
    assert not client.usable


async def test_something_unasked_for_makes_an_idle_client_unusable(
    start_raw_server: StartRawServer,
) -> None:
    # A server that times a client out says 421 and then hangs up; a client
    # holding an unread reply is out of step and must not be reused.
    server = await start_raw_server(replies={"NOOP": b"250 ok\r\n250 extra\r\n"})
    client = await connect(server)
    assert await client.noop() == SmtpReply(250, ("ok",))
    await wait_until(lambda: not client.usable, "the extra reply to arrive")


# ------------------------------------------------------------- greeting


async def test_a_refusing_greeting_is_a_reply_error(start_raw_server: StartRawServer) -> None:
    server = await start_raw_server(replies={"GREETING": b"554 5.3.2 not today\r\n"})
    with pytest.raises(SmtpReplyError, match=r"^554 5\.3\.2 not today$"):
        await connect(server)
    await wait_until(lambda: server.connections_closed == 1, "the client to hang up")


async def test_connection_refused_is_a_connection_error() -> None:
    port = free_port()
    with pytest.raises(SmtpConnectionError) as refused:
        await SmtpClient.connect(
            "127.0.0.1", port, connect_timeout=PATIENT, command_timeout=PATIENT
        )
    assert str(refused.value) == "cannot connect: Connection refused"


# ----------------------------------------------------------------- hello


async def test_ehlo_reads_the_extensions(start_raw_server: StartRawServer) -> None:
    server = await start_raw_server(extensions=["PIPELINING", "SIZE 1000", "auth login Plain"])
    client = await connect(server)

    await client.hello("client.example")

    assert commands(server) == [b"EHLO client.example"]
    assert client.pipelining
    assert client.size_limit == 1000
    assert client.auth_mechanisms == {"LOGIN", "PLAIN"}
    assert not client.supports("8BITMIME")


@pytest.mark.parametrize("refusal", [b"502 5.5.1 no EHLO\r\n", b"500 what?\r\n"])
async def test_helo_when_ehlo_is_refused_with_5xx(
    start_raw_server: StartRawServer, refusal: bytes
) -> None:
    server = await start_raw_server(replies={"EHLO": refusal})
    client = await connect(server)

    await client.hello("client.example")

    assert commands(server) == [b"EHLO client.example", b"HELO client.example"]
    assert client.extensions == {}
    assert client.size_limit is None
    assert not client.pipelining
    assert client.usable


async def test_ehlo_refused_with_4xx_is_not_retried_as_helo(
    start_raw_server: StartRawServer,
) -> None:
    server = await start_raw_server(replies={"EHLO": b"451 4.3.0 later\r\n"})
    client = await connect(server)

    with pytest.raises(SmtpReplyError, match=r"^451"):
        await client.hello("client.example")
    assert commands(server) == [b"EHLO client.example"]


# ------------------------------------------------------------- STARTTLS


async def test_data_after_the_starttls_reply_is_refused_as_injection(
    start_raw_server: StartRawServer,
) -> None:
    server = await start_raw_server(
        extensions=["STARTTLS"], replies={"STARTTLS": b"220 go ahead\r\n250 injected\r\n"}
    )
    client = await connect(server)
    await client.hello("client.example")

    with pytest.raises(SmtpProtocolError, match="after its STARTTLS reply"):
        await client.starttls(ssl.create_default_context(), "127.0.0.1")

    assert not client.tls_active
    await wait_until(lambda: server.connections_closed == 1, "the client to hang up")


# ----------------------------------------------------------------- AUTH


async def test_auth_login_when_plain_is_not_offered(start_raw_server: StartRawServer) -> None:
    server = await start_raw_server(extensions=["AUTH LOGIN"])
    client = await connect(server)
    await client.hello("client.example")

    await client.authenticate("user", "pass:word")

    assert commands(server)[1:] == [
        b"AUTH LOGIN",
        base64.b64encode(b"user"),
        base64.b64encode(b"pass:word"),
    ]


async def test_auth_plain_sends_one_line(start_raw_server: StartRawServer) -> None:
    server = await start_raw_server(
        extensions=["AUTH PLAIN LOGIN"], replies={"AUTH": b"235 2.7.0 ok\r\n"}
    )
    client = await connect(server)
    await client.hello("client.example")

    await client.authenticate("user", "pass")

    assert commands(server)[1:] == [b"AUTH PLAIN " + base64.b64encode(b"\0user\0pass")]


async def test_auth_refused_is_a_reply_error_without_the_password(
    start_raw_server: StartRawServer,
) -> None:
    server = await start_raw_server(
        extensions=["AUTH PLAIN"], replies={"AUTH": b"535 5.7.8 bad credentials\r\n"}
    )
    client = await connect(server)
    await client.hello("client.example")

    with pytest.raises(SmtpReplyError) as info:
        await client.authenticate("user", "s3cret")
    assert str(info.value) == "535 5.7.8 bad credentials"
    assert "s3cret" not in repr(info.value)


async def test_auth_without_a_known_mechanism_is_an_error(
    start_raw_server: StartRawServer,
) -> None:
    server = await start_raw_server(extensions=["AUTH CRAM-MD5"])
    client = await connect(server)
    await client.hello("client.example")

    with pytest.raises(SmtpError, match="neither AUTH PLAIN nor AUTH LOGIN"):
        await client.authenticate("user", "pass")
    assert commands(server) == [b"EHLO client.example"]


# ---------------------------------------------------------- transaction

MAIL = b"MAIL FROM:<s@example.org>\r\n"
RCPTS = [b"RCPT TO:<a@example.com>\r\n", b"RCPT TO:<b@example.com>\r\n"]


async def test_with_pipelining_the_envelope_goes_in_one_write(
    start_raw_server: StartRawServer,
) -> None:
    # The server answers nothing before DATA: a client waiting for the
    # MAIL reply would time out.
    server = await start_raw_server(hold_until_data=True)
    client = await connect(server)
    await client.hello("client.example")

    replies = await client.send_envelope(MAIL, RCPTS)

    ok = SmtpReply(250, ("ok",), "2.0.0")
    assert (replies.mail, replies.rcpts) == (ok, (ok, ok))
    assert replies.data == SmtpReply(354, ("go ahead",))
    assert server.command_reads()[-1] == MAIL + b"".join(RCPTS) + b"DATA\r\n"


async def test_without_pipelining_commands_go_one_by_one(
    start_raw_server: StartRawServer,
) -> None:
    server = await start_raw_server(extensions=["SIZE"])
    client = await connect(server)
    await client.hello("client.example")

    replies = await client.send_envelope(MAIL, RCPTS)

    assert replies.data == SmtpReply(354, ("go ahead",))
    assert server.command_reads()[-4:] == [MAIL, *RCPTS, b"DATA\r\n"]


async def test_without_pipelining_nothing_follows_a_refused_mail(
    start_raw_server: StartRawServer,
) -> None:
    server = await start_raw_server(extensions=[], replies={"MAIL": b"550 5.7.1 no\r\n"})
    client = await connect(server)
    await client.hello("client.example")

    replies = await client.send_envelope(MAIL, RCPTS)

    assert replies.mail == SmtpReply(550, ("no",), "5.7.1")
    assert replies.rcpts == (None, None)
    assert replies.data is None
    assert commands(server)[-1] == MAIL.strip()
    assert client.usable


PIPELINED_REPLIES = EnvelopeReplies(
    SmtpReply(250, ("sender ok",), "2.1.0"),
    (SmtpReply(250, ("recipient ok",), "2.1.5"), SmtpReply(250, ("recipient ok",), "2.1.5")),
    SmtpReply(354, ("End data with <CR><LF>.<CR><LF>",)),
)


async def test_pipelined_replies_sent_at_once_read_as_replies_sent_one_by_one(
    start_raw_server: StartRawServer, start_smtp_server: StartServer
) -> None:
    """A pipelined envelope's replies read the same whether they arrive in
    one write (those already in are taken without a wait) or one by one,
    each a while after the one before."""
    together = await start_raw_server(
        hold_until_data=True,
        replies={
            "MAIL": b"250 2.1.0 sender ok\r\n",
            "RCPT": b"250 2.1.5 recipient ok\r\n",
            "DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
        },
    )
    client = await connect(together)
    await client.hello("client.example")
    assert client.pipelining
    at_once = await client.send_envelope(MAIL, RCPTS)
    assert together.command_reads()[-1] == MAIL + b"".join(RCPTS) + b"DATA\r\n"
    client.close()

    one_by_one = await start_smtp_server(pipelining=True)
    one_by_one.behaviour.mail = Reply("250 2.1.0 sender ok", delay=0.05)
    for rcpt in ("a@example.com", "b@example.com"):
        one_by_one.behaviour.rcpt[rcpt] = Reply("250 2.1.5 recipient ok", delay=0.05)
    client = await SmtpClient.connect(
        "127.0.0.1", one_by_one.port, connect_timeout=PATIENT, command_timeout=PATIENT
    )
    await client.hello("client.example")
    assert client.pipelining
    apart = await client.send_envelope(MAIL, RCPTS)
    client.close()

    assert at_once == apart == PIPELINED_REPLIES


async def test_a_pipelined_421_ends_the_session_whether_replies_come_at_once_or_apart(
    start_raw_server: StartRawServer, start_smtp_server: StartServer
) -> None:
    """421 to a RCPT is the server closing: an error, not a refusal of
    that recipient, be it read with the others at once or alone."""
    together = await start_raw_server(
        hold_until_data=True, replies={"RCPT": b"421 4.3.2 closing\r\n"}
    )
    client = await connect(together)
    await client.hello("client.example")
    with pytest.raises(SmtpServiceClosingError):
        await client.send_envelope(MAIL, RCPTS)
    assert not client.usable

    one_by_one = await start_smtp_server(pipelining=True)
    one_by_one.behaviour.mail = Reply(delay=0.05)
    one_by_one.behaviour.rcpt["a@example.com"] = Reply("421 4.3.2 closing", delay=0.05)
    client = await SmtpClient.connect(
        "127.0.0.1", one_by_one.port, connect_timeout=PATIENT, command_timeout=PATIENT
    )
    await client.hello("client.example")
    with pytest.raises(SmtpServiceClosingError):
        await client.send_envelope(MAIL, RCPTS)
    assert not client.usable


async def ready_for_content(server: RawSmtpServer) -> SmtpClient:
    """A client whose transaction (one recipient) has had its 354."""
    client = await connect(server)
    await client.hello("client.example")
    replies = await client.send_envelope(MAIL, RCPTS[:1])
    assert replies.data == SmtpReply(354, ("go ahead",))
    return client


async def test_content_is_sent_as_given_and_ended_with_a_dot_line(
    start_raw_server: StartRawServer,
) -> None:
    server = await start_raw_server()
    client = await ready_for_content(server)

    reply = await client.send_content(chunks(b"a\r\n..b\r", b"\n", b"c\r\n"), timeout=PATIENT)

    assert reply == SmtpReply(250, ("queued",), "2.0.0")
    (message,) = server.messages
    assert message.wire == b"a\r\n..b\r\nc\r\n.\r\n"


@pytest.mark.parametrize(
    ("parts", "wire"),
    [
        pytest.param((), b".\r\n", id="empty"),
        pytest.param((b"no line end",), b"no line end\r\n.\r\n", id="no-final-crlf"),
        pytest.param((b"x\r", b"\n"), b"x\r\n.\r\n", id="crlf-split-across-chunks"),
    ],
)
async def test_content_edges(
    start_raw_server: StartRawServer, parts: tuple[bytes, ...], wire: bytes
) -> None:
    server = await start_raw_server()
    client = await ready_for_content(server)

    await client.send_content(chunks(*parts), timeout=PATIENT)

    assert server.messages[0].wire == wire


async def test_a_failing_content_source_closes_the_client(
    start_raw_server: StartRawServer,
) -> None:
    server = await start_raw_server()
    client = await ready_for_content(server)

    async def broken() -> AsyncIterator[bytes]:
        yield b"first\r\n"
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output"):
        await client.send_content(broken(), timeout=PATIENT)
    assert not client.usable
    await wait_until(lambda: server.connections_closed == 1, "the client to hang up")
    assert server.messages == []


async def test_quit_says_goodbye_and_closes(start_raw_server: StartRawServer) -> None:
    server = await start_raw_server()
    client = await connect(server)

    await client.quit()

    assert commands(server) == [b"QUIT"]
    assert not client.usable
    await wait_until(lambda: server.connections_closed == 1, "the connection to close")
