"""The TLS policy of an MX route through a real daemon (``spoold run`` in a
subprocess), against a DNS server, an HTTPS server and an MX host of the
test's own.

The daemon's ``[dns] nameservers`` names the test's DNS server
(tests/dns_server.py), which holds ``example.org``'s MX record, the
addresses of ``mx.example.org`` and ``mta-sts.example.org`` (a random
loopback address per test), the ``_mta-sts`` TXT record and the TLSA
records, with the AD bit on the names the test calls signed. The MX host is
an aiosmtpd server on that address's port 25 with STARTTLS, and the policy
is served on its port 443 (both need the right to bind low ports). Certificates come from a
trustme CA that the daemon trusts through ``SSL_CERT_FILE`` (the default
trust store of Python's ``ssl``, read by the relay and the policy fetch),
or from another CA it does not trust (DANE needs no CA).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.daemon_helpers import DaemonFactory, DaemonProcess, cli, sendmail, write_config
from tests.dns_server import (
    DnsTestServer,
    HttpsTestServer,
    dns_server,
    loopback_address,
    need_low_ports,
)
from tests.smtp_server import SmtpTestServer
from tests.support import wait_until

__all__ = ["dns_server"]  # the fixture, used by name

MESSAGE = b"Subject: policy\r\n\r\nbody\r\n"
TIMEOUT = 30


@dataclass
class World:
    """Example.org's MX host, web server and DNS, as one test sets them."""

    tmp: Path
    dns: DnsTestServer
    address: str = field(default_factory=loopback_address)
    trusted: trustme.CA = field(default_factory=trustme.CA)
    untrusted: trustme.CA = field(default_factory=trustme.CA)
    servers: list[SmtpTestServer | HttpsTestServer] = field(default_factory=list)

    @property
    def ca_file(self) -> Path:
        path = self.tmp / "trusted-ca.pem"
        if not path.exists():
            self.trusted.cert_pem.write_to_path(str(path))
        return path

    def mx_cert(self, ca: trustme.CA) -> trustme.LeafCert:
        return ca.issue_cert("mx.example.org")

    async def mx_host(self, cert: trustme.LeafCert | None) -> SmtpTestServer:
        """The MX host on ADDRESS:25, with STARTTLS under ``cert`` (None:
        without STARTTLS)."""
        context = None
        if cert is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(context)
        server = SmtpTestServer(tls_context=context)
        with _port_in_use(25):
            await server.start(25, self.address)
        self.servers.append(server)
        self.dns.add("example.org", "MX", "10 mx.example.org.")
        self.dns.add("mx.example.org", "A", self.address)
        return server

    async def publish_sts(self, mode: str, *mx: str, policy_id: str = "1") -> HttpsTestServer:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.trusted.issue_cert("mta-sts.example.org").configure_cert(context)
        lines = "".join(f"mx: {m}\r\n" for m in mx)
        web = HttpsTestServer(
            context, body=f"version: STSv1\r\nmode: {mode}\r\n{lines}max_age: 86400\r\n"
        )
        with _port_in_use(443):
            await web.start(self.address, 443)
        self.servers.append(web)
        self.dns.add("_mta-sts.example.org", "TXT", f'"v=STSv1; id={policy_id};"')
        self.dns.add("mta-sts.example.org", "A", self.address)
        return web

    def publish_tlsa(self, cert: trustme.LeafCert, *, signed: bool) -> None:
        """A DANE-EE SPKI SHA-256 record (3 1 1) of ``cert``'s key at
        ``_25._tcp.mx.example.org``; ``signed``: the MX and TLSA answers
        carry the AD bit."""
        der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
        spki = (
            x509.load_der_x509_certificate(der)
            .public_key()
            .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        )
        digest = hashlib.sha256(spki).hexdigest()
        self.dns.add("_25._tcp.mx.example.org", "TLSA", f"3 1 1 {digest}", signed=signed)
        if signed:
            self.dns.sign("example.org")

    def config(self, tls_policy: str) -> Path:
        config = write_config(self.tmp, next_hops=["127.0.0.1:9"])
        config.write_text(
            config.read_text()
            + "\n[routes.direct]\n"
            + 'domains = ["example.org"]\n'
            + "mx = true\n"
            + f'tls_policy = "{tls_policy}"\n'
            + "\n[dns]\n"
            + f'nameservers = ["{self.dns.nameserver}"]\n'
        )
        return config

    async def start(self, start_daemon: DaemonFactory, tls_policy: str) -> DaemonProcess:
        config = self.config(tls_policy)
        return await start_daemon(config, env={"SSL_CERT_FILE": str(self.ca_file)})


