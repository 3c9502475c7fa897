"""The sendmail-compatible command line: the flags that cron, mail(1), PHP
and git send-email give (read by :func:`spoold.daemon.sendmail.parse_args`),
what it refuses (exit 64), and the modes besides delivery (``-bp``/``mailq``,
``-q``, ``--help``) end to end. Delivery itself, as a user who is not an
admin, is in tests/test_submission_socket.py; the message handling
(``-t``, dots, addresses) in tests/test_sendmail.py.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from spoold.daemon.sendmail import EX_USAGE, SendmailArgs, parse_args
from tests.daemon_helpers import DaemonFactory, child_env, cli, write_config
from tests.support import WAIT_TIMEOUT, free_port


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
