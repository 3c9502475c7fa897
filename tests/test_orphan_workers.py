"""A daemon that dies without stopping its SMTP ingest workers (SIGKILL,
the OOM killer, a crash outside systemd's control group) must not leave
them behind: an orphan worker keeps the listening sockets, so the next
daemon on the same config cannot start ("Address already in use"), and
it keeps answering 250 for a spool no daemon owns."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from tests.daemon_helpers import DaemonFactory, write_config
from tests.support import free_port, wait_until


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.xfail(
    strict=True,
    reason="ingest workers do not notice that the daemon died (no parent-death "
    "signal or pipe): they outlive a SIGKILLed daemon and keep its SMTP port",
)
async def test_ingest_workers_end_when_the_daemon_is_killed(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    port = free_port()
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    with config.open("a") as f:
        f.write(f'\n[smtp]\nlisten = ["127.0.0.1:{port}"]\nworkers = 1\n')
    daemon = await start_daemon(config)
    started = await daemon.wait_log(lambda line: line.get("event") == "ingest worker started")
    worker = int(started["pid"])
    assert _alive(worker)
    try:
        daemon.send_signal(signal.SIGKILL)
        await daemon.wait_exit()
        await wait_until(
            lambda: not _alive(worker),
            f"ingest worker {worker} to end after its daemon was killed",
            timeout=10,
            interval=0.1,
        )
        # The next daemon on the same config takes the port again.
        await start_daemon(config)
    finally:
        if _alive(worker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGTERM)
            await wait_until(lambda: not _alive(worker), "the orphan worker to stop", interval=0.1)
