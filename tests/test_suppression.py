"""The suppression list (issue 22, point 4): the store, and the spool's use of it.

The store on a temp dir (add, expiry, the bound, normalisation, reopening,
damage); the rule that says what a hard bounce is (a table); then a spool
on a fake clock with an in-memory relay: a 550 5.1.1 suppresses, a 5.7.1
or a 4xx does not, nothing without ``suppress_after_hard_bounce``, ``add``
refuses a suppressed recipient (``refuse``) or the attempt fails it at once
(``fail``), and the list survives reopening the spool.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import msgspec
import pytest

from spoold import RecipientSuppressedError, SpooldError
from spoold.connection_cache import RouteSettings
from spoold.daemon.config import Config, parse_config
from spoold.daemon.ingest import Submitter
from spoold.daemon.listener import SmtpListener, listener_settings
from spoold.daemon.routing import Router
from spoold.errors import AddressError, ConfigError, StoreError
from spoold.events import EventKind
from spoold.hooks import ErrorAction
from spoold.message import Frozen, Message, RoutedBatch, RoutedEnvelope
from spoold.outcome import DeliveryPolicy, OnPermanentFailure, is_hard_bounce
from spoold.relay import RecipientResult
from spoold.settings import SpoolSettings
from spoold.shared_counter import SharedCounter
from spoold.smtp_relay import SmtpRelay
from spoold.spool import Spool
from spoold.suppression import (
    STORM_RECIPIENTS,
    SUPPRESSION_FILE,
    Suppression,
    Suppressions,
    decode_list,
    encode_list,
    normalise,
)
from spoold.testing import FakeClock, InMemoryRelay
from tests.ingest_helpers import HOSTNAME, SENDER, HeldRelay, make_config, raw_smtp
from tests.smtp_server import Reply, SmtpTestServer
from tests.spool_helpers import (
    BODY,
    NO_SUCH_USER,
    START,
    TRY_LATER,
    batch,
    intervals,
    open_spool,
    relay_answering,
)
from tests.spool_helpers import (
    SENDER as SPOOL_SENDER,
)
from tests.support import free_port, wait_until

DAY = timedelta(days=1)
T0 = datetime(2031, 1, 1, tzinfo=UTC)
POLICY_REFUSAL = RecipientResult(550, "rejected by policy", "5.7.1")
FAIL = ErrorAction.FAIL_PERMANENTLY
SUPPRESS = ErrorAction.SUPPRESS
BAD_DOMAIN = RecipientResult(550, "no such domain", "5.1.2")


def entry(address: str, days: float, reason: str = "") -> Suppression:
    return Suppression(address=address, since=T0, until=T0 + timedelta(days=days), reason=reason)


async def owner_list(spool_dir: Path) -> Suppressions:
    (spool_dir / "tmp").mkdir(parents=True, exist_ok=True)
    listed = Suppressions(spool_dir, owner=True)
    await listed.load()
    return listed


# ------------------------------------------------------------------ the store


async def test_added_entries_are_found_until_they_end(tmp_path: Path) -> None:
    listed = await owner_list(tmp_path)
    await listed.add([entry("a@example.com", 1)], now=T0, max_entries=10, extend_only=False)
    assert listed.find("a@example.com", T0) is not None
    assert listed.find("a@example.com", T0 + DAY - timedelta(seconds=1)) is not None
    assert listed.find("a@example.com", T0 + DAY) is None  # ended
    assert listed.find("b@example.com", T0) is None


async def test_addresses_are_normalised_whole_address_lower_case(tmp_path: Path) -> None:
    listed = await owner_list(tmp_path)
    await listed.add([entry("Alice@Example.COM", 1)], now=T0, max_entries=10, extend_only=False)
    assert [e.address for e in listed.entries(T0)] == ["alice@example.com"]
    for spelling in ("alice@example.com", "ALICE@EXAMPLE.COM", "<Alice@example.com>"):
        assert listed.find(spelling, T0) is not None, spelling
    assert normalise("Ünïcode@Exämple.org") == "ünïcode@xn--exmple-cua.org"


@pytest.mark.parametrize(
    ("spelling", "form"),
    [
        ('"gone"@example.com', "gone@example.com"),  # quotes it does not need
        ('"Gone.Away"@Example.com', "gone.away@example.com"),
        ('"a b"@example.com', '"a b"@example.com'),  # quotes it needs stay
        ('"a..b"@example.com', '"a..b"@example.com'),
        ("user@bücher.example", "user@xn--bcher-kva.example"),  # one form of the domain
        ("user@XN--BCHER-KVA.example", "user@xn--bcher-kva.example"),
        ("mu\u0308ller@example.com", "m\u00fcller@example.com"),  # NFC
        ("M\u00dcLLER@example.com", "m\u00fcller@example.com"),
    ],
)
async def test_every_spelling_of_a_mailbox_is_one_entry(
    tmp_path: Path, spelling: str, form: str
) -> None:
    assert normalise(spelling) == form
    listed = await owner_list(tmp_path)
    await listed.add([entry(form, 1)], now=T0, max_entries=10, extend_only=False)
    assert listed.find(spelling, T0) is not None


async def test_a_quoted_spelling_of_a_suppressed_address_is_refused(tmp_path: Path) -> None:
    async with open_spool(tmp_path, InMemoryRelay(), FakeClock(START)) as spool:
        await spool.suppress(["gone@bücher.example"], for_=DAY)
        with pytest.raises(RecipientSuppressedError):
            await spool.add(batch('"Gone"@xn--bcher-kva.example'))


async def test_the_list_is_durable_across_reopening(tmp_path: Path) -> None:
    listed = await owner_list(tmp_path)
    await listed.add(
        [entry("a@example.com", 2, "550 5.1.1 no such user"), entry("b@example.com", 3)],
        now=T0,
        max_entries=10,
        extend_only=False,
    )
    again = await owner_list(tmp_path)
    assert again.entries(T0) == listed.entries(T0)
    assert again.find("a@example.com", T0).reason == "550 5.1.1 no such user"  # type: ignore[union-attr]
    # the file is what on-disk-format.md says: a header line, one entry a line
    lines = (tmp_path / SUPPRESSION_FILE).read_bytes().splitlines()
    assert msgspec.json.decode(lines[0]) == {"version": 1}
    assert [msgspec.json.decode(line)["address"] for line in lines[1:]] == [
        "a@example.com",
        "b@example.com",
    ]
    assert os.listdir(tmp_path / "tmp") == []  # the temporary file was renamed away


async def test_remove_lifts_and_says_what_was_there(tmp_path: Path) -> None:
    listed = await owner_list(tmp_path)
    await listed.add([entry("a@example.com", 1)], now=T0, max_entries=10, extend_only=False)
    assert await listed.remove(["A@example.com", "nobody@example.com"], now=T0) == ["a@example.com"]
    assert listed.find("a@example.com", T0) is None
    assert (await owner_list(tmp_path)).entries(T0) == []


async def test_the_bound_drops_the_entries_closest_to_their_end(tmp_path: Path) -> None:
    listed = await owner_list(tmp_path)
    await listed.add(
        [entry("short@x.org", 1), entry("long@x.org", 30), entry("mid@x.org", 10)],
        now=T0,
        max_entries=3,
        extend_only=False,
    )
    added = await listed.add([entry("new@x.org", 20)], now=T0, max_entries=3, extend_only=False)
    assert [e.address for e in added] == ["new@x.org"]
    assert [e.address for e in listed.entries(T0)] == ["long@x.org", "mid@x.org", "new@x.org"]
    assert len((await owner_list(tmp_path)).entries(T0)) == 3


def bounce(address: str, days: float) -> Suppression:
    return msgspec.structs.replace(entry(address, days), source="bounce")


async def test_bounces_never_push_an_operators_entries_off_a_full_list(tmp_path: Path) -> None:
    listed = await owner_list(tmp_path)
    await listed.add(
        [entry("op1@x.org", 1), entry("op2@x.org", 2)], now=T0, max_entries=2, extend_only=False
    )
    # full of an operator's entries: the bounce entry is the one not kept
    assert await listed.add([bounce("b@x.org", 30)], now=T0, max_entries=2, extend_only=True) == []
    assert [e.address for e in listed.entries(T0)] == ["op1@x.org", "op2@x.org"]
    # with room made by a bounce entry, the bounce entries closest to their end go
    await listed.add([entry("op2@x.org", 2)], now=T0, max_entries=3, extend_only=False)
    await listed.add([bounce("old@x.org", 20)], now=T0, max_entries=3, extend_only=True)
    added = await listed.add([bounce("new@x.org", 30)], now=T0, max_entries=3, extend_only=True)
    assert [e.address for e in added] == ["new@x.org"]
    assert [e.address for e in listed.entries(T0)] == ["new@x.org", "op1@x.org", "op2@x.org"]
    # a smaller bound (a reload) still keeps the operator's entries for bounces
    assert await listed.add([bounce("x@x.org", 30)], now=T0, max_entries=1, extend_only=True) == []
    assert {e.source for e in listed.entries(T0)} == {"operator"}


async def test_an_operators_entry_pushes_bounce_entries_off_first(tmp_path: Path) -> None:
    listed = await owner_list(tmp_path)
    await listed.add([entry("op@x.org", 1)], now=T0, max_entries=2, extend_only=False)
    await listed.add([bounce("b@x.org", 30)], now=T0, max_entries=2, extend_only=True)
    added = await listed.add([entry("op2@x.org", 5)], now=T0, max_entries=2, extend_only=False)
    assert [e.address for e in added] == ["op2@x.org"]
    assert [e.address for e in listed.entries(T0)] == ["op2@x.org", "op@x.org"]


async def test_every_bounce_entry_is_lifted_at_once_or_those_of_a_span(tmp_path: Path) -> None:
    listed = await owner_list(tmp_path)
    early = msgspec.structs.replace(bounce("early@x.org", 30), since=T0 - DAY)
    await listed.add(
        [early, bounce("b1@x.org", 30), bounce("b2@x.org", 30), entry("op@x.org", 30)],
        now=T0,
        max_entries=10,
        extend_only=False,
    )
    got = await listed.remove_where(source="bounce", since=T0 - timedelta(hours=1), now=T0)
    assert got == ["b1@x.org", "b2@x.org"]
    assert [e.address for e in listed.entries(T0)] == ["early@x.org", "op@x.org"]
    assert await listed.remove_where(source="bounce", since=None, now=T0) == ["early@x.org"]
    assert [e.address for e in (await owner_list(tmp_path)).entries(T0)] == ["op@x.org"]


async def test_a_lowered_bound_is_applied_by_the_next_prune(tmp_path: Path) -> None:
    listed = await owner_list(tmp_path)
    await listed.add(
        [entry("op@x.org", 1), bounce("b1@x.org", 30), bounce("b2@x.org", 20)],
        now=T0,
        max_entries=10,
        extend_only=False,
    )
    assert await listed.prune(T0, max_entries=2) == 1
    assert [e.address for e in listed.entries(T0)] == ["b1@x.org", "op@x.org"]
    assert len((await owner_list(tmp_path)).entries(T0)) == 2


async def test_a_bounce_only_extends_an_entry_an_operator_replaces_it(tmp_path: Path) -> None:
    listed = await owner_list(tmp_path)
    await listed.add([entry("a@x.org", 30)], now=T0, max_entries=10, extend_only=False)
    assert await listed.add([entry("a@x.org", 1)], now=T0, max_entries=10, extend_only=True) == []
    assert listed.find("a@x.org", T0 + 2 * DAY) is not None
    await listed.add([entry("a@x.org", 1)], now=T0, max_entries=10, extend_only=False)
    assert listed.find("a@x.org", T0 + 2 * DAY) is None


async def test_ended_entries_are_pruned_from_the_file(tmp_path: Path) -> None:
    listed = await owner_list(tmp_path)
    await listed.add(
        [entry("a@x.org", 1), entry("b@x.org", 5)], now=T0, max_entries=10, extend_only=False
    )
    assert await listed.prune(T0 + 2 * DAY) == 1
    assert (tmp_path / SUPPRESSION_FILE).read_bytes().count(b"\n") == 2  # header + b


async def test_a_damaged_file_loses_only_its_damaged_lines(tmp_path: Path) -> None:
    listed = await owner_list(tmp_path)
    await listed.add(
        [entry("a@x.org", 5), entry("b@x.org", 5), entry("c@x.org", 5)],
        now=T0,
        max_entries=10,
        extend_only=False,
    )
    path = tmp_path / SUPPRESSION_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    # line 3 (b) garbled, and the file cut in the middle of its last line (c)
    damaged = lines[0] + lines[1] + b'{"address": "b@x.org", "si\n' + lines[3][:20]
    path.write_bytes(damaged)
    again = await owner_list(tmp_path)
    assert [e.address for e in again.entries(T0)] == ["a@x.org"]
    # the next write keeps a copy of the damaged file for the operator
    await again.add([entry("d@x.org", 5)], now=T0, max_entries=10, extend_only=False)
    assert (tmp_path / (SUPPRESSION_FILE + ".damaged")).read_bytes() == damaged
    assert [e.address for e in (await owner_list(tmp_path)).entries(T0)] == ["a@x.org", "d@x.org"]
    # damaged again: an earlier copy is kept, and a link in the copy's place not followed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not to be overwritten\n")
    (tmp_path / (SUPPRESSION_FILE + ".damaged.1")).symlink_to(elsewhere)
    path.write_bytes(damaged)
    again = await owner_list(tmp_path)
    await again.add([entry("e@x.org", 5)], now=T0, max_entries=10, extend_only=False)
    assert (tmp_path / (SUPPRESSION_FILE + ".damaged")).read_bytes() == damaged
    assert (tmp_path / (SUPPRESSION_FILE + ".damaged.2")).read_bytes() == damaged
    assert elsewhere.read_bytes() == b"not to be overwritten\n"


async def test_each_write_is_seen_though_size_and_clock_tick_are_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner sets each file's modification time past the last one's:
    a reader sees a change of the same size made within one clock tick;
    a temporary file left behind (or a link in its place) is replaced, not
    written through."""
    from spoold import suppression

    monkeypatch.setattr(suppression, "time_ns", lambda: 1_700_000_000_000_000_000)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"kept\n")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / f"{os.getpid()}.{SUPPRESSION_FILE}.list.tmp").symlink_to(elsewhere)
    owner = await owner_list(tmp_path)
    reader = Suppressions(tmp_path, owner=False)
    await owner.add([entry("a@x.org", 1)], now=T0, max_entries=10, extend_only=False)
    assert elsewhere.read_bytes() == b"kept\n"
    await reader.refresh()
    path = tmp_path / SUPPRESSION_FILE
    before = os.stat(path)
    await owner.remove(["a@x.org"], now=T0)
    await owner.add([entry("b@x.org", 1)], now=T0, max_entries=10, extend_only=False)
    after = os.stat(path)
    assert after.st_size == before.st_size
    assert after.st_mtime_ns > before.st_mtime_ns
    assert reader.stale()
    await reader.refresh()
    assert reader.find("b@x.org", T0) is not None
    # a new owner (a restart) goes on past the file's time
    again = await owner_list(tmp_path)
    await again.add([entry("c@x.org", 1)], now=T0, max_entries=10, extend_only=False)
    assert os.stat(path).st_mtime_ns > after.st_mtime_ns


