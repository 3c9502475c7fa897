"""The admin CLI end to end: ``spoold <command>`` as a subprocess against a
running daemon (``spoold run`` as a subprocess), and against a spool with no
daemon.

The spool is pre-filled before the daemon starts with two messages delayed
far into the future (``send_at``, so no attempt starts by itself) and two
frozen ones, all with one next hop where nothing listens: every attempt an
operator starts fails at once (connection refused) and is recorded as a
relay attempt. Each test asserts the exit code, what is printed and what
changed, through the daemon and on disk.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from spoold.daemon.cli import main, retry_plan_attempt_lines
from spoold.daemon.control import ControlClient
from spoold.errors import InsufficientStorageError
from spoold.message import Frozen, RetryInterval, SendAt
from spoold.testing import FakeClock
from spoold.times import format_size, rfc3339, utcnow
from tests.daemon_helpers import (
    BODY,
    DaemonFactory,
    DaemonProcess,
    child_env,
    cli,
    far_future,
    prefill,
    spooled,
    write_config,
)
from tests.spool_helpers import batch, open_spool, relay_answering
from tests.support import WAIT_TIMEOUT, free_port, records_in, spool_files, wait_until

# The record's field names (DESIGN §1), every one a key of the JSON listing.
RECORD_FIELDS = {
    "id",
    "parent_id",
    "related_ids",
    "flows",
    "spool_date",
    "next_hop_choices",
    "retry_intervals",
    "remaining_recipients",
    "failed_recipients",
    "relay_attempts",
    "status",
    "envelope_info",
}

BAD_IDS = ["../../etc/passwd", "a/b", ""]

# What ``spoold count`` prints for a FilledSpool (as text).
FILLED_COUNTS = {"active": "2", "frozen": "2", "sending": "0", "removed": "0", "quarantine": "0"}


@dataclass
class FilledSpool:
    """A spool with two delayed and two frozen messages."""

    config: Path
    spool_dir: Path
    hop: str
    later: list[str]  # send_at, far in the future
    frozen: list[str]
    filled: tuple[datetime, datetime]  # the spool dates are between these
    daemon: DaemonProcess | None = None

    @property
    def all_ids(self) -> list[str]:
        return sorted(self.later + self.frozen)

    def cli(self, *args: str) -> Any:
        return cli("--config", str(self.config), *args)


async def fill(tmp_path: Path) -> FilledSpool:
    hop = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, next_hops=[hop])
    spool_dir = tmp_path / "spool"
    started = utcnow()
    send_at = SendAt(at=started + far_future())
    later = await prefill(
        spool_dir,
        [
            spooled(hop, status=send_at, recipients=["later-1@example.com"]),
            spooled(hop, status=send_at, recipients=["later-2@example.com"]),
        ],
    )
    frozen = await prefill(
        spool_dir,
        [
            spooled(hop, status=Frozen(), recipients=["frozen-1@example.com"]),
            spooled(hop, status=Frozen(), recipients=["frozen-2@example.com", "x@example.net"]),
        ],
    )
    return FilledSpool(config, spool_dir, hop, later, frozen, (started, utcnow()))


@pytest.fixture
async def queue(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> FilledSpool:
    q = await fill(tmp_path)
    q.daemon = await start_daemon(q.config)
    return q


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def by_id(text: str) -> dict[str, dict[str, Any]]:
    return {v["id"]: v for v in json_lines(text)}


def when(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text[:-1] + "+00:00")


async def views(q: FilledSpool) -> dict[str, dict[str, Any]]:
    assert q.daemon is not None
    listing = await ControlClient(q.daemon.socket, timeout=10).request("status")
    return {v["id"]: v for v in listing}


async def wait_for_views(
    q: FilledSpool, done: Callable[[dict[str, dict[str, Any]]], bool]
) -> dict[str, dict[str, Any]]:
    """Poll the daemon's listing until ``done`` holds; that listing."""
    last: dict[str, dict[str, Any]] = {}

    async def reached() -> dict[str, dict[str, Any]] | None:
        last.update(await views(q))
        return dict(last) if done(last) else None

    result: dict[str, dict[str, Any]] = await wait_until(
        reached, lambda: f"the listing to change: {json.dumps(last, indent=1)}", interval=0.05
    )
    return result


