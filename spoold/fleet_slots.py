"""A node's fleet-wide connection slots: a route's ``max_connections``
counted over every node of a fleet, as leases in the fleet's Redis.

:class:`FleetSlots` is what the scheduler asks before an attempt of a
destination with limits (:class:`spoold.limits.SharedSlots`): a slot is
one attempt, and the attempt's connection lives no longer than it (the
scheduler has the relay close it after the attempt rather than keep it
idle), so the slots held fleet-wide are the connections the next hop sees.
Its contract:

* **Taken before, given back after.** :meth:`FleetSlots.take` gives a
  holder name (``NODE:RUN:N``, unique to this attempt of this run of the
  node) when the fleet had room, or the seconds to wait before asking again
  when it had not; the attempt does not start then, and the message waits
  in memory (no send job waits holding a slot of its own). After the
  attempt, :meth:`FleetSlots.give_back` removes the holder (the
  scheduler calls it after the message is no longer busy). Neither waits
  for the other: an attempt of this node that asks while its own slot is
  still on the way back may be refused it, and is then free to ask again
  as soon as the give-back is done (the scheduler wakes the destination's
  line then).
* **Leases expire.** A slot is held for :attr:`FleetSettings.lease`
  seconds; :meth:`FleetSlots.run` renews every slot this node holds every
  third of it, in one Redis call. A node that dies (``kill -9``, a cut
  cable) stops renewing: its slots end within one lease, and the next
  node that asks for a slot of that destination sweeps them out.
* **Redis failing is not mail failing.** When Redis does not answer,
  :meth:`~FleetSlots.take` still gives a holder (the node goes on with its
  own ``max_connections``, which the scheduler's gate holds anyway), noted
  as not leased; each renewal tries to take such slots, and slots whose
  lease ran out while Redis was away, again, so when Redis is back the
  node counts in the fleet again. A slot that cannot be taken again (the
  fleet is full meanwhile) stays this node's until its attempt ends: an
  attempt under way is never cut. A slot given back while Redis does not
  answer is kept aside and given back at each renewal until Redis
  answers, so it blocks the other nodes for a third of a lease at most,
  not a whole lease.
* **A full fleet is asked sparingly.** After a refusal, a destination is
  not asked again for a short while (:attr:`FleetSlots.retry`, spread by a
  random factor so that nodes do not ask in step), except when this node
  gives back a slot of it; an attempt refused meanwhile is told the rest
  of that while. (The scheduler holds the destination's whole line for
  it, so a backlog asks a few times per retry, not once per message.)
"""

from __future__ import annotations

import itertools
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from spoold.fleet import SharedState
from spoold.limits import SlotWait
from spoold.log import get_logger

__all__ = ["FleetSlots", "DEFAULT_RETRY"]

log = get_logger("spoold.fleet")

# Seconds a refused destination waits before this node asks for it again.
DEFAULT_RETRY = 0.1


@dataclass(slots=True)
class _Held:
    destination: str
    limit: int
    leased: bool  # False: taken while Redis did not answer (or lost since)


class FleetSlots:
    """This node's slots of the fleet's destinations (see the module
    docstring). ``clock``: monotonic seconds (tests move it)."""

    def __init__(
        self,
        shared: SharedState,
        *,
        retry: float = DEFAULT_RETRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shared = shared
        self.retry = retry
        self._clock = clock
        self._held: dict[str, _Held] = {}
        # Slots given back that Redis did not answer for: holder ->
        # (destination, when). Kept a lease at most: by then it has ended.
        self._unreleased: dict[str, tuple[str, float]] = {}
        self._full_until: dict[str, float] = {}
        # Holders are unique per run: a node restarted at once never
        # mistakes its dead run's slots (which expire) for its own.
        self._prefix = f"{shared.settings.node}:{secrets.token_hex(4)}:"
        self._numbers = itertools.count(1)
        self.refusals = 0  # attempts held back because the fleet was full

    @property
    def held(self) -> dict[str, int]:
        """Slots held now per destination (leased in Redis or not)."""
        return dict(Counter(h.destination for h in self._held.values()))

    @property
    def leased(self) -> int:
        """Slots this node holds that Redis counts."""
        return sum(1 for h in self._held.values() if h.leased)

    def holders(self) -> list[str]:
        """The holder names of this node's slots."""
        return list(self._held)

    async def take(self, destination: str, limit: int) -> str | SlotWait:
        """A slot of ``destination`` (at most ``limit`` fleet-wide): its
        holder name, to give back after the attempt; or how long to wait
        before asking again (the fleet holds ``limit``)."""
        now = self._clock()
        until = self._full_until.get(destination)
        if until is not None:
            if now < until:
                self.refusals += 1  # not asked: the fleet was full a moment ago
                return SlotWait(until - now)
            del self._full_until[destination]
        holder = f"{self._prefix}{next(self._numbers)}"
        got = await self.shared.acquire(destination, limit, holder)
        if got is False:
            wait = self.retry * random.uniform(0.5, 1.5)  # spread: nodes do not ask in step
            self._full_until[destination] = self._clock() + wait
            self.refusals += 1
            return SlotWait(wait)
        self._held[holder] = _Held(destination, limit, leased=got is True)
        return holder

    async def give_back(self, holder: str) -> None:
        """The attempt of ``holder`` ended: its slot is free (at once for
        this node's next attempt of the destination)."""
        held = self._held.pop(holder, None)
        if held is None:
            return
        destination = held.destination
        self._full_until.pop(destination, None)
        try:
            # Asked even when not leased: a renewal may have taken it
            # meanwhile. Shielded: a send job cancelled at shutdown still
            # frees its slot (the call is bounded by the fleet's timeout).
            with anyio.CancelScope(shield=True):
                await self._release(destination, holder)
        finally:
            # A refusal while it was on its way may have been this slot.
            self._full_until.pop(destination, None)

    async def _release(self, destination: str, holder: str) -> None:
        """Give ``holder`` back in Redis; kept for the next renewal when
        Redis does not answer."""
        if await self.shared.release(destination, holder) is None:
            self._unreleased.setdefault(holder, (destination, self._clock()))
        else:
            self._unreleased.pop(holder, None)

    async def renew(self, *, now_ms: int | None = None) -> None:
        """Give back in Redis the slots that it did not answer for, renew
        every slot held (one Redis call), and take again those whose lease
        was lost or never taken."""
        ended = self._clock() - self.shared.settings.lease
        for holder, (destination, since) in list(self._unreleased.items()):
            if since <= ended:  # its lease has ended by now (Redis drops it)
                self._unreleased.pop(holder, None)
                continue
            await self._release(destination, holder)
            if holder in self._unreleased:
                break  # still no answer: the rest waits for the next renewal
        items = list(self._held.items())
        if not items:
            return
        got = await self.shared.renew_all(
            [(h.destination, holder, h.limit) for holder, h in items], now_ms=now_ms
        )
        if got is None:
            return  # Redis did not answer: the leases run on; local limits hold
        stale = []
        for (holder, h), held in zip(items, got, strict=True):
            if self._held.get(holder) is not h:
                if held:
                    stale.append((h.destination, holder))  # given back meanwhile
                continue
            if h.leased and not held:
                log.warning(
                    "fleet slot lost; the attempt under way goes on",
                    destination=h.destination,
                    holder=holder,
                )
            h.leased = held
        for destination, holder in stale:
            await self._release(destination, holder)

    async def run(self) -> None:
        """Renew the slots held every third of the lease, until cancelled."""
        period = self.shared.settings.lease / 3
        while True:
            await anyio.sleep(period)
            await self.renew()
