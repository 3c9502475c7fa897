"""Other processes add messages; the owner hears of them without polling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from spoold.message import Queue
from spoold.ondisk import OnDiskSpool
from spoold.spool import Spool
from spoold.testing import FakeClock, InMemoryRelay
from tests.factories import new_message
from tests.spool_helpers import settle
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