def attempted(*ids: str, times: int = 1) -> Callable[[dict[str, dict[str, Any]]], bool]:
    """Each of ``ids`` has ``times`` relay attempts and is not being sent."""
    return lambda vs: all(
        len(vs[i]["relay_attempts"]) == times and vs[i]["status"] != "sending" for i in ids
    )


# -------------------------------------------------------------- status


async def test_status_json_lists_every_record_field(queue: FilledSpool) -> None:
    done = queue.cli("status", "--format", "json")
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert len(lines) == 4
    listing = by_id(done.out)
    assert sorted(listing) == queue.all_ids

    first, last = queue.filled
    for mid, view in listing.items():
        assert RECORD_FIELDS | {"queue"} <= set(view), sorted(view)
        assert isinstance(view["status"], str)
        assert view["id"] == mid
        assert first <= when(view["spool_date"]) <= last
        assert view["relay_attempts"] == []
        assert view["next_hop_choices"] == [queue.hop]
        assert view["envelope_info"]["sender"] == "sender@example.org"
        assert view["envelope_info"]["recipients"] == view["remaining_recipients"]
        assert view["failed_recipients"] == []
        assert isinstance(view["related_ids"], list) and isinstance(view["flows"], list)
    for mid in queue.later:
        assert listing[mid]["status"] == "send_at"
        assert listing[mid]["queue"] == "active"
        assert when(listing[mid]["send_at"]) == first + far_future()
    for mid in queue.frozen:
        assert listing[mid]["status"] == "frozen"
        assert listing[mid]["queue"] == "frozen"
        assert "send_at" not in listing[mid]
        assert "quarantine_reason" not in listing[mid]
    assert listing[queue.frozen[1]]["remaining_recipients"] == [
        "frozen-2@example.com",
        "x@example.net",
    ]

    # The same listing through --socket.
    assert queue.daemon is not None
    again = cli("--socket", str(queue.daemon.socket), "status", "--format", "json")
    assert again.code == 0
    assert by_id(again.out) == listing


def without_ages(table: str) -> list[list[str]]:
    """The table's rows as words, each age (``5s``, ``2m``, ...) as ``AGE``:
    ages tick between two calls, and the column widths follow them."""
    return [[re.sub(r"^\d+[smhd]$", "AGE", w) for w in line.split()] for line in table.splitlines()]


async def test_status_id_table_and_exim_formats(queue: FilledSpool) -> None:
    done = queue.cli("status", "--format", "id")
    assert done.code == 0
    assert done.out.splitlines() == queue.all_ids

    done = queue.cli("status")  # table is the default
    assert done.code == 0, done.err
    header = done.out.splitlines()[0].split()
    assert header[:3] == ["ID", "STATUS", "AGE"]
    rows = {line.split()[0]: line for line in done.out.splitlines()[1:] if line.strip()}
    for mid in queue.frozen:
        assert rows[mid].split()[1] == "frozen"
    for mid in queue.later:
        assert rows[mid].split()[1] == "at"  # "at HH:MM:SS"
    assert done.out.rstrip().endswith("4 message(s)")
    # The same table either way (ages may tick between the two calls).
    table = without_ages(done.out)
    ages = [row.count("AGE") for row in table if row and row[0] in queue.all_ids]
    assert ages == [1, 1, 1, 1], (ages, table)
    assert without_ages(queue.cli("status", "--format", "table").out) == table

    done = queue.cli("status", "--format", "exim")
    assert done.code == 0
    blocks = [b.splitlines() for b in done.out.strip("\n").split("\n\n")]
    assert len(blocks) == 4
    heads = {b[0].split()[2]: b for b in blocks}
    assert sorted(heads) == queue.all_ids
    for mid in queue.frozen:
        assert heads[mid][0].endswith("<sender@example.org> *** frozen ***")
    for mid in queue.later:
        assert heads[mid][0].endswith("<sender@example.org>")
    assert [line.strip() for line in heads[queue.frozen[1]][1:]] == [
        "frozen-2@example.com",
        "x@example.net",
    ]


