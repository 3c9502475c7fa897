"""The SMTP listener against hostile and odd clients, over real sockets.

Each test runs a :class:`~spoold.daemon.listener.SmtpListener` on a free
``127.0.0.1`` port in its own task group, with a spool whose relay holds
every attempt (what was spooled stays on disk to be looked at), and talks to
it with raw bytes (nothing normalised for us) or :mod:`smtplib` in a worker
thread. The delay of a failed AUTH goes through an injected sleep that
records what was asked and returns at once (or waits for the test).

Every test is bounded by :func:`anyio.fail_after`.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import functools
import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.tls import TLSStream

from spoold.daemon import logs
from spoold.daemon.config import Config, parse_config
from spoold.daemon.ingest import Submitter
from spoold.daemon.listener import _IDLE_FLOOR, SmtpListener, listener_settings
from spoold.daemon.mx import MxResolver
from spoold.daemon.routing import Router
from spoold.errors import MxError, SpooldError
from spoold.message import Message
from spoold.spool import Spool
from spoold.testing import Faults, InMemoryRelay
from tests.daemon_helpers import DaemonFactory, cli, set_config_value, write_config
from tests.ingest_helpers import (
    HOSTNAME,
    RCPT,
    SENDER,
    HeldRelay,
    RawSmtp,
    client_context,
    make_config,
    queued_ids,
    raw_smtp,
)
from tests.log_helpers import logging_kept
from tests.smtp_server import TlsCertificate
from tests.support import NOT_ASCII_DIGITS, free_port, spool_files, wait_until

TIMEOUT = 60.0  # a safety net per test: none comes near it
PASSWORD = "s3cret"
MESSAGE = b"Subject: test\r\n\r\nhello\r\n"


@dataclass
class Served:
    spool: Spool
    listener: SmtpListener
    port: int

    def messages(self) -> list[Message]:
        return self.spool.status()


class RecordedSleep:
    """The listener's sleep: records each delay; returns at once unless
    :attr:`hold` is set, then waits for :attr:`release`."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.hold = False
        self.release = anyio.Event()

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.hold:
            await self.release.wait()


@asynccontextmanager
async def serving(
    tmp_path: Path,
    smtp: dict[str, Any] | None = None,
    *,
    tls: TlsCertificate | None = None,
    auth: bool = False,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[Served]:
    port = free_port()
    smtp = dict(smtp or {})
    if tls is not None:
        smtp.update(tls_cert=str(tls.cert), tls_key=str(tls.key))
    if auth:
        users = tmp_path / "users"
        users.write_text(f"alice:{PASSWORD}\n")
        users.chmod(0o600)
        smtp["auth_file"] = str(users)
    config = make_config(tmp_path, port, smtp=smtp)
    assert config.smtp is not None
    settings = await anyio.to_thread.run_sync(listener_settings, config.smtp)
    async with Spool.open(
        config.spool.dir, relay=HeldRelay(), flush_timeout=0.1, ping_interval=10.0**9
    ) as spool:
        router = Router(config)
        submitter = Submitter(spool, lambda: router, hostname=HOSTNAME)
        options: dict[str, Any] = {"sleep": sleep} if sleep is not None else {}
        if clock is not None:
            options["clock"] = clock
        listener = SmtpListener(submitter, lambda: settings, **options)
        async with anyio.create_task_group() as tg:
            await tg.start(listener.serve)
            try:
                yield Served(spool, listener, port)
            finally:
                tg.cancel_scope.cancel()


async def send_line(c: RawSmtp, line: bytes) -> tuple[int, str]:
    await c.send(line + b"\r\n")
    return await c.reply()


def plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def extensions(ehlo_text: str) -> set[str]:
    return {line[4:].split()[0].upper() for line in ehlo_text.splitlines()[1:]}


async def ends_with(c: RawSmtp, code: str) -> bytes:
    """The rest of what the server sends before it closes: must be one
    reply starting with ``code``."""
    rest = await c.rest()
    assert rest.startswith(code.encode() + b" "), rest
    assert rest.count(b"\r\n") == 1, rest
    return rest


# --------------------------------------------- addresses: the reply table

GOOD_MAIL = f"MAIL FROM:<{SENDER}>".encode()


@pytest.mark.parametrize(
    ("mail", "rcpt", "reply"),
    [
        # What the review saw: accepted, or 451 for ever.
        (GOOD_MAIL, b"RCPT TO:<>", "553 5.1.3"),
        (GOOD_MAIL, b"RCPT TO:<a\x00b@example.com>", "501 5.1.3"),
        (GOOD_MAIL, b"RCPT TO:<\xff\xfe@example.com>", "553 5.6.7"),
        # Syntax, length, parameters.
        (GOOD_MAIL, b"RCPT TO:<a..b@example.com>", "501 5.1.3"),
        (GOOD_MAIL, b"RCPT TO:b@example.com", "501 5.1.3"),
        (GOOD_MAIL, b"RCPT TO:<b@example.com", "501 5.1.3"),
        (GOOD_MAIL, b"RCPT <b@example.com>", "501 5.5.4"),
        (GOOD_MAIL, b"RCPT TO:<" + b"a" * 65 + b"@example.com>", "553 5.1.3"),
        (GOOD_MAIL, b"RCPT TO:<b@example.com> NOTIFY=NEVER", "555 5.5.4"),
        # Non-ASCII: only with SMTPUTF8, and only valid UTF-8.
        (GOOD_MAIL, "RCPT TO:<dörte@example.com>".encode(), "553 5.6.7"),
        (GOOD_MAIL + b" SMTPUTF8", b"RCPT TO:<\xff\xfe@example.com>", "501 5.1.3"),
    ],
)
async def test_a_refused_recipient_gets_its_code_and_the_good_one_is_spooled(
    tmp_path: Path, mail: bytes, rcpt: bytes, reply: str
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path) as served, raw_smtp(served.port) as c:
            code, text = await send_line(c, mail)
            assert code == 250, text
            code, text = await send_line(c, rcpt)
            assert text.startswith(reply + " "), text
            code, text = await c.command(f"RCPT TO:<{RCPT}>")
            assert code == 250, text
            assert (await c.command("DATA"))[0] == 354
            await c.send(MESSAGE + b".\r\n")
            code, text = await c.reply()
            assert code == 250, text
            await c.quit()
            (msg,) = served.messages()
            assert msg.remaining_recipients == [RCPT]
            assert msg.envelope_info.recipients == [RCPT]


@pytest.mark.parametrize(
    ("mail", "reply"),
    [
        (b"MAIL FROM:<>", "250 2.1.0"),
        (b"MAIL FROM: <a@example.org>", "250 2.1.0"),
        (b"MAIL FROM:<@relay.example,@b.example:a@example.org>", "250 2.1.0"),
        (b"MAIL <a@example.org>", "501 5.5.4"),
        (b"MAIL FROM:a@example.org", "553 5.1.7"),
        (b"MAIL FROM:<a b@example.org>", "553 5.1.7"),
        (b"MAIL FROM:<a\rb@example.org>", "553 5.1.7"),
        ("MAIL FROM:<dörte@example.org>".encode(), "553 5.6.7"),
        ("MAIL FROM:<dörte@example.org> SMTPUTF8".encode(), "250 2.1.0"),
        (b"MAIL FROM:<\xff@example.org>", "553 5.6.7"),
        (b"MAIL FROM:<a@example.org> FOO=bar", "555 5.5.4"),
        (b"MAIL FROM:<a@example.org> BODY=BINARYMIME", "501 5.5.4"),
        (b"MAIL FROM:<a@example.org> SIZE=x", "501 5.5.4"),
        (b"MAIL FROM:<a@example.org> SIZE=1000001", "552 5.3.4"),
        (b"MAIL FROM:<a@example.org> SIZE=1000000 BODY=8BITMIME", "250 2.1.0"),
    ],
)
async def test_mail_from_replies(tmp_path: Path, mail: bytes, reply: str) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            serving(tmp_path, {"max_message_size": 1_000_000}) as served,
            raw_smtp(served.port) as c,
        ):
            _, text = await send_line(c, mail)
            assert text.startswith(reply + " "), text
            await c.quit()


