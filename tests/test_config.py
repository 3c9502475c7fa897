"""The configuration contract (DESIGN.md §6): the sample file, every kind of
bad file and the exact problems reported, spans and sizes, and which
changes a reload cannot apply."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.config import (
    DEFAULT_LISTEN,
    Config,
    RouteConfig,
    SmtpConfig,
    delivery_policy,
    load_config,
    parse_config,
    restart_needed,
    route_lifetimes,
    route_retries_exhausted,
)
from spoold.daemon.routing import Router
from spoold.errors import (
    ConfigError,
    SpooldError,
)
from spoold.limits import DEFAULT_MAX_CONNECTIONS, DestinationLimits, Rate
from spoold.outcome import DeliveryPolicy, OnPermanentFailure, RetriesExhausted
from spoold.spool import DEFAULT_RETRY_SPANS
from spoold.times import format_span, parse_size, parse_span
from tests.factories import make_message
from tests.support import ARABIC_TEN, SUPERSCRIPT_TWO

REPO = Path(__file__).absolute().parent.parent
SAMPLE = REPO / "config" / "spoold.toml"

# ------------------------------------------------------------ good files


def test_sample_config_loads_and_resolves_paths_against_its_directory() -> None:
    cfg = load_config(SAMPLE)

    assert cfg.path == SAMPLE
    assert cfg.spool.dir == REPO / "var" / "spool"
    assert ".." not in cfg.spool.dir.parts
    assert cfg.control.socket == REPO / "var" / "run" / "spoold.sock"
    assert ".." not in cfg.control.socket.parts
    assert cfg.control.mode == 0o660
    assert cfg.spool.max_concurrent_send_jobs == 64
    assert cfg.spool.retry_intervals == DEFAULT_RETRY_SPANS
    assert cfg.spool.retry_jitter == 0.1
    assert cfg.spool.flush_timeout == timedelta(seconds=30)
    assert cfg.smtp == SmtpConfig()  # on, at 127.0.0.1:2525, every limit at its default
    assert cfg.log.format == "auto"
    assert cfg.log.level == "info"
    assert cfg.metrics.listen == ""
    assert cfg.hooks.presend == ""
    assert cfg.hooks.on_error == ""
    assert cfg.relay.default_route == "smarthost"
    assert cfg.relay.connect_timeout == timedelta(seconds=30)
    assert cfg.relay.command_timeout == timedelta(minutes=5)
    assert cfg.relay.message_timeout == timedelta(minutes=10)
    assert cfg.relay.idle_timeout == timedelta(seconds=30)
    assert cfg.routes == {
        "smarthost": RouteConfig(
            name="smarthost",
            next_hops=("127.0.0.1:25",),
            tls="opportunistic",
            verify_certificates=True,
            auth_file=None,  # "" means no auth file
            max_connections=10,  # set (counted fleet-wide with [fleet])
        )
    }


def test_relative_path_given_to_load_config_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "spoold.toml").write_text('[spool]\ndir = "../spool/./x/.."\n')
    monkeypatch.chdir(tmp_path)

    cfg = load_config("etc/spoold.toml")

    assert cfg.path == tmp_path / "etc" / "spoold.toml"
    assert cfg.spool.dir == tmp_path / "spool"
    # the control socket defaults to a file in the spool directory
    assert cfg.control.socket == tmp_path / "spool" / "control.sock"


DESIGN_EXAMPLE = """
[spool]
dir = "../var/spool"
max_concurrent_send_jobs = 64
retry_intervals = ["1m", "5m", "15m", "1h", "2h", "4h", "8h"]
retry_jitter = 0.1

[control]
socket = "../var/run/spoold.sock"
mode = "0660"

[smtp]
listen = ["127.0.0.1:2525"]
max_message_size = "32MiB"
max_recipients = 100
bare_line_endings = "reject"
relay_networks = ["127.0.0.0/8", "::1/128"]

[log]
format = "auto"
level = "info"

[metrics]
listen = ""

[hooks]
presend = ""
on_error = ""

[relay]
default_route = "smarthost"
connect_timeout = "30s"
command_timeout = "5m"

[routes.smarthost]
next_hops = ["127.0.0.1:25"]
tls = "opportunistic"
verify_certificates = true
auth_file = ""

[routes.partners]
domains = ["example.com", ".example.org"]
next_hops = ["mx1.example.com:25", "mx2.example.com:25"]
"""


def test_design_example_is_valid(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "spoold.toml"
    path.write_text(DESIGN_EXAMPLE)

    cfg = load_config(path)

    assert cfg.spool.dir == tmp_path / "var" / "spool"
    assert cfg.smtp is not None
    assert cfg.smtp.listen == ("127.0.0.1:2525",)
    assert cfg.smtp.max_message_size == 32 * 1024 * 1024
    assert cfg.smtp.relay_networks == ("127.0.0.0/8", "::1/128")
    assert list(cfg.routes) == ["smarthost", "partners"]
    assert cfg.routes["partners"].domains == ("example.com", ".example.org")
    assert cfg.routes["partners"].next_hops == ("mx1.example.com:25", "mx2.example.com:25")


def test_minimal_file_gets_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "spoold.toml"
    path.write_text(
        '[spool]\ndir = "/srv/spool"\n\n[smtp]\n\n[relay]\ndefault_route = "r"\n'
        "\n[routes.r]\nmx = true\n"
    )

    cfg = load_config(path)

    assert cfg.spool.dir == Path("/srv/spool")  # absolute paths stay as given
    assert cfg.spool.max_concurrent_send_jobs == 64
    assert cfg.smtp is not None
    assert cfg.smtp.listen == DEFAULT_LISTEN
    assert cfg.smtp.bare_line_endings == "reject"
    assert cfg.smtp.max_line_length == 998
    assert cfg.smtp.max_connections_per_client == 10
    assert cfg.smtp.limit_relay_networks is False  # relay_networks: not held to it
    assert cfg.smtp.timeout == timedelta(minutes=5)
    assert cfg.smtp.max_junk_commands == 100
    assert cfg.smtp.max_auth_failures == 3
    assert cfg.smtp.auth_failure_delay == timedelta(seconds=1)
    assert cfg.routes["r"].mx is True
    assert cfg.routes["r"].next_hops == ()
    assert cfg.routes["r"].retry_intervals is None


def test_route_paths_and_values_are_converted(tmp_path: Path) -> None:
    path = tmp_path / "spoold.toml"
    path.write_text(
        """
