"""Faults inside the spool: disk errors mid-attempt, races with rescans."""

from __future__ import annotations

import errno
from datetime import timedelta
from pathlib import Path

import anyio

from spoold.body import Body
from spoold.clock import FakeClock
from spoold.message import Frozen, Message, RoutedBatch, RoutedEnvelope, SendAt
from spoold.relay import InMemoryRelay
from spoold.spool import Spool

BATCH = RoutedBatch(
    [RoutedEnvelope("s@example.org", ["r@example.com"], ["127.0.0.1:25"])],
    Body.from_content(b"Subject: f\r\n\r\nx\r\n"),
)


async def test_a_disk_error_after_presend_backs_off_instead_of_spinning(tmp_path: Path) -> None:
    calls = []
    failing = {"on": True}

    def presend(message: Message) -> Frozen:
        calls.append(message.id)
        return Frozen()

    def fail(step: str) -> None:
        if failing["on"] and step == "replace":
            raise OSError(errno.EIO, "Input/output error")

    clock = FakeClock()
    with anyio.fail_after(10):
        async with Spool.open(
            tmp_path, relay=InMemoryRelay(), clock=clock, presend=presend
        ) as spool:
            spool.ondisk.store._on_step = fail
            (mid,) = await spool.add(BATCH)
            while not isinstance(spool.status()[0].status, SendAt):
                await anyio.sleep(0.01)  # the failed write happens in a worker thread
            # The busy loop this guards against made thousands of calls in 0.1 s.
            await anyio.sleep(0.1)
            assert calls == [mid]  # tried once, then waits a minute
            failing["on"] = False
            async with spool.events() as events:
                clock.advance(timedelta(minutes=1, seconds=1))
                async for event in events:
                    if event.kind == "frozen":
                        break
            assert calls == [mid, mid]
            assert (tmp_path / "frozen" / mid).exists()


async def test_rescans_racing_adds_deliver_each_message_once(tmp_path: Path) -> None:
    relay = InMemoryRelay()
    count = 300
    with anyio.fail_after(60):
        async with (
            Spool.open(tmp_path, relay=relay, ping_interval=0.001) as spool,
            spool.events(max_buffer=10 * count) as events,
        ):
            async with anyio.create_task_group() as tg:
                for _ in range(10):

                    async def submit() -> None:
                        for _ in range(count // 10):
                            await spool.add(BATCH)

                    tg.start_soon(submit)
            delivered: set[str] = set()
            async for event in events:
                if event.kind == "delivered":
                    delivered.add(event.id or "")
                    if len(delivered) == count:
                        break
            for _ in range(100):
                await anyio.sleep(0)
            assert spool.counts() == {"active": 0, "frozen": 0, "sending": 0}
    ids = [mid for mid, _, _ in relay.delivered]
    assert len(ids) == count
    assert len(set(ids)) == count
    assert [p.name for p in (tmp_path / "active").iterdir() if p.is_file()] == []
