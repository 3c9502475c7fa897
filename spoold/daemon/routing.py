"""Routing: which route a recipient takes, and how to talk to each hop.

A :class:`Router` is built from a :class:`~spoold.daemon.config.Config` and is
immutable; a reload builds a new one and the daemon swaps it in one step.
A spooled message records the route that chose its next hops; when a
reload changes that route's ``next_hops``, the message goes to the new hops
from its next attempt on (its policy says them: below).
:meth:`Router.reroute` routes a message's recipients again (``spoold
reroute``), which may split it. The settings used to talk to a hop always
follow the current routes.

A route's ``senders`` match the envelope sender: an exact address (the
local part as written, the domain in any case) or ``@domain`` for every
sender of the domain; an exact address beats ``@domain``, and the null
sender (a bounce) matches none. A sender route takes every recipient of the
message, before any ``domains`` rule. Else a route's ``domains`` match a
recipient's domain exactly, or, written with a leading dot
(``.example.org``), any subdomain of it. A recipient no route names goes to
``relay.default_route``. An ``mx = true`` route takes its next hops from DNS
(:mod:`spoold.daemon.mx`), one envelope per recipient domain.

A next hop may serve several routes (say two sending identities with their
own credentials through one smarthost): a hop is talked to with the
settings of the route the message records, so the connection cache, which
keys connections by hop and settings, never lends a connection
authenticated for one route to another. The EHLO
name to a hop is the route's ``helo_name``, else the top-level
``hostname``; it is part of the settings, so after a reload that changes
it new connections use the new name and cached ones (opened with the old)
are no longer lent out: they close when idle.

Everything a route says about delivering a message (its current next hops,
how to talk to each hop, its limits: ``max_connections`` and ``rate``, its
queue lifetime and retries-exhausted rule over the ``[spool]`` ones, and
the retry intervals its new messages start with) is one
:class:`~spoold.policy.DestinationPolicy`, built once per route with the
router; :meth:`Router.policy_for` gives a message the policy of the route
it records (the spool asks once per attempt), so a reload applies to
messages already queued. A message without a route, or whose route is
gone, keeps its own hops, has no limits and the ``[spool]`` rules.
An MX route's ``tls_policy`` is a field of its policy too; the relay
applies it per recipient domain and MX host (:mod:`spoold.tls_policy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Final

import msgspec

from spoold.connection_cache import RouteSettings
from spoold.credentials import load_auth_file
from spoold.daemon.config import Config, RouteConfig, delivery_policy
from spoold.daemon.dns import DnsLookups
from spoold.daemon.mx import MxResolver
from spoold.errors import NoRouteError
from spoold.limits import DEFAULT_MAX_CONNECTIONS, DestinationLimits
from spoold.message import Message, RetryInterval, RoutedEnvelope
from spoold.outcome import DeliveryPolicy
from spoold.policy import DestinationPolicy

__all__ = ["Router"]


@dataclass(frozen=True)
class _Route:
    config: RouteConfig
    settings: RouteSettings
    policy: DestinationPolicy  # without sessions: those depend on the message's hops


def _session_settings(rc: RouteConfig, config: Config) -> RouteSettings:
    """How to talk to a route's hops: the one place a ``[routes.NAME]`` key
    about the SMTP session (TLS, credentials, EHLO name) becomes a setting.
    Reads the route's credential file (blocking)."""
    relay = config.relay
    return RouteSettings(
        tls=rc.tls,
        verify_certificates=rc.verify_certificates,
        ca_file=str(rc.ca_file) if rc.ca_file else None,
        client_cert=str(rc.client_cert) if rc.client_cert else None,
        client_key=str(rc.client_key) if rc.client_key else None,
        auth=load_auth_file(rc.auth_file) if rc.auth_file else None,
        connect_timeout=relay.connect_timeout.total_seconds(),
        command_timeout=relay.command_timeout.total_seconds(),
        message_timeout=relay.message_timeout.total_seconds(),
        final_reply_timeout=relay.final_reply_timeout.total_seconds(),
        helo_name=rc.helo_name or config.hostname,
    )


def _limits(rc: RouteConfig) -> DestinationLimits:
    """A route's limits: ``max_connections`` is counted fleet-wide (with
    ``[fleet]``) only when the config sets it; left at the default, it is
    each node's own."""
    if rc.max_connections is None:
        return DestinationLimits(DEFAULT_MAX_CONNECTIONS, rc.rate, shared_connections=False)
    return DestinationLimits(rc.max_connections, rc.rate)


