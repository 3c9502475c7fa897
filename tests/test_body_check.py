"""A damaged body is never delivered.

The record carries the body file's size and SHA-256 from the moment it is
written; a relay checks them (:class:`~spoold.body.BodyCheck`) before it
sends anything and again as it streams, and stops before the end of DATA
when they differ: the next hop never gets a partial message, and the spool
sets the message aside in ``quarantine`` with the reason. ``spoold check``
finds such bodies too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import anyio
import pytest

from spoold.body import BodyCheck
from spoold.errors import BodyDamagedError
from spoold.relay import BodyHandle
from spoold.smtp_relay import SmtpRelay
from tests.daemon_helpers import DaemonFactory, cli, prefill, spooled, write_config
from tests.relay_helpers import ALICE, message_to, route
from tests.smtp_server import Reply, SmtpTestServer
from tests.support import records_in, wait_until

MiB = 1024 * 1024
LARGE = b"Subject: large\r\n\r\n" + (b"y" * 78 + b"\r\n") * 8000


def check_of(path: Path) -> BodyCheck:
    data = path.read_bytes()
    return BodyCheck(len(data), hashlib.sha256(data).hexdigest())


def change_one_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(b"Z" if old != b"Z" else b"W")


async def test_a_new_record_carries_the_size_and_checksum_of_its_body(tmp_path: Path) -> None:
    (mid,) = await prefill(tmp_path / "spool", [spooled("127.0.0.1:25")])
    record = json.loads((tmp_path / "spool" / "active" / mid).read_bytes())
    body = (tmp_path / "spool" / "data" / mid).read_bytes()
    assert record["size"] == len(body)
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("damage", ["truncated", "changed", "longer"])
async def test_a_small_body_is_checked_when_opened(tmp_path: Path, damage: str) -> None:
    msg, body = message_to(tmp_path, ["127.0.0.1:25"])
    check = check_of(body.path)
    if damage == "truncated":
        os.truncate(body.path, 50)
    elif damage == "changed":
        change_one_byte(body.path, 30)
    else:
        with body.path.open("ab") as f:
            f.write(b"more\r\n")
    handle = BodyHandle(body.path, check=check)
    with pytest.raises(BodyDamagedError, match="damaged body"):
        async with handle.open():
            pass
    with pytest.raises(BodyDamagedError):
        await handle.read()
    assert msg.id in str(body.path)


async def test_a_large_body_changed_while_it_is_sent_ends_before_the_final_dot(
    tmp_path: Path, smtp_server: SmtpTestServer
) -> None:
    """The body passes the check before MAIL; the hop is held at DATA while
    a byte in the middle changes; the stream's own check stops the
    transaction before the final dot: the hop has nothing."""
    msg, body = message_to(tmp_path, [smtp_server.hop], content=LARGE)
    assert body.path.stat().st_size > 256 * 1024  # streamed in chunks, not read whole
    handle = BodyHandle(body.path, check=check_of(body.path))
    gate = asyncio.Event()
    smtp_server.behaviour.data = Reply(gate=gate)
    relay = SmtpRelay(route())

    async def damage_then_release() -> None:
        await wait_until(lambda: smtp_server.count("DATA") == 1, "the relay to send DATA")
        await anyio.to_thread.run_sync(change_one_byte, body.path, 400_000)
        gate.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(damage_then_release)
            with pytest.raises(BodyDamagedError, match="SHA-256"):
                await relay.relay(msg, handle, [ALICE])
    await wait_until(lambda: smtp_server.connections_closed == 1, "the relay to hang up")
    assert smtp_server.messages == []  # no partial message accepted
    await relay.close_and_flush()


async def test_a_large_body_damaged_at_rest_is_refused_before_mail(
    tmp_path: Path, smtp_server: SmtpTestServer
) -> None:
    msg, body = message_to(tmp_path, [smtp_server.hop], content=LARGE)
    check = check_of(body.path)
    change_one_byte(body.path, 300_000)
    relay = SmtpRelay(route())
    with pytest.raises(BodyDamagedError):
        await relay.relay(msg, BodyHandle(body.path, check=check), [ALICE])
    assert smtp_server.count("MAIL") == 0
    await relay.close_and_flush()


async def test_a_truncated_body_is_quarantined_never_delivered(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    """The issue's case: ``truncate -s 50 data/ID`` with the daemon stopped."""
    config = write_config(tmp_path, next_hops=[smtp_server.hop])
    spool_dir = tmp_path / "spool"
    damaged, good = await prefill(spool_dir, [spooled(smtp_server.hop) for _ in range(2)])
    os.truncate(spool_dir / "data" / damaged, 50)

    found = cli("--spool-dir", str(spool_dir), "check")
    assert found.code == 1
    assert f"damaged_body: {damaged}: damaged body" in found.out
    assert good not in found.out

    await start_daemon(config)
    await wait_until(lambda: records_in(spool_dir, "quarantine") == {damaged}, "quarantine")
    await wait_until(lambda: smtp_server.transactions == 1, "the good one to be delivered")
    assert [m.rcpt_tos for m in smtp_server.messages] == [("rcpt@example.com",)]
    shown = json.loads(cli("--config", str(config), "show", damaged).out)
    assert shown["status"] == "quarantined"
    assert "50 bytes where" in shown["quarantine_reason"]
    history = cli("--config", str(config), "history", "--format", "json")
    assert damaged not in history.out  # never said delivered


async def test_check_quick_compares_sizes_only(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    changed, truncated = await prefill(spool_dir, [spooled("127.0.0.1:25") for _ in range(2)])
    change_one_byte(spool_dir / "data" / changed, 10)
    os.truncate(spool_dir / "data" / truncated, 20)
    full = cli("--spool-dir", str(spool_dir), "check")
    quick = cli("--spool-dir", str(spool_dir), "check", "--quick")
    assert f"damaged_body: {changed}:" in full.out
    assert f"damaged_body: {truncated}:" in full.out
    assert f"damaged_body: {changed}:" not in quick.out
    assert f"damaged_body: {truncated}:" in quick.out
    assert (full.code, quick.code) == (1, 1)