def test_a_file_of_a_newer_version_is_refused_clearly() -> None:
    with pytest.raises(StoreError, match="newer spoold"):
        decode_list(b'{"version": 99}\n')
    assert decode_list(b"") == ([], [])


async def reads_again(reader: Suppressions, address: str, *, listed: bool) -> None:
    """``reader`` knows the list changed, reads it again, and then finds
    ``address`` listed or not, as ``listed`` says."""
    assert reader.stale()
    await reader.refresh()
    assert (reader.find(address, T0) is not None) is listed


async def test_a_reader_sees_the_owners_changes_when_the_file_changes(tmp_path: Path) -> None:
    owner = await owner_list(tmp_path)
    reader = Suppressions(tmp_path, owner=False)
    assert not reader.stale()  # no file, nothing read: the same
    await owner.add([entry("a@x.org", 1)], now=T0, max_entries=10, extend_only=False)
    await reads_again(reader, "a@x.org", listed=True)
    assert not reader.stale()
    await owner.remove(["a@x.org"], now=T0)
    await reads_again(reader, "a@x.org", listed=False)
    with pytest.raises(RuntimeError):
        await reader.add([entry("b@x.org", 1)], now=T0, max_entries=10, extend_only=False)


async def test_a_reader_following_the_owners_count_sees_each_write_without_a_stat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ingest worker follows the daemon's count of its writes (passed as
    an fd): whether the list changed is a load from shared memory, asked at
    every RCPT on the event loop, never a stat of the file; a write is seen
    from the first question after the owner's call returned."""
    owner = await owner_list(tmp_path)
    await owner.add([entry("a@x.org", 1)], now=T0, max_entries=10, extend_only=False)
    reader = Suppressions(tmp_path, owner=False)
    reader.follow(SharedCounter.attach(os.dup(owner.change_counter().fd or -1)))
    looked: list[str] = []
    real_stat = os.stat

    def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        looked.append(str(path))
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat)
    await reads_again(reader, "a@x.org", listed=True)  # followed, not read yet
    assert not reader.stale()
    await owner.add([entry("b@x.org", 1)], now=T0, max_entries=10, extend_only=False)
    await reads_again(reader, "b@x.org", listed=True)
    assert not reader.stale()
    await owner.remove(["a@x.org"], now=T0)
    await reads_again(reader, "a@x.org", listed=False)
    assert not reader.stale()
    assert [p for p in looked if p.endswith(SUPPRESSION_FILE)] == []
    with pytest.raises(RuntimeError):
        owner.follow(owner.change_counter())


