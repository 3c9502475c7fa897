"""A real crash: the daemon is killed (SIGKILL) while a message is being
sent. The next daemon, with ``after_crash = "freeze"``, holds the message in
doubt, and every form of ``spoold status`` says so."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_helpers import (
    DaemonFactory,
    cli,
    prefill,
    sendmail,
    set_config_value,
    spooled,
    write_config,
)
from tests.smtp_server import HANG, SmtpTestServer
from tests.support import records_in, wait_until


async def test_a_message_cut_by_a_crash_is_frozen_in_doubt(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    smtp_server.behaviour.data_end = HANG  # the message is sent; the answer never comes
    config = write_config(tmp_path, next_hops=[smtp_server.hop])
    spool_dir = tmp_path / "spool"
    (mid,) = await prefill(spool_dir, [spooled(smtp_server.hop)])
    daemon = await start_daemon(config)
    await wait_until(
        lambda: smtp_server.count("DATA") == 1 and records_in(spool_dir, "active/.checkout"),
        "the message to be in the middle of its attempt",
    )
    await daemon.kill()  # SIGKILL: no flush, the record stays checked out
    assert records_in(spool_dir, "active/.checkout") == {mid}

    smtp_server.behaviour.data_end = None
    config.write_text(
        config.read_text().replace(
            'flush_timeout = "1s"\n', 'flush_timeout = "1s"\nafter_crash = "freeze"\n'
        )
    )
    await start_daemon(config)

    done = cli("--config", str(config), "status", "--format", "json")
    assert done.code == 0, done.err
    (view,) = [json.loads(line) for line in done.out.splitlines()]
    assert (view["id"], view["status"], view["in_doubt"]) == (mid, "frozen", True)

    table = cli("--config", str(config), "status")
    (row,) = [line for line in table.out.splitlines() if line.startswith(mid)]
    assert row.split()[1:4] == ["frozen", "(in", "doubt)"]

    exim = cli("--config", str(config), "status", "--format", "exim")
    assert f"{mid} <sender@example.org> *** frozen *** *** in doubt ***" in exim.out

    assert smtp_server.transactions == 0  # held: the operator decides
    assert records_in(spool_dir, "frozen") == {mid}

    # The operator sends it: delivered (the hop may now have it twice).
    assert cli("--config", str(config), "send", mid).code == 0
    await wait_until(lambda: smtp_server.transactions == 1, "the message to be delivered")
    await wait_until(lambda: not records_in(spool_dir, "frozen"), "its record to be gone")


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m") -> Iterator[None]:
    """A tmpfs of ``size`` mounted at ``path`` (root only), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs for a full disk: run as root")
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the disk under it has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)


async def test_a_crash_on_a_full_disk_keeps_the_in_doubt_mark(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    """Killed mid-send, restarted on a full disk: the daemon starts and
    serves, the messages stay in doubt (never sent again), and once the disk
    has room they are frozen in doubt, as ``after_crash = "freeze"`` says."""
    spool_dir = tmp_path / "spool"
    with small_disk(spool_dir):
        smtp_server.behaviour.data_end = HANG
        config = write_config(tmp_path, next_hops=[smtp_server.hop])
        set_config_value(
            config, "flush_timeout", '"1s"\nafter_crash = "freeze"\nmin_free_space = 0'
        )
        ids = set(await prefill(spool_dir, [spooled(smtp_server.hop) for _ in range(3)]))
        daemon = await start_daemon(config)
        await wait_until(
            lambda: smtp_server.count("DATA") == 3 and records_in(spool_dir, "active/.checkout"),
            "the messages to be in the middle of their attempts",
        )
        await wait_until(
            lambda: records_in(spool_dir, "active/.checkout") == ids, "all three checked out"
        )
        filler = spool_dir / "filler"
        fill(filler)
        await daemon.kill()

        smtp_server.behaviour.data_end = None
        daemon = await start_daemon(config)  # ready on a disk with no room
        assert records_in(spool_dir, "active/.checkout") == ids  # still in doubt
        refused = await sendmail(
            config, "-f", "a@example.org", "b@example.com", stdin=b"Subject: x\n\nnew mail\n"
        )
        assert refused.code == 75, refused.err  # temporary: try again later
        assert cli("--config", str(config), "count").code == 0  # operators are served
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
        assert records_in(spool_dir, "active/.checkout") == ids

        filler.unlink()
        await start_daemon(config)
        done = cli("--config", str(config), "status", "--format", "json")
        views = [json.loads(line) for line in done.out.splitlines()]
        assert {(v["id"], v["status"], v["in_doubt"]) for v in views} == {
            (mid, "frozen", True) for mid in ids
        }
        assert smtp_server.transactions == 0  # one copy each at the hop, none again
        assert smtp_server.count("DATA") == 3


async def test_a_hop_that_never_answers_the_final_dot_gets_one_copy_in_doubt(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    """The hop reads the whole message and never replies: after
    ``final_reply_timeout`` the message is in doubt, and with ``after_crash
    = "freeze"`` frozen for an operator: one copy at the hop, not one per
    retry. ``status``, ``show``, ``events`` and ``history`` say so."""
    smtp_server.behaviour.data_end = HANG
    config = write_config(tmp_path, next_hops=[smtp_server.hop])
    set_config_value(config, "flush_timeout", '"1s"\nafter_crash = "freeze"')
    set_config_value(config, "command_timeout", '"30s"\nfinal_reply_timeout = "1s"')
    spool_dir = tmp_path / "spool"
    (mid,) = await prefill(spool_dir, [spooled(smtp_server.hop)])
    await start_daemon(config)
    await wait_until(lambda: records_in(spool_dir, "frozen") == {mid}, "the message to freeze")

    done = cli("--config", str(config), "status", "--format", "json")
    (view,) = [json.loads(line) for line in done.out.splitlines()]
    assert (view["id"], view["status"], view["in_doubt"]) == (mid, "frozen", True)
    assert "no reply to the end of the message" in view["relay_attempts"][0]["error"]
    shown = json.loads(cli("--config", str(config), "show", mid).out)
    assert shown["in_doubt"] is True
    assert smtp_server.count("DATA") == 1  # one copy: the hop may have it
    assert smtp_server.transactions == 0

    # The operator, having checked, sends it: the journal keeps the doubt.
    smtp_server.behaviour.data_end = None
    assert cli("--config", str(config), "send", mid).code == 0
    await wait_until(lambda: smtp_server.transactions == 1, "the message to be delivered")
    history = cli("--config", str(config), "history", "--format", "json")
    (line,) = [json.loads(x) for x in history.out.splitlines() if mid in x]
    assert (line["outcome"], line["in_doubt"]) == ("delivered", True)
    text = cli("--config", str(config), "history")
    assert f"{mid} delivered (in doubt)" in text.out
