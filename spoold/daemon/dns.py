"""The daemon's DNS: one resolver, pointed where ``[dns] nameservers``
says, for every lookup the daemon makes (dnspython).

:class:`DnsLookups` answers MX (for :class:`~spoold.daemon.mx.MxResolver`),
TXT (the MTA-STS record), TLSA (DANE) and, when nameservers are set,
the addresses of a host (the MX hosts the relay dials, ``mta-sts.DOMAIN``
for the policy fetch). Without ``[dns] nameservers`` it reads the system's
``/etc/resolv.conf`` and :attr:`DnsLookups.resolve_host` is None, so host
names are resolved as they always were, by the event loop's
``getaddrinfo`` (``/etc/hosts`` first).

Every query is sent with EDNS0 and the DO bit; an answer counts as
DNSSEC-validated only when the resolver set the AD bit in its response,
which a validating resolver does (spoold does no validation of its own:
DANE needs a validating resolver, say unbound on 127.0.0.1, named in
``[dns] nameservers`` or in resolv.conf, and a trusted path to it).
Answers are cached by TTL (dnspython's cache). Every lookup is bounded by
``lifetime`` seconds. Making a :class:`DnsLookups` without nameservers
reads resolv.conf (blocking, once).
"""

from __future__ import annotations

import ipaddress

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.nameserver
import dns.rdatatype
import dns.resolver

from spoold.dane import TlsaRecord
from spoold.errors import MxError
from spoold.hops import nameserver_address
from spoold.tls_policy import TlsaAnswer

__all__ = ["DnsLookups", "nameserver_address"]

LIFETIME = 10.0
CACHE_SIZE = 10_000  # answers kept (names are chosen by outsiders: bounded)


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _authentic(response: dns.message.Message | None) -> bool:
    return response is not None and bool(response.flags & dns.flags.AD)


class DnsLookups:
    """The daemon's lookups on one resolver (see the module docstring)."""

    def __init__(self, nameservers: tuple[str, ...] = (), lifetime: float = LIFETIME) -> None:
        self.nameservers = nameservers
        self.lifetime = lifetime
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*nameserver_address(n)) for n in nameservers
            ]
        else:
            try:
                resolver = dns.asyncresolver.Resolver()
            except dns.exception.DNSException:  # no resolv.conf: every lookup fails for now
                resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.use_edns(0, dns.flags.DO, 1232)
        resolver.cache = dns.resolver.LRUCache(CACHE_SIZE)
        self.resolver = resolver

    def remote_nameservers(self) -> list[str]:
        """The nameservers in use (``[dns] nameservers``, else resolv.conf's)
        that are not on this machine: the AD bit of their answers can be
        forged by anyone on the path to them."""
        if self.nameservers:
            addresses = [nameserver_address(n)[0] for n in self.nameservers]
        else:
            addresses = [
                n if isinstance(n, str) else str(getattr(n, "address", n))
                for n in self.resolver.nameservers
            ]
        return [a for a in addresses if not _loopback(a)]

    @property
    def resolve_host(self) -> DnsLookups | None:
        """Self when host addresses are to be asked of the nameservers
        (``addresses``), None for the system resolver."""
        return self if self.nameservers else None

    async def _resolve(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.resolver.Answer:
        return await self.resolver.resolve(
            name, rdtype, lifetime=self.lifetime, raise_on_no_answer=False, search=False
        )

    async def mx(self, domain: str) -> tuple[list[tuple[int, str]], float]:
        """The domain's MX records as (preference, host) and their TTL; a
        domain without MX but with an address is its own (RFC 5321 §5.1).
        Raises :class:`~spoold.errors.MxError` (see :mod:`spoold.daemon.mx`)."""
        try:
            answer = await self._resolve(domain, dns.rdatatype.MX)
        except dns.resolver.NXDOMAIN:
            raise MxError(f"domain {domain} does not exist", permanent=True) from None
        except dns.exception.DNSException as exc:
            raise MxError(f"MX lookup of {domain} failed: {exc}", permanent=False) from None
        if answer.rrset is None:
            return await self._implicit_mx(domain)
        records = [(r.preference, r.exchange.to_text().rstrip(".")) for r in answer]
        return records, float(answer.rrset.ttl)

    async def _implicit_mx(self, domain: str) -> tuple[list[tuple[int, str]], float]:
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = await self._resolve(domain, rdtype)
            except dns.resolver.NXDOMAIN:
                break
            except dns.exception.DNSException as exc:
                raise MxError(
                    f"address lookup of {domain} failed: {exc}", permanent=False
                ) from None
            if answer.rrset is not None:
                return [(0, domain)], 300.0
        raise MxError(f"domain {domain} has no MX and no address", permanent=True)

    async def mx_secure(self, domain: str) -> frozenset[str]:
        """The domain's MX host names when the MX answer is DNSSEC-validated
        (AD set); the domain itself when it has no MX but a validated
        address; else (not validated, or no such domain) an empty set.
        Raises :class:`dns.exception.DNSException` when DNS fails (SERVFAIL,
        which is what a validating resolver answers for forged data, or a
        timeout), for the MX lookup as for the address lookups after it:
        the caller must not take that for "not validated"."""
        try:
            answer = await self._resolve(domain, dns.rdatatype.MX)
        except dns.resolver.NXDOMAIN:
            return frozenset()
        if not _authentic(answer.response):
            return frozenset()
        if answer.rrset is not None:
            return frozenset(r.exchange.to_text().rstrip(".").lower() for r in answer)
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                address = await self._resolve(domain, rdtype)
            except dns.resolver.NXDOMAIN:
                return frozenset()
            if address.rrset is not None and _authentic(address.response):
                return frozenset({domain.lower().rstrip(".")})
        return frozenset()

    async def txt(self, name: str) -> list[str]:
        """The TXT records at ``name``, each one's strings joined; ``[]``
        for none. Raises when DNS fails."""
        try:
            answer = await self._resolve(name, dns.rdatatype.TXT)
        except dns.resolver.NXDOMAIN:
            return []
        if answer.rrset is None:
            return []
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]

    async def tlsa(self, host: str, port: int) -> TlsaAnswer:
        """The TLSA records of ``_PORT._tcp.HOST`` and whether the answer
        was validated. Raises when DNS fails (SERVFAIL, timeout)."""
        name = f"_{port}._tcp.{host}"
        try:
            answer = await self._resolve(name, dns.rdatatype.TLSA)
        except dns.resolver.NXDOMAIN:
            return TlsaAnswer((), False)
        records = tuple(
            TlsaRecord(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in (answer.rrset or ())
        )
        return TlsaAnswer(records, _authentic(answer.response))

    async def addresses(self, host: str) -> list[str]:
        """The IPv4 then IPv6 addresses of ``host``; raises
        :class:`LookupError` for none, :class:`dns.exception.DNSException`
        when DNS fails."""
        found: list[str] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = await self._resolve(host, rdtype)
            except dns.resolver.NXDOMAIN:
                raise LookupError(f"{host} does not exist") from None
            found.extend(r.address for r in (answer.rrset or ()))
        if not found:
            raise LookupError(f"{host} has no address")
        return found

    async def __call__(self, host: str) -> list[str]:
        """:meth:`addresses` (so this object is a
        :data:`~spoold.hops.ResolveHost`)."""
        return await self.addresses(host)