async def test_a_reader_that_cannot_read_the_list_says_so_once_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any error reading the file (not only its absence) makes the reader
    try again and raise StoreError (the SMTP session answers 451), keeping
    what it read; logged once a minute at most while it lasts."""
    import structlog.testing

    from spoold import suppression

    owner = await owner_list(tmp_path)
    await owner.add([entry("a@x.org", 1)], now=T0, max_entries=10, extend_only=False)
    reader = Suppressions(tmp_path, owner=False)
    await reader.refresh()
    path = tmp_path / SUPPRESSION_FILE
    path.unlink()
    path.symlink_to(path)  # stat fails with ELOOP, not "no such file"
    clock = [1000.0]
    monkeypatch.setattr(suppression, "monotonic", lambda: clock[0])
    with structlog.testing.capture_logs() as logs:
        assert reader.stale()
        for _ in range(3):
            with pytest.raises(StoreError, match="cannot read the suppression list"):
                await reader.refresh()
        clock[0] += 61
        with pytest.raises(StoreError):
            await reader.refresh()
    said = [e for e in logs if e["event"].startswith("cannot read the suppression list")]
    assert len(said) == 2
    assert reader.find("a@x.org", T0) is not None  # what it read stays
    path.unlink()
    await owner.add([entry("b@x.org", 1)], now=T0, max_entries=10, extend_only=False)
    await reader.refresh()
    assert reader.find("b@x.org", T0) is not None


async def test_changes_made_during_a_write_go_out_in_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner writes one at a time: a change made while a write is held
    reaches the file with the next write, and its caller returns only once
    that write is done; a write that failed is made by the next change."""
    import threading

    from spoold import suppression

    listed = await owner_list(tmp_path)
    real_write = suppression._write_sync
    started, release = threading.Event(), threading.Event()
    writes: list[list[str]] = []
    done: list[int] = []  # the writes finished
    failing = [False]

    def write(path: Path, tmp: Path, entries: list[Suppression], *more: object) -> None:
        writes.append(sorted(e.address for e in entries))
        started.set()
        release.wait(30)
        if failing[0]:
            failing[0] = False
            raise StoreError("disk full")
        real_write(path, tmp, entries, *more)
        done.append(len(entries))

    monkeypatch.setattr(suppression, "_write_sync", write)

    def on_disk() -> list[str]:
        entries, _ = decode_list((tmp_path / SUPPRESSION_FILE).read_bytes())
        return sorted(e.address for e in entries)

    returned: list[tuple[str, int]] = []  # who returned, after how many writes

    async def add(address: str) -> None:
        await listed.add([entry(address, 1)], now=T0, max_entries=10, extend_only=False)
        returned.append((address, len(done)))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(add, "first@x.org")
            assert await anyio.to_thread.run_sync(started.wait, 30)  # the first write is held
            tg.start_soon(add, "second@x.org")
            tg.start_soon(add, "third@x.org")
            await wait_until(lambda: len(listed) == 3, "both changes made in memory")
            assert returned == []  # nobody returns before a write of their change
            release.set()
        assert writes == [["first@x.org"], ["first@x.org", "second@x.org", "third@x.org"]]
        assert sorted(returned) == [("first@x.org", 1), ("second@x.org", 2), ("third@x.org", 2)]
        assert on_disk() == ["first@x.org", "second@x.org", "third@x.org"]

        failing[0] = True  # this write fails: the change stays in memory
        with pytest.raises(StoreError, match="disk full"):
            await listed.add([entry("fourth@x.org", 1)], now=T0, max_entries=10, extend_only=False)
        assert "fourth@x.org" not in on_disk()
        await listed.add([entry("fifth@x.org", 1)], now=T0, max_entries=10, extend_only=False)
        assert {"fourth@x.org", "fifth@x.org"} <= set(on_disk())


