"""DKIM signing through a real daemon (``spoold run`` in a subprocess):
SMTP in (an ingest worker's SpoolWriter) or ``spoold sendmail`` (the
daemon's own Spool.add) -> spool -> relay to a next hop that is a real
aiosmtpd server on 127.0.0.1. What the next hop received is checked with
dkimpy and with the tests' own verifier against a stub DNS. Also: the
signature survives a retry unchanged, a key that cannot be read stops the
start and refuses a reload (the old key keeps signing), and ``spoold dkim
keygen``'s key and TXT record verify a signature."""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import anyio
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from spoold.body import Body
from spoold.dkim import DkimSigner
from spoold.dkim_keys import load_key, public_key_record
from spoold.message import SendAt
from tests.daemon_helpers import DaemonFactory, DaemonProcess, cli, sendmail, write_config
from tests.dkim_helpers import DnsServer, StubDns, dkimpy_verify_all, key_file, verify_all
from tests.ingest_helpers import queued_ids, raw_smtp
from tests.smtp_server import Reply, StartServer
from tests.spool_helpers import read_record
from tests.support import wait_until
from tests.test_ingest import free_port

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
OTHER_KEY = ed25519.Ed25519PrivateKey.generate()

# What an SMTP client sends after DATA: dot-stuffed lines, 8-bit UTF-8,
# lines as long as SMTP allows (998 characters), trailing blank lines.
WIRE = (
    "From: News <news@example.org>\r\n"
    "To: reader@example.com\r\n"
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    "Date: Sun, 06 Dec 2026 12:00:00 +0000\r\n"
    "Message-ID: <e2e@example.org>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "..a line that starts with a dot\r\n"
    "...two dots\r\n"
    "..\r\n"
    "Grüße aus Köln, naïve café  \t tabs and  spaces \r\n"
    + "x" * 998
    + "\r\n"
    + ("word " * 199 + "end")[:998]
    + "\r\n\r\n\r\n"
).encode()
CONTENT = re.sub(rb"(?m)^\.", b"", WIRE)  # what the next hop hands over


def _dns() -> StubDns:
    dns = StubDns()
    dns.publish("example.org", "rsa2026", public_key_record(RSA_KEY))
    dns.publish("example.org", "ed2026", public_key_record(ED_KEY))
    dns.publish("example.org", "other", public_key_record(OTHER_KEY))
    return dns


def _dkim_table(selector: str, key_file_name: str, algorithm: str) -> str:
    return (
        f'\n[[dkim]]\ndomain = "example.org"\nselector = "{selector}"\n'
        f'key_file = "{key_file_name}"\nalgorithm = "{algorithm}"\n'
    )


def _config(tmp_path: Path, hop: str, tables: str, *, smtp_port: int | None = None) -> Path:
    config = write_config(tmp_path, next_hops=[hop])
    text = config.read_text()
    if smtp_port is not None:
        text += f'\n[smtp]\nlisten = ["127.0.0.1:{smtp_port}"]\nworkers = 1\n'
    config.write_text(text + tables)
    return config


async def _smtp_send(port: int, wire: bytes) -> str:
    async with raw_smtp(port) as smtp:
        assert (await smtp.command("MAIL FROM:<news@example.org>"))[0] == 250
        assert (await smtp.command("RCPT TO:<reader@example.com>"))[0] == 250
        assert (await smtp.command("DATA"))[0] == 354
        await smtp.send(wire + b".\r\n")
        code, text = await smtp.reply()
        assert code == 250, text
        await smtp.quit()
    (mid,) = queued_ids(text)
    return mid