@pytest.mark.parametrize("smtputf8", ["", " SMTPUTF8"])
async def test_a_size_not_in_ascii_digits_is_a_syntax_error_and_the_session_goes_on(
    tmp_path: Path, smtputf8: str
) -> None:
    """``SIZE=`` in digits that str.isdigit() takes (superscript two, which
    int() refuses; Arabic-Indic ten, which int() reads as 10) is a syntax
    error (501, RFC 5321 §4.1.1.11), not a number and not a crash: the
    session takes a good MAIL next and the message."""
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path) as served, raw_smtp(served.port) as c:
            for digits in NOT_ASCII_DIGITS:
                line = f"MAIL FROM:<a@example.org> SIZE={digits}{smtputf8}".encode()
                code, text = await send_line(c, line)
                assert (code, text[:9]) == (501, "501 5.5.4"), text
            assert (await send_line(c, b"MAIL FROM:<a@example.org> SIZE=20"))[0] == 250
            assert (await send_line(c, f"RCPT TO:<{RCPT}>".encode()))[0] == 250
            assert (await c.command("DATA"))[0] == 354
            await c.send(MESSAGE + b".\r\n")
            assert (await c.reply())[0] == 250
            await c.quit()
            assert len(served.messages()) == 1


async def test_the_source_route_is_dropped_and_parameters_kept(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path) as served, raw_smtp(served.port) as c:
            mail = "MAIL FROM:<@relay.example:dörte@bücher.example> BODY=8BITMIME SMTPUTF8 SIZE=99"
            assert (await send_line(c, mail.encode()))[0] == 250
            assert (await send_line(c, "RCPT TO:<@x.example:jürgen@example.com>".encode()))[
                0
            ] == 250
            assert (await c.command("DATA"))[0] == 354
            await c.send(MESSAGE + b".\r\n")
            assert (await c.reply())[0] == 250
            await c.quit()
            (msg,) = served.messages()
            assert msg.envelope_info.sender == "dörte@bücher.example"
            assert msg.remaining_recipients == ["jürgen@example.com"]
            assert msg.envelope_info.mail_params == ["BODY=8BITMIME", "SMTPUTF8"]


# ------------------------------------------------------------ sequence


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        ([b"MAIL FROM:<a@example.org>"], "503 5.5.1"),  # before EHLO
        ([b"EHLO c", b"RCPT TO:<b@example.com>"], "503 5.5.1"),
        ([b"EHLO c", b"DATA"], "503 5.5.1"),
        ([b"EHLO c", b"MAIL FROM:<a@example.org>", b"DATA"], "503 5.5.1"),
        ([b"EHLO c", b"MAIL FROM:<a@example.org>", b"RCPT TO:<>", b"DATA"], "554 5.5.1"),
        ([b"EHLO c", b"MAIL FROM:<a@example.org>", b"MAIL FROM:<a@example.org>"], "503 5.5.1"),
        ([b"EHLO"], "501 5.5.4"),
        ([b"HELO c", b"MAIL FROM:<a@example.org> BODY=8BITMIME"], "555 5.5.4"),
        ([b"EHLO c", b"EXPN staff"], "500 5.5.1"),
        ([b"EHLO c", b"BDAT 10 LAST"], "500 5.5.1"),
        ([b"EHLO c", b"VRFY someone"], "252 2.5.0"),
        ([b"EHLO c", b"HELP"], "214 2.0.0"),
        ([b"EHLO c", b"NOOP " + b"x" * 600], "500 5.5.2"),
        ([b"EHLO c", b"STARTTLS"], "502 5.5.1"),  # no certificate
        ([b"EHLO c", b"AUTH PLAIN " + plain("alice", "x").encode()], "502 5.5.1"),  # no users
        ([b"EHLO c", b"DATA x"], "501 5.5.4"),
    ],
)
async def test_commands_out_of_sequence_or_malformed(
    tmp_path: Path, lines: list[bytes], reply: str
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path) as served, raw_smtp(served.port, ehlo=None) as c:
            for line in lines:
                _, text = await send_line(c, line)
            assert text.startswith(reply + " "), text
            await c.quit()
            assert served.messages() == []


async def test_an_endless_line_is_refused_once_and_the_session_goes_on(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path) as served, raw_smtp(served.port) as c:
            await c.send(b"NOOP " + b"x" * 100_000)
            _, text = await c.reply()
            assert text.startswith("500 5.5.2 "), text
            await c.send(b"x" * 10_000 + b"\r\n")  # the rest of it, dropped
            _, text = await c.command("NOOP")
            assert text.startswith("250 2.0.0 "), text
            await c.quit()


async def test_replies_are_printable_ascii_whatever_the_client_sends(tmp_path: Path) -> None:
    hostile = [
        b"EHLO \xff\xfe\x00\x1b[31m",
        b"MAIL FROM:<\x00\xff@\x1b.example>",
        b"MAIL FROM:<a@example.org>",
        b"RCPT TO:<\x1b]0;title\x07@example.com>",
        b"RCPT TO:<" + "é".encode() * 40 + b"@example.com>",
        b"RCPT TO:<ok@\xc3\xa9.example>",
        b"VRFY \x00\r",
        b"\x00\x01\x02",
        b"AUTH \xff",
        b"QUIT",
    ]
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path) as served, raw_smtp(served.port, ehlo=None) as c:
            await c.send(b"".join(line + b"\r\n" for line in hostile))
            replies = await c.rest()
    lines = replies.split(b"\r\n")
    assert lines[-1] == b"" and lines[-2].startswith(b"221 ")
    finals = [line for line in lines if line[3:4] == b" "]
    assert len(finals) == len(hostile)  # one reply each, nothing taken apart
    for line in lines[:-1]:
        assert re.fullmatch(rb"[2-5][0-9][0-9][ -][\x20-\x7e]*", line), line


# ------------------------------------------------------------ pipelining


async def test_pipelined_commands_are_answered_in_order(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path) as served, raw_smtp(served.port) as c:
            await c.send(
                f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<one@example.com>\r\n"
                "RCPT TO:<>\r\nRCPT TO:<two@example.com>\r\nDATA\r\n".encode()
            )
            # One write on the server: one read here gets them all.
            first = await c.stream.receive()
            assert first == (
                b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n553 5.1.3 Recipient address not allowed\r\n"
                b"250 2.1.5 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
            )
            await c.send(MESSAGE + b".\r\nQUIT\r\n")
            rest = await c.rest()
            assert re.fullmatch(rb"250 2\.0\.0 OK queued as \S+\r\n221 2\.0\.0 Bye\r\n", rest), rest
            (msg,) = served.messages()
            assert msg.remaining_recipients == ["one@example.com", "two@example.com"]


