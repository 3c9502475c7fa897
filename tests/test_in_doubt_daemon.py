"""A real crash: the daemon is killed (SIGKILL) while a message is being
sent. The next daemon, with ``after_crash = "freeze"``, holds the message in
doubt, and every form of ``spoold status`` says so."""

from __future__ import annotations

import json
from pathlib import Path

from tests.daemon_helpers import DaemonFactory, cli, prefill, spooled, write_config
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
