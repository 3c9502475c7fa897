"""Numbers written in ASCII decimal digits, the way protocols, files, file
names and the environment write them.

:meth:`str.isdigit` is true of far more than ``0``-``9``: ``"²"`` and
``"١٢"`` (Arabic-Indic twelve) pass it. :func:`int` then refuses the one
(:class:`ValueError`) and reads the other as 12, and it also takes a sign,
surrounding spaces and ``_`` between digits. A number that comes from a peer
(``SIZE=`` of ``MAIL``, ``SIZE`` of an ``EHLO`` reply, an HTTP
``Content-Length``), a config value (a port, a Redis database), a name on
disk (a pid, an outbox entry) or the environment (systemd's ``LISTEN_FDS``,
``WATCHDOG_USEC``) is read with :func:`ascii_decimal` instead: one to
``max_digits`` of ``0``-``9`` and nothing else gives the number, anything
else None, so the caller refuses it with its own clear error. It never
raises.
"""

from __future__ import annotations

__all__ = ["ascii_decimal"]


def ascii_decimal(text: str, max_digits: int = 20) -> int | None:
    """The number ``text`` writes in 1 to ``max_digits`` ASCII digits
    (``"0042"`` is 42), or None for anything else (empty, a sign, a space,
    ``_``, a digit of another script, ``"²"``, too many digits)."""
    if 0 < len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None