async def test_a_client_that_half_closes_still_gets_every_reply(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path) as served, raw_smtp(served.port) as c:
            await c.send(
                f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
                + MESSAGE
                + b".\r\nQUIT\r\n"
            )
            await c.stream.send_eof()
            rest = await c.rest()
            assert re.fullmatch(
                rb"250 2\.1\.0 OK\r\n250 2\.1\.5 OK\r\n354 [^\r\n]*\r\n"
                rb"250 2\.0\.0 OK queued as \S+\r\n221 2\.0\.0 Bye\r\n",
                rest,
            ), rest
            assert len(served.messages()) == 1


# ------------------------------------------------------------ DATA


async def test_dot_stuffed_content_goes_to_disk_byte_for_byte(tmp_path: Path) -> None:
    wire = (
        b"From: a@example.org\r\nSubject: dots\r\n\r\n"
        b"..\r\n"  # a line that is one dot
        b"..leading dot\r\n"
        b"...two\r\n"
        b"\r\n"
        b"8bit \xe9t\xe9\r\n"
        b" trailing space \r\n"
    )
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path) as served, raw_smtp(served.port) as c:
            code, text = await c.transaction(SENDER, [RCPT], wire + b".\r\n")
            assert code == 250, text
            (mid,) = queued_ids(text)
            await c.quit()
            on_disk = (served.spool.spool_dir / "data" / mid).read_bytes()
            (msg,) = served.messages()
    trace = on_disk[: -len(wire)]
    assert on_disk.endswith(wire)
    assert re.fullmatch(
        rb"Received: from client\.example \(\[127\.0\.0\.1\]\)\r\n"
        rb"\tby mx\.test\.example \(spoold\) with ESMTP id " + msg.id.encode() + rb";\r\n"
        rb"\t[^\r\n]+\r\n"
        rb"Message-ID: <[^>]+>\r\nDate: [^\r\n]+\r\n",
        trace,
    ), trace


