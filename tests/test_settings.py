"""Settings as values: each part's settings decode from plain data with
their constraints, come whole out of the config, and a running part takes
a new value in one assignment (spoold.settings, spoold.daemon.config)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from spoold import InsufficientStorageError, SpoolWriter
from spoold.connection_cache import CacheSettings, ConnectionCache
from spoold.daemon.config import parse_config
from spoold.errors import ConfigError
from spoold.message import RetryInterval, RoutedBatch, RoutedEnvelope
from spoold.outcome import DeliveryPolicy, OnPermanentFailure, RetriesExhausted
from spoold.settings import (
    DEFAULT_RETRY_INTERVALS,
    SpoolSettings,
    WriterSettings,
)
from spoold.spool import Spool
from spoold.testing import InMemoryRelay
from tests.spool_helpers import BODY

ALL_THE_DISK = 1 << 62  # more free space than any disk has


def batch() -> RoutedBatch:
    return RoutedBatch([RoutedEnvelope("s@example.org", ["r@example.com"], ["mx:25"])], BODY)


# ------------------------------------------------------------ the values


def test_spool_settings_decode_from_plain_data() -> None:
    settings = msgspec.convert(
        {
            "max_concurrent_send_jobs": 3,
            "default_retry_intervals": [{"span": 60.0}],
            "removed_retention": 3600.0,
            "after_crash": "freeze",
        },
        SpoolSettings,
        strict=False,
    )

    assert settings.max_concurrent_send_jobs == 3
    assert settings.default_retry_intervals == (RetryInterval(timedelta(minutes=1)),)
    assert settings.removed_retention == timedelta(hours=1)
    assert settings.after_crash == "freeze"
    assert settings.history_retention == timedelta(days=7)  # the default


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"max_concurrent_send_jobs": 0}, "$.max_concurrent_send_jobs"),
        ({"min_free_space": -1}, "$.min_free_space"),
        ({"ping_interval": 0}, "$.ping_interval"),
        ({"after_crash": "ignore"}, "$.after_crash"),
        ({"removed_retention_days": 7}, "removed_retention_days"),
    ],
    ids=["no jobs", "negative floor", "no ping period", "unknown crash rule", "unknown field"],
)
def test_spool_settings_refuse_what_breaks_their_constraints(
    data: dict[str, object], where: str
) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(data, SpoolSettings)
    assert where in str(info.value)


def test_settings_built_in_python_are_checked_with_the_setting_named() -> None:
    with pytest.raises(ValueError, match="max_concurrent_send_jobs must be at least 1"):
        SpoolSettings(max_concurrent_send_jobs=0)
    with pytest.raises(ValueError, match="min_free_space must be >= 0"):
        WriterSettings(min_free_space=-1)


def test_settings_are_frozen() -> None:
    settings = SpoolSettings()
    with pytest.raises(AttributeError):
        settings.removed_retention = timedelta(days=1)  # type: ignore[misc]


def test_the_writer_share_follows_the_spool_settings() -> None:
    intervals = (RetryInterval(timedelta(minutes=2)),)
    spool = SpoolSettings(
        default_retry_intervals=intervals,
        min_free_space=5,
        sync="fsync",
        idempotency_window=timedelta(hours=3),
    )

    assert spool.writer == WriterSettings(
        default_retry_intervals=intervals,
        min_free_space=5,
        sync="fsync",
        idempotency_window=timedelta(hours=3),
    )


# ------------------------------------------------------------ from the config


def test_the_spool_table_gives_the_spool_its_settings(tmp_path: Path) -> None:
    raw = {
        "spool": {
            "dir": "spool",
            "max_concurrent_send_jobs": 7,
            "retry_intervals": ["1m", "1h"],
            "retry_jitter": 0.5,
            "min_free_space": "1MiB",
            "sync": "fsync",
            "max_queue_lifetime": "2d",
            "on_permanent_failure": "bounce",
            "retries_exhausted": "freeze",
            "delay_warning": "4h",
            "after_crash": "freeze",
            "removed_retention": "3d",
            "history_retention": "2d",
            "idempotency_window": "6h",
        }
    }

    settings = parse_config(raw, tmp_path / "spoold.toml").spool.settings

    assert settings == SpoolSettings(
        max_concurrent_send_jobs=7,
        default_retry_intervals=(
            RetryInterval(timedelta(minutes=1), timedelta(seconds=30)),
            RetryInterval(timedelta(hours=1), timedelta(minutes=30)),
        ),
        min_free_space=1024 * 1024,
        sync="fsync",
        delivery_policy=DeliveryPolicy(
            max_queue_lifetime=timedelta(days=2),
            on_permanent_failure=OnPermanentFailure.BOUNCE,
            delay_warning=timedelta(hours=4),
            retries_exhausted=RetriesExhausted.FREEZE,
        ),
        after_crash="freeze",
        removed_retention=timedelta(days=3),
        history_retention=timedelta(days=2),
        idempotency_window=timedelta(hours=6),
    )


def test_the_defaults_of_the_spool_table_are_the_library_defaults(tmp_path: Path) -> None:
    settings = parse_config({"spool": {"dir": "spool"}}, tmp_path / "x.toml").spool.settings

    library = SpoolSettings()
    assert settings.max_concurrent_send_jobs == library.max_concurrent_send_jobs
    assert settings.default_retry_intervals == tuple(DEFAULT_RETRY_INTERVALS)
    assert settings.min_free_space == library.min_free_space
    assert settings.sync == library.sync
    assert settings.removed_retention == library.removed_retention
    assert settings.history_retention == library.history_retention
    assert settings.idempotency_window == library.idempotency_window
    assert settings.after_crash == library.after_crash


def test_the_relay_table_gives_the_connection_cache_its_settings(tmp_path: Path) -> None:
    raw = {
        "spool": {"dir": "spool"},
        "relay": {"max_connections_per_hop": 2, "max_connections": 9, "idle_timeout": "1m"},
    }

    cache = parse_config(raw, tmp_path / "spoold.toml").relay.cache

    assert cache == CacheSettings(max_per_hop=2, max_total=9, idle_timeout=60.0)


@pytest.mark.parametrize(
    ("table", "key", "value", "problem"),
    [
        ("smtp", "max_line_length", 10, "expected an integer >= 78, got 10"),
        ("smtp", "workers", 300, "expected an integer <= 256, got 300"),
        ("smtp", "workers", True, "expected an integer >= 0, got True"),
        ("smtp", "require_tls", "yes", "expected true or false, got 'yes'"),
        ("spool", "retry_jitter", True, "expected a number from 0 to 1, got True"),
        ("spool", "sync", "never", "expected one of fsync, syncfs, got 'never'"),
        ("relay", "default_route", 5, "expected a string, got 5"),
    ],
)
def test_a_value_msgspec_refuses_is_reported_in_the_configs_words(
    tmp_path: Path, table: str, key: str, value: object, problem: str
) -> None:
    raw: dict[str, dict[str, object]] = {
        "spool": {"dir": "spool"},
        "relay": {"default_route": "a"},
        "routes": {"a": {"next_hops": ["h:25"]}},
    }
    raw.setdefault(table, {})[key] = value

    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp_path / "spoold.toml")

    assert info.value.problems == [f"{table}.{key}: {problem}"]


# ------------------------------------------------------------ one assignment


async def test_a_running_spool_takes_new_settings_in_one_assignment(tmp_path: Path) -> None:
    async with Spool.open(tmp_path, relay=InMemoryRelay(), min_free_space=0) as spool:
        await spool.add(batch())  # room enough
        stricter = msgspec.structs.replace(
            spool.settings, min_free_space=ALL_THE_DISK, removed_retention=timedelta(hours=1)
        )

        spool.settings = stricter

        assert spool.settings == stricter
        assert spool.removed_retention == timedelta(hours=1)
        with pytest.raises(InsufficientStorageError):
            await spool.add(batch())

        spool.settings = msgspec.structs.replace(stricter, min_free_space=0)
        assert len(await spool.add(batch())) == 1


async def test_one_setting_set_alone_replaces_the_settings_value(tmp_path: Path) -> None:
    async with Spool.open(tmp_path, relay=InMemoryRelay(), max_concurrent_send_jobs=2) as spool:
        before = spool.settings

        spool.max_concurrent_send_jobs = 5

        assert spool.settings == msgspec.structs.replace(before, max_concurrent_send_jobs=5)
        with pytest.raises(ValueError, match="at least 1"):
            spool.max_concurrent_send_jobs = 0
        assert spool.settings.max_concurrent_send_jobs == 5  # a refused change changes nothing


async def test_open_takes_a_settings_value(tmp_path: Path) -> None:
    settings = SpoolSettings(max_concurrent_send_jobs=3, removed_retention=timedelta(hours=2))
    async with Spool.open(tmp_path, relay=InMemoryRelay(), settings=settings) as spool:
        assert spool.settings == settings
        assert spool.max_concurrent_send_jobs == 3


async def test_a_running_writer_takes_new_settings_in_one_assignment(tmp_path: Path) -> None:
    async with Spool.open(tmp_path, relay=InMemoryRelay()):
        pass  # the directory, made by its owner
    async with SpoolWriter.open(tmp_path, settings=WriterSettings()) as writer:
        await writer.add(batch())

        writer.settings = WriterSettings(min_free_space=ALL_THE_DISK)

        assert writer.min_free_space == ALL_THE_DISK
        with pytest.raises(InsufficientStorageError):
            await writer.add(batch())


def test_a_connection_cache_takes_new_settings_in_one_assignment() -> None:
    cache = ConnectionCache()

    cache.settings = CacheSettings(max_per_hop=1, max_total=2, idle_timeout=5.0)

    assert cache.settings == CacheSettings(max_per_hop=1, max_total=2, idle_timeout=5.0)


async def test_one_writer_setting_set_alone_replaces_the_settings_value(tmp_path: Path) -> None:
    async with Spool.open(tmp_path, relay=InMemoryRelay()):
        pass  # the directory, made by its owner
    intervals = (RetryInterval(timedelta(minutes=3)),)
    async with SpoolWriter.open(tmp_path, default_retry_intervals=intervals) as writer:
        before = writer.settings

        writer.idempotency_window = timedelta(hours=5)

        assert writer.settings == msgspec.structs.replace(
            before, idempotency_window=timedelta(hours=5)
        )
        assert writer.settings.default_retry_intervals == intervals
