"""The daemon's configuration: one TOML file, read into frozen values.

:func:`load_config` reads and validates the whole file before anything uses
it and raises :class:`ConfigError` listing every problem found, each naming
its key (``spool.max_concurrent_send_jobs: expected an integer >= 1, got
'ten'``). Unknown keys are errors. Relative paths are resolved against the
directory of the file. Spans are ``"30s"``, ``"5m"``, ``"2h"``, ``"1d"``
(or a number of seconds); sizes are ``"32MiB"``, ``"500KB"`` (or bytes).

Each table is a frozen msgspec Struct whose fields are its keys: a field's
default is the key's default (written once, here or in the library module
it comes from) and its annotation says how the key is read, by msgspec
against the type and its ``msgspec.Meta`` constraints, or by the named
reader of a span, size, path or address. Problems are reported in spoold's
own words, never msgspec's (:func:`_problem_text`). Tables and the parts
they set: ``[spool]`` gives the spool's :class:`~spoold.settings.SpoolSettings`
(:attr:`SpoolConfig.settings`; an ingest worker's writer takes its
``.writer`` share), ``[relay]`` the connection cache's
:class:`~spoold.connection_cache.CacheSettings` (:attr:`RelayConfig.cache`),
and ``[smtp]`` is the SMTP listener's own value. Each ``[[dkim]]`` table
is one signing key; its ``key_file`` is read by :func:`dkim_signer`, as the
daemon builds what a config gives (at start and at each reload, like a
route's ``auth_file``), not by the commands that only read the config.

A reload builds a new :class:`Config` and the daemon swaps it in one step,
one assignment per part (``spool.settings = new.spool.settings``);
:func:`restart_needed` names the settings that a reload cannot change.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import msgspec

from spoold import connection_cache as _cache
from spoold import settings as _settings
from spoold.body import LineEndingPolicy
from spoold.connection_cache import CacheSettings, TlsMode
from spoold.daemon.webhook_events import DEFAULT_WEBHOOK_KINDS, WebhookKind, load_secret
from spoold.daemon.webhooks import WebhookSettings
from spoold.dkim import DkimSigner
from spoold.dkim_keys import (
    DEFAULT_SIGNED_HEADERS,
    DkimAlgorithm,
    DkimKey,
    check_header_names,
    check_selector,
    load_key,
    signing_domain,
)
from spoold.errors import ConfigError, DkimKeyError, SpooldError
from spoold.fleet import FleetSettings
from spoold.hops import nameserver_address, parse_hop
from spoold.hostname import check_hostname, local_hostname
from spoold.limits import Rate, parse_rate
from spoold.message import RetryInterval
from spoold.numerals import ascii_decimal
from spoold.outcome import AfterCrash, DeliveryPolicy, OnPermanentFailure, RetriesExhausted
from spoold.settings import SpoolSettings
from spoold.store import SyncMode
from spoold.suppression import SuppressedRecipients
from spoold.times import parse_size, parse_span
from spoold.tls_policy import TlsPolicyMode

__all__ = [
    "Config",
    "SpoolConfig",
    "ControlConfig",
    "SmtpConfig",
    "LogConfig",
    "MetricsConfig",
    "HooksConfig",
    "RelayConfig",
    "RouteConfig",
    "DnsConfig",
    "DkimConfig",
    "WebhookConfig",
    "dkim_signer",
    "webhook_settings",
    "load_config",
    "parse_config",
    "restart_needed",
    "delivery_policy",
    "route_lifetimes",
    "route_retries_exhausted",
    "find_control_socket",
    "find_submission_socket",
    "DEFAULT_CONTROL_SOCKET",
    "DEFAULT_SUBMISSION_SOCKET",
    "SUBMISSION_SOCKET_NAME",
]

_T = TypeVar("_T")


# ------------------------------------------------------------ the values
#
# Each table is a frozen msgspec Struct: its fields are the table's keys,
# their defaults the keys' defaults, and their annotations say how a value
# is read (see "the reader" below): a plain type with its msgspec.Meta
# constraints, checked by msgspec, or a _Read marker naming the function
# that reads a span, a size, an address and the like.


DEFAULT_LISTEN = ("127.0.0.1:2525",)
DEFAULT_RELAY_NETWORKS = ("127.0.0.0/8", "::1/128")


class _Read:
    """An annotation: the key's TOML value is read by ``read`` (which
    raises ValueError or TypeError saying what was expected)."""

    __slots__ = ("read",)

    def __init__(self, read: Callable[[object], object]) -> None:
        self.read = read


class _PathKey:
    """An annotation: a path, resolved against the config file's directory;
    with ``optional``, ``""`` is None."""

    __slots__ = ("optional",)

    def __init__(self, *, optional: bool) -> None:
        self.optional = optional


_PATH = _PathKey(optional=False)
_OPTIONAL_PATH = _PathKey(optional=True)


def _int_range(minimum: int, maximum: int | None = None) -> msgspec.Meta:
    return msgspec.Meta(ge=minimum, le=maximum)


# ------------------------------------------------------------ value readers


def _list(item: Callable[[object], _T]) -> Callable[[object], tuple[_T, ...]]:
    def convert(v: object) -> tuple[_T, ...]:
        if not isinstance(v, list):
            raise ValueError(f"expected a list, got {v!r}")
        return tuple(item(x) for x in v)

    return convert


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _hop(v: object) -> str:
    hop = _str(v)
    parse_hop(hop)
    return hop


def _listen_address(v: object) -> str:
    address = _str(v)
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    number = ascii_decimal(port)
    if not host or number is None or not 0 < number < 65536:
        raise ValueError(f"expected 'address:port', got {v!r}")
    return address


def _nameserver(v: object) -> str:
    """A DNS server: an IP address, with a port after ``:`` (IPv6 in
    brackets: ``[::1]:53``); 53 when none is given."""
    text = _str(v)
    try:
        nameserver_address(text)
    except ValueError:
        raise ValueError(f"expected an IP address with an optional ':port', got {v!r}") from None
    return text


def _optional_listen_address(v: object) -> str:
    """An address, or ``""`` for off."""
    text = _str(v)
    return _listen_address(text) if text else text


def _is_loopback(address: str) -> bool:
    """Whether a listen address ('host:port') is on 127.0.0.0/8 or ::1."""
    host = address.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _deduplicate(v: object) -> str:
    if v not in ("", "message-id"):
        raise ValueError(f'expected "message-id", or "" for off; got {v!r}')
    return str(v)


def _positive_span(v: object) -> timedelta:
    span = parse_span(v)
    if span <= timedelta(0):
        raise ValueError(f"expected a span > 0, got {v!r}")
    return span


def _optional_span(v: object) -> timedelta | None:
    """A span > 0, or ``""`` for none."""
    if v == "":
        return None
    return _positive_span(v)


def _route_connections(v: object) -> int:
    """A route's ``max_connections``: an integer from 1 to 10000."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 10_000:
        raise ValueError(f"expected an integer <= 10000, got {v!r}")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"expected an integer >= 1, got {v!r}")
    return v


