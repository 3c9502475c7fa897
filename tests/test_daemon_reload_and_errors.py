"""The daemon end to end (``spoold run`` as a subprocess): reloads that must
change all or nothing, reloads with the SMTP listener and the metrics
endpoint on, and the control socket's error replies, each kind reached by
a real request.

* A reload whose file is valid TOML and valid config but cannot be built
  (a route whose ``auth_file`` is missing) changes nothing: not
  ``max_concurrent_send_jobs`` (read back from the spool itself), not the
  routes (a queued message still goes to the old next hop: the spool
  asks the router before each attempt), not the log level (info lines
  still appear). A daemon that applied one setting before building the
  rest fails here.
* With ``[smtp]`` and ``[metrics]`` on, a reload that changes limits
  applies them to new SMTP sessions while both keep listening on the
  addresses they had (new addresses are named as needing a restart, and
  nothing listens there); the metrics scraped after the reload continue
  the counts from before it (same registry, same server).
* Control errors: ``invalid``, ``not_found``, ``refused``, ``temporary``
  and ``busy`` each come back from the running daemon with their kind,
  and the CLI turns them into its exit codes; ``unavailable`` once it is
  gone. (``closed`` and ``internal`` cannot be reached by a request to a
  healthy daemon: the control server stops before the spool closes, and
  ``internal`` is a bug's answer.)
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.control import MAX_CLIENTS, ControlClient
from spoold.errors import ControlError
from spoold.message import Frozen, Message, SendAt
from spoold.ondisk import NewMessage
from spoold.times import utcnow
from tests.daemon_helpers import (
    DaemonFactory,
    DaemonProcess,
    cli,
    far_future,
    prefill,
    set_config_value,
    spooled,
    write_config,
)
from tests.smtp_server import StartServer
from tests.support import free_port

TIMEOUT = 15.0


async def info(daemon: DaemonProcess) -> dict[str, Any]:
    result: dict[str, Any] = await ControlClient(daemon.socket, timeout=10).request("info")
    return result


async def poll(condition: Any, what: str, timeout: float = TIMEOUT) -> None:
    """Check ``condition()`` every 20 ms until it holds (for what another
    process does, which sends no event this test can wait on)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def routed(message: NewMessage, route: str) -> NewMessage:
    """``message`` as if the route ``route`` had chosen its next hops."""

    def build(mid: str, related: list[str]) -> Message:
        msg = message.build(mid, related)
        msg.route = route
        return msg

    return NewMessage(message.body, message.status, build)


# ------------------------------------------------------- all or nothing


BROKEN_ROUTE = """
[routes.partners]
domains = ["partner.example"]
next_hops = ["127.0.0.1:1"]
tls = "opportunistic"
auth_file = "no-such-auth-file"
"""


@pytest.mark.parametrize("trigger", ["sighup", "control"])
async def test_a_reload_with_one_unbuildable_setting_changes_nothing(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer, trigger: str
) -> None:
    old_hop, new_hop = await start_smtp_server(), await start_smtp_server()
    config = write_config(tmp_path, next_hops=[old_hop.hop])
    (mid,) = await prefill(
        tmp_path / "spool", [routed(spooled(old_hop.hop, status=Frozen()), "smarthost")]
    )
    daemon = await start_daemon(config)
    before = await info(daemon)
    assert before["max_concurrent_send_jobs"] == 4
    assert before["log_level"] == "info"

    # Valid settings, and one route that cannot be built.
    set_config_value(config, "max_concurrent_send_jobs", "9")
    set_config_value(config, "level", '"warning"')
    set_config_value(config, "next_hops", f'["{new_hop.hop}"]')
    config.write_text(config.read_text() + BROKEN_ROUTE)
    if trigger == "sighup":
        daemon.send_signal(signal.SIGHUP)
        await daemon.notify.wait_for("RELOADING")
        await daemon.notify.wait_for("READY")
    else:
        done = cli("--socket", str(daemon.socket), "reload")
        assert done.code == 1, done
        assert "no-such-auth-file" in done.err
    refusal = await daemon.wait_log(lambda line: "reload refused" in line["event"])
    assert any("no-such-auth-file" in p for p in refusal["problems"]), refusal

    assert await info(daemon) == before  # jobs (from the spool), routes, log level

    # The routes in use are the old ones, and info lines are still logged.
    done = cli("--socket", str(daemon.socket), "send", mid)
    assert done.code == 0, done.err
    await poll(lambda: old_hop.transactions == 1, "the message at the old next hop")
    await daemon.wait_log(lambda line: line["event"] == "attempt done" and line["id"] == mid)
    assert new_hop.connections_opened == 0
    assert not [line for line in daemon.log_lines() if line["event"].startswith("route changed")]
    assert daemon.running


# ------------------------------------------------- smtp and metrics


async def scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    return await asyncio.to_thread(get)


