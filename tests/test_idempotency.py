"""Idempotent submission (issue 13, point 6): one key, one submission.

Through the Python API (owner and writers, at once), ``spoold sendmail
--idempotency-key`` (a daemon subprocess, restarted) and SMTP with
``smtp.deduplicate = "message-id"`` (the listener in this loop): a retry
gets the first submission's ids and queues nothing, before and after a
restart, while the message is queued and after it left.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from spoold.daemon.config import Config
from spoold.daemon.ingest import Submitter, message_id_key
from spoold.daemon.listener import SmtpListener, listener_settings
from spoold.daemon.routing import Router
from spoold.errors import IdempotencyKeyError
from spoold.idempotency import IDEMPOTENCY_DIR, user_key
from spoold.message import SendAt
from spoold.spool import Spool
from spoold.testing import FakeClock
from spoold.writer import SpoolWriter
from tests.daemon_helpers import DaemonFactory, cli, sendmail, write_config
from tests.ingest_helpers import (
    HOSTNAME,
    RCPT,
    SENDER,
    HeldRelay,
    make_config,
    queued_ids,
    raw_smtp,
)
from tests.spool_helpers import (
    OK,
    START,
    TRY_LATER,
    batch,
    intervals,
    open_spool,
    relay_answering,
)
from tests.support import free_port, records_in, wait_until

KEY = "order-4711/confirmation"
DAY = timedelta(days=1)


# --------------------------------------------------------------- the API


async def test_a_key_given_twice_queues_once_before_and_after_a_restart_and_delivery(
    tmp_path: Path,
) -> None:
    clock = FakeClock(START)
    relay = relay_answering({"a@example.com": TRY_LATER})
    async with open_spool(tmp_path, relay, clock) as spool:
        first = await spool.add(batch("a@example.com"), idempotency_key=KEY)
        again = await spool.add(batch("a@example.com"), idempotency_key=KEY)
        assert again == first
        assert [m.id for m in spool.status()] == first
        assert spool.status()[0].idempotency_key == KEY

    async with open_spool(tmp_path, relay, clock) as spool:
        assert await spool.add(batch("a@example.com"), idempotency_key=KEY) == first
        assert [m.id for m in spool.status()] == first
        relay.respond = lambda _m, _r: OK
        clock.advance(timedelta(minutes=1))
        await wait_until(functools.partial(spool.find_outcome, first[0]), "delivery")
        # gone from the queue: the key still answers
        assert await spool.add(batch("a@example.com"), idempotency_key=KEY) == first
        assert spool.status() == []

    async with open_spool(tmp_path, relay, clock) as spool:
        assert await spool.add(batch("a@example.com"), idempotency_key=KEY) == first
        assert spool.status() == []
        # another key is another submission
        (other,) = await spool.add(batch("a@example.com"), idempotency_key=KEY + "-2")
        assert other not in first
        await wait_until(functools.partial(spool.find_outcome, other), "delivery")
    assert [rcpt for _, rcpt, _ in relay.delivered] == ["a@example.com", "a@example.com"]


async def test_a_key_is_forgotten_after_the_window(tmp_path: Path) -> None:
    clock = FakeClock(START)
    relay = relay_answering({"a@example.com": TRY_LATER})
    options = {"idempotency_window": DAY, "housekeeping_interval": timedelta(days=365)}
    async with open_spool(tmp_path, relay, clock, **options) as spool:
        await wait_until(  # the round at open is over; the next is a year off
            lambda: clock.next_deadline == clock.now() + options["housekeeping_interval"],
            "the housekeeping round at open",
        )
        first = await spool.add(batch("a@example.com"), idempotency_key=KEY)
        clock.advance(DAY - timedelta(seconds=1))
        assert await spool.add(batch("a@example.com"), idempotency_key=KEY) == first
        clock.advance(timedelta(seconds=1))
        second = await spool.add(batch("a@example.com"), idempotency_key=KEY)
        assert second != first
        assert sorted(m.id for m in spool.status()) == sorted(first + second)
        # the key now names the second submission
        assert await spool.add(batch("a@example.com"), idempotency_key=KEY) == second
        clock.advance(2 * DAY)
        assert (await spool.housekeeping())["keys"] == 1
    assert list((tmp_path / IDEMPOTENCY_DIR).iterdir()) == []


async def test_one_key_from_the_owner_and_two_writers_at_once_queues_once(
    tmp_path: Path,
) -> None:
    clock = FakeClock(START)
    relay = relay_answering({"a@example.com": TRY_LATER})
    async with open_spool(tmp_path, relay, clock) as spool:
        answers: list[list[str]] = []
        async with (
            # the writers' clock is the owner's: keys are timed alike
            SpoolWriter.open(tmp_path, default_retry_intervals=intervals(1), now=clock.now) as w1,
            SpoolWriter.open(tmp_path, default_retry_intervals=intervals(1), now=clock.now) as w2,
        ):

            async def submit(adder: Any) -> None:
                answers.append(await adder.add(batch("a@example.com"), idempotency_key=KEY))

            async with anyio.create_task_group() as tg:
                for adder in (w1, spool, w2, w1, spool, w2):
                    tg.start_soon(submit, adder)
    assert len(answers) == 6
    assert all(a == answers[0] for a in answers), answers
    assert records_in(tmp_path, "active") == set(answers[0])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == answers[0]


async def test_the_key_file_is_rebuilt_from_the_records_after_a_crash(tmp_path: Path) -> None:
    clock = FakeClock(START)
    relay = relay_answering({"a@example.com": TRY_LATER})
    async with open_spool(tmp_path, relay, clock) as spool:
        first = await spool.add(batch("a@example.com"), idempotency_key=KEY)
    # a crash between the record and the key file: the file holds no ids
    (key_file,) = (tmp_path / IDEMPOTENCY_DIR).iterdir()
    key_file.write_bytes(b"")
    async with open_spool(tmp_path, relay, clock) as spool:
        assert await spool.add(batch("a@example.com"), idempotency_key=KEY) == first
        assert [m.id for m in spool.status()] == first


@pytest.mark.parametrize("key", ["", "x" * 1001, "line\nbreak"])
async def test_an_unusable_key_is_refused(tmp_path: Path, key: str) -> None:
    async with open_spool(tmp_path, relay_answering({}), FakeClock(START)) as spool:
        with pytest.raises(IdempotencyKeyError):
            await spool.add(batch("a@example.com"), idempotency_key=key)
        assert spool.status() == []


# ---------------------------------------------------------------- sendmail


async def _sendmail(config: Path, *args: str) -> str:
    done = await sendmail(
        config,
        "-f",
        "app@example.org",
        *args,
        "ops@example.com",
        stdin=b"Subject: once\n\nonly once\n",
    )
    assert done.code == 0, done
    return done.out


async def test_sendmail_with_a_key_twice_and_after_a_restart_queues_once(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    with anyio.fail_after(90):
        config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
        daemon = await start_daemon(config)
        await _sendmail(config, "--idempotency-key", KEY)
        await _sendmail(config, "--idempotency-key", KEY)
        queued = records_in(daemon.spool_dir, "active")
        assert len(queued) == 1
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
        daemon = await start_daemon(config)
        await _sendmail(config, "--idempotency-key", KEY)
        assert records_in(daemon.spool_dir, "active") == queued
        await _sendmail(config)  # without a key: a message of its own
        assert len(records_in(daemon.spool_dir, "active")) == 2

        async def waiting() -> bool:
            messages, _ = await Spool.status_from_disk(daemon.spool_dir)
            return all(isinstance(m.status, SendAt) for m in messages)

        await wait_until(waiting, "attempts to settle", interval=0.05)


async def test_sendmail_refuses_an_unusable_key_before_asking(tmp_path: Path) -> None:
    config = write_config(tmp_path, next_hops=["127.0.0.1:1"])
    done = await anyio.to_thread.run_sync(
        functools.partial(
            cli,
            "--config",
            str(config),
            "sendmail",
            "--idempotency-key",
            "",
            "ops@example.com",
            stdin=b"Subject: x\n\nx\n",
        )
    )
    assert done.code == 65, done
    assert "idempotency key" in done.err


# -------------------------------------------------------------------- SMTP

MESSAGE = b"Message-ID: <4711@client.example>\r\nSubject: once\r\n\r\nonly once\r\n.\r\n"


@asynccontextmanager
async def listening(tmp_path: Path, port: int, deduplicate: str) -> AsyncIterator[Spool]:
    config: Config = make_config(tmp_path, port, smtp={"deduplicate": deduplicate})
    assert config.smtp is not None
    settings = await anyio.to_thread.run_sync(listener_settings, config.smtp)
    async with Spool.open(
        config.spool.dir, relay=HeldRelay(), flush_timeout=0.1, ping_interval=10.0**9
    ) as spool:
        router = Router(config)
        listener = SmtpListener(
            Submitter(spool, lambda: router, hostname=HOSTNAME), lambda: settings
        )
        async with anyio.create_task_group() as tg:
            await tg.start(listener.serve)
            try:
                yield spool
            finally:
                tg.cancel_scope.cancel()


async def _send(port: int, data: bytes) -> list[str]:
    async with raw_smtp(port) as c:
        code, text = await c.transaction(SENDER, [RCPT], data)
        assert code == 250, text
        await c.quit()
    return queued_ids(text)


async def test_smtp_with_deduplicate_takes_a_resent_message_once_across_a_restart(
    tmp_path: Path,
) -> None:
    port = free_port()
    with anyio.fail_after(60):
        async with listening(tmp_path, port, "message-id") as spool:
            first = await _send(port, MESSAGE)
            assert await _send(port, MESSAGE) == first
            assert [m.id for m in spool.status()] == first
            assert spool.status()[0].idempotency_key == message_id_key(SENDER, MESSAGE, [RCPT])
        async with listening(tmp_path, port, "message-id") as spool:
            assert await _send(port, MESSAGE) == first
            other = await _send(port, MESSAGE.replace(b"4711@", b"4712@"))
            assert other != first
            no_id = MESSAGE.split(b"\r\n", 1)[1]  # no Message-ID: never a copy
            assert await _send(port, no_id) != await _send(port, no_id)
            assert len(spool.status()) == 4


async def test_smtp_without_deduplicate_queues_every_copy(tmp_path: Path) -> None:
    port = free_port()
    with anyio.fail_after(60):
        async with listening(tmp_path, port, "") as spool:
            first = await _send(port, MESSAGE)
            assert await _send(port, MESSAGE) != first
            assert len(spool.status()) == 2


def test_the_smtp_key_is_sender_and_message_id() -> None:
    folded = b"Subject: x\r\nMessage-ID:\r\n <abc@example.com>\r\n\r\nbody\r\n"
    assert message_id_key("a@example.org", folded) == "message-id <a@example.org> <abc@example.com>"
    assert message_id_key("", folded) == "message-id <> <abc@example.com>"
    assert message_id_key("a@example.org", b"Subject: x\r\n\r\nMessage-ID: <no>\r\n") is None


# ------------------------------------------------------------------ config


def test_the_config_keys_have_defaults_and_are_checked(tmp_path: Path) -> None:
    from spoold.daemon.config import parse_config
    from spoold.errors import ConfigError

    config = make_config(tmp_path, 2525)
    assert config.spool.idempotency_window == DAY
    assert config.spool.removed_retention == timedelta(days=7)
    assert config.spool.history_retention == timedelta(days=7)
    assert config.smtp is not None and config.smtp.deduplicate == ""
    raw = {
        "spool": {
            "dir": "spool",
            "idempotency_window": "0s",
            "removed_retention": "soon",
            "history_retention": "2h",
        },
        "smtp": {"deduplicate": "subject"},
        "relay": {"default_route": "r"},
        "routes": {"r": {"next_hops": ["127.0.0.1:25"]}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp_path / "spoold.toml")
    text = str(info.value)
    assert "spool.idempotency_window" in text
    assert "spool.removed_retention" in text
    assert "spool.history_retention" not in text
    assert "smtp.deduplicate" in text and '"message-id"' in text


async def test_sendmail_with_a_reused_key_for_other_recipients_fails_and_says_why(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    daemon = await start_daemon(config)
    await _sendmail(config, "--idempotency-key", KEY)
    done = await anyio.to_thread.run_sync(
        functools.partial(
            cli,
            "--config",
            str(config),
            "sendmail",
            "-f",
            "app@example.org",
            "--idempotency-key",
            KEY,
            "someone-else@example.com",
            stdin=b"Subject: another\n\nanother message\n",
        )
    )
    assert done.code == 65, done  # EX_DATAERR: the caller's mistake, nothing queued
    assert "different envelope" in done.err and "new key" in done.err
    assert len(records_in(daemon.spool_dir, "active")) == 1


def test_a_users_key_is_scoped_by_its_uid_and_stays_within_the_length() -> None:
    assert user_key("k", 1000) == "uid 1000: k"
    assert user_key("k", 1000) != user_key("k", 1001)
    long = "x" * 1000
    scoped = user_key(long, 65534)
    assert len(scoped) <= 1000
    assert scoped == user_key(long, 65534) != user_key(long, 0)
    with pytest.raises(IdempotencyKeyError):
        user_key("x" * 1001, 0)


# -----------------------------------------------------------------------------
# An idempotency key reused for a different message: the second message
# must not vanish without a word. A script that reuses a key by mistake (a
# fixed key per job, not per message) gets a clear error, while a true retry
# (same envelope) still gets the first submission's ids.


REUSED_KEY = "nightly-job"


async def test_a_reused_key_with_other_recipients_is_refused_not_dropped(
    tmp_path: Path,
) -> None:
    relay = relay_answering({"a@example.com": TRY_LATER, "b@example.com": TRY_LATER})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        first = await spool.add(batch("a@example.com"), idempotency_key=REUSED_KEY)
        with pytest.raises(IdempotencyKeyError):
            await spool.add(batch("b@example.com"), idempotency_key=REUSED_KEY)
        assert [m.id for m in spool.status()] == first


async def test_a_retry_with_the_same_envelope_in_another_order_is_still_a_retry(
    tmp_path: Path,
) -> None:
    relay = relay_answering({"a@example.com": TRY_LATER, "b@example.com": TRY_LATER})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        first = await spool.add(batch("a@example.com", "b@EXAMPLE.com"), idempotency_key=REUSED_KEY)
        again = await spool.add(batch("b@example.com", "a@example.com"), idempotency_key=REUSED_KEY)
        assert again == first
        assert [m.id for m in spool.status()] == first