def _route_policy(rc: RouteConfig, delivery: DeliveryPolicy, jitter: float) -> DestinationPolicy:
    """A route's policy (but for its hops' sessions): the one place any
    other ``[routes.NAME]`` key that rules delivery becomes a policy field."""
    if rc.max_queue_lifetime is not None:
        delivery = replace(delivery, max_queue_lifetime=rc.max_queue_lifetime)
    if rc.retries_exhausted is not None:
        delivery = replace(delivery, retries_exhausted=rc.retries_exhausted)
    spans: Sequence[timedelta] = rc.retry_intervals or ()
    return DestinationPolicy(
        destination=rc.name,
        next_hops=None if rc.mx else rc.next_hops,
        limits=_limits(rc),
        delivery=delivery,
        retry_intervals=tuple(RetryInterval.from_spans(spans, jitter)),
        tls_policy=rc.tls_policy,
    )


_UNKNOWN: Final = "\0"  # not a route name (nor a domain's): not looked up yet
_DOMAINS_KEPT: Final = 4096  # domains remembered per Router (emptied when full)


class Router:
    """The routes of one configuration, immutable (a reload builds a new
    one). It answers which route a recipient takes (:meth:`route_name_for`),
    splits a submission into one envelope per route (and per domain for MX
    routes: :meth:`route_with_mx`), says how to talk to a hop
    (:meth:`settings_for`), gives a message its route's policy
    (:meth:`policy_for`: the spool's :class:`~spoold.policy.PolicySource`),
    and implements the spool's :class:`~spoold.spool.Routes` (current hops
    of a message's route, reroute). Errors: :class:`~spoold.errors.NoRouteError`,
    :class:`~spoold.errors.MxError`. Building it reads the routes'
    credential files (blocking: the daemon does it in a worker thread)."""

    def __init__(self, config: Config, resolver: MxResolver | None = None) -> None:
        self.resolver = resolver or MxResolver(DnsLookups(config.dns.nameservers).mx)
        relay = config.relay
        self.default_route = relay.default_route or None
        self._routes: dict[str, _Route] = {}
        self._by_hop: dict[str, RouteSettings] = {}  # the first route naming the hop
        self._by_sender: dict[str, str] = {}  # 'a@example.org' or '@example.org': route
        # A recipient domain's ``domains`` route (None: none), once looked up.
        self._by_domain: dict[str, str | None] = {}
        jitter = config.spool.retry_jitter
        delivery = delivery_policy(config)
        self._no_route = DestinationPolicy(delivery=delivery)
        self.default_settings = RouteSettings(
            connect_timeout=relay.connect_timeout.total_seconds(),
            command_timeout=relay.command_timeout.total_seconds(),
            message_timeout=relay.message_timeout.total_seconds(),
            final_reply_timeout=relay.final_reply_timeout.total_seconds(),
            helo_name=config.hostname,
        )
        for name, rc in config.routes.items():
            settings = _session_settings(rc, config)
            self._routes[name] = _Route(rc, settings, _route_policy(rc, delivery, jitter))
            for hop in rc.next_hops:
                self._by_hop.setdefault(hop, settings)
            for sender in rc.senders:
                self._by_sender[sender] = name

    def settings_for(self, hop: str, message: Message | None = None) -> RouteSettings:
        """How to talk to ``hop`` for ``message``: the settings of the route
        the message records (a hop may serve several routes, each with its
        own credentials); for a message without a route, or whose route is
        gone: those of the first route that names the hop, else (an
        exchanger found by MX) those of the MX route the message's
        recipients take now; else the defaults."""
        route = self._routes.get(message.route) if message is not None and message.route else None
        if route is not None:
            return route.settings
        settings = self._by_hop.get(hop)
        if settings is not None:
            return settings
        if message is not None:
            recipients = message.remaining_recipients or message.envelope_info.recipients
            if recipients:
                try:
                    name = self.route_name_for(recipients[0], message.envelope_info.sender)
                    route = self._routes[name]
                except NoRouteError:
                    return self.default_settings
                if route.config.mx:
                    return route.settings
        return self.default_settings

    def policy_for(self, message: Message) -> DestinationPolicy:
        """The policy of the route the message records, with the settings
        of each next hop of its attempt (:meth:`settings_for`); for a
        message without a route (hops given through the API, or a record
        older than routes) or whose route is gone: its own hops, no limits,
        the ``[spool]`` rules."""
        route = self._routes.get(message.route) if message.route else None
        policy = self._no_route if route is None else route.policy
        hops = message.next_hop_choices if policy.next_hops is None else policy.next_hops
        sessions = {hop: self.settings_for(hop, message) for hop in hops}
        return msgspec.structs.replace(policy, sessions=sessions)

    def limits_for(self, message: Message) -> tuple[str, DestinationLimits] | None:
        """The destination (route name) and limits of the route the message
        records; None (no limits) for a message without one, or whose route
        is gone (:class:`~spoold.limits.LimitsSource`)."""
        route = self._routes.get(message.route) if message.route else None
        return None if route is None else route.policy.limited

    def current_hops(self, message: Message) -> Sequence[str] | None:
        """The next hops the message's route has now, or None to keep the
        message's own: no route recorded (hops given through the API, or a
        record older than routes), a route that is gone, or an MX route
        (its hops came from DNS for the message's domain)."""
        route = self._routes.get(message.route) if message.route else None
        return None if route is None else route.policy.next_hops

    async def reroute(self, message: Message) -> list[RoutedEnvelope]:
        """Route the message's remaining recipients again through the current
        routes (one envelope per way they now go)."""
        env = message.envelope_info
        return await self.route_with_mx(
            env.sender, message.remaining_recipients, env.mail_params, env.envelope_id
        )

    def sender_route_for(self, sender: str) -> str | None:
        """The route whose ``senders`` match ``sender``: the exact address,
        else its ``@domain``; None for the null sender or no match."""
        local, at, domain = sender.strip("<>").rpartition("@")
        if not at:
            return None
        domain = domain.lower().rstrip(".")
        return self._by_sender.get(f"{local}@{domain}") or self._by_sender.get(f"@{domain}")

    def route_name_for(self, recipient: str, sender: str = "") -> str:
        """A route whose ``senders`` match ``sender`` (:meth:`sender_route_for`);
        else the most specific ``domains`` match for the recipient: an exact
        domain, else the longest ``.suffix`` rule; else the default route."""
        by_sender = self.sender_route_for(sender) if sender and self._by_sender else None
        if by_sender is not None:
            return by_sender
        domain = recipient.rpartition("@")[2].lower().rstrip(".")
        known = self._by_domain.get(domain, _UNKNOWN)
        if known is _UNKNOWN:  # the routes are fixed: each domain is worked out once
            if len(self._by_domain) >= _DOMAINS_KEPT:
                self._by_domain.clear()
            known = self._by_domain[domain] = self._domain_route(domain)
        if known is not None:
            return known
        if self.default_route is None:
            raise NoRouteError(f"no route for {recipient} and no relay.default_route")
        return self.default_route

    def _domain_route(self, domain: str) -> str | None:
        """The most specific ``domains`` match for ``domain`` (None: none)."""
        best: tuple[int, str] | None = None
        for name, route in self._routes.items():
            for d in route.config.domains:
                if domain == d.lstrip(".") if d.startswith(".") else domain == d:
                    score = 1_000_000 if not d.startswith(".") else len(d)
                elif d.startswith(".") and domain.endswith(d):
                    score = len(d)
                else:
                    continue
                if best is None or score > best[0]:
                    best = (score, name)
        return None if best is None else best[1]

    def _groups(self, sender: str, recipients: Sequence[str]) -> dict[tuple[str, str], list[str]]:
        """Recipients per (route, domain); the domain only for MX routes."""
        groups: dict[tuple[str, str], list[str]] = {}
        for rcpt in recipients:
            name = self.route_name_for(rcpt, sender)
            domain = rcpt.rpartition("@")[2].lower() if self._routes[name].config.mx else ""
            groups.setdefault((name, domain), []).append(rcpt)
        return groups

    def _envelope(
        self,
        name: str,
        rcpts: list[str],
        hops: Sequence[str],
        sender: str,
        mail_params: Sequence[str],
        envelope_id: str,
    ) -> RoutedEnvelope:
        return RoutedEnvelope(
            sender=sender,
            recipients=rcpts,
            next_hop_choices=tuple(hops),
            retry_intervals=self._routes[name].policy.retry_intervals,
            mail_params=mail_params,
            envelope_id=envelope_id,
            route=name,
        )

    def route(
        self,
        sender: str,
        recipients: Sequence[str],
        mail_params: Sequence[str] = (),
        envelope_id: str = "",
    ) -> list[RoutedEnvelope]:
        """One envelope per route the recipients take, in first-seen order.
        MX routes need :meth:`route_with_mx`."""
        out = []
        for (name, _domain), rcpts in self._groups(sender, recipients).items():
            route = self._routes[name]
            if route.config.mx:
                raise NoRouteError(f"route {name}: MX routes need a lookup (route_with_mx)")
            out.append(
                self._envelope(
                    name, rcpts, route.config.next_hops, sender, mail_params, envelope_id
                )
            )
        return out

    async def route_with_mx(
        self,
        sender: str,
        recipients: Sequence[str],
        mail_params: Sequence[str] = (),
        envelope_id: str = "",
    ) -> list[RoutedEnvelope]:
        """Like :meth:`route`; an MX route gets one envelope per domain with
        the domain's exchangers as next hops. Raises MxError."""
        out = []
        for (name, domain), rcpts in self._groups(sender, recipients).items():
            route = self._routes[name]
            if route.config.mx:
                hops = await self.resolver.next_hops(domain)
            else:
                hops = list(route.config.next_hops)
            out.append(self._envelope(name, rcpts, hops, sender, mail_params, envelope_id))
        return out
