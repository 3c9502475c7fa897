"""The daemon's configuration: one TOML file, read into frozen values.

:func:`load_config` reads and validates the whole file before anything uses
it and raises :class:`ConfigError` listing every problem found, each naming
its key (``spool.max_concurrent_send_jobs: expected an integer >= 1, got
'ten'``). Unknown keys are errors. Relative paths are resolved against the
directory of the file. Spans are ``"30s"``, ``"5m"``, ``"2h"``, ``"1d"``
(or a number of seconds); sizes are ``"32MiB"``, ``"500KB"`` (or bytes).

A reload builds a new :class:`Config` and the daemon swaps it in one step;
:func:`restart_needed` names the settings that a reload cannot change.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar, cast, get_args

from spoold import connection_cache as _cache
from spoold import limits as _limits
from spoold import spool as _spool
from spoold.body import LineEndingPolicy
from spoold.connection_cache import TlsMode
from spoold.errors import (
    ConfigError,
)
from spoold.hops import parse_hop
from spoold.hostname import check_hostname, local_hostname
from spoold.limits import Rate, parse_rate
from spoold.outcome import DeliveryPolicy, OnPermanentFailure, RetriesExhausted
from spoold.store import SyncMode
from spoold.times import parse_size, parse_span

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


DEFAULT_LISTEN = ("127.0.0.1:2525",)
DEFAULT_RELAY_NETWORKS = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    dir: Path
    max_concurrent_send_jobs: int = _spool.DEFAULT_MAX_CONCURRENT_SEND_JOBS
    retry_intervals: tuple[timedelta, ...] = _spool.DEFAULT_RETRY_SPANS
    retry_jitter: float = _spool.DEFAULT_RETRY_JITTER
    flush_timeout: timedelta = timedelta(seconds=_spool.DEFAULT_FLUSH_TIMEOUT)
    min_free_space: int = _spool.DEFAULT_MIN_FREE_SPACE
    sync: SyncMode = _spool.DEFAULT_SYNC
    max_queue_lifetime: timedelta = _spool.DEFAULT_MAX_QUEUE_LIFETIME
    on_permanent_failure: OnPermanentFailure = OnPermanentFailure.FREEZE
    retries_exhausted: RetriesExhausted = DeliveryPolicy().retries_exhausted
    delay_warning: timedelta | None = None  # None: off
    after_crash: _spool.AfterCrash = _spool.DEFAULT_AFTER_CRASH
    removed_retention: timedelta = _spool.DEFAULT_REMOVED_RETENTION
    history_retention: timedelta = _spool.DEFAULT_HISTORY_RETENTION
    idempotency_window: timedelta = _spool.DEFAULT_IDEMPOTENCY_WINDOW


SUBMISSION_SOCKET_NAME = "submit.sock"  # the submission socket's default name, beside the admin one


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The admin socket (``socket``, ``mode``: every operation) and the
    submission socket (``submission_*``: only ``submit``, ``wait`` and
    ``ping``). ``submission_socket`` None: :data:`SUBMISSION_SOCKET_NAME`
    beside the admin socket (see :attr:`submission_path`);
    ``submission_group`` "": the socket keeps the daemon's own group."""

    socket: Path
    mode: int = 0o660
    submission_socket: Path | None = None
    submission_mode: int = 0o666  # any local user may submit, as with Postfix's postdrop
    submission_group: str = ""

    @property
    def submission_path(self) -> Path:
        return self.submission_socket or self.socket.parent / SUBMISSION_SOCKET_NAME


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    listen: tuple[str, ...] = DEFAULT_LISTEN
    max_message_size: int = 32 * 1024 * 1024
    max_recipients: int = 100
    max_connections: int = 100
    max_line_length: int = 998
    bare_line_endings: LineEndingPolicy = LineEndingPolicy.REJECT
    relay_networks: tuple[str, ...] = DEFAULT_RELAY_NETWORKS
    tls_cert: Path | None = None  # with tls_key: offer STARTTLS
    tls_key: Path | None = None
    require_tls: bool = False  # refuse MAIL before STARTTLS
    auth_file: Path | None = None  # "user:password" lines, mode 0600: offer AUTH
    max_connections_per_client: int = 10  # per client IP address
    limit_relay_networks: bool = False  # relay_networks held to the per-client limit too
    timeout: timedelta = timedelta(minutes=5)  # idle wait for a command or DATA content
    max_junk_commands: int = 100  # NOOP, RSET, errors...: past it, 421 and close
    max_auth_failures: int = 3  # failed AUTH on one connection: then 421 and close
    auth_failure_delay: timedelta = timedelta(seconds=1)  # before the first 535; doubles
    max_auth_failures_per_client: int = 10  # failed AUTH of one address in the window
    auth_failure_window: timedelta = timedelta(minutes=15)
    workers: int = 0  # ingest processes sharing the listening sockets; 0: one per CPU
    deduplicate: str = ""  # "message-id": sender + Message-ID + recipients is a key


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = ""


