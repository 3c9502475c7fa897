"""Failed AUTH counted per client address, across connections.

A connection already closes after ``smtp.max_auth_failures`` failures, but a
client that opens connection after connection would get that many guesses
on each. :class:`AuthFailureLog` remembers, per client address, when its
AUTH attempts failed in the last ``window`` (``smtp.auth_failure_window``),
whatever connection they came on:

* the delay before a ``535`` grows with the address's failures in the
  window, not the connection's: ``auth_failure_delay`` doubled for each
  earlier one (at most 32 times the base);
* once an address has ``limit`` failures in the window
  (``smtp.max_auth_failures_per_client``), it is refused until the oldest
  of them leaves the window: its AUTH commands get ``454 4.7.0`` and its new
  connections that would need AUTH (clients outside ``relay_networks``) get
  ``421`` at the greeting. A client in ``relay_networks`` may still send
  mail without AUTH.

An IPv6 client is counted by its /64 network (one host usually holds a
whole /64); an IPv4 client by its address. The ingest processes that share
the listening sockets (``smtp.workers``) each keep their own log; each
allows an even share of ``limit`` (rounded up), so an address gets about
``limit`` failures in a window on the whole machine, whichever process its
connections reach. Memory is bounded: at most :data:`MAX_ADDRESSES`
addresses are kept, the one whose last failure is oldest forgotten first.
The log is only used from its process's event loop; it does no I/O.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Final

__all__ = ["AuthFailureLog", "MAX_ADDRESSES", "MAX_DOUBLINGS", "client_key"]

MAX_ADDRESSES: Final = 10_000
MAX_DOUBLINGS: Final = 5  # the delay grows to at most 32 x the base


def client_key(peer: str) -> str:
    """What failures are counted under: the IPv4 address, or the /64 of an
    IPv6 one (an IPv4-mapped IPv6 address counts as its IPv4 address)."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class AuthFailureLog:
    """Recent AUTH failures by client address (see the module docstring).

    ``limit``: failures of one address in ``window`` seconds after which it
    is refused; ``share``: how many processes count separately (each allows
    ``ceil(limit / share)``); ``clock``: seconds, monotonic (tests give a
    fake one).
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        share: int = 1,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        if limit < 1 or window <= 0 or share < 1:
            raise ValueError("limit and share must be >= 1 and window > 0")
        self.limit = math.ceil(limit / share)
        self.window = window
        self._clock = clock
        self._max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def configure(self, limit: int, window: float, share: int = 1) -> None:
        """New settings (a reload); the failures seen so far are kept."""
        if limit < 1 or window <= 0 or share < 1:
            raise ValueError("limit and share must be >= 1 and window > 0")
        self.limit = math.ceil(limit / share)
        self.window = window

    def _recent(self, key: str) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        horizon = self._clock() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def count(self, peer: str) -> int:
        """Failures of ``peer``'s address in the window."""
        times = self._recent(client_key(peer))
        return 0 if times is None else len(times)

    def refused(self, peer: str) -> bool:
        """Whether ``peer``'s address has used up its failures for now."""
        return self.count(peer) >= self.limit

    def failed(self, peer: str) -> int:
        """Note a failure of ``peer``; return its address's failures in the
        window, this one included."""
        key = client_key(peer)
        times = self._recent(key)
        if times is None:
            times = self._failures[key] = deque()
        else:
            self._failures.move_to_end(key)
        times.append(self._clock())
        while len(times) > 2 * self.limit:  # past the limit only the newest matter
            times.popleft()
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)
        return len(times)

    def delay(self, base: float, failures: int) -> float:
        """The wait before answering the ``failures``-th failure."""
        return float(base * 2 ** min(max(failures, 1) - 1, MAX_DOUBLINGS))

    def __len__(self) -> int:
        return len(self._failures)