# ------------------------------------------------------- what is a hard bounce


@pytest.mark.parametrize(
    ("result", "action", "hard"),
    [
        (NO_SUCH_USER, ErrorAction.FAIL_PERMANENTLY, True),  # 5.1.1
        (BAD_DOMAIN, ErrorAction.FAIL_PERMANENTLY, True),  # 5.1.2
        (RecipientResult(550, "null MX", "5.1.10"), ErrorAction.FAIL_PERMANENTLY, True),
        (POLICY_REFUSAL, ErrorAction.FAIL_PERMANENTLY, False),  # 5.7.1: policy
        (RecipientResult(550, "mailbox unavailable"), ErrorAction.FAIL_PERMANENTLY, False),
        (RecipientResult(450, "mailbox busy", "4.1.1"), ErrorAction.FAIL_PERMANENTLY, False),
        (TRY_LATER, ErrorAction.TRY_LATER, False),
        (NO_SUCH_USER, ErrorAction.TRY_LATER, False),  # on_error keeps it: not failed
        (NO_SUCH_USER, ErrorAction.DONE, False),
        (POLICY_REFUSAL, ErrorAction.SUPPRESS, True),  # on_error's word
        (TRY_LATER, ErrorAction.SUPPRESS, True),
        (RecipientResult(550, "moved", "5.1.6"), ErrorAction.FAIL_PERMANENTLY, True),
        (RecipientResult(553, "bad syntax", "5.1.3"), ErrorAction.FAIL_PERMANENTLY, True),
        # about the sender, or saying the address is fine
        (RecipientResult(550, "Sender address rejected", "5.1.0"), FAIL, False),
        (RecipientResult(550, "bad sender mailbox", "5.1.7"), FAIL, False),
        (RecipientResult(550, "Sender address rejected", "5.1.8"), FAIL, False),
        (RecipientResult(550, "valid address", "5.1.5"), FAIL, False),
        # given to every recipient: a reply to MAIL FROM or to the message
        (RecipientResult(550, "no such user", "5.1.1", phase="mail"), FAIL, False),
        (RecipientResult(550, "no such user", "5.1.1", phase="data"), FAIL, False),
        # spoold's own answer, whatever on_error says
        (RecipientResult(553, "cannot be relayed", "5.1.3", phase="local"), FAIL, False),
        (RecipientResult(553, "cannot be relayed", "5.1.3", phase="local"), SUPPRESS, False),
    ],
)
def test_what_is_a_hard_bounce(result: RecipientResult, action: ErrorAction, hard: bool) -> None:
    assert is_hard_bounce(result, action) is hard