@dataclass(frozen=True, slots=True)
class HooksConfig:
    presend: str = ""
    on_error: str = ""


@dataclass(frozen=True, slots=True)
class RelayConfig:
    default_route: str = ""
    connect_timeout: timedelta = timedelta(seconds=_cache.DEFAULT_CONNECT_TIMEOUT)
    command_timeout: timedelta = timedelta(seconds=_cache.DEFAULT_COMMAND_TIMEOUT)
    message_timeout: timedelta = timedelta(seconds=_cache.DEFAULT_MESSAGE_TIMEOUT)
    final_reply_timeout: timedelta = timedelta(seconds=_cache.DEFAULT_FINAL_REPLY_TIMEOUT)
    max_connections_per_hop: int = _cache.DEFAULT_MAX_PER_HOP
    max_connections: int = _cache.DEFAULT_MAX_TOTAL
    idle_timeout: timedelta = timedelta(seconds=_cache.DEFAULT_IDLE_TIMEOUT)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    domains: tuple[str, ...] = ()
    next_hops: tuple[str, ...] = ()
    mx: bool = False
    tls: TlsMode = "opportunistic"
    verify_certificates: bool = True
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    auth_file: Path | None = None
    retry_intervals: tuple[timedelta, ...] | None = None
    max_queue_lifetime: timedelta | None = None  # None: spool.max_queue_lifetime
    retries_exhausted: RetriesExhausted | None = None  # None: spool.retries_exhausted
    max_connections: int = _limits.DEFAULT_MAX_CONNECTIONS  # attempts at once
    rate: Rate | None = None  # attempts per span ("50/s"); None: unlimited
    helo_name: str = ""  # the EHLO name to this route's hops; "": the top-level hostname


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
    # The name spoold gives itself (banner, Received:, EHLO, Message-ID,
    # Reporting-MTA); default: the machine's (spoold.hostname).
    hostname: str = field(default_factory=local_hostname)


def delivery_policy(config: Config) -> DeliveryPolicy:
    """The spool's delivery policy (lifetime, retries exhausted, bounce,
    delay warning)."""
    return DeliveryPolicy(
        max_queue_lifetime=config.spool.max_queue_lifetime,
        on_permanent_failure=config.spool.on_permanent_failure,
        delay_warning=config.spool.delay_warning,
        retries_exhausted=config.spool.retries_exhausted,
    )


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
    return changed


# ------------------------------------------------------------ the reader


