"""The daemon on either event loop: uvloop when installed (the ``fast``
extra), asyncio's own otherwise (``SPOOLD_UVLOOP=0`` forces it). A message
goes in over SMTP, through an ingest worker, and out to a next hop."""

from __future__ import annotations

import importlib.util
import smtplib
import time
from pathlib import Path

import anyio
import pytest

from tests.daemon_helpers import DaemonFactory, write_config
from tests.smtp_server import SmtpTestServer
from tests.test_ingest import free_port

LOOPS = [
    pytest.param("0", "asyncio", id="asyncio"),
    pytest.param(
        "1",
        "uvloop",
        id="uvloop",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None,
            reason="uvloop not installed: pip install 'spoold[fast]'",
        ),
    ),
]


@pytest.mark.parametrize(("setting", "loop"), LOOPS)
async def test_smtp_in_relay_out_on_each_event_loop(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    smtp_server: SmtpTestServer,
    setting: str,
    loop: str,
) -> None:
    port = free_port()
    config = write_config(tmp_path, next_hops=[smtp_server.hop])
    with config.open("a") as f:
        f.write(f'\n[smtp]\nlisten = ["127.0.0.1:{port}"]\nworkers = 1\n')
    daemon = await start_daemon(config, env={"SPOOLD_UVLOOP": setting})

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@example.org", ["b@example.com"], b"Subject: loop\r\n\r\nhi\r\n")

    await anyio.to_thread.run_sync(send)
    deadline = time.monotonic() + 15
    while smtp_server.transactions < 1:
        assert time.monotonic() < deadline, daemon.log_text()
        await anyio.sleep(0.05)
    assert smtp_server.messages[0].rcpt_tos == ("b@example.com",)
    lines = daemon.log_lines()
    assert {line["event_loop"] for line in lines if "event_loop" in line} == {loop}