def _optional_retries_exhausted(v: object) -> RetriesExhausted | None:
    """One of RetriesExhausted's values, or ``""`` for none."""
    if v == "":
        return None
    for member in RetriesExhausted:
        if v == member.value:
            return member
    choices = ", ".join(e.value for e in RetriesExhausted)
    raise ValueError(f'expected one of {choices} or "", got {v!r}')


def _network(v: object) -> str:
    text = _str(v)
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"expected a network like '127.0.0.0/8', got {v!r}") from None
    return text


def _mode(v: object) -> int:
    if isinstance(v, str) and re.fullmatch(r"0?[0-7]{3}", v):
        mode = int(v, 8)
    elif isinstance(v, int) and not isinstance(v, bool):
        mode = v
    else:
        raise ValueError(f"expected an octal mode like '0660', got {v!r}")
    if mode & 0o007:
        raise ValueError(f"the control socket must not be open to others, got {mode:04o}")
    return mode


def _submission_mode(v: object) -> int:
    if isinstance(v, str) and re.fullmatch(r"0?[0-7]{3}", v):
        mode = int(v, 8)
    elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0o777:
        mode = v
    else:
        raise ValueError(f"expected an octal mode like '0666', got {v!r}")
    if mode & 0o111:
        raise ValueError(f"a socket needs no execute bits, got {mode:04o}")
    if not mode & 0o200:
        raise ValueError(f"the daemon's own user must keep write access, got {mode:04o}")
    return mode


def _group(v: object) -> str:
    import grp

    text = _str(v).strip()
    if text:
        try:
            grp.getgrnam(text)
        except KeyError:
            raise ValueError(f"no group named {text!r} on this system") from None
    return text


def _hook(v: object) -> str:
    text = _str(v)
    if text and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", text):
        raise ValueError(f"expected 'package.module:function', got {v!r}")
    return text


def _domain(v: object) -> str:
    text = _str(v).strip().lower()
    if not text or not re.fullmatch(r"\.?[a-z0-9]([a-z0-9.-]*[a-z0-9])?", text):
        raise ValueError(f"expected a domain like 'example.com' or '.example.org', got {v!r}")
    return text


def _sender(v: object) -> str:
    """An envelope sender a route matches: ``local@domain`` (the local part
    as written, the domain in lower case) or ``@domain`` (every sender of
    that domain). The null sender ``<>`` matches no route."""
    text = _str(v).strip()
    if text in ("", "<>"):
        raise ValueError(f"the null sender matches no route, got {v!r}")
    local, at, domain = text.rpartition("@")
    domain = domain.lower()
    if (
        not at
        or any(c.isspace() or c in "<>" for c in local)
        or not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", domain)
    ):
        raise ValueError(
            f"expected an address like 'billing@example.org' or '@example.org', got {v!r}"
        )
    return f"{local}@{domain}"


def _hostname(v: object) -> str:
    return check_hostname(_str(v).strip())


def _optional_hostname(v: object) -> str:
    """A host name, or ``""`` for the default."""
    text = _str(v).strip()
    return check_hostname(text) if text else ""


def _dkim_domain(v: object) -> str:
    """A signing domain, lower case; an internationalised one as its A-label."""
    return signing_domain(_str(v))


def _selector(v: object) -> str:
    return check_selector(_str(v).strip())