# --------------------------------------------------------------- the spool


def suppressing(**changes: object) -> SpoolSettings:
    values: dict[str, object] = {
        "default_retry_intervals": tuple(intervals(1, 5)),
        "ping_interval": 10.0**9,
        "suppress_after_hard_bounce": 30 * DAY,
    }
    values.update(changes)
    return SpoolSettings(**values)  # type: ignore[arg-type]


async def settled(spool: Spool, message_id: str) -> Message:
    """The message once its first attempt is over (frozen or gone)."""
    await wait_until(
        lambda: all(m.id != message_id or isinstance(m.status, Frozen) for m in spool.status()),
        f"{message_id} frozen or gone",
    )
    for msg in spool.status():
        if msg.id == message_id:
            return msg
    raise AssertionError(f"{message_id} is gone")


async def test_a_550_5_1_1_suppresses_and_add_then_refuses(tmp_path: Path) -> None:
    relay = relay_answering({"gone@example.com": NO_SUCH_USER})
    clock = FakeClock(START)
    async with open_spool(tmp_path, relay, clock, settings=suppressing()) as spool:
        (first,) = await spool.add(batch("gone@example.com", "ok@example.com"))
        await settled(spool, first)
        (found,) = spool.suppressed()
        assert found.address == "gone@example.com"
        assert found.until == START + 30 * DAY
        assert found.reason == "550 5.1.1 no such user"
        assert found.source == "bounce"
        assert spool.suppressions.counts["bounced"] == 1
        with pytest.raises(RecipientSuppressedError) as caught:
            await spool.add(batch("other@example.com", "Gone@Example.com"))
        error = caught.value
        assert isinstance(error, SpooldError)
        assert list(error.recipients) == ["Gone@Example.com"]
        assert "suppressed until 2031-04-03T05:06:07Z (550 5.1.1 no such user)" in str(error)
        assert len(spool.status()) == 1  # nothing was spooled
        assert spool.suppressions.counts["refused"] == 1
        # lifted: the next submission is taken
        assert await spool.unsuppress(["gone@example.com"]) == ["gone@example.com"]
        await spool.add(batch("gone@example.com"))


@pytest.mark.parametrize("answer", [POLICY_REFUSAL, TRY_LATER])
async def test_a_policy_refusal_or_a_4xx_does_not_suppress(
    tmp_path: Path, answer: RecipientResult
) -> None:
    relay = relay_answering({"x@example.com": answer})
    async with open_spool(tmp_path, relay, FakeClock(START), settings=suppressing()) as spool:
        await spool.add(batch("x@example.com", retry_intervals=intervals(1)))
        await wait_until(lambda: bool(spool.status()[0].relay_attempts), "an attempt made")
        assert spool.suppressed() == []
        await spool.add(batch("x@example.com"))  # taken


async def test_nothing_is_suppressed_without_the_setting(tmp_path: Path) -> None:
    relay = relay_answering({"gone@example.com": NO_SUCH_USER})
    settings = suppressing(suppress_after_hard_bounce=None)
    async with open_spool(tmp_path, relay, FakeClock(START), settings=settings) as spool:
        (mid,) = await spool.add(batch("gone@example.com"))
        await settled(spool, mid)
        assert spool.suppressed() == []
        await spool.add(batch("gone@example.com"))
    assert not (tmp_path / SUPPRESSION_FILE).exists()


async def test_on_error_can_ask_for_suppression(tmp_path: Path) -> None:
    relay = relay_answering({"x@example.com": RecipientResult(550, "user unknown")})
    async with open_spool(
        tmp_path,
        relay,
        FakeClock(START),
        settings=suppressing(),
        on_error=lambda msg, rcpt, result: ErrorAction.SUPPRESS,
    ) as spool:
        (mid,) = await spool.add(batch("x@example.com"))
        await settled(spool, mid)
        assert [e.reason for e in spool.suppressed()] == ["550 user unknown"]


