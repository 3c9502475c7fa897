"""Two real daemons sharing one real redis-server (issue 23 point 4): the
same idempotency key given at both nodes queues one message (one arrives at
the aiosmtpd next hop; the second submitter gets the first node's id back,
as a local duplicate does), through ``spoold sendmail --idempotency-key``
and through ``Client.submit``, and with SMTP's ``smtp.deduplicate`` through
the ingest workers; ``spoold suppress add`` at one node refuses that
recipient at the other within a bounded poll, and ``suppress remove`` lifts
it there too."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
import pytest

from spoold import Client, RecipientSuppressedError
from tests.daemon_helpers import DaemonFactory, DaemonProcess, cli, sendmail, write_config
from tests.ingest_helpers import queued_ids, raw_smtp
from tests.redis_server import RedisServer
from tests.smtp_server import SmtpTestServer
from tests.support import free_port

POLL = 0.05  # seconds between two looks at what another process changes
MESSAGE = b"Subject: once\r\n\r\nonly once\r\n"


def _node_config(
    directory: Path, name: str, redis: RedisServer, hop: str, smtp_port: int | None = None
) -> Path:
    directory.mkdir()
    config = write_config(directory, next_hops=[hop])
    text = config.read_text() + (
        f'\n[fleet]\nredis = "{redis.url}"\nnode = "{name}"\ntimeout = "300ms"\n'
    )
    if smtp_port is not None:
        text += f'\n[smtp]\nlisten = ["127.0.0.1:{smtp_port}"]\nworkers = 1\n'
        text += 'deduplicate = "message-id"\n'
    config.write_text(text)
    return config


async def _arrived(server: SmtpTestServer, count: int) -> None:
    with anyio.fail_after(30):
        while len(server.messages) < count:
            await anyio.sleep(POLL)


async def _two_nodes(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis_server: RedisServer,
    smtp_server: SmtpTestServer,
) -> tuple[list[Path], list[DaemonProcess]]:
    """Two daemons, relay-0 and relay-1, sharing ``redis_server`` and
    sending to ``smtp_server``: their configs and the running daemons."""
    configs = [
        _node_config(tmp_path / f"n{n}", f"relay-{n}", redis_server, smtp_server.hop)
        for n in range(2)
    ]
    return configs, [await start_daemon(c) for c in configs]


async def _drained(daemons: list[DaemonProcess]) -> None:
    """Wait until every message of each daemon has left its queue."""
    for daemon in daemons:
        with anyio.fail_after(30):
            while (await anyio.to_thread.run_sync(Client(daemon.socket).count))["active"]:
                await anyio.sleep(POLL)


async def test_one_key_at_two_nodes_queues_one_message(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis_server: RedisServer,
    smtp_server: SmtpTestServer,
) -> None:
    configs, (one, two) = await _two_nodes(tmp_path, start_daemon, redis_server, smtp_server)

    # sendmail at node one, then the same key at node two: one message.
    args = ("-v", "-f", "app@example.org", "--idempotency-key", "order-7", "ops@example.com")
    first = await sendmail(configs[0], *args, stdin=MESSAGE)
    assert first.code == 0, first
    second = await sendmail(configs[1], *args, stdin=MESSAGE)
    assert second.code == 0, second  # a duplicate exits 0, as at one node
    queued_as = first.err.split("queued as ")[1].split()
    assert second.err.split("queued as ")[1].split() == queued_as  # node one's id

    # Client.submit at both at once with another key: one message.
    results: list[list[str]] = []

    def submit(daemon: DaemonProcess) -> None:
        results.append(
            Client(daemon.socket).submit(
                "app@example.org", ["ops@example.com"], MESSAGE, idempotency_key="order-8"
            )
        )

    async with anyio.create_task_group() as tg:
        for daemon in (one, two):
            tg.start_soon(anyio.to_thread.run_sync, submit, daemon)
    assert len(results) == 2 and results[0] == results[1]

    await _arrived(smtp_server, 2)
    # Nothing more comes: every message of both nodes has left its queue.
    await _drained([one, two])
    assert len(smtp_server.messages) == 2
    assert any(queued_as[0].encode() in m.content for m in smtp_server.messages)


async def test_smtp_deduplicate_holds_across_nodes(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis_server: RedisServer,
    smtp_server: SmtpTestServer,
) -> None:
    ports = [free_port(), free_port()]
    daemons = [
        await start_daemon(
            _node_config(tmp_path / f"n{n}", f"relay-{n}", redis_server, smtp_server.hop, port)
        )
        for n, port in enumerate(ports)
    ]
    message = b"Message-ID: <retry-1@app.example>\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
    replies = []
    for port in ports:  # the sending MTA's retry reaches the other node
        async with raw_smtp(port) as smtp:
            replies.append(await smtp.transaction("app@example.org", ["ops@example.com"], message))
    assert [code for code, _ in replies] == [250, 250]
    assert queued_ids(replies[0][1]) == queued_ids(replies[1][1])  # node one's id
    await _arrived(smtp_server, 1)
    await _drained(daemons)
    assert len(smtp_server.messages) == 1


async def test_suppressed_at_one_node_is_refused_at_the_other(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis_server: RedisServer,
    smtp_server: SmtpTestServer,
) -> None:
    _configs, (one, two) = await _two_nodes(tmp_path, start_daemon, redis_server, smtp_server)
    ctl = functools.partial(cli, "--socket", str(one.socket))
    done = await anyio.to_thread.run_sync(
        lambda: ctl("suppress", "add", "--reason", "asked to stop", "gone@example.com")
    )
    assert done.code == 0, done.err

    client = Client(two.socket)

    def submit() -> list[str]:
        return client.submit("app@example.org", ["gone@example.com"], MESSAGE)

    with anyio.fail_after(20):  # about a second: the mirror's poll
        while True:
            try:
                await anyio.to_thread.run_sync(submit)
            except RecipientSuppressedError:
                break
            await anyio.sleep(POLL)
    check = await anyio.to_thread.run_sync(
        lambda: cli("--socket", str(two.socket), "suppress", "check", "gone@example.com")
    )
    assert check.code == 1 and "suppressed until" in check.out

    # Lifted at node two: node one takes it again.
    done = await anyio.to_thread.run_sync(
        lambda: cli("--socket", str(two.socket), "suppress", "remove", "gone@example.com")
    )
    assert done.code == 0, done.err
    with anyio.fail_after(20):
        while True:
            try:
                ids = await anyio.to_thread.run_sync(
                    lambda: Client(one.socket).submit(
                        "app@example.org", ["gone@example.com"], MESSAGE
                    )
                )
                break
            except RecipientSuppressedError:
                await anyio.sleep(POLL)
    assert len(ids) == 1


async def test_redis_down_keyed_mail_is_taken_and_a_node_keeps_its_keys(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    redis_server: RedisServer,
    smtp_server: SmtpTestServer,
) -> None:
    config = _node_config(tmp_path / "n0", "relay-0", redis_server, smtp_server.hop)
    await start_daemon(config)
    redis_server.stop()
    args = ("-v", "-f", "app@example.org", "--idempotency-key", "order-9", "ops@example.com")
    first = await sendmail(config, *args, stdin=MESSAGE)
    assert first.code == 0, first  # taken: Redis down is not mail refused
    again = await sendmail(config, *args, stdin=MESSAGE)
    assert again.code == 0, again
    assert again.err.split("queued as ")[1] == first.err.split("queued as ")[1]
    await _arrived(smtp_server, 1)


pytestmark = pytest.mark.daemon
