"""Next hop syntax: ``host:port``, ``[IPv6 address]:port`` or ``host``.

One parser for every place a hop is written: the config (``next_hops``),
the record (``next_hop_choices``) and the relay that connects to it. The
port defaults to 25. A malformed hop raises :class:`ValueError` saying why.
"""

from __future__ import annotations

__all__ = ["parse_hop"]


def parse_hop(hop: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` (port defaults to 25)."""
    port: str | None
    if hop.startswith("["):
        host, bracket, rest = hop[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"next hop {hop!r}: expected [address]:port")
        port = rest[1:] if rest else None
    elif hop.count(":") == 1:
        host, _, port = hop.partition(":")
    elif ":" in hop:
        raise ValueError(f"next hop {hop!r}: write an IPv6 address as [address]:port")
    else:
        host, port = hop, None
    if not host:
        raise ValueError(f"next hop {hop!r}: no host")
    if port == "":
        raise ValueError(f"next hop {hop!r}: empty port")
    try:
        number = 25 if port is None else int(port)
    except ValueError:
        raise ValueError(f"next hop {hop!r}: port is not a number") from None
    if not 0 < number < 65536:
        raise ValueError(f"next hop {hop!r}: port out of range")
    return host, number
