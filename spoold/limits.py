"""Per-destination limits: connections at once, a sending rate, and the
backoff of a next hop that throttles us.

The spool's scheduler asks a :class:`DestinationGate` before it starts an
attempt, with the destination and limits of the message's
:class:`~spoold.policy.DestinationPolicy`, and tells it when the attempt
ends. The gate never waits itself and
never reads a clock: every call is given the time (the spool's clock, as a
POSIX timestamp), so it is tested without sleeping.

A *destination* is what the limits count by: a route (the daemon's
``[routes.NAME]``; any key the policy source chooses). Its
:class:`DestinationLimits`:

* ``max_connections``: attempts of the destination under way at once (each
  attempt holds one SMTP connection at a time, so this bounds the sessions a
  next hop sees from us);
* ``rate``: a token bucket of depth one, refilled at the rate: attempts are
  spaced at least ``per / count`` apart, so there are never more than
  ``count`` of them in any span of ``per``.

The backoff is per next hop, whatever the destination: a throttling reply
(see :func:`spoold.outcome.hop_feedback`) opens a window in which no new
attempt goes to that hop: :data:`BACKOFF_FIRST` at first, doubled by each
further throttling reply up to :data:`BACKOFF_MAX`, and forgotten at the
first attempt the hop answers without throttling, or :data:`BACKOFF_MAX`
after its window ended (so hops that throttled once and were never tried
again, say the MX hosts of many hostile domains, are not kept for ever). A message whose next hops
are all backed off waits until the first window ends; one with a hop still
open goes ahead, with the backed-off hops put last for that attempt.

A message held by its destination's limits waits in that destination's
line (first come, first served) and is started as soon as a slot and a
token are free; it is not an attempt: nothing is written, no retry
interval is used, no relay attempt is recorded. The gate only holds the
line; the spool keeps the messages (it checks, when one comes out, that the
message is still due and untouched). A message an operator sends now
(``spoold send``, which also thaws) goes to the head of its line, wherever
it waited: the limits still hold it, the others do not.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final, Generic, Protocol, TypeVar

from spoold.message import Message
from spoold.times import parse_span

__all__ = [
    "Rate",
    "parse_rate",
    "DestinationLimits",
    "LimitsSource",
    "SharedRates",
    "SharedSlots",
    "SlotWait",
    "SharedToken",
    "DestinationGate",
    "Hold",
    "HopBackoff",
    "DEFAULT_MAX_CONNECTIONS",
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
]

# The one place these defaults are written (the daemon's config reads them).
DEFAULT_MAX_CONNECTIONS = 10
BACKOFF_FIRST: Final = timedelta(minutes=1)
BACKOFF_MAX: Final = timedelta(hours=1)

_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\S.*?)\s*$", re.ASCII)


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` attempts per ``per``; written ``"50/s"``, ``"1000/h"`` or
    ``"10/5m"``."""

    count: int
    per: timedelta
    text: str = field(default="", compare=False)

    @property
    def spacing(self) -> float:
        """Seconds between two attempts."""
        return self.per.total_seconds() / self.count

    def __str__(self) -> str:
        return self.text or f"{self.count}/{self.per.total_seconds():g}s"


def parse_rate(value: object) -> Rate | None:
    """``""``: no limit (None); ``"N/UNIT"`` (``s``, ``m``, ``h``, ``d``) or
    ``"N/SPAN"`` (``"10/5m"``). Raises :class:`ValueError` saying what was
    expected."""
    if not isinstance(value, str):
        raise ValueError(f"expected a rate like '50/s' or '1000/h', got {value!r}")
    if not value.strip():
        return None
    m = _RATE_RE.match(value)
    if m is None:
        raise ValueError(f"expected a rate like '50/s' or '1000/h', got {value!r}")
    count, unit = int(m.group(1)), m.group(2)
    try:
        per = parse_span(unit if unit[0] in "0123456789" else f"1{unit}")
    except ValueError:
        raise ValueError(f"expected a rate like '50/s' or '1000/h', got {value!r}") from None
    if count < 1 or per <= timedelta(0):
        raise ValueError(f"expected a rate of at least one per span, got {value!r}")
    return Rate(count, per, value.strip())


