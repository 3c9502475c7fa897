"""What the daemon's log tests share: the logging set-up put back afterwards."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import structlog


@contextlib.contextmanager
def logging_kept() -> Iterator[None]:
    """The root logger's handlers and level, and structlog's configuration,
    as they were before the block (a test configures the daemon's logging)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**config)
