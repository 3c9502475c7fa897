"""Housekeeping: what the spool deletes when its time is up, and key repair.

:class:`Housekeeping` runs a round at open, then every ``interval`` on the
spool's clock (:meth:`Housekeeping.loop`): it deletes removed messages past
``removed_retention`` (counted from their removal), history journal files
past ``history_retention``, idempotency keys past ``idempotency_window``
and suppression list entries that have ended (the spool's
:class:`~spoold.state.SpoolSettings`, read at each round). A failed round
is logged and tried again at the next. At open, before anything is sent,
:meth:`Housekeeping.repair_keys` makes the key files name every queued
message submitted with a key (a crash may have come between the record and
its key file).

Invariants:

* Removed messages are deleted in batches, each under the operator lock and
  read again under it, so no ``recover`` of one of them runs meanwhile and
  a message recovered (or removed again) since the listing is kept.
* A removed message whose record does not say when it was removed (an
  older record) is given the time of the round once, then counted from it.
"""

from __future__ import annotations

from contextlib import suppress
from datetime import datetime

import anyio

from spoold.errors import NotFoundError, SpooldError
from spoold.history import History
from spoold.idempotency import KeyFiles
from spoold.message import Message, Queue
from spoold.state import SpoolState, log

__all__ = ["Housekeeping"]

_RETENTION_BATCH = 256  # removed messages deleted per thread hop (and per hold of the op lock)


class Housekeeping:
    """Retention of removed messages, history and keys (see the module's
    docstring)."""

    def __init__(self, state: SpoolState, history: History, keys: KeyFiles) -> None:
        self._parts = state.parts
        self._disk = state.disk
        self.clock = state.clock
        self._index = state.index
        self._op_lock = state.op_lock
        self._history = history
        self._keys = keys
        self._suppressions = state.suppressions

    async def loop(self) -> None:
        """Delete expired removed messages, history and keys: at open, then
        every ``housekeeping_interval`` on the spool's clock (a new one
        applies from the next round)."""
        never = anyio.Event()
        while True:
            try:
                await self.run_round()
            except (SpooldError, OSError):
                log.exception("housekeeping failed; trying again at the next round")
            await self.clock.wait(
                never, self.clock.now() + self._parts.settings.housekeeping_interval
            )

    async def run_round(self) -> dict[str, int]:
        """One housekeeping round now: delete the removed messages older
        than :attr:`removed_retention` (from their removal), the history
        older than :attr:`history_retention` and the idempotency keys older
        than :attr:`idempotency_window`, and the suppressions that have
        ended. Returns how many of each went."""
        now = self.clock.now()
        removed = await self._expire_removed(now)
        history = await self._history.prune(now, self._parts.settings.history_retention)
        keys = await self._keys.expire(now, self._parts.settings.idempotency_window)
        suppressions = await self._suppressions.prune(now, self._parts.settings.max_suppressed)
        if removed or history or keys or suppressions:
            log.info(
                "housekeeping",
                removed_deleted=removed,
                history_files=history,
                keys_expired=keys,
                suppressions_ended=suppressions,
            )
        return {
            "removed": removed,
            "history_files": history,
            "keys": keys,
            "suppressions": suppressions,
        }

    async def _expire_removed(self, now: datetime) -> int:
        messages, _unreadable = await self._disk.load(Queue.REMOVED)
        cutoff = now - self._parts.settings.removed_retention
        expired = []
        for msg in messages:
            if msg.removed_at is None:
                # Removed before records said when: count from now (one rewrite).
                msg.removed_at = now
                async with self._op_lock:
                    with suppress(NotFoundError):  # recovered meanwhile
                        await self._disk.save(msg, from_queue=Queue.REMOVED)
            elif msg.removed_at <= cutoff:
                expired.append(msg.id)
        deleted = 0
        for start in range(0, len(expired), _RETENTION_BATCH):
            batch = expired[start : start + _RETENTION_BATCH]
            async with self._op_lock:  # no recover() of these meanwhile
                # Read again under the lock: one may have been recovered (and
                # even removed again) since the listing.
                found = await self._disk.read_new(batch, (Queue.REMOVED,))
                still = [
                    mid
                    for mid, (_queue, m) in found.items()
                    if isinstance(m, Message)
                    and m.removed_at is not None
                    and m.removed_at <= cutoff
                ]
                deleted += await self._disk.delete_many(Queue.REMOVED, still)
        return deleted

    async def repair_keys(self) -> None:
        """At open: key files name every queued message submitted with a
        key (a crash may have come between the record and the key file)."""
        found = [
            (e.msg.idempotency_key, e.msg.id, e.msg.spool_date)
            for e in self._index.values()
            if e.msg.idempotency_key is not None
        ]
        if found:
            await self._keys.repair(
                found, self.clock.now(), self._parts.settings.idempotency_window
            )