@dataclass(frozen=True, slots=True)
class DestinationLimits:
    """``shared_connections``: whether ``max_connections`` is counted
    with other processes when the spool has :class:`SharedSlots` (the
    daemon sets it only for routes whose ``max_connections`` its config
    sets); False: it is this spool's own limit only."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    rate: Rate | None = None
    shared_connections: bool = True


class LimitsSource(Protocol):
    """Where a library user's spool finds a message's limits (a part of
    :class:`~spoold.policy.LibraryPolicies`; the daemon's
    :class:`~spoold.daemon.routing.Router` is one too): the destination it
    counts under and its limits, or None for no limits. Asked before each
    attempt; must not block."""

    def limits_for(self, message: Message) -> tuple[str, DestinationLimits] | None: ...


@dataclass(frozen=True, slots=True)
class SharedToken:
    """An answer of :meth:`SharedRates.gcra`. ``booked``: the token is the
    caller's, for use ``wait`` seconds on (0.0: at once), without asking
    again (the spool gives it to the next of the line when that message is
    frozen, removed or sent by an operator first); one not used (the line
    emptied, the spool stopped) is lost, a token of the shared rate nobody
    sends. Not
    ``booked``: the shared schedule is full as far as it books ahead; ask
    again after ``wait``."""

    wait: float
    booked: bool = True


class SharedRates(Protocol):
    """A destination's rate kept with other processes (the fleet's Redis:
    :class:`spoold.fleet.SharedState`). :meth:`gcra` books the shared token
    of ``destination`` at ``rate`` (a :class:`SharedToken`), its wait
    counted from when the shared state read its clock (the spool counts it
    from when it asked, and holds the destination's line until then:
    :meth:`DestinationGate.defer`); None when the shared state did not
    answer (the local rate, which this gate applied already, is then the
    only one). Unlike the gate, it is asked by a send job after admission,
    and it reads its own clock."""

    async def gcra(self, destination: str, rate: Rate) -> SharedToken | None: ...


@dataclass(frozen=True, slots=True)
class SlotWait:
    """An answer of :meth:`SharedSlots.take`: the others hold the limit;
    ask again ``seconds`` on (or sooner, when this process gives one back)."""

    seconds: float


class SharedSlots(Protocol):
    """A destination's connections counted with other processes (the
    fleet's Redis: :class:`spoold.fleet_slots.FleetSlots`). Asked by a send
    job after the gate admitted it: :meth:`take` gives the name of the slot
    this attempt holds (given back with :meth:`give_back` when the attempt
    ends), or a :class:`SlotWait` when the others hold ``limit``. When
    the shared state does not answer it gives a slot (the local
    ``max_connections``, which the gate applied already, is then the only
    one)."""

    async def take(self, destination: str, limit: int) -> str | SlotWait: ...

    async def give_back(self, holder: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Hold:
    """Not now. ``until``: the time (timestamp) the message's next hops are
    open again (the spool re-arms its timer then); None: the message waits
    in ``destination``'s line, woken by the gate (``front``: at its head,
    an operator sent it now)."""

    destination: str | None
    until: float | None
    reason: str
    front: bool = False


@dataclass(slots=True)
class HopBackoff:
    """A next hop that throttled us: no attempt before ``until``; the next
    window lasts twice ``window`` (capped)."""

    until: float
    window: float
    reason: str


_T = TypeVar("_T")
_UNLIMITED = DestinationLimits(max_connections=2**31)


@dataclass(slots=True)
class _Destination(Generic[_T]):
    limits: DestinationLimits
    running: int = 0
    next_token: float = -math.inf
    waiting: deque[_T] = field(default_factory=deque)
    # The line's head waits for a shared token until then (see defer), and
    # whether the token is booked (the next out goes without asking again).
    not_before: float = -math.inf
    booked: bool = False
    early: bool = False  # and a wake() may end that wait before then (see defer)
    # The first ``sent_now`` of the line were sent now by an operator (they
    # keep their order among them); whether the last item out was one.
    sent_now: int = 0
    out_sent_now: bool = False
    asking: bool = False  # an item out of the line asks for a shared token
    finishing: int = 0  # attempts whose slot was freed early, still writing their outcome

    def open_at(self, now: float) -> float | None:
        """When the next attempt may start: ``now`` or later; None while
        every connection is taken (a finished attempt frees one) or one of
        the line asks for a shared token (the answer moves it on)."""
        if self.running >= self.limits.max_connections or self.asking:
            return None
        return max(now, self.next_token, self.not_before)


class DestinationGate(Generic[_T]):
    """The state of every destination and next hop: attempts under way,
    tokens, lines of waiting messages (``_T``: whatever the spool keeps for
    one) and hop backoffs. See the module docstring for the rules."""

    def __init__(self) -> None:
        self._destinations: dict[str, _Destination[_T]] = {}
        self._backoffs: dict[str, HopBackoff] = {}

    # -- next hops

    def backoff(self, hop: str, now: float) -> HopBackoff | None:
        b = self._backoffs.get(hop)
        return b if b is not None and b.until > now else None

    def backoffs(self, now: float) -> dict[str, HopBackoff]:
        """The hops backed off at ``now``."""
        return {h: b for h, b in self._backoffs.items() if b.until > now}

    def remembered(self) -> frozenset[str]:
        """The hops whose backoff is kept: those backed off, and those whose
        window ended less than :data:`BACKOFF_MAX` before the last throttle
        (one that throttles again then has its window doubled)."""
        return frozenset(self._backoffs)

    def throttled(self, hop: str, now: float, reason: str) -> HopBackoff:
        """``hop`` throttled us at ``now``: open (or double) its window."""
        self._forget_ended(now)
        old = self._backoffs.get(hop)
        first = BACKOFF_FIRST.total_seconds()
        window = first if old is None else min(old.window * 2, BACKOFF_MAX.total_seconds())
        b = HopBackoff(now + window, window, reason)
        self._backoffs[hop] = b
        return b

    def _forget_ended(self, now: float) -> None:
        """Drop the backoffs whose window ended :data:`BACKOFF_MAX` ago."""
        cutoff = now - BACKOFF_MAX.total_seconds()
        for hop in [h for h, b in self._backoffs.items() if b.until <= cutoff]:
            del self._backoffs[hop]

    def answered(self, hop: str) -> bool:
        """``hop`` answered an attempt without throttling: forget its
        backoff. Returns whether it had one."""
        return self._backoffs.pop(hop, None) is not None

    def order_hops(self, hops: Sequence[str], now: float) -> list[str]:
        """``hops`` with those backed off at ``now`` put last (in order)."""
        open_ = [h for h in hops if self.backoff(h, now) is None]
        return open_ + [h for h in hops if h not in open_]

    def hops_hold(self, hops: Sequence[str], now: float) -> Hold | None:
        """A :class:`Hold` until the first window ends when every one of
        ``hops`` is backed off at ``now``; else None."""
        if not hops:
            return None
        backed = [self.backoff(h, now) for h in hops]
        if any(b is None for b in backed):
            return None
        until = min(b.until for b in backed if b is not None)
        return Hold(None, until, "every next hop is backed off")

    # -- destinations

    def admit(
        self,
        destination: tuple[str, DestinationLimits] | None,
        hops: Sequence[str],
        now: float,
        *,
        front: bool = False,
    ) -> Hold | None:
        """May an attempt start at ``now``? None: yes, and a connection
        and a token of the destination are taken (give the connection back
        with :meth:`done`). Else why not: a :class:`Hold`. ``front``: the
        message goes ahead of those waiting in its destination's line (an
        operator sent it now; the limits still hold it)."""
        hold = self.hops_hold(hops, now)
        if hold is not None:
            return hold
        if destination is None:
            return None
        name, limits = destination
        d = self._destination(name, limits)
        if d.waiting and not front:
            return Hold(name, None, "behind others in the destination's line")
        if d.asking:
            return Hold(name, None, "behind the one asking for the shared token", front)
        start = d.open_at(now)
        if start is None:
            return Hold(name, None, f"{limits.max_connections} connections at once", front)
        if start > now:
            return Hold(name, None, f"rate {limits.rate}", front)
        d.out_sent_now = front
        d.booked = False  # a booking left by a line that emptied: this one asks afresh
        self._take(d, now)
        return None

    def wait(self, destination: str, item: _T, *, front: bool = False) -> None:
        """Put ``item`` at the end of ``destination``'s line (after a
        :class:`Hold` naming it), or at its head (``front``)."""
        d = self._destinations[destination]
        if front:  # behind those sent now before it: `spoold send --all` keeps the order
            d.waiting.insert(min(d.sent_now, len(d.waiting)), item)
            d.sent_now += 1
        else:
            d.waiting.append(item)

    def done(self, destination: str) -> None:
        """An admitted attempt of ``destination`` ended."""
        d = self._destinations.get(destination)
        if d is not None and d.running > 0:
            d.running -= 1

    def relayed(self, destination: str) -> bool:
        """An admitted attempt of ``destination`` is done with its
        connection: its slot is freed now, unless as many of the
        destination's attempts as ``max_connections`` are still finishing
        (then it keeps it to its end: a route never holds more than twice
        its ``max_connections`` send jobs). Returns whether it was freed
        (then :meth:`finished` it at its end, not :meth:`done`)."""
        d = self._destinations.get(destination)
        if d is None or d.finishing >= d.limits.max_connections:
            return False
        self.done(destination)
        d.finishing += 1
        return True

    def finished(self, destination: str) -> None:
        """An attempt :meth:`relayed` freed early ended."""
        d = self._destinations.get(destination)
        if d is not None and d.finishing > 0:
            d.finishing -= 1

    def ready(self, now: float) -> Iterator[tuple[str, _T]]:
        """Items that may start now, oldest first per destination; each one
        yielded has been admitted (a connection and a token taken). The
        caller must :meth:`done` it, or :meth:`give_back` one it will not
        start after all (stale, or its hops backed off meanwhile: the
        caller checks :meth:`hops_hold`)."""
        for name, d in self._destinations.items():
            while d.waiting:
                start = d.open_at(now)
                if start is None or start > now:
                    break
                item = d.waiting.popleft()
                d.out_sent_now, d.sent_now = d.sent_now > 0, max(0, d.sent_now - 1)
                self._take(d, now)
                yield name, item

    def give_back(self, destination: str) -> None:
        """Return what :meth:`ready` took for an item the caller found
        stale: the connection and the token (and a shared token booked for
        the line, when nobody is left in it to use it now)."""
        d = self._destinations.get(destination)
        if d is not None:
            d.running = max(0, d.running - 1)
            if d.limits.rate is not None:
                d.next_token -= d.limits.rate.spacing
            if not d.waiting:
                d.booked = False

    def defer(
        self,
        destination: str,
        item: _T,
        until: float,
        *,
        booked: bool = False,
        early: bool = False,
    ) -> None:
        """An admitted attempt of ``destination`` did not start after all:
        what it shares with other processes is due only at ``until`` (a
        fleet's rate token; ``booked``: and it is booked for the line, see
        :meth:`take_booking`), or may be free then (a fleet's connection
        slot; ``early``: :meth:`wake` ends the wait sooner, when this
        process frees one). Its connection and token are given back,
        ``item`` goes back to the head of the line (it was first), and the
        line moves on no earlier than ``until`` (so the others wait behind
        it instead of each asking in turn)."""
        d = self._destinations[destination]
        d.running = max(0, d.running - 1)
        if d.limits.rate is not None:
            d.next_token -= d.limits.rate.spacing
        d.not_before = until
        d.booked = booked
        d.early = early
        d.waiting.appendleft(item)
        if d.out_sent_now:
            d.sent_now += 1

    def wake(self, destination: str) -> bool:
        """This process freed what the line of ``destination`` may wait
        for (a shared connection slot): a wait that :meth:`defer` allowed
        to end early ends now. Returns whether it did (a wait for a shared
        token goes on)."""
        d = self._destinations.get(destination)
        if d is None or not d.early:
            return False
        d.early = False
        d.not_before = -math.inf
        return True

    def asking(self, destination: str, asking: bool) -> None:
        """An admitted attempt of ``destination`` asks for a shared token
        (True), or was answered, whatever the answer (False). Meanwhile no
        other item of its line starts: one asks at a time, however slow the
        answer, and the line keeps its order."""
        d = self._destinations.get(destination)
        if d is not None:
            d.asking = asking

    def take_booking(self, destination: str) -> bool:
        """Whether the item just out of :meth:`ready` (not stale) has the
        line's shared token booked (:meth:`defer`); the booking is used
        up. It is the line's, not the deferred item's: when that one was
        frozen, removed or sent by an operator meanwhile, the next one out
        uses it."""
        d = self._destinations.get(destination)
        if d is None or not d.booked:
            return False
        d.booked = False
        return True

    def next_wake(self, now: float) -> float | None:
        """The earliest time a waiting line can move on by the clock alone
        (a token comes); None when none can (empty, or waiting for a
        connection to be freed)."""
        times = [
            t
            for d in self._destinations.values()
            if d.waiting and (t := d.open_at(now)) is not None
        ]
        return min(times, default=None)

    def heads(self) -> Iterator[tuple[str, _T]]:
        """The first item of each destination's line (to look up its
        limits again after a reload: :meth:`set_limits`)."""
        for name, d in list(self._destinations.items()):
            if d.waiting:
                yield name, d.waiting[0]

    def set_limits(self, destination: str, limits: DestinationLimits | None) -> None:
        """New limits for ``destination`` (None: it has none any more, so
        its line may all go)."""
        d = self._destinations.get(destination)
        if d is not None:
            self._update(d, limits or _UNLIMITED)

    def waiting(self, destination: str) -> int:
        d = self._destinations.get(destination)
        return len(d.waiting) if d is not None else 0

    def running(self, destination: str) -> int:
        d = self._destinations.get(destination)
        return d.running if d is not None else 0

    def _destination(self, name: str, limits: DestinationLimits) -> _Destination[_T]:
        d = self._destinations.get(name)
        if d is None:
            d = self._destinations[name] = _Destination(limits)
        else:
            self._update(d, limits)
        return d

    @staticmethod
    def _update(d: _Destination[_T], limits: DestinationLimits) -> None:
        if d.limits != limits:  # a reload changed them: the new ones apply now
            if d.limits.rate != limits.rate:  # a shared token booked at the old rate is
                d.not_before = -math.inf  # given up: the head asks at the new one
                d.booked = d.early = False
            d.limits = limits
            if limits.rate is None:
                d.next_token = -math.inf

    @staticmethod
    def _take(d: _Destination[_T], now: float) -> None:
        d.running += 1
        if d.limits.rate is not None:
            d.next_token = max(now, d.next_token) + d.limits.rate.spacing
