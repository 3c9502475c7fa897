"""What the admin commands print for an operator: the retry plan's table
keeps its header over its columns, help texts promise only what the
command does, and reading the spool directory (no daemon) answers as the
daemon would: same exit code, same words."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
from click.testing import CliRunner

from spoold.daemon.cli import main, retry_plan_attempt_lines
from spoold.testing import FakeClock
from spoold.times import utcnow
from tests.daemon_helpers import cli
from tests.spool_helpers import batch, open_spool, relay_answering
from tests.support import wait_until


def test_the_retry_plan_header_sits_over_its_columns() -> None:
    attempts = [
        {
            "number": 1,
            "earliest": "2026-11-25T15:24:19.041457Z",
            "latest": "2026-11-25T15:24:19.041457Z",
            "conditional": False,
        },
        {
            "number": 12,
            "earliest": "2026-11-25T15:28:49Z",
            "latest": "2026-11-25T15:29:49.041457Z",
            "conditional": True,
        },
    ]
    header, first, second = retry_plan_attempt_lines(attempts)
    assert header.split() == ["#", "EARLIEST", "LATEST"]
    column = header.index("LATEST")
    assert header.index("EARLIEST") == first.index("2026") == second.index("2026")
    assert first[column:] == "2026-11-25T15:24:19.041457Z"
    assert second[column:] == "2026-11-25T15:29:49.041457Z  (only if not ended before)"
    assert second[:3] == " 12"


def test_the_retry_plan_header_alone_when_nothing_is_planned() -> None:
    assert retry_plan_attempt_lines([]) == ["  #  EARLIEST  LATEST"]


def test_sendmail_help_does_not_promise_output_for_a_repeated_key() -> None:
    # sendmail prints nothing on success, the first run or a repeat of its
    # key alike: the help said a repeat printed the first run's ids.
    done = CliRunner().invoke(main, ["sendmail", "--help"], terminal_width=200)
    assert done.exit_code == 0
    text = " ".join(done.output.split())
    assert "--idempotency-key KEY" in text
    assert "prints the first" not in text
    assert "nothing more is queued" in text
    assert "no output either way" in text


async def test_show_from_disk_exits_as_the_daemon_does(tmp_path: Path) -> None:
    async with open_spool(tmp_path, relay_answering({}), FakeClock(utcnow())) as spool:
        (mid,) = await spool.add(batch("a@example.com"))
        await wait_until(functools.partial(spool.find_outcome, mid), "delivery")
    run = functools.partial(cli, "--spool-dir", str(tmp_path))

    unknown = await anyio.to_thread.run_sync(run, "show", "8DsiUFeJ098b3CijH")
    assert (unknown.code, unknown.out) == (1, "")  # 1: no such message (docs/cli.md)
    assert unknown.err == "spoold: 8DsiUFeJ098b3CijH: no such message\n"

    # A delivered message is shown from the journal; its body cannot be.
    assert (await anyio.to_thread.run_sync(run, "show", mid)).code == 0
    body = await anyio.to_thread.run_sync(run, "show", "--body", mid)
    assert (body.code, body.out) == (1, "")
    assert body.err == f"spoold: {mid}: delivered; its body is gone\n"


def test_top_without_a_terminal_says_so() -> None:
    # Checked before the daemon is asked: no daemon is needed to see it.
    done = cli("--socket", "/nonexistent/ctl.sock", "top")
    assert (done.code, done.out) == (2, "")
    assert done.err == (
        "spoold: top needs a terminal (standard output is not one); "
        "for a script use status --format json, or count\n"
    )
