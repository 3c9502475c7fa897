"""Other processes add messages; the owner hears of them without polling."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

import spoold.store.store as store_module
from spoold import SpoolWriter
from spoold.events import SpoolEvent
from spoold.ids import is_valid_id, new_id
from spoold.message import Queue, RoutedBatch, RoutedEnvelope, decode_record, encode_record
from spoold.ondisk import OnDiskSpool
from spoold.spool import DEFAULT_RETRY_INTERVALS, Spool
from spoold.store import NotifyResult
from spoold.store.wakeup import MAX_DATAGRAM, Wakeup, parse_datagram, sender_uid
from spoold.store.wakeup import _datagrams as wakeup_datagrams
from spoold.store.wakeup import _merge as wakeup_merge
from spoold.testing import FakeClock, InMemoryRelay
from tests.factories import make_message, new_message
from tests.spool_helpers import BODY, settle
from tests.support import WAIT_TIMEOUT, records_in, spool_files

CHILD = str(Path(__file__).with_name("store_child.py"))


async def test_owner_adopts_messages_another_process_adds(tmp_path: Path) -> None:
    relay = InMemoryRelay()
    with anyio.fail_after(60):
        async with Spool.open(tmp_path, relay=relay) as spool, spool.events() as events:
            child = await anyio.run_process(
                [sys.executable, CHILD, str(tmp_path), "enqueue_many", "100"], check=False
            )
            assert child.returncode == 0
            delivered = set()
            async for event in events:
                if event.kind == "delivered":
                    delivered.add(event.id)
                    if len(delivered) == 100:
                        break
            assert spool.counts() == {Queue.ACTIVE: 0, Queue.FROZEN: 0}
    assert len({mid for mid, _, _ in relay.delivered}) == 100
    assert not (tmp_path / "wakeup").exists()


def test_a_writer_without_owner_just_leaves_messages_for_the_next_open(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, CHILD, str(tmp_path), "enqueue_many", "10"], timeout=60, check=False
    )
    assert out.returncode == 0
    assert len(records_in(tmp_path, "active")) == 10
    assert len(spool_files(tmp_path, "data")) == 10


async def test_a_lost_wakeup_is_made_good_at_the_next_ping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    relay = InMemoryRelay()
    with anyio.fail_after(WAIT_TIMEOUT):
        async with (
            Spool.open(tmp_path, relay=relay, clock=clock, ping_interval=30) as spool,
            spool.events() as events,
        ):
            writer, _ = await OnDiskSpool.open(tmp_path, owner=False)

            async def lost(names: object) -> bool:
                return False  # the datagram never arrives

            monkeypatch.setattr(writer.store, "notify_owner", lost)
            async with writer:
                (msg,) = await writer.add([new_message()])
            await settle()  # (no wake-up comes: nothing to wait for but the ping)
            assert msg.id not in {m.id for m in spool.status()}
            assert relay.attempts == []
            clock.advance(31)  # the ping's rescan finds it
            async for event in events:
                if event.kind == "delivered" and event.id == msg.id:
                    break
    assert [mid for mid, _, _ in relay.delivered] == [msg.id]


# --------------------------------------- records sent along with the names


def _batch(*recipients: str, count: int = 1) -> RoutedBatch:
    envelopes = [
        RoutedEnvelope("s@example.org", list(recipients), ["mx.example:25"]) for _ in range(count)
    ]
    return RoutedBatch(envelopes, BODY)


class _Held:
    """A writer's wake-ups, kept back (as if lost) to be sent later, or never."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.records: list[bytes | None] = []
        self.told = anyio.Event()

    def __call__(
        self, names: Sequence[str], records: Sequence[bytes | None] | None = None
    ) -> tuple[NotifyResult, int]:
        self.names += names
        self.records += records or [None] * len(names)
        self.told.set()
        return "sent", len(names)

    async def hold(self, writer: SpoolWriter, batch: RoutedBatch) -> str:
        """Add ``batch`` (one message) and wait for its wake-up, held here."""
        self.told = anyio.Event()
        (mid,) = await writer.add(batch)
        await self.told.wait()
        return mid


