"""Routing: which route each recipient takes, what the envelopes carry, and
how the relay talks to each hop (DESIGN.md §6, spoold/routing.py)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from spoold.connection_cache import RouteSettings
from spoold.daemon.config import Config, load_config, parse_config
from spoold.daemon.routing import Router
from spoold.errors import (
    NoRouteError,
    SpooldError,
)
from spoold.ids import new_id
from spoold.message import RetryInterval, RoutedEnvelope, message_for_envelope
from spoold.times import utcnow


def _config(tmp_path: Path, raw: dict[str, Any]) -> Config:
    return parse_config(raw, tmp_path / "spoold.toml")


def _raw() -> dict[str, Any]:
    return {
        "hostname": "relay.example.test",
        "spool": {"dir": "spool", "retry_jitter": 0.2},
        "relay": {
            "default_route": "smarthost",
            "connect_timeout": "7s",
            "command_timeout": "1m",
            "message_timeout": "3m",
        },
        "routes": {
            "smarthost": {"next_hops": ["smart.example.net:587"]},
            "partners": {
                "domains": ["Example.COM"],
                "next_hops": ["mx1.example.com:25", "mx2.example.com:25"],
                "retry_intervals": ["10m", "1h"],
                "helo_name": "partner-facing.example.test",
            },
            "org": {
                "domains": [".example.org"],
                "next_hops": ["[2001:db8::1]:25"],
                "tls": "required",
                "verify_certificates": False,
                "ca_file": "tls/ca.pem",
                "client_cert": "tls/client.pem",
                "client_key": "tls/client.key",
            },
        },
    }


@pytest.fixture
def router(tmp_path: Path) -> Router:
    return Router(_config(tmp_path, _raw()))


# ------------------------------------------------------------ route()


def test_route_groups_recipients_by_route(router: Router) -> None:
    envelopes = router.route(
        "sender@here.test",
        [
            "a@example.com",
            "b@x.example.org",
            "c@elsewhere.net",
            "d@EXAMPLE.com",
            "e@example.org",
            "f@sub.example.com",  # "example.com" is exact: no subdomains
        ],
        mail_params=["BODY=8BITMIME", "SMTPUTF8"],
        envelope_id="env-1",
    )

    assert len(envelopes) == 3
    assert all(isinstance(e, RoutedEnvelope) for e in envelopes)
    partners, org, default = envelopes  # in first-seen order

    assert list(partners.recipients) == ["a@example.com", "d@EXAMPLE.com"]
    assert list(partners.next_hop_choices) == ["mx1.example.com:25", "mx2.example.com:25"]
    assert list(partners.retry_intervals) == [
        RetryInterval(timedelta(minutes=10), timedelta(minutes=2)),
        RetryInterval(timedelta(hours=1), timedelta(minutes=12)),
    ]

    assert list(org.recipients) == ["b@x.example.org", "e@example.org"]
    assert list(org.next_hop_choices) == ["[2001:db8::1]:25"]
    assert list(org.retry_intervals) == []  # no route intervals: the spool's apply

    assert list(default.recipients) == ["c@elsewhere.net", "f@sub.example.com"]
    assert list(default.next_hop_choices) == ["smart.example.net:587"]
    assert list(default.retry_intervals) == []

    for env in envelopes:
        assert env.sender == "sender@here.test"
        assert list(env.mail_params) == ["BODY=8BITMIME", "SMTPUTF8"]
        assert env.envelope_id == "env-1"


def test_route_order_follows_first_recipient_of_each_route(router: Router) -> None:
    envelopes = router.route("", ["z@nowhere.test", "y@example.com", "x@nowhere.test"])

    assert [list(e.recipients) for e in envelopes] == [
        ["z@nowhere.test", "x@nowhere.test"],
        ["y@example.com"],
    ]
    assert [list(e.next_hop_choices) for e in envelopes] == [
        ["smart.example.net:587"],
        ["mx1.example.com:25", "mx2.example.com:25"],
    ]
    assert all(e.sender == "" and list(e.mail_params) == [] for e in envelopes)
    assert all(e.envelope_id == "" for e in envelopes)


def test_route_without_recipients_gives_no_envelopes(router: Router) -> None:
    assert router.route("s@here.test", []) == []


def test_route_retry_intervals_without_jitter(tmp_path: Path) -> None:
    raw = _raw()
    raw["spool"]["retry_jitter"] = 0
    router = Router(_config(tmp_path, raw))

    (env,) = router.route("s@here.test", ["a@example.com"])

    assert list(env.retry_intervals) == [
        RetryInterval(timedelta(minutes=10), None),
        RetryInterval(timedelta(hours=1), None),
    ]


def test_router_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "spoold.toml"
    path.write_text(
        """
[spool]
dir = "spool"
retry_jitter = 0.5

[relay]
default_route = "out"

