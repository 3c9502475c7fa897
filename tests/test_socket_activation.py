"""Socket activation: listening sockets handed over by systemd.

``listen_fds`` reads ``LISTEN_PID``/``LISTEN_FDS`` the way sd_listen_fds(3)
does; the listener serves a handed-over socket as it is and binds only the
``smtp.listen`` addresses none covers. The daemon end to end, with a
hand-made ``LISTEN_FDS`` environment, is in test_daemon.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from spoold.daemon.ingest import Submitter
from spoold.daemon.listener import SmtpListener
from spoold.daemon.routing import Router
from spoold.daemon.systemd import listen_fds
from spoold.spool import Spool
from tests.daemon_helpers import NotifySocket, child_env, write_config
from tests.ingest_helpers import HeldRelay, make_config
from tests.support import ARABIC_TEN, SUPERSCRIPT_TWO, WAIT_TIMEOUT, free_port


def run_child(code: str, env: dict[str, str], pass_fd: int | None = None) -> str:
    """Run ``code`` in a child whose fd 3 is ``pass_fd``; ``LISTEN_PID`` in
    ``env`` may be ``"self"`` for the child's own pid."""
    prelude = textwrap.dedent(
        """
        import os, sys
        if os.environ.get("LISTEN_PID") == "self":
            os.environ["LISTEN_PID"] = str(os.getpid())
        """
    )

    def dup_to_3() -> None:
        if pass_fd is not None:
            os.dup2(pass_fd, 3)

    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        env={**os.environ, **env},
        preexec_fn=dup_to_3,
        capture_output=True,
        timeout=30,
        check=True,
        close_fds=False,
    )
    return done.stdout.decode()


def test_listen_fds_takes_the_passed_socket_and_forgets_the_variables() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        out = run_child(
            """
            from spoold.daemon.systemd import listen_fds
            (sock,) = listen_fds()
            print(sock.getsockname()[1], sock.getblocking(), os.get_inheritable(sock.fileno()))
            print(sorted(k for k in os.environ if k.startswith("LISTEN_")))
            """,
            {"LISTEN_PID": "self", "LISTEN_FDS": "1"},
            pass_fd=listener.fileno(),
        )
    assert out.splitlines() == [f"{port} False False", "[]"]


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_PID": "1", "LISTEN_FDS": "1"},  # meant for another process
        {"LISTEN_PID": "self", "LISTEN_FDS": "x"},
        # str.isdigit() takes these; int() raises on one, reads 10 from the other
        {"LISTEN_PID": "self", "LISTEN_FDS": SUPERSCRIPT_TWO},
        {"LISTEN_PID": "self", "LISTEN_FDS": ARABIC_TEN},
        {"LISTEN_PID": SUPERSCRIPT_TWO, "LISTEN_FDS": "1"},
    ],
)
def test_listen_fds_ignores_what_is_not_for_this_process(env: dict[str, str]) -> None:
    out = run_child("from spoold.daemon.systemd import listen_fds\nprint(listen_fds())", env)
    assert out.strip() == "[]"


def test_in_this_process_without_variables_there_is_nothing() -> None:
    assert listen_fds(unset=False) == []


async def test_the_listener_serves_a_handed_over_socket_and_binds_the_rest(
    tmp_path: Path,
) -> None:
    handed = socket.socket()
    handed.bind(("127.0.0.1", 0))
    handed.listen()
    handed.setblocking(False)
    port, other = handed.getsockname()[1], free_port()
    # Both addresses are in smtp.listen; binding the handed-over one again
    # would fail with EADDRINUSE, so serving proves it was taken as it is.
    config = make_config(
        tmp_path, port, smtp={"listen": [f"127.0.0.1:{port}", f"127.0.0.1:{other}"]}
    )
    assert config.smtp is not None
    smtp = config.smtp
    with anyio.fail_after(WAIT_TIMEOUT):
        async with Spool.open(config.spool.dir, relay=HeldRelay(), flush_timeout=0.1) as spool:
            router = Router(config)
            listener = SmtpListener(
                Submitter(spool, lambda: router, hostname="mx.test"), lambda: smtp
            )
            async with anyio.create_task_group() as tg:
                await tg.start(listener.serve, [handed])
                for p in (port, other):
                    stream = await anyio.connect_tcp("127.0.0.1", p)
                    async with stream:
                        greeting = await stream.receive()
                    assert greeting.startswith(b"220 "), (p, greeting)
                tg.cancel_scope.cancel()


async def test_the_daemon_takes_its_smtp_socket_from_listen_fds(tmp_path: Path) -> None:
    """``spoold run`` started the way systemd starts it with spoold.socket:
    the listening socket on fd 3, ``LISTEN_PID`` and ``LISTEN_FDS`` set. The
    daemon must serve that socket (binding the address again would fail:
    it is taken) and its child processes must not see the variables."""
    handed = socket.socket()
    handed.bind(("127.0.0.1", 0))
    handed.listen()
    port = handed.getsockname()[1]
    config = write_config(tmp_path, next_hops=["127.0.0.1:25"])
    with config.open("a") as f:
        f.write(f'\n[smtp]\nlisten = ["127.0.0.1:{port}"]\n')
    notify = NotifySocket(tmp_path / "notify.sock")
    log_path = tmp_path / "daemon.log"

    def fd_3() -> None:
        os.dup2(handed.fileno(), 3)

    env = child_env({"NOTIFY_SOCKET": str(notify.path), "LISTEN_FDS": "1"})
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            f'LISTEN_PID=$$ exec "{sys.executable}" -m spoold.daemon.cli run --config "{config}"',
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            preexec_fn=fd_3,
            pass_fds=(3,),
        )
    handed.close()  # the daemon has its own copy now
    try:
        await notify.wait_for("READY", "1")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert s.recv(512).startswith(b"220 ")
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
        listening = [line for line in lines if line["event"] == "smtp listening"]
        # Each ingest worker serves the socket systemd handed over.
        assert {(line["address"], line.get("inherited")) for line in listening} == {
            (f"127.0.0.1:{port}", True)
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        notify.close()
