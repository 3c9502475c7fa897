"""What a spool finds on disk when it opens: its index, and the messages in doubt.

:class:`Loading` reads ``active`` and ``frozen`` into the index (batch by
batch, records interned as they are decoded) and schedules each message;
it settles the messages an earlier owner was sending when it died.

Invariants:

* In doubt after a crash: a record found checked out when the spool is
  opened (an attempt was under way when the owner died), or stored as
  ``sending``, may already be at the next hop. It is marked ``in_doubt``
  on disk and, by ``after_crash``, sent again at once (``resend``: at least
  once) or frozen for an operator (``freeze``).
* The mark is written over the record where it was found, before the record
  goes back to a queue, so no failure leaves it there unmarked. A mark the
  disk refuses is tried again at each ping; the message is held meanwhile
  (never indexed, so never sent).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Container

from spoold.errors import NotFoundError, SpooldError, StoreError
from spoold.message import (
    SEND_NOW,
    Frozen,
    Message,
    Queue,
    Sending,
    SharedParts,
    gc_paused,
    queue_of,
)
from spoold.scheduler import Scheduler
from spoold.state import LOADED_QUEUES, Entry, SpoolState, log

__all__ = ["Loading"]


class Loading:
    """Loading the index at open and settling messages in doubt."""

    def __init__(self, state: SpoolState, scheduler: Scheduler) -> None:
        self._state = state
        self._disk = state.disk
        self._scheduler = scheduler

    async def load(
        self,
        cut_short: Container[str] = (),
        listed: Callable[[str], list[tuple[str, bool]] | None] | None = None,
    ) -> None:
        """Index and schedule every record of ``active`` and ``frozen``, batch
        by batch as they are read (so a large queue is built compactly: the
        temporaries of one batch are reused by the next). ``cut_short``: ids
        of ``active`` the store found (and left) checked out, an attempt
        under way when the last owner died: they, and records stored as
        ``sending``, are in doubt, and are settled once both queues are
        read (:meth:`settle_in_doubt`). ``listed``: a queue's listing made
        at open, taken once (:meth:`RecoveryReport.take_listing
        <spoold.store.RecoveryReport.take_listing>`): a queue of a million
        records is then not listed twice; a queue without one is listed."""
        shared = SharedParts()
        doubtful: list[Message] = []
        # Records found in the wrong queue are moved to the queue of their
        # status: one listed before the move (a listing kept from the open,
        # or a queue loaded already) would never show them.
        moved: list[Message] = []

        def index(messages: list[Message], queue: Queue) -> None:
            with gc_paused():
                for msg in messages:
                    if queue is Queue.ACTIVE and (
                        msg.id in cut_short or isinstance(msg.status, Sending)
                    ):
                        doubtful.append(msg)
                        continue
                    entry = Entry(msg, queue)
                    self._state.index_put(entry)
                    self._scheduler.schedule(entry)

        for queue in LOADED_QUEUES:
            if queue is not Queue.ACTIVE and not self._disk.usable(queue):
                continue  # reported below; the rest is served
            # Records are interned in the reading thread (one batch at a time:
            # ``shared`` is only ever used there), as soon as they are decoded.
            await self._disk.load(
                queue,
                on_batch=functools.partial(index, queue=queue),
                prepare=lambda m: m.intern(shared),
                names=None if listed is None else listed(queue.value),
                on_moved=moved.append,
            )
        for msg in moved:
            home = queue_of(msg.status)
            if home in LOADED_QUEUES and msg.id not in self._state.index:
                index([msg], home)
        for msg in doubtful:
            await self.settle_in_doubt(msg, checked_out=msg.id in cut_short)
        for path, why in self._disk.unusable().items():
            log.error("spool directory unusable; what it holds is skipped", path=path, error=why)
        log.info(
            "spool opened",
            spool_dir=str(self._disk.dir),
            active=self._state.queue_counts[Queue.ACTIVE],
            frozen=self._state.queue_counts[Queue.FROZEN],
            unsettled_in_doubt=len(self._state.unsettled),
        )

    async def settle_in_doubt(self, msg: Message, *, checked_out: bool) -> None:
        """A message whose attempt was cut by a crash: write it ``in_doubt``,
        due now (``after_crash = resend``) or frozen (``freeze``), then index
        it. The mark is written over the record where it was found (still
        checked out, or stored as ``sending``) before the record goes back to
        a queue, so no failure leaves it there unmarked. When the write fails
        (a full disk), the record stays as it was found, and so in doubt for
        the next open too; this spool keeps it aside, never sends it, and
        tries again at each ping (:meth:`settle_unsettled`)."""
        after_crash = self._state.parts.settings.after_crash
        new = msg.copy()
        new.in_doubt = True
        new.status = Frozen() if after_crash == "freeze" else SEND_NOW
        try:
            await self._disk.save(new, from_queue=Queue.ACTIVE, checked_out=checked_out)
        except StoreError as exc:
            if msg.id not in self._state.unsettled:
                log.error(
                    "message cut short by a crash cannot be marked in doubt yet; "
                    "it is held (never sent) and tried again at each ping",
                    id=msg.id,
                    flows=msg.flows,
                    error=str(exc),
                )
            self._state.unsettled[msg.id] = (msg, checked_out)
            return
        self._state.unsettled.pop(msg.id, None)
        log.warning(
            "message was being sent when the spool was last closed uncleanly; "
            "the next hop may already have it",
            id=new.id,
            flows=new.flows,
            after_crash=after_crash,
        )
        entry = Entry(new, Queue.FROZEN if isinstance(new.status, Frozen) else Queue.ACTIVE)
        self._state.index_put(entry)
        self._scheduler.schedule(entry)

    async def settle_unsettled(self) -> None:
        """Try again to mark the messages found in doubt whose mark the disk
        refused at open."""
        async with self._state.op_lock:
            for msg, checked_out in list(self._state.unsettled.values()):
                try:
                    await self.settle_in_doubt(msg, checked_out=checked_out)
                except NotFoundError:  # its record is gone (removed by hand)
                    self._state.unsettled.pop(msg.id, None)
                    log.warning("message held in doubt is no longer on disk", id=msg.id)
                except (SpooldError, OSError):
                    log.exception("could not settle a message in doubt", id=msg.id)