[spool]
dir = "spool"
max_concurrent_send_jobs = 8
retry_intervals = ["30s", 90, "1.5h"]
retry_jitter = 0

[control]
mode = 0o600

[relay]
default_route = "secure"

[routes.secure]
domains = ["Example.COM", " .Example.org "]
next_hops = ["[2001:db8::1]:587", "relay.example.net"]
tls = "required"
verify_certificates = false
ca_file = "tls/ca.pem"
client_cert = "/etc/ssl/client.pem"
client_key = ""
retry_intervals = ["1m"]
"""
    )

    cfg = load_config(path)

    assert cfg.spool.max_concurrent_send_jobs == 8
    assert cfg.spool.retry_intervals == (
        timedelta(seconds=30),
        timedelta(seconds=90),
        timedelta(minutes=90),
    )
    assert cfg.spool.retry_jitter == 0.0
    assert cfg.control.mode == 0o600
    route = cfg.routes["secure"]
    assert route.domains == ("example.com", ".example.org")  # lower-cased, stripped
    assert route.next_hops == ("[2001:db8::1]:587", "relay.example.net")
    assert route.tls == "required"
    assert route.verify_certificates is False
    assert route.ca_file == tmp_path / "tls" / "ca.pem"
    assert route.client_cert == Path("/etc/ssl/client.pem")
    assert route.client_key is None
    assert route.retry_intervals == (timedelta(minutes=1),)


def test_route_senders_are_read_and_a_hop_may_serve_several_routes(tmp_path: Path) -> None:
    path = tmp_path / "spoold.toml"
    path.write_text(
        """
[spool]
dir = "spool"

[relay]
default_route = "smarthost"

[routes.smarthost]
next_hops = ["relay.example.net:587"]

