"""One file or directory the daemon may not read never stops it.

The daemon runs as root without the capabilities that override file
permissions (``setpriv`` drops ``dac_override`` and ``dac_read_search``),
so a record with mode 000 or a queue directory with mode 000 is to it what
they are to a daemon running as its own user. Each test starts it on such
a spool and checks that it gets ready, serves the rest (delivers the other
messages, takes new mail) and reports what it skipped: the start-up log,
``spoold check`` and the record's reason in quarantine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.daemon_helpers import DaemonFactory, cli, prefill, sendmail, spooled, write_config
from tests.smtp_server import SmtpTestServer
from tests.support import records_in, wait_until

NO_DAC = [
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
]

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0, reason="drops root's file-permission override: run as root"
    ),
    pytest.mark.skipif(
        shutil.which("setpriv") is None,
        reason="needs setpriv (Debian package util-linux: apt-get install util-linux)",
    ),
]


async def submit_one(config: Path) -> int:
    done = await sendmail(
        config, "-f", "app@example.org", "ops@example.com", stdin=b"Subject: new\n\nnew mail\n"
    )
    return done.code


async def test_an_unreadable_record_is_set_aside_and_the_rest_served(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    config = write_config(tmp_path, next_hops=[smtp_server.hop])
    spool_dir = tmp_path / "spool"
    locked, *_ = await prefill(spool_dir, [spooled(smtp_server.hop) for _ in range(3)])
    (spool_dir / "active" / locked).chmod(0)

    daemon = await start_daemon(config, prefix=NO_DAC)
    await wait_until(lambda: smtp_server.transactions == 2, "the two others to be delivered")
    assert records_in(spool_dir, "quarantine") == {locked}
    reason = (spool_dir / "quarantine" / ".reasons" / locked).read_text()
    assert "Permission denied" in reason
    assert any(
        line.get("event") == "record set aside" and line.get("id") == locked
        for line in daemon.log_lines()
    )
    assert await submit_one(config) == 0  # intake works
    await wait_until(lambda: smtp_server.transactions == 3, "the new message to be delivered")

    shown = cli("--config", str(config), "status", "--quarantined", "--format", "json")
    assert shown.code == 0, shown.err
    assert locked in shown.out


async def test_unusable_directories_are_reported_and_the_rest_served(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    """``quarantine/``, ``removed/`` and ``frozen/.checkout`` with mode 000;
    and a record that cannot be read nor, with quarantine unusable, set
    aside: it is skipped where it is and reported."""
    config = write_config(tmp_path, next_hops=[smtp_server.hop])
    spool_dir = tmp_path / "spool"
    locked, other = await prefill(spool_dir, [spooled(smtp_server.hop) for _ in range(2)])
    (spool_dir / "active" / locked).chmod(0)
    for sub in ("quarantine", "removed", "frozen/.checkout"):
        (spool_dir / sub).chmod(0)
    try:
        daemon = await start_daemon(config, prefix=NO_DAC)
        await wait_until(lambda: smtp_server.transactions == 1, "the other to be delivered")
        assert await submit_one(config) == 0
        await wait_until(lambda: smtp_server.transactions == 2, "the new one to be delivered")
        assert records_in(spool_dir, "active") == {locked}  # skipped where it is

        logged = daemon.log_lines()
        unusable = {
            line["path"]
            for line in logged
            if line.get("event") == "spool directory unusable; what it holds is skipped"
        }
        assert {str(spool_dir / d) for d in ("quarantine", "removed", "frozen/.checkout")} <= (
            unusable
        )
        assert any(
            line.get("event") == "record skipped" and line.get("id") == locked for line in logged
        )

        checked = cli("--config", str(config), "check")
        assert checked.code == 1
        assert f"unusable_dir: quarantine: cannot use directory {spool_dir}/quarantine" in (
            checked.out
        )
        assert f"chmod 0750 {spool_dir}/removed" in checked.out
        assert f"unreadable: {locked}:" in checked.out
        assert other not in checked.out
    finally:
        for sub in ("quarantine", "removed", "frozen/.checkout"):
            (spool_dir / sub).chmod(0o750)


async def test_a_spool_it_cannot_work_without_stops_the_start_with_what_to_run(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    config = write_config(tmp_path, next_hops=[smtp_server.hop])
    spool_dir = tmp_path / "spool"
    await prefill(spool_dir, [])
    (spool_dir / "data").chmod(0)
    try:
        daemon = await start_daemon(config, prefix=NO_DAC, wait_ready=False)
        assert await daemon.wait_exit() != 0
        (error,) = [line for line in daemon.log_lines() if line.get("event") == "cannot start"]
        assert f"cannot use directory {spool_dir}/data" in error["error"]
        assert f"chmod 0750 {spool_dir}/data" in error["error"]
    finally:
        (spool_dir / "data").chmod(0o750)
