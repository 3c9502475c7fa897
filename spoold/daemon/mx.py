"""MX lookup for ``mx = true`` routes (dnspython), cached by TTL.

:meth:`MxResolver.next_hops` gives a domain's mail exchangers as
``host:25`` next hops, best preference first (equal preferences keep DNS
order). A domain with no MX record but an address is its own exchanger
(RFC 5321 §5.1). A domain that does not exist, or a "null MX" (``0 .``),
raises :class:`MxError` with ``permanent=True``; a timeout or server
failure raises it with ``permanent=False`` (the submitter answers 451 and
the client retries). Answers are cached for their TTL, failures for
``negative_ttl`` seconds. The lookup itself is
:meth:`spoold.daemon.dns.DnsLookups.mx` (the daemon's ``[dns]``
nameservers, else the system's), or a function given (tests).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from spoold.daemon.dns import DnsLookups
from spoold.errors import MxError

__all__ = ["MxResolver", "Lookup"]

# (domain) -> (list of (preference, host), ttl seconds)
Lookup = Callable[[str], Awaitable[tuple[list[tuple[int, str]], float]]]


class MxResolver:
    """MX lookups with a cache: ``next_hops(domain)`` gives the domain's
    exchangers as hops, best first, or raises :class:`~spoold.errors.MxError`
    (``permanent`` or not). Answers are kept for their TTL, failures for
    ``negative_ttl`` seconds. ``lookup`` replaces DNS (tests)."""

    def __init__(self, lookup: Lookup | None = None, negative_ttl: float = 60.0) -> None:
        self._lookup = lookup or DnsLookups().mx
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
