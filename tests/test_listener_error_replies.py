"""What the SMTP listener answers after DATA when the message cannot be
taken, as a table: each trouble, the reply it gets, over a real socket.

Each case runs a real :class:`~spoold.daemon.listener.SmtpListener` on a
free ``127.0.0.1`` port with the real :class:`~spoold.daemon.ingest.Submitter`
and spool; what goes wrong is chosen per case through what the listener
depends on: the router's MX lookups (an :class:`~spoold.daemon.mx.MxResolver`
given a lookup function the test writes), a router with no default route,
the spool's filesystem steps (:class:`spoold.testing.Faults`) and its
free-space floor.

The rule under test: a recipient no route takes, or a domain that does not
exist or takes no mail, is a permanent 550 5.1.2; a temporary DNS failure
451 4.4.3; a full disk (or quota, or the free-space floor) 452 4.3.1; any
other store error 451 4.3.0; anything else of ours (an unexpected
exception in the submitter) 451: never a 5xx for our own trouble. In every
case nothing is left on disk and the same session then spools a message
once the trouble is gone.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from spoold.daemon.config import parse_config
from spoold.daemon.ingest import Submitter
from spoold.daemon.listener import SmtpListener
from spoold.daemon.mx import MxResolver
from spoold.daemon.routing import Router
from spoold.errors import MxError, SpooldError
from spoold.spool import Spool
from spoold.testing import Faults, InMemoryRelay
from tests.support import spool_files

TIMEOUT = 20.0
SENDER = "sender@example.org"
GOOD = "rcpt@example.com"  # routed to the smarthost, no lookup
CONTENT = b"Subject: replies\r\n\r\nhello\r\n.\r\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Trouble:
    """One row: a recipient, and what breaks while its message is taken."""

    recipient: str
    reply: str  # the code and enhanced status the reply starts with
    faults: dict[str, BaseException] = field(default_factory=dict)  # step -> error
    min_free_space: int = 0
    lookup_error: BaseException | None = None  # raised by the MX lookup
    null_mx: bool = False
    ours: bool = True  # our own trouble: the reply must be 4xx


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


TABLE = {
    "no route takes the recipient": Trouble("user@nowhere.test", "550 5.1.2", ours=False),
    "the domain does not exist": Trouble(
        "user@mx.test",
        "550 5.1.2",
        lookup_error=MxError("domain mx.test does not exist", permanent=True),
        ours=False,
    ),
    "the domain takes no mail (null MX)": Trouble(
        "user@mx.test", "550 5.1.2", null_mx=True, ours=False
    ),
    "DNS fails for now": Trouble(
        "user@mx.test",
        "451 4.4.3",
        lookup_error=MxError("MX lookup of mx.test failed: timeout", permanent=False),
    ),
    "the store cannot write (EIO)": Trouble(
        GOOD, "451 4.3.0", faults={"rename_record": OSError(errno.EIO, "Input/output error")}
    ),
    "the disk is full at the body's write": Trouble(
        GOOD, "452 4.3.1", faults={"write_body": _enospc()}
    ),
    "the disk is full at the record's rename": Trouble(
        GOOD, "452 4.3.1", faults={"rename_record": _enospc()}
    ),
    "the quota is exceeded at the directory fsync": Trouble(
        GOOD, "452 4.3.1", faults={"fsync_dirs": OSError(errno.EDQUOT, "Disk quota exceeded")}
    ),
    "free space is below spool.min_free_space": Trouble(GOOD, "452 4.3.1", min_free_space=2**62),
    "an unexpected exception in the submitter": Trouble(
        "user@mx.test", "451 4.3.0", lookup_error=RuntimeError("a bug")
    ),
    "an unexpected OS error in the submitter": Trouble(
        "user@mx.test", "451 4.3.0", lookup_error=PermissionError(errno.EACCES, "denied")
    ),
    "an unexpected spoold error in the submitter": Trouble(
        "user@mx.test", "451 4.3.0", lookup_error=SpooldError("something of ours broke")
    ),
}


class Lookups:
    """The MX lookup the router's resolver uses: fails as the case says
    while ``broken``, else names one exchanger."""

    def __init__(self, trouble: Trouble) -> None:
        self.trouble = trouble
        self.broken = True

    async def __call__(self, domain: str) -> tuple[list[tuple[int, str]], float]:
        if self.broken and self.trouble.lookup_error is not None:
            raise self.trouble.lookup_error
        if self.broken and self.trouble.null_mx:
            return [(0, ".")], 300.0
        return [(10, f"mx1.{domain}")], 300.0


def _router(tmp_path: Path, lookups: Lookups) -> Router:
    """Routes without a default: example.com to a smarthost, mx.test by MX,
    anything else nowhere. The resolver does not cache failures."""
    config = parse_config(
        {
            "spool": {"dir": "spool"},
            "routes": {
                "smarthost": {
                    "domains": ["example.com"],
                    "next_hops": ["smart.example.net:25"],
                    "tls": "none",
                },
                "bymx": {"domains": ["mx.test"], "mx": True, "tls": "none"},
            },
        },
        tmp_path / "spoold.toml",
    )
    return Router(config, MxResolver(lookups, negative_ttl=0.0))


class Client:
    """SMTP as bytes over one connection."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)

    async def reply(self) -> str:
        lines = []
        while True:
            line = await self.reader.receive_until(b"\r\n", 65536)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "\n".join(lines)

    async def command(self, line: str) -> str:
        await self.stream.send(line.encode() + b"\r\n")
        return await self.reply()

    async def transaction(self, recipient: str, in_data: Callable[[], None] = lambda: None) -> str:
        """A whole transaction; ``in_data`` is called once DATA got its 354
        (trouble that starts then: the reply to the content says it)."""
        assert (await self.command(f"MAIL FROM:<{SENDER}>")).startswith("250 ")
        assert (await self.command(f"RCPT TO:<{recipient}>")).startswith("250 ")
        assert (await self.command("DATA")).startswith("354 ")
        in_data()
        await self.stream.send(CONTENT)
        return await self.reply()


