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

The lines written for every message (``accepted``, ``attempt done``) are
cheap: a library line is taken before any :class:`logging.LogRecord` is
made (:func:`spoold.log.write_lines_with`), a structlog line goes straight
from its processors to the output, and both are made into text in one step
(:class:`_Lines`: level, time, times as text, then JSON written here, or
structlog's console renderer). Only rare lines (an exception from the
library, other stdlib loggers) still go through :mod:`logging` and
structlog's :class:`~structlog.stdlib.ProcessorFormatter`; every path
writes the same text it always did (tests/test_daemon_logs_pinned.py).

The lines go to stderr (the journal, under systemd) through :class:`_Output`:
the lines of one event-loop turn are written together when the turn ends
(whole lines, at most ``PIPE_BUF`` bytes a write, so the ingest workers'
lines on the same pipe never cut into them; a line longer than that is one
write of its own size, as it always was). A line logged where no loop runs
(a thread's) is written at once, with the lines the loop still holds before
it, in order; lines held longer than :data:`_HELD_FOR` (a loop that hangs,
or a turn that runs long) are written by a flusher thread; what is still
held is written at exit and at each ``configure``. So a daemon that hangs
and is then killed (the watchdog's SIGABRT, a segfault) has written what
it logged before it hung, and what its threads logged since; only lines
of the last tenth of a second before such a kill, or before a SIGKILL, can
be lost. A write that fails loses its lines, never the daemon.

A library line goes through :mod:`logging` as before (and not the fast
path) when its logger or one above it has a filter or a handler of its own
(a hook's), or does not propagate (:func:`_plain`).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog
from structlog.types import EventDict, WrappedLogger

from spoold import log as library_log
from spoold.log import event_fields
from spoold.times import rfc3339

__all__ = ["configure", "flush"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# structlog's context variables, by name: none bound, none to merge (None:
# a structlog without it, always merged)
_CONTEXT_VARS: dict[str, object] | None = getattr(structlog.contextvars, "_CONTEXT_VARS", None)
if not isinstance(_CONTEXT_VARS, dict):  # another structlog's private name: always merged
    _CONTEXT_VARS = None
_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
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


# ------------------------------------------------------------ JSON, times


def _json_encoder() -> Callable[[object], str]:
    """``json.dumps(value, default=_json_default)``, without making an
    encoder for each line: the C encoder ``json.dumps`` makes, made once
    (no check for a list that holds itself: a line with one fails either
    way)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C speedups: the pure-Python encoder, made once
        return json.JSONEncoder(default=_json_default).encode
    encode = make(
        None,
        _json_default,
        json.encoder.encode_basestring_ascii,
        None,
        ": ",
        ", ",
        False,
        False,
        True,
    )
    return lambda value: "".join(encode(value, 0))


_json_line = _json_encoder()


def _render_json(logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
    return _json_line(event_dict)


_seconds: dict[object, str] = {}  # a second (seconds since 1970, or y/m/d/h/m/s) as text


def _second_text(key: object, second: datetime) -> str:
    text = _seconds.get(key)
    if text is None:
        if len(_seconds) >= 64:
            _seconds.clear()
        text = _seconds[key] = second.replace(microsecond=0, tzinfo=None).isoformat()
    return text


def _now_text() -> str:
    """Now, as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it
    (``datetime.now(UTC).isoformat()``, ``Z`` for ``+00:00``: no fraction
    when it is 0), the text of the second made once a second."""
    second, ns = divmod(time.time_ns(), 1_000_000_000)
    text = _seconds.get(second)
    if text is None:
        text = _second_text(second, datetime.fromtimestamp(second, UTC))
    us = ns // 1000
    return f"{text}.{us:06d}Z" if us else text + "Z"


def _utc_text(value: datetime) -> str:
    """:func:`~spoold.times.rfc3339` (``value.astimezone(UTC).isoformat()``,
    ``Z`` for ``+00:00``), the text of the second made once for a UTC time."""
    if type(value) is not datetime or value.tzinfo is not UTC:
        return rfc3339(value)
    key = (value.year, value.month, value.day, value.hour, value.minute, value.second)
    text = _seconds.get(key)
    if text is None:
        text = _second_text(key, value)
    us = value.microsecond
    return f"{text}.{us:06d}Z" if us else text + "Z"


# ---------------------------------------------------------------- output

_PIPE_BUF = 4096  # a write to a pipe of at most this many bytes is never cut
_HELD_LINES = 256  # written at once beyond this many in one turn
_HELD_FOR = 0.1  # seconds: lines held longer are written by the flusher
_AS_STDERR = "backslashreplace"  # how stderr encodes what its encoding cannot


class _Output:
    """Writes whole lines to ``stream``: those of one event-loop turn
    together when the turn ends, others at once (module docstring)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._held: list[str] = []
        self._held_since = 0.0  # time.monotonic() when the held lines began
        self._holds = 0  # times lines began to be held: the flusher's sign of activity
        self._turn: asyncio.AbstractEventLoop | None = None  # the loop that writes them
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)  # the flusher, lines to watch
        self._idle = False  # the flusher waits for lines (not for time)
        self._stopped = threading.Event()
        self._flusher: threading.Thread | None = None
        encoding = getattr(stream, "encoding", None) or "utf-8"
        self._encoding = "utf-8" if encoding.lower().replace("_", "-") == "utf8" else encoding

    def start(self) -> None:
        """Start the flusher: lines a blocked loop holds longer than
        :data:`_HELD_FOR` seconds are written without it."""
        self._flusher = threading.Thread(
            target=self._flush_held_long, name="spoold-logs", daemon=True
        )
        self._flusher.start()

    def stop(self) -> None:
        """Write every line still held and stop the flusher."""
        self._stopped.set()
        with self._lock:
            self._wake.notify()
            self._write_held()

    def write(self, line: str) -> None:
        """Write ``line`` (a newline added), now or when this turn ends."""
        with self._lock:
            held = self._held
            if not held:
                self._held_since = time.monotonic()
                self._holds += 1
            held.append(line)
            if len(held) >= _HELD_LINES:
                self._write_held()
                return
            loop = asyncio._get_running_loop()
            turn = self._turn
            if turn is not None:
                if turn is loop:
                    return
                if loop is None or turn.is_running():
                    # a thread (or another loop) while the loop holds lines:
                    # all written now, in order (a stuck loop's last lines)
                    self._write_held()
                    return
                self._turn = None  # its loop stopped before the turn ended
            if loop is None:
                self._write_held()
            else:
                self._turn = loop
                loop.call_soon(self._turn_ended)
                if self._idle:
                    self._idle = False
                    self._wake.notify()

    def flush(self) -> None:
        """Write every line still held."""
        with self._lock:
            self._write_held()

    def _turn_ended(self) -> None:
        with self._lock:
            self._turn = None
            self._write_held()

    def _flush_held_long(self) -> None:
        """The flusher: writes lines held :data:`_HELD_FOR` seconds (a loop
        that hung, or a turn that runs long). While lines keep being held
        it looks once per :data:`_HELD_FOR` (or when the held lines are
        due); once a whole :data:`_HELD_FOR` passes with none held, it
        sleeps until one is (the loop's one notify). So a busy loop that
        logs every turn costs it ten wake-ups a second, not one per turn
        (it went back to sleep after each turn's lines were written by the
        loop, and each next turn woke it again), and an idle one none."""
        stopped = self._stopped
        seen = 0  # self._holds at the last look
        while not stopped.is_set():
            with self._lock:
                if self._held:
                    delay = self._held_since + _HELD_FOR - time.monotonic()
                    if delay <= 0:  # held that long: the loop did not write them
                        self._write_held()
                        delay = _HELD_FOR
                elif self._holds != seen:  # lines came and went: look again later
                    delay = _HELD_FOR
                else:  # none since the last look: sleep until lines are held
                    if stopped.is_set():
                        return
                    self._idle = True
                    self._wake.wait()
                    continue
                seen = self._holds
            if stopped.wait(delay):
                return

    def _write_held(self) -> None:
        held, self._held = self._held, []
        if not held:
            return
        chunk: list[str] = []
        size = 0
        for line in held:
            length = 1 + (
                len(line) if line.isascii() else len(line.encode(self._encoding, _AS_STDERR))
            )
            if chunk and size + length > _PIPE_BUF:
                self._write(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += length
        self._write(chunk)

    def _write(self, lines: list[str]) -> None:
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001 (a closed or broken stderr: nowhere to say it)
            pass


class _StructlogOutput:
    """What structlog's loggers write to: the line its processors made."""

    def __init__(self, output: _Output) -> None:
        self._output = output

    def msg(self, line: str) -> None:
        self._output.write(line)

    debug = info = warning = warn = error = exception = critical = fatal = log = msg


class _Handler(logging.Handler):
    """The root logger's handler: a stdlib record, formatted, to the output."""

    def __init__(self, output: _Output) -> None:
        super().__init__()
        self.output = output

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 (as logging's own handlers do)
            self.handleError(record)
        else:
            self.output.write(line)

    def flush(self) -> None:
        self.output.flush()


# ----------------------------------------------------------------- lines


class _Lines:
    """Makes a line's text in one step, as structlog's processors did:
    context variables, level, time, times as text, the exception, then
    the renderer. The last processor of structlog's loggers, and the
    writer of the library's lines (:func:`spoold.log.write_lines_with`)."""

    def __init__(
        self,
        json_lines: bool,
        renderer: structlog.types.Processor,
        output: _Output,
        handler: logging.Handler,
    ) -> None:
        self._json_lines = json_lines
        self._renderer = renderer
        self._output = output
        self._handler = handler

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        """structlog's processor: the text of its line."""
        text = self.structlog_text(method, event_dict)
        if text is None:
            raise structlog.DropEvent
        return text

    def structlog_text(self, method: str, event_dict: EventDict) -> str | None:
        """The text of a structlog line (its logger's method name)."""
        if method == "exception":
            if not self._json_lines and "exc_info" not in event_dict:
                event_dict["exc_info"] = True  # structlog.dev.set_exc_info
            method = "error"  # the level structlog names it
        elif method == "warn":
            method = "warning"
        return self._text(method, event_dict)

    def structlog_line(self, method: str, event_dict: EventDict) -> None:
        """A structlog line, written (:func:`_daemon_logger`)."""
        text = self.structlog_text(method, event_dict)
        if text is not None:
            self._output.write(text)

    def library_line(
        self, logger: logging.Logger, level: int, event: str, fields: dict[str, Any]
    ) -> bool:
        """The library's line, written; False when the root logger has more
        handlers than the daemon's (a test's), which the record must reach."""
        handlers = logging.root.handlers
        if len(handlers) != 1 or handlers[0] is not self._handler or not _plain(logger):
            return False
        method = _LEVEL_NAMES.get(level) or logging.getLevelName(level).lower()
        fields["event"] = event
        text = self._text(method, fields)
        if text is not None:
            self._output.write(text)
        return True

    def _text(self, method: str, event_dict: EventDict) -> str | None:
        """The line's text; None when it cannot be made (said on stderr, as
        a stdlib handler says it; the line is lost, the caller goes on)."""
        try:
            if _CONTEXT_VARS is None or _CONTEXT_VARS:  # none bound: nothing to merge
                event_dict = structlog.contextvars.merge_contextvars(None, method, event_dict)
            event_dict["level"] = method
            event_dict["timestamp"] = _now_text()
            for key, value in event_dict.items():  # _times_as_text
                if type(value) in _PLAIN:
                    continue
                if isinstance(value, datetime):
                    event_dict[key] = _utc_text(value)
                elif isinstance(value, _SEQUENCES):
                    for item in value:
                        if isinstance(item, datetime):
                            event_dict[key] = [
                                _utc_text(v) if isinstance(v, datetime) else v for v in value
                            ]
                            break
            if self._json_lines and "exc_info" in event_dict:
                event_dict = structlog.processors.format_exc_info(None, method, event_dict)
            return self._renderer(None, method, event_dict)  # type: ignore[return-value]
        except Exception:  # noqa: BLE001 (a line that cannot be written stops nothing)
            if logging.raiseExceptions:
                _say_unwritable()
            return None


def _plain(logger: logging.Logger) -> bool:
    """Whether :mod:`logging` would hand ``logger``'s record to the root's
    handler alone, unchanged: no filter on the way (the root's and the
    handler's included), no handler but a :class:`logging.NullHandler`,
    every logger propagating. Checked on each line (a hook may add a filter
    at any time): a few attribute reads on a two-logger chain."""
    while True:
        if logger.filters:
            return False
        parent = logger.parent
        if parent is None:  # the root
            return not logger.handlers[0].filters
        for handler in logger.handlers:
            if type(handler) is not logging.NullHandler:
                return False
        if not logger.propagate:
            return False
        logger = parent


_PLAIN = frozenset({str, int, float, bool, type(None)})  # never a time, nor holds one
_SEQUENCES = (list, tuple)  # whose times become text too


def _say_unwritable() -> None:
    """What :meth:`logging.Handler.handleError` says of a line it cannot
    format: the exception, on stderr."""
    try:
        sys.stderr.write("--- Logging error ---\n")
        traceback.print_exc(file=sys.stderr)
    except Exception:  # noqa: BLE001 (stderr itself is gone)
        pass


# ------------------------------------------------------------- configure

_loggers: dict[int, type[Any]] = {}


def _daemon_logger(level: int) -> type[Any]:
    """structlog's logger that lets through ``level`` and above, whose line
    goes from the call to :class:`_Lines` in one step when that is its one
    processor (as the daemon configures it), not through structlog's
    generic chain; with other processors (a test's), as structlog does."""
    known = _loggers.get(level)
    if known is not None:
        return known
    base: Any = structlog.make_filtering_bound_logger(level)

    def _proxy_to_logger(
        self: Any, method_name: str, event: str | None = None, **event_kw: Any
    ) -> Any:
        processors = self._processors
        if type(processors) is list and len(processors) == 1:
            lines = processors[0]
            if type(lines) is _Lines:
                event_dict = self._context.copy()
                event_dict.update(event_kw)
                if event is not None:
                    event_dict["event"] = event
                lines.structlog_line(method_name, event_dict)
                return None
        return base._proxy_to_logger(self, method_name, event, **event_kw)

    made = _loggers[level] = type(base.__name__, (base,), {"_proxy_to_logger": _proxy_to_logger})
    return made


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


_output: _Output | None = None


def _flush_at_exit() -> None:
    if _output is not None:
        _output.stop()


atexit.register(_flush_at_exit)


def flush() -> None:
    """Write at once the lines held for the end of this loop turn: before
    the daemon tells another party (systemd's READY, RELOADING, STOPPING)
    of a state, so that what it logged on the way is already written."""
    if _output is not None:
        _output.flush()


def configure(format: str = "auto", level: str = "info") -> None:
    global _output
    if _output is not None:
        _output.stop()  # what the old settings let through, before the new ones
    json_lines = format == "json" or (format == "auto" and not sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _times_as_text,
    ]
    renderer: structlog.types.Processor = (
        _render_json
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
    output = _Output(sys.stderr)
    output.start()
    handler = _Handler(output)
    lines = _Lines(json_lines, renderer, output, handler)
    to_output = _StructlogOutput(output)
    structlog.configure(
        processors=[lines],
        logger_factory=lambda *args: to_output,
        wrapper_class=_daemon_logger(numeric),
        cache_logger_on_first_use=False,
    )
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                _library_fields,
                *shared,
                _logger_name_unless_library,
                *([structlog.processors.format_exc_info] if json_lines else []),
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    _output = output
    library_log.write_lines_with(lines.library_line)
