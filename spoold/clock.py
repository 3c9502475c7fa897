"""Clocks: what the spool schedules by.

The spool only asks a clock two things (the :class:`Clock` protocol): what
time it is (aware UTC datetimes, since ``send_at`` times are written to
disk) and to wait until an event is set or a deadline passes. An
implementation may return from :meth:`Clock.wait` early; callers re-check.
:class:`SystemClock` is the wall clock; :class:`spoold.testing.FakeClock`
moves only when a test says so.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import anyio

from spoold.times import utcnow

__all__ = ["Clock", "SystemClock"]

# A wall-clock wait never lasts longer than this, so a jump of the system
# clock is noticed within that time.
_MAX_WAIT = 60.0


class Clock(Protocol):
    """The spool's time source. ``now()`` must be aware (UTC) and never go
    backwards by much; ``wait`` must return once ``event`` is set or
    ``deadline`` has passed, and may return earlier."""

    def now(self) -> datetime: ...

    async def wait(self, event: anyio.Event, deadline: datetime | None) -> None:
        """Return once ``event`` is set or ``deadline`` has passed (may also
        return early; callers re-check)."""


class SystemClock:
    def now(self) -> datetime:
        return utcnow()

    async def wait(self, event: anyio.Event, deadline: datetime | None) -> None:
        delay = _MAX_WAIT
        if deadline is not None:
            delay = min(delay, max(0.0, (deadline - utcnow()).total_seconds()))
        with anyio.move_on_after(delay):
            await event.wait()
