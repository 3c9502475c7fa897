"""The daemon's DNS lookups (spoold/daemon/dns.py) against a DNS server of
the test's own (tests/dns_server.py): answers, the AD bit trusted only when
the server sets it, and failures."""

from __future__ import annotations

import anyio
import dns.resolver
import pytest

from spoold.daemon.dns import DnsLookups, nameserver_address
from spoold.daemon.mx import MxResolver
from spoold.dane import TlsaRecord
from spoold.errors import MxError
from tests.dns_server import DnsTestServer, dns_server

__all__ = ["dns_server"]  # the fixture, used by name

DIGEST = "ab" * 32
TIMEOUT = 20


def _lookups(server: DnsTestServer) -> DnsLookups:
    return DnsLookups((server.nameserver,), lifetime=5)


def test_nameserver_addresses() -> None:
    assert nameserver_address("127.0.0.1") == ("127.0.0.1", 53)
    assert nameserver_address("127.0.0.53:5353") == ("127.0.0.53", 5353)
    assert nameserver_address("[::1]:54") == ("::1", 54)
    assert nameserver_address("[::1]") == ("::1", 53)


async def test_mx_txt_and_addresses(dns_server: DnsTestServer) -> None:
    dns_server.add("example.org", "MX", "20 mx2.example.org.", "10 mx1.example.org.")
    dns_server.add("_mta-sts.example.org", "TXT", '"v=STSv1; " "id=42;"', '"other"')
    dns_server.add("mx1.example.org", "A", "127.1.2.3")
    dns_server.add("mx1.example.org", "AAAA", "::1")
    lookups = _lookups(dns_server)
    with anyio.fail_after(TIMEOUT):
        assert await MxResolver(lookups.mx).next_hops("example.org") == [
            "mx1.example.org:25",
            "mx2.example.org:25",
        ]
        assert sorted(await lookups.txt("_mta-sts.example.org")) == ["other", "v=STSv1; id=42;"]
        assert await lookups.txt("_mta-sts.example.net") == []
        assert await lookups.addresses("mx1.example.org") == ["127.1.2.3", "::1"]
        with pytest.raises(LookupError, match="does not exist"):
            await lookups.addresses("mx9.example.org")
        assert lookups.resolve_host is lookups
    assert DnsLookups().resolve_host is None  # no nameservers: the system resolver


async def test_ad_is_trusted_only_when_set(dns_server: DnsTestServer) -> None:
    dns_server.add("example.org", "MX", "10 mx.example.org.", signed=True)
    dns_server.add("example.net", "MX", "10 mx.example.net.")
    dns_server.add("_25._tcp.mx.example.org", "TLSA", f"3 1 1 {DIGEST}", signed=True)
    dns_server.add("_25._tcp.mx.example.net", "TLSA", f"3 1 1 {DIGEST}")
    lookups = _lookups(dns_server)
    record = TlsaRecord(3, 1, 1, bytes.fromhex(DIGEST))
    with anyio.fail_after(TIMEOUT):
        assert await lookups.mx_secure("example.org") == {"mx.example.org"}
        assert await lookups.mx_secure("example.net") == frozenset()
        assert await lookups.mx_secure("example.com") == frozenset()  # NXDOMAIN
        signed = await lookups.tlsa("mx.example.org", 25)
        assert signed.records == (record,) and signed.secure
        unsigned = await lookups.tlsa("mx.example.net", 25)
        assert unsigned.records == (record,) and not unsigned.secure
        none = await lookups.tlsa("mx.example.com", 25)
        assert none.records == () and not none.secure


async def test_failures_raise(dns_server: DnsTestServer) -> None:
    dns_server.add("example.org", "MX", "10 mx.example.org.")
    dns_server.fail("_25._tcp.mx.example.org")
    dns_server.fail("example.net")
    lookups = _lookups(dns_server)
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(dns.resolver.NoNameservers, match="SERVFAIL"):
            await lookups.tlsa("mx.example.org", 25)
        with pytest.raises(dns.resolver.NoNameservers, match="SERVFAIL"):
            await lookups.mx_secure("example.net")
        with pytest.raises(MxError) as caught:
            await lookups.mx("example.net")
        assert not caught.value.permanent
        with pytest.raises(MxError, match="does not exist") as missing:
            await lookups.mx("example.com")
        assert missing.value.permanent


async def test_a_signed_domain_without_mx_whose_address_lookup_fails_raises(
    dns_server: DnsTestServer,
) -> None:
    """No MX, then the A lookup fails: a failure (DANE defers), never an
    empty "not validated" set (which would fall back to MTA-STS)."""
    dns_server.add("example.org", "TXT", '"no mx here"', signed=True)
    dns_server.fail("example.org", "A")
    lookups = _lookups(dns_server)
    with anyio.fail_after(TIMEOUT), pytest.raises(dns.resolver.NoNameservers):
        await lookups.mx_secure("example.org")


def test_the_answer_cache_is_bounded() -> None:
    cache = DnsLookups(("127.0.0.1",)).resolver.cache
    assert isinstance(cache, dns.resolver.LRUCache) and cache.max_size > 0
