"""The control server's limits, in this process: the request line cap, the
read timeout, the cap on concurrent clients, and the framing of ``submit``
(the message as raw bytes after the line, the old base64 form still read).

The server runs on a real spool and a real Unix socket in the test's loop;
clients are plain blocking sockets driven from worker threads (so a client
that blocks shows what the server does), or :class:`ControlClient`. Waits
are bounded: a socket timeout, or a condition polled under ``fail_after``.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from spoold.daemon.control import ControlClient, ControlServer, PeerCredentials
from spoold.errors import ControlError
from spoold.spool import Spool
from spoold.testing import InMemoryRelay
from tests.spool_helpers import batch
from tests.support import wait_until

TIMEOUT = 60.0  # a safety net per test: none comes near it
MiB = 1024 * 1024


@asynccontextmanager
async def serving(tmp_path: Path, **options: Any) -> AsyncIterator[tuple[ControlServer, Path]]:
    """A control server on ``tmp_path/c.sock`` over a spool in ``tmp_path/spool``."""
    path = tmp_path / "c.sock"
    async with Spool.open(
        tmp_path / "spool", relay=InMemoryRelay(gate=anyio.Event()), flush_timeout=0.1
    ) as spool:
        server = ControlServer(spool, **options)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, path, 0o600)
            yield server, path
            tg.cancel_scope.cancel()


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it hangs up. (A server that hangs
    up on unread bytes makes the kernel report ECONNRESET after its data.)"""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def one_reply(data: bytes) -> dict[str, Any]:
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data
    reply: dict[str, Any] = json.loads(data)
    return reply


def subscribe(server: ControlServer, path: Path) -> socket.socket:
    """A raw ``events`` connection (read it with :func:`next_event`)."""
    s = connect(path)
    s.sendall(b'{"v": 1, "op": "events"}\n')
    return s


def subscribers(server: ControlServer) -> int:
    return server.spool.subscribers


def next_event(s: socket.socket, kind: str) -> dict[str, Any]:
    """The next event of ``kind`` on an ``events`` connection."""
    reader = s.makefile("rb")
    while True:
        line = reader.readline()
        assert line, "the events stream ended"
        reply = json.loads(line)
        assert reply["ok"] is True, reply
        if reply["event"]["event"] == kind:
            event: dict[str, Any] = reply["event"]
            return event


async def ping(path: Path) -> str:
    result: str = await ControlClient(path, timeout=10).request("ping")
    return result


# ------------------------------------------------------------ line cap


async def test_a_request_over_1_mib_is_answered_and_cut_off_unread(tmp_path: Path) -> None:
    """Seen: the server buffered up to 65 MiB per request. Now it reads a
    little over 1 MiB, answers, and hangs up: the client cannot even get
    its 2 MiB out, so the server never held them."""

    def send_2_mib() -> tuple[int, bytes]:
        with connect(tmp_path / "c.sock") as s:
            sent = 0
            chunk = b"x" * 65536
            try:
                while sent < 2 * MiB:
                    sent += s.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return sent, read_all(s)

    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path) as (_, path):
            sent, reply = await anyio.to_thread.run_sync(send_2_mib)
            assert one_reply(reply) == {
                "ok": False,
                "kind": "invalid",
                "error": "request over 1 MiB",
            }
            assert sent < 2 * MiB  # cut off: the rest was never read
            assert await ping(path) == "pong"


async def test_a_line_just_under_the_cap_is_read_and_one_just_over_is_not(
    tmp_path: Path,
) -> None:
    def request(line: bytes) -> dict[str, Any]:
        with connect(tmp_path / "c.sock") as s:
            s.sendall(line)
            return one_reply(read_all(s))

    head = b'{"v": 1, "op": "ping"'
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, max_request=1000) as _:
            fits = head + b" " * (1000 - len(head) - 1) + b"}"  # JSON allows the blanks
            assert len(fits) == 1000
            reply = await anyio.to_thread.run_sync(request, fits + b"\n")
            assert reply == {"ok": True, "result": "pong"}
            too_long = fits[:-1] + b" }\n"
            reply = await anyio.to_thread.run_sync(request, too_long)
            assert reply == {"ok": False, "kind": "invalid", "error": "request over 1000 bytes"}


# -------------------------------------------------------- read timeout