async def test_the_list_survives_reopening_the_spool(tmp_path: Path) -> None:
    relay = relay_answering({"gone@example.com": NO_SUCH_USER})
    async with open_spool(tmp_path, relay, FakeClock(START), settings=suppressing()) as spool:
        (mid,) = await spool.add(batch("gone@example.com"))
        await settled(spool, mid)
    async with open_spool(tmp_path, relay, FakeClock(START), settings=suppressing()) as spool:
        assert [e.address for e in spool.suppressed()] == ["gone@example.com"]
        with pytest.raises(RecipientSuppressedError):
            await spool.add(batch("gone@example.com"))
    # and ends when its time is up
    later = FakeClock(START + 31 * DAY)
    async with open_spool(tmp_path, relay, later, settings=suppressing()) as spool:
        assert spool.suppressed() == []
        await spool.add(batch("gone@example.com"))


async def test_fail_mode_takes_the_message_and_fails_the_recipient_at_once(
    tmp_path: Path,
) -> None:
    relay = InMemoryRelay()
    settings = suppressing(
        suppressed_recipients="fail",
        delivery_policy=DeliveryPolicy(
            max_queue_lifetime=5 * DAY, on_permanent_failure=OnPermanentFailure.FREEZE
        ),
    )
    async with open_spool(tmp_path, relay, FakeClock(START), settings=settings) as spool:
        await spool.suppress(["blocked@example.com"], for_=DAY, reason="asked to stop")
        events = spool.events()
        (mid,) = await spool.add(batch("blocked@example.com", "ok@example.com"))
        msg = await settled(spool, mid)
        assert msg.failed_recipients == ["blocked@example.com"]
        assert "blocked@example.com: 550 5.7.1 recipient suppressed until" in (
            msg.relay_attempts[0].error
        )
        assert "asked to stop" not in msg.relay_attempts[0].error  # the sender reads it
        assert relay.attempts == [(mid, ("ok@example.com",))]  # never sent to it
        assert spool.suppressions.counts["failed"] == 1
        assert spool.suppressed()[0].source == "operator"  # not extended by its own failure
        seen = []
        async for event in events:
            seen.append(event.kind)
            if event.kind == EventKind.FROZEN:
                break
        assert EventKind.SPOOLED in seen


async def test_an_entry_edited_into_an_invalid_address_can_still_be_lifted(
    tmp_path: Path,
) -> None:
    async with open_spool(tmp_path, InMemoryRelay(), FakeClock(START)):
        pass  # a spool directory
    bad = Suppression(address="no at sign", since=START, until=START + DAY)
    (tmp_path / SUPPRESSION_FILE).write_bytes(encode_list([bad]))
    async with open_spool(tmp_path, InMemoryRelay(), FakeClock(START)) as spool:
        assert [e.address for e in spool.suppressed()] == ["no at sign"]
        with pytest.raises(AddressError):
            await spool.unsuppress(["also not one"])  # not on the list: checked
        assert await spool.unsuppress(["No At Sign"]) == ["no at sign"]
        assert spool.suppressed() == []


async def test_suppress_checks_its_addresses(tmp_path: Path) -> None:
    async with open_spool(tmp_path, InMemoryRelay(), FakeClock(START)) as spool:
        with pytest.raises(AddressError):
            await spool.suppress(["not an address"], for_=DAY)
        with pytest.raises(ValueError, match="at least one"):
            await spool.suppress([], for_=DAY)
        assert spool.suppressed() == []
        added = await spool.suppress("One@Example.org", for_=DAY)
        assert [e.address for e in added] == ["one@example.org"]
        assert [e.address for e in spool.suppressed(["ONE@example.org", "two@x.org"])] == [
            "one@example.org"
        ]


# ------------------------------------------------------------------ config


def _config(**spool: object) -> Config:
    raw = {
        "spool": {"dir": "spool", **spool},
        "routes": {"smarthost": {"next_hops": ["127.0.0.1:25"]}},
    }
    return parse_config(raw, Path("/etc/spoold/spoold.toml"))


def test_the_keys_default_to_off_refuse_and_a_hundred_thousand() -> None:
    settings = _config().spool.settings
    assert settings.suppress_after_hard_bounce is None
    assert settings.suppressed_recipients == "refuse"
    assert settings.max_suppressed == 100_000
    assert settings.writer.suppressed_recipients == "refuse"  # what ingest workers follow
    given = _config(
        suppress_after_hard_bounce="30d", suppressed_recipients="fail", max_suppressed=10
    ).spool.settings
    assert given.suppress_after_hard_bounce == 30 * DAY
    assert given.writer.suppressed_recipients == "fail"
    assert given.max_suppressed == 10
    assert _config(suppress_after_hard_bounce="").spool.settings.suppress_after_hard_bounce is None


