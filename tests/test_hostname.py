"""The name spoold gives itself (:mod:`spoold.hostname`, the top-level
``hostname`` key, ``routes.NAME.helo_name``).

* Choosing the machine's name: a fully qualified one first, then a short
  one, ``localhost`` only when there is nothing else; checking a configured
  one (a domain name or an address literal), with the config's error text.
* The library: a relay whose route settings give no ``helo_name`` says EHLO
  with the machine's name (no more ``localhost.localdomain``); one that
  gives it says that.
* End to end (``spoold run`` as a subprocess, aiosmtpd next hops): the
  banner and the EHLO reply of the listener, the EHLO the next hop sees,
  the ``by`` of the ``Received:`` header and the ``Message-ID:`` added to a
  message without one all say ``hostname``; a route's ``helo_name`` changes
  only its own EHLO; a reload renames new sessions, new relay connections
  and new messages. A bounce (RFC 3464 notification) reports
  ``Reporting-MTA: dns; NAME`` and has a Message-ID of ours.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from spoold.daemon.config import load_config
from spoold.errors import ConfigError
from spoold.hostname import check_hostname, local_hostname, pick_hostname
from tests.daemon_helpers import (
    DaemonFactory,
    child_env,
    reload_workers,
    write_config,
)
from tests.ingest_helpers import RawSmtp
from tests.relay_helpers import ALICE, MakeRelay, message_to, route
from tests.smtp_server import Reply, SmtpTestServer, StartServer
from tests.support import WAIT_TIMEOUT, free_port, wait_until

NAME = "relay.example.test"
PARTNER_HELO = "partner-facing.example.test"
SENDER = "app@example.com"
MESSAGE = b"Subject: hello\r\nFrom: <app@example.com>\r\n\r\nbody\r\n.\r\n"  # no Message-ID

# ------------------------------------------------------------ the name


@pytest.mark.parametrize(
    ("candidates", "chosen"),
    [
        (["mail.example.com", "mail"], "mail.example.com"),
        (["localhost", "vm"], "vm"),  # what this kind of machine says: never localhost
        (["localhost.localdomain", "box.example.org."], "box.example.org"),
        (["vm", "vm.example.net"], "vm.example.net"),  # qualified wins wherever it is
        (["localhost", "localhost"], "localhost"),  # nothing better
        (["", "bad name"], "localhost"),
    ],
)
def test_the_machine_name_prefers_a_qualified_one(candidates: list[str], chosen: str) -> None:
    assert pick_hostname(candidates) == chosen


def test_the_default_is_not_localhost_when_the_machine_has_a_name() -> None:
    name = socket.gethostname()
    if pick_hostname([name]) == "localhost":
        pytest.skip(f"this machine's host name {name!r} is no better than localhost")
    assert not local_hostname().lower().startswith("localhost")
    assert check_hostname(local_hostname()) == local_hostname()


@pytest.mark.parametrize(
    ("written", "kept"),
    [
        ("mail.example.com", "mail.example.com"),
        ("Mail.Example.COM.", "Mail.Example.COM"),
        ("relay", "relay"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
    ],
)
def test_a_configured_name_is_a_domain_or_an_address_literal(written: str, kept: str) -> None:
    assert check_hostname(written) == kept


@pytest.mark.parametrize(
    "bad",
    ["", "mail example.com", "-mail.example.com", "mail..example.com", "[2001:db8::1]",
     "[IPv6:192.0.2.1]", "[mail.example.com]", "müll.example", "a" * 64 + ".example"],
)  # fmt: skip
def test_anything_else_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"expected a host name like 'mail\.example\.com'"):
        check_hostname(bad)


def config_file(tmp_path: Path, top: str = "", route: str = "") -> Path:
    path = tmp_path / "spoold.toml"
    path.write_text(
        f'{top}\n[spool]\ndir = "spool"\n\n[relay]\ndefault_route = "r"\n'
        f'\n[routes.r]\nnext_hops = ["127.0.0.1:25"]\n{route}'
    )
    return path


def test_the_config_takes_hostname_and_helo_name(tmp_path: Path) -> None:
    cfg = load_config(
        config_file(tmp_path, f'hostname = "{NAME}."', f'helo_name = "{PARTNER_HELO}"')
    )
    assert cfg.hostname == NAME
    assert cfg.routes["r"].helo_name == PARTNER_HELO

    cfg = load_config(config_file(tmp_path))
    assert cfg.hostname == local_hostname()
    assert cfg.routes["r"].helo_name == ""  # the hostname


def test_the_config_refuses_bad_names_naming_each_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(config_file(tmp_path, 'hostname = "my host"', 'helo_name = "[nope]"'))
    problems = raised.value.problems
    assert [p.split(":")[0] for p in problems] == ["hostname", "routes.r.helo_name"], problems
    assert "got 'my host'" in problems[0]


# ------------------------------------------------------------ the library


async def test_the_relay_says_the_machines_name_unless_the_route_names_one(
    smtp_server: SmtpTestServer, make_relay: MakeRelay, tmp_path: Path
) -> None:
    msg, body = message_to(tmp_path, [smtp_server.hop], [ALICE])
    with anyio.fail_after(WAIT_TIMEOUT):
        await make_relay(route()).relay(msg, body, [ALICE])
        await make_relay(route(helo_name=PARTNER_HELO)).relay(msg, body, [ALICE])
    assert smtp_server.args("EHLO") == [local_hostname(), PARTNER_HELO]
    assert smtp_server.transactions == 2


# ------------------------------------------------------------ end to end


async def greeting_and_ehlo(port: int) -> tuple[str, str]:
    """The banner and the first line of the EHLO reply of a new session."""
    with anyio.fail_after(WAIT_TIMEOUT):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            client = RawSmtp(stream)
            _code, banner = await client.reply()
            _code, ehlo = await client.command("EHLO client.example")
            await client.quit()
    return banner, ehlo.splitlines()[0]


async def send(port: int, recipients: list[str]) -> None:
    """One message (without Message-ID) through the listener."""
    with anyio.fail_after(WAIT_TIMEOUT):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            client = RawSmtp(stream)
            await client.reply()
            await client.command("EHLO client.example")
            code, text = await client.transaction(SENDER, recipients, MESSAGE)
            assert code == 250, text
            await client.quit()


async def received(server: SmtpTestServer, count: int) -> bytes:
    """The content of the ``count``-th message the server got (waited for)."""
    await wait_until(lambda: len(server.messages) >= count, f"message {count} at {server.hop}")
    return server.messages[count - 1].content


def by_and_message_id(content: bytes) -> tuple[str, str]:
    """The host of the ``by`` of our Received: header and the right-hand
    side of the Message-ID."""
    by = re.search(
        rb"^Received: from client\.example \(\[127\.0\.0\.1\]\)\r\n\tby (\S+) ", content, re.M
    )
    mid = re.search(rb"^Message-ID: <[^@>]+@([^>]+)>\r\n", content, re.M)
    assert by and mid, content
    return by.group(1).decode(), mid.group(1).decode()


def daemon_config(tmp_path: Path, smarthost: SmtpTestServer, port: int, spool: str = "") -> Path:
    config = write_config(tmp_path, next_hops=[smarthost.hop])
    text = config.read_text().replace("[control]", f"{spool}\n[control]")
    config.write_text(
        f'hostname = "{NAME}"\n\n{text}' + f'\n[smtp]\nlisten = ["127.0.0.1:{port}"]\nworkers = 1\n'
    )
    return config


async def test_the_hostname_is_spoolds_name_everywhere_and_a_reload_renames_it(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer
) -> None:
    smarthost, partner = await start_smtp_server(), await start_smtp_server()
    port = free_port()
    config = daemon_config(tmp_path, smarthost, port)
    config.write_text(
        config.read_text()
        + '\n[routes.partners]\ndomains = ["partner.example"]\n'
        + f'next_hops = ["{partner.hop}"]\ntls = "none"\nhelo_name = "{PARTNER_HELO}"\n'
    )
    daemon = await start_daemon(config)

    banner, ehlo = await greeting_and_ehlo(port)
    assert banner == f"220 {NAME} ESMTP spoold"
    assert ehlo == f"250-{NAME}"
    await send(port, ["a@example.com", "b@partner.example"])
    assert by_and_message_id(await received(smarthost, 1)) == (NAME, NAME)
    assert by_and_message_id(await received(partner, 1)) == (NAME, NAME)
    assert smarthost.args("EHLO") == [NAME]
    assert partner.args("EHLO") == [PARTNER_HELO]  # the route's own

    config.write_text(
        config.read_text().replace(f'hostname = "{NAME}"', 'hostname = "renamed.example.test"')
    )
    await reload_workers(daemon)

    banner, ehlo = await greeting_and_ehlo(port)
    assert banner == "220 renamed.example.test ESMTP spoold"
    assert ehlo == "250-renamed.example.test"
    await send(port, ["a@example.com", "b@partner.example"])
    new_name = ("renamed.example.test", "renamed.example.test")
    assert by_and_message_id(await received(smarthost, 2)) == new_name
    assert by_and_message_id(await received(partner, 2)) == new_name
    # A new connection with the new name: the one opened with the old is not lent out.
    assert smarthost.args("EHLO") == [NAME, "renamed.example.test"]
    assert partner.args("EHLO")[-1] == PARTNER_HELO
    assert daemon.running


async def test_a_bounce_reports_the_hostname(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer
) -> None:
    smarthost = await start_smtp_server()
    smarthost.behaviour.rcpt["gone@example.com"] = Reply("550 5.1.1 no such user")
    port = free_port()
    config = daemon_config(tmp_path, smarthost, port, spool='on_permanent_failure = "bounce"')
    await start_daemon(config)

    await send(port, ["gone@example.com"])
    dsn = await received(smarthost, 1)  # the refused message never arrives; its bounce does
    assert smarthost.messages[0].mail_from == "<>"
    assert smarthost.messages[0].rcpt_tos == (SENDER,)
    assert b"\r\nReporting-MTA: dns; relay.example.test\r\n" in dsn
    assert re.search(rb"^Message-ID: <[^@>]+@relay\.example\.test>\r\n", dsn, re.M), dsn
    assert re.search(rb"^From: .*<MAILER-DAEMON@relay\.example\.test>\r\n", dsn, re.M), dsn


@pytest.mark.parametrize(("hostname", "warned"), [("relay", True), (NAME, False)])
def test_the_daemon_warns_at_start_about_a_name_that_is_not_qualified(
    tmp_path: Path, hostname: str, warned: bool
) -> None:
    # A spool that is a file: the daemon logs its start-up checks, then cannot start.
    config = tmp_path / "spoold.toml"
    config.write_text(
        f'hostname = "{hostname}"\n[spool]\ndir = "spoold.toml"\n'
        '[log]\nformat = "json"\n[relay]\ndefault_route = "r"\n'
        '[routes.r]\nnext_hops = ["127.0.0.1:25"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "spoold.daemon.cli", "run", "--config", str(config)],
        capture_output=True,
        timeout=WAIT_TIMEOUT,
        check=False,
        env=child_env(),
    )
    assert done.returncode == 1, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith(b"{")]
    warnings = [x for x in lines if x["event"].startswith("hostname is not a fully qualified")]
    assert [(x["level"], x["hostname"]) for x in warnings] == (
        [("warning", hostname)] if warned else []
    )
