"""A large queue: loading it batch by batch, the compact index, ids alone.

What keeps a spool of a million messages cheap must not change what it
holds: records read in batches come out in name order with unreadable and
misplaced ones handled across batch boundaries; interned records share
parts yet list and encode exactly as on disk, and a change to one never
shows in another; ``status`` with ``only_ids`` answers the ids of the full
listing. (The scale itself is measured by ``bench/queue_scale.py``.)
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from spoold.daemon.control import ControlClient, ControlServer
from spoold.errors import StoreError
from spoold.message import (
    EnvelopeInfo,
    Frozen,
    Message,
    Queue,
    RelayAttempt,
    RetryInterval,
    SendAt,
    SharedParts,
    decode_record,
    encode_record,
)
from spoold.ondisk import LOAD_BATCH, OnDiskSpool
from spoold.spool import DEFAULT_RETRY_INTERVALS, Spool
from spoold.store import StoredRecord
from spoold.testing import FakeClock, InMemoryRelay
from spoold.times import utcnow
from tests.factories import make_message, new_message
from tests.spool_helpers import batch

TIMEOUT = 60.0  # a safety net per test: none comes near it


def record(mid: str, *, frozen: bool = False, rcpt: str = "rcpt@example.com") -> Message:
    """A record as a large queue holds many: default intervals, one hop,
    parent id equal to its id, one recipient."""
    later = utcnow() + timedelta(days=1)
    return Message(
        id=mid,
        parent_id=mid,
        spool_date=utcnow(),
        next_hop_choices=["127.0.0.1:25"],
        retry_intervals=list(DEFAULT_RETRY_INTERVALS),
        remaining_recipients=[rcpt],
        status=Frozen() if frozen else SendAt(at=later),
        envelope_info=EnvelopeInfo(sender="sender@example.org", recipients=[rcpt]),
    )


def write_queue(root: Path, messages: list[Message]) -> None:
    """Records and bodies written straight into a spool directory (no daemon)."""
    for d in ("active", "frozen", "data", ".registry"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for m in messages:
        (root / str(m.queue) / m.id).write_bytes(encode_record(m))
        (root / "data" / m.id).write_bytes(b"Subject: x\r\n\r\nx\r\n")
        (root / ".registry" / m.id).write_bytes(b"1\n")


async def test_read_records_reads_the_names_given_in_order(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        od, _ = await OnDiskSpool.open(tmp_path)
        a, b, c = await od.add([new_message(), new_message(), new_message()])
        await od.checkout(b)
        big = b"x" * (40 * 1024)  # over two reads' worth: read whole all the same
        (tmp_path / "active" / "BigRecord1").write_bytes(big)
        threads: list[threading.Thread] = []

        def then(records: list[StoredRecord]) -> list[tuple[str, bool, bytes]]:
            threads.append(threading.current_thread())
            return [(r.name, r.checked_out, r.data) for r in records]

        names = [(c.id, False), ("GoneMeanwhile", False), (b.id, True), ("BigRecord1", False)]
        got = await od.store.read_records("active", names, then)
        assert got == [
            (c.id, False, encode_record(c)),
            (b.id, True, (tmp_path / "active" / ".checkout" / b.id).read_bytes()),
            ("BigRecord1", False, big),
        ]
        assert threads and threads[0] is not threading.main_thread()
        assert a.id not in [n for n, _, _ in got]
        await od.close()


async def test_load_in_batches_handles_every_record_across_batch_boundaries(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(TIMEOUT):
        od, _ = await OnDiskSpool.open(tmp_path)
        good = await od.add([new_message() for _ in range(5)])
        (tmp_path / "active" / "BadRecord1").write_bytes(b"not json")
        misplaced = make_message("Misplaced1", status=Frozen())
        (tmp_path / "active" / misplaced.id).write_bytes(encode_record(misplaced))
        batches: list[list[str]] = []
        prepared: list[tuple[str, threading.Thread]] = []

        messages, unreadable = await od.load(
            Queue.ACTIVE,
            batch_size=2,
            on_batch=lambda ms: batches.append([m.id for m in ms]),
            prepare=lambda m: prepared.append((m.id, threading.current_thread())),
        )
        assert messages == []  # handed over batch by batch instead
        # Each message read was prepared, in the reading thread, before it was handed over.
        assert sorted(mid for mid, _ in prepared) == sorted([*(m.id for m in good), misplaced.id])
        assert all(t is not threading.main_thread() for _, t in prepared)
        assert [mid for b in batches for mid in b] == sorted(m.id for m in good)
        assert len(batches) == 4  # seven records, two a batch
        assert all(len(b) <= 2 for b in batches)
        assert [u.id for u in unreadable] == ["BadRecord1"]
        assert (tmp_path / "quarantine" / "BadRecord1").read_bytes() == b"not json"
        assert (tmp_path / "frozen" / misplaced.id).exists()
        # Without on_batch: the same messages, returned.
        again, bad = await od.load(Queue.ACTIVE, batch_size=3)
        assert [m.id for m in again] == sorted(m.id for m in good)
        assert bad == []
        await od.close()


async def test_records_not_in_memory_are_read_by_several_threads_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold page cache (as the store's probe finds it after a reboot):
    LOAD_READERS threads read the batches, still handed over in name order;
    a read that fails still stops the load with its error."""
    with anyio.fail_after(TIMEOUT):
        od, _ = await OnDiskSpool.open(tmp_path)
        good = await od.add([new_message() for _ in range(9)])

        async def cold(queue: str, names: object) -> bool:
            return False

        monkeypatch.setattr(od.store, "in_memory", cold)
        batches: list[list[str]] = []
        await od.load(
            Queue.ACTIVE, batch_size=2, on_batch=lambda ms: batches.append([m.id for m in ms])
        )
        assert [mid for b in batches for mid in b] == sorted(m.id for m in good)
        assert len(batches) == 5
        (tmp_path / "active" / "LoopRecord1").symlink_to("LoopRecord1")  # open() fails: ELOOP
        with pytest.raises(StoreError) as caught:
            await od.load(Queue.ACTIVE, batch_size=2)
        assert "LoopRecord1" in str(caught.value)
        await od.close()


