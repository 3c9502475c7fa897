"""Mail ingest in one process: the SMTP listener, the submitter and a spool.

Each test starts a :class:`~spoold.spool.Spool` on a temp dir, a
:class:`~spoold.daemon.ingest.Submitter` and an :class:`~spoold.daemon.listener.SmtpListener`
on a free ``127.0.0.1`` port, all in the test's own task group, and talks
SMTP to it: with :mod:`smtplib` (in a worker thread), with raw bytes over a
socket where a real client would normalise what we want to send (smuggling
probes, exact reply codes), or with Postfix's ``smtp-source``.

Unless a test relays on purpose, the spool's relay holds every attempt
(:class:`HeldRelay`): what was spooled stays on disk (checked out) to be
looked at, and nothing leaves the machine. The interop tests (marked
``interop``) open the gate and relay to Postfix's ``smtp-sink``.

Every test is bounded by :func:`anyio.fail_after`.
"""

from __future__ import annotations

import email.utils
import errno
import os
import re
import smtplib
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spoold.body import Body, LineEndingPolicy
from spoold.connection_cache import RouteSettings
from spoold.daemon.config import SmtpConfig
from spoold.daemon.ingest import Origin, Submitter, missing_headers, received_header
from spoold.daemon.listener import SmtpListener
from spoold.daemon.routing import Router
from spoold.message import Message, Queue
from spoold.smtp_relay import SmtpRelay
from spoold.spool import Spool
from spoold.testing import Faults
from tests.ingest_helpers import (
    HOSTNAME,
    RCPT,
    SENDER,
    SMARTHOST,
    HeldRelay,
    RawSmtp,
    make_config,
    queued_ids,
    raw_smtp,
)
from tests.smtp_server import SmtpTestServer
from tests.smtp_sink import SmtpSink, StartSmtpSink, postfix_tool
from tests.support import free_port, records_in, spool_files, wait_until, without_pool

TIMEOUT = 60.0  # a safety net: no test here comes near it


# ------------------------------------------------------------ plumbing


@dataclass
class Ingest:
    """A running listener and spool; ``router`` and ``smtp`` are what the
    submitter and the listener read on each use (swap them to reload)."""

    spool: Spool
    relay: Any
    port: int
    router: Router
    smtp: SmtpConfig
    listener: SmtpListener | None = None

    @property
    def spool_dir(self) -> Path:
        return self.spool.spool_dir

    def messages(self) -> list[Message]:
        return self.spool.status()

    async def content(self, message_id: str) -> bytes:
        return (await self.spool.ondisk.read_body(message_id)).content()

    async def wire(self, message_id: str) -> bytes:
        return (await self.spool.ondisk.read_body(message_id)).wire


@asynccontextmanager
async def running_ingest(
    tmp_path: Path,
    *,
    smtp: dict[str, Any] | None = None,
    routes: dict[str, Any] | None = None,
    relay: Any = None,
    faults: Faults | None = None,
) -> AsyncIterator[Ingest]:
    port = free_port()
    config = make_config(tmp_path, port, smtp=smtp, routes=routes)
    assert config.smtp is not None
    relay = relay if relay is not None else HeldRelay()
    async with Spool.open(
        config.spool.dir, relay=relay, flush_timeout=0.1, ping_interval=10.0**9, on_step=faults
    ) as spool:
        ingest = Ingest(spool, relay, port, Router(config), config.smtp)
        submitter = Submitter(spool, lambda: ingest.router, hostname=HOSTNAME)
        ingest.listener = SmtpListener(submitter, lambda: ingest.smtp)
        async with anyio.create_task_group() as tg:
            await tg.start(ingest.listener.serve)
            try:
                yield ingest
            finally:
                tg.cancel_scope.cancel()


def assert_nothing_spooled(ingest: Ingest) -> None:
    assert ingest.messages() == []
    assert without_pool(spool_files(ingest.spool_dir, "data", "active", "tmp", ".registry")) == {}


