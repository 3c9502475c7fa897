"""The library's logging: standard :mod:`logging`, with fields.

The library logs through stdlib loggers named ``spoold.*`` and nothing
else: it configures no handler, so a program that embeds spoold prints
nothing unless it configures logging itself (Python's last-resort handler
shows warnings and errors of a program that configured nothing; spoold
adds a :class:`logging.NullHandler` to its ``spoold`` logger so that one
stays quiet too). The daemon configures structlog and routes these records
through it (:mod:`spoold.daemon.logs`).

A line is an *event* (a short fixed text, e.g. ``"attempt done"``) plus
fields (``id=``, ``flows=``, ...), as :meth:`FieldLogger.info` takes them.
The record's message reads ``event key=value ...`` for plain logging
configurations; :func:`event_fields` gives a formatter the two apart (the
daemon's JSON lines carry each field as its own key).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

__all__ = ["FieldLogger", "LineWriter", "LogLine", "event_fields", "get_logger", "write_lines_with"]

logging.getLogger("spoold").addHandler(logging.NullHandler())


class LogLine:
    """A record's message: the event and its fields. ``str()`` renders
    ``event key=value ...`` (what :meth:`logging.LogRecord.getMessage`
    returns)."""

    __slots__ = ("event", "fields")

    def __init__(self, event: str, fields: Mapping[str, Any]) -> None:
        self.event = event
        self.fields = fields

    def __str__(self) -> str:
        if not self.fields:
            return self.event
        rendered = " ".join(f"{key}={_render(value)}" for key, value in self.fields.items())
        return f"{self.event} {rendered}"


def _render(value: Any) -> str:
    if isinstance(value, str):  # str(): an enum member by its value
        return repr(str(value))
    if isinstance(value, datetime):
        return value.isoformat()
    return repr(value)


def event_fields(record: logging.LogRecord) -> tuple[str, Mapping[str, Any]] | None:
    """The event and fields of a record the library logged (None for any
    other record)."""
    if isinstance(record.msg, LogLine):
        return record.msg.event, record.msg.fields
    return None


LineWriter = Callable[[logging.Logger, int, str, dict[str, Any]], bool]
"""``writer(logger, level, event, fields)``: True when it wrote the line,
False (leaving ``fields`` as they were) to have it go through
:mod:`logging`. ``fields`` is the line's own dict (its bound fields
included), the writer's to keep or change."""

_writer: LineWriter | None = None


def write_lines_with(writer: LineWriter | None) -> None:
    """Give each line the library logs to ``writer`` first (None: to
    :mod:`logging` alone, the default). A line with an exception
    (:meth:`FieldLogger.exception`) always goes through :mod:`logging`."""
    global _writer
    _writer = writer


class FieldLogger:
    """A stdlib logger that takes fields as keyword arguments:
    ``log.info("spooled", id=mid, flows=flows)``. ``bind(**fields)`` gives
    one that adds those fields to every line."""

    __slots__ = ("_bound", "_logger")

    def __init__(self, logger: logging.Logger, bound: Mapping[str, Any] | None = None) -> None:
        self._logger = logger
        self._bound: Mapping[str, Any] = bound or {}

    def bind(self, **fields: Any) -> FieldLogger:
        return FieldLogger(self._logger, {**self._bound, **fields})

    def _log(self, level: int, event: str, fields: dict[str, Any], exc_info: bool) -> None:
        logger = self._logger
        if logger.isEnabledFor(level):
            if self._bound:
                fields = {**self._bound, **fields}
            writer = _writer
            if writer is None or exc_info or not writer(logger, level, event, fields):
                logger.log(level, LogLine(event, fields), exc_info=exc_info, stacklevel=3)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields, False)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields, False)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields, False)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields, False)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the exception being handled."""
        self._log(logging.ERROR, event, fields, True)


def get_logger(name: str) -> FieldLogger:
    """The library's logger ``name`` (which starts with ``spoold.``)."""
    return FieldLogger(logging.getLogger(name))
