"""Routing: which route a recipient takes, and how to talk to each hop.

A :class:`Router` is built from a :class:`~spoold.config.Config` and is
immutable; a reload builds a new one and the daemon swaps it in one step.
Messages already spooled keep their next hops (the record holds them);
only the settings used to talk to a hop follow the current routes.

A route's ``domains`` match a recipient's domain exactly, or, written with
a leading dot (``.example.org``), any subdomain of it. A recipient no route
names goes to ``relay.default_route``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from spoold.config import Config, RouteConfig
from spoold.message import RetryInterval, RoutedEnvelope
from spoold.smtp_relay import RouteSettings, load_auth_file
from spoold.spool import retry_intervals_from_spans

__all__ = ["Router", "NoRouteError"]


class NoRouteError(ValueError):
    pass


@dataclass(frozen=True)
class _Route:
    config: RouteConfig
    settings: RouteSettings
    retry_intervals: tuple[RetryInterval, ...]


class Router:
    def __init__(self, config: Config) -> None:
        relay = config.relay
        self.default_route = relay.default_route or None
        self._routes: dict[str, _Route] = {}
        self._by_hop: dict[str, RouteSettings] = {}
        jitter = config.spool.retry_jitter
        self.default_settings = RouteSettings(
            connect_timeout=relay.connect_timeout.total_seconds(),
            command_timeout=relay.command_timeout.total_seconds(),
            message_timeout=relay.message_timeout.total_seconds(),
        )
        for name, rc in config.routes.items():
            settings = RouteSettings(
                tls=rc.tls,  # type: ignore[arg-type]
                verify_certificates=rc.verify_certificates,
                ca_file=str(rc.ca_file) if rc.ca_file else None,
                client_cert=str(rc.client_cert) if rc.client_cert else None,
                client_key=str(rc.client_key) if rc.client_key else None,
                auth=load_auth_file(rc.auth_file) if rc.auth_file else None,
                connect_timeout=relay.connect_timeout.total_seconds(),
                command_timeout=relay.command_timeout.total_seconds(),
                message_timeout=relay.message_timeout.total_seconds(),
            )
            spans: Sequence[timedelta] = rc.retry_intervals or ()
            self._routes[name] = _Route(
                rc, settings, tuple(retry_intervals_from_spans(spans, jitter))
            )
            for hop in rc.next_hops:
                self._by_hop[hop] = settings

    def settings_for(self, hop: str) -> RouteSettings:
        """How to talk to ``hop``: its route's settings, or the defaults."""
        return self._by_hop.get(hop, self.default_settings)

    def route_name_for(self, recipient: str) -> str:
        domain = recipient.rpartition("@")[2].lower().rstrip(".")
        for name, route in self._routes.items():
            for d in route.config.domains:
                if domain == d or (d.startswith(".") and (domain.endswith(d) or domain == d[1:])):
                    return name
        if self.default_route is None:
            raise NoRouteError(f"no route for {recipient} and no relay.default_route")
        return self.default_route

    def route(
        self,
        sender: str,
        recipients: Sequence[str],
        mail_params: Sequence[str] = (),
        envelope_id: str = "",
    ) -> list[RoutedEnvelope]:
        """One envelope per route the recipients take, in first-seen order."""
        groups: dict[str, list[str]] = {}
        for rcpt in recipients:
            groups.setdefault(self.route_name_for(rcpt), []).append(rcpt)
        out = []
        for name, rcpts in groups.items():
            route = self._routes[name]
            if route.config.mx:
                raise NoRouteError(f"route {name}: MX routes are not implemented yet")
            out.append(
                RoutedEnvelope(
                    sender=sender,
                    recipients=rcpts,
                    next_hop_choices=route.config.next_hops,
                    retry_intervals=route.retry_intervals,
                    mail_params=mail_params,
                    envelope_id=envelope_id,
                )
            )
        return out
