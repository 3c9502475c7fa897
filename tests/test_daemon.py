"""The daemon end to end: ``spoold run`` as a subprocess, as systemd runs it.

Each test writes a config in its temp dir, binds the ``$NOTIFY_SOCKET``
datagram socket, starts the daemon and asserts what an operator or systemd
can observe: the notify datagrams (READY, STATUS, WATCHDOG, RELOADING with
MONOTONIC_USEC, STOPPING), the JSON log lines, the control socket, the exit
code, and the spool directory after the process is gone. Sends in flight are
held by an aiosmtpd server in the test's loop that delays its DATA reply.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.control import MAX_CLIENTS, ControlClient
from spoold.daemon.main import EXIT_CONFIG_ERROR
from spoold.errors import ControlError
from spoold.message import Frozen, Message, SendAt
from spoold.ondisk import NewMessage
from spoold.spool import Spool
from spoold.times import utcnow
from tests.daemon_helpers import (
    BODY,
    DaemonFactory,
    DaemonProcess,
    cli,
    far_future,
    prefill,
    set_config_value,
    spooled,
    write_config,
)
from tests.smtp_server import HANG, SmtpTestServer, StartServer
from tests.support import (
    ARABIC_TEN,
    SUPERSCRIPT_TWO,
    free_port,
    records_in,
    spool_files,
    wait_until,
)


async def info(daemon: DaemonProcess) -> dict[str, Any]:
    result: dict[str, Any] = await ControlClient(daemon.socket, timeout=10).request("info")
    return result


async def ping(daemon: DaemonProcess) -> str:
    result: str = await ControlClient(daemon.socket, timeout=10).request("ping")
    return result


def raw_request(path: Path, data: bytes) -> dict[str, Any]:
    """Send ``data`` on a fresh control connection; the one-line reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.count(b"\n") == 1, reply
    decoded: dict[str, Any] = json.loads(reply)
    return decoded


async def wait_until_data(server: SmtpTestServer, count: int) -> None:
    """Wait until the server has seen ``count`` DATA commands."""
    await wait_until(
        lambda: server.count("DATA") >= count, lambda: f"{count} DATA; saw {server.verbs()}"
    )


# ------------------------------------------------------------- systemd


async def test_ready_comes_after_the_control_socket_with_status(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    hop = f"127.0.0.1:{free_port()}"
    later = SendAt(at=utcnow() + far_future())
    await prefill(tmp_path / "spool", [spooled(hop, status=later), spooled(hop, status=Frozen())])
    # systemd asked another process for watchdog pings: this one sends none.
    daemon = await start_daemon(
        config, env={"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}, wait_ready=False
    )
    ready, before = await daemon.notify.wait_for("READY")

    # The socket is there (and answers) the moment systemd hears READY=1.
    assert stat.S_ISSOCK(daemon.socket.stat().st_mode)
    assert await ping(daemon) == "pong"
    assert ready["STATUS"] == "1 active, 1 frozen, 0 sending"
    assert all("READY" not in d and "STOPPING" not in d for d in before[:-1])
    assert any(line["event"] == "spoold ready" for line in daemon.log_lines())

    # The loop that would ping runs at once after READY=1 (its first round
    # says STATUS=), so a ping sent by mistake would come before the
    # RELOADING=1 of a reload asked for after READY=1: no time window.
    assert cli("--config", str(config), "reload").code == 0
    _, during = await daemon.notify.wait_for("READY")
    assert during[0] == {"STATUS": "1 active, 1 frozen, 0 sending"}
    assert [d.get("RELOADING") for d in during] == [None, "1", None]
    assert all("WATCHDOG" not in d for d in [*before, *during])


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": SUPERSCRIPT_TWO},  # int() raised in the watchdog loop
        {"WATCHDOG_USEC": ARABIC_TEN},  # int() read 10: a ping every 5 us
        {"WATCHDOG_USEC": "400000", "WATCHDOG_PID": SUPERSCRIPT_TWO},
    ],
)
async def test_a_watchdog_variable_not_in_ascii_digits_asks_for_no_pings(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    env: dict[str, str],
) -> None:
    """systemd writes these in ASCII digits; anything else (``str.isdigit``
    takes superscript and Arabic-Indic digits) is not a watchdog asked of
    this process, as for sd_watchdog_enabled(3): the daemon runs, reloads
    and pings nobody (the reload's READY=1 comes after the loop that would
    ping has run, as in the test above)."""
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    daemon = await start_daemon(config, env=env, wait_ready=False)
    _, before = await daemon.notify.wait_for("READY")
    assert cli("--config", str(config), "reload").code == 0
    _, during = await daemon.notify.wait_for("READY")
    assert all("WATCHDOG" not in d for d in [*before, *during])
    assert not [line for line in daemon.log_lines() if line.get("level") == "error"]


