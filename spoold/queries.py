"""Read-only views of the spool, and waiting for a message's outcome.

:class:`Queries` answers from memory what the index holds (``status``,
counts, snapshots: no file read, no body ever), reads ``removed`` and
``quarantine`` from disk for a message that is not in memory, subscribes to
the event stream, reads the history journal, and waits for a message's
outcome (:meth:`Queries.wait`, on the outcome board of
:mod:`spoold.waiting`). The functions :func:`status_from_disk`,
:func:`status_from_disk_pages` and :func:`count_from_disk` read a spool
directory without owning it (with or without a daemon running).

Invariants:

* Nothing here changes a message. The one write a query may cause is the
  adoption of a message another process added (:meth:`Queries.wait` asks
  the scheduler to adopt it, as a wake-up would have).
* A wait watches its message before it looks, so no outcome slips between
  the look and the watch; it ends with :class:`~spoold.errors.SpoolClosedError`
  when the spool closes first.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path

import anyio

from spoold.errors import NotFoundError, SpoolClosedError, WaitTimeoutError
from spoold.events import Subscription
from spoold.history import History, Outcome, RecipientState
from spoold.ids import validate_id
from spoold.kinds import OutcomeKind
from spoold.listing import SCAN_LIMIT, Listing
from spoold.message import (
    EnvelopeInfo,
    Frozen,
    Message,
    Quarantined,
    Queue,
    Removed,
    Sending,
    Status,
    gc_paused,
)
from spoold.ondisk import OnDiskSpool, Unreadable
from spoold.scheduler import Scheduler
from spoold.state import LOADED_QUEUES, SpoolState
from spoold.store import CHECKOUT
from spoold.waiting import MessageOutcome

__all__ = ["Queries", "status_from_disk", "status_from_disk_pages", "count_from_disk"]


class Queries:
    """The spool's read-only views and waits (see the module's docstring)."""

    def __init__(self, state: SpoolState, scheduler: Scheduler, history: History) -> None:
        self._state = state
        self._disk = state.disk
        self.clock = state.clock
        self._index = state.index
        self._queue_counts = state.queue_counts
        self._adding = state.adding
        self._hub = state.hub
        self._outcomes = state.outcomes
        self._adopt = scheduler.adopt
        self._history = history

    @property
    def waiters(self) -> int:
        """How many :meth:`wait` calls are waiting now."""
        return self._outcomes.watched

    @property
    def subscribers(self) -> int:
        """How many event subscriptions are open now."""
        return self._hub.subscriber_count

    def status(self) -> list[Message]:
        """Snapshots of every message in ``active`` and ``frozen``, by id.
        From memory: no file is read."""
        now = self.clock.now()
        out = []
        with gc_paused():
            for e in self._index.values():
                snap = e.msg.copy()
                if not e.busy:
                    snap.status = e.msg.effective_status(now)
                out.append(snap)
        out.sort(key=lambda m: m.id)
        return out

    def snapshot(self, message_id: str, now: datetime) -> Message | None:
        """What :meth:`status` lists of one message at ``now``, or None when
        it is not in ``active`` or ``frozen`` (any more): a paged listing
        takes :meth:`status_ids` once, then this for each id of a page."""
        entry = self._index.get(message_id)
        if entry is None:
            return None
        snap = entry.msg.copy()
        if not entry.busy:
            snap.status = entry.msg.effective_status(now)
        return snap

    def peek(self, message_id: str, now: datetime) -> tuple[Message, Status] | None:
        """The record of a message in ``active`` or ``frozen`` itself (no
        copy: to read at once, before any ``await``, and never to change or
        keep) and the status :meth:`status` shows for it at ``now``; None
        when it is not there (any more). For a listing of a large queue,
        where :meth:`snapshot`'s copy is most of the cost."""
        entry = self._index.get(message_id)
        if entry is None:
            return None
        msg = entry.msg
        return msg, msg.status if entry.busy else msg.effective_status(now)

    def status_ids(self, queue: Queue | None = None) -> list[str]:
        """The ids :meth:`status` would list (only those in ``queue``, when
        given: ``active`` or ``frozen``), sorted, without a snapshot of any
        message: what ``spoold status --format id`` needs of a large queue."""
        if queue is None:
            ids = list(self._index)
        else:
            ids = [mid for mid, e in self._index.items() if e.msg.queue is queue]
        ids.sort()
        return ids

    def counts(self) -> dict[Queue, int]:
        """How many messages each queue held in memory has (``active`` and
        ``frozen``). Kept up to date as messages move: no walk of the queue.
        How many of ``active`` are being sent now is :attr:`sending`."""
        return dict(self._queue_counts)

    def oldest_spool_dates(self) -> dict[Queue, datetime]:
        """The spool date of the oldest message of each queue held in
        memory (a queue with no message is left out). One pass over the
        index, nothing copied, no file read (for gauges refreshed often)."""
        oldest: dict[Queue, datetime] = {}
        for entry in self._index.values():
            when = entry.msg.spool_date
            seen = oldest.get(entry.queue)
            if seen is None or when < seen:
                oldest[entry.queue] = when
        return oldest

    async def get_message(self, message_id: str) -> Message:
        """A snapshot of one message, from memory or (removed, quarantine)
        from disk."""
        mid = validate_id(message_id)
        entry = self._index.get(mid)
        if entry is not None:
            return entry.msg.copy()
        for queue in (Queue.REMOVED, Queue.QUARANTINE):
            try:
                return await self._disk.read_message(queue, mid)
            except NotFoundError:
                continue
        raise NotFoundError(f"{mid}: no such message")

    async def describe(self, message_id: str) -> Message | Unreadable:
        """Like :meth:`get_message`, but a record that cannot be read (set
        aside in quarantine, or damaged in removed) is described by an
        :class:`~spoold.ondisk.Unreadable` instead of raising."""
        mid = validate_id(message_id)
        entry = self._index.get(mid)
        if entry is not None:
            return entry.msg.copy()
        return await self._disk.find(mid, (Queue.REMOVED, Queue.QUARANTINE))

    async def quarantined(self) -> tuple[list[Message], list[Unreadable]]:
        """What is in ``quarantine``, read from disk: the records that can
        be read, and the others with the reason they were set aside."""
        return await self._disk.load(Queue.QUARANTINE)

    def events(self, max_buffer: int | None = None) -> Subscription:
        """Subscribe to the event stream (``async for event in ...``).
        Use as ``async with spool.events() as stream`` to unsubscribe.
        The subscription starts when this returns: opened before
        :meth:`add`, it sees the message's ``spooled`` event and everything
        after it (the ordering is in :mod:`spoold.events`)."""
        return self._hub.subscribe(max_buffer)

    async def wait(self, message_id: str, timeout: float | None = None) -> MessageOutcome:  # noqa: ASYNC109
        """The outcome of a message (:class:`~spoold.waiting.MessageOutcome`):
        delivered, frozen (with its failed recipients), removed, quarantined
        or bounced; waits until it has one.

        Returns at once for a message that is frozen, removed or quarantined
        now, or that reached its outcome while this spool was open (the
        latest outcomes of the most recent messages are remembered). A
        message still in ``active`` is waited for; if an operator thaws a
        frozen message, a later ``wait`` waits for its next outcome.

        A message :meth:`reroute` split keeps its id for the part on the
        first way (its outcome is that part's: only its recipients); the
        other parts have new ids (what :meth:`reroute` returns, also in the
        record's ``related_ids``), each with its own outcome to wait for.
        No id is retired by a split, so no wait is left on a message that
        is gone.

        ``timeout``: seconds to wait at most (None: no limit; 0: look once);
        then it raises :class:`~spoold.errors.WaitTimeoutError` (a
        ``TimeoutError``). An id this spool knows nothing of raises
        :class:`~spoold.errors.NotFoundError`; a string that is not an id,
        :class:`~spoold.errors.InvalidIdError`. Raises
        :class:`~spoold.errors.SpoolClosedError` if the spool closes first.
        """
        mid = validate_id(message_id)
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        while True:
            if self._state.closed:
                raise SpoolClosedError(
                    f"spool {self._state.spool_dir} closed while waiting for {mid}"
                )
            change = self._outcomes.watch(mid)  # before looking: nothing slips between
            try:
                outcome = await self._outcome_now(mid)  # looking is not cut by the deadline
                if outcome is not None:
                    return outcome
                with anyio.move_on_at(deadline) as waiting:
                    await change.wait()
            finally:
                self._outcomes.unwatch(mid, change)
            if waiting.cancelled_caught:
                assert timeout is not None
                raise WaitTimeoutError(mid, timeout)

    async def _outcome_now(self, mid: str) -> MessageOutcome | None:
        """The outcome ``mid`` has now; None while it is still to be sent."""
        entry = self._index.get(mid)
        if entry is None and mid not in self._adding:
            remembered = self._outcomes.recent(mid)
            if remembered is not None:
                return remembered
            try:
                found = await self._disk.find(mid)
            except NotFoundError:
                found = None
            if isinstance(found, Unreadable):
                if found.queue is not Queue.QUARANTINE:
                    return None  # the next open sets it aside; its outcome comes then
                return MessageOutcome(mid, OutcomeKind.QUARANTINED, None, None, detail=found.reason)
            if found is not None and found.queue in LOADED_QUEUES:
                await self._adopt([mid])  # added by another process, not adopted yet
                entry = self._index.get(mid)
            elif found is not None:
                if isinstance(found.status, Removed):  # the journal says whether it bounced
                    journalled = await self._outcome_from_history(mid)
                    if journalled is not None and journalled.kind is OutcomeKind.BOUNCED:
                        return journalled
                return self._outcome_of_record(found)
            else:
                from_history = await self._outcome_from_history(mid)
                if from_history is not None:
                    return from_history
                raise NotFoundError(
                    f"{mid}: no such message: not in the spool, and no outcome remembered for it"
                )
        if entry is not None and entry.queue is Queue.FROZEN:
            remembered = self._outcomes.recent(mid)
            if remembered is not None and remembered.kind is OutcomeKind.FROZEN:
                return remembered
            return self._outcome_of_record(entry.msg)
        return None

    async def _outcome_from_history(self, message_id: str) -> MessageOutcome | None:
        """The outcome of a message that left the spool before it was opened
        (or so long ago that it is no longer remembered), from the spool's
        history journal; None when there is none."""
        found = await self.find_outcome(message_id)
        if found is None:
            return None
        failed = tuple(r.recipient for r in found.recipients if r.state is RecipientState.FAILED)
        return MessageOutcome(
            id=found.id,
            kind=found.outcome,
            time=found.time,
            envelope_info=EnvelopeInfo(
                sender=found.sender, recipients=[r.recipient for r in found.recipients]
            ),
            failed_recipients=failed,
            last_error=found.detail or None,
            detail=found.detail or None,
        )

    @staticmethod
    def _outcome_of_record(msg: Message) -> MessageOutcome | None:
        """The outcome a record stored now stands for (no time: the record
        does not say when it was reached); None for one still to be sent."""
        status = msg.status
        if isinstance(status, Frozen):
            return MessageOutcome.of(OutcomeKind.FROZEN, msg, None)
        if isinstance(status, Removed):
            return MessageOutcome.of(OutcomeKind.REMOVED, msg, None)
        if isinstance(status, Quarantined):
            return MessageOutcome.of(OutcomeKind.QUARANTINED, msg, None, status.reason)
        return None

    async def history(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        recipient: str | None = None,
    ) -> list[Outcome]:
        """Final outcomes journalled with ``since <= time <= until``,
        for ``recipient`` if given (any case), oldest first. Kept for
        :attr:`history_retention`; a crash may lose the last few."""
        return await self._history.query(since=since, until=until, recipient=recipient)

    async def find_outcome(self, message_id: str) -> Outcome | None:
        """The final outcome of a message that left the queue (the newest
        one, if it left twice), or None: still queued, never known, or
        past the history retention. The lookup for a message that is no
        longer in memory."""
        return await self._history.find(validate_id(message_id))


