"""``spoold sendmail`` against a real daemon (``spoold run`` in a subprocess).

The daemon's only route points at a ``127.0.0.1`` port nothing listens on:
a spooled message's first attempt is refused at once and it waits in
``active`` for an hour, so the test reads it from disk
(:meth:`Spool.status_from_disk` and ``data/ID``) while the daemon runs.
``spoold sendmail`` runs as a subprocess too (:func:`tests.daemon_helpers.cli`),
its stdin given. One test runs the daemon's submit path in this
process instead, to inject a full disk. Every wait is bounded.
"""

from __future__ import annotations

import base64
import errno
import functools
import getpass
import os
import pwd
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from spoold.body import Body
from spoold.daemon.config import load_config
from spoold.daemon.control import ControlClient, ControlServer
from spoold.daemon.ingest import Submitter
from spoold.daemon.main import Daemon
from spoold.daemon.sendmail import EX_USAGE, SendmailArgs, parse_args
from spoold.errors import ControlError
from spoold.message import Message, SendAt
from spoold.spool import Spool
from spoold.testing import Faults, InMemoryRelay
from tests.daemon_helpers import (
    DaemonFactory,
    DaemonProcess,
    child_env,
    cli,
    sendmail,
    set_config_value,
    write_config,
)
from tests.support import WAIT_TIMEOUT, free_port, wait_until

TIMEOUT = 60.0  # a safety net per test: none comes near it


async def daemon_with_unreachable_hop(tmp_path: Path, start: DaemonFactory) -> DaemonProcess:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    return await start(config)


async def waiting_messages(spool_dir: Path, count: int) -> list[Message]:
    """The ``count`` messages on disk once each has had its (refused) first
    attempt and waits for its retry: then nothing moves them."""

    async def waiting() -> list[Message] | None:
        messages, unreadable = await Spool.status_from_disk(spool_dir)
        assert unreadable == []
        assert len(messages) <= count, messages
        done = len(messages) == count and all(isinstance(m.status, SendAt) for m in messages)
        return messages if done else None

    found: list[Message] = await wait_until(
        waiting, f"{count} waiting message(s) in {spool_dir}", interval=0.05
    )
    return found


def content_of(spool_dir: Path, message_id: str) -> bytes:
    """The message as submitted (dot-stuffing of the body file undone)."""
    return Body((spool_dir / "data" / message_id).read_bytes()).content()


def header_block(content: bytes) -> bytes:
    return content.split(b"\r\n\r\n", 1)[0] + b"\r\n"


# ----------------------------------------------------------------- tests


