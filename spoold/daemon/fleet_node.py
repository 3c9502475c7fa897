"""This daemon as a node of a fleet (the config's ``[fleet]``).

:class:`FleetNode` holds what the node shares through Redis
(:mod:`spoold.fleet`): the shared state itself, its connection slots
(:mod:`spoold.fleet_slots`), and, once the spool is open, the fleet-wide
idempotency keys (:mod:`spoold.fleet_keys`) and the suppression list's
mirror (:mod:`spoold.fleet_suppression`). It publishes the node's
heartbeat and answers ``fleet_status``. The daemon makes one when
``[fleet]`` is set and runs its tasks; without it the node acts alone
(:func:`alone_status`).
"""

from __future__ import annotations

from typing import Any

import anyio

from spoold.fleet import FleetSettings, SharedState, redacted_url
from spoold.fleet_keys import FleetKeys
from spoold.fleet_slots import FleetSlots
from spoold.fleet_suppression import SuppressionMirror
from spoold.spool import Spool

__all__ = ["FleetNode", "alone_status"]


def alone_status() -> dict[str, Any]:
    """The ``fleet_status`` result of a daemon without ``[fleet]``."""
    return {
        "enabled": False,
        "node": "",
        "redis": "",
        "redis_up": False,
        "outages": 0,
        "last_error": "",
        "slots": {},
        "nodes": [],
    }


class FleetNode:
    """The shared state of one node (it connects to Redis on first use)."""

    def __init__(self, settings: FleetSettings) -> None:
        self.state = SharedState(settings)
        # A route's max_connections counted over the fleet (leases).
        self.slots = FleetSlots(self.state)

    @property
    def settings(self) -> FleetSettings:
        return self.state.settings

    def join(self, spool: Spool) -> SuppressionMirror:
        """Make ``spool``'s rates, connection slots and idempotency keys
        the fleet's; returns the mirror of its suppression list, for the
        daemon to run (:meth:`SuppressionMirror.run`)."""
        spool.shared_rates = self.state
        spool.shared_slots = self.slots
        spool.shared_keys = FleetKeys(self.state)
        return SuppressionMirror(
            self.state,
            spool.suppressions,
            now=spool.clock.now,
            max_entries=lambda: spool.settings.max_suppressed,
        )

    async def heartbeats(self, spool: Spool) -> None:
        """Publish this node's heartbeat and queue counts, three times per
        heartbeat lifetime (a Redis that is down costs a beat, nothing else);
        the first at once, so Redis's health is known from the start.
        Cancelled at a stop (at once, in its sleep or in a call bounded by
        the timeout), it takes the node out of the fleet's listing."""
        period = self.settings.heartbeat_ttl / 3
        try:
            while True:
                queues = {str(q): n for q, n in spool.counts().items()}
                queues["sending"] = spool.sending
                await self.state.beat(queues)
                await anyio.sleep(period)
        finally:
            with anyio.CancelScope(shield=True):
                await self.state.leave()  # bounded by fleet.timeout

    async def status(self) -> dict[str, Any]:
        """The ``fleet_status`` result: asks Redis, so the health is fresh."""
        beats = await self.state.nodes()
        health = self.state.health
        return {
            "enabled": True,
            "node": self.settings.node,
            "redis": redacted_url(self.settings.url),
            "redis_up": health.up is True,
            "outages": health.outages,
            "last_error": health.last_error,
            "slots": self.slots.held,
            "nodes": None
            if beats is None
            else [{"node": b.node, "heartbeat": b.at, "queues": dict(b.queues)} for b in beats],
        }

    async def aclose(self) -> None:
        await self.state.aclose()