async def test_each_message_taken_is_logged_as_accepted_with_its_peer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon's ``accepted`` line: the ids, the client's address (as
    accept() gave it) and the number of recipients."""
    with logging_kept():
        logs.configure("json", "info")
        with anyio.fail_after(TIMEOUT):
            async with serving(tmp_path) as served, raw_smtp(served.port) as c:
                code, text = await c.transaction(
                    SENDER, [RCPT, "b@example.net"], MESSAGE + b".\r\n"
                )
                assert code == 250, text
                ids = queued_ids(text)
                await c.quit()
        logs.flush()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    (accepted,) = [line for line in lines if line["event"] == "accepted"]
    assert {k: v for k, v in accepted.items() if k != "timestamp"} == {
        "ids": ids,
        "peer": "127.0.0.1",
        "recipients": 2,
        "event": "accepted",
        "level": "info",
    }


async def test_a_line_over_the_limit_fails_only_its_message(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, {"max_line_length": 100}) as served:
            async with raw_smtp(served.port) as c:
                # Pipelined after the refused message: a good one.
                long_line = b"Subject: long\r\n\r\n" + b"x" * 101 + b"\r\n.\r\n"
                code, text = await c.transaction(SENDER, [RCPT], long_line)
                assert text.startswith("500 5.5.2 Line too long (at most 100 octets)"), text
                code, text = await c.transaction(SENDER, [RCPT], MESSAGE + b".\r\n")
                assert code == 250, text
                await c.quit()
            assert len(served.messages()) == 1


# ------------------------------------------------------------ STARTTLS


async def starttls(c: RawSmtp) -> RawSmtp:
    """STARTTLS on ``c``; a raw client over the TLS stream."""
    code, text = await c.command("STARTTLS")
    assert code == 220, text
    assert c.reader.buffer == b""
    tls = await TLSStream.wrap(
        c.stream, ssl_context=client_context(), server_side=False, standard_compatible=False
    )
    return RawSmtp(tls)


async def test_ehlo_offers_auth_only_after_starttls(
    tmp_path: Path, tls_certificate: TlsCertificate
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            serving(tmp_path, tls=tls_certificate, auth=True) as served,
            raw_smtp(served.port, ehlo=None) as c,
        ):
            code, text = await c.command("EHLO client.example")
            assert "STARTTLS" in extensions(text)
            assert "AUTH" not in extensions(text)
            code, text = await c.command(f"AUTH PLAIN {plain('alice', PASSWORD)}")
            assert text.startswith("538 5.7.11 "), text  # never a password in clear

            tls = await starttls(c)
            code, text = await tls.command("MAIL FROM:<a@example.org>")
            assert text.startswith("503 5.5.1 "), text  # the session started over
            code, text = await tls.command("EHLO client.example")
            assert "STARTTLS" not in extensions(text)
            assert "AUTH" in extensions(text)
            assert text.splitlines()[-2:] == ["250-AUTH PLAIN LOGIN", "250 HELP"]
            code, text = await tls.command(f"AUTH PLAIN {plain('alice', PASSWORD)}")
            assert text.startswith("235 2.7.0 "), text
            code, text = await tls.transaction(SENDER, [RCPT], MESSAGE + b".\r\n")
            assert code == 250, text
            await tls.quit()
            content = await served.spool.ondisk.read_body(served.messages()[0].id)
            assert b" with ESMTPSA id " in content.wire


async def test_commands_pipelined_after_starttls_are_dropped(
    tmp_path: Path, tls_certificate: TlsCertificate
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            serving(tmp_path, tls=tls_certificate) as served,
            raw_smtp(served.port) as c,
        ):
            await c.send(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
            code, text = await c.reply()
            assert code == 220, text
            tls = RawSmtp(
                await TLSStream.wrap(
                    c.stream,
                    ssl_context=client_context(),
                    server_side=False,
                    standard_compatible=False,
                )
            )
            # Had the MAIL counted, this would be a nested MAIL (503).
            assert (await tls.command("EHLO client.example"))[0] == 250
            code, text = await tls.command(f"MAIL FROM:<{SENDER}>")
            assert code == 250, text
            await tls.quit()
            assert served.messages() == []


async def test_a_failed_handshake_closes_the_session(
    tmp_path: Path, tls_certificate: TlsCertificate
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, tls=tls_certificate) as served:
            async with raw_smtp(served.port) as c:
                assert (await c.command("STARTTLS"))[0] == 220
                await c.send(b"MAIL FROM:<not-tls@example.org>\r\n")
                rest = await c.rest()
                assert rest == b""  # not a word of SMTP: the session is closed
            await wait_until(lambda: served.listener.connections == 0, "the slot to free")
            assert served.messages() == []


async def test_smtplib_starttls_and_login_interoperate(
    tmp_path: Path, tls_certificate: TlsCertificate
) -> None:
    smtp = {"relay_networks": ["10.0.0.0/8"]}  # 127.0.0.1 must authenticate

    def run(port: int) -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.starttls(context=client_context())
            s.login("alice", PASSWORD)
            return s.sendmail(SENDER, [RCPT], MESSAGE)

    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, smtp, tls=tls_certificate, auth=True) as served:
            assert await anyio.to_thread.run_sync(run, served.port) == {}
            assert len(served.messages()) == 1


# ------------------------------------------------------------ AUTH


async def test_no_auth_is_offered_without_an_auth_file(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path) as served, raw_smtp(served.port, ehlo=None) as c:
            _, text = await c.command("EHLO client.example")
            assert "AUTH" not in extensions(text)
            _, text = await c.command(f"AUTH PLAIN {plain('alice', PASSWORD)}")
            assert text.startswith("502 5.5.1 "), text


async def test_failed_auth_waits_longer_each_time_then_closes(tmp_path: Path) -> None:
    sleep = RecordedSleep()
    smtp = {"auth_failure_delay": "2s", "max_auth_failures": 3, "relay_networks": ["10.0.0.0/8"]}
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, smtp, auth=True, sleep=sleep) as served:
            async with raw_smtp(served.port) as c:
                # Four attempts at once, the right password last: it is never tried.
                await c.send(
                    "".join(
                        f"AUTH PLAIN {plain('alice', p)}\r\n"
                        for p in ("wrong1", "wrong2", "wrong3", PASSWORD)
                    ).encode()
                )
                assert (await c.reply())[1].startswith("535 5.7.8 ")
                assert (await c.reply())[1].startswith("535 5.7.8 ")
                await ends_with(c, "421")
            assert sleep.delays == [2.0, 4.0, 8.0]

            # A new connection may try again, but the delay goes on growing
            # (the address's failures count, not the connection's); the
            # right password works there.
            async with raw_smtp(served.port) as c:
                code, text = await c.command(f"AUTH PLAIN {plain('alice', 'wrong')}")
                assert code == 535, text
                assert sleep.delays[3:] == [16.0]
                code, text = await c.command(f"AUTH PLAIN {plain('alice', PASSWORD)}")
                assert code == 235, text
                code, text = await c.transaction(SENDER, [RCPT], MESSAGE + b".\r\n")
                assert code == 250, text
                await c.quit()


async def test_auth_login_failures_count_too(tmp_path: Path) -> None:
    sleep = RecordedSleep()
    b64 = base64.b64encode
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, {"max_auth_failures": 2}, auth=True, sleep=sleep) as served:
            async with raw_smtp(served.port) as c:
                assert (await c.command("AUTH LOGIN"))[0] == 334
                assert (await send_line(c, b64(b"alice")))[0] == 334
                assert (await send_line(c, b64(b"nope")))[0] == 535
                assert (await send_line(c, b"AUTH LOGIN " + b64(b"mallory")))[0] == 334
                await c.send(b64(PASSWORD.encode()) + b"\r\n")
                await ends_with(c, "421")
            assert sleep.delays == [1.0, 2.0]


async def test_an_auth_delay_does_not_hold_up_other_sessions(tmp_path: Path) -> None:
    sleep = RecordedSleep()
    sleep.hold = True
    with anyio.fail_after(TIMEOUT):
        async with (
            serving(tmp_path, auth=True, sleep=sleep) as served,
            raw_smtp(served.port) as slow,
        ):
            await slow.send(f"AUTH PLAIN {plain('alice', 'wrong')}\r\nNOOP\r\n".encode())
            await wait_until(lambda: sleep.delays == [1.0], "the AUTH delay to start")
            async with raw_smtp(served.port) as other:
                code, text = await other.transaction(SENDER, [RCPT], MESSAGE + b".\r\n")
                assert code == 250, text
                await other.quit()
            sleep.release.set()
            assert (await slow.reply())[1].startswith("535 5.7.8 ")
            assert (await slow.reply())[1].startswith("250 2.0.0 ")  # then the NOOP
            await slow.quit()


async def test_auth_cancelled_and_bad_base64(tmp_path: Path) -> None:
    sleep = RecordedSleep()
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, auth=True, sleep=sleep) as served:
            async with raw_smtp(served.port) as c:
                _, text = await c.command("AUTH PLAIN")
                assert text == "334 ", text
                _, text = await c.command("*")
                assert text.startswith("501 5.7.0 "), text
                _, text = await c.command("AUTH PLAIN not*base64")
                assert text.startswith("501 5.5.2 "), text
                _, text = await c.command("AUTH CRAM-MD5")
                assert text.startswith("504 5.5.4 "), text
                _, text = await c.command("AUTH PLAIN")
                _, text = await c.command(plain("alice", PASSWORD))
                assert text.startswith("235 2.7.0 "), text
                await c.quit()
            assert sleep.delays == []  # none of that was a failed password


# ------------------------------------------------------------ limits


async def test_connections_per_client_are_limited(tmp_path: Path) -> None:
    smtp = {"max_connections_per_client": 3, "limit_relay_networks": True}
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, smtp) as served:
            async with raw_smtp(served.port), raw_smtp(served.port), raw_smtp(served.port):
                stream = await anyio.connect_tcp("127.0.0.1", served.port)
                async with stream:
                    refused = await RawSmtp(stream).rest()
                assert refused.startswith(b"421 4.7.0 "), refused
                assert refused.count(b"\r\n") == 1
                # Another client address is not held up.
                async with raw_smtp(served.port, local_host="127.0.0.2") as c:
                    code, text = await c.transaction(SENDER, [RCPT], MESSAGE + b".\r\n")
                    assert code == 250, text
                    await c.quit()
                assert served.listener.connections_by_client == {"127.0.0.1": 3}
            await wait_until(lambda: served.listener.connections == 0, "every slot to free")
            assert served.listener.connections_by_client == {}


async def test_the_default_allows_ten_connections_per_client_outside_relay_networks(
    tmp_path: Path,
) -> None:
    smtp = {"relay_networks": ["127.0.0.1/32"]}  # 127.0.0.2 may connect: it can AUTH
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, smtp, auth=True) as served:
            streams = [
                await anyio.connect_tcp("127.0.0.1", served.port, local_host="127.0.0.2")
                for _ in range(11)
            ]
            try:
                greetings = [await RawSmtp(s).reply() for s in streams[:10]]
                assert all(code == 220 for code, _ in greetings)
                refused = await RawSmtp(streams[10]).rest()
                assert refused.startswith(b"421 4.7.0 "), refused
            finally:
                for s in streams:
                    await s.aclose()


async def test_the_default_does_not_hold_relay_networks_to_the_per_client_limit(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, {"max_connections": 30}) as served:
            streams = [await anyio.connect_tcp("127.0.0.1", served.port) for _ in range(31)]
            try:
                greetings = [await RawSmtp(s).reply() for s in streams[:30]]
                assert all(code == 220 for code, _ in greetings), greetings
                assert served.listener.connections_by_client == {"127.0.0.1": 30}
                # max_connections still holds everyone.
                refused = await RawSmtp(streams[30]).rest()
                assert refused.startswith(b"421 4.7.0 Too many connections, "), refused
            finally:
                for s in streams:
                    await s.aclose()


async def test_an_idle_client_is_told_and_dropped(tmp_path: Path) -> None:
    # Everything a client says goes in one write, so that only the idle
    # wait itself can take longer than the (short) timeout.
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, {"timeout": "0.3s"}) as served:
            async with raw_smtp(served.port, ehlo=None) as c:
                await ends_with(c, "421 4.4.2")
            # In the middle of a message too.
            async with raw_smtp(served.port, ehlo=None) as c:
                await c.send(
                    f"EHLO c\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
                    + b"Subject: never ends\r\n"
                )
                rest = await c.rest()
                assert re.fullmatch(
                    rb"(250[- ][^\r\n]*\r\n)+250 2\.1\.0 OK\r\n250 2\.1\.5 OK\r\n"
                    rb"354 [^\r\n]*\r\n421 4\.4\.2 [^\r\n]*\r\n",
                    rest,
                ), rest
            await wait_until(lambda: served.listener.connections == 0, "every slot to free")
            assert served.messages() == []


async def test_junk_commands_past_the_limit_close_the_session(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, {"max_junk_commands": 5}) as served:
            async with raw_smtp(served.port) as c:
                for _ in range(5):
                    assert (await c.command("NOOP"))[0] == 250
                await c.send(b"NOOP\r\n")
                await ends_with(c, "421 4.7.0")
            # A delivered message starts the count again.
            async with raw_smtp(served.port) as c:
                for line, code in (("NOOP", 250), ("RSET", 250), ("VRFY x", 252), ("HELP", 214)):
                    assert (await c.command(line))[0] == code, line
                code, text = await c.transaction(SENDER, [RCPT], MESSAGE + b".\r\n")
                assert code == 250, text
                for _ in range(5):
                    assert (await c.command("XYZZY"))[0] == 500
                await c.send(b"NOOP\r\n")
                await ends_with(c, "421 4.7.0")


async def test_stopping_the_listener_tells_open_sessions(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        port = free_port()
        config = make_config(tmp_path, port)
        assert config.smtp is not None
        smtp_config = config.smtp
        async with Spool.open(config.spool.dir, relay=HeldRelay(), flush_timeout=0.1) as spool:
            router = Router(config)
            listener = SmtpListener(Submitter(spool, lambda: router), lambda: smtp_config)
            serving_scope = anyio.CancelScope()

            async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                with serving_scope:
                    await listener.serve(task_status=task_status)

            async with anyio.create_task_group() as tg:
                await tg.start(serve)
                async with raw_smtp(port) as c:
                    serving_scope.cancel()
                    await ends_with(c, "421 4.3.2")
            assert listener.connections == 0


class HeldCommit:
    """The store's ``on_step``: the commit thread waits at ``step`` until
    :attr:`release`; records every step it passes once :attr:`returned`
    (serve() has returned) is set, and says when it left the held step."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.reached = threading.Event()
        self.release = threading.Event()
        self.left = threading.Event()
        self.returned = False
        self.late: list[str] = []  # what the store did after serve() returned

    def __call__(self, name: str) -> None:
        if self.returned:
            self.late.append(name)
        if name == self.step and not self.reached.is_set():
            self.reached.set()
            self.release.wait(TIMEOUT)
            if self.returned:
                self.late.append(f"{name} (resumed)")
            self.left.set()


