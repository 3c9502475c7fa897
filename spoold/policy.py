"""One destination's policy, asked for once per attempt.

Everything the spool and the relay need to know about where a message goes
and under which rules is one frozen :class:`DestinationPolicy`: the
destination (the route, in the daemon) and its current next hops, how to
talk to each hop (TLS, credentials, timeouts, the EHLO name: a
:class:`~spoold.connection_cache.RouteSettings` per hop), the destination's
limits, the delivery rules (queue lifetime, what happens once the retry
intervals are used up, bounces, delay warnings: a
:class:`~spoold.outcome.DeliveryPolicy`) and the retry intervals a new
message of the destination starts with.

A :class:`PolicySource` gives it: ``policy_for(message)``, one method, asked
by the spool's scheduler when a due message is about to start an attempt
(and again when one held by its destination's limits is let go). The same
value then serves the whole attempt: the limits it is admitted under, the
hops it follows, the session settings the relay uses (:func:`relay_under`)
and the rules its outcome is judged by. A reload swaps the source; attempts
started from then on see the new policies, attempts under way keep theirs.

The daemon's source is its router (:class:`spoold.daemon.routing.Router`),
built from the config. A library user who gives none gets
:class:`LibraryPolicies`, made from the keyword arguments
:meth:`Spool.open <spoold.spool.Spool.open>` has always taken (``routes``,
``limits``, ``delivery_policy``, ``route_lifetimes``,
``route_retries_exhausted``); with none of them every message keeps its own
next hops, goes through the relay's own settings, has no limits and the
spool's delivery policy, exactly as before policies existed.

A new per-destination rule is a field here (with a default that keeps
today's behaviour), set where a source builds its policies, and read at
the one place that applies it. ``policy_for`` must not block; a source that
raises is a bug: the spool logs it and sends with no limits, the relay's
own hop settings and its own delivery rules (``delivery_policy``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Protocol, cast

import msgspec

from spoold.connection_cache import RouteSettings
from spoold.limits import DestinationLimits, LimitsSource
from spoold.log import get_logger
from spoold.message import Message, RetryInterval
from spoold.outcome import DeliveryPolicy, RetriesExhausted
from spoold.relay import BodyHandle, Relay, RelayOutcome
from spoold.tls_policy import TlsPolicyMode

__all__ = [
    "DestinationPolicy",
    "PolicySource",
    "NO_POLICY",
    "CurrentHops",
    "LibraryPolicies",
    "PolicyRelay",
    "relay_under",
]

# The spool's logger: what a library source says belongs to the spool's log.
log = get_logger("spoold.spool")


_DEFAULT_DELIVERY = DeliveryPolicy()


class DestinationPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How one message's destination is served, for one attempt (immutable;
    a msgspec struct: one is made per attempt, and cheaply).

    ``destination``: what the limits count by (the route's name in the
    daemon); None: no destination, so no limits. ``next_hops``: the hops
    the destination has now (a reload may have changed them); None: the
    message keeps its own (no route, or an MX route whose hops came from
    DNS). ``sessions``: how to talk to each next hop of the attempt (TLS,
    certificates, credentials, timeouts, EHLO name); a hop not in it is
    talked to with the relay's own settings. ``limits``: the destination's
    connections at once and rate (None: none). ``delivery``: queue
    lifetime, retries-exhausted rule, bounce or freeze, delay warning.
    ``retry_intervals``: what a new message of the destination starts with
    (written into its record at ingest; empty: the spool's default).
    ``tls_policy``: DANE and/or MTA-STS for the message's recipient domain
    (:mod:`spoold.tls_policy`; applied by a relay that has policies)."""

    destination: str | None = None
    next_hops: tuple[str, ...] | None = None
    sessions: Mapping[str, RouteSettings] = msgspec.field(default_factory=dict)
    limits: DestinationLimits | None = None
    delivery: DeliveryPolicy = _DEFAULT_DELIVERY
    retry_intervals: tuple[RetryInterval, ...] = ()
    # An MX route's outbound TLS policy (spoold.tls_policy): applied by the
    # relay per recipient domain and MX host; "none": the sessions' own TLS.
    tls_policy: TlsPolicyMode = "none"
    # False: the attempt's connection is closed (QUIT) when it ends, never
    # kept idle for the next one; set by a spool whose destination's
    # connections are counted fleet-wide (a slot is one attempt).
    reuse_connections: bool = True

    @property
    def limited(self) -> tuple[str, DestinationLimits] | None:
        """The destination and its limits when it has both (what
        :meth:`spoold.limits.DestinationGate.admit` counts), else None."""
        if self.destination is None or self.limits is None:
            return None
        return self.destination, self.limits

    def session_for(self, hop: str) -> RouteSettings | None:
        """How to talk to ``hop``; None: the relay's own settings."""
        return self.sessions.get(hop)