async def test_records_in_memory_are_probed_as_such(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        od, _ = await OnDiskSpool.open(tmp_path)
        await od.add([new_message() for _ in range(3)])
        names = await od.names(Queue.ACTIVE)
        assert await od.store.in_memory("active", names)  # just written
        assert await od.store.in_memory("active", [("Gone000001", False)])
        await od.close()


async def test_a_read_that_fails_stops_the_load_with_its_store_error(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        od, _ = await OnDiskSpool.open(tmp_path)
        await od.add([new_message() for _ in range(5)])
        (tmp_path / "active" / "LoopRecord1").symlink_to("LoopRecord1")  # open() fails: ELOOP
        with pytest.raises(StoreError) as caught:
            await od.load(Queue.ACTIVE, batch_size=2)
        assert "LoopRecord1" in str(caught.value)
        assert (tmp_path / "active" / "LoopRecord1").is_symlink()  # nothing set aside
        await od.close()


def test_interned_records_share_parts_and_a_change_never_shows_in_another() -> None:
    a_id, b_id = "InternA0000001", "InternB0000001"
    a = decode_record(encode_record(record(a_id, rcpt="a@example.com")))
    b = decode_record(encode_record(record(b_id, rcpt="b@example.com")))
    before_a, before_b = encode_record(a), encode_record(b)
    shared = SharedParts()
    a.intern(shared)
    b.intern(shared)
    # Nothing a record says changed...
    assert (encode_record(a), encode_record(b)) == (before_a, before_b)
    # ... but equal parts are one object.
    assert a.retry_intervals is b.retry_intervals
    assert a.next_hop_choices is b.next_hop_choices
    assert a.flows is b.related_ids is b.failed_recipients is a.relay_attempts
    assert a.envelope_info.sender is b.envelope_info.sender
    assert a.parent_id is a.id
    assert a.envelope_info.recipients is a.remaining_recipients

    # Every way a record changes leaves the others as they were.
    a.add_relay_attempt(RelayAttempt(time=utcnow(), error="451 later"))
    a.add_retry_intervals([RetryInterval(timedelta(seconds=5))])
    a.failed_recipients = ["f@example.com"]
    a.move_failed_to_remaining()
    snap = b.copy()
    snap.flows.append("flow")
    snap.retry_intervals.pop()
    snap.next_hop_choices.append("other:25")
    assert encode_record(b) == before_b
    assert shared.empty == []
    assert a.remaining_recipients == ["a@example.com", "f@example.com"]
    assert a.envelope_info.recipients == ["a@example.com"]  # as submitted
    assert len(a.relay_attempts) == 1


async def test_open_indexes_a_queue_larger_than_a_batch(tmp_path: Path) -> None:
    count = LOAD_BATCH + 3
    frozen = {f"Scale{i:09d}" for i in range(0, count, 500)}
    messages = [record(f"Scale{i:09d}", frozen=f"Scale{i:09d}" in frozen) for i in range(count)]
    write_queue(tmp_path, messages)
    with anyio.fail_after(TIMEOUT):
        async with Spool.open(tmp_path, relay=InMemoryRelay(), clock=FakeClock()) as spool:
            assert spool.counts() == {Queue.ACTIVE: count - len(frozen), Queue.FROZEN: len(frozen)}
            listing = spool.status()
            all_ids = sorted(m.id for m in messages)
            assert [m.id for m in listing] == all_ids
            assert spool.status_ids() == all_ids
            assert spool.status_ids(Queue.FROZEN) == sorted(frozen)
            assert spool.status_ids(Queue.ACTIVE) == sorted(set(all_ids) - frozen)
            # The compact index lists each record exactly as it is on disk.
            on_disk = {m.id: encode_record(m) for m in messages}
            assert all(encode_record(m) == on_disk[m.id] for m in listing)


async def test_status_only_ids_answers_the_ids_of_the_listing(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    with anyio.fail_after(TIMEOUT):
        async with Spool.open(
            tmp_path / "spool", relay=InMemoryRelay(gate=anyio.Event()), flush_timeout=0.1
        ) as spool:
            frozen = [*await spool.add(batch("f1@example.com"), frozen=True)]
            frozen += await spool.add(batch("f2@example.com"), frozen=True)
            active = await spool.add(batch("a@example.com"))
            held = await spool.quarantine("looks odd", batch("q@example.com"))
            server = ControlServer(spool)
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve, path, 0o600)
                client = ControlClient(path)
                for queue, expected in (
                    ("all", sorted(frozen + active)),
                    ("frozen", sorted(frozen)),
                    ("active", active),
                    ("quarantine", held),
                ):
                    ids = await client.request("status", queue=queue, only_ids=True)
                    listing = await client.request("status", queue=queue)
                    assert ids == [v["id"] for v in listing] == expected, queue
                tg.cancel_scope.cancel()