@pytest.mark.parametrize("end", ["stop", "cancel", "another session's work raises"])
async def test_serve_returns_only_once_the_commit_under_way_is_done(
    tmp_path: Path, end: str
) -> None:
    """However the listener ends (stop() past its drain time, serve()
    cancelled, a bug in another session's work), a commit thread under way
    finishes before serve() returns: the store is never closed under it,
    and the message is either durable and stays, or was never acknowledged
    (a bug elsewhere does not cut it short: its client gets the 250)."""
    with anyio.fail_after(TIMEOUT):
        port = free_port()
        config = make_config(tmp_path, port)
        assert config.smtp is not None
        smtp_config = config.smtp
        held = HeldCommit("fsync_dirs")
        failure: list[BaseException] = []
        async with Spool.open(
            config.spool.dir,
            relay=HeldRelay(),
            flush_timeout=0.1,
            ping_interval=10.0**9,
            on_step=held,
        ) as spool:
            router = Router(config)
            listener = SmtpListener(Submitter(spool, lambda: router), lambda: smtp_config)
            serving_scope = anyio.CancelScope()

            async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                try:
                    with serving_scope:
                        await listener.serve(
                            task_status=task_status, drain_timeout=0 if end == "stop" else 30
                        )
                except Exception as exc:
                    failure.append(exc)
                finally:
                    held.returned = True

            async def bug() -> None:
                raise RuntimeError("a bug in a session's work")

            async with anyio.create_task_group() as tg:
                await tg.start(serve)
                async with raw_smtp(port) as c:
                    await c.command(f"MAIL FROM:<{SENDER}>")
                    await c.command(f"RCPT TO:<{RCPT}>")
                    await c.command("DATA")
                    await c.send(MESSAGE + b".\r\n")
                    await anyio.to_thread.run_sync(held.reached.wait, TIMEOUT)
                    if end == "stop":
                        listener.stop()
                    elif end == "cancel":
                        serving_scope.cancel()
                    else:
                        listener.spawn(bug)
                    await anyio.wait_all_tasks_blocked()  # the listener has done what it will
                    held.release.set()
                    reply = await c.rest()
            await anyio.to_thread.run_sync(held.left.wait, TIMEOUT)
            assert held.late == []
            if end == "another session's work raises":
                assert reply.startswith(b"250 "), reply
                assert [str(e) for e in failure] == ["a bug in a session's work"]
            else:
                assert reply.startswith((b"250 ", b"421 4.3.2 ")), reply
                assert failure == []
        files = _on_disk(Path(config.spool.dir))
        assert not [f for f in files if f.startswith("tmp/")], files
        async with Spool.open(config.spool.dir, relay=HeldRelay(), flush_timeout=0.1) as spool:
            kept = spool.status()
        assert len(kept) == (1 if reply.startswith(b"250 ") else len(kept)), kept
        assert len(kept) <= 1
        if kept:  # whole: its body is there too
            assert any(f.startswith("data/") for f in files), files


async def test_work_after_work_runs_on_the_parked_runner_and_a_stop_ends_it(
    tmp_path: Path,
) -> None:
    """A runner whose work is done parks and takes the next piece of work:
    work after work runs in the same task; pieces handed over at once each
    get a runner, which both park after; the parked runners end with the
    listener (serving() cancels it)."""
    async with serving(tmp_path) as served:
        listener = served.listener
        ran: list[int] = []
        runners: set[asyncio.Task[Any] | None] = set()
        release = anyio.Event()

        async def work(n: int) -> None:
            await anyio.sleep(0)
            ran.append(n)
            runners.add(asyncio.current_task())

        listener.spawn(lambda: work(1))
        await anyio.wait_all_tasks_blocked()
        assert ran == [1]
        tasks = len(asyncio.all_tasks())
        for n in range(2, 5):
            listener.spawn(functools.partial(work, n))
            await anyio.wait_all_tasks_blocked()
            assert ran[-1] == n
            assert len(asyncio.all_tasks()) == tasks
        assert len(runners) == 1

        async def held(n: int) -> None:
            await release.wait()
            ran.append(n)

        for n in (5, 6):  # at once: the parked runner takes one, a new one the other
            listener.spawn(functools.partial(held, n))
        await anyio.wait_all_tasks_blocked()
        assert len(asyncio.all_tasks()) == tasks + 1
        release.set()
        await anyio.wait_all_tasks_blocked()
        assert sorted(ran[-2:]) == [5, 6]
        assert len(asyncio.all_tasks()) == tasks + 1  # both parked


