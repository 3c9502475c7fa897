"""The control server's ``wait`` (over :meth:`Spool.wait`), in this
process: an answer once the message has its outcome, at once for one it
already has (a delivery included), ``timeout`` and ``not_found`` as error
kinds, and a client that hangs up ends its wait (its place among the
clients comes back).

A real spool and a real Unix socket in the test's loop; the relay holds
every attempt on a gate, so a message stays in ``sending`` until the test
lets it through. Raw clients are blocking sockets run in worker threads.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from spoold.daemon.control import ControlServer
from spoold.spool import Spool
from spoold.testing import InMemoryRelay
from tests.spool_helpers import batch
from tests.support import WAIT_TIMEOUT, wait_until


@asynccontextmanager
async def serving(
    tmp_path: Path, relay: InMemoryRelay
) -> AsyncIterator[tuple[Spool, ControlServer, Path]]:
    path = tmp_path / "c.sock"
    async with Spool.open(tmp_path / "spool", relay=relay, flush_timeout=0.1) as spool:
        server = ControlServer(spool)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, path, 0o600)
            yield spool, server, path
            tg.cancel_scope.cancel()


def ask(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(WAIT_TIMEOUT)
        s.connect(str(path))
        s.sendall(json.dumps({"v": 1, **request}).encode() + b"\n")
        with s.makefile("rb") as reader:
            reply: dict[str, Any] = json.loads(reader.readline())
    return reply


async def request(path: Path, **params: Any) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(ask, path, params)


async def test_wait_answers_when_the_message_is_delivered(tmp_path: Path) -> None:
    relay = InMemoryRelay(gate=anyio.Event())
    with anyio.fail_after(WAIT_TIMEOUT):
        async with serving(tmp_path, relay) as (spool, server, path):
            (mid,) = await spool.add(batch("a@example.com"))
            await relay.started.wait()  # held in sending
            assert await request(path, op="wait", id=mid, timeout=0) == {
                "ok": False,
                "kind": "timeout",
                "error": f"{mid}: no outcome within 0 s; still in the queue",
            }
            async with anyio.create_task_group() as tg:
                replies: list[dict[str, Any]] = []

                async def waiter() -> None:
                    replies.append(await request(path, op="wait", id=mid))

                tg.start_soon(waiter)
                await wait_until(lambda: server.clients == 1, "the waiting client")
                assert replies == []
                assert relay.gate is not None
                relay.gate.set()
            (reply,) = replies
            assert reply["ok"] is True
            result = reply["result"]
            assert result.pop("time").endswith("Z")
            assert result == {
                "id": mid,
                "outcome": "delivered",
                "failed_recipients": [],
                "last_error": None,
                "detail": None,
                "sender": "sender@example.org",
                "recipients": ["a@example.com"],
            }
            # Once gone, still known as delivered.
            again = await request(path, op="wait", id=mid, timeout=0)
            assert again["result"]["outcome"] == "delivered"


async def test_unknown_and_bad_ids(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT_TIMEOUT):
        async with serving(tmp_path, InMemoryRelay()) as (_spool, _server, path):
            unknown = await request(path, op="wait", id="8DsiAAAAAAAAAAAAA", timeout=0)
            assert unknown["kind"] == "not_found"
            assert unknown["error"].startswith("8DsiAAAAAAAAAAAAA: no such message")
            assert unknown["ok"] is False
            bad = await request(path, op="wait", id="../x")
            assert bad["kind"] == "invalid"
            negative = await request(path, op="wait", id="8DsiAAAAAAAAAAAAA", timeout=-1)
            assert negative["kind"] == "invalid"


async def test_hanging_up_ends_the_wait(tmp_path: Path) -> None:
    relay = InMemoryRelay(gate=anyio.Event())
    with anyio.fail_after(WAIT_TIMEOUT):
        async with serving(tmp_path, relay) as (spool, server, path):
            (mid,) = await spool.add(batch("a@example.com"))
            await relay.started.wait()
            s = socket.socket(socket.AF_UNIX)
            await anyio.to_thread.run_sync(s.connect, str(path))
            s.sendall(json.dumps({"v": 1, "op": "wait", "id": mid}).encode() + b"\n")
            await wait_until(lambda: server.clients == 1, "the waiting client")
            s.close()
            await wait_until(lambda: server.clients == 0, "the wait to end")
