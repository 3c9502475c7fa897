"""Prometheus metrics on ``[metrics] listen`` (off when empty).

The registry is the daemon's own (never the process-global one), so tests
and embedders can run several. Every metric is listed, with its meaning,
in ``docs/metrics.md``; names follow Prometheus' conventions (``spoold_``
prefix, ``_total`` counters, base units: seconds, bytes).

Where the values come from:

* relay attempts, through :meth:`Metrics.measured`, a wrapper around the
  daemon's relay: per next hop, the attempt's duration, its result, and
  for a message delivered whole, how long it spent in the spool;
* the spool's events (a subscription): counters per event kind, messages
  spooled (every way in: SMTP, ``sendmail``, the control socket);
* a refresh every ``refresh_interval`` seconds [2]: messages per queue,
  sends under way, the oldest message of each queue (one pass over the
  in-memory index, no file read), the relay's connection cache;
* the daemon itself: the result and time of the last reload
  (:meth:`Metrics.reloaded`);
* the webhooks (:mod:`spoold.daemon.webhooks` calls the ``webhook_*``
  methods): events posted, failed posts, events dropped, the outbox's
  size and whether the endpoint answers, per webhook.

Values are only set on the event loop. prometheus-client serves them from
its own HTTP thread, which only reads them; what is computed at scrape time
in that thread reads no state of the loop: an age is ``now`` minus a
timestamp set by the loop, the spool disk's free bytes are one
``statvfs``.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from spoold.connection_cache import ConnectionCache
from spoold.events import EventKind
from spoold.fleet import Health
from spoold.fleet_slots import FleetSlots
from spoold.message import Message, Queue
from spoold.policy import NO_POLICY, DestinationPolicy, relay_under
from spoold.relay import AttemptFailed, BodyHandle, Delivery, Relay, RelayOutcome
from spoold.spool import Spool
from spoold.times import utcnow

__all__ = ["Metrics", "REFRESH_INTERVAL", "attempt_result"]

REFRESH_INTERVAL = 2.0  # seconds between two refreshes of the gauges

# An attempt lasts from milliseconds to the command timeout (minutes).
_ATTEMPT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Time in the spool: from an instant delivery to the end of the retry schedule (days).
_LATENCY_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)
_AGE_QUEUES = (Queue.ACTIVE, Queue.FROZEN)


def attempt_result(outcome: RelayOutcome, recipients: Sequence[str]) -> str:
    """How an attempt ended, for ``spoold_relay_attempts_total``:
    ``delivered`` (every recipient accepted), ``partial`` (some),
    ``deferred`` (none, some refused for now), ``refused`` (every one refused
    for good) or ``failed`` (no hop answered)."""
    if isinstance(outcome, AttemptFailed):
        return "failed"
    results = [outcome.recipients.get(r) for r in recipients]
    accepted = sum(1 for r in results if r is not None and r.accepted)
    if accepted == len(results):
        return "delivered"
    if accepted:
        return "partial"
    if all(r is not None and r.permanent for r in results):
        return "refused"
    return "deferred"


class _MeasuredRelay:
    """The daemon's relay, timed and counted per next hop."""

    def __init__(self, inner: Relay, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    async def relay(
        self, message: Message, body: BodyHandle, recipients: Sequence[str]
    ) -> RelayOutcome:
        return await self.relay_with_policy(NO_POLICY, message, body, recipients)

    async def relay_with_policy(
        self,
        policy: DestinationPolicy,
        message: Message,
        body: BodyHandle,
        recipients: Sequence[str],
    ) -> RelayOutcome:
        started = time.monotonic()
        outcome = await relay_under(self.inner, policy, message, body, recipients)
        elapsed = time.monotonic() - started
        if isinstance(outcome, Delivery) and outcome.hop:
            hop = outcome.hop
        else:
            hop = message.next_hop_choices[0] if message.next_hop_choices else "none"
        result = attempt_result(outcome, recipients)
        m = self.metrics
        m.attempts.labels(hop, result).inc()
        m.attempt_duration.labels(hop).observe(elapsed)
        if result == "delivered":
            m.delivery_latency.labels(hop).observe(
                max(0.0, (utcnow() - message.spool_date).total_seconds())
            )
        return outcome


class Metrics:
    """The daemon's Prometheus metrics, in a registry of its own (never the
    process-wide one), served over HTTP by :meth:`serve` until cancelled.
    Values are only set from the event loop; the HTTP thread only reads."""

    def __init__(self, *, refresh_interval: float = REFRESH_INTERVAL) -> None:
        self.refresh_interval = refresh_interval
        self.registry = r = CollectorRegistry()
        self.messages = Gauge(
            "spoold_messages", "Messages in the spool by state", ["state"], registry=r
        )
        self.events = Counter("spoold_events", "Spool events by kind", ["event"], registry=r)
        self.running_sends = Gauge("spoold_running_sends", "Relay attempts under way", registry=r)
        self.spooled = Counter(
            "spoold_spooled_messages",
            "Messages written to the spool (every way in): the ingest rate",
            registry=r,
        )
        self.attempts = Counter(
            "spoold_relay_attempts",
            "Relay attempts by next hop and result (delivered, partial, deferred, refused, failed)",
            ["next_hop", "result"],
            registry=r,
        )
        self.attempt_duration = Histogram(
            "spoold_relay_attempt_duration_seconds",
            "How long one relay attempt took, by next hop",
            ["next_hop"],
            buckets=_ATTEMPT_BUCKETS,
            registry=r,
        )
        self.delivery_latency = Histogram(
            "spoold_delivery_latency_seconds",
            "Time from spooling to delivery of every recipient, by the next hop that took it",
            ["next_hop"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._oldest: dict[Queue, float | None] = dict.fromkeys(_AGE_QUEUES)
        oldest = Gauge(
            "spoold_oldest_message_age_seconds",
            "Age of the oldest message in the queue (0 when empty)",
            ["queue"],
            registry=r,
        )
        for queue in _AGE_QUEUES:
            oldest.labels(queue.value).set_function(functools.partial(self._age, queue))
        self._spool_dir: Path | None = None
        Gauge(
            "spoold_spool_free_bytes",
            "Free bytes on the spool's file system (for unprivileged users)",
            registry=r,
        ).set_function(self._free_bytes)
        self.connections = Gauge(
            "spoold_relay_connections",
            "Connections to next hops in the relay's cache, by state (busy, idle)",
            ["state"],
            registry=r,
        )
        self.skipped = Gauge(
            "spoold_spool_skipped",
            "What the spool cannot use and skips, by kind: unreadable_record (cannot be read "
            "nor set aside), unusable_dir (a directory of the spool), unmarked_in_doubt (held "
            "until its in-doubt mark fits on the disk)",
            ["kind"],
            registry=r,
        )
        self.suppressed = Gauge(
            "spoold_suppressed_addresses",
            "Entries on the suppression list (those that ended go at the next housekeeping)",
            registry=r,
        )
        self.suppression_uses = Counter(
            "spoold_suppressed_recipients",
            "Recipients the suppression list acted on: refused (at RCPT, by submit), failed "
            "(taken and failed unsent), bounced (put on the list by a hard bounce)",
            ["result"],
            registry=r,
        )
        self._suppression_seen: dict[str, int] = {}
        self.fleet_redis_up = Gauge(
            "spoold_fleet_redis_up",
            "1 while the fleet's Redis answers ([fleet]), 0 while the node is on its local limits",
            registry=r,
        )
        self.fleet_redis_outages = Counter(
            "spoold_fleet_redis_outages",
            "Times the fleet's Redis went down (failed or timed out) since the daemon started",
            registry=r,
        )
        self._fleet_outages_seen = 0
        self.fleet_slots_held = Gauge(
            "spoold_fleet_slots_held",
            "Fleet-wide connection slots this node holds now ([fleet]: attempts under way of a "
            "route with max_connections)",
            ["route"],
            registry=r,
        )
        self.fleet_slot_refusals = Counter(
            "spoold_fleet_slot_refusals",
            "Attempts held back a moment because the fleet held a route's max_connections",
            registry=r,
        )
        self._slot_refusals_seen = 0
        self._slot_routes: set[str] = set()
        self.reload_success = Gauge(
            "spoold_last_reload_success",
            "1 if the last reload was applied, 0 if it was refused",
            registry=r,
        )
        self.reload_time = Gauge(
            "spoold_last_reload_timestamp_seconds",
            "When the last reload was asked for (Unix time; 0: none since start)",
            registry=r,
        )
        self.reload_success.set(1)  # the config the daemon started with was valid
        self.tls_policy_findings = Counter(
            "spoold_tls_policy_findings",
            "MX hosts an MX route's TLS policy spoke about, by finding: mta-sts-enforce "
            "(refused: not in the domain's policy), mta-sts-testing (not in a testing "
            "policy; delivered anyway), dane (an MX or TLSA lookup DANE needs failed)",
            ["finding"],
            registry=r,
        )

        self.webhook_posts = Counter(
            "spoold_webhook_posts",
            "Events posted to a webhook and answered with 2xx, by webhook",
            ["webhook"],
            registry=r,
        )
        self.webhook_failures = Counter(
            "spoold_webhook_failures",
            "Failed posts to a webhook (not 2xx, timeout, connection error), by webhook",
            ["webhook"],
            registry=r,
        )
        self.webhook_dropped = Counter(
            "spoold_webhook_dropped_events",
            "Events dropped before they reached the outbox or from a full one, by webhook",
            ["webhook"],
            registry=r,
        )
        self.webhook_rejected_events = Counter(
            "spoold_webhook_rejected_events",
            "Events set aside in a webhook's rejected/ folder, never posted, by webhook",
            ["webhook"],
            registry=r,
        )
        self.webhook_outbox = Gauge(
            "spoold_webhook_outbox_events",
            "Events waiting in a webhook's outbox, by webhook",
            ["webhook"],
            registry=r,
        )
        self.webhook_up = Gauge(
            "spoold_webhook_up",
            "1 if a webhook's last post was answered with 2xx (or none failed yet), else 0",
            ["webhook"],
            registry=r,
        )

    # ------------------------------------------------------------ sources

    def webhook_started(self, name: str, waiting: int) -> None:
        """Webhook ``name`` starts with ``waiting`` events in its outbox:
        every series of it exists from now on (counters at 0)."""
        self.webhook_posts.labels(name)
        self.webhook_failures.labels(name)
        self.webhook_dropped.labels(name)
        self.webhook_rejected_events.labels(name)
        self.webhook_outbox.labels(name).set(waiting)
        self.webhook_up.labels(name).set(1)

    def webhook_posted(self, name: str, waiting: int) -> None:
        """One event posted to webhook ``name``; ``waiting`` still in its outbox."""
        self.webhook_posts.labels(name).inc()
        self.webhook_outbox.labels(name).set(waiting)
        self.webhook_up.labels(name).set(1)

    def webhook_failed(self, name: str, waiting: int) -> None:
        """One post to webhook ``name`` failed."""
        self.webhook_failures.labels(name).inc()
        self.webhook_outbox.labels(name).set(waiting)
        self.webhook_up.labels(name).set(0)

    def webhook_queued(self, name: str, waiting: int, dropped: int) -> None:
        """Events written to the outbox of ``name`` (``dropped`` of them lost)."""
        self.webhook_outbox.labels(name).set(waiting)
        if dropped:
            self.webhook_dropped.labels(name).inc(dropped)

    def webhook_rejected(self, name: str, waiting: int) -> None:
        """One event of webhook ``name`` set aside (never posted)."""
        self.webhook_rejected_events.labels(name).inc()
        self.webhook_outbox.labels(name).set(waiting)

    def measured(self, relay: Relay) -> Relay:
        """``relay``, with every attempt timed and counted."""
        return _MeasuredRelay(relay, self)

    def tls_policy_finding(self, finding: str, domain: str, host: str) -> None:
        """Count a TLS policy finding (:data:`spoold.tls_policy.OnReport`)."""
        self.tls_policy_findings.labels(finding).inc()

    def reloaded(self, applied: bool) -> None:
        """Record a reload's result (the daemon calls this)."""
        self.reload_success.set(1 if applied else 0)
        self.reload_time.set(time.time())

    def _age(self, queue: Queue) -> float:
        oldest = self._oldest.get(queue)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def _free_bytes(self) -> float:
        if self._spool_dir is None:
            return 0.0
        try:
            st = os.statvfs(self._spool_dir)
        except OSError:
            return float("nan")
        return float(st.f_bavail * st.f_frsize)

    def update(
        self,
        spool: Spool,
        cache: ConnectionCache | None = None,
        fleet: Health | None = None,
        slots: FleetSlots | None = None,
    ) -> None:
        """Refresh the gauges from the spool (and the relay's cache, the
        health of the fleet's Redis and this node's fleet-wide slots)."""
        if fleet is not None:
            self.fleet_redis_up.set(1 if fleet.up else 0)
            self.fleet_redis_outages.inc(max(0, fleet.outages - self._fleet_outages_seen))
            self._fleet_outages_seen = fleet.outages
        if slots is not None:
            held = slots.held
            self._slot_routes |= set(held)
            for route in self._slot_routes:  # a route that held slots shows 0, not its last
                self.fleet_slots_held.labels(route).set(held.get(route, 0))
            self.fleet_slot_refusals.inc(max(0, slots.refusals - self._slot_refusals_seen))
            self._slot_refusals_seen = slots.refusals
        self._spool_dir = spool.spool_dir
        for queue, n in spool.counts().items():
            self.messages.labels(queue.value).set(n)
        self.messages.labels("sending").set(spool.sending)
        self.running_sends.set(spool.running_sends)
        skipped = spool.skipped()
        for kind in ("unreadable_record", "unusable_dir", "unmarked_in_doubt"):
            self.skipped.labels(kind).set(skipped.get(kind, 0))
        oldest = spool.oldest_spool_dates()
        for queue in _AGE_QUEUES:
            when = oldest.get(queue)
            self._oldest[queue] = None if when is None else when.timestamp()
        listed = spool.suppressions
        self.suppressed.set(len(listed))  # no sorting: ended ones go at housekeeping
        for what, n in listed.counts.items():
            seen = self._suppression_seen.get(what, 0)
            self.suppression_uses.labels(what).inc(max(0, n - seen))
            self._suppression_seen[what] = n
        if cache is not None:
            idle = cache.idle_connections
            self.connections.labels("idle").set(idle)
            self.connections.labels("busy").set(cache.open_connections - idle)

    # ------------------------------------------------------------ serving

    async def serve(
        self,
        spool: Spool,
        listen: str,
        *,
        cache: ConnectionCache | None = None,
        fleet: Health | None = None,
        slots: FleetSlots | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; reports started once listening."""
        host, _, port = listen.rpartition(":")
        server, thread = await anyio.to_thread.run_sync(
            lambda: start_http_server(int(port), host.strip("[]"), registry=self.registry)
        )
        try:
            async with spool.events() as stream, anyio.create_task_group() as tg:
                self.update(spool, cache, fleet, slots)
                task_status.started()

                async def refresh() -> None:
                    while True:
                        await anyio.sleep(self.refresh_interval)
                        self.update(spool, cache, fleet, slots)

                tg.start_soon(refresh)
                async for event in stream:
                    if event.kind is not EventKind.PING:
                        self.events.labels(event.kind).inc()
                    if event.kind is EventKind.SPOOLED:
                        self.spooled.inc()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(server.shutdown)
                server.server_close()
                await anyio.to_thread.run_sync(thread.join, 5)
