"""An attempt that breaks in a way nobody planned for (a relay that hands
back something that is not an outcome, a disk layer raising something other
than an OS error): the message is never lost nor stuck. Its record goes
back from ``active/.checkout`` to ``active/``, it waits a minute (on the
fake clock) and the next attempt delivers it.

Without the release of the checked-out record (``Spool._recover_from_failed_attempt``)
the record stays in ``.checkout`` and every later attempt fails to check
it out again: these tests fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from spoold.message import Message, SendAt
from spoold.relay import AttemptFailed, BodyHandle, RecipientResult, RelayOutcome
from spoold.testing import FakeClock, Faults, InMemoryRelay
from tests.spool_helpers import (
    MINUTE,
    OK,
    START,
    TRY_LATER,
    batch,
    is_delivered,
    open_spool,
    places,
    status_of,
)
from tests.support import wait_until

TIMEOUT = 10.0


class NotAnOutcomeOnce:
    """A relay with a bug: its first attempt returns ``None`` instead of an
    outcome; after that it delivers (through an in-memory relay)."""

    def __init__(self) -> None:
        self.calls = 0
        self.inner = InMemoryRelay()

    async def relay(
        self, message: Message, body: BodyHandle, recipients: Sequence[str]
    ) -> RelayOutcome:
        self.calls += 1
        if self.calls == 1:
            not_an_outcome: Any = None
            return not_an_outcome
        outcome: RelayOutcome = await self.inner.relay(message, body, recipients)
        return outcome


async def test_a_relay_returning_no_outcome_releases_the_record_and_retries(
    tmp_path: Path,
) -> None:
    relay = NotAnOutcomeOnce()
    clock = FakeClock(START)
    with anyio.fail_after(TIMEOUT):
        async with open_spool(tmp_path, relay, clock) as spool:
            (mid,) = await spool.add(batch("rcpt@example.com"))

            # The attempt broke: the record is back in its queue, nothing
            # stays checked out, and it waits one minute (in memory).
            await wait_until(
                lambda: (
                    places(tmp_path, mid) == ["active"]
                    and status_of(spool, mid) == SendAt(at=START + MINUTE)
                ),
                lambda: (
                    f"{mid} back in active/ and due in a minute: "
                    f"{places(tmp_path, mid)} {status_of(spool, mid)}"
                ),
            )
            assert not any((tmp_path / "active" / ".checkout").iterdir())
            assert relay.inner.delivered == []

            clock.advance(MINUTE)
            await wait_until(
                lambda: is_delivered(spool, tmp_path, mid),
                lambda: f"{mid} delivered by the retry: {places(tmp_path, mid)}",
            )
            assert relay.calls == 2
            assert [rcpt for _, rcpt, _ in relay.inner.delivered] == ["rcpt@example.com"]
            assert await spool.ondisk.check(max_age=0) == []


async def test_an_unexpected_error_writing_the_outcome_releases_the_record_and_retries(
    tmp_path: Path,
) -> None:
    """The hop defers the first attempt; writing that outcome raises an
    error that is not a StoreError (so it is not retried as a disk error):
    the attempt breaks after its record was checked out."""
    answers: list[RecipientResult | AttemptFailed] = [TRY_LATER]
    relay = InMemoryRelay(respond=lambda _m, _r: answers.pop(0) if answers else OK)
    faults = Faults()
    added = False  # enqueue writes a record too: the fault waits for the attempt's
    faults.fail(
        "write_record", RuntimeError("a bug in the disk layer"), times=1, when=lambda: added
    )
    clock = FakeClock(START)
    with anyio.fail_after(TIMEOUT):
        async with open_spool(tmp_path, relay, clock, on_step=faults) as spool:
            (mid,) = await spool.add(batch("rcpt@example.com"))
            added = True  # no await since add returned: no attempt has run yet
            await wait_until(
                lambda: (
                    faults.raised["write_record"] == 1
                    and places(tmp_path, mid) == ["active"]
                    and status_of(spool, mid) == SendAt(at=START + MINUTE)
                ),
                lambda: (
                    f"{mid} back in active/ after the broken write: "
                    f"{places(tmp_path, mid)} {status_of(spool, mid)} {faults.raised}"
                ),
            )
            assert not any((tmp_path / "active" / ".checkout").iterdir())
            assert relay.delivered == []

            clock.advance(MINUTE)
            await wait_until(
                lambda: is_delivered(spool, tmp_path, mid),
                lambda: f"{mid} delivered by the retry: {places(tmp_path, mid)}",
            )
            assert [rcpt for _, rcpt, _ in relay.delivered] == ["rcpt@example.com"]
            assert await spool.ondisk.check(max_age=0) == []
