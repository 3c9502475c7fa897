"""Next hop syntax: ``host:port``, ``[IPv6 address]:port`` or ``host``.

One parser for every place a hop is written: the config (``next_hops``),
the record (``next_hop_choices``) and the relay that connects to it. The
port defaults to 25. A malformed hop raises :class:`ValueError` saying why.
Also the like syntax of a DNS server (:func:`nameserver_address`: an IP
address, port 53 by default) and :data:`ResolveHost`, the shape of a
function giving a host name's addresses (the connection cache and the
MTA-STS fetch take one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable

from spoold.numerals import ascii_decimal

__all__ = ["parse_hop", "nameserver_address", "ResolveHost"]

ResolveHost = Callable[[str], Awaitable[list[str]]]
"""The addresses of a host name, best first; raises when there are none."""


def nameserver_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:5353"``, ``"[::1]:53"``, ``"::1"`` or ``"192.0.2.1"`` as
    (address, port), the port 53 when none is given; :class:`ValueError`
    for anything but an IP address with an optional port."""
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address with an optional ':port'") from None
    number = ascii_decimal(port)
    if number is None or not 0 < number < 65536:
        raise ValueError(f"{text!r}: port out of range")
    return host, number


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
    number = 25 if port is None else ascii_decimal(port)
    if number is None:  # int() would take " 25", "2_5" and other scripts' digits
        raise ValueError(f"next hop {hop!r}: port is not a number")
    if not 0 < number < 65536:
        raise ValueError(f"next hop {hop!r}: port out of range")
    return host, number