def smtplib_send(
    port: int,
    messages: Sequence[tuple[str, Sequence[str], bytes]],
    helo: str = "client.example",
) -> list[dict[str, tuple[int, bytes]]]:
    """Send with :mod:`smtplib` over one connection (run it in a thread)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=10) as client:
        return [client.sendmail(s, list(r), data) for s, r, data in messages]


def headers_named(content: bytes, name: str) -> list[bytes]:
    """The values of header ``name`` (case-insensitive) in the header block."""
    head = content.split(b"\r\n\r\n", 1)[0]
    pattern = re.compile(rb"^" + re.escape(name.encode()) + rb":[ \t]*(.*)$", re.I | re.M)
    return [m.group(1).rstrip(b"\r") for m in pattern.finditer(head)]


# ------------------------------------------------------- smtp-sink/source


def sink_routes(sink: SmtpSink) -> dict[str, Any]:
    return {"smarthost": {"next_hops": [sink.hop], "tls": "none"}}


def sink_relay() -> SmtpRelay:
    return SmtpRelay(
        RouteSettings(tls="none", connect_timeout=5, command_timeout=10, message_timeout=30)
    )


async def relay_all_and_check_empty(
    ingest: Ingest, relay: SmtpRelay, sink: SmtpSink, n: int
) -> None:
    """Open the gate; wait until every message is delivered; the spool is
    empty and consistent; the sink counted ``n`` messages."""
    ingest.relay.gate.set()
    await wait_until(
        lambda: ingest.spool.counts() == {Queue.ACTIVE: 0, Queue.FROZEN: 0},
        "every message to be delivered",
    )
    assert (
        without_pool(spool_files(ingest.spool_dir, "data", "active", ".registry", "tmp", "frozen"))
        == {}
    )
    assert await ingest.spool.ondisk.check(max_age=0) == []
    await relay.close_and_flush()  # QUIT: smtp-sink prints its counters
    await wait_until(
        lambda: sink.counters()["mesg"] == n, f"smtp-sink to count {n} messages", interval=0.02
    )


# ------------------------------------------------------------- interop


@pytest.mark.interop
async def test_smtplib_50_messages_spooled_then_relayed_to_smtp_sink(
    tmp_path: Path, start_smtp_sink: StartSmtpSink
) -> None:
    smtp_sink = await start_smtp_sink()
    n = 50
    relay = sink_relay()
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(
            tmp_path, routes=sink_routes(smtp_sink), relay=HeldRelay(relay)
        ) as ingest:
            messages = [
                (SENDER, [f"user{i}@example.com"], f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode())
                for i in range(n)
            ]
            refused = await anyio.to_thread.run_sync(smtplib_send, ingest.port, messages)
            assert refused == [{}] * n

            # Every message is on disk before anything is relayed.
            ids = {m.id for m in ingest.messages()}
            assert records_in(ingest.spool_dir, "active") == ids
            assert {p.rsplit("/")[-1] for p in spool_files(ingest.spool_dir, "data")} == ids
            assert {m.remaining_recipients[0] for m in ingest.messages()} == {
                f"user{i}@example.com" for i in range(n)
            }

            await relay_all_and_check_empty(ingest, relay, smtp_sink, n)


@pytest.mark.interop
async def test_smtp_source_200_messages_relayed_to_smtp_sink(
    tmp_path: Path, start_smtp_sink: StartSmtpSink
) -> None:
    smtp_sink = await start_smtp_sink()
    source = postfix_tool("smtp-source")
    n = 200
    relay = sink_relay()
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(
            tmp_path, routes=sink_routes(smtp_sink), relay=HeldRelay(relay)
        ) as ingest:
            out_path = tmp_path / "smtp-source.out"
            with out_path.open("wb") as out:
                argv = [source, "-s", "5", "-m", str(n), "-l", "2048"]
                argv += ["-f", "from@example.org", "-t", "to@example.com"]
                argv += [f"127.0.0.1:{ingest.port}"]
                process = await anyio.open_process(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            async with process:
                code = await process.wait()
            output = out_path.read_text(errors="replace")
            assert code == 0, output

            messages = ingest.messages()
            assert records_in(ingest.spool_dir, "active") == {m.id for m in messages}, output
            assert len(messages) == n
            assert len(spool_files(ingest.spool_dir, "data")) == n
            assert all(m.envelope_info.sender == "from@example.org" for m in messages)
            assert all(m.remaining_recipients == ["to@example.com"] for m in messages)

            await relay_all_and_check_empty(ingest, relay, smtp_sink, n)


# --------------------------------------------------------------- limits


async def test_size_is_advertised_in_ehlo(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path, smtp={"max_message_size": 4321}) as ingest:
            async with raw_smtp(ingest.port, ehlo=None) as c:
                code, text = await c.command("EHLO client.example")
                assert code == 250
                assert text.splitlines() == [
                    f"250-{HOSTNAME}",
                    "250-SIZE 4321",
                    "250-8BITMIME",
                    "250-SMTPUTF8",
                    "250-PIPELINING",
                    "250-ENHANCEDSTATUSCODES",
                    "250 HELP",
                ]
                await c.quit()
            async with raw_smtp(ingest.port, ehlo=None) as c:
                code, text = await c.command("HELO client.example")
                assert (code, text) == (250, f"250 {HOSTNAME}")  # HELO: no extensions
                await c.quit()


async def test_message_over_the_size_limit_gets_552_and_nothing_is_spooled(
    tmp_path: Path,
) -> None:
    limit = 1000
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path, smtp={"max_message_size": limit}) as ingest:
            big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
            big = big * (limit // len(big) + 2)
            assert len(big) > limit
            # No SIZE parameter: refused at the end of DATA.
            async with raw_smtp(ingest.port) as c:
                code, text = await c.transaction(SENDER, [RCPT], big + b".\r\n")
                assert code == 552, text
                await c.quit()
            # smtplib declares SIZE=: refused at MAIL FROM.
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                await anyio.to_thread.run_sync(smtplib_send, ingest.port, [(SENDER, [RCPT], big)])
            assert refused.value.smtp_code == 552
            assert_nothing_spooled(ingest)

            # Just under the limit (with the trace headers we add) still goes.
            small = b"Subject: small\r\n\r\n" + b"y" * (limit // 2) + b"\r\n"
            async with raw_smtp(ingest.port) as c:
                code, text = await c.transaction(SENDER, [RCPT], small + b".\r\n")
                assert code == 250, text
                await c.quit()
            assert len(ingest.messages()) == 1


async def test_recipient_over_the_limit_gets_452_and_the_rest_are_spooled(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path, smtp={"max_recipients": 3}) as ingest:
            rcpts = [f"r{i}@example.com" for i in range(5)]
            async with raw_smtp(ingest.port) as c:
                assert (await c.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
                codes = [(await c.command(f"RCPT TO:<{r}>"))[0] for r in rcpts]
                assert codes == [250, 250, 250, 452, 452]
                assert (await c.command("DATA"))[0] == 354
                await c.send(b"Subject: many\r\n\r\nhello\r\n.\r\n")
                code, text = await c.reply()
                assert code == 250, text
                (mid,) = queued_ids(text)
                await c.quit()
            (msg,) = ingest.messages()
            assert msg.id == mid
            assert msg.remaining_recipients == rcpts[:3]
            assert msg.envelope_info.recipients == rcpts[:3]


# ------------------------------------------------------- store failures


@pytest.mark.parametrize(
    ("error", "reply"),
    [(errno.ENOSPC, 452), (errno.EIO, 451)],
    ids=["ENOSPC", "EIO"],
)
async def test_a_failed_write_answers_4xx_and_leaves_nothing_behind(
    tmp_path: Path, error: int, reply: int
) -> None:
    faults = Faults()
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path, faults=faults) as ingest:
            faults.fail("rename_record", OSError(error, os.strerror(error)))
            async with raw_smtp(ingest.port) as c:
                content = b"Subject: fails\r\n\r\nhello\r\n.\r\n"
                code, text = await c.transaction(SENDER, [RCPT, "other@example.net"], content)
                assert code == reply, text
                assert text.startswith(f"{reply} 4.3."), text

                assert_nothing_spooled(ingest)
                assert await ingest.spool.ondisk.check(max_age=0) == []

                # The same session goes on once the disk is back.
                faults.clear()
                code, text = await c.transaction(SENDER, [RCPT], content)
                assert code == 250, text
                await c.quit()
            (msg,) = ingest.messages()
            assert records_in(ingest.spool_dir, "active") == {msg.id}
            assert await ingest.spool.ondisk.check() == []  # (it is checked out: held)


# -------------------------------------------------------------- smuggling

PROBES = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"]
PROBE_IDS = ["LF.LF", "CRLF.LF", "LF.CRLF", "CR.CRLF"]
SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nSubject: smuggled\r\n\r\nx"


def smuggling_data(probe: bytes) -> bytes:
    return b"Subject: probe\r\n\r\nhello" + probe + SMUGGLED + b"\r\n.\r\n"


@pytest.mark.parametrize("probe", PROBES, ids=PROBE_IDS)
async def test_smuggling_probe_is_refused_under_reject(tmp_path: Path, probe: bytes) -> None:
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path, smtp={"bare_line_endings": "reject"}) as ingest:
            async with raw_smtp(ingest.port) as c:
                code, text = await c.transaction(SENDER, [RCPT], smuggling_data(probe))
                assert code == 550, text
                await c.quit()  # nothing smuggled was taken as a command
            assert_nothing_spooled(ingest)


@pytest.mark.parametrize("probe", PROBES, ids=PROBE_IDS)
async def test_smuggling_probe_makes_one_message_under_normalize(
    tmp_path: Path, probe: bytes, smtp_server: SmtpTestServer
) -> None:
    server = smtp_server
    relay = HeldRelay(SmtpRelay(RouteSettings(tls="none", connect_timeout=5)))
    routes = {"smarthost": {"next_hops": [server.hop], "tls": "none"}}
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(
            tmp_path, smtp={"bare_line_endings": "normalize"}, routes=routes, relay=relay
        ) as ingest:
            async with raw_smtp(ingest.port) as c:
                code, text = await c.transaction(SENDER, [RCPT], smuggling_data(probe))
                assert code == 250, text
                (mid,) = queued_ids(text)
                await c.quit()  # nothing smuggled was taken as a command

            (msg,) = ingest.messages()
            assert msg.id == mid
            assert msg.envelope_info.sender == SENDER
            assert msg.remaining_recipients == [RCPT]
            assert records_in(ingest.spool_dir, "active") == {mid}
            content = await ingest.content(mid)
            head, _, body = content.partition(b"\r\n\r\n")
            assert b"smuggled" not in head
            assert b"Subject: smuggled" in body
            assert b"MAIL FROM:<evil@x>" in body
            assert Body.from_content(content).content() == content  # only CRLF left
            wire = await ingest.wire(mid)
            assert b"\r\n.\r\n" not in wire and not wire.startswith(b".\r\n")

            # What the next hop gets is one message too.
            relay.gate.set()
            await wait_until(lambda: not ingest.messages(), "the message to be delivered")
            await relay.inner.close_and_flush()
    assert len(server.messages) == 1
    (received,) = server.messages
    assert received.mail_from == SENDER
    assert received.rcpt_tos == (RCPT,)
    assert received.content == content
    assert "evil@x" not in server.args("MAIL")


# ---------------------------------------------------------------- routes

ROUTES = {
    "smarthost": {"next_hops": [SMARTHOST], "tls": "none"},
    "partners": {
        "domains": ["example.com"],
        "next_hops": ["mx1.example.com:25", "mx2.example.com:25"],
        "tls": "none",
    },
    "org": {"domains": [".example.org"], "next_hops": ["org.example.net:2525"], "tls": "none"},
}


async def test_recipients_of_three_routes_make_three_related_messages(tmp_path: Path) -> None:
    rcpts = ["a@example.com", "b@sub.example.org", "c@example.net", "d@example.com"]
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path, routes=ROUTES) as ingest:
            async with raw_smtp(ingest.port) as c:
                code, text = await c.transaction(
                    SENDER, rcpts, b"Subject: fan out\r\n\r\nhello\r\n.\r\n"
                )
                assert code == 250, text
                ids = queued_ids(text)
                await c.quit()

            # The spool's own view: a listing of the directories would race
            # with the attempts moving records to and from their checkout.
            on_disk = ingest.messages()
            assert sorted(ids) == sorted(m.id for m in on_disk) and len(ids) == 3
            by_hops = {tuple(m.next_hop_choices): m for m in on_disk}
            assert set(by_hops) == {
                ("mx1.example.com:25", "mx2.example.com:25"),
                ("org.example.net:2525",),
                (SMARTHOST,),
            }
            partners = by_hops[("mx1.example.com:25", "mx2.example.com:25")]
            assert partners.remaining_recipients == ["a@example.com", "d@example.com"]
            assert by_hops[("org.example.net:2525",)].remaining_recipients == ["b@sub.example.org"]
            assert by_hops[(SMARTHOST,)].remaining_recipients == ["c@example.net"]

            (parent,) = {m.parent_id for m in on_disk}
            assert parent not in ids
            for m in on_disk:
                assert sorted(m.related_ids) == sorted(set(ids) - {m.id})
                assert m.flows == [parent]
                assert m.envelope_info.sender == SENDER
            # One body per message: the same submission (one Message-ID), each
            # with a Received: line naming its own id.
            for i in ids:
                content = await ingest.content(i)
                assert f"id {i};".encode() in content
                assert headers_named(content, "Message-ID") == [f"<{parent}@{HOSTNAME}>".encode()]


async def test_a_reload_of_routes_applies_to_new_mail_only(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path, routes=ROUTES) as ingest:
            content = b"Subject: before\r\n\r\nhello\r\n.\r\n"
            async with raw_smtp(ingest.port) as c:
                code, text = await c.transaction(
                    SENDER, ["a@example.com", "z@example.net"], content
                )
                assert code == 250, text
                before = queued_ids(text)

                changed = {
                    **ROUTES,
                    "smarthost": {"next_hops": ["new-smart.example.net:587"], "tls": "none"},
                    "partners": {**ROUTES["partners"], "domains": ["example.co.uk"]},
                }
                ingest.router = Router(make_config(tmp_path, ingest.port, routes=changed))

                code, text = await c.transaction(
                    SENDER, ["a@example.com", "z@example.net"], content
                )
                assert code == 250, text
                (after,) = queued_ids(text)  # both recipients take the default route now
                await c.quit()

            on_disk, _ = await Spool.status_from_disk(ingest.spool_dir)
            hops = {m.id: m.next_hop_choices for m in on_disk}
            assert sorted(hops[i] for i in before) == [
                ["mx1.example.com:25", "mx2.example.com:25"],
                [SMARTHOST],
            ]
            assert hops[after] == ["new-smart.example.net:587"]
            assert {m.id: m.next_hop_choices for m in ingest.messages()} == hops


# ------------------------------------------------------------ trace headers


async def test_received_message_id_and_date_are_added(tmp_path: Path) -> None:
    content = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: trace\r\n\r\nbody\r\n"
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path) as ingest:
            before = datetime.now(UTC).replace(microsecond=0)  # Date: has whole seconds
            refused = await anyio.to_thread.run_sync(
                smtplib_send, ingest.port, [(SENDER, [RCPT], content)]
            )
            after = datetime.now(UTC)
            assert refused == [{}]
            (msg,) = ingest.messages()
            spooled = await ingest.content(msg.id)

    parent = msg.parent_id
    received = re.match(
        rb"Received: from client\.example \(\[127\.0\.0\.1\]\)\r\n"
        rb"\tby "
        + re.escape(HOSTNAME.encode())
        + rb" \(spoold\) with ESMTP id "
        + re.escape(msg.id.encode())  # the message's own id, as status shows it
        + rb";\r\n\t([^\r\n]+)\r\n",
        spooled,
    )
    assert received, spooled
    rest = spooled[received.end() :]
    assert headers_named(spooled, "Message-ID") == [f"<{parent}@{HOSTNAME}>".encode()]
    (date,) = headers_named(spooled, "Date")
    for stamp in (date, received.group(1)):
        when = email.utils.parsedate_to_datetime(stamp.decode())
        assert before <= when <= after, (before, stamp, after)
    # Our headers come before the original ones, which are kept as they were.
    assert rest.endswith(content)
    assert rest[: -len(content)].startswith(b"Message-ID: ")


async def test_message_id_and_date_are_kept_when_present(tmp_path: Path) -> None:
    content = (
        b"From: a@example.org\r\n"
        b"Message-Id: <original@client.example>\r\n"
        b"DATE: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        b"Subject: keep\r\n"
        b"\r\n"
        b"body\r\n"
    )
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path) as ingest:
            await anyio.to_thread.run_sync(smtplib_send, ingest.port, [(SENDER, [RCPT], content)])
            (msg,) = ingest.messages()
            spooled = await ingest.content(msg.id)
    assert headers_named(spooled, "Message-ID") == [b"<original@client.example>"]
    assert headers_named(spooled, "Date") == [b"Mon, 01 Jan 2024 00:00:00 +0000"]
    assert len(headers_named(spooled, "Received")) == 1
    assert spooled.startswith(b"Received: ")
    assert spooled.endswith(content)


async def test_headers_in_the_body_do_not_count_as_present(tmp_path: Path) -> None:
    content = b"Subject: quoted\r\n\r\nMessage-ID: <in-body@example>\r\nDate: yesterday\r\n"
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path) as ingest:
            async with raw_smtp(ingest.port, ehlo=None) as c:
                assert (await c.command("HELO old.example"))[0] == 250
                code, text = await c.transaction("", [RCPT], content + b".\r\n")
                assert code == 250, text
                await c.quit()
            (msg,) = ingest.messages()
            spooled = await ingest.content(msg.id)
    assert msg.envelope_info.sender == ""  # the null sender <>
    assert headers_named(spooled, "Message-ID") == [f"<{msg.parent_id}@{HOSTNAME}>".encode()]
    assert len(headers_named(spooled, "Date")) == 1
    assert b"\tby " + HOSTNAME.encode() + b" (spoold) with SMTP id " in spooled
    assert spooled.endswith(content)


# ------------------------------------------------------------ connections


async def test_a_client_outside_relay_networks_gets_554(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path, smtp={"relay_networks": ["10.0.0.0/8"]}) as ingest:
            stream = await anyio.connect_tcp("127.0.0.1", ingest.port)
            async with stream:
                rest = await RawSmtp(stream).rest()
            assert rest.startswith(b"554 "), rest
            assert rest.count(b"\r\n") == 1, rest
            with pytest.raises(smtplib.SMTPConnectError) as refused:
                await anyio.to_thread.run_sync(
                    smtplib_send, ingest.port, [(SENDER, [RCPT], b"Subject: x\r\n\r\nx\r\n")]
                )
            assert refused.value.smtp_code == 554
            assert ingest.listener is not None and ingest.listener.connections == 0
            assert_nothing_spooled(ingest)


async def test_a_connection_over_max_connections_gets_421(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path, smtp={"max_connections": 2}) as ingest:
            listener = ingest.listener
            assert listener is not None
            async with raw_smtp(ingest.port) as first, raw_smtp(ingest.port):
                assert listener.connections == 2
                stream = await anyio.connect_tcp("127.0.0.1", ingest.port)
                async with stream:
                    rest = await RawSmtp(stream).rest()
                assert rest.startswith(b"421 "), rest
                assert rest.count(b"\r\n") == 1, rest
                assert listener.connections == 2

                # A slot frees when a session ends.
                await first.quit()
                await wait_until(lambda: listener.connections == 1, "the slot to free")
                async with raw_smtp(ingest.port) as third:
                    code, text = await third.transaction(
                        SENDER, [RCPT], b"Subject: ok\r\n\r\nfine\r\n.\r\n"
                    )
                    assert code == 250, text
                    await third.quit()
            await wait_until(lambda: listener.connections == 0, "every slot to free")
            assert len(ingest.messages()) == 1


async def test_a_line_over_max_line_length_gets_500(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path, smtp={"max_line_length": 100}) as ingest:
            async with raw_smtp(ingest.port) as c:
                long_line = b"Subject: long\r\n\r\n" + b"x" * 101 + b"\r\n.\r\n"
                code, text = await c.transaction(SENDER, [RCPT], long_line)
                assert code == 500, text
                assert_nothing_spooled(ingest)
                fits = b"Subject: fits\r\n\r\n" + b"x" * 100 + b"\r\n.\r\n"
                code, text = await c.transaction(SENDER, [RCPT], fits)
                assert code == 250, text
                await c.quit()
            assert len(ingest.messages()) == 1


async def test_new_limits_apply_to_new_sessions(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path, smtp={"max_recipients": 5}) as ingest:
            new = make_config(
                tmp_path, ingest.port, smtp={"max_recipients": 1, "max_message_size": 2000}
            )
            assert new.smtp is not None
            ingest.smtp = new.smtp
            async with raw_smtp(ingest.port, ehlo=None) as c:
                code, text = await c.command("EHLO client.example")
                assert "SIZE 2000" in text
                assert (await c.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
                assert (await c.command("RCPT TO:<one@example.com>"))[0] == 250
                code, text = await c.command("RCPT TO:<two@example.com>")
                assert code == 452, text
                assert "at most 1 " in text
                await c.quit()


async def test_a_closing_spool_answers_421(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path) as ingest:
            async with raw_smtp(ingest.port) as c:
                await ingest.spool.kill_and_flush(1)  # takes no new work from now on
                code, text = await c.transaction(SENDER, [RCPT], b"Subject: x\r\n\r\nx\r\n.\r\n")
                assert code == 421, text
            assert_nothing_spooled(ingest)


@pytest.mark.parametrize("policy", ["reject", "normalize"])
async def test_an_ehlo_name_with_a_bare_cr_does_not_break_the_trace_header(
    tmp_path: Path, policy: str
) -> None:
    """The EHLO argument goes into our Received: header. One with a bare CR
    is taken (under either policy) and cleaned up there: the message itself
    is clean and must not be refused for a bare CR we put there, nor may the
    name start a header line of its own."""
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path, smtp={"bare_line_endings": policy}) as ingest:
            async with raw_smtp(ingest.port, ehlo=None) as c:
                code, text = await c.command("EHLO client\rX-Injected: yes")
                assert code == 250, text
                content = b"Subject: clean\r\n\r\nclean\r\n"
                code, text = await c.transaction(SENDER, [RCPT], content + b".\r\n")
                assert code == 250, text
                await c.quit()
            (msg,) = ingest.messages()
            spooled = await ingest.content(msg.id)
    assert Body.from_content(spooled).content() == spooled  # only CRLF line endings
    assert headers_named(spooled, "X-Injected") == []
    assert spooled.split(b"\r\n", 1)[0] == b"Received: from client?X-Injected:?yes ([127.0.0.1])"


# ------------------------------------------------- local submissions


@pytest.mark.parametrize(
    ("content", "added", "blank_line"),
    [
        (b"Subject: bare\r\n\r\nbody\r\n", ["From", "Message-ID", "Date"], False),
        (b"From: Me <me@example.org>\r\nSubject: s\r\n\r\nx\r\n", ["Message-ID", "Date"], False),
        (
            b"From: a@example.org\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n"
            b"Message-ID: <m1@example.org>\r\n\r\nx\r\n",
            [],
            False,
        ),
        (b"no headers at all, just text\r\n", ["From", "Message-ID", "Date"], True),
    ],
)
async def test_local_submissions_get_the_headers_they_lack(
    tmp_path: Path, content: bytes, added: list[str], blank_line: bool
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path) as ingest:
            submitter = Submitter(ingest.spool, lambda: ingest.router, hostname=HOSTNAME)
            (mid,) = await submitter.submit(
                "app@example.org",
                [RCPT],
                content,
                origin=Origin("local"),
                policy=LineEndingPolicy.NORMALIZE,
            )
            (msg,) = ingest.messages()
            spooled = await ingest.content(mid)
    lines = spooled.split(b"\r\n")
    assert lines[0] == b"Received: from localhost"
    assert f"(spoold) with local id {mid};".encode() in lines[1]
    ours = [line.split(b":", 1)[0].decode() for line in lines[3 : 3 + len(added)]]
    assert ours == added
    if "From" in added:
        assert headers_named(spooled, "From") == [b"<app@example.org>"]
    if "Message-ID" in added:
        assert headers_named(spooled, "Message-ID") == [f"<{msg.parent_id}@{HOSTNAME}>".encode()]
    rest = b"\r\n".join(lines[3 + len(added) :])
    assert rest == (b"\r\n" + content if blank_line else content)
    assert msg.size == len(Body.from_content(spooled).wire)


async def test_smtp_submissions_get_no_from_header(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path) as ingest:
            async with raw_smtp(ingest.port) as c:
                code, text = await c.transaction(SENDER, [RCPT], b"Subject: x\r\n\r\nbody\r\n.\r\n")
                assert code == 250, text
                await c.quit()
            (msg,) = ingest.messages()
            spooled = await ingest.content(msg.id)
    assert headers_named(spooled, "From") == []
    assert len(headers_named(spooled, "Message-ID")) == 1


async def test_below_min_free_space_smtp_answers_452_and_takes_mail_again_later(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with running_ingest(tmp_path) as ingest:
            ingest.spool.min_free_space = 2**62  # more than any disk has free
            async with raw_smtp(ingest.port) as c:
                code, text = await c.command(f"MAIL FROM:<{SENDER}>")  # refused before DATA
                assert (code, text) == (
                    452,
                    "452 4.3.1 Insufficient system storage, try again later",
                )
                ingest.spool.min_free_space = 64 * 1024 * 1024  # space came back
                code, text = await c.transaction(SENDER, [RCPT], b"Subject: x\r\n\r\nx\r\n.\r\n")
                assert code == 250, text
                await c.quit()
            assert len(ingest.messages()) == 1


# ------------------------------------------------ headers we add, and trace

_REFERENCE_END = re.compile(rb"\r\n\r\n|\n\n")


def _reference_missing(content: bytes, sender: str | None) -> list[bytes]:
    """The fields missing_headers adds, as the patterns it used to use say."""
    m = _REFERENCE_END.search(content)
    header = content[: m.start()] if m else content
    names = [b"message-id", b"date"] + ([b"from"] if sender is not None else [])
    return sorted(
        n for n in names if not re.search(rb"^" + n + rb":", header, re.IGNORECASE | re.MULTILINE)
    )


_FIELD_LINES = st.sampled_from(
    [
        b"From: a@x",
        b"FROM:b",
        b"Date: now",
        b"dAtE:x",
        b"Message-ID: <1@x>",
        b"message-id:",
        b" date: folded",
        b"X-Date: no",
        b"Subject: from: no",
        b"",
        b"body",
        b"date",
        b"\rdate: cr",
    ]
)


@given(
    st.lists(st.tuples(_FIELD_LINES, st.sampled_from([b"\r\n", b"\n", b"\r", b""])), max_size=8),
    st.sampled_from([None, "", "s@example.org"]),
)
def test_missing_headers_finds_fields_as_the_patterns_did(
    lines: list[tuple[bytes, bytes]], sender: str | None
) -> None:
    content = b"".join(text + end for text, end in lines)
    added = missing_headers(content, "8EAGJXcWdRMx2vGR3", "mx.example", sender=sender)
    names = sorted(line.split(b":")[0].lower() for line in added.splitlines())
    assert names == _reference_missing(content, sender)


@pytest.mark.parametrize(
    "content",
    [
        b"Subject: x\n\nDate: y\r\n\r\nMessage-ID: <1@x>\r\n",  # LF LF first
        b"Subject: x\r\n\r\nDate: y\n\nMessage-ID: <1@x>\r\n",  # CRLF CRLF first
        b"Date: y\r\nMessage-ID: <1@x>\n",  # no blank line: all header
        b"date:y\r\n\r\n",
    ],
)
def test_the_first_blank_line_ends_the_header(content: bytes) -> None:
    added = missing_headers(content, "8EAGJXcWdRMx2vGR3", "mx.example")
    names = sorted(line.split(b":")[0].lower() for line in added.splitlines())
    assert names == _reference_missing(content, None)


def test_received_header_names_a_usual_client_as_it_is_and_cleans_the_rest() -> None:
    usual = received_header(Origin("ESMTP", "client.example", "127.0.0.1"), "ID1", "mx.example")
    assert usual.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby mx.example ")
    odd = received_header(Origin("ESMTP", "a b\x7f\u00e9" + "x" * 300, "::1"), "ID2", "mx")
    assert odd.startswith(b"Received: from a?b??" + b"x" * 250 + b" ([::1])\r\n")