[routes.out]
next_hops = ["out.example.net"]

[routes.lists]
domains = ["lists.example.net"]
next_hops = ["lists-mx.example.net:2525"]
retry_intervals = ["30s"]
"""
    )
    router = Router(load_config(path))

    envelopes = router.route("s@x.test", ["l@lists.example.net", "o@example.net"])

    assert [(list(e.recipients), list(e.next_hop_choices)) for e in envelopes] == [
        (["l@lists.example.net"], ["lists-mx.example.net:2525"]),
        (["o@example.net"], ["out.example.net"]),
    ]
    assert list(envelopes[0].retry_intervals) == [
        RetryInterval(timedelta(seconds=30), timedelta(seconds=15))
    ]


# ------------------------------------------------------------ domain matching


@pytest.mark.parametrize(
    ("recipient", "route"),
    [
        ("u@example.com", "partners"),
        ("u@EXAMPLE.COM", "partners"),
        ("U@Example.Com", "partners"),
        ("u@example.com.", "partners"),  # a trailing dot is the same domain
        ("u@sub.example.com", "smarthost"),
        ("u@example.com.evil.net", "smarthost"),
        ("u@example.org", "org"),
        ("u@EXAMPLE.ORG", "org"),
        ("u@a.example.org", "org"),
        ("u@A.B.Example.Org", "org"),
        ("u@badexample.org", "smarthost"),
        ("u@example.org.evil.net", "smarthost"),
        ("u@xexample.com", "smarthost"),
        ('"a@b"@example.com', "partners"),  # the domain is after the last @
        ("postmaster", "smarthost"),
    ],
)
def test_route_name_for(router: Router, recipient: str, route: str) -> None:
    assert router.route_name_for(recipient) == route
    assert router.route_name_for(recipient) == route  # asked again: the same


def test_every_domain_is_routed_alike_however_often_asked(router: Router) -> None:
    """A domain's route is worked out once (the router never changes): the
    second answer is the first, for every spelling of the domain, in any
    order; a full memo starts again."""
    asked = ["u@a.example.org", "u@example.com", "v@EXAMPLE.COM.", "w@elsewhere.net"] * 2
    assert [router.route_name_for(r) for r in asked] == [
        "org",
        "partners",
        "partners",
        "smarthost",
    ] * 2
    for n in range(5000):  # past the memo's bound
        assert router.route_name_for(f"u@host{n}.example.org") == "org"
    assert router.route_name_for("u@example.com") == "partners"


# ------------------------------------------------------------ no route


def test_no_default_route_and_unmatched_recipient(tmp_path: Path) -> None:
    raw = _raw()
    del raw["relay"]["default_route"]
    router = Router(_config(tmp_path, raw))
    assert router.default_route is None

    with pytest.raises(
        NoRouteError, match=r"no route for u@elsewhere\.net and no relay\.default_route"
    ):
        router.route("s@here.test", ["a@example.com", "u@elsewhere.net"])
    with pytest.raises(NoRouteError):
        router.route_name_for("u@badexample.org")
    with pytest.raises(NoRouteError):  # again: still no route
        router.route_name_for("u@badexample.org")

    # matched recipients still route
    (env,) = router.route("s@here.test", ["a@example.com"])
    assert list(env.next_hop_choices) == ["mx1.example.com:25", "mx2.example.com:25"]
    assert router.route_name_for("b@a.example.org") == "org"


def test_no_route_error_is_a_value_error() -> None:
    assert issubclass(NoRouteError, ValueError)


# ------------------------------------------------------------ hop settings


def test_settings_for_a_hop_are_its_routes(router: Router, tmp_path: Path) -> None:
    org = router.settings_for("[2001:db8::1]:25")
    assert org == RouteSettings(
        tls="required",
        verify_certificates=False,
        ca_file=str(tmp_path / "tls" / "ca.pem"),
        client_cert=str(tmp_path / "tls" / "client.pem"),
        client_key=str(tmp_path / "tls" / "client.key"),
        auth=None,
        connect_timeout=7.0,
        command_timeout=60.0,
        message_timeout=180.0,
        helo_name="relay.example.test",  # the top-level hostname
    )

    for hop in ("mx1.example.com:25", "mx2.example.com:25"):
        partners = router.settings_for(hop)
        assert partners.tls == "opportunistic"
        assert partners.verify_certificates is True
        assert partners.ca_file is None
        assert partners.auth is None
        assert (partners.connect_timeout, partners.command_timeout) == (7.0, 60.0)
        assert partners.message_timeout == 180.0
        assert partners.helo_name == "partner-facing.example.test"  # the route's own


def test_settings_for_an_unknown_hop_are_the_defaults(router: Router) -> None:
    settings = router.settings_for("unknown.example.net:25")

    assert settings == router.default_settings
    assert settings == RouteSettings(
        connect_timeout=7.0,
        command_timeout=60.0,
        message_timeout=180.0,
        helo_name="relay.example.test",
    )
    assert settings.tls == "opportunistic"
    assert settings.auth is None


def _auth_config(tmp_path: Path, mode: int, text: str = "user:pw\n") -> Config:
    auth = tmp_path / "secrets" / "relay.auth"
    auth.parent.mkdir(exist_ok=True)
    auth.write_text(text)
    os.chmod(auth, mode)
    path = tmp_path / "spoold.toml"
    path.write_text(
        """