async def test_after_a_burst_of_work_only_a_few_runners_stay_parked(tmp_path: Path) -> None:
    """Work outlives its connection (a failed AUTH's delay, a commit nobody
    waits for), so a burst may take many runners at once; once it is over,
    those past about one per open session end (none open here: the floor)."""
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path) as served:
            listener = served.listener
            await anyio.wait_all_tasks_blocked()
            tasks = len(asyncio.all_tasks())
            release = anyio.Event()
            ran: list[int] = []

            async def held(n: int) -> None:
                await release.wait()
                ran.append(n)

            burst = 3 * _IDLE_FLOOR
            for n in range(burst):
                listener.spawn(functools.partial(held, n))
            await anyio.wait_all_tasks_blocked()
            assert len(asyncio.all_tasks()) == tasks + burst
            release.set()
            await anyio.wait_all_tasks_blocked()
            assert sorted(ran) == list(range(burst))
            assert len(asyncio.all_tasks()) == tasks + _IDLE_FLOOR  # the rest ended


@asynccontextmanager
async def held_listener(config: Config) -> AsyncIterator[tuple[Spool, SmtpListener]]:
    """A listener (not serving yet) on ``config``'s spool, its relay held."""
    assert config.smtp is not None
    smtp_config = config.smtp
    async with Spool.open(
        config.spool.dir, relay=HeldRelay(), flush_timeout=0.1, ping_interval=10.0**9
    ) as spool:
        router = Router(config)
        yield spool, SmtpListener(Submitter(spool, lambda: router), lambda: smtp_config)


async def test_a_runner_cancelled_as_work_is_handed_to_it_leaves_none_counted(
    tmp_path: Path,
) -> None:
    """asyncio itself cancels a parked runner (not through its scope) after
    work was handed to it, before it resumed: that work never runs, and a
    stop does not wait for it."""
    config = make_config(tmp_path, free_port())
    async with held_listener(config) as (_spool, listener):
        ran: list[str] = []
        runners: list[asyncio.Task[Any] | None] = []

        async def first() -> None:
            ran.append("first")
            runners.append(asyncio.current_task())

        async def second() -> None:
            ran.append("second")

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                await tg.start(functools.partial(listener.serve, drain_timeout=TIMEOUT))
                listener.spawn(first)
                await anyio.wait_all_tasks_blocked()
                (runner,) = runners
                assert runner is not None
                listener.spawn(second)  # to the parked runner...
                runner.cancel()  # ...cancelled before it resumed
                await anyio.wait_all_tasks_blocked()
                assert runner.cancelled()
                assert ran == ["first"]
                counted = listener._working
                listener._working = 0  # (else the end below would wait for ever if wrong)
                listener.stop()  # serve() returns: the group ends
        assert counted == 0  # nothing under way is left counted


@pytest.mark.parametrize("runner", ["parked", "new"])
async def test_a_delivery_handed_over_as_the_listener_ends_spools_nothing(
    tmp_path: Path, runner: str
) -> None:
    """The end comes in the turn the session hands its delivery over (to a
    parked runner or a new one): the client has its 421 (or the connection
    closes) and the delivery is cancelled at its first wait: nothing is
    spooled, so the client's retry makes no second copy. serve() returns."""
    port = free_port()
    config = make_config(tmp_path, port)
    async with held_listener(config) as (spool, listener):

        async def nothing() -> None:
            pass

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                await tg.start(listener.serve)
                if runner == "parked":
                    listener.spawn(nothing)
                    await anyio.wait_all_tasks_blocked()
                async with raw_smtp(port) as c:
                    await c.command(f"MAIL FROM:<{SENDER}>")
                    await c.command(f"RCPT TO:<{RCPT}>")
                    await c.command("DATA")
                    hand_over = listener.spawn

                    def spawn_as_it_ends(work: Callable[[], Any]) -> None:
                        hand_over(work)
                        listener._cut_work()  # the end, in the same turn

                    listener.spawn = spawn_as_it_ends  # type: ignore[method-assign]
                    await c.send(MESSAGE + b".\r\n")
                    reply = await c.rest()
                tg.cancel_scope.cancel()  # serve() ends
        assert reply == b"" or reply.startswith(b"421 4.3.2 "), reply
        assert spool.status() == []
    assert not [f for f in _on_disk(Path(config.spool.dir)) if not f.startswith(".registry")]


async def test_a_bug_in_work_on_a_parked_runner_ends_serve_with_it(tmp_path: Path) -> None:
    """The runner that ran work before runs a bug too: serve() raises it."""
    config = make_config(tmp_path, free_port())
    async with held_listener(config) as (_spool, listener):
        failure: list[BaseException] = []
        done = anyio.Event()

        async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            try:
                await listener.serve(task_status=task_status)
            except Exception as exc:
                failure.append(exc)

        async def fine() -> None:
            done.set()

        async def bug() -> None:
            raise RuntimeError("a bug in a session's work")

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                await tg.start(serve)
                listener.spawn(fine)
                await done.wait()
                await anyio.wait_all_tasks_blocked()
                listener.spawn(bug)
        assert [str(e) for e in failure] == ["a bug in a session's work"]


async def test_refused_recipients_count_as_junk(tmp_path: Path) -> None:
    """A client cannot keep a session busy with recipients it may not use."""
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, {"max_junk_commands": 5, "max_recipients": 1}) as served:
            async with raw_smtp(served.port) as c:
                batch = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\n".encode()
                batch += b"RCPT TO:<>\r\n" * 3 + b"RCPT TO:<extra@example.com>\r\n" * 10
                await c.send(batch)
                rest = await c.rest()
            lines = rest.decode().splitlines()
            assert lines[:2] == ["250 2.1.0 OK", "250 2.1.5 OK"]
            assert lines[2:5] == ["553 5.1.3 Recipient address not allowed"] * 3
            assert [line[:9] for line in lines[5:7]] == ["452 4.5.3"] * 2
            assert lines[7].startswith("421 4.7.0 ")
            assert len(lines) == 8


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_auth_failures_count_across_connections_then_the_address_waits(
    tmp_path: Path,
) -> None:
    """Guesses spread over many connections: the address is refused (421 at
    the greeting, as it must authenticate) once it has failed
    ``max_auth_failures_per_client`` times in the window, until they age out."""
    sleep, clock = RecordedSleep(), FakeMonotonic()
    smtp = {
        "max_auth_failures": 2,
        "max_auth_failures_per_client": 4,
        "auth_failure_window": "10m",
        "workers": 1,
        "relay_networks": ["10.0.0.0/8"],  # 127.0.0.1 must authenticate
    }
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, smtp, auth=True, sleep=sleep, clock=clock) as served:
            for _ in range(2):
                async with raw_smtp(served.port) as c:
                    assert (await c.command(f"AUTH PLAIN {plain('alice', 'x')}"))[0] == 535
                    await c.send(f"AUTH PLAIN {plain('alice', 'y')}\r\n".encode())
                    await ends_with(c, "421")
            assert sleep.delays == [1.0, 2.0, 4.0, 8.0]  # grows across connections

            stream = await anyio.connect_tcp("127.0.0.1", served.port)
            async with stream:
                refused = await RawSmtp(stream).rest()
            assert refused == (
                b"421 4.7.0 Too many failed authentication attempts from your address, "
                b"try again later\r\n"
            )
            # Another address is not held up by this one's failures.
            async with raw_smtp(served.port, local_host="127.0.0.2") as c:
                code, text = await c.command(f"AUTH PLAIN {plain('alice', PASSWORD)}")
                assert code == 235, text
                await c.quit()

            clock.now += 601  # the failures age out of the window
            async with raw_smtp(served.port) as c:
                code, text = await c.command(f"AUTH PLAIN {plain('alice', PASSWORD)}")
                assert code == 235, text
                await c.quit()


