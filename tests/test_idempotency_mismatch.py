"""An idempotency key reused for a different message: the second message
must not vanish without a word. A script that reuses a key by mistake (a
fixed key per job, not per message) gets a clear error, while a true retry
(same envelope) still gets the first submission's ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from spoold.errors import IdempotencyKeyError
from spoold.testing import FakeClock
from tests.spool_helpers import START, TRY_LATER, batch, open_spool, relay_answering

KEY = "nightly-job"


async def test_a_reused_key_with_other_recipients_is_refused_not_dropped(
    tmp_path: Path,
) -> None:
    relay = relay_answering({"a@example.com": TRY_LATER, "b@example.com": TRY_LATER})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        first = await spool.add(batch("a@example.com"), idempotency_key=KEY)
        with pytest.raises(IdempotencyKeyError):
            await spool.add(batch("b@example.com"), idempotency_key=KEY)
        assert [m.id for m in spool.status()] == first


async def test_a_retry_with_the_same_envelope_in_another_order_is_still_a_retry(
    tmp_path: Path,
) -> None:
    relay = relay_answering({"a@example.com": TRY_LATER, "b@example.com": TRY_LATER})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        first = await spool.add(batch("a@example.com", "b@EXAMPLE.com"), idempotency_key=KEY)
        again = await spool.add(batch("b@example.com", "a@example.com"), idempotency_key=KEY)
        assert again == first
        assert [m.id for m in spool.status()] == first
