"""Prometheus metrics on ``[metrics] listen`` (off when empty).

The registry is the daemon's own (never the process-global one), so tests
and embedders can run several. Values are set from the event loop: queue
gauges at start and on every ping (30 s), event counters per kind. prometheus-client
serves them from its own HTTP thread, which only reads them.
"""

from __future__ import annotations

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from spoold.events import EventKind
from spoold.spool import Spool

__all__ = ["Metrics"]


class Metrics:
    """The daemon's Prometheus metrics, in a registry of its own (never the
    process-wide one), served over HTTP by :meth:`serve` until cancelled.
    Values are only set from the event loop; the HTTP thread only reads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Gauge(
            "spoold_messages", "Messages in the spool by state", ["state"], registry=self.registry
        )
        self.events = Counter(
            "spoold_events", "Spool events by kind", ["event"], registry=self.registry
        )
        self.running_sends = Gauge(
            "spoold_running_sends", "Relay attempts under way", registry=self.registry
        )

    def update(self, spool: Spool) -> None:
        for queue, n in spool.counts().items():
            self.messages.labels(queue.value).set(n)
        self.messages.labels("sending").set(spool.sending)
        self.running_sends.set(spool.running_sends)

    async def serve(
        self,
        spool: Spool,
        listen: str,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; reports started once listening."""
        host, _, port = listen.rpartition(":")
        server, thread = await anyio.to_thread.run_sync(
            lambda: start_http_server(int(port), host.strip("[]"), registry=self.registry)
        )
        try:
            self.update(spool)
            task_status.started()
            async with spool.events() as stream:
                async for event in stream:
                    if event.kind is EventKind.PING:
                        self.update(spool)  # walks the queue: not on every event
                    else:
                        self.events.labels(event.kind).inc()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(server.shutdown)
                server.server_close()
                await anyio.to_thread.run_sync(thread.join, 5)