async def status_from_disk(
    spool_dir: str | Path,
    queues: Sequence[Queue] = tuple(Queue),
) -> tuple[list[Message], list[Unreadable]]:
    """Read messages straight from disk, with or without a daemon
    running; changes nothing. Checked-out records read as ``sending``."""
    ondisk, _ = await OnDiskSpool.open(spool_dir, owner=False, create=False)
    try:
        messages: list[Message] = []
        unreadable: list[Unreadable] = []
        for queue in queues:
            checked_out = {n for n, c in await ondisk.names(queue) if c}
            msgs, bad = await ondisk.load(queue)
            for m in msgs:
                if m.id in checked_out:
                    m.status = Sending()
            messages += msgs
            unreadable += bad
        messages.sort(key=lambda m: m.id)
        return messages, unreadable
    finally:
        await ondisk.close()


async def status_from_disk_pages(
    spool_dir: str | Path,
    queues: Sequence[Queue],
    on_page: Callable[[list[Message | Unreadable]], Awaitable[None]],
    *,
    keep: Callable[[Message | Unreadable], bool] = lambda _: True,
    after: str | None = None,
    limit: int | None = None,
) -> None:
    """:meth:`status_from_disk` a page at a time, for a large queue: the
    ids of ``queues`` are listed and sorted, then each page's records are
    read (one worker-thread hop) and handed to ``on_page``, those that
    ``keep`` keeps, in id order (see :class:`~spoold.listing.Listing`
    for ``after`` and ``limit``). A record that cannot be read comes as
    an :class:`~spoold.ondisk.Unreadable`. Memory holds the ids and one
    page. Changes nothing."""
    ondisk, _ = await OnDiskSpool.open(spool_dir, owner=False, create=False)
    try:
        checked_out: set[str] = set()
        ids: list[str] = []
        for queue in queues:
            for name, out in await ondisk.names(queue):
                ids.append(name)
                if out:
                    checked_out.add(name)
        ids.sort()
        found: dict[str, Message | Unreadable] = {}
        listing: Listing[Message | Unreadable] = Listing(
            ids, found.get, keep, after=after, limit=limit
        )
        window = ids[listing.position :]
        for start in range(0, len(window), SCAN_LIMIT):
            batch = window[start : start + SCAN_LIMIT]
            found.clear()
            for mid, (queue, read) in (await ondisk.read_new(batch, queues)).items():
                if isinstance(read, Message):
                    if mid in checked_out:
                        read.status = Sending()
                    found[mid] = read
                    continue
                reason = f"unreadable record: {read}"
                if queue is Queue.QUARANTINE:
                    reason = await ondisk.set_aside_reason(queue, mid) or reason
                where = f"{queue.value}/{CHECKOUT}" if mid in checked_out else queue.value
                found[mid] = Unreadable(mid, queue, ondisk.dir / where / mid, reason)
            stop = listing.position + len(batch)
            while not listing.done and listing.position < stop:
                page = listing.page(stop)
                if page:
                    await on_page(page)
            if listing.done:
                break
    finally:
        await ondisk.close()


async def count_from_disk(spool_dir: str | Path) -> dict[str, int]:
    """Records per queue from the directory listing alone, with
    ``sending`` (checked-out records) as the daemon counts it."""
    ondisk, _ = await OnDiskSpool.open(spool_dir, owner=False, create=False)
    try:
        active = await ondisk.names(Queue.ACTIVE)
        return {
            "active": len(active),
            "frozen": await ondisk.count(Queue.FROZEN),
            "sending": sum(1 for _, checked_out in active if checked_out),
            "removed": await ondisk.count(Queue.REMOVED),
            "quarantine": await ondisk.count(Queue.QUARANTINE),
        }
    finally:
        await ondisk.close()
