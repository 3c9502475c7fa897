"""Clocks: the wall clock the spool schedules by, and a fake one for tests.

The spool only asks a clock two things: what time it is (aware UTC
datetimes, since ``send_at`` times are written to disk) and to wait until an
event is set or a deadline passes. :class:`FakeClock` moves only when a test
calls :meth:`FakeClock.advance`, so schedules are tested without sleeping.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol

import anyio

from spoold.times import utcnow

__all__ = ["Clock", "SystemClock", "FakeClock"]

# A wall-clock wait never lasts longer than this, so a jump of the system
# clock is noticed within that time.
_MAX_WAIT = 60.0


class Clock(Protocol):
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


class FakeClock:
    """A clock that stands still until :meth:`advance` is called."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or utcnow()
        self._waiters: list[tuple[datetime, anyio.Event]] = []

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta | float) -> None:
        if not isinstance(delta, timedelta):
            delta = timedelta(seconds=delta)
        self._now += delta
        for deadline, event in list(self._waiters):
            if deadline <= self._now:
                event.set()

    @property
    def next_deadline(self) -> datetime | None:
        """The earliest deadline someone is waiting for."""
        return min((d for d, _ in self._waiters), default=None)

    async def wait(self, event: anyio.Event, deadline: datetime | None) -> None:
        if deadline is not None and deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        timer = anyio.Event()
        entry = (deadline or datetime.max.replace(tzinfo=self._now.tzinfo), timer)
        self._waiters.append(entry)
        try:
            async with anyio.create_task_group() as tg:

                async def first(e: anyio.Event) -> None:
                    await e.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(first, event)
                tg.start_soon(first, timer)
        finally:
            self._waiters.remove(entry)