[routes.billing]
senders = ["Billing@Example.ORG", " @Example.net "]
next_hops = ["relay.example.net:587"]
auth_file = "billing.auth"
"""
    )

    cfg = load_config(path)

    assert cfg.routes["smarthost"].senders == ()
    # the local part as written, the domain lower-cased, stripped
    assert cfg.routes["billing"].senders == ("Billing@example.org", "@example.net")
    assert cfg.routes["billing"].next_hops == cfg.routes["smarthost"].next_hops


# ------------------------------------------------------------ bad files

BASE = '[spool]\ndir = "spool"\n'
ROUTED = '\n[relay]\ndefault_route = "smarthost"\n\n[routes.smarthost]\nnext_hops = ["h0:25"]\n'


def _smtp(body: str) -> str:
    """A valid file with [smtp] on, plus ``body`` in the [smtp] table."""
    return BASE + "\n[smtp]\n" + body + ROUTED


def _toml_error(text: str) -> str:
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return str(exc)
    raise AssertionError(f"{text!r} is valid TOML")


NOT_TOML = "[spool\ndir = 'x'\n"
SPAN_ERROR = "expected a span like '30s', '5m', '2h' or '1d', got"

BAD_FILES: list[tuple[str, str, list[str]]] = [
    ("not TOML", NOT_TOML, [f"not valid TOML: {_toml_error(NOT_TOML)}"]),
    ("unknown top-level key", 'colour = "blue"\n' + BASE, ["colour: unknown key"]),
    (
        "unknown keys in tables, sorted",
        BASE + 'spool_dir = "x"\n[log]\nlevel = "info"\ncolour = 1\nzebra = 2\n',
        ["spool.spool_dir: unknown key", "log.colour: unknown key", "log.zebra: unknown key"],
    ),
    (
        "unknown key in a route",
        BASE + '[routes.a]\nnext_hops = ["h:25"]\nport = 25\n',
        ["routes.a.port: unknown key"],
    ),
    ("empty file", "", ["spool.dir: required"]),
    ("spool.dir missing", "[spool]\nmax_concurrent_send_jobs = 4\n", ["spool.dir: required"]),
    ("spool.dir empty", '[spool]\ndir = ""\n', ["spool.dir: expected a path"]),
    ("spool.dir not a string", "[spool]\ndir = 5\n", ["spool.dir: expected a string, got 5"]),
    ("spool not a table", 'spool = "x"\n', ["spool: expected a table", "spool.dir: required"]),
    (
        "concurrency 0",
        BASE + "max_concurrent_send_jobs = 0\n",
        ["spool.max_concurrent_send_jobs: expected an integer >= 1, got 0"],
    ),
    (
        "concurrency 'ten'",
        BASE + 'max_concurrent_send_jobs = "ten"\n',
        ["spool.max_concurrent_send_jobs: expected an integer >= 1, got 'ten'"],
    ),
    (
        "concurrency true",
        BASE + "max_concurrent_send_jobs = true\n",
        ["spool.max_concurrent_send_jobs: expected an integer >= 1, got True"],
    ),
    (
        "concurrency too large",
        BASE + "max_concurrent_send_jobs = 100001\n",
        ["spool.max_concurrent_send_jobs: expected an integer <= 100000, got 100001"],
    ),
    (
        "retry_intervals with a bad span",
        BASE + 'retry_intervals = ["1m", "5 minutes", "1h"]\n',
        [f"spool.retry_intervals: {SPAN_ERROR} '5 minutes'"],
    ),
    (
        "retry_intervals not a list",
        BASE + 'retry_intervals = "1m"\n',
        ["spool.retry_intervals: expected a list, got '1m'"],
    ),
    (
        "retry_jitter 2",
        BASE + "retry_jitter = 2\n",
        ["spool.retry_jitter: expected a number from 0 to 1, got 2"],
    ),
    (
        "flush_timeout negative",
        BASE + 'flush_timeout = "-1s"\n',
        [f"spool.flush_timeout: {SPAN_ERROR} '-1s'"],
    ),
    (
        "control.mode open to others",
        BASE + '[control]\nmode = "0666"\n',
        ["control.mode: the control socket must not be open to others, got 0666"],
    ),
    (
        "control.mode not octal",
        BASE + '[control]\nmode = "abc"\n',
        ["control.mode: expected an octal mode like '0660', got 'abc'"],
    ),
    (
        "control.mode as an integer open to others",
        BASE + "[control]\nmode = 0o604\n",
        ["control.mode: the control socket must not be open to others, got 0604"],
    ),
    (
        "smtp.listen without a port",
        _smtp('listen = ["127.0.0.1:2525", "localhost"]\n'),
        ["smtp.listen: expected 'address:port', got 'localhost'"],
    ),
    (
        "smtp.listen port out of range",
        _smtp('listen = ["127.0.0.1:65536"]\n'),
        ["smtp.listen: expected 'address:port', got '127.0.0.1:65536'"],
    ),
    (
        "smtp.max_message_size '32 lots'",
        _smtp('max_message_size = "32 lots"\n'),
        ["smtp.max_message_size: expected a size like '32MiB' or a number of bytes, got '32 lots'"],
    ),
    (
        "smtp.bare_line_endings 'keep'",
        _smtp('bare_line_endings = "keep"\n'),
        ["smtp.bare_line_endings: expected one of reject, normalize, got 'keep'"],
    ),
    (
        "smtp.relay_networks bad network",
        _smtp('relay_networks = ["127.0.0.0/8", "10.0.0.0/33"]\n'),
        ["smtp.relay_networks: expected a network like '127.0.0.0/8', got '10.0.0.0/33'"],
    ),
    (
        "smtp.max_line_length too small",
        _smtp("max_line_length = 77\n"),
        ["smtp.max_line_length: expected an integer >= 78, got 77"],
    ),
    ("smtp unknown key", _smtp("tls = true\n"), ["smtp.tls: unknown key"]),
    (
        "smtp.max_connections_per_client 0",
        _smtp("max_connections_per_client = 0\n"),
        ["smtp.max_connections_per_client: expected an integer >= 1, got 0"],
    ),
    (
        "smtp.limit_relay_networks not a boolean",
        _smtp('limit_relay_networks = "yes"\n'),
        ["smtp.limit_relay_networks: expected true or false, got 'yes'"],
    ),
    ("smtp.timeout 0", _smtp('timeout = "0s"\n'), ["smtp.timeout: expected a span > 0, got '0s'"]),
    ("smtp.timeout bad", _smtp('timeout = "soon"\n'), [f"smtp.timeout: {SPAN_ERROR} 'soon'"]),
    (
        "smtp.max_junk_commands 0",
        _smtp("max_junk_commands = 0\n"),
        ["smtp.max_junk_commands: expected an integer >= 1, got 0"],
    ),
    (
        "smtp.max_auth_failures 0",
        _smtp("max_auth_failures = 0\n"),
        ["smtp.max_auth_failures: expected an integer >= 1, got 0"],
    ),
    (
        "smtp.auth_failure_delay bad",
        _smtp('auth_failure_delay = "a while"\n'),
        [f"smtp.auth_failure_delay: {SPAN_ERROR} 'a while'"],
    ),
    (
        "smtp.auth_file without TLS on a public address",
        _smtp('listen = ["127.0.0.1:25", "192.0.2.1:25"]\nauth_file = "users"\n'),
        [
            "smtp.auth_file: passwords would cross the network in clear; set "
            "smtp.tls_cert and smtp.tls_key, or listen on loopback addresses only"
        ],
    ),
    (
        "smtp.auth_file without TLS on a host name",
        _smtp('listen = ["localhost:25"]\nauth_file = "users"\n'),
        [
            "smtp.auth_file: passwords would cross the network in clear; set "
            "smtp.tls_cert and smtp.tls_key, or listen on loopback addresses only"
        ],
    ),
    (
        "log.format bad",
        BASE + '[log]\nformat = "xml"\n',
        ["log.format: expected one of auto, json, console, got 'xml'"],
    ),
    (
        "log.level bad",
        BASE + '[log]\nlevel = "verbose"\n',
        ["log.level: expected one of debug, info, warning, error, got 'verbose'"],
    ),
    (
        "metrics.listen without a port",
        BASE + '[metrics]\nlisten = "9469"\n',
        ["metrics.listen: expected 'address:port', got '9469'"],
    ),
    (
        "metrics.listen not a string",
        BASE + "[metrics]\nlisten = 9469\n",
        ["metrics.listen: expected a string, got 9469"],
    ),
    (
        "hooks.presend without a colon",
        BASE + '[hooks]\npresend = "nocolon"\n',
        ["hooks.presend: expected 'package.module:function', got 'nocolon'"],
    ),
    (
        "relay.default_route names no route",
        BASE + ROUTED.replace('"smarthost"\n', '"nowhere"\n', 1),
        ["relay.default_route: no route named 'nowhere' (routes: smarthost)"],
    ),
    (
        "relay.default_route with no routes at all",
        BASE + '[relay]\ndefault_route = "nowhere"\n',
        ["relay.default_route: no route named 'nowhere' (routes: none)"],
    ),
    (
        "[smtp] on without relay.default_route",
        BASE + "[smtp]\n",
        ["relay.default_route: required when [smtp] is on"],
    ),
    (
        "relay span bad",
        BASE + '[relay]\ncommand_timeout = "5 minutes"\n',
        [f"relay.command_timeout: {SPAN_ERROR} '5 minutes'"],
    ),
    (
        "route without next_hops and without mx",
        BASE + '[routes.a]\ndomains = ["example.com"]\n',
        ["routes.a.next_hops: required unless mx = true"],
    ),
    (
        "route with next_hops and mx",
        BASE + '[routes.a]\nnext_hops = ["h:25"]\nmx = true\n',
        ["routes.a: give next_hops or mx = true, not both"],
    ),
    (
        "a sender in two routes",
        BASE + '[routes.a]\nnext_hops = ["h:25"]\nsenders = ["billing@example.org"]\n'
        '[routes.b]\nnext_hops = ["h:25"]\nsenders = ["billing@EXAMPLE.org"]\n',
        ["routes.b.senders: billing@example.org is also a sender of route a"],
    ),
    (
        "a sender's domain in two routes",
        BASE + '[routes.a]\nnext_hops = ["h:25"]\nsenders = ["@example.net"]\n'
        '[routes.b]\nnext_hops = ["h:25"]\nsenders = ["@example.net"]\n',
        ["routes.b.senders: @example.net is also a sender of route a"],
    ),
    (
        "a sender without a domain",
        BASE + '[routes.a]\nnext_hops = ["h:25"]\nsenders = ["billing"]\n',
        [
            "routes.a.senders: expected an address like 'billing@example.org' or"
            " '@example.org', got 'billing'"
        ],
    ),
    (
        "a sender with a bad domain",
        BASE + '[routes.a]\nnext_hops = ["h:25"]\nsenders = ["a@exa mple.org"]\n',
        [
            "routes.a.senders: expected an address like 'billing@example.org' or"
            " '@example.org', got 'a@exa mple.org'"
        ],
    ),
    (
        "the null sender as a route's sender",
        BASE + '[routes.a]\nnext_hops = ["h:25"]\nsenders = ["<>"]\n',
        ["routes.a.senders: the null sender matches no route, got '<>'"],
    ),
    (
        "senders not a list",
        BASE + '[routes.a]\nnext_hops = ["h:25"]\nsenders = "@example.org"\n',
        ["routes.a.senders: expected a list, got '@example.org'"],
    ),
    (
        "senders on an MX route",
        BASE + '[routes.a]\nmx = true\nsenders = ["@example.org"]\n',
        ["routes.a.senders: not on an mx = true route; give it next_hops"],
    ),
    (
        # Only the bad hop is reported, not a second "required" for the list.
        "a bad hop 'h:'",
        BASE + '[routes.a]\nnext_hops = ["h:"]\n',
        ["routes.a.next_hops: next hop 'h:': empty port"],
    ),
    (
        "an IPv6 hop without brackets",
        BASE + '[routes.a]\nmx = true\n[routes.b]\nnext_hops = ["2001:db8::1:25"]\n',
        [
            "routes.b.next_hops: next hop '2001:db8::1:25': write an IPv6 address as"
            " [address]:port",
        ],
    ),
    (
        "an empty next_hops list",
        BASE + "[routes.a]\nnext_hops = []\n",
        ["routes.a.next_hops: required unless mx = true"],
    ),
    (
        "credentials on a route without TLS",
        BASE + '[routes.a]\nnext_hops = ["h:25"]\ntls = "none"\nauth_file = "/x"\n',
        [
            "routes.a.auth_file: credentials are only sent over TLS; "
            "set tls to opportunistic or required"
        ],
    ),
    (
        "route tls 'maybe'",
        BASE + '[routes.a]\nnext_hops = ["h:25"]\ntls = "maybe"\n',
        ["routes.a.tls: expected one of none, opportunistic, required, got 'maybe'"],
    ),
    (
        "route bad domain",
        BASE + '[routes.a]\nnext_hops = ["h:25"]\ndomains = ["exa mple.com"]\n',
        [
            "routes.a.domains: expected a domain like 'example.com' or '.example.org',"
            " got 'exa mple.com'"
        ],
    ),
    (
        "routes not a table",
        'routes = ["smarthost"]\n' + BASE,
        ["routes: expected tables [routes.NAME]"],
    ),
    (
        "several errors, all reported in order",
        """colour = "blue"

