"""Logging: structlog for everything, stdlib loggers routed through it.

``configure(format, level)`` sets up JSON lines (``format="json"``, or
``"auto"`` when stderr is not a terminal) or a readable console. Stdlib
loggers (asyncio's among them) go through the same pipeline, so every
line has one shape. Calling it again (a reload) changes the level and
format in one step; tests may call it freely.

Only the daemon configures logging. The library logs through stdlib
loggers (:mod:`spoold.log`) with an event and fields; here each of its
lines becomes the same line structlog would have written (the fields as
keys, no ``logger`` key), so the daemon's output does not depend on which
side of the library/daemon line the code that logged is on.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime

import structlog
from structlog.types import EventDict, WrappedLogger

from spoold.log import event_fields
from spoold.times import rfc3339

__all__ = ["configure"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _json_default(value: object) -> object:
    """What the JSON renderer cannot encode itself: times as RFC 3339 UTC
    (as everywhere else in spoold), sets as lists, anything else as its
    text (never a Python repr)."""
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, set | frozenset):
        return sorted(str(v) for v in value)
    return str(value)


def _times_as_text(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """Times in a line's fields as RFC 3339 UTC text, in both formats (the
    console renderer would print their Python repr), also inside lists."""
    for key, value in event_dict.items():
        if isinstance(value, datetime):
            event_dict[key] = rfc3339(value)
        elif isinstance(value, list | tuple) and any(isinstance(v, datetime) for v in value):
            event_dict[key] = [rfc3339(v) if isinstance(v, datetime) else v for v in value]
    return event_dict


def _library_fields(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """A line the library logged (:mod:`spoold.log`): its fields as keys
    and its bare event, in the order structlog gives its own lines."""
    record = event_dict.get("_record")
    parts = event_fields(record) if isinstance(record, logging.LogRecord) else None
    if parts is None:
        return event_dict
    event, fields = parts
    rest = {key: value for key, value in event_dict.items() if key != "event"}
    return {**fields, "event": event, **rest}


def _logger_name_unless_library(
    logger: WrappedLogger, method: str, event_dict: EventDict
) -> EventDict:
    """Other stdlib lines (asyncio's) say which logger wrote them."""
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord) and event_fields(record) is not None:
        return event_dict
    return structlog.stdlib.add_logger_name(logger, method, event_dict)


def configure(format: str = "auto", level: str = "info") -> None:
    json_lines = format == "json" or (format == "auto" and not sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _times_as_text,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(default=_json_default)
        if json_lines
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(),
            exception_formatter=structlog.dev.plain_traceback,  # no locals: no secrets
        )
    )
    numeric = _LEVELS[level]
    # No line the daemon writes shows where in the source it was logged,
    # nor the thread or process: a record need not look them up (the
    # logging module's documented switches; a quarter of a line's cost).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info if json_lines else structlog.dev.set_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            _library_fields,
            *shared,
            _logger_name_unless_library,
            *([structlog.processors.format_exc_info] if json_lines else []),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
