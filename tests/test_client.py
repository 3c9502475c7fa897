"""spoold.Client, the synchronous client, against a running daemon.

The daemon is a ``spoold run`` subprocess relaying to an aiosmtpd server in
this test's event loop; the client blocks, so every call runs in a worker
thread while the loop serves SMTP.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

import spoold
from spoold import Client
from spoold.errors import (
    AddressError,
    ControlError,
    IdempotencyKeyError,
    InvalidIdError,
    NotFoundError,
    OperationRefusedError,
    WaitTimeoutError,
)
from spoold.message import EnvelopeInfo
from spoold.waiting import OutcomeKind
from tests.daemon_helpers import DaemonFactory, write_config
from tests.smtp_server import Reply, SmtpTestServer
from tests.support import WAIT_TIMEOUT, wait_until

_T = TypeVar("_T")
UNKNOWN = "8DsiAAAAAAAAAAAAA"  # a well-formed id that no message has


async def call(fn: Callable[[], _T]) -> _T:
    """Run a blocking client call in a worker thread."""
    return await anyio.to_thread.run_sync(fn)


async def daemon_client(
    tmp_path: Path, start_daemon: DaemonFactory, server: SmtpTestServer
) -> Client:
    daemon = await start_daemon(write_config(tmp_path, next_hops=[server.hop]))
    return Client(daemon.socket, timeout=WAIT_TIMEOUT)


def letter(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "app@example.org"
    msg["To"] = "ops@example.com"
    msg["Subject"] = subject
    msg.set_content("hello\n")
    return msg


def test_client_is_the_public_one() -> None:
    assert spoold.Client is Client
    assert "Client" in spoold.__all__


async def test_submit_then_wait_for_delivery(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    client = await daemon_client(tmp_path, start_daemon, smtp_server)
    (mid,) = await call(
        lambda: client.submit("app@example.org", ["ops@example.com"], letter("by the client"))
    )
    outcome = await call(lambda: client.wait(mid, timeout=WAIT_TIMEOUT))
    assert (outcome.id, outcome.kind, outcome.failed_recipients) == (mid, "delivered", ())
    assert outcome.envelope_info == EnvelopeInfo("app@example.org", ["ops@example.com"])
    assert outcome.time is not None
    (received,) = smtp_server.messages
    assert received.rcpt_tos == ("ops@example.com",)
    assert b"Subject: by the client\r\n" in received.content
    # Asked again after it left: the daemon remembers the delivery.
    assert (await call(lambda: client.wait(mid, timeout=0))).kind is OutcomeKind.DELIVERED
    assert await call(client.count) == {
        "active": 0,
        "frozen": 0,
        "sending": 0,
        "removed": 0,
        "quarantine": 0,
    }


async def test_a_submission_repeated_with_its_key_queues_once(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    client = await daemon_client(tmp_path, start_daemon, smtp_server)

    def submit() -> list[str]:
        return client.submit(
            "app@example.org", ["ops@example.com"], letter("once"), idempotency_key="order-17"
        )

    first = await call(submit)
    assert await call(submit) == first  # a retry after a lost reply
    outcome = await call(lambda: client.wait(first[0], timeout=WAIT_TIMEOUT))
    assert outcome.kind is OutcomeKind.DELIVERED
    assert await call(submit) == first  # and after delivery, within the window
    assert len(smtp_server.messages) == 1
    with pytest.raises(IdempotencyKeyError):
        client.submit("app@example.org", ["ops@example.com"], b"x", idempotency_key="")


async def test_freeze_wait_send_and_remove(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    client = await daemon_client(tmp_path, start_daemon, smtp_server)
    smtp_server.behaviour.rcpt["later@example.com"] = Reply("451 4.3.0 try later")
    (mid,) = await call(
        lambda: client.submit("app@example.org", ["later@example.com"], b"Subject: a\n\nx\n")
    )
    # Still queued (sending or delayed by an hour): no outcome yet.
    with pytest.raises(WaitTimeoutError, match=mid) as caught:
        await call(lambda: client.wait(mid, timeout=0))
    assert isinstance(caught.value, TimeoutError)

    async def attempted() -> bool:
        listing = await call(client.status)
        return any(v["id"] == mid and v["status"] == "send_at" for v in listing)

    await wait_until(attempted, "a first attempt", interval=0.02)
    await call(lambda: client.freeze(mid))
    frozen = await call(lambda: client.wait(mid, timeout=0))
    assert frozen.kind is OutcomeKind.FROZEN
    assert frozen.failed_recipients == ()
    assert frozen.last_error is not None and "451 4.3.0 try later" in frozen.last_error
    assert [v["id"] for v in await call(lambda: client.status("frozen"))] == [mid]

    del smtp_server.behaviour.rcpt["later@example.com"]
    assert await call(lambda: client.send(mid)) == [mid]
    delivered = await call(lambda: client.wait(mid, timeout=WAIT_TIMEOUT))
    assert (delivered.id, delivered.kind) == (mid, OutcomeKind.DELIVERED)
    assert smtp_server.messages[-1].rcpt_tos == ("later@example.com",)


async def test_wait_for_frozen_with_failed_recipients_then_removed(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    client = await daemon_client(tmp_path, start_daemon, smtp_server)
    smtp_server.behaviour.rcpt["nobody@example.com"] = Reply("550 5.1.1 no such user")
    (mid,) = await call(
        lambda: client.submit("app@example.org", ["nobody@example.com"], b"Subject: b\n\nx\n")
    )
    frozen = await call(lambda: client.wait(mid, timeout=WAIT_TIMEOUT))
    assert frozen.kind is OutcomeKind.FROZEN
    assert frozen.failed_recipients == ("nobody@example.com",)
    assert frozen.last_error is not None and "550 5.1.1 no such user" in frozen.last_error
    await call(lambda: client.remove([mid]))
    removed = await call(lambda: client.wait(mid))
    assert (removed.kind, removed.failed_recipients) == ("removed", ("nobody@example.com",))
    await call(lambda: client.recover(mid, from_="removed"))
    assert (await call(lambda: client.wait(mid))).kind is OutcomeKind.FROZEN


async def test_typed_errors(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    client = await daemon_client(tmp_path, start_daemon, smtp_server)
    with pytest.raises(NotFoundError, match=UNKNOWN):
        await call(lambda: client.freeze([UNKNOWN]))
    with pytest.raises(NotFoundError, match=UNKNOWN):
        await call(lambda: client.wait(UNKNOWN, timeout=WAIT_TIMEOUT))
    with pytest.raises(NotFoundError, match=UNKNOWN):
        await call(lambda: client.show(UNKNOWN))
    with pytest.raises(InvalidIdError):
        await call(lambda: client.freeze(["../etc"]))
    with pytest.raises(AddressError) as bad:
        await call(lambda: client.submit("app@example.org", ["not an address"], b"x\n"))
    assert bad.value.address == "not an address"
    # A message that is not frozen cannot be removed.
    smtp_server.behaviour.rcpt["later@example.com"] = Reply("451 4.3.0 try later")
    (mid,) = await call(
        lambda: client.submit("app@example.org", ["later@example.com"], b"Subject: c\n\nx\n")
    )
    with pytest.raises(OperationRefusedError, match=mid):
        await call(lambda: client.remove(mid))
    info = await call(client.info)
    assert info["spool_dir"].endswith("spool")
    assert await call(client.ping)


async def test_retry_plan_of_a_delayed_message(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    client = await daemon_client(tmp_path, start_daemon, smtp_server)
    smtp_server.behaviour.rcpt["later@example.com"] = Reply("451 4.3.0 try later")
    (mid,) = await call(
        lambda: client.submit("app@example.org", ["later@example.com"], b"Subject: p\n\nx\n")
    )

    async def delayed() -> bool:
        return any(v["id"] == mid and v["status"] == "send_at" for v in await call(client.status))

    await wait_until(delayed, "a first attempt", interval=0.02)
    plan = await call(lambda: client.retry_plan(mid))
    assert plan["id"] == mid
    assert plan["on_permanent_failure"] == "freeze"
    # The config's one retry interval (1h) repeats until the lifetime (5 days)
    # ends, then the message is frozen.
    (attempt,) = plan["attempts"]
    assert attempt["number"] == 1
    assert attempt["earliest"] <= attempt["latest"]
    repeats = plan["repeats"]
    assert repeats["first"] == 2
    assert repeats["until"] == plan["expiry"]
    # every 54 to 66 minutes (jitter 0.1) for about 5 days
    assert 5 * 24 / 1.1 - 2 <= repeats["min_count"] <= repeats["max_count"] <= 5 * 24 / 0.9 + 1
    (end,) = plan["ends"]
    assert (end["action"], end["reason"]) == ("freeze", "lifetime")
    with pytest.raises(NotFoundError, match=UNKNOWN):
        await call(lambda: client.retry_plan(UNKNOWN))
    with pytest.raises(InvalidIdError):
        await call(lambda: client.retry_plan("../etc"))


async def test_history_of_a_delivered_message(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    client = await daemon_client(tmp_path, start_daemon, smtp_server)
    (mid,) = await call(
        lambda: client.submit("app@example.org", ["ops@example.com"], letter("for history"))
    )
    delivered = await call(lambda: client.wait(mid, timeout=WAIT_TIMEOUT))
    assert delivered.kind is OutcomeKind.DELIVERED

    (line,) = await call(client.history)
    assert (line["id"], line["outcome"], line["sender"]) == (mid, "delivered", "app@example.org")
    assert [(r["recipient"], r["state"], r["code"]) for r in line["recipients"]] == [
        ("ops@example.com", "delivered", 250)
    ]
    assert line["hop"] == smtp_server.hop
    by_span = await call(lambda: client.history(since="1h"))
    by_timedelta = await call(lambda: client.history(since=timedelta(hours=1)))
    by_recipient = await call(lambda: client.history(recipient="OPS@example.com"))
    assert [o["id"] for o in by_span] == [o["id"] for o in by_timedelta] == [mid]
    assert [o["id"] for o in by_recipient] == [mid]
    assert await call(lambda: client.history(recipient="else@example.com")) == []
    with pytest.raises(AddressError):
        await call(lambda: client.history(recipient="not an address"))
    with pytest.raises(ValueError, match="span"):
        await call(lambda: client.history(since="yesterday"))


def test_no_daemon_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ControlError) as caught:
        Client(tmp_path / "nothing.sock").count()
    assert caught.value.kind == "unavailable"


def test_a_silent_daemon_times_out(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)  # accepted by the kernel, never answered
        with pytest.raises(ControlError, match="no reply") as caught:
            Client(path, timeout=0.2).count()
    assert caught.value.kind == "unavailable"