def _webhook_url(v: object) -> str:
    url = _str(v)
    if any(c.isspace() or not c.isprintable() or c == "\\" for c in url):
        raise ValueError(f"expected a URL without spaces, control characters or '\\', got {v!r}")
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise ValueError(f"{exc}, got {v!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not host or not url.lower().startswith(scheme + "://"):
        raise ValueError(f"expected an https:// URL, got {v!r}")
    if "@" in parts.netloc:
        raise ValueError(f"expected a URL without a user name or password, got {v!r}")
    if "#" in url:
        raise ValueError(f"expected a URL without a fragment ('#'), got {v!r}")
    import httpx  # here, not at the top: every CLI command reads the config

    try:
        parsed_host = httpx.URL(url).host
    except httpx.InvalidURL as exc:
        raise ValueError(f"{exc}, got {v!r}") from None
    if parsed_host.lower() != host:  # the host checked is the host posted to
        raise ValueError(f"expected an https:// URL, got {v!r}")
    if scheme == "http" and not _is_loopback(f"{host}:0"):
        raise ValueError(
            f"plain http would send the events in clear; use https:// "
            f"(http:// only to a loopback address), got {v!r}"
        )
    return url


def _webhook_kind(v: object) -> WebhookKind:
    try:
        return WebhookKind(_str(v))
    except ValueError:
        raise ValueError(
            f"expected one of {', '.join(k.value for k in WebhookKind)}, got {v!r}"
        ) from None


def _signed_headers(v: object) -> tuple[str, ...]:
    return check_header_names(_list(_str)(v))


_Span = Annotated[timedelta, _Read(parse_span)]
_PositiveSpan = Annotated[timedelta, _Read(_positive_span)]
_Size = Annotated[int, _Read(parse_size)]
_Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
_Path = Annotated[Path, _PATH]
_OptionalPath = Annotated[Path | None, _OPTIONAL_PATH]


# ------------------------------------------------------------ the tables


# -- [fleet] (issue 23)

_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _redis_url(v: object) -> str:
    """``redis://HOST[:PORT][/DB]`` or ``rediss://`` (TLS); a password in
    the URL is refused (it would reach logs and ``ps``): ``password_file``."""
    text = _str(v).strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"expected redis://HOST:PORT/DB or rediss://..., got {text!r}") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"expected redis://HOST:PORT/DB or rediss://..., got {text!r}")
    if parts.password is not None:
        raise ValueError("a password in the URL would be logged; put it in fleet.password_file")
    db = parts.path.strip("/")
    if db and ascii_decimal(db) is None:
        raise ValueError(f"expected a database number after the port, got {db!r}")
    if parts.query or parts.fragment or (port is not None and not 0 < port < 65536):
        raise ValueError(f"expected redis://HOST:PORT/DB or rediss://..., got {text!r}")
    return text


def _node(v: object) -> str:
    text = _str(v).strip()
    if text and not _NODE_RE.match(text):
        raise ValueError(
            f"expected a node name of letters, digits, '.', '_' and '-' (at most 64), got {text!r}"
        )
    return text


def _fleet_timeout(v: object) -> timedelta:
    span = _positive_span(v)
    if span > timedelta(seconds=10):
        raise ValueError(f"expected a span > 0 and at most 10s, got {v!r}")
    return span


class SpoolConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``[spool]``; :attr:`settings` is what the running spool takes."""

    dir: _Path
    max_concurrent_send_jobs: Annotated[int, _int_range(1, 100_000)] = (
        _settings.DEFAULT_MAX_CONCURRENT_SEND_JOBS
    )
    retry_intervals: Annotated[tuple[timedelta, ...], _Read(_list(parse_span))] = (
        _settings.DEFAULT_RETRY_SPANS
    )
    retry_jitter: _Fraction = _settings.DEFAULT_RETRY_JITTER
    flush_timeout: _Span = timedelta(seconds=_settings.DEFAULT_FLUSH_TIMEOUT)
    min_free_space: _Size = _settings.DEFAULT_MIN_FREE_SPACE
    sync: SyncMode = _settings.DEFAULT_SYNC
    max_queue_lifetime: _PositiveSpan = _settings.DEFAULT_MAX_QUEUE_LIFETIME
    on_permanent_failure: OnPermanentFailure = OnPermanentFailure.FREEZE
    retries_exhausted: RetriesExhausted = DeliveryPolicy().retries_exhausted
    delay_warning: Annotated[timedelta | None, _Read(_optional_span)] = None  # None: off
    after_crash: AfterCrash = _settings.DEFAULT_AFTER_CRASH
    removed_retention: _PositiveSpan = _settings.DEFAULT_REMOVED_RETENTION
    history_retention: _PositiveSpan = _settings.DEFAULT_HISTORY_RETENTION
    idempotency_window: _PositiveSpan = _settings.DEFAULT_IDEMPOTENCY_WINDOW
    # The suppression list (spoold.suppression): "" keeps hard bounces off it.
    suppress_after_hard_bounce: Annotated[timedelta | None, _Read(_optional_span)] = None
    suppressed_recipients: SuppressedRecipients = _settings.DEFAULT_SUPPRESSED_RECIPIENTS
    max_suppressed: Annotated[int, _int_range(1, 1_000_000)] = _settings.DEFAULT_MAX_SUPPRESSED

    @property
    def delivery_policy(self) -> DeliveryPolicy:
        """Lifetime, retries exhausted, bounce, delay warning."""
        return DeliveryPolicy(
            max_queue_lifetime=self.max_queue_lifetime,
            on_permanent_failure=self.on_permanent_failure,
            delay_warning=self.delay_warning,
            retries_exhausted=self.retries_exhausted,
        )

    @property
    def settings(self) -> SpoolSettings:
        """The spool's settings (a writer's: ``.writer``) from this table."""
        return SpoolSettings(
            max_concurrent_send_jobs=self.max_concurrent_send_jobs,
            default_retry_intervals=tuple(
                RetryInterval.from_spans(self.retry_intervals, self.retry_jitter)
            ),
            min_free_space=self.min_free_space,
            sync=self.sync,
            delivery_policy=self.delivery_policy,
            after_crash=self.after_crash,
            removed_retention=self.removed_retention,
            history_retention=self.history_retention,
            idempotency_window=self.idempotency_window,
            suppress_after_hard_bounce=self.suppress_after_hard_bounce,
            suppressed_recipients=self.suppressed_recipients,
            max_suppressed=self.max_suppressed,
        )


SUBMISSION_SOCKET_NAME = "submit.sock"  # the submission socket's default name, beside the admin one


class ControlConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The admin socket (``socket``, ``mode``: every operation) and the
    submission socket (``submission_*``: only ``submit``, ``wait`` and
    ``ping``). ``submission_socket`` None: :data:`SUBMISSION_SOCKET_NAME`
    beside the admin socket (see :attr:`submission_path`);
    ``submission_group`` "": the socket keeps the daemon's own group."""

    # Read in this order: the group decides the default of the mode.
    submission_group: Annotated[str, _Read(_group)] = ""
    # Any local user may submit, as with Postfix's postdrop; 0660 by
    # default when submission_group is set.
    submission_mode: Annotated[int, _Read(_submission_mode)] = 0o666
    socket: _Path  # default: SPOOL/control.sock
    mode: Annotated[int, _Read(_mode)] = 0o660
    submission_socket: _OptionalPath = None

    @property
    def submission_path(self) -> Path:
        return self.submission_socket or self.socket.parent / SUBMISSION_SOCKET_NAME


class SmtpConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``[smtp]``: the SMTP ingest listener's settings (with what is read
    from their files: :class:`~spoold.daemon.listener.ListenerSettings`)."""

    listen: Annotated[tuple[str, ...], _Read(_list(_listen_address))] = DEFAULT_LISTEN
    max_message_size: _Size = 32 * 1024 * 1024
    max_recipients: Annotated[int, _int_range(1)] = 100
    max_connections: Annotated[int, _int_range(1)] = 100
    max_line_length: Annotated[int, _int_range(78)] = 998
    bare_line_endings: LineEndingPolicy = LineEndingPolicy.REJECT
    relay_networks: Annotated[tuple[str, ...], _Read(_list(_network))] = DEFAULT_RELAY_NETWORKS
    tls_cert: _OptionalPath = None  # with tls_key: offer STARTTLS
    tls_key: _OptionalPath = None
    require_tls: bool = False  # refuse MAIL before STARTTLS
    auth_file: _OptionalPath = None  # "user:password" lines, mode 0600: offer AUTH
    max_connections_per_client: Annotated[int, _int_range(1)] = 10  # per client IP address
    limit_relay_networks: bool = False  # relay_networks held to the per-client limit too
    timeout: _PositiveSpan = timedelta(minutes=5)  # idle wait for a command or DATA content
    max_junk_commands: Annotated[int, _int_range(1)] = 100  # NOOP, RSET, errors...: then 421
    max_auth_failures: Annotated[int, _int_range(1)] = 3  # failed AUTH on one connection
    auth_failure_delay: _Span = timedelta(seconds=1)  # before the first 535; doubles
    max_auth_failures_per_client: Annotated[int, _int_range(1)] = 10  # of one address
    auth_failure_window: _PositiveSpan = timedelta(minutes=15)
    workers: Annotated[int, _int_range(0, 256)] = 0  # ingest processes; 0: one per CPU
    deduplicate: Annotated[str, _Read(_deduplicate)] = ""  # "message-id": opt-in


class LogConfig(msgspec.Struct, frozen=True, kw_only=True):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class MetricsConfig(msgspec.Struct, frozen=True, kw_only=True):
    listen: Annotated[str, _Read(_optional_listen_address)] = ""


class HooksConfig(msgspec.Struct, frozen=True, kw_only=True):
    presend: Annotated[str, _Read(_hook)] = ""
    on_error: Annotated[str, _Read(_hook)] = ""


class RelayConfig(msgspec.Struct, frozen=True, kw_only=True):
    default_route: str = ""
    connect_timeout: _Span = timedelta(seconds=_cache.DEFAULT_CONNECT_TIMEOUT)
    command_timeout: _Span = timedelta(seconds=_cache.DEFAULT_COMMAND_TIMEOUT)
    message_timeout: _Span = timedelta(seconds=_cache.DEFAULT_MESSAGE_TIMEOUT)
    final_reply_timeout: _PositiveSpan = timedelta(seconds=_cache.DEFAULT_FINAL_REPLY_TIMEOUT)
    max_connections_per_hop: Annotated[int, _int_range(1)] = _cache.DEFAULT_MAX_PER_HOP
    max_connections: Annotated[int, _int_range(1)] = _cache.DEFAULT_MAX_TOTAL
    idle_timeout: _Span = timedelta(seconds=_cache.DEFAULT_IDLE_TIMEOUT)

    @property
    def cache(self) -> CacheSettings:
        """The connection cache's settings from this table."""
        return CacheSettings(
            max_per_hop=self.max_connections_per_hop,
            max_total=self.max_connections,
            idle_timeout=self.idle_timeout.total_seconds(),
        )


class RouteConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``[routes.NAME]``; ``name`` is the table's NAME, not a key."""

    name: str
    domains: Annotated[tuple[str, ...], _Read(_list(_domain))] = ()
    # Envelope senders ('a@example.org', '@example.org') whose every
    # recipient takes this route, before any domains rule.
    senders: Annotated[tuple[str, ...], _Read(_list(_sender))] = ()
    next_hops: Annotated[tuple[str, ...], _Read(_list(_hop))] = ()
    mx: bool = False
    tls: TlsMode = "opportunistic"
    verify_certificates: bool = True
    ca_file: _OptionalPath = None
    client_cert: _OptionalPath = None
    client_key: _OptionalPath = None
    auth_file: _OptionalPath = None
    retry_intervals: Annotated[tuple[timedelta, ...] | None, _Read(_list(parse_span))] = None
    # None: spool.max_queue_lifetime, spool.retries_exhausted
    max_queue_lifetime: Annotated[timedelta | None, _Read(_optional_span)] = None
    retries_exhausted: Annotated[RetriesExhausted | None, _Read(_optional_retries_exhausted)] = None
    # None: not set, so the default (spoold.limits.DEFAULT_MAX_CONNECTIONS),
    # which a fleet does not count fleet-wide (the routing reads it).
    max_connections: Annotated[int | None, _Read(_route_connections)] = None
    rate: Annotated[Rate | None, _Read(parse_rate)] = None  # attempts per span; None: no limit
    helo_name: Annotated[str, _Read(_optional_hostname)] = ""  # "": the top-level hostname
    # mx routes: DANE and/or MTA-STS per recipient domain (spoold.tls_policy)
    tls_policy: TlsPolicyMode = "none"


class DnsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``[dns]``: the DNS servers every lookup of the daemon asks (MX, the
    MTA-STS record, TLSA and, when set, the addresses of the next hops it
    dials by name and of ``mta-sts.DOMAIN``); empty: the system's
    (``/etc/resolv.conf``, and the system resolver for addresses)."""

    nameservers: Annotated[tuple[str, ...], _Read(_list(_nameserver))] = ()


class DkimConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One ``[[dkim]]`` table: a signing key."""

    domain: Annotated[str, _Read(_dkim_domain)]
    selector: Annotated[str, _Read(_selector)]
    key_file: _Path
    algorithm: DkimAlgorithm = DkimAlgorithm.RSA_SHA256
    headers: Annotated[tuple[str, ...], _Read(_signed_headers)] = DEFAULT_SIGNED_HEADERS
    subdomains: bool = False


class WebhookConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``[webhooks.NAME]``: events posted to an application
    (:mod:`spoold.daemon.webhooks`); ``name`` is the table's NAME."""

    name: str
    url: Annotated[str, _Read(_webhook_url)]
    secret_file: _Path
    events: Annotated[tuple[WebhookKind, ...], _Read(_list(_webhook_kind))] = DEFAULT_WEBHOOK_KINDS
    routes: Annotated[tuple[str, ...], _Read(_list(_str))] = ()  # empty: every route
    ca_file: _OptionalPath = None  # None: the system's trusted CAs
    timeout: Annotated[timedelta, _Read(_positive_span)] = timedelta(seconds=10)
    backoff: Annotated[timedelta, _Read(_positive_span)] = timedelta(seconds=1)
    max_backoff: Annotated[timedelta, _Read(_positive_span)] = timedelta(minutes=10)
    max_outbox: Annotated[int, _int_range(1, 10_000_000)] = 100_000
    concurrency: Annotated[int, _int_range(1, 256)] = 16  # posts in flight at once


class FleetConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``[fleet]``: the Redis the nodes of a fleet share (issue 23; see
    :mod:`spoold.fleet`). Its ``password_file`` is read by
    :func:`fleet_settings`, as the daemon builds what a config gives."""

    redis: Annotated[str, _Read(_redis_url)]
    node: Annotated[str, _Read(_node)] = ""  # "": the top-level hostname
    password_file: _OptionalPath = None
    timeout: Annotated[timedelta, _Read(_fleet_timeout)] = timedelta(milliseconds=200)
    lease: Annotated[timedelta, _Read(_positive_span)] = timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    spool: SpoolConfig
    control: ControlConfig
    smtp: SmtpConfig | None
    log: LogConfig
    metrics: MetricsConfig
    hooks: HooksConfig
    relay: RelayConfig
    routes: dict[str, RouteConfig] = field(default_factory=dict)
    dns: DnsConfig = field(default_factory=DnsConfig)
    # The name spoold gives itself (banner, Received:, EHLO, Message-ID,
    # Reporting-MTA); default: the machine's (spoold.hostname).
    hostname: str = field(default_factory=local_hostname)
    # The [[dkim]] tables, in the order written (their keys: dkim_signer).
    dkim: tuple[DkimConfig, ...] = ()
    webhooks: dict[str, WebhookConfig] = field(default_factory=dict)
    # [fleet]: None when the table is left out (the node is on its own).
    fleet: FleetConfig | None = None


def webhook_settings(config: Config) -> list[WebhookSettings]:
    """The webhooks of ``config``, each with its secret read from its
    ``secret_file`` (only its owner may read it). Raises
    :class:`ConfigError` listing every webhook whose secret cannot be
    used. Blocking I/O."""
    out: list[WebhookSettings] = []
    problems: list[str] = []
    for name, hook in config.webhooks.items():
        try:
            secret = load_secret(hook.secret_file)
        except SpooldError as exc:
            problems.append(f"webhooks.{name}.secret_file: {exc}")
            continue
        try:
            cafile = None if hook.ca_file is None else str(hook.ca_file)
            verify = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"webhooks.{name}.ca_file: {hook.ca_file}: {exc.strerror or exc}")
            continue
        out.append(
            WebhookSettings(
                name=name,
                url=hook.url,
                kinds=frozenset(hook.events),
                routes=frozenset(hook.routes),
                secret=secret,
                verify=verify,
                timeout=hook.timeout.total_seconds(),
                backoff=hook.backoff.total_seconds(),
                max_backoff=hook.max_backoff.total_seconds(),
                max_outbox=hook.max_outbox,
                concurrency=hook.concurrency,
            )
        )
    if problems:
        raise ConfigError(str(config.path), problems)
    return out


def dkim_signer(config: Config) -> DkimSigner | None:
    """The signer of new messages, with the key of every ``[[dkim]]`` table
    read from its file and checked (None: no table). Raises
    :class:`ConfigError` listing every key that cannot be used, each as
    ``dkim[N].key_file: ...`` naming the file. Blocking I/O."""
    keys: list[DkimKey] = []
    problems: list[str] = []
    for n, table in enumerate(config.dkim):
        try:
            keys.append(
                load_key(
                    table.key_file,
                    domain=table.domain,
                    selector=table.selector,
                    algorithm=table.algorithm,
                    headers=table.headers,
                    subdomains=table.subdomains,
                )
            )
        except DkimKeyError as exc:
            problems.append(f"dkim[{n}].key_file: {exc}")
    if problems:
        raise ConfigError(str(config.path), problems)
    return DkimSigner(keys) if keys else None


def delivery_policy(config: Config) -> DeliveryPolicy:
    """The spool's delivery policy (lifetime, retries exhausted, bounce,
    delay warning)."""
    return config.spool.delivery_policy


def route_lifetimes(config: Config) -> dict[str, timedelta]:
    """The routes that have a queue lifetime of their own."""
    return {
        name: route.max_queue_lifetime
        for name, route in config.routes.items()
        if route.max_queue_lifetime is not None
    }


def route_retries_exhausted(config: Config) -> dict[str, RetriesExhausted]:
    """The routes that have a retries-exhausted rule of their own."""
    return {
        name: route.retries_exhausted
        for name, route in config.routes.items()
        if route.retries_exhausted is not None
    }


def fleet_settings(config: Config) -> FleetSettings | None:
    """The :class:`~spoold.fleet.FleetSettings` of ``[fleet]`` (None
    without it), its ``password_file`` read now (blocking: call it from a
    worker thread); raises :class:`ConfigError` when that file cannot be
    read or is empty."""
    fleet = config.fleet
    if fleet is None:
        return None
    password = None
    if fleet.password_file is not None:
        try:
            password = fleet.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                str(config.path), [f"fleet.password_file: cannot read it: {exc}"]
            ) from None
        if not password:
            raise ConfigError(str(config.path), ["fleet.password_file: the file is empty"])
    return FleetSettings(
        url=fleet.redis,
        node=fleet.node or config.hostname,
        timeout=fleet.timeout.total_seconds(),
        lease=fleet.lease.total_seconds(),
        password=password,
    )


def restart_needed(old: Config, new: Config) -> list[str]:
    """Settings that differ between ``old`` and ``new`` but only take effect
    after a restart."""
    changed = []
    if old.spool.dir != new.spool.dir:
        changed.append("spool.dir")
    if old.control != new.control:
        changed.append("control")
    if (old.smtp is None) != (new.smtp is None) or (
        old.smtp and new.smtp and old.smtp.listen != new.smtp.listen
    ):
        changed.append("smtp.listen")
    if old.smtp and new.smtp and old.smtp.workers != new.smtp.workers:
        changed.append("smtp.workers")
    if old.metrics != new.metrics:
        changed.append("metrics.listen")
    if old.webhooks != new.webhooks:
        changed.append("webhooks")
    if old.fleet != new.fleet:
        changed.append("fleet")
    return changed


# ------------------------------------------------------------ the reader

_TableT = TypeVar("_TableT", bound=msgspec.Struct)


def _problem_text(annotation: Any, value: object) -> str:
    """What a key of type ``annotation`` expected, as an operator reads it
    (in the words of spoold's config, never msgspec's)."""
    kind = msgspec.inspect.type_info(annotation)
    match kind:
        case msgspec.inspect.IntType(ge=ge, le=le):
            too_large = le is not None and isinstance(value, int) and value > le
            if too_large and not isinstance(value, bool):
                return f"expected an integer <= {le}, got {value!r}"
            return f"expected an integer >= {ge}, got {value!r}"
        case msgspec.inspect.FloatType(ge=ge, le=le):
            return f"expected a number from {ge} to {le}, got {value!r}"
        case msgspec.inspect.BoolType():
            return f"expected true or false, got {value!r}"
        case msgspec.inspect.StrType():
            return f"expected a string, got {value!r}"
        case msgspec.inspect.LiteralType():  # in the order written (msgspec sorts them)
            return f"expected one of {', '.join(get_args(annotation))}, got {value!r}"
        case msgspec.inspect.EnumType(cls=cls):
            return f"expected one of {', '.join(str(e.value) for e in cls)}, got {value!r}"
    raise TypeError(f"no reader for a config value of type {kind}")  # a bug here


def _read_table(
    kind: type[_TableT],
    raw: object,
    prefix: str,
    problems: list[str],
    base: Path,
    *,
    given: Mapping[str, object] | None = None,
    defaults: Mapping[str, object] | None = None,
    fallbacks: Mapping[str, object] | None = None,
) -> _TableT:
    """Read one TOML table into ``kind``, appending to ``problems`` instead
    of stopping: each key that is wrong (in field order), then each one
    that is unknown. A key that is absent takes its default: ``defaults``'
    (one that depends on other tables), else the field's; a field without
    either is ``required``. A key that is wrong or required takes its
    default or its ``fallbacks`` value, so the tables read after this one
    still have a value to use (the config is refused all the same).
    ``given``: fields that are not keys of the table (a route's name)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix}: expected a table")
        raw = {}
    given = given or {}
    defaults = defaults or {}
    fallbacks = fallbacks or {}
    values: dict[str, object] = dict(given)
    keys = [info for info in msgspec.structs.fields(kind) if info.name not in given]
    for info in keys:
        key = info.name
        if key in raw:
            try:
                values[key] = _read_value(info.type, raw[key], base)
                continue
            except (ValueError, TypeError) as exc:
                problems.append(f"{prefix}.{key}: {exc}")
        elif info.required and key not in defaults:
            problems.append(f"{prefix}.{key}: required")
        if key in defaults:
            values[key] = defaults[key]
        elif key in fallbacks:
            values[key] = fallbacks[key]
    for key in sorted(set(raw) - {info.name for info in keys}):
        problems.append(f"{prefix}.{key}: unknown key")
    return kind(**values)


def _read_value(annotation: Any, value: object, base: Path) -> object:
    """One key's value: by the field's _Read or _PathKey marker, else by
    msgspec against the field's type and constraints."""
    for mark in getattr(annotation, "__metadata__", ()):
        if isinstance(mark, _Read):
            return mark.read(value)
        if isinstance(mark, _PathKey):
            text = _str(value)
            if not text:
                if mark.optional:
                    return None
                raise ValueError("expected a path")
            return Path(os.path.normpath(base / text))
    try:
        return msgspec.convert(value, annotation, strict=True)
    except msgspec.ValidationError:
        raise ValueError(_problem_text(annotation, value)) from None


def parse_config(raw: dict[str, Any], path: Path) -> Config:
    """Validate a decoded TOML document; raise :class:`ConfigError`."""
    problems: list[str] = []
    base = path.parent

    hostname = None
    if "hostname" in raw:
        try:
            hostname = _hostname(raw["hostname"])
        except (ValueError, TypeError) as exc:
            problems.append(f"hostname: {exc}")
    for key in sorted(set(raw) - {"hostname", *_TABLES}):
        problems.append(f"{key}: unknown key")

    spool = _read_table(
        SpoolConfig, raw.get("spool"), "spool", problems, base, fallbacks={"dir": base / "spool"}
    )
    if spool.delay_warning is not None and spool.delay_warning >= spool.max_queue_lifetime:
        problems.append(
            "spool.delay_warning: must be shorter than spool.max_queue_lifetime "
            "(the message would fail before the warning)"
        )

    raw_control = raw.get("control")
    control = _read_table(
        ControlConfig,
        raw_control,
        "control",
        problems,
        base,
        defaults={"socket": spool.dir / "control.sock"},
    )
    if control.submission_group and "submission_mode" not in (raw_control or {}):
        # Restricted to a group: others get nothing by default.
        control = msgspec.structs.replace(control, submission_mode=0o660)
    if control.submission_path == control.socket:
        problems.append(
            "control.submission_socket: must differ from control.socket (the admin socket)"
        )
    if control.submission_group and control.submission_mode & 0o002:
        problems.append(
            f"control.submission_group: restricts submission to group "
            f"{control.submission_group!r}, but submission_mode "
            f"{control.submission_mode:04o} lets anyone write; use '0660'"
        )

    smtp: SmtpConfig | None = None
    if "smtp" in raw:
        smtp = _read_table(SmtpConfig, raw.get("smtp"), "smtp", problems, base)
        if (smtp.tls_cert is None) != (smtp.tls_key is None):
            problems.append("smtp.tls_cert, smtp.tls_key: give both or neither")
        if smtp.require_tls and smtp.tls_cert is None:
            problems.append("smtp.require_tls: needs smtp.tls_cert and smtp.tls_key")
        if (
            smtp.auth_file is not None
            and smtp.tls_cert is None
            and not all(_is_loopback(a) for a in smtp.listen)
        ):
            problems.append(
                "smtp.auth_file: passwords would cross the network in clear; set "
                "smtp.tls_cert and smtp.tls_key, or listen on loopback addresses only"
            )

    log = _read_table(LogConfig, raw.get("log"), "log", problems, base)
    metrics = _read_table(MetricsConfig, raw.get("metrics"), "metrics", problems, base)
    hooks = _read_table(HooksConfig, raw.get("hooks"), "hooks", problems, base)
    relay = _read_table(RelayConfig, raw.get("relay"), "relay", problems, base)
    routes = _read_routes(raw.get("routes", {}), problems, base)
    dns = _read_table(DnsConfig, raw.get("dns"), "dns", problems, base)
    dkim = _read_dkim(raw.get("dkim", []), problems, base)
    webhooks = _read_webhooks(raw.get("webhooks", {}), routes, problems, base)
    fleet: FleetConfig | None = None
    if "fleet" in raw:
        fleet = _read_table(
            FleetConfig, raw["fleet"], "fleet", problems, base, fallbacks={"redis": ""}
        )
        if fleet.lease <= fleet.timeout:
            problems.append("fleet.lease: must be longer than fleet.timeout")

    if relay.default_route and relay.default_route not in routes:
        problems.append(
            f"relay.default_route: no route named {relay.default_route!r} "
            f"(routes: {', '.join(sorted(routes)) or 'none'})"
        )
    if smtp is not None and not relay.default_route:
        problems.append("relay.default_route: required when [smtp] is on")

    if problems:
        raise ConfigError(str(path), problems)
    return Config(
        path=path,
        spool=spool,
        control=control,
        smtp=smtp,
        log=log,
        metrics=metrics,
        hooks=hooks,
        relay=relay,
        routes=routes,
        dns=dns,
        hostname=local_hostname() if hostname is None else hostname,  # looked up when left out
        dkim=dkim,
        webhooks=webhooks,
        fleet=fleet,
    )


_TABLES = (
    "spool",
    "control",
    "smtp",
    "log",
    "metrics",
    "hooks",
    "relay",
    "routes",
    "dns",
    "dkim",
    "webhooks",
    "fleet",
)


_WEBHOOK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _read_webhooks(
    raw_hooks: object, routes: Mapping[str, RouteConfig], problems: list[str], base: Path
) -> dict[str, WebhookConfig]:
    """The ``[webhooks.NAME]`` tables; a ``routes`` filter names routes
    of the config."""
    hooks: dict[str, WebhookConfig] = {}
    if not isinstance(raw_hooks, dict):
        problems.append("webhooks: expected tables [webhooks.NAME]")
        return hooks
    for name, body in raw_hooks.items():
        prefix = f"webhooks.{name}"
        if not _WEBHOOK_NAME.fullmatch(name):
            # The name is a directory of the spool and a metric label.
            problems.append(
                f"webhooks: a webhook's name is 1 to 64 letters (A-Z, a-z), digits, "
                f"'-' or '_', got {name!r}"
            )
            continue
        hook = _read_table(
            WebhookConfig,
            body,
            prefix,
            problems,
            base,
            given={"name": name},
            fallbacks={"url": "", "secret_file": Path()},
        )
        for route in hook.routes:
            if route not in routes:
                problems.append(
                    f"{prefix}.routes: no route named {route!r} "
                    f"(routes: {', '.join(sorted(routes)) or 'none'})"
                )
        if hook.max_backoff < hook.backoff:
            problems.append(f"{prefix}.max_backoff: must not be shorter than backoff")
        hooks[name] = hook
    return hooks


def _read_dkim(raw_keys: object, problems: list[str], base: Path) -> tuple[DkimConfig, ...]:
    """The ``[[dkim]]`` tables (``dkim[N]``, N from 0 in the order
    written); a selector of a domain is given once."""
    if not isinstance(raw_keys, list):
        problems.append("dkim: expected tables [[dkim]]")
        return ()
    tables: list[DkimConfig] = []
    seen: dict[tuple[str, str], int] = {}
    for n, body in enumerate(raw_keys):
        prefix = f"dkim[{n}]"
        before = len(problems)
        table = _read_table(
            DkimConfig,
            body,
            prefix,
            problems,
            base,
            fallbacks={"domain": "", "selector": "", "key_file": Path()},
        )
        if len(problems) > before:
            continue
        other = seen.setdefault((table.domain, table.selector), n)
        if other != n:
            problems.append(
                f"{prefix}.selector: {table.selector} of {table.domain} is also dkim[{other}]'s"
            )
        tables.append(table)
    return tuple(tables)


def _read_routes(raw_routes: object, problems: list[str], base: Path) -> dict[str, RouteConfig]:
    """The ``[routes.NAME]`` tables, each checked on its own and against
    the others (a domain or a sender belongs to one route; a next hop may
    serve several, each with its own settings)."""
    routes: dict[str, RouteConfig] = {}
    if not isinstance(raw_routes, dict):
        problems.append("routes: expected tables [routes.NAME]")
        return routes
    domain_owner: dict[str, str] = {}
    sender_owner: dict[str, str] = {}
    for name, body in raw_routes.items():
        route = _read_table(
            RouteConfig, body, f"routes.{name}", problems, base, given={"name": name}
        )
        hops_given = isinstance(body, dict) and body.get("next_hops", []) != []
        if not route.mx and not hops_given:
            problems.append(f"routes.{name}.next_hops: required unless mx = true")
        if route.auth_file is not None and route.tls == "none":
            problems.append(
                f"routes.{name}.auth_file: credentials are only sent over TLS; "
                "set tls to opportunistic or required"
            )
        if route.mx and route.next_hops:
            problems.append(f"routes.{name}: give next_hops or mx = true, not both")
        if route.tls_policy != "none" and not route.mx:
            problems.append(
                f"routes.{name}.tls_policy: only for mx = true routes (MTA-STS and DANE "
                "are the recipient domain's rules for its MX hosts); for a fixed next hop "
                'use tls = "required" and verify_certificates'
            )
        if route.mx and route.senders:
            problems.append(f"routes.{name}.senders: not on an mx = true route; give it next_hops")
        for domain in route.domains:
            other = domain_owner.setdefault(domain, name)
            if other != name:
                problems.append(
                    f"routes.{name}.domains: {domain} is also a domain of route {other}"
                )
        for sender in route.senders:
            other = sender_owner.setdefault(sender, name)
            if other != name:
                problems.append(
                    f"routes.{name}.senders: {sender} is also a sender of route {other}"
                )
        routes[name] = route
    return routes


DEFAULT_CONTROL_SOCKET = Path("/run/spoold/spoold.sock")
DEFAULT_SUBMISSION_SOCKET = DEFAULT_CONTROL_SOCKET.parent / SUBMISSION_SOCKET_NAME
_TABLE_LINE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")
_STRING_KEY = re.compile(
    r"""^\s*(socket|submission_socket|dir)\s*=\s*(?:"([^"\\]*)"|'([^']*)')\s*(#.*)?$"""
)
_SOCKET_KEYS = (("control", "socket"), ("control", "submission_socket"), ("spool", "dir"))


def _scan_socket_keys(path: Path) -> dict[str, str] | None:
    """``control.socket``, ``control.submission_socket`` and ``spool.dir``
    of the file at ``path``, those it sets (a line-by-line scan when the
    TOML does not parse); None when the file cannot be read."""
    try:
        text = path.read_text("utf-8", errors="replace")
    except OSError:
        return None
    found: dict[str, str] = {}
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        table = ""
        for line in text.splitlines():
            header = _TABLE_LINE.match(line)
            if header:
                table = header.group(1)
                continue
            m = _STRING_KEY.match(line)
            if m and (table, m.group(1)) in _SOCKET_KEYS:
                found.setdefault(f"{table}.{m.group(1)}", m.group(2) or m.group(3) or "")
    else:
        for table, key in _SOCKET_KEYS:
            section = raw.get(table)
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, str):
                found[f"{table}.{key}"] = value
    return found


