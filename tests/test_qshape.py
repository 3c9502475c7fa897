"""``spoold status --format qshape``: recipient domains by age buckets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from spoold.body import Body
from spoold.daemon.qshape import queue_shape, render_queue_shape
from spoold.message import SEND_NOW, Frozen, Message, Status
from spoold.ondisk import NewMessage
from spoold.times import rfc3339
from tests.daemon_helpers import cli, prefill
from tests.factories import make_message

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def view(minutes: float, remaining: list[str], recipients: list[str] | None = None) -> Any:
    """A listing entry (the keys qshape reads) spooled ``minutes`` before NOW."""
    return {
        "id": "x",
        "spool_date": rfc3339(NOW - timedelta(minutes=minutes)),
        "remaining_recipients": remaining,
        "envelope_info": {"recipients": recipients or remaining},
    }


def test_buckets_totals_and_order() -> None:
    views = [
        view(0, ["a@example.com"]),
        view(4.99, ["b@example.com", "c@EXAMPLE.com"]),  # one domain: counted once
        view(5, ["a@example.com"]),  # a bound belongs to the next bucket
        view(19, ["a@example.org", "b@example.com"]),  # two domains: once in each
        view(1279, ["a@example.org"]),
        view(1280, ["x@slow.example"]),
        view(60 * 24 * 9, ["y@slow.example"]),
        view(30, [], ["gone@failed.example"]),  # nothing remains: its recipients count
        {"id": "u", "unreadable": True, "quarantine_reason": "bad"},  # no date: left out
        view(-3, ["future@example.com"]),  # a clock step back: the youngest bucket
    ]
    shape = queue_shape(views, NOW)
    assert shape.total == (3, 1, 1, 1, 0, 0, 0, 0, 1, 2)
    assert render_queue_shape(shape).splitlines() == [
        "                   T     5    10    20    40    80   160   320   640  1280 1280+",
        "         TOTAL     9     3     1     1     1     0     0     0     0     1     2",
        "   example.com     5     3     1     1     0     0     0     0     0     0     0",
        "   example.org     2     0     0     1     0     0     0     0     0     1     0",
        "  slow.example     2     0     0     0     0     0     0     0     0     0     2",
        "failed.example     1     0     0     0     1     0     0     0     0     0     0",
    ]


def test_rendered_table() -> None:
    views = [
        view(1, ["a@example.com"]),
        view(12, ["b@example.com"]),
        view(12, ["c@example.org"]),
        view(2000, ["d@example.com"]),
    ]
    assert render_queue_shape(queue_shape(views, NOW)).splitlines() == [
        "                T     5    10    20    40    80   160   320   640  1280 1280+",
        "      TOTAL     4     1     0     2     0     0     0     0     0     0     1",
        "example.com     3     1     0     1     0     0     0     0     0     0     1",
        "example.org     1     0     0     1     0     0     0     0     0     0     0",
    ]


def test_empty_queue() -> None:
    assert render_queue_shape(queue_shape([], NOW)).splitlines() == [
        "          T     5    10    20    40    80   160   320   640  1280 1280+",
        "TOTAL     0     0     0     0     0     0     0     0     0     0     0",
    ]


async def test_status_format_qshape_from_a_spool(tmp_path: Path) -> None:
    """From disk (no daemon), with spool dates well inside their buckets:
    the few seconds the command takes cannot move a message to another."""
    now = datetime.now(UTC)

    def aged(minutes: int, rcpt: str, frozen: bool = False) -> NewMessage:
        def build(mid: str, related: list[str]) -> Message:
            return make_message(
                mid,
                recipients=[rcpt],
                spool_date=now - timedelta(minutes=minutes),
                status=status,
            )

        status: Status = Frozen() if frozen else SEND_NOW
        return NewMessage(Body.from_content(b"Subject: q\r\n\r\nx\r\n"), status, build)

    spool_dir = tmp_path / "spool"
    await prefill(
        spool_dir,
        [
            aged(7, "a@example.com"),
            aged(7, "b@example.com"),
            aged(180, "c@example.com", frozen=True),
            aged(180, "d@partner.example"),
            aged(3 * 24 * 60, "e@partner.example"),
        ],
    )
    done = await anyio.to_thread.run_sync(
        lambda: cli("--spool-dir", str(spool_dir), "status", "--format", "qshape")
    )
    assert done.code == 0, done.err
    assert done.out.splitlines() == [
        "                    T     5    10    20    40    80   160   320   640  1280 1280+",
        "          TOTAL     5     0     2     0     0     0     0     2     0     0     1",
        "    example.com     3     0     2     0     0     0     0     1     0     0     0",
        "partner.example     2     0     0     0     0     0     0     1     0     0     1",
    ]
