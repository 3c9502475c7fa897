"""MX lookup for ``mx = true`` routes (dnspython), cached by TTL.

:meth:`MxResolver.next_hops` gives a domain's mail exchangers as
``host:25`` next hops, best preference first (equal preferences keep DNS
order). A domain with no MX record but an address is its own exchanger
(RFC 5321 §5.1). A domain that does not exist, or a "null MX" (``0 .``),
raises :class:`MxError` with ``permanent=True``; a timeout or server
failure raises it with ``permanent=False`` (the submitter answers 451 and
the client retries). Answers are cached for their TTL, failures for
``negative_ttl`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from spoold.errors import (
    MxError,
)

__all__ = ["MxResolver", "Lookup"]

# (domain) -> (list of (preference, host), ttl seconds)
Lookup = Callable[[str], Awaitable[tuple[list[tuple[int, str]], float]]]


async def _dns_lookup(domain: str) -> tuple[list[tuple[int, str]], float]:
    resolver = dns.asyncresolver.Resolver()
    try:
        answer = await resolver.resolve(domain, dns.rdatatype.MX, lifetime=10)
    except dns.resolver.NXDOMAIN:
        raise MxError(f"domain {domain} does not exist", permanent=True) from None
    except dns.resolver.NoAnswer:
        return await _implicit_mx(resolver, domain)
    except dns.exception.DNSException as exc:
        raise MxError(f"MX lookup of {domain} failed: {exc}", permanent=False) from None
    ttl = float(answer.rrset.ttl) if answer.rrset is not None else 300.0
    return [(r.preference, r.exchange.to_text().rstrip(".")) for r in answer], ttl


async def _implicit_mx(
    resolver: dns.asyncresolver.Resolver, domain: str
) -> tuple[list[tuple[int, str]], float]:
    """No MX: the domain is its own exchanger if it has an address."""
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            await resolver.resolve(domain, rdtype, lifetime=10)
        except dns.resolver.NoAnswer:
            continue
        except dns.resolver.NXDOMAIN:
            break
        except dns.exception.DNSException as exc:
            raise MxError(f"address lookup of {domain} failed: {exc}", permanent=False) from None
        return [(0, domain)], 300.0
    raise MxError(f"domain {domain} has no MX and no address", permanent=True)


class MxResolver:
    """MX lookups with a cache: ``next_hops(domain)`` gives the domain's
    exchangers as hops, best first, or raises :class:`~spoold.errors.MxError`
    (``permanent`` or not). Answers are kept for their TTL, failures for
    ``negative_ttl`` seconds. ``lookup`` replaces DNS (tests)."""

    def __init__(self, lookup: Lookup | None = None, negative_ttl: float = 60.0) -> None:
        self._lookup = lookup or _dns_lookup
        self.negative_ttl = negative_ttl
        self._cache: dict[str, tuple[float, list[str] | MxError]] = {}

    async def next_hops(self, domain: str) -> list[str]:
        domain = domain.lower().rstrip(".")
        now = time.monotonic()
        cached = self._cache.get(domain)
        if cached is not None and cached[0] > now:
            result = cached[1]
            if isinstance(result, MxError):
                raise result
            return list(result)
        try:
            records, ttl = await self._lookup(domain)
        except MxError as exc:
            self._cache[domain] = (now + self.negative_ttl, exc)
            raise
        records = sorted(records, key=lambda r: r[0])  # stable: DNS order within a preference
        if not records or (len(records) == 1 and records[0][1] in ("", ".")):
            error = MxError(f"domain {domain} accepts no mail (null MX)", permanent=True)
            self._cache[domain] = (now + self.negative_ttl, error)
            raise error
        hops = [f"{host}:25" for _, host in records if host not in ("", ".")]
        self._cache[domain] = (now + ttl, hops)
        return list(hops)
