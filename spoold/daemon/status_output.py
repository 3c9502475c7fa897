"""How a listing of queued messages is printed: a table sized to the
terminal (rows cut or, with ``--wide``, wrapped), Exim's ``mailq`` lines, or
JSON, a page at a time (``spoold status``, ``mailq``).
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
import msgspec

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["StatusPrinter", "print_status", "age_text", "exim_size"]


def age_text(spool_date: str | None, now: datetime) -> str:
    if not spool_date:
        return "?"
    when = datetime.fromisoformat(spool_date.replace("Z", "+00:00"))
    seconds = int((now - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def exim_size(size: int | None) -> str:
    """A size the way ``exim -bp`` shows it: bytes up to 1 KiB, then K or M
    with one decimal below ten of them, five characters wide."""
    if size is None:
        return "    ?"
    if size < 1024:
        return f"{size:5d}"
    if size < 10 * 1024:
        return f"{size / 1024:4.1f}K"
    if size < 1024 * 1024:
        return f"{(size + 512) // 1024:4d}K"
    if size < 10 * 1024 * 1024:
        return f"{size / (1024 * 1024):4.1f}M"
    return f"{(size + 512 * 1024) // (1024 * 1024):4d}M"


def _last_error(view: dict[str, Any]) -> str:
    if view.get("quarantine_reason"):
        return str(view["quarantine_reason"])
    attempts = view.get("relay_attempts") or []
    return str(attempts[0]["error"]) if attempts else ""


def _table_row(v: dict[str, Any], now: datetime) -> tuple[str, ...]:
    status = v["status"]
    if status == "send_at":
        status = "at " + v["send_at"][11:19]
    if v.get("in_doubt"):
        status += " (in doubt)"
    envelope = v.get("envelope_info") or {}
    return (
        v["id"],
        status,
        age_text(v.get("spool_date"), now),
        exim_size(v.get("size")).strip(),
        str(len(v.get("remaining_recipients") or [])),
        (envelope.get("sender") or "<>") if envelope else "?",
        _last_error(v),
    )


def _exim_lines(v: dict[str, Any], now: datetime) -> list[str]:
    if v.get("unreadable"):
        return [
            f"{'?':>3} {exim_size(None)} {v['id']} <?> *** unreadable ***",
            f"          {v['quarantine_reason']}\n",
        ]
    sender = v["envelope_info"]["sender"]
    mark = {"frozen": " *** frozen ***", "quarantined": " *** quarantined ***"}.get(v["status"], "")
    if v.get("in_doubt"):
        mark += " *** in doubt ***"
    age = age_text(v.get("spool_date"), now)
    lines = [f"{age:>3} {exim_size(v.get('size'))} {v['id']} <{sender}>{mark}"]
    lines += [f"          {rcpt}" for rcpt in v["remaining_recipients"]]
    lines += [f"        F {rcpt}" for rcpt in v["failed_recipients"]]
    lines.append("")
    return lines


_TABLE_HEADS = ("ID", "STATUS", "AGE", "SIZE", "RCPTS", "SENDER", "LAST ERROR")
_SMALL_LISTING = 1000  # up to this many rows, one table sized to them all


class StatusPrinter:
    """Prints a listing as its pages come, holding at most one page (and,
    for the table, the first :data:`_SMALL_LISTING` rows: a listing no
    longer than that is one table sized to its rows, as always; a longer
    one goes on in columns sized from those first rows and the terminal,
    each row printed as it comes). ``qshape`` counts, then prints."""

    def __init__(self, fmt: str, wide: bool) -> None:
        from spoold.daemon.qshape import QueueShapeCounter

        self.fmt = fmt
        self.wide = wide
        self.now = datetime.now(UTC)  # one "now" for the whole listing
        self.count = 0
        self.shape = QueueShapeCounter(self.now)
        self.held: list[tuple[str, ...]] | None = []  # table rows, until it streams
        self.columns: _Columns | None = None

    def page(self, items: Sequence[Any]) -> None:
        self.count += len(items)
        out: list[str]
        if self.fmt == "json":  # compact, UTF-8: as the daemon sends each object
            encode = msgspec.json.encode
            blob = b"".join((v if isinstance(v, bytes) else encode(v)) + b"\n" for v in items)
            click.echo(blob, nl=False)
            return
        elif self.fmt == "id":
            out = [v if isinstance(v, str) else v["id"] for v in items]
        elif self.fmt == "exim":
            out = [line for v in items for line in _exim_lines(v, self.now)]
        elif self.fmt == "qshape":
            self.shape.add(items)
            return
        else:
            rows = [_table_row(v, self.now) for v in items]
            if self.held is not None:
                self.held += rows
                if len(self.held) <= _SMALL_LISTING:
                    return
                self.columns = _Columns(self.held, self.wide)
                rows, self.held = self.held, None
                out = self.columns.header()
            else:
                out = []
            assert self.columns is not None
            out += [line for row in rows for line in self.columns.row(row)]
        if out:
            click.echo("\n".join(out))

    def end(self) -> None:
        if self.fmt == "qshape":
            from spoold.daemon.qshape import render_queue_shape

            click.echo(render_queue_shape(self.shape.shape()))
        elif self.fmt == "table":
            if self.held is not None:
                _print_table(self.held, self.wide)
            click.echo(f"{self.count} message(s)")


def print_status(views: list[dict[str, Any]], fmt: str, wide: bool = False) -> None:
    """A whole listing at once (``mailq``)."""
    printer = StatusPrinter(fmt, wide)
    printer.page(views)
    printer.end()


def _terminal_width() -> int:
    return max(60, shutil.get_terminal_size((100, 24)).columns)  # COLUMNS when piped


def _column_fits(rows: Sequence[tuple[str, ...]], wide: bool) -> tuple[list[int], int]:
    """Widths of the columns but the last, and the room left for it."""
    fits = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(_TABLE_HEADS[:-1])]
    if not wide:
        fits[-1] = min(fits[-1], 24)  # a long sender is cut, not the error
    # Short columns keep their width; the last error takes what is left
    # (cut short here, whole and wrapped with --wide).
    left = _terminal_width() - sum(fits) - 2 * (len(_TABLE_HEADS) - 1)
    return fits, left


def _stacked(rows: Sequence[tuple[str, ...]], left: int) -> bool:
    """Whether the last errors go under their rows: the room left for the
    column is narrow and an error (or the column's head) does not fit."""
    return left < _MIN_ERROR_COLUMN and (
        left < len(_TABLE_HEADS[-1]) or any(len(r[-1]) > left for r in rows)
    )


class _Columns:
    """The table of a long listing, a row at a time, in plain text laid
    out as the small table is (two spaces between columns, a cell too long
    cut with "…"): widths from the rows given (the first of the listing)
    and the terminal, fixed from then on."""

    def __init__(self, first_rows: Sequence[tuple[str, ...]], wide: bool) -> None:
        self.wide = wide
        self.width = _terminal_width()
        fits, self.left = _column_fits(first_rows, wide)
        self.fits = [*fits[:1], max(fits[1], len("at 00:00:00")), *fits[2:]]
        self.stacked = _stacked(first_rows, self.left)

    def _line(self, cells: Sequence[str]) -> str:
        parts = [
            _cut(c, w) if len(c) > w else c.ljust(w) for c, w in zip(cells, self.fits, strict=False)
        ]
        return "  ".join(parts)

    def header(self) -> list[str]:
        if self.stacked:
            return [self._line(_TABLE_HEADS[:-1]).rstrip(), _ERROR_INDENT + _TABLE_HEADS[-1]]
        return [self._line(_TABLE_HEADS[:-1]) + "  " + _TABLE_HEADS[-1]]

    def row(self, row: tuple[str, ...]) -> list[str]:
        error = row[-1]
        if not self.stacked:
            last = error if self.wide or len(error) <= self.left else _cut(error, self.left)
            return [(self._line(row[:-1]) + "  " + last).rstrip()]
        lines = [self._line(row[:-1]).rstrip()]
        if error:
            room = self.width - len(_ERROR_INDENT)
            lines.append(_ERROR_INDENT + (error if self.wide else _cut(error, room)))
        return lines


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_table(rows: Sequence[tuple[str, ...]], wide: bool) -> None:
    """The listing as one table sized to its rows (a short listing)."""
    from rich.console import Console
    from rich.table import Table

    heads = _TABLE_HEADS
    width = _terminal_width()
    fits, left = _column_fits(rows, wide)
    table = Table(box=None, pad_edge=False, show_edge=False)
    for head, fit in zip(heads[:-1], fits, strict=True):
        # An ID is never cut (it is what the operator copies); the others
        # give way first on a narrow terminal.
        first = head == heads[0]
        table.add_column(
            head, no_wrap=True, width=fit, min_width=fit if first else None, overflow="ellipsis"
        )
    if _stacked(rows, left):
        # Too narrow for the errors (80 columns): each goes on a line of
        # its own under its message, with the whole width.
        _print_stacked(table, rows, width, wide)
    else:
        table.add_column(
            heads[-1], no_wrap=not wide, max_width=left, overflow="fold" if wide else "ellipsis"
        )
        for row in rows:
            table.add_row(*row)
        Console(width=width, soft_wrap=False).print(table)


_MIN_ERROR_COLUMN = 40  # narrower, and the last errors go under their rows
_ERROR_INDENT = "    "


def _print_stacked(table: Table, rows: Sequence[tuple[str, ...]], width: int, wide: bool) -> None:
    """The table without its last column, each row followed by its last
    error (if any) on its own indented line: cut to the width, or whole and
    wrapped with ``wide``."""

    from rich.console import Console

    for row in rows:
        table.add_row(*row[:-1])
    console = Console(width=width, soft_wrap=False)
    header, *lines = console.render_lines(table, console.options, pad=False)
    click.echo("".join(s.text for s in header).rstrip())
    click.echo(_ERROR_INDENT + "LAST ERROR")
    room = width - len(_ERROR_INDENT)
    for line, row in zip(lines, rows, strict=True):
        click.echo("".join(s.text for s in line).rstrip())
        error = row[-1]
        if not error:
            continue
        if wide:
            for part in textwrap.wrap(error, room, break_on_hyphens=False) or [""]:
                click.echo(_ERROR_INDENT + part)
        else:
            click.echo(_ERROR_INDENT + (error if len(error) <= room else error[: room - 1] + "…"))
