"""This host's name in mail: what spoold calls itself.

One name is used wherever spoold names itself: the SMTP banner and EHLO
reply of the listener, the ``by`` part of the ``Received:`` header it adds,
the EHLO/HELO it sends to next hops, the right-hand side of the
``Message-ID:`` headers it makes and the ``Reporting-MTA`` of its delivery
status notifications. The daemon takes it from the top-level ``hostname``
key; the library and the daemon's default is :func:`local_hostname`.

:func:`local_hostname` asks the system (``socket.getfqdn()``, which may
query DNS: it blocks, so async code calls it in a worker thread) once per
process and caches the answer. It prefers a fully qualified name, takes the
short host name when that is all there is, and says ``localhost`` only when
the machine has no other name. :func:`check_hostname` validates a name an
operator wrote: a domain name or an address literal (``[192.0.2.1]``,
``[IPv6:2001:db8::1]``, as RFC 5321 allows in EHLO); it raises
:class:`ValueError` saying what is expected.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Iterable

__all__ = ["local_hostname", "pick_hostname", "check_hostname", "is_qualified"]

_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_FALLBACK = "localhost"


def _is_domain(name: str) -> bool:
    """Whether ``name`` is a host name (letters, digits, hyphens; dotted labels)."""
    if not name or len(name) > 253 or not name.isascii():
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def _is_localhost(name: str) -> bool:
    first = name.lower().split(".", 1)[0]
    return first in ("localhost", "localhost4", "localhost6", "ip6-localhost", "ip6-loopback")


def is_qualified(name: str) -> bool:
    """Whether ``name`` is a fully qualified domain name (dotted, not a
    ``localhost`` name) or an address literal: what next hops expect in EHLO."""
    if name.startswith("["):
        return True
    return "." in name and _is_domain(name) and not _is_localhost(name)


def pick_hostname(candidates: Iterable[str]) -> str:
    """The best of the names the system gives, in order of preference: the
    first fully qualified one, else the first usable short one, else
    ``localhost``. Trailing dots go; case is kept."""
    usable = []
    for raw in candidates:
        name = raw.rstrip(".")
        if _is_domain(name) and not _is_localhost(name):
            usable.append(name)
    for name in usable:
        if "." in name:
            return name
    return usable[0] if usable else _FALLBACK


@functools.cache
def local_hostname() -> str:
    """This machine's name for mail: its fully qualified name when the
    system knows one (``socket.getfqdn()``), else its host name
    (``socket.gethostname()``). Blocking (it may ask DNS) the first time;
    cached for the life of the process."""
    try:
        host = socket.gethostname()
    except OSError:
        host = ""
    try:
        fqdn = socket.getfqdn(host) if host else socket.getfqdn()
    except (OSError, UnicodeError):
        fqdn = ""
    return pick_hostname([fqdn, host])


def check_hostname(name: str) -> str:
    """``name`` if it is a domain name or an address literal (``[192.0.2.1]``,
    ``[IPv6:2001:db8::1]``), without a trailing dot; else ValueError."""
    if name.startswith("[") and name.endswith("]"):
        inner = name[1:-1]
        v6 = inner[5:] if inner[:5].lower() == "ipv6:" else None
        try:
            address = ipaddress.ip_address(v6 if v6 is not None else inner)
        except ValueError:
            pass
        else:
            if (address.version == 6) == (v6 is not None):
                return name
    else:
        stripped = name.rstrip(".")
        if _is_domain(stripped):
            return stripped
    raise ValueError(
        "expected a host name like 'mail.example.com' or an address literal like "
        f"'[192.0.2.1]' or '[IPv6:2001:db8::1]', got {name!r}"
    )
