"""Logging: structlog for everything, stdlib loggers routed through it.

``configure(format, level)`` sets up JSON lines (``format="json"``, or
``"auto"`` when stderr is not a terminal) or a readable console. Stdlib
loggers (asyncio's among them) go through the same pipeline, so every
line has one shape. Calling it again (a reload) changes the level and
format in one step; tests may call it freely.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import structlog

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
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, set | frozenset):
        return sorted(str(v) for v in value)
    return str(value)


def configure(format: str = "auto", level: str = "info") -> None:
    json_lines = format == "json" or (format == "auto" and not sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
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
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
