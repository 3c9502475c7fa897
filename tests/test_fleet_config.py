"""``[fleet]``: its keys, their defaults, and the errors a bad value gets
(at start and at reload alike: both go through load_config)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from spoold.daemon.config import (
    FleetConfig,
    fleet_settings,
    load_config,
    restart_needed,
)
from spoold.errors import ConfigError
from spoold.fleet import FleetSettings

HEAD = 'hostname = "mx1.example.org"\n[spool]\ndir = "spool"\n'


def _write(tmp_path: Path, fleet: str) -> Path:
    path = tmp_path / "spoold.toml"
    path.write_text(HEAD + "[fleet]\n" + fleet)
    return path


def _problems(tmp_path: Path, fleet: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, fleet))
    return info.value.problems


def test_without_the_table_the_node_is_alone(tmp_path: Path) -> None:
    path = tmp_path / "spoold.toml"
    path.write_text(HEAD)
    config = load_config(path)
    assert config.fleet is None
    assert fleet_settings(config) is None


def test_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, 'redis = "redis://127.0.0.1:6379/0"\n'))
    assert config.fleet == FleetConfig(redis="redis://127.0.0.1:6379/0")
    assert fleet_settings(config) == FleetSettings(
        url="redis://127.0.0.1:6379/0", node="mx1.example.org", timeout=0.2, lease=30.0
    )


def test_every_key(tmp_path: Path) -> None:
    (tmp_path / "redis.pass").write_text("s3cret\n")
    config = load_config(
        _write(
            tmp_path,
            'redis = "rediss://redis.internal:6380/2"\nnode = "relay-1"\n'
            'password_file = "redis.pass"\ntimeout = "500ms"\nlease = "1m"\n',
        )
    )
    assert config.fleet is not None
    assert config.fleet.password_file == tmp_path / "redis.pass"
    settings = fleet_settings(config)
    assert settings == FleetSettings(
        url="rediss://redis.internal:6380/2",
        node="relay-1",
        timeout=0.5,
        lease=60.0,
        password="s3cret",
    )
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("fleet", "problem"),
    [
        ("", "fleet.redis: required"),
        (
            'redis = "http://127.0.0.1:6379"\n',
            "fleet.redis: expected redis://HOST:PORT/DB or rediss://..., "
            "got 'http://127.0.0.1:6379'",
        ),
        (
            'redis = "redis://:pw@127.0.0.1:6379/0"\n',
            "fleet.redis: a password in the URL would be logged; put it in fleet.password_file",
        ),
        (
            'redis = "redis://127.0.0.1:6379/zero"\n',
            "fleet.redis: expected a database number after the port, got 'zero'",
        ),
        (
            'redis = "redis://127.0.0.1:99999/0"\n',
            "fleet.redis: expected redis://HOST:PORT/DB or rediss://..., "
            "got 'redis://127.0.0.1:99999/0'",
        ),
        (
            'redis = "redis://r:6379"\nnode = "relay 1"\n',
            "fleet.node: expected a node name of letters, digits, '.', '_' and '-' "
            "(at most 64), got 'relay 1'",
        ),
        (
            'redis = "redis://r:6379"\ntimeout = "0s"\n',
            "fleet.timeout: expected a span > 0, got '0s'",
        ),
        (
            'redis = "redis://r:6379"\ntimeout = "1m"\n',
            "fleet.timeout: expected a span > 0 and at most 10s, got '1m'",
        ),
        (
            'redis = "redis://r:6379"\ntimeout = "2s"\nlease = "1s"\n',
            "fleet.lease: must be longer than fleet.timeout",
        ),
        ('redis = "redis://r:6379"\nurl = "x"\n', "fleet.url: unknown key"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, fleet: str, problem: str) -> None:
    assert _problems(tmp_path, fleet) == [problem]


def test_an_unreadable_password_file_is_a_config_error(tmp_path: Path) -> None:
    config = load_config(
        _write(tmp_path, 'redis = "redis://r:6379"\npassword_file = "absent.pass"\n')
    )
    with pytest.raises(ConfigError) as info:
        fleet_settings(config)
    (problem,) = info.value.problems
    assert problem.startswith("fleet.password_file: cannot read it: ")
    (tmp_path / "absent.pass").write_text("\n")
    with pytest.raises(ConfigError) as info:
        fleet_settings(config)
    assert info.value.problems == ["fleet.password_file: the file is empty"]


def test_a_changed_fleet_needs_a_restart(tmp_path: Path) -> None:
    old = load_config(_write(tmp_path, 'redis = "redis://a:6379"\n'))
    new = load_config(_write(tmp_path, 'redis = "redis://b:6379"\n'))
    assert restart_needed(old, new) == ["fleet"]
    assert restart_needed(old, old) == []
    assert old.fleet is not None and old.fleet.lease == timedelta(seconds=30)
