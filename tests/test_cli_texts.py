"""What the admin commands print for an operator: the retry plan's table
keeps its header over its columns, and help texts promise only what the
command does."""

from __future__ import annotations

from click.testing import CliRunner

from spoold.daemon.cli import main, retry_plan_attempt_lines


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
