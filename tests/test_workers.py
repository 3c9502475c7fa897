"""An ingest worker never outlives its daemon: killed without a chance to
stop its workers (SIGKILL), the daemon's lifeline pipe closes and every
worker stops by itself, freeing the shared SMTP port."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from pathlib import Path

import pytest

from spoold.daemon.worker import GC_YOUNG_THRESHOLD, tune_gc
from tests.daemon_helpers import DaemonFactory, write_config
from tests.support import WAIT_TIMEOUT, wait_until
from tests.test_ingest import free_port


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not reaped yet: its parent is gone and init reaps it soon)
    # has stopped all the same.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("uvloop", ["0", "1"], ids=["asyncio", "uvloop"])
async def test_workers_stop_when_the_daemon_is_killed(
    tmp_path: Path, start_daemon: DaemonFactory, uvloop: str
) -> None:
    port = free_port()
    config = write_config(tmp_path, next_hops=["127.0.0.1:9"])
    with config.open("a") as f:
        f.write(f'\n[smtp]\nlisten = ["127.0.0.1:{port}"]\nworkers = 2\n')
    daemon = await start_daemon(config, env={"SPOOLD_UVLOOP": uvloop})
    started = [line for line in daemon.log_lines() if line.get("event") == "ingest worker started"]
    pids = [int(line["pid"]) for line in started]
    assert len(pids) == 2 and all(alive(p) for p in pids)

    daemon.send_signal(signal.SIGKILL)
    assert await daemon.wait_exit() == -signal.SIGKILL
    await wait_until(
        lambda: not any(alive(p) for p in pids), "the workers to stop", timeout=WAIT_TIMEOUT
    )
    assert "the daemon is gone; ingest worker stopping" in daemon.log_text()


async def test_workers_run_the_daemons_own_code_whatever_directory_it_starts_in(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """Started from a directory that holds a package named ``spoold`` (a
    checkout of another version; one planted in a directory others may
    write, such as /tmp), the daemon's workers still run the daemon's own
    copy: the planted one never runs, and the workers serve."""
    planted = tmp_path / "start-here"
    ran = tmp_path / "planted-code-ran"
    for module in ("__init__.py", "daemon/__init__.py", "daemon/worker.py"):
        path = planted / "spoold" / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"open({str(ran)!r}, 'a').write({module!r} + '\\n')\n")
    port = free_port()
    config = write_config(tmp_path, next_hops=["127.0.0.1:9"])
    with config.open("a") as f:
        f.write(f'\n[smtp]\nlisten = ["127.0.0.1:{port}"]\nworkers = 2\n')
    daemon = await start_daemon(config, cwd=planted)
    started = [line for line in daemon.log_lines() if line.get("event") == "ingest worker started"]
    assert len(started) == 2
    assert not ran.exists(), ran.read_text()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await asyncio.wait_for(reader.readline(), WAIT_TIMEOUT)).startswith(b"220 ")
    finally:
        writer.close()
        await writer.wait_closed()


def test_a_worker_collects_young_garbage_less_often() -> None:
    """The worker's youngest generation is collected after 10,000 net new
    objects (a message makes a few hundred); the older ones as by default."""
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        assert GC_YOUNG_THRESHOLD == 10_000
    finally:
        gc.set_threshold(*before)