@contextlib.asynccontextmanager
async def _owner_and_writer(
    root: Path, relay: InMemoryRelay, **spool_options: Any
) -> AsyncIterator[tuple[Spool, AsyncIterator[SpoolEvent], SpoolWriter]]:
    """The owner (with its events) and a writer, on one spool."""
    async with (
        Spool.open(root, relay=relay, **spool_options) as spool,
        spool.events() as events,
        SpoolWriter.open(root, default_retry_intervals=DEFAULT_RETRY_INTERVALS) as writer,
    ):
        yield spool, events, writer


def _delivered_ids(relay: InMemoryRelay) -> list[str]:
    return [mid for mid, _, _ in relay.delivered]


async def _delivered(events: AsyncIterator[SpoolEvent], ids: Iterable[str]) -> None:
    waiting = set(ids)
    async for event in events:
        if event.kind == "delivered":
            waiting.discard(event.id)
            if not waiting:
                return


def _no_reading_back(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the owner's reads of new records from disk (the fallback)."""
    read_record = store_module._read_record
    reads: list[str] = []

    def counted(name: str, path: str) -> bytes:
        reads.append(Path(path).name)
        return read_record(name, path)

    monkeypatch.setattr(store_module, "_read_record", counted)
    return reads


async def test_the_owner_adopts_a_writers_records_without_reading_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = InMemoryRelay()
    with anyio.fail_after(WAIT_TIMEOUT):
        async with _owner_and_writer(tmp_path, relay) as (spool, events, writer):
            reads = _no_reading_back(spool, monkeypatch)
            ids = await writer.add(_batch("a@example.com", count=3))
            await _delivered(events, ids)
    assert sorted(_delivered_ids(relay)) == sorted(ids)
    assert reads == []


async def test_a_batch_too_big_for_one_datagram_is_delivered_once_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records over MAX_DATAGRAM go in several datagrams; one record too big
    for any goes by name alone, and the owner reads it from disk."""
    relay = InMemoryRelay()
    many = [f"r{i}@example.com" for i in range(4000)]  # one record of about 90 KiB
    with anyio.fail_after(WAIT_TIMEOUT):
        async with _owner_and_writer(tmp_path, relay) as (spool, events, writer):
            reads = _no_reading_back(spool, monkeypatch)
            small = await writer.add(_batch("a@example.com", count=150))
            (big,) = await writer.add(_batch(*many))
            await _delivered(events, [*small, big])
    assert sorted(_delivered_ids(relay)) == sorted(small + [big] * len(many))
    assert reads == [big]  # read back: the big one alone


async def test_a_record_named_again_after_its_delivery_is_not_sent_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer's wake-up, late: the ping's rescan adopted and delivered the
    message first; the record sent with the late datagram is no longer on
    disk, so nothing is adopted again (named twice: the same), nor is a
    record sent for an id that was never written."""
    clock = FakeClock()
    relay = InMemoryRelay()
    with anyio.fail_after(WAIT_TIMEOUT):
        async with _owner_and_writer(tmp_path, relay, clock=clock, ping_interval=30) as (
            spool,
            events,
            writer,
        ):
            held = _Held()
            monkeypatch.setattr(writer._disk.store, "notify_owner_some", held)
            first = await held.hold(writer, _batch("a@example.com"))
            assert held.names == [first]
            clock.advance(31)  # the ping's rescan finds it
            await _delivered(events, [first])
            monkeypatch.undo()
            # Never written: its record is not trusted either.
            ghost = new_id()
            forged = encode_record(make_message(ghost))
            late = Wakeup(spool._disk.store.wakeup_path)
            assert late.try_send(held.names, held.records) == "sent"
            assert late.try_send([*held.names, ghost], [*held.records, forged]) == "sent"
            (second,) = await writer.add(_batch("b@example.com"))  # heard after the late one
            await _delivered(events, [second])
            late.close_sync()
            assert spool.counts() == {Queue.ACTIVE: 0, Queue.FROZEN: 0}
    assert _delivered_ids(relay) == [first, second]


async def test_a_record_sent_to_an_owner_that_loaded_and_sent_it_is_not_sent_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner restarted between a writer's commit and its wake-up: the
    new owner loads the message at open and delivers it; the wake-up that
    comes then, with its record, adopts nothing."""
    async with Spool.open(tmp_path, relay=InMemoryRelay()):
        pass  # the spool exists; no owner runs now
    relay = InMemoryRelay(gate=anyio.Event())
    with anyio.fail_after(WAIT_TIMEOUT):
        async with SpoolWriter.open(
            tmp_path, default_retry_intervals=DEFAULT_RETRY_INTERVALS
        ) as writer:
            held = _Held()
            monkeypatch.setattr(writer._disk.store, "notify_owner_some", held)
            first = await held.hold(writer, _batch("a@example.com"))
            monkeypatch.undo()
            async with Spool.open(tmp_path, relay=relay) as spool, spool.events() as events:
                assert relay.gate is not None
                relay.gate.set()
                await _delivered(events, [first])  # loaded at open, not woken
                late = Wakeup(spool._disk.store.wakeup_path)
                assert late.try_send(held.names, held.records) == "sent"
                (second,) = await writer.add(_batch("b@example.com"))  # heard after it
                await _delivered(events, [second])
                late.close_sync()
                assert spool.counts() == {Queue.ACTIVE: 0, Queue.FROZEN: 0}  # none adopted again
    assert _delivered_ids(relay) == [first, second]


async def test_a_record_sent_of_another_size_than_the_file_is_read_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk is the truth: a record sent whose file differs (here in
    size) is read from the file; a datagram whose frames do not match its
    names is taken for its names alone."""
    relay = InMemoryRelay()
    with anyio.fail_after(WAIT_TIMEOUT):
        async with _owner_and_writer(tmp_path, relay) as (spool, events, writer):
            held = _Held()
            monkeypatch.setattr(writer._disk.store, "notify_owner_some", held)
            one = await held.hold(writer, _batch("a@example.com"))
            two = await held.hold(writer, _batch("b@example.com"))
            assert held.names == [one, two]
            monkeypatch.undo()
            wrong = decode_record(held.records[0] or b"")
            wrong.remaining_recipients = ["someone-else@example.com"]
            wakeup = Wakeup(spool._disk.store.wakeup_path)
            assert wakeup.try_send([one], [encode_record(wrong)]) == "sent"
            cut = wakeup_datagrams([two], [held.records[1]])[0][0][:-5]  # truncated
            wakeup._send_socket.sendto(cut, wakeup.path)  # type: ignore[union-attr]
            await _delivered(events, [one, two])
            wakeup.close_sync()
    assert sorted((m, r) for m, r, _ in relay.delivered) == sorted(
        [(one, "a@example.com"), (two, "b@example.com")]
    )


async def test_a_datagram_too_big_for_the_writers_socket_goes_as_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send buffer smaller than a datagram of records (EMSGSIZE): the
    names go alone, and the owner reads the records from disk."""
    relay = InMemoryRelay()
    with anyio.fail_after(WAIT_TIMEOUT):
        async with _owner_and_writer(tmp_path, relay) as (spool, events, writer):
            held = _Held()
            monkeypatch.setattr(writer._disk.store, "notify_owner_some", held)
            many = [f"r{i}@example.com" for i in range(300)]  # records of about 7 KiB
            ids = [await held.hold(writer, _batch(*many)) for _ in range(3)]
            monkeypatch.undo()
            reads = _no_reading_back(spool, monkeypatch)
            small = Wakeup(spool._disk.store.wakeup_path)
            small._send_socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
            small._send_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            assert small.send_some(held.names, held.records) == ("sent", 3)
            await _delivered(events, ids)
            small.close_sync()
    assert sorted(_delivered_ids(relay)) == sorted(ids * len(many))
    assert sorted(reads) == sorted(ids)


def test_a_datagram_gives_its_records_only_when_its_frames_match_its_names() -> None:
    a, b = new_id(), new_id()
    ((whole, _),) = wakeup_datagrams([a, b], [b"rec-a", None])
    assert parse_datagram(whole) == {a: b"rec-a", b: None}
    assert parse_datagram(whole[:-1]) == {a: None, b: None}  # truncated
    assert parse_datagram(whole + b"x") == {a: None, b: None}  # more than it says
    assert parse_datagram(whole.replace(b"\x00\x01", b"\x00\x02")) == {a: None, b: None}
    assert parse_datagram(f"{a} {b}".encode()) == {a: None, b: None}  # an earlier writer
    assert parse_datagram(f"{a}  ../x\n{b}".encode()) == {a: None, b: None}  # not ids: left out
    huge = b"x" * MAX_DATAGRAM
    datagrams = wakeup_datagrams([a, b], [huge, b"rec-b"])
    assert all(len(d) <= MAX_DATAGRAM for d, _ in datagrams)
    assert [(parse_datagram(d), n) for d, n in datagrams] == [({a: None, b: b"rec-b"}, 2)]


# ------------------------------------------- who may send records along

NOBODY = 65534


def _send_as_nobody(path: str, payload: bytes) -> None:
    """Send ``payload`` to the socket at ``path`` from a process of another
    user (nobody, in no group): on a socket connected here and handed down,
    so nobody needs no access to the spool's directory."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(path)
        code = (
            "import socket, sys; "
            "socket.socket(fileno=int(sys.argv[1])).send(sys.stdin.buffer.read())"
        )
        as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        out = subprocess.run(
            [*as_nobody, "/usr/bin/python3", "-I", "-c", code, str(sock.fileno())],
            input=payload,
            pass_fds=(sock.fileno(),),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr


async def test_a_record_forged_by_another_user_is_read_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone in the spool's group may send to the wake-up socket (0660): a
    record of the same size as the file's, sent by another user, is taken
    for its name alone; the message goes where its file says."""
    if os.geteuid() != 0:
        pytest.skip("sends as another user through setpriv: needs root (CI runs as root)")
    if shutil.which("setpriv") is None or not Path("/usr/bin/python3").exists():
        pytest.skip("needs setpriv (apt-get install util-linux) and /usr/bin/python3")
    relay = InMemoryRelay()
    with anyio.fail_after(WAIT_TIMEOUT):
        async with _owner_and_writer(tmp_path, relay) as (spool, events, writer):
            held = _Held()
            monkeypatch.setattr(writer._disk.store, "notify_owner_some", held)
            mid = await held.hold(writer, _batch("alice@example.com"))
            real = (tmp_path / "active" / mid).read_bytes()
            forged = real.replace(b"alice@example.com", b"mallo@attacker.xx")
            forged = forged.replace(b"mx.example:25", b"mx.evil.xx:25")
            assert len(forged) == len(real) and forged != real
            ((payload, _),) = wakeup_datagrams([mid], [forged])
            await anyio.to_thread.run_sync(_send_as_nobody, spool._disk.store.wakeup_path, payload)
            await _delivered(events, [mid])
    assert [(m, r) for m, r, _ in relay.delivered] == [(mid, "alice@example.com")]


def test_only_the_owners_user_and_root_are_trusted_with_records() -> None:
    """The check behind the test above, without another user: the uid the
    kernel gives with a datagram decides whether its records are used."""
    a = new_id()
    ((whole, _),) = wakeup_datagrams([a], [b"rec-a"])
    assert parse_datagram(whole, trusted=False) == {a: None}  # its name alone
    assert parse_datagram(whole) == {a: b"rec-a"}

    def creds(uid: int) -> list[tuple[int, int, bytes]]:
        return [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("iII", 1, uid, uid))]

    assert sender_uid(creds(NOBODY)) == NOBODY
    assert sender_uid(creds(0)) == 0
    assert sender_uid([]) is None  # none given: not trusted
    assert sender_uid([(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, b"\x01")]) is None


async def test_the_owner_takes_records_only_from_its_own_user(tmp_path: Path) -> None:
    """What the owner's socket hears, with the sender's uid checked (the
    kernel gives it with each datagram): its own user's records are kept."""
    wakeup = Wakeup(str(tmp_path / "wakeup"))
    a, b = new_id(), new_id()
    with anyio.fail_after(WAIT_TIMEOUT):
        async with wakeup.receive() as batches:
            assert wakeup.try_send([a], [b"rec-a"]) == "sent"
            assert await anext(aiter(batches)) == {a: b"rec-a"}
            assert wakeup.try_send([b], [b"rec-b"]) == "sent"
            assert await anext(aiter(batches)) == {b: b"rec-b"}
    wakeup.close_sync()


def test_an_owner_of_an_earlier_version_hears_every_name_of_a_datagram_with_records() -> None:
    """An earlier owner (before records were sent) split a datagram on
    whitespace and kept the ids: the last name is not glued to the records."""

    def names_in(packet: bytes) -> list[str]:  # eb356d4's spoold/store/wakeup.py
        return [n for n in packet.decode("ascii", "replace").split() if is_valid_id(n)]

    names = [new_id() for _ in range(5)]
    records = [encode_record(make_message(n)) for n in names]
    for payload, count in wakeup_datagrams(names, records):
        assert count == len(names)
        heard = names_in(payload)
        assert heard[: len(names)] == names  # (then what the records hold: found nowhere)
        assert parse_datagram(payload) == dict(zip(names, records, strict=True))


def test_a_name_sent_twice_with_two_records_is_read_from_disk() -> None:
    a, b, c = new_id(), new_id(), new_id()
    conflicts: set[str] = set()
    woken = parse_datagram(wakeup_datagrams([a, b], [b"rec-a", None])[0][0])
    wakeup_merge(
        woken,
        parse_datagram(wakeup_datagrams([a, b, c], [b"other", b"rec-b", None])[0][0]),
        conflicts,
    )
    assert woken == {a: None, b: b"rec-b", c: None}  # a: two records, none trusted
    wakeup_merge(woken, parse_datagram(wakeup_datagrams([a], [b"rec-a"])[0][0]), conflicts)
    assert woken[a] is None  # (stays so: which one is the file's is not known)
    wakeup_merge(woken, {b: b"rec-b"}, conflicts)
    assert woken[b] == b"rec-b"  # the same one twice: kept


async def test_a_writer_sends_each_record_as_it_wrote_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record a writer's wake-up carries is the very bytes of the
    record file (taken from the write, not encoded a second time)."""
    async with Spool.open(tmp_path, relay=InMemoryRelay()):
        pass  # the spool exists; no owner runs now
    with anyio.fail_after(WAIT_TIMEOUT):
        async with SpoolWriter.open(
            tmp_path, default_retry_intervals=DEFAULT_RETRY_INTERVALS
        ) as writer:
            held = _Held()
            monkeypatch.setattr(writer._disk.store, "notify_owner_some", held)
            ids = [await held.hold(writer, _batch("a@example.com")) for _ in range(3)]
            held.told = anyio.Event()
            pair = await writer.add(_batch("b@example.com", count=2))
            while len(held.names) < 5:
                await held.told.wait()
                held.told = anyio.Event()
    assert held.names == [*ids, *pair]
    for name, record in zip(held.names, held.records, strict=True):
        assert record == (tmp_path / "active" / name).read_bytes()
        assert decode_record(record, expected_id=name).id == name
