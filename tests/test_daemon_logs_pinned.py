"""The daemon's log lines, pinned byte for byte: operators parse them, so
each format (JSON lines and the console) writes today exactly what it
wrote before its path was made cheaper. Lines from the library
(spoold.log), from structlog loggers and from other stdlib loggers
(asyncio's), at each level, with fields of every type a line carries;
only the time of logging (and a traceback's file and line) are masked."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path, PurePosixPath

import pytest
import structlog

from spoold.daemon import logs
from spoold.log import get_logger
from tests.log_helpers import logging_kept


class Kind(StrEnum):
    DELIVERED = "delivered"


AT = datetime(2026, 12, 6, 11, 30, 27, 500000, tzinfo=UTC)
ROUND = datetime(2026, 12, 6, 11, 30, 27, tzinfo=UTC)
FIELDS = {
    "id": "8DsqySGkoCEZf4VCJ",
    "flows": ["f1", "f2"],
    "n": 3,
    "big": 2**70,
    "seconds": 0.0123,
    "ratio": 1e16,
    "neg": -2.5,
    "ok": True,
    "no": False,
    "none": None,
    "kind": Kind.DELIVERED,
    "at": AT,
    "round": ROUND,
    "tried": (AT, ROUND),
    "text": 'quote " back \\ tab \t nl \n é ✓ \x00',
    "names": {"a"},
    "table": {"k": [1, 2.5, None], "at": AT},
    "path": PurePosixPath("/var/spool"),
    "empty": [],
    "nested": [["x"], {"y": 1}],
    "inf": float("inf"),
    "nan": float("nan"),
}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    with logging_kept():
        yield


def emit() -> None:
    lib = get_logger("spoold.spool")
    slog = structlog.get_logger("spoold.smtp")
    lib.info("attempt done", **FIELDS)
    slog.info("accepted", **FIELDS)
    lib.debug("below the level", id="x")
    slog.debug("below the level", id="x")
    lib.bind(id="b1", flows=["f"]).warning("quarantined", reason="held for a test", id="b2")
    slog.bind(peer="127.0.0.1").error("refused", code=421)
    lib.error("plain error")
    slog.warning("plain warning")
    try:
        raise OSError("disk on fire")
    except OSError:
        lib.bind(id="x").exception("could not write", tried=[AT])
        slog.exception("could not write", id="x")
    logging.getLogger("asyncio").warning("from %s", "asyncio")
    logging.getLogger("asyncio").info("an %d", 5)
    structlog.contextvars.bind_contextvars(session="s1")  # one: their order is the context's
    try:
        lib.info("in a session", id="y")
        slog.info("in a session", id="y", session="s2")
        logging.getLogger("asyncio").warning("in a session")
    finally:
        structlog.contextvars.clear_contextvars()


TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z"


def masked(text: str) -> str:
    text = re.sub(r'File \\?"[^"\\]*\\?", line \d+', "File F, line N", text)
    return re.sub(f'"timestamp": "{TIME}"|^{TIME}', "TIME", text, flags=re.MULTILINE)


FIXTURES = Path(__file__).parent / "fixtures"


def pinned(fmt: str, level: str) -> list[str]:
    """The lines as this format wrote them before (fixtures/log_lines_*.txt,
    written at debug; at info the two debug lines are not there)."""
    text = (FIXTURES / f"log_lines_{fmt}.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if level == "debug" or "below the level" not in line]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("level", ["info", "debug"])
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_each_line_is_what_it_was(capsys: pytest.CaptureFixture[str], fmt: str, level: str) -> None:
    logs.configure(fmt, level)
    emit()
    written = capsys.readouterr().err
    assert masked(written).splitlines() == pinned(fmt, level)
    stamps = re.findall(
        f'"timestamp": "({TIME})"' if fmt == "json" else f"^({TIME}) ", written, re.M
    )
    assert len(stamps) == (15 if level == "debug" else 13)


@pytest.mark.usefixtures("restore_logging")
def test_a_reload_changes_format_and_level_for_the_next_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("json", "info")
    emit()
    logs.configure("console", "debug")
    emit()
    logs.configure("json", "warning")
    get_logger("spoold.spool").info("not shown")
    structlog.get_logger("spoold.smtp").info("not shown")
    get_logger("spoold.spool").warning("shown", id="w")
    written = masked(capsys.readouterr().err).splitlines()
    assert written == [
        *pinned("json", "info"),
        *pinned("console", "debug"),
        '{"id": "w", "event": "shown", "level": "warning", TIME}',
    ]
