"""``spoold retry-plan ID`` against a running daemon: the plan follows the
message's intervals and the configured lifetime and policy, and a reload
changes it live."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path

from spoold.message import RetryInterval, SendAt
from spoold.times import rfc3339, utcnow
from tests.daemon_helpers import (
    DaemonFactory,
    cli,
    prefill,
    spooled,
    write_config,
)
from tests.support import free_port

HOUR = timedelta(hours=1)


def plan_of(config: Path, mid: str) -> dict[str, object]:
    done = cli("--config", str(config), "retry-plan", mid, "--format", "json")
    assert done.code == 0, done.err
    plan: dict[str, object] = json.loads(done.out)
    return plan


def times(start: datetime, *hours: float) -> list[str]:
    return [rfc3339(start + h * HOUR) for h in hours]


async def test_retry_plan_follows_the_config_and_a_reload(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    first = (utcnow() + HOUR).replace(microsecond=0)
    (mid,) = await prefill(
        tmp_path / "spool",
        [
            spooled(
                "127.0.0.1:25",
                status=SendAt(at=first),
                retry_intervals=[RetryInterval(HOUR), RetryInterval(2 * HOUR)],
            )
        ],
    )
    await start_daemon(config)
    status = cli("--config", str(config), "status", "--format", "json")
    (view,) = [json.loads(line) for line in status.out.splitlines()]
    spool_date = datetime.fromisoformat(view["spool_date"])
    assert view["in_doubt"] is False

    # The defaults: 5 days of lifetime, freeze, and the last interval (2h)
    # repeats until the lifetime ends: the plan lists two attempts and sums
    # up the rest.
    expiry = spool_date + timedelta(days=5)
    plan = plan_of(config, mid)
    attempts = plan["attempts"]
    assert isinstance(attempts, list)
    assert [a["earliest"] for a in attempts] == times(first, 0, 1)
    assert [a["latest"] for a in attempts] == times(first, 0, 1)
    count = math.ceil((expiry - (first + HOUR)) / (2 * HOUR))
    assert 55 <= count <= 60  # 5 days, less the first hours, every 2h
    assert plan["repeats"] == {
        "first": 3,
        "earliest": rfc3339(first + 3 * HOUR),
        "latest": rfc3339(first + 3 * HOUR),
        "shortest_wait": 7200.0,
        "longest_wait": 7200.0,
        "until": rfc3339(expiry),
        "min_count": count,
        "max_count": count,
    }
    assert plan["ends"] == [
        {
            "action": "freeze",
            "reason": "lifetime",
            "earliest": rfc3339(expiry),
            "latest": rfc3339(expiry),
        }
    ]
    assert plan["expiry"] == rfc3339(expiry)
    assert plan["on_permanent_failure"] == "freeze"
    assert plan["retries_exhausted"] == "repeat_last"

    table = cli("--config", str(config), "retry-plan", mid)
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert lines[-2:] == [
        f"then every 2h until {rfc3339(expiry)} ({count} more attempts, #3 on; "
        f"the first {rfc3339(first + 3 * HOUR)})",
        f"then freeze (the queue lifetime ends): {rfc3339(expiry)}",
    ]

    # The earlier rule, by a reload: the intervals run out, then it freezes.
    text = config.read_text()
    config.write_text(
        text.replace(
            'flush_timeout = "1s"\n', 'flush_timeout = "1s"\nretries_exhausted = "freeze"\n'
        )
    )
    assert cli("--config", str(config), "reload").code == 0
    plan = plan_of(config, mid)
    attempts = plan["attempts"]
    assert isinstance(attempts, list)
    assert [a["earliest"] for a in attempts] == times(first, 0, 1, 3)
    assert plan["repeats"] is None
    assert plan["ends"] == [
        {
            "action": "freeze",
            "reason": "intervals",
            "earliest": rfc3339(first + 3 * HOUR),
            "latest": rfc3339(first + 3 * HOUR),
        }
    ]
    table = cli("--config", str(config), "retry-plan", mid)
    assert table.code == 0, table.err
    assert f"then freeze (no retry interval left): {rfc3339(first + 3 * HOUR)}" in table.out

    # A shorter lifetime and bounces, applied by a reload: the second retry
    # is brought forward to the end of the lifetime, and it bounces then.
    text = config.read_text()
    config.write_text(
        text.replace(
            'flush_timeout = "1s"\n',
            'flush_timeout = "1s"\nmax_queue_lifetime = "3h"\non_permanent_failure = "bounce"\n',
        )
    )
    assert cli("--config", str(config), "reload").code == 0
    plan = plan_of(config, mid)
    expiry = spool_date + 3 * HOUR
    attempts = plan["attempts"]
    assert isinstance(attempts, list)
    assert [a["earliest"] for a in attempts] == [*times(first, 0, 1), rfc3339(expiry)]
    assert plan["ends"] == [
        {
            "action": "bounce",
            "reason": "lifetime",
            "earliest": rfc3339(expiry),
            "latest": rfc3339(expiry),
        }
    ]
    assert plan["on_permanent_failure"] == "bounce"


async def test_retry_plan_of_an_unknown_id_is_a_clear_error(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    await start_daemon(config)
    done = cli("--config", str(config), "retry-plan", "8DsiUFeJ098b3CijH")
    assert done.code != 0
    assert "8DsiUFeJ098b3CijH: no such message in active or frozen" in done.err
    bad = cli("--config", str(config), "retry-plan", "../etc/passwd")
    assert bad.code != 0
    assert "passwd" in bad.err
