"""Quiet when embedded: a program that uses the library and configures no
logging prints nothing, through a whole add / relay / deliver cycle that
logs at info and warning (a dead next hop, a quarantined submission). The
same program with ``logging.basicConfig`` shows those lines, which proves
the library did log them, through the standard ``logging`` module, under
``spoold.*`` loggers."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

from tests.smtp_server import SmtpTestServer
from tests.support import free_port

PROGRAM = """
import asyncio, logging, sys

from spoold import Body, RoutedBatch, RoutedEnvelope, RouteSettings, SmtpRelay, Spool

spool_dir, dead_hop, live_hop, configure = sys.argv[1:]
if configure == "yes":
    logging.basicConfig(level=logging.DEBUG, format="%(name)s %(levelname)s %(message)s")


async def main() -> None:
    relay = SmtpRelay(RouteSettings(tls="none"))
    body = Body.from_content(b"Subject: quiet\\r\\n\\r\\nhello\\r\\n")
    async with Spool.open(spool_dir, relay=relay) as spool:
        envelope = RoutedEnvelope("me@example.org", ["you@example.com"], [dead_hop, live_hop])
        (message_id,) = await spool.add(RoutedBatch([envelope], body))
        outcome = await spool.wait(message_id, timeout=60)
        assert outcome.kind == "delivered", outcome
        await spool.quarantine("held for a test", RoutedBatch([envelope], body))
    await relay.close_and_flush()


asyncio.run(main())
"""


async def run_program(tmp_path: Path, server: SmtpTestServer, configure: bool) -> tuple[str, str]:
    script = tmp_path / "embed.py"
    script.write_text(PROGRAM)
    spool_dir = tmp_path / ("spool-logged" if configure else "spool-quiet")
    dead_hop = f"127.0.0.1:{free_port()}"
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [
                sys.executable,
                str(script),
                str(spool_dir),
                dead_hop,
                server.hop,
                "yes" if configure else "no",
            ],
            check=False,
        )
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    return stdout, stderr


async def test_an_embedded_spool_prints_nothing_without_logging_configured(
    tmp_path: Path, smtp_server: SmtpTestServer
) -> None:
    stdout, stderr = await run_program(tmp_path, smtp_server, configure=False)
    assert (stdout, stderr) == ("", "")
    assert smtp_server.transactions == 1  # the cycle did run: the message went out


async def test_the_same_program_with_logging_configured_shows_the_library_lines(
    tmp_path: Path, smtp_server: SmtpTestServer
) -> None:
    stdout, stderr = await run_program(tmp_path, smtp_server, configure=True)
    assert stdout == ""
    assert smtp_server.transactions == 1
    lines = stderr.splitlines()
    assert any(line.startswith("spoold.spool INFO spooled id=") for line in lines), stderr
    assert any(
        line.startswith("spoold.relay WARNING next hop unavailable id=") for line in lines
    ), stderr
    assert any(
        line.startswith("spoold.spool WARNING quarantined id=")
        and "reason='held for a test'" in line
        for line in lines
    ), stderr
    done = next(line for line in lines if line.startswith("spoold.spool INFO attempt done"))
    assert " outcome='delivered' " in done, done