async def test_status_frozen_only_and_active_only(queue: FilledSpool) -> None:
    done = queue.cli("status", "--frozen-only", "--format", "id")
    assert done.code == 0
    assert done.out.splitlines() == sorted(queue.frozen)
    done = queue.cli("status", "--active-only", "--format", "id")
    assert done.code == 0
    assert done.out.splitlines() == sorted(queue.later)
    done = queue.cli("status", "--active-only", "--frozen-only")
    assert done.code == 2
    assert "exclude each other" in done.err


async def test_count(queue: FilledSpool) -> None:
    done = queue.cli("count")
    assert done.code == 0, done.err
    assert dict(line.split() for line in done.out.splitlines()) == FILLED_COUNTS


# ---------------------------------------------------------- operations


async def test_freeze(queue: FilledSpool) -> None:
    mid = queue.later[0]
    done = queue.cli("freeze", mid)
    assert done.code == 0, done.err
    assert done.out.strip() == f"frozen: {mid}"
    assert queue.cli("status", "--frozen-only", "--format", "id").out.splitlines() == sorted(
        [*queue.frozen, mid]
    )
    assert mid in records_in(queue.spool_dir, "frozen")
    assert mid not in records_in(queue.spool_dir, "active")

    again = queue.cli("freeze", mid)
    assert again.code == 1
    assert mid in again.err and "already frozen" in again.err

    unknown = queue.cli("freeze", "0000000000000000A")
    assert unknown.code == 1
    assert "0000000000000000A" in unknown.err


async def test_send_one_with_a_retry_interval(queue: FilledSpool) -> None:
    mid = queue.frozen[0]
    started = utcnow()
    done = queue.cli("send", mid, "--retry-interval", "1h")
    assert done.code == 0, done.err
    assert done.out.strip() == "sending 1 message(s)"

    # Refused at the next hop; the added interval is used: delayed by an hour,
    # and kept, since an operator's kick never uses an interval up.
    view = (await wait_for_views(queue, attempted(mid)))[mid]
    listed = by_id(queue.cli("status", "--format", "json").out)[mid]
    assert listed == view
    assert view["status"] == "send_at" and view["queue"] == "active"
    assert view["retry_intervals"] == [{"span": 3600.0, "jitter": None}]
    (attempt,) = view["relay_attempts"]
    assert set(attempt) == {"time", "error"}
    assert started <= when(attempt["time"]) <= utcnow()
    assert when(view["send_at"]) == when(attempt["time"]) + timedelta(hours=1)
    assert attempt["error"] == f"no hops available: {queue.hop}: cannot connect: Connection refused"
    assert mid in records_in(queue.spool_dir, "active")


async def test_send_one_with_no_interval_left_freezes_it_again(queue: FilledSpool) -> None:
    mid = queue.frozen[0]
    done = queue.cli("send", mid)
    assert done.code == 0, done.err
    view = (await wait_for_views(queue, attempted(mid)))[mid]
    assert view["status"] == "frozen"
    assert len(view["relay_attempts"]) == 1
    assert mid in records_in(queue.spool_dir, "frozen")


async def test_send_frozen_only_then_all(queue: FilledSpool) -> None:
    done = queue.cli("send", "--frozen-only", "--retry-interval", "2h")
    assert done.code == 0, done.err
    assert done.out.strip() == "sending 2 message(s)"
    current = await wait_for_views(queue, attempted(*queue.frozen))
    for mid in queue.frozen:
        assert current[mid]["status"] == "send_at"
        (attempt,) = current[mid]["relay_attempts"]
        assert when(current[mid]["send_at"]) == when(attempt["time"]) + timedelta(hours=2)
    for mid in queue.later:  # not frozen: not sent
        assert current[mid]["relay_attempts"] == []
        assert when(current[mid]["send_at"]) == queue.filled[0] + far_future()

    done = queue.cli("send", "--all", "--retry-interval", "1h", "--retry-interval", "3h")
    assert done.code == 0, done.err
    assert done.out.strip() == "sending 4 message(s)"
    current = await wait_for_views(
        queue, lambda vs: attempted(*queue.frozen, times=2)(vs) and attempted(*queue.later)(vs)
    )
    for mid in queue.all_ids:
        view = current[mid]
        assert view["status"] == "send_at"
        # 1h and 3h added at the head of what was there; the 1h one sets the
        # delay and stays (an operator's kick uses no interval up).
        spans = [r["span"] for r in view["retry_intervals"]]
        kept = [2 * 3600.0] if mid in queue.frozen else []
        assert spans == [3600.0, 3 * 3600.0, *kept]
        newest = view["relay_attempts"][0]  # newest first
        assert when(view["send_at"]) == when(newest["time"]) + timedelta(hours=1)