async def test_recipients_as_arguments_and_a_dot_line_ends_the_input(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        stdin = b"Subject: args\n\nline one\n.\nafter the dot\n"
        done = await sendmail(
            daemon.config,
            "-f",
            "sender@example.org",
            "alice@example.com",
            "bob@example.net",
            stdin=stdin,
        )
        assert done.code == 0, done
        (msg,) = await waiting_messages(daemon.spool_dir, 1)
    assert msg.envelope_info.sender == "sender@example.org"
    assert msg.envelope_info.recipients == ["alice@example.com", "bob@example.net"]
    assert msg.remaining_recipients == ["alice@example.com", "bob@example.net"]
    content = content_of(daemon.spool_dir, msg.id)
    assert content.endswith(b"Subject: args\r\n\r\nline one\r\n")  # LF became CRLF
    assert b"after the dot" not in content
    user = pwd.getpwuid(os.getuid()).pw_name  # the kernel's word for who submitted
    assert content.startswith(
        f"Received: from localhost (uid {os.getuid()}, user {user})\r\n\tby ".encode()
    )
    assert f"(spoold) with local id {msg.id};".encode() in content
    assert b"\r\nMessage-ID: <" in header_block(content)
    assert b"\r\nDate: " in header_block(content)


@pytest.mark.parametrize("flag", ["-i", "-oi"])
async def test_with_i_a_dot_line_is_content(
    tmp_path: Path, start_daemon: DaemonFactory, flag: str
) -> None:
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        stdin = b"Subject: dots\n\nline one\n.\nafter the dot\n"
        done = await sendmail(daemon.config, flag, "alice@example.com", stdin=stdin)
        assert done.code == 0, done
        (msg,) = await waiting_messages(daemon.spool_dir, 1)
    content = content_of(daemon.spool_dir, msg.id)
    assert content.endswith(b"Subject: dots\r\n\r\nline one\r\n.\r\nafter the dot\r\n")
    wire = (daemon.spool_dir / "data" / msg.id).read_bytes()
    assert b"\r\n..\r\nafter the dot\r\n" in wire  # dot-stuffed on disk
    assert msg.remaining_recipients == ["alice@example.com"]


async def test_t_takes_recipients_from_to_cc_bcc_and_removes_bcc(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        stdin = (
            b"From: Sender <sender@example.org>\n"
            b"To: Alice <alice@example.com>, bob@example.net\n"
            b"Bcc: hidden@example.org,\n"
            b" also-hidden@example.org\n"
            b"Cc: carol@example.com\n"
            b"Subject: headers\n"
            b"\n"
            b"Bcc: this line is body text\n"
        )
        done = await sendmail(daemon.config, "-t", stdin=stdin)
        assert done.code == 0, done
        (msg,) = await waiting_messages(daemon.spool_dir, 1)
    assert sorted(msg.remaining_recipients) == sorted(
        [
            "alice@example.com",
            "bob@example.net",
            "carol@example.com",
            "hidden@example.org",
            "also-hidden@example.org",
        ]
    )
    # Without -f the sender is the user at this host.
    assert msg.envelope_info.sender == f"{getpass.getuser()}@{socket.getfqdn()}"
    content = content_of(daemon.spool_dir, msg.id)
    head = header_block(content)
    assert b"hidden" not in head
    assert b"\nbcc:" not in head.lower()
    assert b"To: Alice <alice@example.com>, bob@example.net\r\n" in head
    assert b"Cc: carol@example.com\r\n" in head
    assert content.endswith(b"Subject: headers\r\n\r\nBcc: this line is body text\r\n")


async def test_t_removes_bcc_when_it_is_the_last_header(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """A Bcc: line just before the blank line must go too (it is the usual
    place for it when a program writes To, Subject, then Bcc)."""
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        stdin = b"To: alice@example.com\nSubject: last\nBcc: hidden@example.org\n\nbody\n"
        done = await sendmail(daemon.config, "-t", "-f", "s@example.org", stdin=stdin)
        assert done.code == 0, done
        (msg,) = await waiting_messages(daemon.spool_dir, 1)
    assert sorted(msg.remaining_recipients) == ["alice@example.com", "hidden@example.org"]
    head = header_block(content_of(daemon.spool_dir, msg.id))
    assert b"hidden" not in head, head


async def test_t_with_arguments_adds_both(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        stdin = b"To: alice@example.com\nSubject: both\n\nbody\n"
        done = await sendmail(
            daemon.config, "-t", "-f", "s@example.org", "extra@example.net", stdin=stdin
        )
        assert done.code == 0, done
        (msg,) = await waiting_messages(daemon.spool_dir, 1)
    assert sorted(msg.remaining_recipients) == ["alice@example.com", "extra@example.net"]


async def test_no_recipients_is_a_data_error(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        done = await sendmail(daemon.config, "-t", stdin=b"Subject: nobody\n\nbody\n")
        assert done.code == 65, done
        assert "no recipients" in done.err
        messages, _ = await Spool.status_from_disk(daemon.spool_dir)
        assert messages == []


async def test_the_listener_limits_apply_to_sendmail_too(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        rcpts = [f"r{i}@example.com" for i in range(101)]  # default max_recipients: 100
        done = await sendmail(daemon.config, *rcpts, stdin=b"Subject: many\n\nbody\n")
        assert done.code == 65, done
        assert "101 recipients exceed the limit of 100 (smtp.max_recipients)" in done.err
        messages, _ = await Spool.status_from_disk(daemon.spool_dir)
        assert messages == []


async def test_with_no_daemon_the_exit_code_is_75(tmp_path: Path) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    socket_path = tmp_path / "run" / "submit.sock"  # the submission socket, beside ctl.sock
    with anyio.fail_after(TIMEOUT):
        done = await sendmail(config, "alice@example.com", stdin=b"Subject: lost?\n\nbody\n")
    assert done.code == 75, done  # EX_TEMPFAIL: the caller keeps the message
    assert f"control socket {socket_path} does not exist" in done.err, done
    assert done.err.startswith("spoold: message not accepted:"), done
    assert not (tmp_path / "spool").exists()


async def test_after_the_daemon_stops_the_exit_code_is_75(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        done = await sendmail(daemon.config, "alice@example.com", stdin=b"Subject: 1\n\n1\n")
        assert done.code == 0, done
        (first,) = await waiting_messages(daemon.spool_dir, 1)
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0

        done = await sendmail(daemon.config, "alice@example.com", stdin=b"Subject: 2\n\n2\n")
        assert done.code == 75, done
        assert "does not exist" in done.err, done
        messages, _ = await Spool.status_from_disk(daemon.spool_dir)
        assert [m.id for m in messages] == [first.id]  # safe; the second was refused


async def test_a_killed_daemon_leaves_a_stale_socket_and_the_exit_code_is_75(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        daemon.send_signal(signal.SIGKILL)
        await daemon.wait_exit()
        submission = daemon.socket.parent / "submit.sock"
        assert submission.is_socket()
        done = await sendmail(daemon.config, "alice@example.com", stdin=b"Subject: x\n\nx\n")
        assert done.code == 75, done
        assert f"cannot reach the daemon at {submission}" in done.err, done


async def test_a_full_disk_during_sendmail_exits_75(tmp_path: Path) -> None:
    """The daemon's submit path in this process (its real ``submit``
    handler, control server and submitter, a full disk injected into the
    store) and ``spoold sendmail`` as a subprocess: a full disk is a
    temporary failure, so the exit code must be 75 (EX_TEMPFAIL), as the
    SMTP listener answers 452 for it, not 70 (EX_SOFTWARE)."""
    config_path = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    config = load_config(config_path)

    faults = Faults()
    faults.fail("rename_record", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with anyio.fail_after(TIMEOUT):
        async with Spool.open(
            config.spool.dir,
            relay=InMemoryRelay(gate=anyio.Event()),
            flush_timeout=0.1,
            on_step=faults,
        ) as spool:
            daemon = Daemon(config)
            daemon._submitter = Submitter(spool, lambda: daemon.live.router)
            server = ControlServer(spool, daemon, submission_only=True)
            async with anyio.create_task_group() as tg:
                await tg.start(
                    server.serve, config.control.submission_path, config.control.submission_mode
                )
                done = await sendmail(config_path, "alice@example.com", stdin=b"Subject: x\n\nx\n")
                tg.cancel_scope.cancel()
            assert spool.status() == []
    assert done.code == 75, done  # nothing lost: the caller keeps the message
    assert "No space left on device" in done.err, done


# ------------------------------------------------------------ addresses


BAD_ARGUMENTS = [
    ("a b@example.com",),
    ("not an address",),
    ("bad@@example.com",),
    ("bad\r\nDATA@example.com",),  # was delivered as badDATA@example.com
    ("",),
    ("-f", "x\r\ny@example.com", "good@example.com"),
    ("-f", "no at sign", "good@example.com"),
]


async def test_a_bad_address_exits_65_and_nothing_is_queued(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """Seen: these were queued (and CR LF silently dropped on the wire while
    the record kept it). Now each is refused before the daemon is asked,
    naming the address; a good one beside it does not change that."""
    with anyio.fail_after(TIMEOUT * 2):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        for args in BAD_ARGUMENTS:
            if args[0] != "-f":
                args = ("-f", "s@example.org", "good@example.com", *args)
            bad = args[1] if args[1] != "s@example.org" else args[-1]
            done = await sendmail(daemon.config, *args, stdin=b"Subject: x\n\nx\n")
            assert done.code == 65, (args, done)
            assert repr(bad) in done.err, (args, done)
            assert "nothing was sent" in done.err, (args, done)
            assert ("sender" if args[1] == bad else "recipient") in done.err, (args, done)
        messages, _ = await Spool.status_from_disk(daemon.spool_dir)
        assert messages == []
        assert not any(line.get("event") == "spooled" for line in daemon.log_lines())

        # A good address, UTF-8 included, is taken exactly as given.
        done = await sendmail(
            daemon.config, "-f", "jörg@exämple.org", "zoë@exämple.com", stdin=b"Subject: y\n\ny\n"
        )
        assert done.code == 0, done
        (msg,) = await waiting_messages(daemon.spool_dir, 1)
    assert msg.envelope_info.sender == "jörg@exämple.org"
    assert msg.remaining_recipients == ["zoë@exämple.com"]


async def test_a_bad_recipient_in_the_headers_with_t_exits_65(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        stdin = b"To: good@example.com, user@-bad-.example\nSubject: t\n\nbody\n"
        done = await sendmail(daemon.config, "-t", "-f", "s@example.org", stdin=stdin)
        assert done.code == 65, done
        assert "'user@-bad-.example'" in done.err, done
        messages, _ = await Spool.status_from_disk(daemon.spool_dir)
        assert messages == []


async def test_the_control_submit_validates_addresses_itself(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """The control socket is a way in of its own: a client that skips the
    CLI's checks gets kind 'invalid', in the new framing and the old."""
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        client = ControlClient(daemon.socket, timeout=10)
        content = b"Subject: x\r\n\r\nx\r\n"
        cases = [
            ("s@example.org", ["a b@example.com"], "'a b@example.com'"),
            ("s@example.org", ["good@example.com", "bad\r\nDATA@example.com"], "control"),
            ("x\r\ny@example.com", ["good@example.com"], "control"),
            ("s@example.org", [""], "null address"),
            ("s@example.org", [], "at least one recipient"),
        ]
        for sender, recipients, text in cases:
            with pytest.raises(ControlError) as refused:
                await client.submit(sender, recipients, content)
            assert refused.value.kind == "invalid", (sender, recipients, refused.value)
            assert text in str(refused.value), (sender, recipients, refused.value)
            with pytest.raises(ControlError) as refused:  # an older client
                await client.request(
                    "submit",
                    sender=sender,
                    recipients=recipients,
                    content=base64.b64encode(content).decode(),
                )
            assert refused.value.kind == "invalid", (sender, recipients, refused.value)
        with pytest.raises(ControlError) as refused:
            await client.submit("s@example.org", ["good@example.com"], b"")
        assert refused.value.kind == "invalid"
        assert "empty message" in str(refused.value)
        messages, _ = await Spool.status_from_disk(daemon.spool_dir)
        assert messages == []


# --------------------------------------------------------------- content


async def test_an_empty_message_exits_65(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        done = await sendmail(daemon.config, "alice@example.com", stdin=b"")
        assert done.code == 65, done
        assert "empty message: nothing on standard input" in done.err, done
        done = await sendmail(daemon.config, "alice@example.com", stdin=b".\nafter\n")
        assert done.code == 65, done
        assert "empty message" in done.err, done
        messages, _ = await Spool.status_from_disk(daemon.spool_dir)
        assert messages == []


def big_message(size: int) -> bytes:
    """CRLF lines (some starting with a dot) adding up to at least ``size``."""
    lines = [b"Subject: big\r\n", b"\r\n"]
    n = 0
    total = sum(map(len, lines))
    while total < size:
        line = (b"." if n % 7 == 0 else b"") + b"line %08d " % n + b"x" * 60 + b"\r\n"
        lines.append(line)
        total += len(line)
        n += 1
    return b"".join(lines)


async def test_a_message_over_1_mib_is_spooled_byte_for_byte(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """Seen: the whole message rode inside the JSON request line. Now it
    follows the line as raw bytes, so a request line stays small (1 MiB
    cap) while messages go up to smtp.max_message_size."""
    message = big_message(3 * 1024 * 1024)
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        done = await sendmail(daemon.config, "-f", "s@example.org", "a@example.com", stdin=message)
        assert done.code == 0, done
        (msg,) = await waiting_messages(daemon.spool_dir, 1)
    content = content_of(daemon.spool_dir, msg.id)
    assert content.endswith(message)
    added = content[: -len(message)]
    assert added.startswith(f"Received: from localhost (uid {os.getuid()}, ".encode())
    assert len(added) < 1000  # only the trace headers were added


async def test_a_message_over_max_message_size_exits_65_naming_the_limit(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    with config.open("a") as f:
        f.write(f'\n[smtp]\nlisten = ["127.0.0.1:{free_port()}"]\nmax_message_size = "1MiB"\n')
    message = big_message(1024 * 1024 + 1)
    with anyio.fail_after(TIMEOUT):
        daemon = await start_daemon(config)
        done = await sendmail(daemon.config, "a@example.com", stdin=message)
        assert done.code == 65, done
        assert (
            f"message of {len(message)} bytes exceeds the limit of 1048576 "
            "(smtp.max_message_size)" in done.err
        ), done
        messages, _ = await Spool.status_from_disk(daemon.spool_dir)
        assert messages == []


async def test_below_min_free_space_sendmail_exits_75_until_there_is_room(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    set_config_value(config, "flush_timeout", '"1s"\nmin_free_space = "1000000GiB"')
    with anyio.fail_after(TIMEOUT * 2):
        daemon = await start_daemon(config)
        done = await sendmail(config, "rcpt@example.com", stdin=b"Subject: x\n\nx\n")
        assert done.code == 75, done
        assert "spool.min_free_space" in done.err
        messages, _ = await Spool.status_from_disk(daemon.spool_dir)
        assert messages == []

        set_config_value(config, "min_free_space", '"64MiB"')  # room again: a reload
        daemon.send_signal(signal.SIGHUP)
        await daemon.wait_log(lambda line: line.get("event") == "reloaded")
        done = await sendmail(config, "rcpt@example.com", stdin=b"Subject: x\n\nx\n")
        assert done.code == 0, done
        assert len(await waiting_messages(daemon.spool_dir, 1)) == 1


async def test_without_a_submission_socket_an_admin_submits_on_the_admin_socket(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """A daemon from before the submission socket (not restarted since an
    upgrade) has only its admin socket: sendmail run by someone who may use
    it hands the message over there, rather than failing every cron mail."""
    with anyio.fail_after(TIMEOUT):
        daemon = await daemon_with_unreachable_hop(tmp_path, start_daemon)
        (tmp_path / "run" / "submit.sock").unlink()  # as an older daemon has none
        done = await sendmail(
            daemon.config, "-f", "cron@example.org", "ops@example.com", stdin=b"Subject: c\n\nc\n"
        )
        assert done.code == 0, done
        (msg,) = await waiting_messages(daemon.spool_dir, 1)
    assert msg.envelope_info.recipients == ["ops@example.com"]


# -----------------------------------------------------------------------------
# The sendmail-compatible command line: the flags that cron, mail(1), PHP
# and git send-email give (read by :func:`spoold.daemon.sendmail.parse_args`),
# what it refuses (exit 64), and the modes besides delivery (``-bp``/``mailq``,
# ``-q``, ``--help``) end to end. Delivery itself, as a user who is not an
# admin, is in tests/test_submission_socket.py; the message handling
# (``-t``, dots, addresses) above.


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (  # Debian's cron
            ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
            SendmailArgs(ignore_dots=True, full_name="CronDaemon", recipients=["root"]),
        ),
        (  # bsd-mailx
            ["-i", "--", "a@example.com", "b@example.net"],
            SendmailArgs(ignore_dots=True, recipients=["a@example.com", "b@example.net"]),
        ),
        (  # mail -r
            ["-i", "-r", "s@example.org", "--", "a@example.com"],
            SendmailArgs(ignore_dots=True, sender="s@example.org", recipients=["a@example.com"]),
        ),
        (["-t", "-i"], SendmailArgs(from_headers=True, ignore_dots=True)),  # PHP
        (["-ti"], SendmailArgs(from_headers=True, ignore_dots=True)),  # grouped
        (  # git send-email
            ["-i", "-f", "dev@example.org", "a@example.com"],
            SendmailArgs(ignore_dots=True, sender="dev@example.org", recipients=["a@example.com"]),
        ),
        (
            ["-fdev@example.org", "-oi", "a"],
            SendmailArgs(ignore_dots=True, sender="dev@example.org", recipients=["a"]),
        ),
        (["-o", "i", "a"], SendmailArgs(ignore_dots=True, recipients=["a"])),
        (["a", "-v", "b"], SendmailArgs(verbose=True, recipients=["a", "b"])),  # any order
        (["--", "-odd@example.com"], SendmailArgs(recipients=["-odd@example.com"])),
        (["-bm", "-odb", "-oee", "-n", "-m", "-U", "a"], SendmailArgs(recipients=["a"])),
        (
            ["-N", "never", "-R", "hdrs", "-V", "env1", "-h", "3", "a"],
            SendmailArgs(recipients=["a"]),
        ),
        (["-C", "/etc/x.toml", "a"], SendmailArgs(config="/etc/x.toml", recipients=["a"])),
        (["--idempotency-key", "k1", "a"], SendmailArgs(idempotency_key="k1", recipients=["a"])),
        (["--idempotency-key=k1", "a"], SendmailArgs(idempotency_key="k1", recipients=["a"])),
        (["-bp"], SendmailArgs(mode="list")),
        (["-q"], SendmailArgs(mode="queue_run")),
        (["-q15m"], SendmailArgs(mode="queue_run")),
        (["--help"], SendmailArgs(mode="help")),
    ],
)
def test_the_flags_programs_give_are_read(argv: list[str], expected: SendmailArgs) -> None:
    assert parse_args(argv) == expected


def test_the_name_mailq_lists_the_queue() -> None:
    assert parse_args([], "/usr/bin/mailq") == SendmailArgs(mode="list")
    assert parse_args([], "/usr/sbin/sendmail") == SendmailArgs()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["-x", "a"], "unknown option -x"),
        (["-ix", "a"], "unknown option -x"),
        (["--frobnicate"], "unknown option --frobnicate"),
        (["-f"], "-f needs a value"),
        (["-bs"], "-bs (SMTP on standard input) is not supported"),
        (["-bi"], "-bi (newaliases) is not supported"),
        (["-bd"], "-bd is not supported"),
        (["-bp", "a@example.com"], "takes no recipients"),
    ],
)
def test_what_is_not_sendmails_or_not_here_is_named(argv: list[str], named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        parse_args(argv)


def entry_point(
    directory: Path, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``sendmail ARGS``: the ``spoold-sendmail`` console script's code
    (:func:`main`) in a script named ``sendmail``, as pip and install.sh
    put it (what it does and says follows that name)."""
    script = directory / "sendmail"
    if not script.exists():
        script.write_text(
            f"#!{sys.executable}\nimport sys\nfrom spoold.daemon.sendmail import main\nmain()\n"
        )
        script.chmod(0o755)
    return subprocess.run(
        [str(script), *args],
        input=stdin,
        capture_output=True,
        timeout=WAIT_TIMEOUT,
        check=False,
        env=child_env(env),
    )


async def test_usage_errors_exit_64_and_send_nothing(tmp_path: Path) -> None:
    done = await anyio.to_thread.run_sync(
        functools.partial(entry_point, tmp_path, "-x", "a@example.com", stdin=b"Subject: x\n\nx\n")
    )
    assert done.returncode == EX_USAGE
    assert done.stderr.decode() == "sendmail: unknown option -x (see --help)\n"
    via_spoold = await anyio.to_thread.run_sync(
        functools.partial(cli, "sendmail", "-bs", stdin=b"")
    )
    assert via_spoold.code == EX_USAGE
    assert via_spoold.err.startswith("spoold: -bs (SMTP on standard input) is not supported")


async def test_q_and_help_exit_0_without_a_daemon(tmp_path: Path) -> None:
    socket = str(tmp_path / "nothing-here.sock")
    queue_run = await anyio.to_thread.run_sync(
        functools.partial(entry_point, tmp_path, "-q", env={"SPOOLD_SUBMISSION_SOCKET": socket})
    )
    assert (queue_run.returncode, queue_run.stdout, queue_run.stderr) == (0, b"", b"")
    shown = await anyio.to_thread.run_sync(functools.partial(cli, "sendmail", "--help"))
    assert shown.code == 0
    assert "-bp         list the queue, as mailq" in shown.out


async def test_mailq_of_an_empty_queue_says_so(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    with anyio.fail_after(WAIT_TIMEOUT * 2):
        daemon = await start_daemon(write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"]))
        listed = await anyio.to_thread.run_sync(
            functools.partial(cli, "--config", str(daemon.config), "sendmail", "-bp")
        )
    assert (listed.code, listed.out, listed.err) == (0, "Mail queue is empty\n", "")


async def test_sendmail_with_no_daemon_names_the_submission_socket_and_exits_75(
    tmp_path: Path,
) -> None:
    """Found without the config (a user who may not read it): the
    environment's socket, else the default one."""
    socket = tmp_path / "submit.sock"
    done = await anyio.to_thread.run_sync(
        functools.partial(
            entry_point,
            tmp_path,
            "a@example.com",
            stdin=b"Subject: x\n\nx\n",
            env={"SPOOLD_SUBMISSION_SOCKET": str(socket)},
        )
    )
    assert done.returncode == 75
    assert done.stderr.decode() == (
        f"sendmail: message not accepted: no daemon: control socket {socket} does not exist\n"
    )
