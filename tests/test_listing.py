"""The paged listing: filters, the walk in pages, ``status`` streamed.

A listing is a snapshot of ids walked a page at a time: the pages together
are the whole listing in id order, a cursor (``after``, ``limit``) takes it
in pieces, filters run on the server. The event loop is given back between
pages (counted: no timing), and the CLI's memory does not grow with the
queue (the peak RSS of a listing of a few thousand messages, against one of
a few hundred).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from spoold.client import Client
from spoold.daemon.control import ControlClient, ControlServer, message_view
from spoold.errors import ControlError
from spoold.listing import ID_PAGE_SIZE, PAGE_SIZE, Listing, ListingFilter
from spoold.message import (
    EnvelopeInfo,
    Frozen,
    Message,
    Quarantined,
    RelayAttempt,
    SendAt,
)
from spoold.ondisk import OnDiskSpool
from spoold.spool import DEFAULT_RETRY_INTERVALS, Spool
from spoold.testing import FakeClock, InMemoryRelay
from spoold.times import utcnow
from tests.daemon_helpers import child_env, cli
from tests.test_large_queue import write_queue

TIMEOUT = 60.0  # a safety net per test: none comes near it
NOW = utcnow()


def record(
    n: int,
    *,
    age: timedelta = timedelta(minutes=1),
    rcpt: str = "rcpt@example.com",
    error: str | None = None,
    frozen: bool = False,
) -> Message:
    mid = f"List{n:09d}"
    return Message(
        id=mid,
        parent_id=mid,
        spool_date=NOW - age,
        next_hop_choices=["127.0.0.1:25"],
        retry_intervals=list(DEFAULT_RETRY_INTERVALS),
        remaining_recipients=[rcpt],
        relay_attempts=[RelayAttempt(NOW - age / 2, error)] if error else [],
        status=Frozen() if frozen else SendAt(at=NOW + timedelta(days=1)),
        envelope_info=EnvelopeInfo(sender="s@example.org", recipients=[rcpt]),
    )


# ------------------------------------------------------------- the filter


def test_filter_keeps_by_domain_age_and_error() -> None:
    old = record(1, age=timedelta(hours=3), rcpt="a@Example.COM", error="451 4.3.0 Try LATER")
    young = record(2, age=timedelta(minutes=5), rcpt="b@example.net")
    assert ListingFilter(domain="example.com").keeps(old, NOW)
    assert ListingFilter(domain="@EXAMPLE.com").keeps(old, NOW)
    assert not ListingFilter(domain="example.com").keeps(young, NOW)
    assert not ListingFilter(domain="sub.example.com").keeps(old, NOW)
    assert ListingFilter(older_than=timedelta(hours=2)).keeps(old, NOW)
    assert not ListingFilter(older_than=timedelta(hours=2)).keeps(young, NOW)
    assert ListingFilter(newer_than=timedelta(hours=2)).keeps(young, NOW)
    assert not ListingFilter(newer_than=timedelta(hours=2)).keeps(old, NOW)
    assert ListingFilter(error="try later").keeps(old, NOW)
    assert not ListingFilter(error="try later").keeps(young, NOW)  # no attempt: no error
    both = ListingFilter(domain="example.com", error="4.3.0", older_than=timedelta(hours=1))
    assert both.keeps(old, NOW) and not both.keeps(young, NOW)


def test_filter_reads_the_quarantine_reason_and_all_recipients_when_none_remain() -> None:
    held = record(1)
    held.status = Quarantined("body damaged: size differs")
    assert ListingFilter(error="BODY DAMAGED").keeps(held, NOW)
    failed = record(2, rcpt="x@example.org", frozen=True)
    failed.failed_recipients, failed.remaining_recipients = ["x@example.org"], []
    assert ListingFilter(domain="example.org").keeps(failed, NOW)


@pytest.mark.parametrize(
    "fields",
    [{"domain": ""}, {"domain": "a@b"}, {"error": ""}, {"older_than": timedelta(seconds=-1)}],
)
def test_filter_refuses_what_means_nothing(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        ListingFilter(**fields)


# --------------------------------------------------------------- the walk


def test_walk_pages_a_cursor_and_a_limit_over_a_snapshot() -> None:
    ids = [f"id{i:04d}" for i in range(1000)]
    gone = {"id0003", "id0500"}  # left the queue after the snapshot was taken
    looked: list[str] = []

    def lookup(mid: str) -> str | None:
        looked.append(mid)
        return None if mid in gone else mid

    walk = Listing(ids, lookup, lambda mid: mid.endswith("0") or mid.endswith("3"), page_size=30)
    pages = []
    while not walk.done:
        pages.append(walk.page())
    assert all(len(p) <= 30 for p in pages)
    listed = [mid for p in pages for mid in p]
    assert listed == [m for m in ids if m[-1] in "03" and m not in gone]
    assert looked == ids and walk.next_after is None

    cut = Listing(ids, lambda m: m, lambda _: True, after="id0100", limit=250)
    first = [m for _ in range(5) for m in cut.page()]
    assert cut.done and first == ids[101:351] and cut.next_after == "id0350"
    rest = Listing(ids, lambda m: m, lambda _: True, after=cut.next_after)
    while not rest.done:
        first += rest.page()
    assert first == ids[101:] and rest.next_after is None


def test_a_page_looks_up_a_bounded_number_of_ids_when_little_matches() -> None:
    ids = [f"id{i:05d}" for i in range(10_000)]
    walk = Listing(ids, lambda m: m, lambda m: m == "id09999", page_size=10, scan_limit=500)
    pages = []
    while not walk.done:
        pages.append(walk.page())
    assert len(pages) == 20 and pages[-1] == ["id09999"] and not any(pages[:-1])


# ------------------------------------------------------- through the daemon


COUNT = 1200  # six pages


@contextlib.asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[Spool, ControlClient, list[Message]]]:
    """A spool of :data:`COUNT` records (written in reverse order) and a
    control server on it."""
    messages = [
        record(
            i,
            age=timedelta(hours=2) if i % 3 == 0 else timedelta(minutes=1),
            rcpt="r@slow.example" if i % 4 == 0 else "r@fast.example",
            error="421 4.7.0 Too many connections" if i % 5 == 0 else None,
            frozen=i % 7 == 0,
        )
        for i in range(COUNT)
    ]
    write_queue(tmp_path / "spool", list(reversed(messages)))
    path = tmp_path / "c.sock"
    with anyio.fail_after(TIMEOUT):
        async with (
            Spool.open(tmp_path / "spool", relay=InMemoryRelay(), clock=FakeClock(NOW)) as spool,
            anyio.create_task_group() as tg,
        ):
            await tg.start(ControlServer(spool).serve, path, 0o600)
            yield spool, ControlClient(path), messages
            tg.cancel_scope.cancel()


async def pages_of(client: ControlClient, **params: Any) -> list[list[Any]]:
    return [page async for page in client.status_pages(**params)]


async def test_streamed_status_is_the_listing_in_pages_in_id_order(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as (spool, client, messages):
        pages = await pages_of(client)
        assert len(pages) == COUNT // PAGE_SIZE and all(len(p) == PAGE_SIZE for p in pages)
        streamed = [v for p in pages for v in p]
        assert [v["id"] for v in streamed] == sorted(m.id for m in messages)
        assert streamed == await client.request("status")  # the single reply, as before
        # Each listing object is message_view of the record, as it always was.
        snapshots = [spool.snapshot(v["id"], NOW) for v in streamed]
        assert streamed == [message_view(m) for m in snapshots if m is not None]
        ids = await pages_of(client, only_ids=True, queue="frozen")
        assert [i for p in ids for i in p] == sorted(
            m.id for m in messages if int(m.id[4:]) % 7 == 0
        )
        # The ids alone, with no filter: nothing to look up, so bigger pages.
        id_pages = await pages_of(client, only_ids=True)
        assert [len(p) for p in id_pages] == [COUNT]  # one page: COUNT < ID_PAGE_SIZE
        assert id_pages[0] == [v["id"] for v in streamed]
        assert COUNT < ID_PAGE_SIZE


async def test_cursor_and_filters_on_the_server_in_both_forms(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as (_, client, messages):
        ids = sorted(m.id for m in messages)
        got: list[str] = []
        after = None
        while True:
            page = await client.request("status", only_ids=True, limit=500, after=after)
            got += page
            if len(page) < 500:
                break
            after = page[-1]
        assert got == ids

        def expect(keep: Any) -> list[str]:
            return [m.id for m in sorted(messages, key=lambda m: m.id) if keep(int(m.id[4:]))]

        cases: list[tuple[dict[str, Any], list[str]]] = [
            ({"domain": "SLOW.example"}, expect(lambda i: i % 4 == 0)),
            ({"older_than": "1h"}, expect(lambda i: i % 3 == 0)),
            ({"newer_than": "1h"}, expect(lambda i: i % 3 != 0)),
            ({"error": "too MANY"}, expect(lambda i: i % 5 == 0)),
            (
                {"error": "too many", "domain": "fast.example", "queue": "frozen"},
                expect(lambda i: i % 5 == 0 and i % 4 != 0 and i % 7 == 0),
            ),
        ]
        for params, expected in cases:
            single = await client.request("status", **params)
            assert [v["id"] for v in single] == expected, params
            streamed = await pages_of(client, only_ids=True, **params)
            assert [i for p in streamed for i in p] == expected, params
        limited = await pages_of(client, domain="slow.example", after=ids[100], limit=7)
        assert [v["id"] for p in limited for v in p] == [i for i in cases[0][1] if i > ids[100]][:7]


@pytest.mark.parametrize(
    ("params", "text"),
    [
        ({"older_than": "soon"}, "span"),
        ({"limit": 0}, "limit"),
        ({"after": "../x"}, "not a message id"),
        ({"domain": "a@b"}, "domain"),
        ({"queue": "sent"}, "queue must be one of"),
    ],
)
async def test_bad_listing_parameters_are_refused_before_any_page(
    tmp_path: Path, params: dict[str, Any], text: str
) -> None:
    async with served(tmp_path) as (_, client, _):
        for ask in (pages_of(client, **params), client.request("status", **params)):
            with pytest.raises(ControlError, match=text) as caught:
                await ask
            assert caught.value.kind == "invalid"


@pytest.mark.parametrize("stream", [True, False])
async def test_the_server_gives_the_loop_back_between_pages(tmp_path: Path, stream: bool) -> None:
    """A task that runs whenever the loop is free counts the messages
    looked up since it last ran: never more than a page at once."""
    async with served(tmp_path) as (spool, client, _):
        looked = 0
        real = spool.peek

        def counting(mid: str, now: Any) -> Any:
            nonlocal looked
            looked += 1
            return real(mid, now)

        spool.peek = counting  # type: ignore[method-assign]
        gaps: list[int] = []
        done = anyio.Event()

        async def ticker() -> None:
            seen = 0
            while not done.is_set():
                await anyio.lowlevel.checkpoint()
                gaps.append(looked - seen)
                seen = looked

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            if stream:
                await pages_of(client)
            else:
                await client.request("status")
            done.set()
        assert looked == COUNT
        assert max(gaps) <= PAGE_SIZE
        assert sum(1 for g in gaps if g) >= COUNT // PAGE_SIZE


async def test_the_python_client_iterates_over_the_pages(tmp_path: Path) -> None:
    async with served(tmp_path) as (_, client, messages):
        listing = await client.request("status", domain="slow.example", older_than="1h")
        assert len(listing) == COUNT // 12

        def iterate() -> tuple[list[dict[str, Any]], list[str]]:
            python = Client(client.path)
            whole = list(python.iter_status(domain="slow.example", older_than=timedelta(hours=1)))
            pieces = python.iter_status(after=whole[0]["id"], limit=3)
            return whole, [v["id"] for v in pieces]

        whole, pieces = await anyio.to_thread.run_sync(iterate)
        assert whole == listing
        ids = sorted(m.id for m in messages)
        assert pieces == ids[ids.index(whole[0]["id"]) + 1 :][:3]


async def test_a_reader_that_hangs_up_ends_the_listing(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as (_, client, _):
        async for page in client.status_pages():
            assert len(page) == PAGE_SIZE
            break
        assert await client.request("ping") == "pong"


# ------------------------------------------------------- the CLI's memory


def listing_peak_rss(spool_dir: Path) -> tuple[int, int]:
    """Lines printed and peak RSS (KiB) of ``spoold status --format json``
    reading ``spool_dir`` (no daemon)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spoold.daemon.cli",
            "--spool-dir",
            str(spool_dir),
            "status",
            "--format",
            "json",
        ],
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    killer = threading.Timer(TIMEOUT, proc.kill)  # a bound, should it ever hang
    killer.start()
    try:
        assert proc.stdout is not None
        lines = 0
        while chunk := proc.stdout.read(1 << 16):
            lines += chunk.count(b"\n")
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak
    finally:
        killer.cancel()
        proc.stdout.close()  # type: ignore[union-attr]
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0
    return lines, usage.ru_maxrss