NO_POLICY = DestinationPolicy()
"""No route, no limits, the default delivery rules: what a relay called
without a policy goes by (``relay()`` of a relay that also takes one)."""


class PolicySource(Protocol):
    """Where the spool gets a message's :class:`DestinationPolicy`: asked
    once per attempt (see the module docstring); must not block."""

    def policy_for(self, message: Message) -> DestinationPolicy: ...


class CurrentHops(Protocol):
    """The part of a library user's routes (:class:`spoold.spool.Routes`)
    that :class:`LibraryPolicies` asks: ``current_hops(message)``, the next
    hops the message's route has now, or None to keep the message's own.
    Must not block."""

    def current_hops(self, message: Message) -> Sequence[str] | None: ...


class LibraryPolicies:
    """The policy source of a spool opened without one, from the parts a
    library user has always given: ``routes`` (current next hops of a
    message's route), ``limits`` (a :class:`~spoold.limits.LimitsSource`),
    ``delivery`` (the spool's delivery policy) and, per route name, a queue
    lifetime and a retries-exhausted rule that override the delivery
    policy's. Every part is optional and replaceable (the spool's
    attributes of the old names set them). A part that raises is logged and
    left out, as the spool always did: the message keeps its hops, or goes
    unlimited."""

    def __init__(
        self,
        *,
        routes: CurrentHops | None = None,
        limits: LimitsSource | None = None,
        delivery: DeliveryPolicy | None = None,
        route_lifetimes: Mapping[str, timedelta] | None = None,
        route_retries_exhausted: Mapping[str, RetriesExhausted] | None = None,
    ) -> None:
        self.routes = routes
        self.limits = limits
        self.delivery = delivery or DeliveryPolicy()
        self.route_lifetimes: dict[str, timedelta] = dict(route_lifetimes or {})
        self.route_retries_exhausted: dict[str, RetriesExhausted] = dict(
            route_retries_exhausted or {}
        )

    def policy_for(self, message: Message) -> DestinationPolicy:
        route = message.route
        delivery = self.delivery
        if route:
            lifetime = self.route_lifetimes.get(route)
            if lifetime is not None:
                delivery = replace(delivery, max_queue_lifetime=lifetime)
            exhausted = self.route_retries_exhausted.get(route)
            if exhausted is not None:
                delivery = replace(delivery, retries_exhausted=exhausted)
        next_hops = None if route is None else self._current_hops(message)
        limited = self._limits(message)
        if limited is None:
            return DestinationPolicy(
                destination=route or None, next_hops=next_hops, delivery=delivery
            )
        return DestinationPolicy(
            destination=limited[0], next_hops=next_hops, limits=limited[1], delivery=delivery
        )

    def _current_hops(self, message: Message) -> tuple[str, ...] | None:
        if self.routes is None:
            return None
        try:
            hops = self.routes.current_hops(message)
        except Exception:
            log.exception(
                "routes could not say the current hops", id=message.id, flows=message.flows
            )
            return None
        return None if hops is None else tuple(hops)

    def _limits(self, message: Message) -> tuple[str, DestinationLimits] | None:
        if self.limits is None:
            return None
        try:
            return self.limits.limits_for(message)
        except Exception:
            log.exception("limits could not be found; sending unlimited", id=message.id)
            return None


class PolicyRelay(Protocol):
    """A relay that takes the attempt's policy (for the session settings
    of each hop): :class:`~spoold.smtp_relay.SmtpRelay` is one. A relay
    that is not (a plain :class:`~spoold.relay.Relay`) is called without
    it."""

    async def relay_with_policy(
        self,
        policy: DestinationPolicy,
        message: Message,
        body: BodyHandle,
        recipients: Sequence[str],
    ) -> RelayOutcome: ...


async def relay_under(
    relay: Relay,
    policy: DestinationPolicy,
    message: Message,
    body: BodyHandle,
    recipients: Sequence[str],
) -> RelayOutcome:
    """One attempt through ``relay`` under ``policy`` (a
    :class:`PolicyRelay` is given it, a plain relay is not)."""
    # getattr, not isinstance: a runtime protocol check costs more than a
    # small message's whole relay here.
    with_policy = getattr(relay, "relay_with_policy", None)
    if with_policy is None:
        return await relay.relay(message, body, recipients)
    return await cast(PolicyRelay, relay).relay_with_policy(policy, message, body, recipients)