[spool]
dir = "spool"

[relay]
default_route = "smarthost"

[routes.smarthost]
next_hops = ["smart.example.net:587"]
tls = "required"
auth_file = "secrets/relay.auth"
"""
    )
    return load_config(path)


def test_auth_file_is_loaded(tmp_path: Path) -> None:
    cfg = _auth_config(tmp_path, 0o600)
    assert cfg.routes["smarthost"].auth_file == tmp_path / "secrets" / "relay.auth"

    router = Router(cfg)

    settings = router.settings_for("smart.example.net:587")
    assert settings.auth == ("user", "pw")
    assert settings.tls == "required"
    assert "pw" not in repr(settings)  # the password stays out of logs
    assert router.default_settings.auth is None


def test_auth_file_password_may_contain_colons(tmp_path: Path) -> None:
    router = Router(_auth_config(tmp_path, 0o400, "user@example.net:p:a:ss\n"))

    assert router.settings_for("smart.example.net:587").auth == ("user@example.net", "p:a:ss")


@pytest.mark.parametrize(("mode", "shown"), [(0o644, "0644"), (0o640, "0640"), (0o604, "0604")])
def test_auth_file_readable_by_others_is_refused(tmp_path: Path, mode: int, shown: str) -> None:
    cfg = _auth_config(tmp_path, mode)

    with pytest.raises(SpooldError) as info:
        Router(cfg)

    message = str(info.value)
    assert f"(mode {shown})" in message
    assert str(tmp_path / "secrets" / "relay.auth") in message
    assert "make it 0600" in message


def test_auth_file_missing_is_refused(tmp_path: Path) -> None:
    cfg = _auth_config(tmp_path, 0o600)
    (tmp_path / "secrets" / "relay.auth").unlink()

    with pytest.raises(SpooldError, match="No such file or directory"):
        Router(cfg)


def test_auth_file_without_user_is_refused(tmp_path: Path) -> None:
    cfg = _auth_config(tmp_path, 0o600, "just-a-password\n")

    with pytest.raises(SpooldError, match="expected one line 'user:password'"):
        Router(cfg)


# ------------------------------------------------------------ MX routes


def _mx_raw(default: str) -> dict[str, Any]:
    return {
        "spool": {"dir": "spool"},
        "relay": {"default_route": default},
        "routes": {
            "smarthost": {"next_hops": ["smart.example.net:25"]},
            "dns": {"domains": ["mx.test"], "mx": True},
        },
    }


def test_mx_route_needs_route_with_mx(tmp_path: Path) -> None:
    router = Router(_config(tmp_path, _mx_raw("smarthost")))
    assert router.route_name_for("a@mx.test") == "dns"

    with pytest.raises(NoRouteError, match="route dns: MX routes need a lookup"):
        router.route("s@here.test", ["b@other.test", "a@mx.test"])

    # other routes are unaffected
    (env,) = router.route("s@here.test", ["b@other.test"])
    assert list(env.next_hop_choices) == ["smart.example.net:25"]


def test_mx_default_route_needs_route_with_mx(tmp_path: Path) -> None:
    router = Router(_config(tmp_path, _mx_raw("dns")))

    with pytest.raises(NoRouteError, match="route dns: MX routes need a lookup"):
        router.route("s@here.test", ["anyone@anywhere.test"])


def test_most_specific_domain_rule_wins(tmp_path: Path) -> None:
    raw = {
        "spool": {"dir": "spool"},
        "relay": {"default_route": "default"},
        "routes": {
            "default": {"next_hops": ["d:25"]},
            "wide": {"domains": [".example.org"], "next_hops": ["w:25"]},
            "narrow": {"domains": [".eu.example.org"], "next_hops": ["n:25"]},
            "exact": {"domains": ["mail.eu.example.org"], "next_hops": ["e:25"]},
        },
    }
    router = Router(_config(tmp_path, raw))
    assert router.route_name_for("a@x.example.org") == "wide"
    assert router.route_name_for("a@x.eu.example.org") == "narrow"
    assert router.route_name_for("a@mail.eu.example.org") == "exact"
    assert router.route_name_for("a@elsewhere.net") == "default"


# ------------------------------------------------------------ sender routes


def _identities_raw(tmp_path: Path) -> dict[str, Any]:
    """Two sending identities and the default through one smarthost, each
    with credentials of its own; a domain route elsewhere."""
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    for user in ("billing", "support", "relay"):
        path = secrets / f"{user}.auth"
        path.write_text(f"{user}:{user}-pw\n")
        os.chmod(path, 0o600)
    smart = "smart.example.net:587"
    return {
        "spool": {"dir": "spool"},
        "relay": {"default_route": "smarthost"},
        "routes": {
            "smarthost": {"next_hops": [smart], "auth_file": "secrets/relay.auth"},
            "partners": {"domains": ["example.com"], "next_hops": ["mx.example.com:25"]},
            "billing": {
                "senders": ["billing@example.org"],
                "next_hops": [smart],
                "auth_file": "secrets/billing.auth",
            },
            "support": {
                "senders": ["@example.org", "help@example.net"],
                "next_hops": [smart],
                "auth_file": "secrets/support.auth",
            },
        },
    }


def _routes_taken(router: Router, sender: str, recipients: list[str]) -> dict[str, list[str]]:
    return {str(env.route): list(env.recipients) for env in router.route(sender, recipients)}


def test_a_sender_route_takes_every_recipient_before_domain_routes(tmp_path: Path) -> None:
    router = Router(_config(tmp_path, _identities_raw(tmp_path)))

    assert _routes_taken(router, "billing@example.org", ["a@example.com", "b@else.test"]) == {
        "billing": ["a@example.com", "b@else.test"]
    }
    # without a sender route, the recipients' domains decide
    assert _routes_taken(router, "someone@else.test", ["a@example.com", "b@else.test"]) == {
        "partners": ["a@example.com"],
        "smarthost": ["b@else.test"],
    }


@pytest.mark.parametrize(
    ("sender", "route"),
    [
        ("billing@example.org", "billing"),  # the exact address beats @example.org
        ("billing@EXAMPLE.Org", "billing"),  # the domain in any case
        ("Billing@example.org", "support"),  # the local part as written: only @domain
        ("jane@example.org", "support"),
        ("jane@sub.example.org", "smarthost"),  # @domain is that domain only
        ("help@example.net", "support"),
        ("other@example.net", "smarthost"),
        ("", "smarthost"),  # the null sender matches no sender route
        ("<>", "smarthost"),
    ],
)
def test_which_sender_route_matches(tmp_path: Path, sender: str, route: str) -> None:
    router = Router(_config(tmp_path, _identities_raw(tmp_path)))

    (env,) = router.route(sender, ["someone@else.test"])

    assert env.route == route
    assert env.sender == sender


def test_a_hop_shared_by_routes_is_talked_to_with_the_messages_route(tmp_path: Path) -> None:
    router = Router(_config(tmp_path, _identities_raw(tmp_path)))
    smart = "smart.example.net:587"

    logins: dict[str, tuple[str, str] | None] = {}
    for sender in ("billing@example.org", "jane@example.org", "someone@else.test"):
        (env,) = router.route(sender, ["x@else.test"])
        mid = new_id()
        msg = message_for_envelope(env, id=mid, spool_date=utcnow(), parent_id=mid)
        policy = router.policy_for(msg)
        assert list(policy.next_hops or ()) == [smart]
        settings = policy.session_for(smart)
        assert settings is not None
        assert router.settings_for(smart, msg) == settings
        logins[sender] = settings.auth

    assert logins == {
        "billing@example.org": ("billing", "billing-pw"),
        "jane@example.org": ("support", "support-pw"),
        "someone@else.test": ("relay", "relay-pw"),
    }


def test_reload_applies_sender_routes_to_new_messages(tmp_path: Path) -> None:
    raw = _identities_raw(tmp_path)
    before = Router(_config(tmp_path, raw))
    (queued,) = before.route("billing@example.org", ["x@else.test"])
    assert queued.route == "billing"

    del raw["routes"]["billing"]
    raw["routes"]["support"]["senders"] = ["help@example.net"]
    after = Router(_config(tmp_path, raw))

    (env,) = after.route("billing@example.org", ["x@else.test"])
    assert env.route == "smarthost"
    (env,) = after.route("help@example.net", ["x@example.com"])
    assert env.route == "support"


def test_a_message_without_a_route_on_a_shared_hop_gets_the_first_routes_settings(
    tmp_path: Path,
) -> None:
    router = Router(_config(tmp_path, _identities_raw(tmp_path)))
    smart = "smart.example.net:587"
    env = RoutedEnvelope("billing@example.org", ["x@else.test"], [smart])  # hops given, no route
    mid = new_id()
    msg = message_for_envelope(env, id=mid, spool_date=utcnow(), parent_id=mid)

    settings = router.settings_for(smart, msg)

    assert settings.auth == ("relay", "relay-pw")  # smarthost: the first route naming the hop