class _Table:
    """Reads one TOML table, collecting problems instead of stopping. A key
    that is absent (or wrong) takes its value from ``defaults``, an instance
    of the table's dataclass: defaults are written there, and only there."""

    def __init__(
        self, raw: object, prefix: str, problems: list[str], base: Path, defaults: object = None
    ) -> None:
        self.defaults = defaults
        self.prefix = prefix
        self.problems = problems
        self.base = base
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            problems.append(f"{prefix}: expected a table")
            raw = {}
        self.raw: dict[str, Any] = raw
        self.seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def get(self, key: str, convert: Callable[[object], _T]) -> _T:
        self.seen.add(key)
        if key in self.raw:
            try:
                return convert(self.raw[key])
            except (ValueError, TypeError) as exc:
                self.problems.append(f"{self._key(key)}: {exc}")
        default: _T = getattr(self.defaults, key)  # read only when needed
        return default

    def require(self, key: str, convert: Callable[[object], _T]) -> _T:
        if key not in self.raw:
            self.seen.add(key)
            self.problems.append(f"{self._key(key)}: required")
            default: _T = getattr(self.defaults, key)
            return default
        return self.get(key, convert)

    def done(self) -> None:
        for key in sorted(set(self.raw) - self.seen):
            self.problems.append(f"{self._key(key)}: unknown key")


def _int(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    def convert(v: object) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"expected an integer >= {minimum}, got {v!r}")
        if maximum is not None and v > maximum:
            raise ValueError(f"expected an integer <= {maximum}, got {v!r}")
        return v

    return convert


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _choice(*choices: str) -> Callable[[object], str]:
    def convert(v: object) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {v!r}")
        return str(v)

    return convert


_E = TypeVar("_E", bound=StrEnum)


def _enum(kind: type[_E]) -> Callable[[object], _E]:
    def convert(v: object) -> _E:
        for member in kind:
            if v == member.value:
                return member
        choices = ", ".join(e.value for e in kind)
        raise ValueError(f"expected one of {choices}, got {v!r}")

    return convert


def _optional_enum(kind: type[_E]) -> Callable[[object], _E | None]:
    """One of ``kind``'s values, or ``""`` for none."""
    convert = _enum(kind)

    def optional(v: object) -> _E | None:
        if v == "":
            return None
        try:
            return convert(v)
        except ValueError:
            choices = ", ".join(e.value for e in kind)
            raise ValueError(f'expected one of {choices} or "", got {v!r}') from None

    return optional


def _tls_mode(v: object) -> TlsMode:
    for mode in get_args(TlsMode):
        if v == mode:
            return cast(TlsMode, mode)
    raise ValueError(f"expected one of {', '.join(get_args(TlsMode))}, got {v!r}")


def _sync_mode(v: object) -> SyncMode:
    for mode in get_args(SyncMode):
        if v == mode:
            return cast(SyncMode, mode)
    raise ValueError(f"expected one of {', '.join(get_args(SyncMode))}, got {v!r}")