@asynccontextmanager
async def listening(
    tmp_path: Path, router: Router, faults: Faults
) -> AsyncIterator[tuple[Spool, Client]]:
    port = _free_port()
    smtp = parse_config(
        {
            "spool": {"dir": "spool"},
            "smtp": {"listen": [f"127.0.0.1:{port}"]},
            "relay": {"default_route": "smarthost"},
            "routes": {"smarthost": {"next_hops": ["smart.example.net:25"], "tls": "none"}},
        },
        tmp_path / "spoold.toml",
    ).smtp
    assert smtp is not None
    held = InMemoryRelay(gate=anyio.Event())  # attempts wait: what was spooled stays
    async with Spool.open(
        tmp_path / "spool", relay=held, flush_timeout=0.1, ping_interval=10.0**9, on_step=faults
    ) as spool:
        submitter = Submitter(spool, lambda: router, hostname="mx.test.example")
        listener = SmtpListener(submitter, lambda: smtp)
        async with anyio.create_task_group() as tg:
            await tg.start(listener.serve)
            try:
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    client = Client(stream)
                    assert (await client.reply()).startswith("220 ")
                    assert (await client.command("EHLO client.example")).startswith("250")
                    yield spool, client
                    assert (await client.command("QUIT")).startswith("221 ")
            finally:
                tg.cancel_scope.cancel()


def _on_disk(spool_dir: Path) -> list[str]:
    return sorted(
        f
        for f in set(spool_files(spool_dir))
        if f.split("/", 1)[0] in ("tmp", "data", "active", ".registry")
    )


@pytest.mark.parametrize("name", list(TABLE))
async def test_the_reply_to_each_trouble(tmp_path: Path, name: str) -> None:
    trouble = TABLE[name]
    lookups = Lookups(trouble)
    faults = Faults()
    with anyio.fail_after(TIMEOUT):
        async with listening(tmp_path, _router(tmp_path, lookups), faults) as (spool, client):
            for step, error in trouble.faults.items():
                faults.fail(step, error)

            def space_runs_short() -> None:
                # After MAIL (which checks the floor too): the space runs
                # short while the message comes in; the store says so.
                spool.min_free_space = trouble.min_free_space

            reply = await client.transaction(trouble.recipient, space_runs_short)

            assert reply.startswith(trouble.reply + " "), reply
            assert reply[0] == ("4" if trouble.ours else "5"), reply
            assert spool.status() == []
            assert _on_disk(tmp_path / "spool") == []

            # The trouble gone, the same session spools the same message.
            faults.clear()
            spool.min_free_space = 0
            lookups.broken = False
            recipient = trouble.recipient if trouble.reply[0] == "4" else GOOD
            accepted = await client.transaction(recipient)
            assert accepted.startswith("250 2.0.0 OK queued as "), accepted
            assert [m.id for m in spool.status()] == accepted.split()[5:]