[spool]
retry_jitter = 2
bogus = 1

[control]
mode = "abc"

[log]
level = "verbose"

[hooks]
on_error = "x"

[relay]
default_route = "nowhere"
connect_timeout = "soon"

[routes.a]
tls = "maybe"
""",
        [
            "colour: unknown key",
            "spool.dir: required",
            "spool.retry_jitter: expected a number from 0 to 1, got 2",
            "spool.bogus: unknown key",
            "control.mode: expected an octal mode like '0660', got 'abc'",
            "log.level: expected one of debug, info, warning, error, got 'verbose'",
            "hooks.on_error: expected 'package.module:function', got 'x'",
            f"relay.connect_timeout: {SPAN_ERROR} 'soon'",
            "routes.a.tls: expected one of none, opportunistic, required, got 'maybe'",
            "routes.a.next_hops: required unless mx = true",
            "relay.default_route: no route named 'nowhere' (routes: a)",
        ],
    ),
]


# issue 22: outbound TLS policy of MX routes, and the daemon's DNS servers
BAD_FILES += [
    (
        "tls_policy on a route with next_hops",
        BASE + '[routes.a]\nnext_hops = ["h:25"]\ntls_policy = "mta-sts"\n',
        [
            "routes.a.tls_policy: only for mx = true routes (MTA-STS and DANE are the "
            "recipient domain's rules for its MX hosts); for a fixed next hop use "
            'tls = "required" and verify_certificates'
        ],
    ),
    (
        "tls_policy not one of the three",
        BASE + '[routes.a]\nmx = true\ntls_policy = "dane"\n',
        ["routes.a.tls_policy: expected one of dane-mta-sts, mta-sts, none, got 'dane'"],
    ),
    (
        "dns nameservers not addresses",
        BASE + '[dns]\nnameservers = ["ns.example.net", "127.0.0.1:99999"]\n',
        ["dns.nameservers: expected an IP address with an optional ':port', got 'ns.example.net'"],
    ),
    ("unknown key in dns", BASE + "[dns]\nresolver = 1\n", ["dns.resolver: unknown key"]),
]


# Numbers in digits that str.isdigit() takes but a config never means
# (superscript two: int() raised; Arabic-Indic ten: int() read 10, and the
# regular expressions' \d took it): each is refused, naming the key.
_TEN, _TWO = ARABIC_TEN, SUPERSCRIPT_TWO
_HOP = '\n[relay]\ndefault_route = "smarthost"\n\n[routes.smarthost]\nnext_hops = '
BAD_FILES += [
    (
        "smtp listen port in other digits",
        _smtp(f'listen = ["127.0.0.1:25{_TEN}"]\n'),
        [f"smtp.listen: expected 'address:port', got '127.0.0.1:25{_TEN}'"],
    ),
    (
        "metrics listen port in other digits",
        BASE + f'[metrics]\nlisten = "127.0.0.1:{_TWO}"\n',
        [f"metrics.listen: expected 'address:port', got '127.0.0.1:{_TWO}'"],
    ),
    (
        "next hop port in other digits, or with a space",
        BASE + _HOP + f'["h0:{_TEN}"]\n' + '[routes.b]\nnext_hops = ["h1: 25"]\n',
        [
            f"routes.smarthost.next_hops: next hop 'h0:{_TEN}': port is not a number",
            "routes.b.next_hops: next hop 'h1: 25': port is not a number",
        ],
    ),
    (
        "span, size and rate in other digits",
        BASE
        + f'retry_intervals = ["{_TEN}m"]\n'
        + f'\n[smtp]\nmax_message_size = "{_TEN}MiB"\n'
        + _HOP
        + f'["h0:25"]\nrate = "{_TEN}/s"\n'
        + f'[routes.b]\nnext_hops = ["h1:25"]\nrate = "5/{_TEN}s"\n',
        [
            f"spool.retry_intervals: {SPAN_ERROR} '{_TEN}m'",
            "smtp.max_message_size: expected a size like '32MiB' or a number of bytes,"
            f" got '{_TEN}MiB'",
            f"routes.smarthost.rate: expected a rate like '50/s' or '1000/h', got '{_TEN}/s'",
            f"routes.b.rate: expected a rate like '50/s' or '1000/h', got '5/{_TEN}s'",
        ],
    ),
    (
        "redis database in other digits",
        BASE + f'\n[fleet]\nredis = "redis://127.0.0.1:6379/{_TWO}"\n',
        [f"fleet.redis: expected a database number after the port, got '{_TWO}'"],
    ),
    (
        "redis database in Arabic-Indic digits",
        BASE + f'\n[fleet]\nredis = "redis://127.0.0.1:6379/{_TEN}"\n',
        [f"fleet.redis: expected a database number after the port, got '{_TEN}'"],
    ),
]


def test_tls_policy_and_nameservers_are_read(tmp_path: Path) -> None:
    path = tmp_path / "spoold.toml"
    path.write_text(
        BASE
        + '[routes.direct]\nmx = true\ntls_policy = "dane-mta-sts"\n'
        + '[dns]\nnameservers = ["127.0.0.1", "127.0.0.53:5353", "[::1]:53"]\n'
    )
    cfg = load_config(path)
    assert cfg.routes["direct"].tls_policy == "dane-mta-sts"
    assert cfg.dns.nameservers == ("127.0.0.1", "127.0.0.53:5353", "[::1]:53")
    path.write_text(BASE + "[routes.direct]\nmx = true\n")
    cfg = load_config(path)
    assert cfg.routes["direct"].tls_policy == "none"
    assert cfg.dns.nameservers == ()


@pytest.mark.parametrize(
    ("text", "problems"), [(t, p) for _, t, p in BAD_FILES], ids=[n for n, _, _ in BAD_FILES]
)
def test_bad_file_reports_exact_problems(tmp_path: Path, text: str, problems: list[str]) -> None:
    path = tmp_path / "spoold.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as info:
        load_config(path)

    err = info.value
    assert err.problems == problems
    assert err.path == str(path)
    assert str(err).startswith(f"{path}: ")
    assert str(err) == f"{path}: " + "; ".join(problems)
    assert isinstance(err, SpooldError)
    assert isinstance(err, ValueError)


@pytest.mark.parametrize(
    "listen", ['["127.0.0.1:2525", "127.1.2.3:25"]', '["[::1]:25"]'], ids=["IPv4", "IPv6"]
)
def test_auth_in_clear_is_allowed_on_loopback_only_listeners(tmp_path: Path, listen: str) -> None:
    path = tmp_path / "spoold.toml"
    path.write_text(
        _smtp(
            f'listen = {listen}\nauth_file = "users"\nmax_connections_per_client = 2\n'
            'timeout = "90s"\nmax_junk_commands = 7\nmax_auth_failures = 5\n'
            'auth_failure_delay = "250ms"\n'
        )
    )
    smtp = load_config(path).smtp
    assert smtp is not None
    assert smtp.auth_file == tmp_path / "users"
    assert smtp.max_connections_per_client == 2
    assert smtp.timeout == timedelta(seconds=90)
    assert smtp.max_junk_commands == 7
    assert smtp.max_auth_failures == 5
    assert smtp.auth_failure_delay == timedelta(milliseconds=250)


@pytest.mark.parametrize(
    "value", ['"99999999999d"', "1e15", "inf"], ids=["huge string", "huge number", "inf"]
)
def test_span_out_of_range_is_a_config_problem(tmp_path: Path, value: str) -> None:
    # DESIGN §6 / config.py: load_config reports every bad value as a
    # ConfigError problem naming its key; a span too large for a timedelta
    # must not escape as an OverflowError (the daemon's reload does not catch it).
    path = tmp_path / "spoold.toml"
    path.write_text(BASE + f"flush_timeout = {value}\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    (problem,) = info.value.problems
    assert problem.startswith("spool.flush_timeout: ")


def test_file_not_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "spoold.toml"
    path.write_bytes(b'[spool]\ndir = "\xff"\n')

    with pytest.raises(ConfigError) as info:
        load_config(path)

    (problem,) = info.value.problems
    assert problem.startswith("not valid TOML: 'utf-8' codec can't decode byte 0xff")


def test_missing_file_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert info.value.problems == ["cannot read: No such file or directory"]
    assert str(info.value).startswith(str(path))
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_directory_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)

    (problem,) = info.value.problems
    assert problem.startswith("cannot read: ")
    assert str(info.value).startswith(f"{tmp_path}: cannot read")


# ------------------------------------------------------------ spans and sizes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1w", timedelta(weeks=1)),
        ("250ms", timedelta(milliseconds=250)),
        ("1.5h", timedelta(minutes=90)),
        (" 10 m ", timedelta(minutes=10)),
        ("45", timedelta(seconds=45)),
        ("0s", timedelta(0)),
        (90, timedelta(seconds=90)),
        (1.5, timedelta(seconds=1.5)),
        (0, timedelta(0)),
    ],
)
def test_parse_span(value: object, expected: timedelta) -> None:
    assert parse_span(value) == expected


@pytest.mark.parametrize(
    "value", ["-1s", "5 minutes", "5M", "1y", "", "m", True, False, None, -1, -0.5, [1]]
)
def test_parse_span_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="expected a span"):
        parse_span(value)


@pytest.mark.parametrize("value", ["99999999999d", 1e15, float("inf")])
def test_parse_span_refuses_out_of_range(value: object) -> None:
    with pytest.raises(ValueError):
        parse_span(value)


@pytest.mark.parametrize(
    ("span", "text"),
    [
        (timedelta(seconds=30), "30s"),
        (timedelta(minutes=5), "5m"),
        (timedelta(hours=2), "2h"),
        (timedelta(days=1), "1d"),
        (timedelta(weeks=1), "7d"),
        (timedelta(seconds=90), "90s"),
        (timedelta(minutes=90), "90m"),
        (timedelta(milliseconds=250), "0.25s"),
        (timedelta(0), "0s"),
    ],
)
def test_format_span(span: timedelta, text: str) -> None:
    assert format_span(span) == text
    assert parse_span(text) == span  # it round-trips


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("32MiB", 32 * 1024 * 1024),
        ("500KB", 500_000),
        ("1GB", 1_000_000_000),
        ("2KiB", 2048),
        ("1gib", 1024**3),
        ("7mb", 7_000_000),
        ("10B", 10),
        ("4096", 4096),
        (100, 100),
        (0, 0),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["32 lots", "1TB", "1.5MB", "-1", "", -1, True, 1.5, None])
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="expected a size like '32MiB' or a number of bytes"):
        parse_size(value)


# ------------------------------------------------------------ reload

RELOAD_BASE: dict[str, Any] = {
    "spool": {"dir": "spool", "max_concurrent_send_jobs": 64},
    "control": {"socket": "run/spoold.sock", "mode": "0660"},
    "smtp": {"listen": ["127.0.0.1:2525"], "max_message_size": "32MiB"},
    "log": {"level": "info"},
    "metrics": {"listen": "127.0.0.1:9469"},
    "relay": {"default_route": "smarthost"},
    "routes": {"smarthost": {"next_hops": ["127.0.0.1:25"]}},
}


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    table, key = path.split(".")

    def change(raw: dict[str, Any]) -> None:
        raw[table][key] = value

    return change


def _drop_smtp(raw: dict[str, Any]) -> None:
    del raw["smtp"]


def _everything(raw: dict[str, Any]) -> None:
    for change in (
        _set("spool.dir", "other"),
        _set("control.mode", "0600"),
        _set("smtp.listen", ["[::1]:25"]),
        _set("metrics.listen", ""),
        _set("spool.max_concurrent_send_jobs", 2),
    ):
        change(raw)


RELOAD_CASES: list[tuple[str, Callable[[dict[str, Any]], None], list[str]]] = [
    ("nothing", lambda raw: None, []),
    ("concurrency", _set("spool.max_concurrent_send_jobs", 10), []),
    ("retry intervals", _set("spool.retry_intervals", ["1m"]), []),
    ("log level", _set("log.level", "debug"), []),
    ("smtp size", _set("smtp.max_message_size", "1MiB"), []),
    ("relay timeout", _set("relay.connect_timeout", "5s"), []),
    ("route hops", _set("routes.smarthost", {"next_hops": ["10.0.0.1:25"]}), []),
    (
        "route senders",
        _set("routes.smarthost", {"next_hops": ["h0:25"], "senders": ["@example.org"]}),
        [],
    ),
    ("spool.dir", _set("spool.dir", "elsewhere"), ["spool.dir"]),
    ("control socket", _set("control.socket", "run/other.sock"), ["control"]),
    ("control mode", _set("control.mode", "0600"), ["control"]),
    ("smtp listen", _set("smtp.listen", ["127.0.0.1:2526"]), ["smtp.listen"]),
    ("smtp off", _drop_smtp, ["smtp.listen"]),
    ("metrics listen", _set("metrics.listen", "127.0.0.1:9470"), ["metrics.listen"]),
    ("all at once", _everything, ["spool.dir", "control", "smtp.listen", "metrics.listen"]),
]


def _config(raw: dict[str, Any]) -> Config:
    return parse_config(raw, Path("/etc/spoold/spoold.toml"))


@pytest.mark.parametrize(
    ("change", "expected"),
    [(c, e) for _, c, e in RELOAD_CASES],
    ids=[n for n, _, _ in RELOAD_CASES],
)
def test_restart_needed(change: Callable[[dict[str, Any]], None], expected: list[str]) -> None:
    new_raw = copy.deepcopy(RELOAD_BASE)
    change(new_raw)
    old, new = _config(copy.deepcopy(RELOAD_BASE)), _config(new_raw)

    assert restart_needed(old, new) == expected


def test_restart_needed_when_smtp_turned_on() -> None:
    old_raw = copy.deepcopy(RELOAD_BASE)
    del old_raw["smtp"]

    assert restart_needed(_config(old_raw), _config(RELOAD_BASE)) == ["smtp.listen"]


def test_spool_dir_move_also_moves_the_default_control_socket() -> None:
    old = _config({"spool": {"dir": "a"}})
    new = _config({"spool": {"dir": "b"}})

    assert new.control.socket == Path("/etc/spoold/b/control.sock")
    assert restart_needed(old, new) == ["spool.dir", "control"]


def test_parse_config_resolves_against_the_given_path() -> None:
    cfg = _config(RELOAD_BASE)

    assert cfg.path == Path("/etc/spoold/spoold.toml")
    assert cfg.spool.dir == Path("/etc/spoold/spool")
    assert cfg.control.socket == Path("/etc/spoold/run/spoold.sock")


# --------------------------------------------------- per-destination limits


def test_route_limits_are_read_and_checked(tmp_path: Path) -> None:
    raw: dict[str, Any] = {
        "spool": {"dir": "spool"},
        "routes": {
            "slow": {"next_hops": ["a.example:25"], "rate": "1000/h", "max_connections": 2},
            "plain": {"next_hops": ["b.example:25"]},
        },
    }
    cfg = parse_config(raw, tmp_path / "spoold.toml")
    assert cfg.routes["slow"].rate == Rate(1000, timedelta(hours=1))
    assert cfg.routes["slow"].max_connections == 2
    # Not set: None here, the default (10) in the route's limits, which a
    # fleet does not count fleet-wide (see docs/fleet.md, "Connections").
    assert (cfg.routes["plain"].rate, cfg.routes["plain"].max_connections) == (None, None)

    router = Router(cfg)
    msg = make_message("M1")
    msg.route = "slow"
    assert router.limits_for(msg) == ("slow", DestinationLimits(2, Rate(1000, timedelta(hours=1))))
    msg.route = "plain"
    plain = DestinationLimits(DEFAULT_MAX_CONNECTIONS, None, shared_connections=False)
    assert router.limits_for(msg) == ("plain", plain)
    msg.route = "gone"  # a route a reload removed: no limits
    assert router.limits_for(msg) is None

    bad = copy.deepcopy(raw)
    bad["routes"]["slow"].update(rate="fast", max_connections=0)
    bad["routes"]["plain"].update(rate=50, max_connections=10_001)
    bad["routes"]["third"] = {"next_hops": ["c.example:25"], "max_connections": "4"}
    with pytest.raises(ConfigError) as info:
        parse_config(bad, tmp_path / "spoold.toml")
    assert info.value.problems == [
        "routes.slow.max_connections: expected an integer >= 1, got 0",
        "routes.slow.rate: expected a rate like '50/s' or '1000/h', got 'fast'",
        "routes.plain.max_connections: expected an integer <= 10000, got 10001",
        "routes.plain.rate: expected a rate like '50/s' or '1000/h', got 50",
        "routes.third.max_connections: expected an integer >= 1, got '4'",
    ]


# -----------------------------------------------------------------------------
# The delivery-policy keys: spool.max_queue_lifetime, on_permanent_failure,
# retries_exhausted, delay_warning, after_crash and
# routes.NAME.max_queue_lifetime / retries_exhausted; their defaults, their
# problems, and the policy the spool is given.


def config(spool: dict[str, Any] | None = None, route: dict[str, Any] | None = None) -> Config:
    raw: dict[str, Any] = {
        "spool": {"dir": "spool", **(spool or {})},
        "routes": {"smarthost": {"next_hops": ["127.0.0.1:25"], **(route or {})}},
    }
    return parse_config(raw, Path("/etc/spoold/spoold.toml"))


def problems(**kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config(**kwargs)
    return caught.value.problems


def test_defaults() -> None:
    cfg = config()
    assert cfg.spool.max_queue_lifetime == timedelta(days=5)
    assert cfg.spool.on_permanent_failure is OnPermanentFailure.FREEZE
    assert cfg.spool.delay_warning is None
    assert cfg.spool.after_crash == "resend"
    assert cfg.spool.retries_exhausted is RetriesExhausted.REPEAT_LAST
    assert cfg.routes["smarthost"].max_queue_lifetime is None
    assert cfg.routes["smarthost"].retries_exhausted is None
    assert delivery_policy(cfg) == DeliveryPolicy(max_queue_lifetime=timedelta(days=5))
    assert delivery_policy(cfg).repeats_last  # unreachable mail is retried until the lifetime
    assert route_lifetimes(cfg) == {}
    assert route_retries_exhausted(cfg) == {}


def test_the_sample_config_has_the_defaults() -> None:
    cfg = load_config(SAMPLE)
    assert delivery_policy(cfg) == delivery_policy(config())
    assert cfg.spool.after_crash == "resend"


def test_values_given() -> None:
    cfg = config(
        spool={
            "max_queue_lifetime": "2d",
            "on_permanent_failure": "bounce",
            "delay_warning": "4h",
            "after_crash": "freeze",
            "retries_exhausted": "freeze",
        },
        route={"max_queue_lifetime": "6h", "retries_exhausted": "repeat_last"},
    )
    assert delivery_policy(cfg) == DeliveryPolicy(
        max_queue_lifetime=timedelta(days=2),
        on_permanent_failure=OnPermanentFailure.BOUNCE,
        delay_warning=timedelta(hours=4),
        retries_exhausted=RetriesExhausted.FREEZE,
    )
    assert cfg.spool.after_crash == "freeze"
    assert route_lifetimes(cfg) == {"smarthost": timedelta(hours=6)}
    assert route_retries_exhausted(cfg) == {"smarthost": RetriesExhausted.REPEAT_LAST}


def test_an_empty_delay_warning_or_route_setting_means_none() -> None:
    cfg = config(
        spool={"delay_warning": ""}, route={"max_queue_lifetime": "", "retries_exhausted": ""}
    )
    assert cfg.spool.delay_warning is None
    assert route_lifetimes(cfg) == {}
    assert route_retries_exhausted(cfg) == {}


@pytest.mark.parametrize(
    ("spool", "route", "problem"),
    [
        (
            {"max_queue_lifetime": "0s"},
            {},
            "spool.max_queue_lifetime: expected a span > 0, got '0s'",
        ),
        (
            {"max_queue_lifetime": ""},
            {},
            "spool.max_queue_lifetime: ",
        ),
        (
            {"on_permanent_failure": "discard"},
            {},
            "spool.on_permanent_failure: expected one of freeze, bounce, got 'discard'",
        ),
        ({"delay_warning": "soon"}, {}, "spool.delay_warning: "),
        (
            {"after_crash": "ignore"},
            {},
            "spool.after_crash: expected one of resend, freeze, got 'ignore'",
        ),
        (
            {"max_queue_lifetime": "4h", "delay_warning": "4h"},
            {},
            "spool.delay_warning: must be shorter than spool.max_queue_lifetime "
            "(the message would fail before the warning)",
        ),
        (
            {},
            {"max_queue_lifetime": "-1h"},
            "routes.smarthost.max_queue_lifetime: ",
        ),
        (
            {"retries_exhausted": "retry"},
            {},
            "spool.retries_exhausted: expected one of repeat_last, freeze, got 'retry'",
        ),
        (
            {},
            {"retries_exhausted": "forever"},
            "routes.smarthost.retries_exhausted: expected one of repeat_last, freeze "
            "or \"\", got 'forever'",
        ),
    ],
)
def test_problems(spool: dict[str, Any], route: dict[str, Any], problem: str) -> None:
    found = problems(spool=spool, route=route)
    assert len(found) == 1, found
    assert found[0].startswith(problem), found


def test_the_policy_keys_change_on_reload_without_a_restart() -> None:
    old = config()
    new = config(
        spool={
            "max_queue_lifetime": "1d",
            "on_permanent_failure": "bounce",
            "delay_warning": "1h",
            "after_crash": "freeze",
            "retries_exhausted": "freeze",
        },
        route={"max_queue_lifetime": "2h", "retries_exhausted": "repeat_last"},
    )
    assert restart_needed(old, new) == []