def _fraction(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
        raise ValueError(f"expected a number from 0 to 1, got {v!r}")
    return float(v)


def _list(item: Callable[[object], _T]) -> Callable[[object], tuple[_T, ...]]:
    def convert(v: object) -> tuple[_T, ...]:
        if not isinstance(v, list):
            raise ValueError(f"expected a list, got {v!r}")
        return tuple(item(x) for x in v)

    return convert


def _hop(v: object) -> str:

    hop = _str(v)
    parse_hop(hop)
    return hop


def _listen_address(v: object) -> str:
    address = _str(v)
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected 'address:port', got {v!r}")
    return address


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


def _after_crash(v: object) -> _spool.AfterCrash:
    for mode in get_args(_spool.AfterCrash):
        if v == mode:
            return cast(_spool.AfterCrash, mode)
    raise ValueError(f"expected one of {', '.join(get_args(_spool.AfterCrash))}, got {v!r}")


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


class _TopLevel:
    """The defaults of the keys outside any table."""

    @property
    def hostname(self) -> str:
        return local_hostname()  # looked up only when the key is left out


def _hostname(v: object) -> str:
    return check_hostname(_str(v).strip())


def _optional_hostname(v: object) -> str:
    """A host name, or ``""`` for the default."""
    text = _str(v).strip()
    return check_hostname(text) if text else ""


def parse_config(raw: dict[str, Any], path: Path) -> Config:
    """Validate a decoded TOML document; raise :class:`ConfigError`."""
    problems: list[str] = []
    base = path.parent

    def resolve(v: object) -> Path:
        text = _str(v)
        if not text:
            raise ValueError("expected a path")
        return Path(os.path.normpath(base / text))

    def optional_path(v: object) -> Path | None:
        return resolve(v) if _str(v) else None

    top = _Table(raw, "", problems, base, _TopLevel())
    hostname = top.get("hostname", _hostname)
    for key in ("spool", "control", "smtp", "log", "metrics", "hooks", "relay", "routes"):
        top.seen.add(key)
    top.done()

    t = _Table(raw.get("spool"), "spool", problems, base, SpoolConfig(dir=base / "spool"))
    spool_dir = t.require("dir", resolve)
    spool = SpoolConfig(
        dir=spool_dir,
        max_concurrent_send_jobs=t.get("max_concurrent_send_jobs", _int(1, 100_000)),
        retry_intervals=t.get("retry_intervals", _list(parse_span)),
        retry_jitter=t.get("retry_jitter", _fraction),
        flush_timeout=t.get("flush_timeout", parse_span),
        min_free_space=t.get("min_free_space", parse_size),
        sync=t.get("sync", _sync_mode),
        max_queue_lifetime=t.get("max_queue_lifetime", _positive_span),
        on_permanent_failure=t.get("on_permanent_failure", _enum(OnPermanentFailure)),
        retries_exhausted=t.get("retries_exhausted", _enum(RetriesExhausted)),
        delay_warning=t.get("delay_warning", _optional_span),
        after_crash=t.get("after_crash", _after_crash),
        removed_retention=t.get("removed_retention", _positive_span),
        history_retention=t.get("history_retention", _positive_span),
        idempotency_window=t.get("idempotency_window", _positive_span),
    )
    t.done()
    if spool.delay_warning is not None and spool.delay_warning >= spool.max_queue_lifetime:
        problems.append(
            "spool.delay_warning: must be shorter than spool.max_queue_lifetime "
            "(the message would fail before the warning)"
        )

    t = _Table(
        raw.get("control"),
        "control",
        problems,
        base,
        ControlConfig(socket=spool_dir / "control.sock"),
    )
    submission_group = t.get("submission_group", _group)
    submission_mode = t.get("submission_mode", _submission_mode)
    if submission_group and "submission_mode" not in t.raw:
        submission_mode = 0o660  # restricted to a group: others get nothing by default
    control = ControlConfig(
        socket=t.get("socket", resolve),
        mode=t.get("mode", _mode),
        submission_socket=t.get("submission_socket", optional_path),
        submission_mode=submission_mode,
        submission_group=submission_group,
    )
    t.done()
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
        t = _Table(raw.get("smtp"), "smtp", problems, base, SmtpConfig())
        smtp = SmtpConfig(
            listen=t.get("listen", _list(_listen_address)),
            max_message_size=t.get("max_message_size", parse_size),
            max_recipients=t.get("max_recipients", _int(1)),
            max_connections=t.get("max_connections", _int(1)),
            max_line_length=t.get("max_line_length", _int(78)),
            bare_line_endings=t.get("bare_line_endings", _enum(LineEndingPolicy)),
            relay_networks=t.get("relay_networks", _list(_network)),
            tls_cert=t.get("tls_cert", optional_path),
            tls_key=t.get("tls_key", optional_path),
            require_tls=t.get("require_tls", _bool),
            auth_file=t.get("auth_file", optional_path),
            max_connections_per_client=t.get("max_connections_per_client", _int(1)),
            limit_relay_networks=t.get("limit_relay_networks", _bool),
            timeout=t.get("timeout", _positive_span),
            max_junk_commands=t.get("max_junk_commands", _int(1)),
            max_auth_failures=t.get("max_auth_failures", _int(1)),
            auth_failure_delay=t.get("auth_failure_delay", parse_span),
            max_auth_failures_per_client=t.get("max_auth_failures_per_client", _int(1)),
            auth_failure_window=t.get("auth_failure_window", _positive_span),
            workers=t.get("workers", _int(0, 256)),
            deduplicate=t.get("deduplicate", _deduplicate),
        )
        t.done()
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

    t = _Table(raw.get("log"), "log", problems, base, LogConfig())
    log = LogConfig(
        format=t.get("format", _choice("auto", "json", "console")),
        level=t.get("level", _choice("debug", "info", "warning", "error")),
    )
    t.done()

    t = _Table(raw.get("metrics"), "metrics", problems, base, MetricsConfig())
    metrics_listen = t.get("listen", _str)
    if metrics_listen:
        try:
            _listen_address(metrics_listen)
        except ValueError as exc:
            problems.append(f"metrics.listen: {exc}")
    metrics = MetricsConfig(listen=metrics_listen)
    t.done()

    t = _Table(raw.get("hooks"), "hooks", problems, base, HooksConfig())
    hooks = HooksConfig(presend=t.get("presend", _hook), on_error=t.get("on_error", _hook))
    t.done()

    t = _Table(raw.get("relay"), "relay", problems, base, RelayConfig())
    relay = RelayConfig(
        default_route=t.get("default_route", _str),
        connect_timeout=t.get("connect_timeout", parse_span),
        command_timeout=t.get("command_timeout", parse_span),
        message_timeout=t.get("message_timeout", parse_span),
        final_reply_timeout=t.get("final_reply_timeout", _positive_span),
        max_connections_per_hop=t.get("max_connections_per_hop", _int(1)),
        max_connections=t.get("max_connections", _int(1)),
        idle_timeout=t.get("idle_timeout", parse_span),
    )
    t.done()

    routes: dict[str, RouteConfig] = {}
    raw_routes = raw.get("routes", {})
    if not isinstance(raw_routes, dict):
        problems.append("routes: expected tables [routes.NAME]")
        raw_routes = {}
    hop_owner: dict[str, str] = {}
    domain_owner: dict[str, str] = {}
    for name, body in raw_routes.items():
        t = _Table(body, f"routes.{name}", problems, base, RouteConfig(name=name))
        route = RouteConfig(
            name=name,
            domains=t.get("domains", _list(_domain)),
            next_hops=t.get("next_hops", _list(_hop)),
            mx=t.get("mx", _bool),
            tls=t.get("tls", _tls_mode),
            verify_certificates=t.get("verify_certificates", _bool),
            ca_file=t.get("ca_file", optional_path),
            client_cert=t.get("client_cert", optional_path),
            client_key=t.get("client_key", optional_path),
            auth_file=t.get("auth_file", optional_path),
            retry_intervals=t.get("retry_intervals", _list(parse_span)),
            max_queue_lifetime=t.get("max_queue_lifetime", _optional_span),
            retries_exhausted=t.get("retries_exhausted", _optional_enum(RetriesExhausted)),
            max_connections=t.get("max_connections", _int(1, 10_000)),
            rate=t.get("rate", parse_rate),
            helo_name=t.get("helo_name", _optional_hostname),
        )
        t.done()
        if not route.mx and ("next_hops" not in t.raw or t.raw["next_hops"] == []):
            problems.append(f"routes.{name}.next_hops: required unless mx = true")
        if route.auth_file is not None and route.tls == "none":
            problems.append(
                f"routes.{name}.auth_file: credentials are only sent over TLS; "
                "set tls to opportunistic or required"
            )
        if route.mx and route.next_hops:
            problems.append(f"routes.{name}: give next_hops or mx = true, not both")
        for hop in route.next_hops:
            other = hop_owner.setdefault(hop, name)
            if other != name:
                problems.append(
                    f"routes.{name}.next_hops: {hop} is also a next hop of route {other}; "
                    "a hop belongs to one route"
                )
        for domain in route.domains:
            other = domain_owner.setdefault(domain, name)
            if other != name:
                problems.append(
                    f"routes.{name}.domains: {domain} is also a domain of route {other}"
                )
        routes[name] = route

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
        hostname=hostname,
    )


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
