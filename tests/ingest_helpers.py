"""Talking SMTP to spoold's listener, for the ingest tests.

* :class:`RawSmtp` / :func:`raw_smtp` -- SMTP as bytes over a socket: nothing
  is normalised or dot-stuffed for the test (smuggling probes, exact reply
  codes, pipelined batches);
* :func:`queued_ids` -- the ids of a ``250 ... queued as`` reply;
* :class:`HeldRelay` -- a relay that holds every attempt until its gate is
  set, so what was spooled stays on disk to be looked at;
* :func:`make_config` -- a parsed config with the listener on a given port;
* :func:`client_context` -- a TLS client context that trusts anything (the
  test certificate is self-signed).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from spoold.daemon.config import Config, parse_config
from spoold.message import Message
from spoold.relay import BodyHandle, RelayOutcome
from spoold.testing import InMemoryRelay

__all__ = [
    "HOSTNAME",
    "SMARTHOST",
    "SENDER",
    "RCPT",
    "HeldRelay",
    "RawSmtp",
    "client_context",
    "make_config",
    "queued_ids",
    "raw_smtp",
]

HOSTNAME = "mx.test.example"
SMARTHOST = "smart.example.net:25"
SENDER = "sender@example.org"
RCPT = "rcpt@example.com"


class HeldRelay:
    """Holds every attempt until :attr:`gate` is set, then hands it to
    ``inner`` (by default an in-memory relay that accepts everything)."""

    def __init__(self, inner: Any = None) -> None:
        self.gate = anyio.Event()
        self.inner = inner if inner is not None else InMemoryRelay()

    async def relay(
        self, message: Message, body: BodyHandle, recipients: Sequence[str]
    ) -> RelayOutcome:
        await self.gate.wait()
        outcome: RelayOutcome = await self.inner.relay(message, body, recipients)
        return outcome


def make_config(
    tmp_path: Path,
    port: int,
    *,
    smtp: dict[str, Any] | None = None,
    routes: dict[str, Any] | None = None,
) -> Config:
    raw = {
        "spool": {"dir": "spool"},
        "smtp": {"listen": [f"127.0.0.1:{port}"], **(smtp or {})},
        "relay": {"default_route": "smarthost"},
        "routes": routes or {"smarthost": {"next_hops": [SMARTHOST], "tls": "none"}},
    }
    return parse_config(raw, tmp_path / "spoold.toml")


class RawSmtp:
    """SMTP as bytes: nothing is normalised or dot-stuffed for us."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)

    async def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: its code and its lines joined."""
        lines = []
        while True:
            line = await self.reader.receive_until(b"\r\n", 65536)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def command(self, line: str) -> tuple[int, str]:
        await self.stream.send(line.encode() + b"\r\n")
        return await self.reply()

    async def rest(self) -> bytes:
        """Everything the server still sends until it closes."""
        out = bytearray(self.reader.buffer)
        try:
            while True:
                out += await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
            pass
        return bytes(out)

    async def quit(self) -> None:
        """QUIT; assert that its 221 is the only reply still to come (so
        nothing sent before was taken as a command)."""
        await self.stream.send(b"QUIT\r\n")
        rest = await self.rest()
        assert rest.startswith(b"221 "), rest
        assert rest.count(b"\r\n") == 1, rest

    async def transaction(
        self, sender: str, recipients: Sequence[str], data: bytes
    ) -> tuple[int, str]:
        """MAIL, RCPTs (each must get 250), DATA and ``data`` as given
        (which must carry its own end ``\\r\\n.\\r\\n``); the final reply."""
        code, text = await self.command(f"MAIL FROM:<{sender}>")
        assert code == 250, text
        for rcpt in recipients:
            code, text = await self.command(f"RCPT TO:<{rcpt}>")
            assert code == 250, text
        code, text = await self.command("DATA")
        assert code == 354, text
        await self.send(data)
        return await self.reply()


@asynccontextmanager
async def raw_smtp(
    port: int, *, ehlo: str | None = "client.example", local_host: str | None = None
) -> AsyncIterator[RawSmtp]:
    """A connection to the listener on ``port`` (from ``local_host``), its
    greeting read and, unless ``ehlo`` is None, its EHLO done."""
    stream = await anyio.connect_tcp("127.0.0.1", port, local_host=local_host)
    async with stream:
        client = RawSmtp(stream)
        code, text = await client.reply()
        assert code == 220, text
        if ehlo is not None:
            code, text = await client.command(f"EHLO {ehlo}")
            assert code == 250, text
        yield client


def queued_ids(text: str) -> list[str]:
    """The ids of a ``250 2.0.0 OK queued as ID ...`` reply."""
    m = re.match(r"250 2\.0\.0 OK queued as (.+)$", text)
    assert m, text
    return m.group(1).split()


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