async def test_watchdog_pings_repeat_when_watchdog_usec_is_set(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    hop = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, next_hops=[hop])
    later = SendAt(at=utcnow() + far_future())
    (mid,) = await prefill(tmp_path / "spool", [spooled(hop, status=later)])
    started = time.monotonic()
    daemon = await start_daemon(config, env={"WATCHDOG_USEC": "400000"})
    for _ in range(4):
        await daemon.notify.wait_for("WATCHDOG")
    # Every 0.2 s (half of WatchdogSec), the first after the daemon started:
    # the fourth comes 0.6 s after the first at the earliest (a lower bound:
    # a busy machine only makes it later).
    assert time.monotonic() - started >= 0.6

    # The same loop tells systemd when the counts change.
    assert cli("--config", str(config), "freeze", mid).code == 0
    await daemon.notify.wait_for("STATUS", "0 active, 1 frozen, 0 sending")
    assert daemon.running


# -------------------------------------------------------------- reload


async def test_sighup_applies_max_concurrent_send_jobs(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    daemon = await start_daemon(config)
    assert (await info(daemon))["max_concurrent_send_jobs"] == 4

    set_config_value(config, "max_concurrent_send_jobs", "7")
    before = time.monotonic_ns() // 1000
    daemon.send_signal(signal.SIGHUP)
    reloading, _ = await daemon.notify.wait_for("RELOADING")
    # RELOADING=1 and MONOTONIC_USEC= in one datagram, on the clock systemd
    # reads (CLOCK_MONOTONIC, shared by every process): taken after the signal.
    assert before <= int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    ready, _ = await daemon.notify.wait_for("READY")
    assert "STATUS" in ready

    assert (await info(daemon))["max_concurrent_send_jobs"] == 7
    done = cli("--config", str(config), "info")
    assert done.code == 0, done.err
    assert json.loads(done.out)["max_concurrent_send_jobs"] == 7
    reloaded = [line for line in daemon.log_lines() if line["event"] == "reloaded"]
    assert [line["max_concurrent_send_jobs"] for line in reloaded] == [7]


async def test_reload_command_applies_and_names_what_needs_a_restart(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    daemon = await start_daemon(config)

    set_config_value(config, "max_concurrent_send_jobs", "9")
    set_config_value(config, "mode", '"0600"')  # the socket: only after a restart
    set_config_value(config, "dir", '"elsewhere"')  # the spool: only after a restart
    done = cli("--config", str(config), "reload")
    assert done.code == 0, done.err
    assert "needs a restart to change: spool.dir" in done.out
    assert "needs a restart to change: control" in done.out
    assert done.out.rstrip().endswith("reloaded")
    _, seen = await daemon.notify.wait_for("READY")
    assert next(d for d in seen if "RELOADING" in d or "READY" in d).get("RELOADING") == "1"
    assert "MONOTONIC_USEC" in next(d for d in seen if "RELOADING" in d)

    now = await info(daemon)
    assert now["max_concurrent_send_jobs"] == 9
    assert now["spool_dir"] == str(tmp_path / "spool")  # unchanged until a restart
    assert not (tmp_path / "elsewhere").exists()
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
    assert any(
        line["event"] == "these settings change only after a restart"
        and line["settings"] == ["spool.dir", "control"]
        for line in daemon.log_lines()
    )


@pytest.mark.parametrize(
    ("line", "broken", "problem"),
    [
        ("max_concurrent_send_jobs = 4", "max_concurrent_send_jobs = [4", "not valid TOML"),
        (
            "max_concurrent_send_jobs = 4",
            "max_concurrent_send_jobs = 0",
            "spool.max_concurrent_send_jobs: expected an integer >= 1, got 0",
        ),
        (
            "[log]",
            '[hooks]\npresend = "no_such_module_zz:hook"\n[log]',
            "cannot import no_such_module_zz",
        ),
    ],
    ids=["bad-toml", "bad-value", "bad-hook"],
)
async def test_sighup_with_a_broken_config_keeps_the_old_one(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    line: str,
    broken: str,
    problem: str,
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    daemon = await start_daemon(config)
    good = config.read_text()
    before = await info(daemon)

    assert line in good
    config.write_text(good.replace(line, broken))
    daemon.send_signal(signal.SIGHUP)
    await daemon.notify.wait_for("RELOADING")
    ready, _ = await daemon.notify.wait_for("READY")
    assert "STATUS" in ready

    assert await info(daemon) == before
    refused = [line for line in daemon.log_lines() if "reload refused" in line["event"]]
    assert len(refused) == 1, daemon.log_text()
    assert refused[0]["level"] == "error"
    assert any(problem in p for p in refused[0]["problems"]), refused[0]

    # The same through the socket: refused, exit 1, the problem on stderr.
    done = cli("--socket", str(daemon.socket), "reload")
    assert done.code == 1
    assert problem in done.err
    assert "reload refused" in done.err
    await daemon.notify.wait_for("READY")

    # Still serving, on the old config; a fixed file applies again.
    assert await info(daemon) == before
    config.write_text(good.replace("max_concurrent_send_jobs = 4", "max_concurrent_send_jobs = 5"))
    assert cli("--socket", str(daemon.socket), "reload").code == 0
    assert (await info(daemon))["max_concurrent_send_jobs"] == 5
    assert daemon.running


async def test_every_sighup_reloads_not_only_the_first(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    daemon = await start_daemon(config)
    for jobs in (5, 6, 7):
        set_config_value(config, "max_concurrent_send_jobs", str(jobs))
        daemon.send_signal(signal.SIGHUP)
        await daemon.notify.wait_for("RELOADING")
        await daemon.notify.wait_for("READY")
        assert (await info(daemon))["max_concurrent_send_jobs"] == jobs


# ------------------------------------------------------------- stopping


async def test_sigterm_with_sends_in_flight_exits_0_and_loses_nothing(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    smtp_server: SmtpTestServer,
) -> None:
    smtp_server.behaviour.data = HANG  # attempts that never end by themselves
    config = write_config(
        tmp_path, next_hops=[smtp_server.hop], max_concurrent_send_jobs=8, flush_timeout="1s"
    )
    spool_dir = tmp_path / "spool"
    ids = await prefill(spool_dir, [spooled(smtp_server.hop) for _ in range(5)])
    daemon = await start_daemon(config)
    await wait_until_data(smtp_server, 5)
    assert records_in(spool_dir, "active/.checkout") == set(ids)

    stopped_at = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0  # the server never answers: the flush timeout ended it
    assert time.monotonic() - stopped_at >= 1.0  # it gave the attempts their second
    stopping, _ = await daemon.notify.wait_for("STOPPING")
    assert stopping.get("STATUS") == "stopping"
    events = [line["event"] for line in daemon.log_lines()]
    assert "attempts still running after the flush timeout; they will be retried" in events
    assert events[-1] == "spoold stopped"

    # Nothing was delivered and nothing is lost: all five are in active
    # (checked out, returned by the next owner).
    assert smtp_server.transactions == 0
    assert records_in(spool_dir, "active") == set(ids)
    counts = await Spool.count_from_disk(spool_dir)
    # The cut attempts left their records checked out: they count as sending.
    assert counts == {"active": 5, "frozen": 0, "sending": 5, "removed": 0, "quarantine": 0}
    messages, unreadable = await Spool.status_from_disk(spool_dir)
    assert sorted(m.id for m in messages) == sorted(ids) and not unreadable
    assert {sorted(m.remaining_recipients)[0] for m in messages} == {"rcpt@example.com"}
    assert set(spool_files(spool_dir, "data")) == {f"data/{i}" for i in ids}
    done = cli("--spool-dir", str(spool_dir), "check")
    assert done.code == 0, done.out + done.err

    # The next daemon sends them all (at least once, never zero times).
    smtp_server.behaviour.data = None
    daemon = await start_daemon(config)
    await wait_until(
        lambda: smtp_server.transactions == 5 and not records_in(spool_dir, "active"),
        lambda: f"5 deliveries; {smtp_server.transactions} so far:\n{daemon.log_text()}",
    )
    assert smtp_server.transactions == 5
    assert all(m.content == BODY for m in smtp_server.messages)


async def test_a_second_sigterm_while_flushing_exits_at_once(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    smtp_server: SmtpTestServer,
) -> None:
    smtp_server.behaviour.data = HANG
    config = write_config(tmp_path, next_hops=[smtp_server.hop], flush_timeout="1h")
    spool_dir = tmp_path / "spool"
    ids = await prefill(spool_dir, [spooled(smtp_server.hop) for _ in range(2)])
    daemon = await start_daemon(config)
    await wait_until_data(smtp_server, 2)

    daemon.send_signal(signal.SIGTERM)
    await daemon.notify.wait_for("STOPPING")
    await daemon.wait_log(lambda line: line["event"] == "stopping: no new work taken")
    assert daemon.running  # flushing: it would wait an hour for the server
    daemon.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    events = [line["event"] for line in daemon.log_lines()]
    assert "second stop signal: exiting now; messages are safe on disk" in events
    assert smtp_server.transactions == 0
    assert records_in(spool_dir, "active") == set(ids)


async def test_sigint_stops_like_sigterm(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    daemon = await start_daemon(config)
    daemon.send_signal(signal.SIGINT)
    assert await daemon.wait_exit() == 0
    await daemon.notify.wait_for("STOPPING")
    assert not daemon.socket.exists()  # removed on the way out


# ------------------------------------------------------------ start-up


async def test_a_second_daemon_on_the_same_spool_fails_naming_the_pid(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    first = await start_daemon(config)
    second_config = tmp_path / "second.toml"
    second_config.write_text(config.read_text())
    second = await start_daemon(second_config, wait_ready=False)

    assert await second.wait_exit() == 1
    cannot = [line["error"] for line in second.log_lines() if line["event"] == "cannot start"]
    assert cannot == [f"spool {tmp_path / 'spool'} is already owned by pid {first.pid}"], (
        second.log_text()
    )
    assert not any("READY" in d for d in second.notify.drain())

    # The first one is untouched and still answers on its socket.
    assert await ping(first) == "pong"
    assert (await info(first))["pid"] == first.pid


async def test_an_invalid_config_exits_2_and_prints_every_problem(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    text = config.read_text()
    text = text.replace("max_concurrent_send_jobs = 4", "max_concurrent_send_jobs = 0\nbogus = 1")
    text = text.replace('default_route = "smarthost"', 'default_route = "nowhere"')
    config.write_text(text)

    daemon = await start_daemon(config, wait_ready=False)
    assert await daemon.wait_exit() == 2
    log = daemon.log_text()
    for problem in (
        "spool.max_concurrent_send_jobs: expected an integer >= 1, got 0",
        "spool.bogus: unknown key",
        "relay.default_route: no route named 'nowhere'",
    ):
        assert problem in log
    assert not daemon.socket.exists()
    assert not (tmp_path / "spool").exists()  # nothing was touched
    assert daemon.notify.drain() == []

    config.write_text("[spool\n")
    daemon = await start_daemon(config, wait_ready=False)
    assert await daemon.wait_exit() == 2
    assert "not valid TOML" in daemon.log_text()


async def test_a_hook_that_cannot_load_is_a_config_error_the_unit_does_not_restart_on(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    config.write_text(
        config.read_text().replace("[log]", '[hooks]\npresend = "no_such_module_zz:hook"\n[log]')
    )
    daemon = await start_daemon(config, wait_ready=False)
    assert await daemon.wait_exit() == EXIT_CONFIG_ERROR == 2
    (line,) = [x for x in daemon.log_lines() if x["event"] == "invalid configuration"]
    assert "cannot import no_such_module_zz" in line["problems"][0]
    # systemd restarts on failure, except on this status: a config error
    # does not restart every RestartSec for ever.
    unit = (Path(__file__).resolve().parent.parent / "systemd" / "spoold.service").read_text()
    assert re.search(r"^Restart=on-failure$", unit, re.M)
    (statuses,) = re.findall(r"^RestartPreventExitStatus=(.*)$", unit, re.M)
    assert str(EXIT_CONFIG_ERROR) in statuses.split()


async def test_the_control_socket_gets_the_configured_mode(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    daemon = await start_daemon(config)
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
    daemon.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0

    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"], socket_mode="0600")
    daemon = await start_daemon(config)
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600


async def test_a_world_writable_socket_directory_refuses_to_start(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)  # anyone may write, not sticky
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    daemon = await start_daemon(config, wait_ready=False)

    assert await daemon.wait_exit() != 0
    assert not daemon.socket.exists()
    assert not any("READY" in d for d in daemon.notify.drain())
    assert f"control socket directory {run_dir} is writable by anyone and not sticky" in (
        daemon.log_text()
    )
    # Said as a clear log line, like any other refusal to start, not a traceback.
    assert any(
        line["event"] == "cannot start" and "writable by anyone" in line["error"]
        for line in daemon.log_lines()
    ), daemon.log_text()
    assert "Traceback" not in daemon.log_text()

    # Sticky (like /tmp): allowed.
    run_dir.chmod(0o1777)
    daemon = await start_daemon(config)
    assert await ping(daemon) == "pong"


# ------------------------------------------------- signals while starting

# A hook module whose import says it has started, then waits (bounded) for
# the test to say go: start-up made slow and observable, without sleeping
# in the test. The daemon imports hooks while starting.
SLOW_HOOK_MODULE = """
import os, pathlib, time

_dir = pathlib.Path(os.environ["SPOOLD_TEST_HOOK_DIR"])
with (_dir / "started").open("a") as f:
    f.write("imported\\n")
_deadline = time.monotonic() + 60  # a safety net: the test says go long before
while not (_dir / "go").exists() and time.monotonic() < _deadline:
    time.sleep(0.01)


def presend(message):
    from spoold.message import SendNow

    return SendNow()
"""


async def start_slowly(tmp_path: Path, start_daemon: DaemonFactory) -> DaemonProcess:
    """A daemon held in start-up (importing its presend hook) until
    :func:`let_go`; returns once it is held there."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "tests_slow_hook.py").write_text(SLOW_HOOK_MODULE)
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    config.write_text(
        config.read_text().replace("[log]", '[hooks]\npresend = "tests_slow_hook:presend"\n\n[log]')
    )
    project = Path(__file__).resolve().parent.parent
    env = {
        "PYTHONPATH": os.pathsep.join([str(hooks), str(project)]),
        "SPOOLD_TEST_HOOK_DIR": str(tmp_path),
    }
    daemon = await start_daemon(config, env=env, wait_ready=False)

    def started() -> bool:
        assert daemon.running, daemon.log_text()
        return (tmp_path / "started").exists()

    await wait_until(started, lambda: f"the hook import:\n{daemon.log_text()}", interval=0.02)
    return daemon


def let_go(tmp_path: Path) -> None:
    (tmp_path / "go").touch()


async def test_a_sighup_while_starting_is_one_reload_once_ready(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """Seen: a SIGHUP before the handlers were installed killed the daemon."""
    (mid,) = await prefill(
        tmp_path / "spool",
        [spooled(f"127.0.0.1:{free_port()}", status=SendAt(at=utcnow() + far_future()))],
    )
    daemon = await start_slowly(tmp_path, start_daemon)
    daemon.send_signal(signal.SIGHUP)
    daemon.send_signal(signal.SIGHUP)  # two while starting: still one reload
    let_go(tmp_path)

    await daemon.wait_ready()
    await daemon.notify.wait_for("RELOADING")
    await daemon.notify.wait_for("READY")
    assert [line["event"] for line in daemon.log_lines()].count("reloaded") == 1
    assert await ping(daemon) == "pong"
    assert daemon.running
    assert (tmp_path / "started").read_text() == "imported\n"  # the reload did not re-import
    assert records_in(tmp_path / "spool", "active") == {mid}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_while_starting_exits_0_and_touches_nothing(
    tmp_path: Path, start_daemon: DaemonFactory, sig: signal.Signals
) -> None:
    """Seen: a SIGTERM before the handlers were installed killed the
    daemon by the signal. Now start-up ends at its next step, exit 0."""
    spool_dir = tmp_path / "spool"
    (mid,) = await prefill(spool_dir, [spooled(f"127.0.0.1:{free_port()}")])
    before = spool_files(spool_dir)
    daemon = await start_slowly(tmp_path, start_daemon)
    daemon.send_signal(sig)
    let_go(tmp_path)

    assert await daemon.wait_exit() == 0
    assert not any("READY" in d for d in daemon.notify.drain())
    assert any(
        line["event"] == "stop signal while starting: not starting" for line in daemon.log_lines()
    ), daemon.log_text()
    assert "Traceback" not in daemon.log_text()
    # Nothing lost, nothing touched: the spool was never opened.
    assert records_in(spool_dir, "active") == {mid}
    assert spool_files(spool_dir) == before
    assert not daemon.socket.exists()


# ------------------------------------------------------ control socket


async def test_bad_control_requests_get_error_replies_and_serving_goes_on(
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    hop = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, next_hops=[hop])
    (frozen_id,) = await prefill(tmp_path / "spool", [spooled(hop, status=Frozen())])
    daemon = await start_daemon(config)
    tree_before = spool_files(tmp_path / "spool")

    cases = {
        b"this is not json\n": "not a JSON request",
        b"[1, 2]\n": "a request is a JSON object",
        b'{"v": 2, "op": "ping"}\n': "unsupported protocol version 2",
        b'{"op": "ping"}\n': "unsupported protocol version None",
        b'{"v": 1, "op": "launch"}\n': "unknown operation 'launch'",
        b'{"v": 1}\n': "unknown operation None",
        b'{"v": 1, "op": "freeze", "ids": "' + frozen_id.encode() + b'"}\n': "at `$.ids`",
        b'{"v": 1, "op": "freeze", "ids": []}\n': "a non-empty list of message ids",
        b'{"v": 1, "op": "remove", "ids": [1, 2]}\n': "at `$.ids[0]`",
        b'{"v": 1, "op": "freeze", "idz": ["x"]}\n': "unknown field `idz`",
        b'{"v": 1, "op": "remove", "ids": ["../../etc/passwd"]}\n': "not a message id",
        b'{"v": 1, "op": "show", "id": "a/b"}\n': "not a message id",
        b'{"v": 1, "op": "status", "queue": "removed"}\n': (
            "queue must be one of all, active, frozen, quarantine, got 'removed'"
        ),
        b'{"v": 1, "op": "send", "which": "everything"}\n': (
            "which must be one of ids, all, frozen_only"
        ),
        b'{"v": 1, "op": "send", "ids": ["x"], "retry_intervals": ["soon"]}\n': "span",
        b'{"v": 1, "op": "recover", "ids": ["x"], "from": "active"}\n': (
            "from must be one of removed, quarantine, got 'active'"
        ),
        b'{"v": 1, "op": "check", "max_age": "old"}\n': "max_age",
        b"[" * 200_000 + b"\n": "not a JSON request",  # RecursionError in json
    }
    for request, text in cases.items():
        reply = raw_request(daemon.socket, request)
        assert reply["ok"] is False, (request, reply)
        assert reply["kind"] == "invalid", (request, reply)
        assert text in reply["error"], (request, reply)

    # A connection that says nothing, or half a line, gets nothing and harms nothing.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(daemon.socket))
        s.sendall(b'{"v": 1, "op": "pi')
    assert raw_request(daemon.socket, b'{"v": 1, "op": "ping"}\n') == {
        "ok": True,
        "result": "pong",
    }
    assert await ping(daemon) == "pong"
    assert daemon.running
    assert spool_files(tmp_path / "spool") == tree_before
    assert os.path.exists(tmp_path / "spool" / "frozen" / frozen_id)


# -----------------------------------------------------------------------------
# Issue 19, point 3, end to end: a smarthost that is down for longer than
# the retry intervals last gets the mail once it is back. With the defaults
# (``retries_exhausted = "repeat_last"``, a queue lifetime of 5 days) the last
# interval repeats; the message is never frozen on the way.


SENDER = "app@example.org"
RCPT = "ops@example.com"
CONTENT = b"Subject: overnight\r\n\r\nstill here in the morning\r\n"
DOWN_ATTEMPTS = 5  # the seed's rule froze the message at attempt 3 (two intervals)


async def test_a_dead_smarthost_then_up_gets_the_mail_never_frozen(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    port = free_port()  # nothing listens: every connection is refused
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{port}"])
    set_config_value(config, "retry_intervals", '["1s", "1s"]')
    daemon = await start_daemon(config)
    control = ControlClient(daemon.socket, timeout=10)
    (mid,) = await control.submit(SENDER, [RCPT], CONTENT)

    seen_status: set[str] = set()

    async def attempts_while_down() -> bool:
        view: dict[str, Any] = await control.request("show", id=mid)
        seen_status.add(view["status"])
        assert view["queue"] == "active", view  # never frozen
        return len(view["relay_attempts"]) >= DOWN_ATTEMPTS

    await wait_until(
        attempts_while_down,
        lambda: f"{DOWN_ATTEMPTS} failed attempts:\n{daemon.log_text()}",
        interval=0.05,
    )
    view = await control.request("show", id=mid)
    assert "cannot connect" in view["relay_attempts"][0]["error"]
    assert [r["span"] for r in view["retry_intervals"]] == [1.0]  # the last one, kept
    plan = await control.request("retry_plan", id=mid)
    assert plan["retries_exhausted"] == "repeat_last"
    assert plan["repeats"] is not None
    assert [(e["action"], e["reason"]) for e in plan["ends"]] == [("freeze", "lifetime")]

    server = SmtpTestServer()
    await server.start(port)  # the smarthost is back
    try:
        await wait_until(
            lambda: server.messages,
            lambda: f"the message delivered:\n{daemon.log_text()}",
            interval=0.05,
        )
        (received,) = server.messages
        assert (received.mail_from, received.rcpt_tos) == (SENDER, (RCPT,))
        departed = await wait_until(
            lambda: _departed(control, mid), "the delivery recorded", interval=0.05
        )
        assert departed["status"] == "delivered"
    finally:
        await server.stop()

    outcomes = [
        line["outcome"]
        for line in daemon.log_lines()
        if line.get("event") == "attempt done" and line.get("id") == mid
    ]
    assert len(outcomes) > DOWN_ATTEMPTS
    assert outcomes[-1] == "delivered"
    assert set(outcomes[:-1]) == {"delayed"}, outcomes  # never frozen, never expired
    assert "frozen" not in seen_status


async def _departed(control: ControlClient, mid: str) -> dict[str, Any] | None:
    view: dict[str, Any] = await control.request("show", id=mid)
    return view if view["queue"] is None else None


# -----------------------------------------------------------------------------
# The daemon end to end (``spoold run`` as a subprocess): reloads that must
# change all or nothing, reloads with the SMTP listener and the metrics
# endpoint on, and the control socket's error replies, each kind reached by
# a real request.
#
# * A reload whose file is valid TOML and valid config but cannot be built
#   (a route whose ``auth_file`` is missing) changes nothing: not
#   ``max_concurrent_send_jobs`` (read back from the spool itself), not the
#   routes (a queued message still goes to the old next hop: the spool
#   asks the router before each attempt), not the log level (info lines
#   still appear). A daemon that applied one setting before building the
#   rest fails here.
# * With ``[smtp]`` and ``[metrics]`` on, a reload that changes limits
#   applies them to new SMTP sessions while both keep listening on the
#   addresses they had (new addresses are named as needing a restart, and
#   nothing listens there); the metrics scraped after the reload continue
#   the counts from before it (same registry, same server).
# * Control errors: ``invalid``, ``not_found``, ``refused``, ``temporary``
#   and ``busy`` each come back from the running daemon with their kind,
#   and the CLI turns them into its exit codes; ``unavailable`` once it is
#   gone. (``closed`` and ``internal`` cannot be reached by a request to a
#   healthy daemon: the control server stops before the spool closes, and
#   ``internal`` is a bug's answer.)


TIMEOUT = 15.0


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


async def test_a_socket_path_that_cannot_be_bound_is_named_in_the_error(tmp_path: Path) -> None:
    """Two daemons given one path, or a path the kernel refuses: the error
    names the socket, not only errno's text."""
    from spoold.daemon.control_socket import listen
    from spoold.errors import SpooldError

    deep = tmp_path / ("d" * 120)  # longer than a Unix socket's 108 bytes
    deep.mkdir()
    with pytest.raises(SpooldError, match=r"^cannot listen on .*/submit\.sock: "):
        await listen(deep / "submit.sock", 0o660)