async def test_a_trusted_address_past_its_failures_gets_454_and_still_sends(
    tmp_path: Path,
) -> None:
    sleep, clock = RecordedSleep(), FakeMonotonic()
    smtp = {"max_auth_failures_per_client": 2, "workers": 1}  # 127.0.0.1 is trusted
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, smtp, auth=True, sleep=sleep, clock=clock) as served:
            async with raw_smtp(served.port) as c:
                assert (await c.command(f"AUTH PLAIN {plain('alice', 'x')}"))[0] == 535
                await c.send(f"AUTH PLAIN {plain('alice', 'y')}\r\n".encode())
                await ends_with(c, "421")  # the address's last failure for now
            async with raw_smtp(served.port) as c:  # trusted: still greeted
                code, text = await c.command(f"AUTH PLAIN {plain('alice', PASSWORD)}")
                assert (code, text[:9]) == (454, "454 4.7.0"), text
                code, text = await c.transaction(SENDER, [RCPT], MESSAGE + b".\r\n")
                assert code == 250, text
                await c.quit()


# -----------------------------------------------------------------------------
# Short of disk space, a running daemon refuses new mail at MAIL FROM.
#
# A real SMTP client (the standard library's ``smtplib``) talks to the
# daemon's listener. Below ``spool.min_free_space`` every MAIL gets ``452
# 4.3.1`` (before the client sends any of the message); with a declared
# ``SIZE=``, the floor plus that size must be free. A reload that lowers the
# floor lets mail in again at once.


APP_SENDER, OPS_RCPT = "app@example.org", "ops@example.com"
CONTENT = b"Subject: room?\r\n\r\nhello\r\n"
MiB = 1024 * 1024


def smtp_config(directory: Path, min_free_space: str) -> tuple[Path, int]:
    port = free_port()
    config = write_config(directory, next_hops=[f"127.0.0.1:{free_port()}"])
    text = config.read_text().replace(
        "[control]", f'min_free_space = "{min_free_space}"\n\n[control]'
    )
    config.write_text(text + f'\n[smtp]\nlisten = ["127.0.0.1:{port}"]\n')
    return config, port


