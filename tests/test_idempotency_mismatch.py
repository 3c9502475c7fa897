"""An idempotency key reused for a different message: the second message
must not vanish without a word. Today ``Spool.add`` (and with it
``spoold sendmail --idempotency-key`` and the control ``submit``) answers
the first message's ids and queues nothing, exit 0, so a script that
reuses a key by mistake (a fixed key per job, not per message) loses mail
silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from spoold.errors import IdempotencyKeyError
from spoold.testing import FakeClock
from tests.spool_helpers import START, TRY_LATER, batch, open_spool, relay_answering

KEY = "nightly-job"


@pytest.mark.xfail(
    strict=True,
    reason="a key seen before answers the first submission's ids whatever the new "
    "envelope is: a different message under a reused key is dropped silently",
)
async def test_a_reused_key_with_other_recipients_is_refused_not_dropped(
    tmp_path: Path,
) -> None:
    relay = relay_answering({"a@example.com": TRY_LATER, "b@example.com": TRY_LATER})
    async with open_spool(tmp_path, relay, FakeClock(START)) as spool:
        first = await spool.add(batch("a@example.com"), idempotency_key=KEY)
        with pytest.raises(IdempotencyKeyError):
            await spool.add(batch("b@example.com"), idempotency_key=KEY)
        assert [m.id for m in spool.status()] == first
