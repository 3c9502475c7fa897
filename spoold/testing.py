"""Test doubles for programs that use spoold (in the way ``trio.testing`` is).

* :class:`FakeClock`: a :class:`~spoold.clock.Clock` that moves only when
  the test calls :meth:`FakeClock.advance`, so schedules are tested without
  sleeping;
* :class:`InMemoryRelay`: a :class:`~spoold.relay.Relay` that answers each
  recipient as the test says and keeps what it delivered, optionally holding
  attempts at a gate;
* :class:`Faults`: a fault injector for the spool's filesystem steps, given
  to ``Spool.open(on_step=...)`` (or ``OnDiskSpool.open``): it raises the
  error a test chose at a named step (``write_body``, ``write_record``,
  ``rename_record``, ``fsync_dirs``, ``unlink_record``, ... : see
  :mod:`spoold.store`), for as long as the test wants.

None of this is used by spoold itself.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import anyio

from spoold.message import Message
from spoold.relay import AttemptFailed, BodyHandle, Delivery, RecipientResult, RelayOutcome
from spoold.times import utcnow

__all__ = ["FakeClock", "InMemoryRelay", "Responder", "Faults"]


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


Responder = Callable[[Message, str], RecipientResult | AttemptFailed]


@dataclass
class InMemoryRelay:
    """A relay for tests: answers each recipient by ``respond`` (default 250)
    and keeps what it delivered. While ``gate`` is not set, attempts wait on
    it (to hold messages in ``sending``)."""

    respond: Responder = field(default=lambda _m, _r: RecipientResult(250, "ok"))
    gate: anyio.Event | None = None
    delivered: list[tuple[str, str, bytes]] = field(default_factory=list)
    attempts: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    started: anyio.Event = field(default_factory=anyio.Event)

    async def relay(
        self, message: Message, body: BodyHandle, recipients: Sequence[str]
    ) -> RelayOutcome:
        self.attempts.append((message.id, tuple(recipients)))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        wire = (await body.read()).wire
        results: dict[str, RecipientResult] = {}
        for rcpt in recipients:
            answer = self.respond(message, rcpt)
            if isinstance(answer, AttemptFailed):
                return answer
            results[rcpt] = answer
            if answer.accepted:
                self.delivered.append((message.id, rcpt, wire))
        return Delivery(results, hop="memory")


@dataclass
class _Rule:
    step: str
    error: Callable[[], BaseException]
    times: int | None
    when: Callable[[], bool] | None


class Faults:
    """Raise chosen errors at named filesystem steps of the store.

    ``faults.fail("write_record", OSError(errno.ENOSPC, "No space left"))``
    makes every ``write_record`` step raise until :meth:`clear`;
    ``times=N`` limits it to the next N, ``when=`` to the moments a
    condition holds. Calls come from the store's worker threads.
    :attr:`seen` counts every step passed, :attr:`raised` every error
    raised, by step.
    """

    def __init__(self) -> None:
        self._rules: list[_Rule] = []
        self.seen: Counter[str] = Counter()
        self.raised: Counter[str] = Counter()
        self._lock = threading.Lock()

    def fail(
        self,
        step: str,
        error: BaseException | Callable[[], BaseException],
        *,
        times: int | None = None,
        when: Callable[[], bool] | None = None,
    ) -> None:
        if isinstance(error, BaseException):
            instance = error

            def make() -> BaseException:
                return instance

        else:
            make = error
        self._rules.append(_Rule(step, make, times, when))

    def clear(self, step: str | None = None) -> None:
        """Stop failing (at ``step``, or everywhere)."""
        self._rules = [r for r in self._rules if step is not None and r.step != step]

    def __call__(self, step: str) -> None:
        with self._lock:  # two threads may count, or take the last of ``times``
            self.seen[step] += 1
            for rule in self._rules:
                if rule.step != step or (rule.when is not None and not rule.when()):
                    continue
                if rule.times is not None:
                    if rule.times <= 0:
                        continue
                    rule.times -= 1
                self.raised[step] += 1
                error = rule.error()
                break
            else:
                return
        raise error
