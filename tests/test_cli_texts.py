"""What the admin commands print for an operator: the retry plan's table
keeps its header over its columns, help texts promise only what the
command does, and reading the spool directory (no daemon) answers as the
daemon would: same exit code, same words."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner

from spoold.daemon.cli import main, retry_plan_attempt_lines
from spoold.errors import InsufficientStorageError
from spoold.testing import FakeClock
from spoold.times import format_size, utcnow
from tests.daemon_helpers import cli
from tests.spool_helpers import batch, open_spool, relay_answering
from tests.support import wait_until

MiB = 1024 * 1024


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


async def test_history_with_nothing_to_show_says_so(tmp_path: Path) -> None:
    async with open_spool(tmp_path, relay_answering({}), FakeClock(utcnow())):
        pass  # an empty spool: nothing ever left its queue
    run = functools.partial(cli, "--spool-dir", str(tmp_path), "history")
    done = await anyio.to_thread.run_sync(run)
    assert (done.code, done.out, done.err) == (0, "no outcomes in the last 1h\n", "")
    done = await anyio.to_thread.run_sync(run, "--since", "1d", "--recipient", "a@example.com")
    assert (done.code, done.out) == (0, "no outcomes for a@example.com in the last 1d\n")
    done = await anyio.to_thread.run_sync(run, "--format", "json")
    assert (done.code, done.out) == (0, "")  # JSON lines: none


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0 bytes"),
        (900, "900 bytes"),
        (1024, "1 KiB"),
        (4300, "4.2 KiB"),
        (64 * MiB, "64 MiB"),
        (12 * MiB + 300 * 1024, "12.3 MiB"),
        (1000000 * 1024 * MiB, "1000000 GiB"),
    ],
)
def test_sizes_are_shown_in_binary_units(size: int, shown: str) -> None:
    assert format_size(size) == shown


async def test_a_disk_space_refusal_shows_sizes_in_units(tmp_path: Path) -> None:
    async with open_spool(
        tmp_path, relay_answering({}), FakeClock(utcnow()), min_free_space=1000000 * 1024 * MiB
    ) as spool:
        with pytest.raises(InsufficientStorageError) as refused:
            await spool.add(batch("a@example.com"))
    text = str(refused.value)
    assert re.search(r": \d+(\.\d)? [KMG]iB free, 1000000 GiB must stay free \(spool", text), text
    assert re.search(r"after writing \d+ bytes; new mail is refused until space is freed$", text)