@contextlib.contextmanager
def _port_in_use(port: int) -> Iterator[None]:
    """Skip, saying why, when something holds the port on every address."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        pytest.skip(f"port {port} is taken on every address (a mail or web server?): {exc}")


@pytest.fixture
async def world(tmp_path: Path, dns_server: DnsTestServer) -> AsyncIterator[World]:
    need_low_ports()
    w = World(tmp_path, dns_server)
    try:
        yield w
    finally:
        for server in w.servers:
            await server.stop()


async def _send(daemon: DaemonProcess) -> None:
    done = await sendmail(daemon.config, "-f", "app@example.com", "rcpt@example.org", stdin=MESSAGE)
    assert done.code == 0, done.err + daemon.log_text()


async def _status(daemon: DaemonProcess) -> list[dict[str, Any]]:
    done = await anyio.to_thread.run_sync(
        cli, "--socket", str(daemon.socket), "status", "--format", "json"
    )
    assert done.code == 0, done.err
    return [json.loads(line) for line in done.out.splitlines() if line.strip()]


async def _last_error(daemon: DaemonProcess) -> str:
    """The last error of the one queued message, once it has one."""

    async def error() -> str | None:
        rows = await _status(daemon)
        if rows and rows[0]["relay_attempts"]:
            return str(rows[0]["relay_attempts"][0]["error"])
        return None

    return str(await wait_until(error, daemon.log_text, timeout=TIMEOUT, interval=0.1))


async def _delivered(daemon: DaemonProcess, server: SmtpTestServer) -> None:
    await wait_until(lambda: server.messages, daemon.log_text, timeout=TIMEOUT, interval=0.05)
    assert [m.mail_from for m in server.messages] == ["app@example.com"]

    async def queue_empty() -> bool:
        return not await _status(daemon)

    await wait_until(queue_empty, daemon.log_text, timeout=TIMEOUT, interval=0.05)


# ------------------------------------------------------------------ MTA-STS


async def test_enforce_delivers_over_tls_to_a_named_mx(
    world: World, start_daemon: DaemonFactory
) -> None:
    server = await world.mx_host(world.mx_cert(world.trusted))
    web = await world.publish_sts("enforce", "*.example.org")
    daemon = await world.start(start_daemon, "mta-sts")

    await _send(daemon)
    await _delivered(daemon, server)
    await _send(daemon)
    await wait_until(lambda: len(server.messages) == 2, daemon.log_text, timeout=TIMEOUT)

    assert all(m.tls for m in server.messages)
    assert web.requests == 1  # the policy is kept for its max_age
    assert '"MTA-STS policy fetched"' in daemon.log_text()


async def test_enforce_defers_an_mx_the_policy_does_not_name(
    world: World, start_daemon: DaemonFactory
) -> None:
    server = await world.mx_host(world.mx_cert(world.trusted))
    await world.publish_sts("enforce", "mx.example.net")
    daemon = await world.start(start_daemon, "mta-sts")

    await _send(daemon)

    error = await _last_error(daemon)
    assert error == (
        "no hops available: mx.example.org:25: TLS policy (MTA-STS enforce): "
        "mx.example.org is not in the policy of example.org"
    )
    rows = await _status(daemon)
    assert rows[0]["status"] == "send_at"
    assert server.connections_opened == 0  # never dialled

    # What operations.md tells the operator: lift the policy, reload, send.
    config = daemon.config
    config.write_text(config.read_text().replace('tls_policy = "mta-sts"', 'tls_policy = "none"'))
    for command in (("reload",), ("send", "--all")):
        done = await anyio.to_thread.run_sync(cli, "--socket", str(daemon.socket), *command)
        assert done.code == 0, done.err
    await _delivered(daemon, server)


async def test_enforce_defers_an_mx_without_starttls(
    world: World, start_daemon: DaemonFactory
) -> None:
    server = await world.mx_host(None)
    await world.publish_sts("enforce", "mx.example.org")
    daemon = await world.start(start_daemon, "mta-sts")

    await _send(daemon)

    error = await _last_error(daemon)
    assert error == (
        "no hops available: mx.example.org:25: TLS policy (MTA-STS enforce): "
        "mx.example.org does not offer STARTTLS"
    )
    assert server.messages == []


async def test_enforce_defers_an_mx_whose_certificate_is_not_trusted(
    world: World, start_daemon: DaemonFactory
) -> None:
    server = await world.mx_host(world.mx_cert(world.untrusted))
    await world.publish_sts("enforce", "mx.example.org")
    daemon = await world.start(start_daemon, "mta-sts")

    await _send(daemon)

    error = await _last_error(daemon)
    assert error.startswith(
        "no hops available: mx.example.org:25: TLS policy (MTA-STS enforce): TLS handshake failed: "
    ), error
    assert "certificate verify failed" in error.lower() or "CERTIFICATE_VERIFY_FAILED" in error
    assert server.messages == []


async def test_testing_mode_delivers_and_reports(world: World, start_daemon: DaemonFactory) -> None:
    server = await world.mx_host(world.mx_cert(world.trusted))
    await world.publish_sts("testing", "mx.example.net")
    daemon = await world.start(start_daemon, "mta-sts")

    await _send(daemon)

    await _delivered(daemon, server)
    log = daemon.log_text()
    assert "TLS policy (MTA-STS testing): this MX is not in the policy; delivering" in log


async def test_testing_mode_reports_a_named_mx_without_starttls(
    world: World, start_daemon: DaemonFactory
) -> None:
    server = await world.mx_host(None)
    await world.publish_sts("testing", "mx.example.org")
    daemon = await world.start(start_daemon, "mta-sts")

    await _send(daemon)

    await _delivered(daemon, server)
    assert not server.messages[0].tls
    assert "TLS policy (MTA-STS testing): no TLS to this MX; delivering" in daemon.log_text()


async def test_none_ignores_a_published_policy(world: World, start_daemon: DaemonFactory) -> None:
    """Today's behaviour, kept for routes without a policy: the policy is
    not even fetched."""
    server = await world.mx_host(world.mx_cert(world.trusted))
    web = await world.publish_sts("enforce", "mx.example.net")
    daemon = await world.start(start_daemon, "none")

    await _send(daemon)

    await _delivered(daemon, server)
    assert web.requests == 0


# --------------------------------------------------------------------- DANE


async def test_dane_delivers_to_a_host_matching_its_validated_tlsa(
    world: World, start_daemon: DaemonFactory
) -> None:
    cert = world.mx_cert(world.untrusted)  # no CA of ours: DANE-EE needs none
    server = await world.mx_host(cert)
    world.publish_tlsa(cert, signed=True)
    daemon = await world.start(start_daemon, "dane-mta-sts")

    await _send(daemon)

    await _delivered(daemon, server)
    assert server.messages[0].tls


async def test_dane_ta_delivers_to_a_host_whose_chain_leads_to_the_anchor(
    world: World, start_daemon: DaemonFactory
) -> None:
    """A ``2 0 0`` record (the whole certificate of the host's CA, one the
    daemon's trust store does not hold) authenticates the host."""
    server = await world.mx_host(world.mx_cert(world.untrusted))
    anchor = ssl.PEM_cert_to_DER_cert(world.untrusted.cert_pem.bytes().decode())
    world.dns.add("_25._tcp.mx.example.org", "TLSA", f"2 0 0 {anchor.hex()}", signed=True)
    world.dns.sign("example.org")
    daemon = await world.start(start_daemon, "dane-mta-sts")

    await _send(daemon)

    await _delivered(daemon, server)
    assert server.messages[0].tls


async def test_dane_ta_defers_a_host_whose_chain_leads_elsewhere(
    world: World, start_daemon: DaemonFactory
) -> None:
    """Even to a CA the daemon trusts otherwise: only the anchor counts."""
    server = await world.mx_host(world.mx_cert(world.trusted))
    anchor = ssl.PEM_cert_to_DER_cert(world.untrusted.cert_pem.bytes().decode())
    world.dns.add("_25._tcp.mx.example.org", "TLSA", f"2 0 0 {anchor.hex()}", signed=True)
    world.dns.sign("example.org")
    daemon = await world.start(start_daemon, "dane-mta-sts")

    await _send(daemon)

    error = await _last_error(daemon)
    assert error.startswith(
        "no hops available: mx.example.org:25: TLS policy (DANE): TLS handshake failed: "
    ), error
    assert server.messages == []


async def test_dane_defers_a_host_whose_certificate_does_not_match(
    world: World, start_daemon: DaemonFactory
) -> None:
    server = await world.mx_host(world.mx_cert(world.trusted))
    world.publish_tlsa(world.mx_cert(world.trusted), signed=True)  # another key
    await world.publish_sts("enforce", "mx.example.org")  # DANE wins over it
    daemon = await world.start(start_daemon, "dane-mta-sts")

    await _send(daemon)

    error = await _last_error(daemon)
    assert error == (
        "no hops available: mx.example.org:25: TLS policy (DANE): the certificate of "
        "mx.example.org matches none of its 1 usable TLSA record(s) "
        "(_25._tcp.mx.example.org)"
    )
    assert server.messages == []


async def test_tlsa_without_the_ad_bit_falls_back_to_mta_sts(
    world: World, start_daemon: DaemonFactory
) -> None:
    """Unvalidated TLSA records that would not match are ignored: MTA-STS
    rules, and its PKIX check passes."""
    server = await world.mx_host(world.mx_cert(world.trusted))
    world.dns.sign("example.org")  # a signed MX answer...
    world.publish_tlsa(world.mx_cert(world.trusted), signed=False)  # ...but TLSA without AD
    web = await world.publish_sts("enforce", "mx.example.org")
    daemon = await world.start(start_daemon, "dane-mta-sts")

    await _send(daemon)

    await _delivered(daemon, server)
    assert server.messages[0].tls
    assert web.requests == 1
    assert ("_25._tcp.mx.example.org.", "TLSA") in world.dns.queries
    assert "TLSA records not validated (no AD); using MTA-STS" in daemon.log_text()


async def test_a_failed_tlsa_lookup_of_a_signed_domain_defers(
    world: World, start_daemon: DaemonFactory
) -> None:
    server = await world.mx_host(world.mx_cert(world.trusted))
    world.dns.sign("example.org")
    world.dns.fail("_25._tcp.mx.example.org")
    daemon = await world.start(start_daemon, "dane-mta-sts")

    await _send(daemon)

    error = await _last_error(daemon)
    assert error.startswith(
        "no hops available: mx.example.org:25: TLS policy (DANE): the TLSA lookup of "
        "_25._tcp.mx.example.org failed: "
    ), error
    assert server.connections_opened == 0


async def test_a_failed_mx_lookup_defers_rather_than_drop_dane(
    world: World, start_daemon: DaemonFactory
) -> None:
    """RFC 7672 §2.1.1: the domain's MX answer fails when the attempt asks
    it again (a validating resolver's SERVFAIL for forged data): the mail
    waits; it never goes with a TLS an attacker could strip."""
    world.dns.ttl = 0  # nothing kept: the attempt asks again
    cert = world.mx_cert(world.untrusted)
    server = await world.mx_host(cert)
    world.publish_tlsa(cert, signed=True)
    world.dns.fail("example.org", "MX", after=1)  # the routing's lookup is answered
    daemon = await world.start(start_daemon, "dane-mta-sts")

    await _send(daemon)

    error = await _last_error(daemon)
    assert error.startswith(
        "no hops available: mx.example.org:25: TLS policy (DANE): the MX lookup of "
        "example.org failed: "
    ), error
    assert server.connections_opened == 0


async def test_dane_with_a_remote_resolver_is_warned_about(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """The AD bit of a resolver reached over the network can be forged on
    the way: a dane-mta-sts route with such nameservers is warned about at
    start and at each reload, and not once they are on this machine."""
    config = write_config(tmp_path, next_hops=["127.0.0.1:9"])
    base = config.read_text() + (
        '\n[routes.direct]\ndomains = ["example.org"]\nmx = true\n'
        'tls_policy = "dane-mta-sts"\n\n[dns]\n'
    )
    config.write_text(base + 'nameservers = ["192.0.2.53"]\n')
    warning = "DANE trusts the AD bit of DNS servers not on this machine"
    daemon = await start_daemon(config)
    assert warning in daemon.log_text()
    assert '"192.0.2.53"' in daemon.log_text()

    config.write_text(base + 'nameservers = ["127.0.0.1:53", "[::1]"]\n')
    done = await anyio.to_thread.run_sync(cli, "--socket", str(daemon.socket), "reload")
    assert done.code == 0, done.err
    config.write_text(base + 'nameservers = ["192.0.2.54"]\n')
    done = await anyio.to_thread.run_sync(cli, "--socket", str(daemon.socket), "reload")
    assert done.code == 0, done.err
    log = daemon.log_text()
    assert log.count(warning) == 2 and '"192.0.2.54"' in log