async def test_send_usage_errors(queue: FilledSpool) -> None:
    for args in (
        [],
        ["--all", queue.frozen[0]],
        ["--all", "--frozen-only"],
    ):
        done = queue.cli("send", *args)
        assert done.code == 2, args
        assert "give message ids, --all or --frozen-only" in done.err
    done = queue.cli("send", "--all", "--retry-interval", "soon")
    assert done.code == 2
    assert "--retry-interval" in done.err and "soon" in done.err
    assert all(v["relay_attempts"] == [] for v in (await views(queue)).values())


async def test_remove_then_recover(queue: FilledSpool) -> None:
    mid = queue.frozen[0]
    done = queue.cli("remove", mid)
    assert done.code == 0, done.err
    assert done.out.strip() == f"removed: {mid}"
    assert mid not in queue.cli("status", "--format", "id").out.split()
    assert mid in records_in(queue.spool_dir, "removed")
    shown = queue.cli("show", mid)
    assert shown.code == 0, shown.err
    assert json.loads(shown.out)["status"] == "removed"
    assert json.loads(shown.out)["queue"] == "removed"

    done = queue.cli("recover", "--from", "removed", mid)
    assert done.code == 0, done.err
    assert done.out.strip() == f"recovered (frozen): {mid}"
    assert queue.cli("status", "--frozen-only", "--format", "id").out.split() == sorted(
        queue.frozen
    )
    assert mid in records_in(queue.spool_dir, "frozen")
    assert not records_in(queue.spool_dir, "removed")

    again = queue.cli("recover", "--from", "removed", mid)
    assert again.code == 1
    assert mid in again.err
    assert queue.cli("recover", "--from", "active", mid).code == 2


async def test_remove_refuses_a_message_that_is_not_frozen(queue: FilledSpool) -> None:
    mid = queue.later[0]
    before = spool_files(queue.spool_dir)
    done = queue.cli("remove", mid)
    assert done.code == 1
    assert mid in done.err
    assert "only frozen messages can be removed" in done.err
    assert spool_files(queue.spool_dir) == before
    assert (await views(queue))[mid]["status"] == "send_at"


