"""The daemon's log output: a line the library logs through the standard
``logging`` module (spoold.log) comes out exactly as the same line logged
through structlog did before the library stopped using structlog, in JSON
lines and on the console."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from spoold.daemon import logs
from spoold.log import get_logger
from tests.log_helpers import logging_kept

FIELDS: dict[str, Any] = {"id": "8DsqySGkoCEZf4VCJ", "flows": ["f1"], "delivered": 1}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    with logging_kept():
        yield


def without_time(line: str) -> str:
    return re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "TIME", line)


def log_both_ways() -> None:
    structlog.get_logger("spoold.spool").info("attempt done", **FIELDS)
    get_logger("spoold.spool").info("attempt done", **FIELDS)
    structlog.get_logger("spoold.spool").debug("below the level", **FIELDS)
    get_logger("spoold.spool").debug("below the level", **FIELDS)
    try:
        raise OSError("disk on fire")
    except OSError:
        structlog.get_logger("spoold.spool").exception("could not write", id="x")
        get_logger("spoold.spool").bind(id="x").exception("could not write")
    logging.getLogger("asyncio").warning("from %s", "asyncio")


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_are_the_same_either_way(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "info")
    log_both_ways()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 5
    old, new, old_error, new_error, foreign = lines
    assert list(new) == list(old) == [*FIELDS, "event", "level", "timestamp"]
    assert {**new, "timestamp": None} == {**old, "timestamp": None}
    assert (new["event"], new["level"], new["flows"]) == ("attempt done", "info", ["f1"])
    assert {**new_error, "timestamp": None} == {**old_error, "timestamp": None}
    assert new_error["exception"].endswith("OSError: disk on fire")
    assert (foreign["event"], foreign["logger"]) == ("from asyncio", "asyncio")


@pytest.mark.usefixtures("restore_logging")
def test_console_lines_are_the_same_either_way(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("console", "info")
    log_both_ways()
    err = capsys.readouterr().err
    blocks = re.split(r"\n(?=TIME )", without_time(err).strip())
    assert len(blocks) == 5, err
    old, new, old_error, new_error, foreign = blocks
    assert new == old
    assert new.startswith("TIME [info     ] attempt done") and "id=8DsqySGkoCEZf4VCJ" in new
    assert new_error == old_error and new_error.endswith("OSError: disk on fire")
    assert foreign.endswith("[asyncio]")


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fmt", ["console", "json"])
def test_times_are_rfc3339_text_in_either_format(
    capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    at = datetime(2026, 12, 6, 11, 30, 27, 500000, tzinfo=UTC)
    logs.configure(fmt, "info")
    structlog.get_logger("spoold.spool").info("delayed", id="8Dx", at=at, tried=[at])
    get_logger("spoold.spool").info("delayed", id="8Dx", at=at, tried=[at])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "datetime" not in line
        if fmt == "json":
            fields = json.loads(line)
            assert (fields["at"], fields["tried"]) == (
                "2026-12-06T11:30:27.500000Z",
                ["2026-12-06T11:30:27.500000Z"],
            )
        else:
            assert "at=2026-12-06T11:30:27.500000Z" in line
            assert "tried=['2026-12-06T11:30:27.500000Z']" in line