async def test_a_silent_client_is_told_and_disconnected_but_an_events_stream_is_not(
    tmp_path: Path,
) -> None:
    def silent(prefix: bytes) -> bytes:
        with connect(tmp_path / "c.sock") as s:
            s.sendall(prefix)
            return read_all(s)

    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, request_timeout=1.0) as (server, path):
            with subscribe(server, path) as events:
                await wait_until(lambda: subscribers(server) == 1, "the subscription")
                for prefix in (b"", b'{"v": 1, "op": "pi'):
                    reply = one_reply(await anyio.to_thread.run_sync(silent, prefix))
                    assert reply == {
                        "ok": False,
                        "kind": "invalid",
                        "error": "no request within 1 s; disconnected",
                    }
                # The subscription is older than both silent clients, which
                # timed out meanwhile: it is still served.
                (mid,) = await server.spool.add(batch("after@example.com"), frozen=True)
                event = await anyio.to_thread.run_sync(next_event, events, "spooled")
                assert event["id"] == mid
            assert await ping(path) == "pong"


# ----------------------------------------------------- concurrent clients


async def test_the_client_over_max_clients_is_told_busy_at_once(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, max_clients=2) as (server, path):
            idle = [connect(path), connect(path)]
            await wait_until(lambda: server.clients == 2, "two clients served")

            reply = one_reply(await anyio.to_thread.run_sync(read_all, connect(path)))
            assert reply == {
                "ok": False,
                "kind": "busy",
                "error": (
                    "the daemon is serving 2 control clients, the most it takes; try again later"
                ),
            }
            with pytest.raises(ControlError) as refused:
                await ping(path)
            assert refused.value.kind == "busy"

            # An events subscriber holds a place like any other client.
            idle.pop().close()
            await wait_until(lambda: server.clients == 1, "a place to free up")
            with subscribe(server, path):
                await wait_until(lambda: subscribers(server) == 1, "the subscription")
                assert server.clients == 2
                with pytest.raises(ControlError) as refused:
                    await ping(path)
                assert refused.value.kind == "busy"

            idle.pop().close()
            await wait_until(lambda: server.clients == 0, "every place to free up")
            assert await ping(path) == "pong"


async def test_one_user_holds_at_most_an_eighth_of_the_submission_sockets_places(
    tmp_path: Path,
) -> None:
    """On the submission socket one uid (here this test's) may hold
    ``max_clients // 8`` connections: one user cannot take every place from
    the others; a place freed is taken again."""
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, max_clients=16, submission_only=True) as (server, path):
            assert server.max_per_user == 2
            idle = [connect(path), connect(path)]
            await wait_until(lambda: server.clients_by_uid == {os.getuid(): 2}, "two places")
            reply = one_reply(await anyio.to_thread.run_sync(read_all, connect(path)))
            assert (reply["ok"], reply["kind"]) == (False, "busy")
            assert f"uid {os.getuid()} already has as many connections" in reply["error"]
            idle.pop().close()
            await wait_until(lambda: server.clients_by_uid == {os.getuid(): 1}, "a place freed")
            assert await ping(path) == "pong"
            idle.pop().close()
            await wait_until(lambda: server.clients_by_uid == {}, "every place freed")


# ----------------------------------------------------------- submit


class Submitting:
    """A daemon that only takes submissions (the other operations are
    not asked for here)."""

    def __init__(self, submit: Callable[[str, list[str], bytes], Awaitable[list[str]]]) -> None:
        self._submit = submit
        self.peers: list[PeerCredentials | None] = []  # who submitted, as the server saw it

    async def submit(
        self,
        sender: str,
        recipients: list[str],
        content: bytes,
        idempotency_key: str | None = None,
        peer: PeerCredentials | None = None,
    ) -> list[str]:
        self.peers.append(peer)
        return await self._submit(sender, recipients, content)

    async def reload(self) -> dict[str, Any]:
        raise NotImplementedError

    async def info(self) -> dict[str, Any]:
        raise NotImplementedError

    async def count(self) -> dict[str, int]:
        raise NotImplementedError

    async def check(self, max_age: float) -> list[str]:
        raise NotImplementedError


async def test_submit_takes_the_message_as_raw_bytes_after_the_line(tmp_path: Path) -> None:
    got: list[tuple[dict[str, Any], bytes]] = []

    async def submit(sender: str, recipients: list[str], content: bytes) -> list[str]:
        got.append(({"sender": sender, "recipients": recipients}, content))
        return ["id1"]

    message = b"Subject: big\r\n\r\n" + bytes(range(256)) * (3 * MiB // 256)  # 3 MiB + change
    daemon = Submitting(submit)
    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, daemon=daemon, max_message_size=lambda: 4 * MiB) as (_, p):
            ids = await ControlClient(p).submit("s@example.org", ["r@example.com"], message)
    assert ids == ["id1"]
    ((request, content),) = got
    assert content == message
    assert request["sender"] == "s@example.org" and request["recipients"] == ["r@example.com"]
    # The kernel's word on who connected reaches the daemon with the message.
    assert daemon.peers == [PeerCredentials(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())]