class EventsCommand:
    """``spoold events`` in a subprocess, its output read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.stdout = proc.stdout
        self.pending: asyncio.Future[bytes] | None = None

    @classmethod
    async def start(cls, q: FilledSpool) -> EventsCommand:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "spoold.daemon.cli", "--config", str(q.config), "events"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        return cls(proc)

    async def next_event(self) -> dict[str, Any]:
        """The next event about a message (pings, every 30 s, are skipped)."""
        while True:
            if self.pending is None:
                self.pending = asyncio.ensure_future(self.stdout.readline())
            line = await asyncio.wait_for(self.pending, WAIT_TIMEOUT)
            self.pending = None
            assert line, "spoold events ended"
            event: dict[str, Any] = json.loads(line)
            if event["event"] != "ping":
                return event

    async def subscribed(self, q: FilledSpool) -> None:
        """Return once the subscription is up: kick ``q.later[1]`` (``spoold
        send``: an attempt, refused, then frozen; each kick makes events)
        until an event shows. A kick made before the subscription makes
        none, so a fixed number of kicks could wait for ever."""
        self.pending = asyncio.ensure_future(self.stdout.readline())

        async def shown() -> bool:
            assert self.pending is not None
            if not self.pending.done():
                q.cli("send", q.later[1])  # refused while an attempt runs: fine
                await asyncio.wait({self.pending}, timeout=0.5)
            return self.pending.done()

        await wait_until(shown, "an event from spoold events")


async def test_events_streams_json_lines(queue: FilledSpool) -> None:
    assert queue.daemon is not None
    events = await EventsCommand.start(queue)
    try:
        await events.subscribed(queue)
        mid = queue.later[0]
        started = utcnow()
        assert queue.cli("freeze", mid).code == 0
        event = await events.next_event()
        while event["id"] != mid:  # the kicked message may still have something to say
            assert event["id"] == queue.later[1], event
            event = await events.next_event()
        assert event == {
            "event": "frozen",
            "id": mid,
            "time": event["time"],
            "sender": "sender@example.org",
            "recipients": ["later-1@example.com"],
        }
        assert started <= when(event["time"]) <= utcnow()
    finally:
        if events.proc.returncode is None:
            events.proc.terminate()
        assert await asyncio.wait_for(events.proc.wait(), WAIT_TIMEOUT) == -signal.SIGTERM
    assert queue.daemon.running


async def test_show_a_record_and_its_body(queue: FilledSpool) -> None:
    mid = queue.later[1]
    done = queue.cli("show", mid)
    assert done.code == 0, done.err
    record = json.loads(done.out)
    assert record["id"] == mid
    assert record["status"] == "send_at"
    assert RECORD_FIELDS | {"queue"} <= set(record)
    assert record == (await views(queue))[mid]

    done = queue.cli("show", "--body", mid)
    assert done.code == 0, done.err
    assert done.stdout.endswith(b"\n\n" + BODY)  # as submitted: dot-stuffing undone
    assert json.loads(done.stdout[: -len(BODY)]) == record

    missing = queue.cli("show", "0000000000000000A")
    assert missing.code == 1
    assert "0000000000000000A" in missing.err


async def test_reload_check_and_info(queue: FilledSpool) -> None:
    assert queue.daemon is not None
    done = queue.cli("reload")
    assert done.code == 0, done.err
    assert done.out.strip() == "reloaded"

    done = queue.cli("check")
    assert done.code == 0, done.err
    assert done.out.strip() == "spool is consistent"

    done = queue.cli("info")
    assert done.code == 0, done.err
    info = json.loads(done.out)
    assert info["pid"] == queue.daemon.pid
    assert info["config"] == str(queue.config)
    assert info["spool_dir"] == str(queue.spool_dir)
    assert info["max_concurrent_send_jobs"] == 4
    assert info["routes"] == ["smarthost"]


async def test_check_reports_problems_and_exits_1(queue: FilledSpool) -> None:
    assert queue.daemon is not None
    mid = queue.frozen[0]
    (queue.spool_dir / "removed" / mid).write_bytes((queue.spool_dir / "frozen" / mid).read_bytes())
    (queue.spool_dir / "active" / "not.an.id").write_bytes(b"")
    for where in (["--config", str(queue.config)], ["--spool-dir", str(queue.spool_dir)]):
        done = cli(*where, "check")
        assert done.code == 1, where
        problems = done.out.splitlines()
        assert len(problems) == 2, problems
        assert any(p.startswith(f"duplicate: {mid}: ") and "frozen, removed" in p for p in problems)
        assert any(p.startswith("stray_file: not.an.id: ") for p in problems)


# ------------------------------------------------------ without a daemon


async def test_status_count_and_check_read_the_disk_when_no_daemon_runs(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    q = await fill(tmp_path)
    before = spool_files(q.spool_dir)
    socket_path = tmp_path / "run" / "ctl.sock"
    assert not socket_path.exists()

    for where in (["--spool-dir", str(q.spool_dir)], ["--config", str(q.config)]):
        done = cli(*where, "status", "--format", "json")
        assert done.code == 0, (where, done.err)
        assert sorted(by_id(done.out)) == q.all_ids
        assert cli(*where, "status", "--frozen-only", "--format", "id").out.split() == sorted(
            q.frozen
        )
        table = cli(*where, "status")
        assert table.code == 0 and table.out.rstrip().endswith("4 message(s)")

        done = cli(*where, "count")
        assert done.code == 0, done.err
        assert dict(line.split() for line in done.out.splitlines()) == FILLED_COUNTS
        done = cli(*where, "check")
        assert done.code == 0, done.err
        assert done.out.strip() == "spool is consistent"
    assert spool_files(q.spool_dir) == before  # reading changed nothing

    # The disk listing is the daemon's listing.
    from_disk = by_id(cli("--spool-dir", str(q.spool_dir), "status", "--format", "json").out)
    daemon = await start_daemon(q.config)
    from_daemon = by_id(cli("--config", str(q.config), "status", "--format", "json").out)
    assert from_disk == from_daemon

    # A daemon killed outright leaves its socket behind: reading falls back
    # to the disk, an operation says it cannot reach the daemon, and the
    # next daemon takes the socket over.
    daemon.send_signal(signal.SIGKILL)
    assert await daemon.wait_exit() == -signal.SIGKILL
    assert socket_path.is_socket()
    done = q.cli("status", "--format", "id")
    assert done.code == 0, done.err
    assert done.out.split() == q.all_ids
    assert dict(line.split() for line in q.cli("count").out.splitlines())["frozen"] == "2"
    done = q.cli("freeze", q.later[0])
    assert done.code == 2
    assert f"cannot reach the daemon at {socket_path}" in done.err
    daemon = await start_daemon(q.config)
    assert json.loads(q.cli("info").out)["pid"] == daemon.pid


async def test_a_command_that_needs_the_daemon_says_there_is_none(tmp_path: Path) -> None:
    q = await fill(tmp_path)
    socket_path = tmp_path / "run" / "ctl.sock"
    before = spool_files(q.spool_dir)
    for where in (["--config", str(q.config)], ["--socket", str(socket_path)]):
        done = cli(*where, "freeze", q.later[0])
        assert done.code == 2
        assert f"control socket {socket_path} does not exist" in done.err
    for args in (["info"], ["reload"], ["send", "--all"]):
        done = q.cli(*args)
        assert done.code == 2, args
        assert "does not exist" in done.err
    assert spool_files(q.spool_dir) == before


# --------------------------------------------------------------- bad ids


async def test_ids_that_are_not_ids_are_refused_and_touch_nothing(queue: FilledSpool) -> None:
    before = spool_files(queue.spool_dir)
    for bad in BAD_IDS:
        for command in (
            ["freeze", bad],
            ["send", bad],
            ["remove", bad],
            ["recover", "--from", "removed", bad],
            ["recover", "--from", "quarantine", bad],
            ["show", bad],
            # One bad id among good ones: nothing is done to the good ones.
            ["freeze", queue.later[0], bad],
            ["remove", queue.frozen[0], bad],
        ):
            done = queue.cli(*command)
            assert done.code == 2, (command, done.out, done.err)
            assert "not a message id" in done.err, command
            assert done.out == "", command
    assert spool_files(queue.spool_dir) == before
    assert sorted(await views(queue)) == queue.all_ids
    assert not (queue.spool_dir / "etc").exists()
    assert os.path.exists("/etc/passwd")


# ------------------------------------------------------- readable output


@pytest.mark.installed  # the version is the installed package's
def test_version() -> None:
    done = cli("--version")
    assert done.code == 0
    assert re.fullmatch(r"spoold \d+\.\d+\.\d+\S*\n", done.out)


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (None, "    ?"),
        (0, "    0"),
        (512, "  512"),
        (1023, " 1023"),
        (1024, " 1.0K"),
        (4398, " 4.3K"),
        (10 * 1024, "  10K"),
        (1024 * 1024 - 1, "1024K"),
        (1024 * 1024, " 1.0M"),
        (31 * 1024 * 1024, "  31M"),
    ],
)
def test_sizes_are_shown_as_exim_shows_them(size: int | None, shown: str) -> None:
    from spoold.daemon.status_output import exim_size

    assert exim_size(size) == shown


async def test_the_table_uses_the_width_it_is_given_and_wide_shows_errors_whole(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    q = await fill(tmp_path)
    await start_daemon(q.config)
    mid = q.frozen[0]
    assert q.cli("send", mid).code == 0  # its hop refuses the connection: a long error
    (attempt,) = await wait_until(
        lambda: by_id(q.cli("status", "--format", "json").out)[mid]["relay_attempts"],
        "the attempt",
        interval=0.05,
    )
    error = attempt["error"]
    assert len(error) > 40

    def run(*args: str, columns: int) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "spoold.daemon.cli", "--config", str(q.config), "status", *args],
            capture_output=True,
            timeout=30,
            check=True,
            env=child_env({"COLUMNS": str(columns)}),
        )
        return done.stdout.decode()

    for columns in (80, 160):
        lines = run(columns=columns).splitlines()
        assert max(len(line) for line in lines) <= columns
        assert "SIZE" in lines[0]
    # At 80 columns the error has a line of its own under its message, so
    # it stays readable: cut at the width, not to a few characters.
    narrow = run(columns=80).splitlines()
    assert narrow[1].strip() == "LAST ERROR"
    row = next(i for i, line in enumerate(narrow) if line.startswith(mid))
    assert narrow[row + 1] == "    " + (error if len(error) <= 76 else error[:75] + "…")
    assert "LAST ERROR" in run(columns=160).splitlines()[0]  # room for it: a column
    wide = run("--wide", columns=80)
    assert max(len(line) for line in wide.splitlines()) <= 80
    assert "".join(error.split()) in "".join(wide.split())  # whole, wrapped


async def test_events_exit_1_when_the_daemon_goes_away(queue: FilledSpool) -> None:
    assert queue.daemon is not None
    events = await EventsCommand.start(queue)
    await events.subscribed(queue)
    queue.daemon.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(events.proc.communicate(), WAIT_TIMEOUT)
    assert events.proc.returncode == 1
    assert err.decode().endswith("the daemon closed the event stream (it stopped or restarted)\n")


async def test_an_unknown_id_among_good_ones_is_named(queue: FilledSpool) -> None:
    done = queue.cli("freeze", queue.later[0], "bogus")
    assert done.code == 1
    assert "bogus" in done.err
    assert queue.later[0] not in done.err.replace("bogus", "")
    assert by_id(queue.cli("status", "--format", "json").out)[queue.later[0]]["status"] == (
        "send_at"
    )


async def test_json_logs_hold_no_python_reprs(queue: FilledSpool) -> None:
    assert queue.daemon is not None
    mid = queue.frozen[0]
    assert queue.cli("send", mid, "--retry-interval", "1h").code == 0
    done = await queue.daemon.wait_log(lambda line: line.get("event") == "attempt done")
    text = queue.daemon.log_text()
    assert "datetime.datetime(" not in text
    assert "PosixPath(" not in text
    record = json.loads(queue.cli("show", mid).out)
    assert done == {
        "event": "attempt done",
        "level": "info",
        "timestamp": done["timestamp"],
        "id": mid,
        "flows": [],
        "outcome": "delayed",
        "delivered": 0,
        "failed": 0,
        "later": 1,
        "at": record["send_at"],  # times as RFC 3339 strings, like the listing's
    }
    assert when(done["at"]) == when(record["relay_attempts"][0]["time"]) + timedelta(hours=1)
    assert when(done["timestamp"]) >= when(record["relay_attempts"][0]["time"])


# -----------------------------------------------------------------------------
# ``spoold retry-plan ID`` against a running daemon: the plan follows the
# message's intervals and the configured lifetime and policy, and a reload
# changes it live.


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


# -----------------------------------------------------------------------------
# What the admin commands print for an operator: the retry plan's table
# keeps its header over its columns, help texts promise only what the
# command does, and reading the spool directory (no daemon) answers as the
# daemon would: same exit code, same words.


MiB = 1024 * 1024


def test_the_retry_plan_header_sits_over_its_columns() -> None:
    attempts = [
        {
            "number": 1,
            "earliest": "2026-11-25T15:24:19.041457Z",
            "latest": "2026-11-25T15:24:19.041457Z",
            "conditional": False,
        },
        {
            "number": 12,
            "earliest": "2026-11-25T15:28:49Z",
            "latest": "2026-11-25T15:29:49.041457Z",
            "conditional": True,
        },
    ]
    header, first, second = retry_plan_attempt_lines(attempts)
    assert header.split() == ["#", "EARLIEST", "LATEST"]
    column = header.index("LATEST")
    assert header.index("EARLIEST") == first.index("2026") == second.index("2026")
    assert first[column:] == "2026-11-25T15:24:19.041457Z"
    assert second[column:] == "2026-11-25T15:29:49.041457Z  (only if not ended before)"
    assert second[:3] == " 12"


def test_the_retry_plan_header_alone_when_nothing_is_planned() -> None:
    assert retry_plan_attempt_lines([]) == ["  #  EARLIEST  LATEST"]


def test_sendmail_help_does_not_promise_output_for_a_repeated_key() -> None:
    # sendmail prints nothing on success, the first run or a repeat of its
    # key alike: the help said a repeat printed the first run's ids.
    done = CliRunner().invoke(main, ["sendmail", "--help"], terminal_width=200)
    assert done.exit_code == 0
    text = " ".join(done.output.split())
    assert "--idempotency-key KEY" in text
    assert "prints the first" not in text
    assert "nothing more is queued" in text
    assert "no output either way" in text


async def test_show_from_disk_exits_as_the_daemon_does(tmp_path: Path) -> None:
    async with open_spool(tmp_path, relay_answering({}), FakeClock(utcnow())) as spool:
        (mid,) = await spool.add(batch("a@example.com"))
        await wait_until(functools.partial(spool.find_outcome, mid), "delivery")
    run = functools.partial(cli, "--spool-dir", str(tmp_path))

    unknown = await anyio.to_thread.run_sync(run, "show", "8DsiUFeJ098b3CijH")
    assert (unknown.code, unknown.out) == (1, "")  # 1: no such message (docs/cli.md)
    assert unknown.err == "spoold: 8DsiUFeJ098b3CijH: no such message\n"

    # A delivered message is shown from the journal; its body cannot be.
    assert (await anyio.to_thread.run_sync(run, "show", mid)).code == 0
    body = await anyio.to_thread.run_sync(run, "show", "--body", mid)
    assert (body.code, body.out) == (1, "")
    assert body.err == f"spoold: {mid}: delivered; its body is gone\n"


def test_top_without_a_terminal_says_so() -> None:
    # Checked before the daemon is asked: no daemon is needed to see it.
    done = cli("--socket", "/nonexistent/ctl.sock", "top")
    assert (done.code, done.out) == (2, "")
    assert done.err == (
        "spoold: top needs a terminal (standard output is not one); "
        "for a script use status --format json, or count\n"
    )


async def test_history_with_nothing_to_show_says_so(tmp_path: Path) -> None:
    async with open_spool(tmp_path, relay_answering({}), FakeClock(utcnow())):
        pass  # an empty spool: nothing ever left its queue
    run = functools.partial(cli, "--spool-dir", str(tmp_path), "history")
    done = await anyio.to_thread.run_sync(run)
    assert (done.code, done.out, done.err) == (0, "no outcomes in the last 1h\n", "")
    done = await anyio.to_thread.run_sync(run, "--since", "1d", "--recipient", "a@example.com")
    assert (done.code, done.out) == (0, "no outcomes for a@example.com in the last 1d\n")
    done = await anyio.to_thread.run_sync(run, "--format", "json")
    assert (done.code, done.out) == (0, "")  # JSON lines: none


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0 bytes"),
        (900, "900 bytes"),
        (1024, "1 KiB"),
        (4300, "4.2 KiB"),
        (64 * MiB, "64 MiB"),
        (12 * MiB + 300 * 1024, "12.3 MiB"),
        (1000000 * 1024 * MiB, "1000000 GiB"),
    ],
)
def test_sizes_are_shown_in_binary_units(size: int, shown: str) -> None:
    assert format_size(size) == shown


async def test_a_disk_space_refusal_shows_sizes_in_units(tmp_path: Path) -> None:
    async with open_spool(
        tmp_path, relay_answering({}), FakeClock(utcnow()), min_free_space=1000000 * 1024 * MiB
    ) as spool:
        with pytest.raises(InsufficientStorageError) as refused:
            await spool.add(batch("a@example.com"))
    text = str(refused.value)
    assert re.search(r": \d+(\.\d)? [KMG]iB free, 1000000 GiB must stay free \(spool", text), text
    assert re.search(r"after writing \d+ bytes; new mail is refused until space is freed$", text)