def mail_from(port: int, *options: str) -> tuple[int, str]:
    """EHLO, then MAIL FROM with ``options``; the reply to MAIL."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        code, text = client.mail(APP_SENDER, list(options))
        return code, text.decode()


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(APP_SENDER, [OPS_RCPT], CONTENT)


async def in_thread(fn: Callable[..., tuple[int, str]], *args: object) -> tuple[int, str]:
    return await anyio.to_thread.run_sync(lambda: fn(*args))


async def test_below_the_floor_mail_from_gets_452_until_a_reload_lowers_it(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    config, port = smtp_config(tmp_path, "1000000GiB")  # more than any disk has free
    daemon = await start_daemon(config)
    for options in ((), (f"SIZE={len(CONTENT)}",)):
        code, text = await in_thread(mail_from, port, *options)
        assert (code, text) == (452, "4.3.1 Insufficient system storage, try again later")
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        await anyio.to_thread.run_sync(send, port)
    assert refused.value.smtp_code == 452
    short = await daemon.wait_log(lambda line: line["event"].startswith("short of space"))
    assert (short["level"], short["min_free_space"]) == ("warning", "1000000 GiB")

    set_config_value(config, "min_free_space", '"1MiB"')
    done = await anyio.to_thread.run_sync(cli, "--socket", str(daemon.socket), "reload")
    assert done.code == 0, done.err

    async def mail_taken() -> bool:  # ingest workers apply the reload as it reaches them
        code, _text = await in_thread(mail_from, port)
        return code == 250

    await wait_until(mail_taken, "MAIL taken after the reload", interval=0.05)
    await daemon.wait_log(lambda line: line["event"] == "room again: new mail is taken")
    await anyio.to_thread.run_sync(send, port)
    assert sorted(os.listdir(tmp_path / "spool" / "active"))  # spooled


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs as the spool directory (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None:
        pytest.skip("mount not found: install Debian package 'mount'")
    spool = tmp_path / "spool"
    spool.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m,mode=0750", "tmpfs", str(spool)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


async def test_a_declared_size_that_would_cross_the_floor_is_refused_at_mail(
    tmp_path: Path, small_disk: Path, start_daemon: DaemonFactory
) -> None:
    config, port = smtp_config(tmp_path, "8MiB")
    await start_daemon(config)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    assert 18 * MiB < free <= 20 * MiB
    code, text = await in_thread(mail_from, port, f"SIZE={15 * MiB}")  # would leave < 8 MiB
    assert (code, text) == (452, "4.3.1 Insufficient system storage, try again later")
    for options in ((f"SIZE={1 * MiB}",), ()):
        code, text = await in_thread(mail_from, port, *options)
        assert code == 250, text
    await anyio.to_thread.run_sync(send, port)
    assert os.listdir(small_disk / "active")


# -----------------------------------------------------------------------------
# What the SMTP listener answers after DATA when the message cannot be
# taken, as a table: each trouble, the reply it gets, over a real socket.
#
# Each case runs a real :class:`~spoold.daemon.listener.SmtpListener` on a
# free ``127.0.0.1`` port with the real :class:`~spoold.daemon.ingest.Submitter`
# and spool; what goes wrong is chosen per case through what the listener
# depends on: the router's MX lookups (an :class:`~spoold.daemon.mx.MxResolver`
# given a lookup function the test writes), a router with no default route,
# the spool's filesystem steps (:class:`spoold.testing.Faults`) and its
# free-space floor.
#
# The rule under test: a recipient no route takes, or a domain that does not
# exist or takes no mail, is a permanent 550 5.1.2; a temporary DNS failure
# 451 4.4.3; a full disk (or quota, or the free-space floor) 452 4.3.1; any
# other store error 451 4.3.0; anything else of ours (an unexpected
# exception in the submitter) 451: never a 5xx for our own trouble. In every
# case nothing is left on disk and the same session then spools a message
# once the trouble is gone.


REPLY_TIMEOUT = 20.0
GOOD = "rcpt@example.com"  # routed to the smarthost, no lookup
REPLY_CONTENT = b"Subject: replies\r\n\r\nhello\r\n.\r\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Trouble:
    """One row: a recipient, and what breaks while its message is taken."""

    recipient: str
    reply: str  # the code and enhanced status the reply starts with
    faults: dict[str, BaseException] = field(default_factory=dict)  # step -> error
    min_free_space: int = 0
    lookup_error: BaseException | None = None  # raised by the MX lookup
    null_mx: bool = False
    ours: bool = True  # our own trouble: the reply must be 4xx


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


TABLE = {
    "no route takes the recipient": Trouble("user@nowhere.test", "550 5.1.2", ours=False),
    "the domain does not exist": Trouble(
        "user@mx.test",
        "550 5.1.2",
        lookup_error=MxError("domain mx.test does not exist", permanent=True),
        ours=False,
    ),
    "the domain takes no mail (null MX)": Trouble(
        "user@mx.test", "550 5.1.2", null_mx=True, ours=False
    ),
    "DNS fails for now": Trouble(
        "user@mx.test",
        "451 4.4.3",
        lookup_error=MxError("MX lookup of mx.test failed: timeout", permanent=False),
    ),
    "the store cannot write (EIO)": Trouble(
        GOOD, "451 4.3.0", faults={"rename_record": OSError(errno.EIO, "Input/output error")}
    ),
    "the disk is full at the body's write": Trouble(
        GOOD, "452 4.3.1", faults={"write_body": _enospc()}
    ),
    "the disk is full at the record's rename": Trouble(
        GOOD, "452 4.3.1", faults={"rename_record": _enospc()}
    ),
    "the quota is exceeded at the directory fsync": Trouble(
        GOOD, "452 4.3.1", faults={"fsync_dirs": OSError(errno.EDQUOT, "Disk quota exceeded")}
    ),
    "free space is below spool.min_free_space": Trouble(GOOD, "452 4.3.1", min_free_space=2**62),
    "an unexpected exception in the submitter": Trouble(
        "user@mx.test", "451 4.3.0", lookup_error=RuntimeError("a bug")
    ),
    "an unexpected OS error in the submitter": Trouble(
        "user@mx.test", "451 4.3.0", lookup_error=PermissionError(errno.EACCES, "denied")
    ),
    "an unexpected spoold error in the submitter": Trouble(
        "user@mx.test", "451 4.3.0", lookup_error=SpooldError("something of ours broke")
    ),
}


class Lookups:
    """The MX lookup the router's resolver uses: fails as the case says
    while ``broken``, else names one exchanger."""

    def __init__(self, trouble: Trouble) -> None:
        self.trouble = trouble
        self.broken = True

    async def __call__(self, domain: str) -> tuple[list[tuple[int, str]], float]:
        if self.broken and self.trouble.lookup_error is not None:
            raise self.trouble.lookup_error
        if self.broken and self.trouble.null_mx:
            return [(0, ".")], 300.0
        return [(10, f"mx1.{domain}")], 300.0


def _router(tmp_path: Path, lookups: Lookups) -> Router:
    """Routes without a default: example.com to a smarthost, mx.test by MX,
    anything else nowhere. The resolver does not cache failures."""
    config = parse_config(
        {
            "spool": {"dir": "spool"},
            "routes": {
                "smarthost": {
                    "domains": ["example.com"],
                    "next_hops": ["smart.example.net:25"],
                    "tls": "none",
                },
                "bymx": {"domains": ["mx.test"], "mx": True, "tls": "none"},
            },
        },
        tmp_path / "spoold.toml",
    )
    return Router(config, MxResolver(lookups, negative_ttl=0.0))


class Client:
    """SMTP as bytes over one connection."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)

    async def reply(self) -> str:
        lines = []
        while True:
            line = await self.reader.receive_until(b"\r\n", 65536)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "\n".join(lines)

    async def command(self, line: str) -> str:
        await self.stream.send(line.encode() + b"\r\n")
        return await self.reply()

    async def transaction(self, recipient: str, in_data: Callable[[], None] = lambda: None) -> str:
        """A whole transaction; ``in_data`` is called once DATA got its 354
        (trouble that starts then: the reply to the content says it)."""
        assert (await self.command(f"MAIL FROM:<{SENDER}>")).startswith("250 ")
        assert (await self.command(f"RCPT TO:<{recipient}>")).startswith("250 ")
        assert (await self.command("DATA")).startswith("354 ")
        in_data()
        await self.stream.send(REPLY_CONTENT)
        return await self.reply()


@asynccontextmanager
async def listening(
    tmp_path: Path, router: Router, faults: Faults
) -> AsyncIterator[tuple[Spool, Client]]:
    port = _free_port()
    smtp = parse_config(
        {
            "spool": {"dir": "spool"},
            "smtp": {"listen": [f"127.0.0.1:{port}"]},
            "relay": {"default_route": "smarthost"},
            "routes": {"smarthost": {"next_hops": ["smart.example.net:25"], "tls": "none"}},
        },
        tmp_path / "spoold.toml",
    ).smtp
    assert smtp is not None
    held = InMemoryRelay(gate=anyio.Event())  # attempts wait: what was spooled stays
    async with Spool.open(
        tmp_path / "spool", relay=held, flush_timeout=0.1, ping_interval=10.0**9, on_step=faults
    ) as spool:
        submitter = Submitter(spool, lambda: router, hostname="mx.test.example")
        listener = SmtpListener(submitter, lambda: smtp)
        async with anyio.create_task_group() as tg:
            await tg.start(listener.serve)
            try:
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    client = Client(stream)
                    assert (await client.reply()).startswith("220 ")
                    assert (await client.command("EHLO client.example")).startswith("250")
                    yield spool, client
                    assert (await client.command("QUIT")).startswith("221 ")
            finally:
                tg.cancel_scope.cancel()


def _on_disk(spool_dir: Path) -> list[str]:
    return sorted(
        f
        for f in set(spool_files(spool_dir))
        if f.split("/", 1)[0] in ("tmp", "data", "active", ".registry")
    )


@pytest.mark.parametrize("name", list(TABLE))
async def test_the_reply_to_each_trouble(tmp_path: Path, name: str) -> None:
    trouble = TABLE[name]
    lookups = Lookups(trouble)
    faults = Faults()
    with anyio.fail_after(REPLY_TIMEOUT):
        async with listening(tmp_path, _router(tmp_path, lookups), faults) as (spool, client):
            for step, error in trouble.faults.items():
                faults.fail(step, error)

            def space_runs_short() -> None:
                # After MAIL (which checks the floor too): the space runs
                # short while the message comes in; the store says so.
                spool.min_free_space = trouble.min_free_space

            reply = await client.transaction(trouble.recipient, space_runs_short)

            assert reply.startswith(trouble.reply + " "), reply
            assert reply[0] == ("4" if trouble.ours else "5"), reply
            assert spool.status() == []
            assert _on_disk(tmp_path / "spool") == []

            # The trouble gone, the same session spools the same message.
            faults.clear()
            spool.min_free_space = 0
            lookups.broken = False
            recipient = trouble.recipient if trouble.reply[0] == "4" else GOOD
            accepted = await client.transaction(recipient)
            assert accepted.startswith("250 2.0.0 OK queued as "), accepted
            assert [m.id for m in spool.status()] == accepted.split()[5:]
