"""A local application's load on the shipped configs (``spoold run`` as a
subprocess, sessions opened by this test).

* ``config/spoold.toml`` (the sample, copied into a temp dir with its own
  ports; its relative paths then put the spool there too) and
  ``config/production.toml`` (its listen addresses, spool and control
  socket moved to a free loopback port and the temp dir): 100 SMTP sessions
  held open at once from 127.0.0.1, as a web application with 100 workers
  each sending makes, all get the ``220`` banner and end with ``221``.
  ``max_connections_per_client`` does not hold clients in
  ``relay_networks`` by default.
* The limit still holds a client outside ``relay_networks`` (allowed in
  because AUTH is offered): its sessions past ``max_connections_per_client``
  get ``421`` at the banner while 127.0.0.1 opens more; with
  ``limit_relay_networks = true`` (applied by a reload to new sessions)
  127.0.0.1 is held to it as well.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path

import anyio

from tests.daemon_helpers import DaemonFactory, reload_workers, write_config
from tests.ingest_helpers import RawSmtp
from tests.support import WAIT_TIMEOUT, free_port

REPO = Path(__file__).resolve().parent.parent
SESSIONS = 100


async def banners(
    port: int, count: int, stack: contextlib.AsyncExitStack, local_host: str = "127.0.0.1"
) -> list[tuple[int, str, RawSmtp]]:
    """Open ``count`` sessions at once from ``local_host``; each one's
    greeting (code, text) and the open session, kept open in ``stack``."""
    out: list[tuple[int, str, RawSmtp]] = []

    async def one() -> None:
        stream = await anyio.connect_tcp("127.0.0.1", port, local_host=local_host)
        await stack.enter_async_context(stream)
        client = RawSmtp(stream)
        code, text = await client.reply()
        out.append((code, text, client))

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(one)
    return out


async def quit_all(sessions: Sequence[tuple[int, str, RawSmtp]]) -> None:
    """QUIT every session that was greeted with 220 (each gets its 221)."""
    async with anyio.create_task_group() as tg:
        for code, _text, client in sessions:
            if code == 220:
                tg.start_soon(client.quit)


async def hold_sessions(port: int) -> None:
    """100 sessions from 127.0.0.1 open at once: every one greeted with 220."""
    with anyio.fail_after(WAIT_TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            sessions = await banners(port, SESSIONS, stack)
            refused = [text for code, text, _ in sessions if code != 220]
            assert refused == [], f"{len(refused)} of {SESSIONS} refused: {refused[:3]}"
            assert len(sessions) == SESSIONS
            await quit_all(sessions)


async def test_the_sample_config_greets_100_local_sessions_at_once(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    port = free_port()
    text = (REPO / "config" / "spoold.toml").read_text()
    text = text.replace('listen = ["127.0.0.1:2525"]', f'listen = ["127.0.0.1:{port}"]')
    text = text.replace('next_hops = ["127.0.0.1:25"]', f'next_hops = ["127.0.0.1:{free_port()}"]')
    assert f"127.0.0.1:{port}" in text and '127.0.0.1:25"' not in text
    (tmp_path / "config").mkdir()
    (tmp_path / "var" / "run").mkdir(parents=True, mode=0o750)
    config = tmp_path / "config" / "spoold.toml"  # its paths: ../var/spool, ../var/run
    config.write_text(text)

    daemon = await start_daemon(config)
    await hold_sessions(port)
    assert (tmp_path / "var" / "spool" / "active").is_dir()  # the copy's spool, not the repo's
    assert daemon.running


async def test_the_production_config_greets_100_local_sessions_at_once(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    port = free_port()
    text = (REPO / "config" / "production.toml").read_text()
    text, listen = re.subn(r"(?m)^listen = .*$", f'listen = ["127.0.0.1:{port}"]', text)
    assert listen == 1
    for installed, here in (
        ("/var/lib/spoold/spool", tmp_path / "spool"),
        ("/run/spoold/spoold.sock", tmp_path / "run" / "ctl.sock"),
        ("/run/spoold/submit.sock", tmp_path / "run" / "submit.sock"),
    ):
        assert installed in text
        text = text.replace(installed, str(here))
    (tmp_path / "run").mkdir(mode=0o750)
    config = tmp_path / "spoold.toml"
    config.write_text(text)

    daemon = await start_daemon(config)
    await hold_sessions(port)
    assert daemon.running


# ------------------------------------------- who is held to the limit


async def greeted(port: int, count: int, local_host: str) -> list[str]:
    """The greetings of ``count`` sessions opened at once from
    ``local_host`` and held until all are greeted (then closed)."""
    with anyio.fail_after(WAIT_TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            sessions = await banners(port, count, stack, local_host)
            await quit_all(sessions)
    return sorted(text for _code, text, _ in sessions)


async def test_the_per_client_limit_holds_clients_outside_relay_networks(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    port = free_port()
    users = tmp_path / "users"
    users.write_text("app:secret\n")
    users.chmod(0o600)
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    config.write_text(
        config.read_text()
        + "\n[smtp]\n"
        + f'listen = ["127.0.0.1:{port}"]\n'
        + 'relay_networks = ["127.0.0.1/32"]\n'  # 127.0.0.2 is outside: it must AUTH
        + 'auth_file = "users"\n'
        + "max_connections_per_client = 3\n"
        + "limit_relay_networks = false\n"
        + "workers = 1\n"  # one process: the counts are per worker
    )
    daemon = await start_daemon(config)

    outside = await greeted(port, 4, "127.0.0.2")
    assert [t[:4] for t in outside] == ["220 "] * 3 + ["421 "], outside
    assert "Too many connections from your address" in outside[3]
    inside = await greeted(port, 6, "127.0.0.1")
    assert [t[:4] for t in inside] == ["220 "] * 6, inside

    # Opting in holds relay_networks too, from the next session on.
    text = config.read_text().replace("limit_relay_networks = false", "limit_relay_networks = true")
    config.write_text(text)
    await reload_workers(daemon)
    inside = await greeted(port, 4, "127.0.0.1")
    assert [t[:4] for t in inside] == ["220 "] * 3 + ["421 "], inside