async def test_signed_mail_through_the_daemon_verifies_at_the_next_hop_after_a_retry(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer
) -> None:
    server = await start_smtp_server()
    key_file(tmp_path, "rsa.key", RSA_KEY)
    key_file(tmp_path, "ed.key", ED_KEY)
    port = free_port()
    config = _config(
        tmp_path,
        server.hop,
        _dkim_table("rsa2026", "rsa.key", "rsa-sha256")
        + _dkim_table("ed2026", "ed.key", "ed25519-sha256"),
        smtp_port=port,
    )
    daemon = await start_daemon(config)
    dns = _dns()

    # SMTP in, first attempt refused for now at the end of DATA.
    server.behaviour.data_end = Reply("451 4.3.0 try again later")
    mid = await _smtp_send(port, WIRE)
    spool = daemon.spool_dir

    def failed_once() -> bool:
        try:
            record = read_record(spool, "active", mid)
        except FileNotFoundError:
            return False
        return bool(record.relay_attempts) and isinstance(record.status, SendAt)

    await wait_until(failed_once, daemon.log_text)
    stored = (spool / "data" / mid).read_bytes()
    assert stored.count(b"DKIM-Signature:") == 2  # signed once, when spooled
    server.behaviour.data_end = None
    done = await anyio.to_thread.run_sync(cli, "--socket", str(daemon.socket), "send", mid)
    assert done.code == 0, done.err
    await wait_until(lambda: len(server.messages) == 1, daemon.log_text)

    received = server.messages[0].content
    assert received.count(b"DKIM-Signature:") == 2  # the retry did not sign again
    assert received.endswith(CONTENT)  # the message itself is as the client sent it
    assert verify_all(received, dns) == [("example.org", "rsa2026"), ("example.org", "ed2026")]
    assert dkimpy_verify_all(received, dns) == 2

    # spoold sendmail: the daemon's own add path signs too.
    done = await sendmail(config, "-i", "reader@example.com", stdin=CONTENT)
    assert done.code == 0, done.err
    # A From: of another domain is not signed.
    other = CONTENT.replace(b"news@example.org", b"news@example.net")
    done = await sendmail(config, "-i", "reader@example.com", stdin=other)
    assert done.code == 0, done.err
    await wait_until(lambda: len(server.messages) == 3, daemon.log_text)
    # Nor one whose From: holds two addresses (that one is logged at info).
    two = CONTENT.replace(b"News <news@example.org>", b"news@example.org, x@example.org")
    done = await sendmail(config, "-i", "reader@example.com", stdin=two)
    assert done.code == 0, done.err
    await wait_until(lambda: len(server.messages) == 4, daemon.log_text)
    assert b"DKIM-Signature" not in server.messages[3].content
    by_sender = {m.content.endswith(other): m.content for m in server.messages[1:3]}
    assert verify_all(by_sender[False], dns) == [
        ("example.org", "rsa2026"),
        ("example.org", "ed2026"),
    ]
    assert dkimpy_verify_all(by_sender[False], dns) == 2
    assert b"DKIM-Signature" not in by_sender[True]
    unsigned = [line for line in daemon.log_lines() if line.get("event") == "not DKIM-signed"]
    # Mail of a domain without a key is usual: logged at debug, not info.
    assert [line["reason"] for line in unsigned] == ["From: does not hold exactly one address"]