@pytest.mark.parametrize(
    ("spool", "problem"),
    [
        (
            {"suppress_after_hard_bounce": "0s"},
            "spool.suppress_after_hard_bounce: expected a span > 0, got '0s'",
        ),
        (
            {"suppressed_recipients": "drop"},
            "spool.suppressed_recipients: expected one of refuse, fail, got 'drop'",
        ),
        (
            {"max_suppressed": 0},
            "spool.max_suppressed: expected an integer >= 1, got 0",
        ),
        (
            {"max_suppressed": 1_000_001},
            "spool.max_suppressed: expected an integer <= 1000000, got 1000001",
        ),
    ],
)
def test_bad_values_are_named(spool: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(**spool)
    assert caught.value.problems == [problem]


# ------------------------------------------------------------ hostile cases


async def test_a_next_hops_reply_is_kept_short_and_printable(tmp_path: Path) -> None:
    nasty = RecipientResult(550, "no such user\x1b[2J\r\n550-" + "x" * 2000, "5.1.1")
    relay = relay_answering({"gone@example.com": nasty})
    async with open_spool(tmp_path, relay, FakeClock(START), settings=suppressing()) as spool:
        (mid,) = await spool.add(batch("gone@example.com"))
        await settled(spool, mid)
        (entry,) = spool.suppressed()
    assert entry.reason.startswith("550 5.1.1 no such user [2J 550-xxx")
    assert len(entry.reason) == 300 and entry.reason.endswith("...")
    assert all(c.isprintable() for c in entry.reason)


async def test_many_bounces_at_once_are_one_list_and_keep_the_bound(tmp_path: Path) -> None:
    answers = {f"u{i}@example.com": NO_SUCH_USER for i in range(20)}
    relay = relay_answering(answers)
    settings = suppressing(max_suppressed=5, max_concurrent_send_jobs=20)
    async with open_spool(tmp_path, relay, FakeClock(START), settings=settings) as spool:
        ids = [(await spool.add(batch(rcpt)))[0] for rcpt in answers]
        for mid in ids:
            await settled(spool, mid)
        assert len(spool.suppressed()) == 5
        assert spool.suppressions.counts["bounced"] == 20
    again = await owner_list(tmp_path)
    assert len(again.entries(START)) == 5


async def test_an_entry_that_ended_refuses_nothing(tmp_path: Path) -> None:
    clock = FakeClock(START)
    async with open_spool(tmp_path, InMemoryRelay(), clock) as spool:
        await spool.suppress(["a@example.com"], for_=timedelta(hours=1))
        with pytest.raises(RecipientSuppressedError):
            await spool.add(batch("a@example.com"))
        clock.advance(timedelta(hours=1))
        await spool.add(batch("a@example.com"))
        assert spool.suppressed() == []
        await spool.housekeeping()  # (the clock's hour may have run one already)
        # gone from the file too, not only ignored
        assert (await owner_list(tmp_path)).entries(START) == []


async def test_suppressed_between_rcpt_and_the_end_of_data_is_a_451(tmp_path: Path) -> None:
    """The RCPT was taken: the whole message is deferred (not refused for
    good); the client's retry gets 550 for that RCPT alone."""
    port = free_port()
    config = make_config(tmp_path, port)
    assert config.smtp is not None
    settings = await anyio.to_thread.run_sync(listener_settings, config.smtp)
    async with Spool.open(
        config.spool.dir, relay=HeldRelay(), flush_timeout=0.1, ping_interval=10.0**9
    ) as spool:
        router = Router(config)
        listener = SmtpListener(
            Submitter(spool, lambda: router, hostname=HOSTNAME), lambda: settings
        )
        async with anyio.create_task_group() as tg:
            await tg.start(listener.serve)
            async with raw_smtp(port) as smtp:
                assert (await smtp.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
                assert (await smtp.command("RCPT TO:<late@example.com>"))[0] == 250
                assert (await smtp.command("RCPT TO:<ok@example.com>"))[0] == 250
                await spool.suppress(["late@example.com"], for_=DAY)
                assert (await smtp.command("DATA"))[0] == 354
                await smtp.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
                code, text = await smtp.reply()
                assert (code, text) == (
                    451,
                    "451 4.7.1 A recipient was suppressed meanwhile, try again",
                )
                await smtp.quit()
            assert spool.status() == []
            tg.cancel_scope.cancel()


async def test_a_list_that_cannot_be_written_never_costs_the_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise StoreError("cannot write the suppression list: No space left on device")

    monkeypatch.setattr("spoold.suppression._write_sync", broken)
    relay = relay_answering({"gone@example.com": NO_SUCH_USER})
    async with open_spool(tmp_path, relay, FakeClock(START), settings=suppressing()) as spool:
        (mid,) = await spool.add(batch("gone@example.com", "ok@example.com"))
        msg = await settled(spool, mid)
        assert msg.failed_recipients == ["gone@example.com"]
        assert relay.attempts == [(mid, ("gone@example.com", "ok@example.com"))]  # once
    assert not (tmp_path / SUPPRESSION_FILE).exists()


async def test_fail_mode_with_bounces_tells_the_sender(tmp_path: Path) -> None:
    relay = InMemoryRelay()
    settings = suppressing(
        suppressed_recipients="fail",
        delivery_policy=DeliveryPolicy(
            max_queue_lifetime=5 * DAY, on_permanent_failure=OnPermanentFailure.BOUNCE
        ),
    )
    async with open_spool(tmp_path, relay, FakeClock(START), settings=settings) as spool:
        await spool.suppress(["gone@example.com"], for_=DAY, reason="no such user")
        (mid,) = await spool.add(batch("gone@example.com"))
        outcome = await spool.wait(mid, timeout=10)
        assert outcome.kind == "bounced"
        assert outcome.failed_recipients == ("gone@example.com",)
        await wait_until(lambda: relay.delivered, "the notification delivered")
        ((_dsn_id, to, wire),) = relay.delivered
        assert to == SPOOL_SENDER
        assert b"Status: 5.7.1" in wire
        assert b"recipient suppressed until" in wire
        assert b"no such user" not in wire  # the reason is the operator's
    assert all(m != mid for m, _ in relay.attempts)  # never sent


# --------------------------- only a hop's reply to the recipient's own RCPT


def _frozen_on_failure(**changes: object) -> SpoolSettings:
    policy = DeliveryPolicy(on_permanent_failure=OnPermanentFailure.FREEZE)
    return suppressing(delivery_policy=policy, **changes)


@pytest.mark.parametrize(
    ("where", "reply", "suppressed"),
    [
        ("mail", "550 5.1.8 Sender address rejected: domain not found", []),
        ("rcpt-all", "550 5.1.0 <s@example.org>: Sender address rejected", []),
        ("data_end", "550 5.1.1 no such user", []),
        ("rcpt", "550 5.1.1 no such user", ["gone@example.com"]),
    ],
)
async def test_only_a_refusal_of_the_recipients_own_rcpt_suppresses(
    tmp_path: Path, smtp_server: SmtpTestServer, where: str, reply: str, suppressed: list[str]
) -> None:
    """A real next hop: a refusal of the sender (at MAIL FROM, or at RCPT as
    Postfix words it) or of the message (after DATA) is given to every
    recipient and suppresses nobody; a 550 5.1.1 to one RCPT suppresses
    that recipient alone."""
    behaviour = smtp_server.behaviour
    if where == "mail":
        behaviour.mail = Reply(reply)
    elif where == "data_end":
        behaviour.data_end = Reply(reply)
    elif where == "rcpt-all":
        behaviour.rcpt["gone@example.com"] = Reply(reply)
        behaviour.rcpt["ok@example.com"] = Reply(reply)
    else:
        behaviour.rcpt["gone@example.com"] = Reply(reply)
    relay = SmtpRelay(RouteSettings(tls="none", connect_timeout=5.0, command_timeout=5.0))
    submission = RoutedBatch(
        [RoutedEnvelope(SPOOL_SENDER, ["gone@example.com", "ok@example.com"], [smtp_server.hop])],
        BODY,
    )
    try:
        with anyio.fail_after(30):
            async with open_spool(
                tmp_path, relay, FakeClock(START), settings=_frozen_on_failure()
            ) as spool:
                (mid,) = await spool.add(submission)
                await wait_until(
                    lambda: all(m.relay_attempts for m in spool.status() if m.id == mid),
                    "an attempt made",
                )
                assert [e.address for e in spool.suppressed()] == suppressed
    finally:
        await relay.close_and_flush()


@pytest.mark.parametrize(("count", "suppressed"), [(STORM_RECIPIENTS, True), (11, False)])
async def test_a_hop_refusing_a_whole_list_suppresses_none_of_it(
    tmp_path: Path, count: int, suppressed: bool
) -> None:
    """More than STORM_RECIPIENTS recipients of one attempt, every one
    "no such user": a broken hop, not dead mailboxes; up to it, each is
    suppressed."""
    rcpts = [f"u{i}@example.com" for i in range(count)]
    relay = relay_answering(dict.fromkeys(rcpts, NO_SUCH_USER))
    async with open_spool(
        tmp_path, relay, FakeClock(START), settings=_frozen_on_failure()
    ) as spool:
        (mid,) = await spool.add(batch(*rcpts))
        msg = await settled(spool, mid)
        assert sorted(msg.failed_recipients) == sorted(rcpts)
        assert len(spool.suppressed()) == (count if suppressed else 0)


async def test_one_good_recipient_keeps_the_others_suppressed(tmp_path: Path) -> None:
    rcpts = [f"u{i}@example.com" for i in range(STORM_RECIPIENTS + 5)]
    answers: dict[str, RecipientResult] = dict.fromkeys(rcpts, NO_SUCH_USER)
    relay = relay_answering({**answers})
    async with open_spool(
        tmp_path, relay, FakeClock(START), settings=_frozen_on_failure()
    ) as spool:
        (mid,) = await spool.add(batch(*rcpts, "ok@example.com"))
        await settled(spool, mid)
        assert len(spool.suppressed()) == len(rcpts)


async def test_a_suppressed_recipients_notification_names_no_remote_mta(tmp_path: Path) -> None:
    """Fail mode, one recipient suppressed and one refused by the hop: the
    DSN credits the hop with the hop's refusal only."""
    relay = relay_answering({"refused@example.com": POLICY_REFUSAL})
    settings = suppressing(
        suppressed_recipients="fail",
        delivery_policy=DeliveryPolicy(on_permanent_failure=OnPermanentFailure.BOUNCE),
    )
    async with open_spool(tmp_path, relay, FakeClock(START), settings=settings) as spool:
        await spool.suppress(["gone@example.com"], for_=DAY, reason="asked")
        (mid,) = await spool.add(batch("gone@example.com", "refused@example.com"))
        await spool.wait(mid, timeout=10)
        await wait_until(lambda: relay.delivered, "the notification delivered")
        ((_dsn_id, _to, wire),) = relay.delivered
    text = wire.decode()
    blocks = text.split("Final-Recipient:")[1:]
    by_rcpt = {b.split(";")[1].split()[0]: b for b in blocks}
    assert "Remote-MTA" not in by_rcpt["gone@example.com"], text
    assert "Remote-MTA" in by_rcpt["refused@example.com"]


async def test_the_whole_list_is_shown_and_encoded_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``suppress_list`` of a whole list builds and encodes its reply in a
    worker thread (a large list must not hold up the daemon's loop); the
    total is those in force."""
    import threading
    import types

    from spoold.daemon import control_handlers
    from spoold.protocol import Encoded

    threads: set[int] = set()
    shown = control_handlers.suppression_view

    def view(e: Suppression) -> dict[str, object]:
        threads.add(threading.get_ident())
        return shown(e)

    monkeypatch.setattr(control_handlers, "suppression_view", view)
    clock = FakeClock(START)
    async with open_spool(tmp_path, InMemoryRelay(), clock) as spool:
        await spool.suppress(["b@x.org", "a@x.org"], for_=DAY)
        await spool.suppress(["short@x.org"], for_=timedelta(minutes=1))
        clock.advance(timedelta(minutes=2))
        ctx = types.SimpleNamespace(spool=spool)
        reply = await control_handlers._suppress_list(ctx, control_handlers.SuppressListRequest())
    assert isinstance(reply, Encoded)
    found = msgspec.json.decode(reply.json)
    assert [e["address"] for e in found["entries"]] == ["a@x.org", "b@x.org"]
    assert found["total"] == 2
    assert threads and threading.get_ident() not in threads