async def make_spool(spool_dir: Path) -> None:
    ondisk, _ = await OnDiskSpool.open(spool_dir)
    await ondisk.close()


def test_the_cli_lists_a_large_queue_in_bounded_memory(tmp_path: Path) -> None:
    """Held whole, 6,000 messages more would take tens of MB more (records
    and their listing objects); page by page, the peak stays where it is
    for 300."""
    small, large = tmp_path / "small", tmp_path / "large"
    write_queue(small, [record(i) for i in range(300)])
    write_queue(large, [record(i, error="451 4.3.0 " + "x" * 200) for i in range(6300)])
    for spool_dir in (small, large):
        anyio.run(make_spool, spool_dir)
    lines_small, peak_small = listing_peak_rss(small)
    lines_large, peak_large = listing_peak_rss(large)
    assert (lines_small, lines_large) == (300, 6300)
    assert peak_large - peak_small < 8 * 1024, (peak_small, peak_large)


def test_the_cli_filters_pages_and_streams_a_long_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From disk (the same printer serves the daemon's pages): past 1,000
    rows the table is printed as it comes, in the same columns."""
    spool_dir = tmp_path / "spool"
    anyio.run(make_spool, spool_dir)
    messages = [
        record(
            i,
            rcpt="r@slow.example" if i % 4 == 0 else "r@fast.example",
            error="421 4.7.0 Too many connections" if i % 5 == 0 else None,
            age=timedelta(hours=2) if i % 3 == 0 else timedelta(minutes=1),
        )
        for i in range(1100)
    ]
    write_queue(spool_dir, messages)
    ids = sorted(m.id for m in messages)
    where = ("--spool-dir", str(spool_dir))

    monkeypatch.setenv("COLUMNS", "120")
    table = cli(*where, "status")
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "AGE", "SIZE", "RCPTS", "SENDER", "LAST", "ERROR"]
    assert [line.split()[0] for line in lines[1:-1]] == ids
    assert lines[-1] == "1100 message(s)"
    with_error = next(line for line in lines if line.startswith(ids[0]))
    assert with_error.endswith("421 4.7.0 Too many connections")
    assert lines[0].index("LAST ERROR") == with_error.index("421")

    first = cli(*where, "status", "--format", "id", "--limit", "300").out.split()
    rest = cli(*where, "status", "--format", "id", "--after", first[-1]).out.split()
    assert first + rest == ids and len(first) == 300

    slow_old = cli(
        *where,
        "status",
        "--format",
        "id",
        "--domain",
        "slow.example",
        "--older-than",
        "1h",
        "--error",
        "TOO MANY",
    ).out.split()
    assert slow_old == [m for m in ids if int(m[4:]) % 60 == 0]
    young = cli(*where, "status", "--format", "exim", "--newer-than", "1h", "--limit", "1").out
    assert young.splitlines()[0].endswith(f"{ids[1]} <s@example.org>")

    refused = cli(*where, "status", "--older-than", "soon")
    assert refused.code == 2 and "span" in refused.err


async def test_the_paged_listing_falls_back_to_one_reply_from_an_older_daemon(
    tmp_path: Path,
) -> None:
    """A daemon from before paged listings refuses ``stream``; the client
    asks again for the whole listing and hands it on as one page."""
    path = tmp_path / "old.sock"
    views = [{"id": "A1", "queue": "active"}, {"id": "B2", "queue": "frozen"}]
    asked: list[dict[str, Any]] = []

    async def old_daemon(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            request = json.loads(
                await BufferedByteReceiveStream(conn).receive_until(b"\n", 1 << 20)
            )
            asked.append(request)
            if "stream" in request:
                reply = {"ok": False, "kind": "invalid", "error": "status: unknown field `stream`"}
            else:
                reply = {"ok": True, "result": views}
            await conn.send(json.dumps(reply).encode() + b"\n")

    listener = await anyio.create_unix_listener(path)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, old_daemon)
        client = ControlClient(path, timeout=10)
        pages = [page async for page in client.status_pages(queue="all")]
        raw = [page async for page in client.status_pages(raw=True, queue="all")]
        tg.cancel_scope.cancel()
    assert pages == [views]
    assert [json.loads(v) for v in raw[0]] == views
    assert [("stream" in r) for r in asked] == [True, False, True, False]


def test_a_narrow_table_never_cuts_an_id(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """80 columns, a long status, no error: the columns but the ID give way
    (the ID is what an operator copies into the next command)."""
    from spoold.daemon.status_output import print_status

    mid = "8E9jToILDNpsVC3aBcDeFg"
    view = {
        "id": mid,
        "status": "frozen",
        "in_doubt": True,
        "spool_date": utcnow().isoformat(),
        "size": 69,
        "remaining_recipients": ["rcpt@example.org"],
        "envelope_info": {"sender": "sender@example.org"},
        "relay_attempts": [],
    }
    monkeypatch.setenv("COLUMNS", "80")
    print_status([view], "table")
    lines = capsys.readouterr().out.splitlines()
    (row,) = [line for line in lines if line.startswith(mid)]
    assert row.split()[1:4] == ["frozen", "(in", "doubt)"]
    assert max(len(line) for line in lines) <= 80