def spooled_count(metrics: str) -> float:
    m = re.search(r'^spoold_events_total\{event="spooled"\} (\S+)$', metrics, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


class Smtp:
    """A blocking SMTP client for a worker thread, every read bounded."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith("220 ")
        assert self.command("EHLO client.example").startswith("250")

    def reply(self) -> str:
        while True:
            line = self.file.readline(4096).decode()
            assert line.endswith("\r\n"), line
            if line[3:4] != "-":
                return line

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def send(self, recipients: list[str]) -> tuple[list[str], str]:
        """One message; the RCPT replies and the final reply."""
        assert self.command("MAIL FROM:<sender@example.org>").startswith("250")
        rcpt_replies = [self.command(f"RCPT TO:<{r}>") for r in recipients]
        assert self.command("DATA").startswith("354")
        self.sock.sendall(b"Subject: reload\r\n\r\nhello\r\n.\r\n")
        return rcpt_replies, self.reply()

    def close(self) -> None:
        self.command("QUIT")
        self.file.close()
        self.sock.close()


def smtp_send(port: int, recipients: list[str]) -> tuple[list[str], str]:
    client = Smtp(port)
    try:
        return client.send(recipients)
    finally:
        client.close()


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_a_reload_keeps_smtp_and_metrics_listening_where_they_were(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    smtp_port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    config.write_text(
        config.read_text()
        + f'\n[smtp]\nlisten = ["127.0.0.1:{smtp_port}"]\nmax_recipients = 3\n'
        + f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    )
    daemon = await start_daemon(config)
    assert "spoold_messages" in await scrape(metrics_port)

    rcpts = ["a@example.com", "b@example.com", "c@example.com"]
    replies, final = await asyncio.to_thread(smtp_send, smtp_port, rcpts)
    assert [r[:3] for r in replies] == ["250"] * 3
    assert final.startswith("250 ")
    await poll_metrics(metrics_port, 1.0)

    # New limits, and new addresses that need a restart.
    new_smtp, new_metrics = free_port(), free_port()
    set_config_value(config, "max_recipients", "2")
    set_config_value(config, "max_concurrent_send_jobs", "6")
    text = config.read_text()
    text = text.replace(f"127.0.0.1:{smtp_port}", f"127.0.0.1:{new_smtp}")
    text = text.replace(f"127.0.0.1:{metrics_port}", f"127.0.0.1:{new_metrics}")
    config.write_text(text)
    done = cli("--socket", str(daemon.socket), "reload")
    assert done.code == 0, done.err
    assert "needs a restart to change: smtp.listen" in done.out
    assert "needs a restart to change: metrics.listen" in done.out
    assert (await info(daemon))["max_concurrent_send_jobs"] == 6

    # The same addresses serve, with the new limit; the new ones are not bound.
    replies, final = await asyncio.to_thread(smtp_send, smtp_port, rcpts)
    assert [r[:3] for r in replies] == ["250", "250", "452"], replies
    assert final.startswith("250 ")
    await poll_metrics(metrics_port, 2.0)  # counted on from before the reload
    assert await asyncio.to_thread(refuses_connections, new_smtp)
    assert await asyncio.to_thread(refuses_connections, new_metrics)
    assert daemon.running


async def poll_metrics(port: int, spooled: float) -> None:
    deadline = time.monotonic() + TIMEOUT
    while (count := spooled_count(await scrape(port))) != spooled:
        if time.monotonic() > deadline:
            pytest.fail(f"spooled events: {count}, expected {spooled}")
        await asyncio.sleep(0.05)


# ------------------------------------------------------- control errors


async def control_error(daemon: DaemonProcess, op: str, **params: Any) -> ControlError:
    with pytest.raises(ControlError) as raised:
        await ControlClient(daemon.socket, timeout=10).request(op, **params)
    return raised.value


async def test_each_control_error_kind_from_a_running_daemon(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    hop = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, next_hops=[hop])
    config.write_text(
        config.read_text().replace("[control]", 'min_free_space = "1000000GiB"\n\n[control]')
    )
    frozen_id, active_id = await prefill(
        tmp_path / "spool",
        [spooled(hop, status=Frozen()), spooled(hop, status=SendAt(at=utcnow() + far_future()))],
    )
    daemon = await start_daemon(config)
    sock = str(daemon.socket)
    unknown = "8Dzzzzzzzzzzzzzzz"  # a well-formed id of no message

    error = await control_error(daemon, "freeze", ids=["../etc/passwd"])
    assert (error.kind, "not a message id" in str(error)) == ("invalid", True)
    assert cli("--socket", sock, "freeze", "--", "not/an/id").code == 2

    error = await control_error(daemon, "freeze", ids=[unknown])
    assert error.kind == "not_found" and unknown in str(error)
    assert cli("--socket", sock, "freeze", unknown).code == 1

    error = await control_error(daemon, "remove", ids=[active_id])
    assert error.kind == "refused" and active_id in str(error)
    assert cli("--socket", sock, "remove", active_id).code == 1

    # Free space under spool.min_free_space: a submission is refused for now.
    with pytest.raises(ControlError) as raised:
        await ControlClient(daemon.socket, timeout=10).submit(
            "sender@example.org", ["rcpt@example.com"], b"Subject: x\r\n\r\nhi\r\n"
        )
    assert raised.value.kind == "temporary"
    assert "min_free_space" in str(raised.value)
    command = ["--socket", sock, "sendmail", "-f", "sender@example.org", "rcpt@example.com"]
    sendmail = subprocess.run(
        [sys.executable, "-m", "spoold.daemon.cli", *command],
        input=b"Subject: x\n\nhi\n",
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert sendmail.returncode == 75, sendmail.stderr  # EX_TEMPFAIL: try again later

    # Every place taken by a silent client: one more is told busy.
    silent = []
    try:
        for _ in range(MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            silent.append(s)
            s.connect(sock)
        error = await control_error(daemon, "ping")
        assert error.kind == "busy"
    finally:
        for s in silent:
            s.close()
    await poll_ping(daemon)  # the places come back

    # Nothing changed on disk; then the daemon is gone: unavailable.
    assert (tmp_path / "spool" / "frozen" / frozen_id).exists()
    assert (tmp_path / "spool" / "active" / active_id).exists()
    daemon.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    error = await control_error(daemon, "ping")
    assert error.kind == "unavailable"


async def poll_ping(daemon: DaemonProcess) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            assert await ControlClient(daemon.socket, timeout=10).request("ping") == "pong"
            return
        except ControlError as exc:
            if exc.kind != "busy" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.02)
