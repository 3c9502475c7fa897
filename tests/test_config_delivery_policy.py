"""The delivery-policy keys: spool.max_queue_lifetime, on_permanent_failure,
retries_exhausted, delay_warning, after_crash and
routes.NAME.max_queue_lifetime / retries_exhausted; their defaults, their
problems, and the policy the spool is given."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.config import (
    Config,
    delivery_policy,
    load_config,
    parse_config,
    restart_needed,
    route_lifetimes,
    route_retries_exhausted,
)
from spoold.errors import ConfigError
from spoold.outcome import DeliveryPolicy, OnPermanentFailure, RetriesExhausted

SAMPLE = Path(__file__).absolute().parent.parent / "config" / "spoold.toml"


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
