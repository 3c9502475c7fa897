"""Times, spans and sizes: the small helpers every layer shares.

* :func:`utcnow` is the one source of "now" outside a :class:`~spoold.clock.Clock`
  (aware, UTC: every time spoold writes or shows is in UTC);
* :func:`rfc3339` is how a time is shown (``2026-11-24T03:40:30.533104Z``),
  in the JSON listing, the control protocol and the logs alike;
* :func:`parse_span` / :func:`format_span` read and write spans (``"30s"``,
  ``"5m"``, ``"2h"``, ``"1d"``, ``"1w"``, ``"250ms"`` or seconds), and
  :func:`parse_size` sizes (``"32MiB"``, ``"500KB"`` or bytes), as the
  config file, the CLI and the control protocol write them. A value that
  is not one raises :class:`ValueError` saying what was expected;
* :func:`format_size` is how a size is shown to an operator (``64 MiB``,
  ``12.3 MiB``, ``900 bytes``): every message about disk space uses it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

__all__ = ["utcnow", "rfc3339", "parse_span", "format_span", "parse_size", "format_size"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(t: datetime) -> str:
    """An aware time as RFC 3339 in UTC, e.g. ``2026-11-24T03:40:30.533104Z``."""
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


_SPAN_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.ASCII)
_SPAN_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_MAX_SPAN_SECONDS = 100 * 365 * 86400.0
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_span(value: object) -> timedelta:
    """``"30s"``, ``"5m"``, ``"2h"``, ``"1d"``, ``"1w"``, ``"250ms"`` or seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a span like '5m', got {value!r}")
    seconds: float | None = None
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"expected a span >= 0, got {value!r}")
        seconds = float(value)
    elif isinstance(value, str):
        m = _SPAN_RE.match(value)
        if m:
            seconds = float(m.group(1)) * _SPAN_UNITS[m.group(2)]
    if seconds is None:
        raise ValueError(f"expected a span like '30s', '5m', '2h' or '1d', got {value!r}")
    if not seconds <= _MAX_SPAN_SECONDS:  # also refuses inf and nan
        raise ValueError(f"span {value!r} is too long (at most 100 years)")
    return timedelta(seconds=seconds)


def format_span(span: timedelta) -> str:
    seconds = span.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def parse_size(value: object) -> int:
    """``"32MiB"``, ``"500KB"``, ``"1GB"`` or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    raise ValueError(f"expected a size like '32MiB' or a number of bytes, got {value!r}")


def format_size(size: int) -> str:
    """``size`` bytes in binary units as an operator reads them: whole
    (``64 MiB``, as the config writes it) or to one decimal (``12.3 MiB``);
    under 1 KiB in bytes (``900 bytes``)."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            if size % factor == 0:
                return f"{size // factor} {unit}"
            return f"{size / factor:.1f} {unit}"
    return f"{size} bytes"
