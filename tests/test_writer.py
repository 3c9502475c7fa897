"""SpoolWriter: adding to a spool another process owns."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from spoold import AddressError, InsufficientStorageError, SpoolWriter, StoreError
from spoold.message import RoutedBatch, RoutedEnvelope
from spoold.spool import DEFAULT_RETRY_INTERVALS, Spool
from spoold.testing import InMemoryRelay
from tests.spool_helpers import BODY, is_delivered
from tests.support import wait_until

PROJECT = Path(__file__).resolve().parent.parent


def batch(*recipients: str) -> RoutedBatch:
    return RoutedBatch([RoutedEnvelope("s@example.org", list(recipients), ["mx.example:25"])], BODY)


async def test_the_owner_adopts_what_a_writer_adds_and_sends_it(tmp_path: Path) -> None:
    relay = InMemoryRelay()
    with anyio.fail_after(20):
        async with (
            Spool.open(tmp_path, relay=relay) as spool,
            SpoolWriter.open(tmp_path, default_retry_intervals=DEFAULT_RETRY_INTERVALS) as writer,
        ):
            ids = await writer.add(batch("a@example.com"))
            (mid,) = ids
            await wait_until(lambda: is_delivered(spool, tmp_path, mid), "the owner to send it")
    assert [(m, r) for m, r, _ in relay.delivered] == [(mid, "a@example.com")]


def test_a_writer_in_another_process_is_heard_by_the_owner(tmp_path: Path) -> None:
    """The real shape: the writer is a process of its own."""
    code = textwrap.dedent(
        f"""
        import anyio, sys
        sys.path.insert(0, {str(PROJECT)!r})
        from spoold import SpoolWriter, DEFAULT_RETRY_INTERVALS, RoutedBatch, RoutedEnvelope, Body
        async def main():
            intervals = DEFAULT_RETRY_INTERVALS
            async with SpoolWriter.open(sys.argv[1], default_retry_intervals=intervals) as w:
                b = RoutedBatch([RoutedEnvelope("s@x.example", ["r@y.example"], ["h:25"])],
                                Body.from_content(b"Subject: x\\r\\n\\r\\nx\\r\\n"))
                print(*(await w.add(b)))
        anyio.run(main)
        """
    )

    async def scenario() -> tuple[str, list[tuple[str, str, bytes]]]:
        relay = InMemoryRelay()
        async with Spool.open(tmp_path, relay=relay) as spool:
            done = await anyio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, "-c", code, str(tmp_path)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                )
            )
            mid = done.stdout.strip()
            await wait_until(lambda: is_delivered(spool, tmp_path, mid), "adoption and delivery")
        return mid, relay.delivered

    mid, delivered = anyio.run(scenario)
    assert [(m, r) for m, r, _ in delivered] == [(mid, "r@y.example")]


async def test_a_writer_checks_addresses_and_free_space_and_writes_nothing_wrong(
    tmp_path: Path,
) -> None:
    async with Spool.open(tmp_path, relay=InMemoryRelay(gate=anyio.Event())):
        pass  # the spool directory exists now
    async with SpoolWriter.open(
        tmp_path, default_retry_intervals=DEFAULT_RETRY_INTERVALS
    ) as writer:
        with pytest.raises(AddressError):
            await writer.add(batch("not an address"))
        writer.min_free_space = 2**62
        with pytest.raises(InsufficientStorageError):
            await writer.add(batch("a@example.com"))
    assert sorted(p.name for p in (tmp_path / "active").iterdir() if p.is_file()) == []


async def test_a_writer_never_creates_a_spool(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a spool directory"):
        async with SpoolWriter.open(
            tmp_path / "nothing", default_retry_intervals=DEFAULT_RETRY_INTERVALS
        ):
            pass