async def test_submit_in_the_old_base64_form_still_works(tmp_path: Path) -> None:
    got: list[bytes] = []

    async def submit(sender: str, recipients: list[str], content: bytes) -> list[str]:
        got.append(content)
        return ["id1"]

    def old_client(content: bytes) -> dict[str, Any]:
        line = json.dumps(
            {
                "v": 1,
                "op": "submit",
                "sender": "s@example.org",
                "recipients": ["r@example.com"],
                "content": base64.b64encode(content).decode(),
            }
        ).encode()
        with connect(tmp_path / "c.sock") as s:
            s.sendall(line + b"\n")
            return one_reply(read_all(s))

    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, daemon=Submitting(submit), max_message_size=lambda: 100):
            reply = await anyio.to_thread.run_sync(old_client, b"Subject: x\n\nold client\n")
            assert reply == {"ok": True, "result": ["id1"]}
            reply = await anyio.to_thread.run_sync(old_client, b"x" * 101)
            assert reply == {
                "ok": False,
                "kind": "invalid",
                "error": "submit: message of 101 bytes exceeds the limit of 100 "
                "(smtp.max_message_size)",
            }
    assert got == [b"Subject: x\n\nold client\n"]


async def test_submit_over_the_size_limit_is_refused_before_its_content_is_read(
    tmp_path: Path,
) -> None:
    """The refusal comes while the client has sent only the line: the server
    does not wait for (or read) the announced bytes."""
    got: list[bytes] = []

    async def submit(sender: str, recipients: list[str], content: bytes) -> list[str]:
        got.append(content)
        return ["id1"]

    def line_only(params: dict[str, Any]) -> dict[str, Any]:
        line = json.dumps({"v": 1, "op": "submit", "sender": "", **params}).encode()
        with connect(tmp_path / "c.sock") as s:
            s.sendall(line + b"\n")  # and nothing more
            return one_reply(read_all(s))

    with anyio.fail_after(TIMEOUT):
        async with serving(
            tmp_path, daemon=Submitting(submit), max_message_size=lambda: 1000, request_timeout=60
        ) as (_, path):
            reply = await anyio.to_thread.run_sync(
                line_only, {"recipients": ["r@example.com"], "content_length": 1001}
            )
            assert reply["kind"] == "invalid"
            assert reply["error"] == (
                "submit: message of 1001 bytes exceeds the limit of 1000 (smtp.max_message_size)"
            )
            for bad in (-1, "10", 1.5, True, None):
                reply = await anyio.to_thread.run_sync(
                    line_only, {"recipients": ["r@example.com"], "content_length": bad}
                )
                assert reply["kind"] == "invalid", (bad, reply)
                assert "content_length" in reply["error"], (bad, reply)
            reply = await anyio.to_thread.run_sync(
                line_only, {"recipients": [], "content_length": 1, "content": "eA=="}
            )
            assert "not both" in reply["error"]

            # Through the client: the daemon hangs up on the unread bytes and
            # the client still reads why.
            with pytest.raises(ControlError) as refused:
                await ControlClient(path).submit("", ["r@example.com"], b"y" * (8 * MiB))
            assert refused.value.kind == "invalid"
            assert "message of 8388608 bytes exceeds the limit of 1000" in str(refused.value)
    assert got == []


async def test_a_submit_whose_content_stops_short_is_not_submitted(tmp_path: Path) -> None:
    got: list[bytes] = []

    async def submit(sender: str, recipients: list[str], content: bytes) -> list[str]:
        got.append(content)
        return ["id1"]

    def short(close: bool) -> bytes:
        line = json.dumps(
            {"v": 1, "op": "submit", "sender": "", "recipients": ["r@x.example"]}
        ).encode()
        with connect(tmp_path / "c.sock") as s:
            s.sendall(line[:-1] + b', "content_length": 100}\nonly 20 bytes here..')
            if close:
                s.shutdown(socket.SHUT_WR)
            return read_all(s)

    with anyio.fail_after(TIMEOUT):
        async with serving(tmp_path, daemon=Submitting(submit), request_timeout=1.0) as (_, path):
            for close in (True, False):  # the client hangs up / goes silent
                reply = one_reply(await anyio.to_thread.run_sync(short, close))
                assert reply["kind"] == "invalid"
                assert "ended before its 100 bytes" in reply["error"]
            assert await ping(path) == "pong"
    assert got == []