async def test_a_key_that_cannot_be_read_stops_the_start(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    (tmp_path / "keys").mkdir()  # a directory: no file to read, even for root
    config = _config(tmp_path, "127.0.0.1:9", _dkim_table("s1", "keys", "rsa-sha256"))
    daemon = await start_daemon(config, wait_ready=False)
    assert await daemon.wait_exit() == 2
    assert f"dkim[0].key_file: key_file {tmp_path / 'keys'}: not a regular file" in (
        daemon.log_text()
    )


async def test_a_reload_with_an_unreadable_key_is_refused_and_the_old_key_signs(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer
) -> None:
    server = await start_smtp_server()
    key_file(tmp_path, "ed.key", ED_KEY)
    key_file(tmp_path, "other.key", OTHER_KEY)
    port = free_port()
    config = _config(
        tmp_path,
        server.hop,
        _dkim_table("ed2026", "ed.key", "ed25519-sha256"),
        smtp_port=port,
    )
    base = config.read_text().split("\n[[dkim]]")[0]
    daemon = await start_daemon(config)
    dns = _dns()

    config.write_text(base + _dkim_table("other", "missing.key", "ed25519-sha256"))
    done = await anyio.to_thread.run_sync(cli, "--socket", str(daemon.socket), "reload")
    assert done.code == 1
    assert f"cannot read key_file {tmp_path / 'missing.key'}" in done.err
    await _smtp_send(port, WIRE)
    done = await sendmail(config, "-i", "reader@example.com", stdin=CONTENT)
    assert done.code == 0, done.err
    await wait_until(lambda: len(server.messages) == 2, daemon.log_text)
    for message in server.messages:  # ingest worker and daemon: the old key
        assert verify_all(message.content, dns) == [("example.org", "ed2026")]

    # A good reload: the new key signs new mail (in the worker too).
    config.write_text(base + _dkim_table("other", "other.key", "ed25519-sha256"))
    reloads = _worker_reloads(daemon)
    done = await anyio.to_thread.run_sync(cli, "--socket", str(daemon.socket), "reload")
    assert done.code == 0, done.err
    await wait_until(lambda: _worker_reloads(daemon) > reloads, daemon.log_text)
    await _smtp_send(port, WIRE)
    done = await sendmail(config, "-i", "reader@example.com", stdin=CONTENT)
    assert done.code == 0, done.err
    await wait_until(lambda: len(server.messages) == 4, daemon.log_text)
    for message in server.messages[2:]:
        assert verify_all(message.content, dns) == [("example.org", "other")]
        assert dkimpy_verify_all(message.content, dns) == 1


def _worker_reloads(daemon: DaemonProcess) -> int:
    lines = daemon.log_lines()
    return sum(1 for line in lines if line.get("event") == "ingest worker reloaded")


def test_keygen_writes_a_private_key_and_prints_a_record_that_verifies(tmp_path: Path) -> None:
    for algorithm in ("rsa-sha256", "ed25519-sha256"):
        done = cli(
            "dkim",
            "keygen",
            "example.org",
            f"k-{algorithm}",
            "--algorithm",
            algorithm,
            "--directory",
            str(tmp_path),
        )
        assert done.code == 0, done.err
        path = tmp_path / f"example.org.k-{algorithm}.key"
        assert path.stat().st_mode & 0o777 == 0o600
        lines = done.out.splitlines()
        (record_line,) = [x for x in lines if "._domainkey." in x]
        name, txt = record_line.split(" IN TXT ")
        assert name == f"k-{algorithm}._domainkey.example.org."
        strings = re.findall(r'"([^"]*)"', txt)
        assert all(len(s) <= 255 for s in strings)
        if algorithm == "rsa-sha256":
            assert len(strings) == 2  # 2048 bits do not fit one string
        dns = StubDns()
        dns.publish("example.org", f"k-{algorithm}", "".join(strings))
        # The printed table is what the config takes.
        table = "\n".join(lines[lines.index("[[dkim]]") :])
        assert f'key_file = "{path}"' in table and f'algorithm = "{algorithm}"' in table
        key = load_key(path, domain="example.org", selector=f"k-{algorithm}", algorithm=algorithm)
        signature = DkimSigner([key]).sign(Body.from_content(CONTENT).wire, datetime.now(UTC))
        message = signature.header + CONTENT
        assert verify_all(message, dns) == [("example.org", f"k-{algorithm}")]
        assert dkimpy_verify_all(message, dns) == 1

        before = path.read_bytes()
        again = cli("dkim", "keygen", "example.org", f"k-{algorithm}", "--directory", str(tmp_path))
        assert again.code == 1
        assert "exists; a key is never overwritten" in again.err
        assert path.read_bytes() == before


def test_keygen_refuses_bits_for_ed25519_and_prints_a_toml_string_for_any_path(
    tmp_path: Path,
) -> None:
    done = cli(
        "dkim",
        "keygen",
        "example.org",
        "e1",
        "--algorithm",
        "ed25519-sha256",
        "--bits",
        "4096",
        "--directory",
        str(tmp_path),
    )
    assert done.code == 2
    assert "--bits is for rsa-sha256 keys; an Ed25519 key has one size" in done.err
    assert list(tmp_path.iterdir()) == []
    odd = tmp_path / 'a "quoted" dir\\with\tcontrol'
    odd.mkdir()
    done = cli(
        "dkim",
        "keygen",
        "example.org",
        "e1",
        "--algorithm",
        "ed25519-sha256",
        "--directory",
        str(odd),
    )
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    table = tomllib.loads("\n".join(lines[lines.index("[[dkim]]") :]))
    assert table["dkim"][0]["key_file"] == str(odd / "example.org.e1.key")


def test_dkim_check_says_which_keys_dns_publishes(tmp_path: Path) -> None:
    key_file(tmp_path, "rsa.key", RSA_KEY)
    key_file(tmp_path, "ed.key", ED_KEY)
    key_file(tmp_path, "other.key", OTHER_KEY)
    config = _config(
        tmp_path,
        "127.0.0.1:9",
        _dkim_table("rsa2026", "rsa.key", "rsa-sha256")
        + _dkim_table("ed2026", "ed.key", "ed25519-sha256")
        + _dkim_table("stale", "other.key", "ed25519-sha256")
        + _dkim_table("new", "other.key", "ed25519-sha256"),
    )
    dns = StubDns()
    dns.publish("example.org", "rsa2026", public_key_record(RSA_KEY))  # 2 strings
    dns.publish("example.org", "ed2026", public_key_record(ED_KEY))
    dns.publish("example.org", "stale", public_key_record(ED_KEY))  # another key
    with DnsServer(dns) as server:
        done = cli("--config", str(config), "dkim", "check", "--nameserver", server.address)
        assert done.code == 1, done.err
        assert done.out.splitlines() == [
            "ok       rsa2026._domainkey.example.org (rsa-sha256)",
            "ok       ed2026._domainkey.example.org (ed25519-sha256)",
            "wrong    stale._domainkey.example.org (ed25519-sha256): "
            f"p= is another key than {tmp_path / 'other.key'}",
            "wrong    new._domainkey.example.org (ed25519-sha256): no TXT record",
        ]
        assert "2 key(s) of 4 not published as configured" in done.err
        dns.publish("example.org", "stale", public_key_record(OTHER_KEY))
        dns.publish("example.org", "new", public_key_record(OTHER_KEY))
        # Without --nameserver: the daemon's own, [dns] nameservers.
        with config.open("a") as f:
            f.write(f'\n[dns]\nnameservers = ["{server.address}"]\n')
        done = cli("--config", str(config), "dkim", "check")
        assert done.code == 0, done.err
        assert done.out.count("ok       ") == 4
    done = cli("--config", str(config), "dkim", "check", "--nameserver", "not a server")
    assert done.code == 2 and "no DNS server to ask" in done.err