def find_control_socket(path: str | os.PathLike[str]) -> Path:
    """Where the daemon of the config at ``path`` listens, even when the
    file as a whole is not valid (so an operator can still reach the daemon,
    and ``reload`` can show its refusal): ``[control] socket``, else
    ``SPOOL/control.sock`` from ``[spool] dir``, read with a tolerant
    line-by-line scan when the TOML does not parse; else
    :data:`DEFAULT_CONTROL_SOCKET`. Relative paths are resolved against the
    file's directory, as always."""
    p = Path(path).absolute()
    found = _scan_socket_keys(p) or {}
    if found.get("control.socket"):
        return Path(os.path.normpath(p.parent / found["control.socket"]))
    if found.get("spool.dir"):
        return Path(os.path.normpath(p.parent / found["spool.dir"] / "control.sock"))
    return DEFAULT_CONTROL_SOCKET


def find_submission_socket(path: str | os.PathLike[str]) -> Path:
    """Where the daemon of the config at ``path`` takes submissions, found
    as :func:`find_control_socket` finds the admin socket:
    ``[control] submission_socket``, else :data:`SUBMISSION_SOCKET_NAME`
    beside the admin socket. A file this user may not read (the usual case
    for a user who is not an admin: /etc/spoold is 0750) or that does not
    exist gives :data:`DEFAULT_SUBMISSION_SOCKET`."""
    p = Path(path).absolute()
    found = _scan_socket_keys(p)
    if found is None:
        return DEFAULT_SUBMISSION_SOCKET
    if found.get("control.submission_socket"):
        return Path(os.path.normpath(p.parent / found["control.submission_socket"]))
    return find_control_socket(p).parent / SUBMISSION_SOCKET_NAME


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the file at ``path``; raise :class:`ConfigError`."""
    p = Path(path).absolute()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read: {exc.strerror}"]) from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), [f"not valid TOML: {exc}"]) from None
    return parse_config(raw, p)
