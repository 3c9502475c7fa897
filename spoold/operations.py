"""The operator's operations on queued messages.

:class:`Operations` freezes, sends (thaws or kicks), removes, recovers,
reroutes and quarantines messages, and foresees a message's attempts
(:meth:`Operations.retry_plan`). Each operation runs under the operator
lock (one at a time, and no adoption of other processes' messages
meanwhile) and changes messages through :meth:`Transitions.change
<spoold.transitions.Transitions.change>`: written, then applied, then
published.

Invariants:

* An operation on a message that is being sent is refused with a clear
  error (:class:`~spoold.errors.OperationRefusedError`); the messages an
  operation takes are all busy from its start, each released once its own
  change is done (:meth:`Operations._each`).
* A change of status made here while a retry timer is pending wins: the
  change re-arms or cancels the timer, so a stale one never sends a frozen,
  removed or quarantined message.
* After :meth:`Spool.kill_and_flush <spoold.spool.Spool.kill_and_flush>`
  (and while closing) every operation is refused with
  :class:`~spoold.errors.SpoolClosedError`.
* :meth:`Operations.reroute` writes the new parts of a split message before
  it narrows the original: a crash in between may send to some recipients
  twice, never to none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import msgspec

from spoold.errors import NotFoundError, OperationRefusedError, RecordError
from spoold.events import EventKind
from spoold.ids import validate_id
from spoold.kinds import OutcomeKind
from spoold.message import (
    SEND_NOW,
    Frozen,
    Message,
    Quarantined,
    Queue,
    Removed,
    RetryInterval,
    RoutedBatch,
    RoutedEnvelope,
    message_for_envelope,
)
from spoold.ondisk import NewMessage
from spoold.outcome import RetryPlan, retry_plan
from spoold.scheduler import Scheduler
from spoold.state import Entry, Routes, SpoolState, log
from spoold.submission import OwnerSubmission
from spoold.transitions import Transitions

__all__ = ["Operations"]


class Operations:
    """The operator's operations (see the module's docstring)."""

    def __init__(
        self,
        state: SpoolState,
        scheduler: Scheduler,
        submission: OwnerSubmission,
        transitions: Transitions,
    ) -> None:
        self._parts = state.parts
        self._disk = state.disk
        self.clock = state.clock
        self._index = state.index
        self._adding = state.adding
        self._op_lock = state.op_lock
        self._index_put = state.index_put
        self._publish = state.publish
        self._refuse_if_closing = state.refuse_if_closing
        self._schedule = scheduler.schedule
        self._write_new = submission.write_new
        self._add_to_disk = submission.add_to_disk
        self._change = transitions.change
        self._record_final = transitions.record_final
        self.policy_for = transitions.policy_for

    def _lookup(self, ids: Iterable[str]) -> list[Entry]:
        entries = []
        for raw in dict.fromkeys(ids):  # an id given twice is handled once
            mid = validate_id(raw)
            entry = self._index.get(mid)
            if entry is None:
                raise NotFoundError(f"{mid}: no such message in active or frozen")
            entries.append(entry)
        return entries

    @staticmethod
    def _refuse_if_busy(entries: Sequence[Entry], verb: str) -> None:
        for e in entries:
            if e.busy:
                raise OperationRefusedError(
                    f"cannot {verb} {e.msg.id}: it is being sent; try again when the attempt ends"
                )

    async def freeze(self, ids: Iterable[str]) -> None:
        """Freeze messages in ``active`` (send_now or send_at)."""
        async with self._op_lock:
            self._refuse_if_closing("freeze")
            entries = self._lookup(ids)
            self._refuse_if_busy(entries, "freeze")
            for e in entries:
                if e.queue is not Queue.ACTIVE:
                    raise OperationRefusedError(f"cannot freeze {e.msg.id}: it is already frozen")
            await self._each(entries, lambda e: self._change(e, Frozen()))

    async def send(
        self,
        ids: Iterable[str] | None = None,
        *,
        which: Literal["ids", "all", "frozen_only"] = "ids",
        retry_intervals: Sequence[RetryInterval] = (),
    ) -> list[str]:
        """Send now: thaw frozen messages and kick delayed ones.

        ``which="all"`` takes every frozen and delayed message, ``"frozen_only"``
        every frozen one, ``"ids"`` (the default) the ones given. Failed
        recipients go back to remaining; ``retry_intervals`` are added at the
        head of each message's intervals. Returns the ids sent.
        """
        async with self._op_lock:
            self._refuse_if_closing("send")
            if which == "ids":
                if ids is None:
                    raise ValueError("send needs ids, or which='all' / 'frozen_only'")
                entries = self._lookup(ids)
                self._refuse_if_busy(entries, "send")
            elif which in ("all", "frozen_only"):
                entries = [
                    e
                    for e in self._index.values()
                    if not e.busy
                    and (e.queue is Queue.FROZEN or (which == "all" and e.msg.status != SEND_NOW))
                ]
            else:
                raise ValueError(f"send: unknown selection {which!r}")

            def edit(m: Message) -> None:
                m.move_failed_to_remaining()
                m.add_retry_intervals(retry_intervals)

            async def one(e: Entry) -> None:
                was_frozen = e.queue is Queue.FROZEN
                new = await self._change(e, SEND_NOW, edit=edit)
                e.kicked = True
                if was_frozen:
                    self._publish(EventKind.UNFROZEN, new)

            await self._each(entries, one)
            return [e.msg.id for e in entries]

    async def remove(self, ids: Iterable[str]) -> None:
        """Move frozen messages to ``removed``."""
        async with self._op_lock:
            self._refuse_if_closing("remove")
            entries = self._lookup(ids)
            self._refuse_if_busy(entries, "remove")
            for e in entries:
                if e.queue is not Queue.FROZEN:
                    raise OperationRefusedError(
                        f"cannot remove {e.msg.id}: only frozen messages can be removed "
                        "(freeze it first)"
                    )

            async def one(e: Entry) -> None:
                new = await self._change(e, Removed())
                self._record_final(new, OutcomeKind.REMOVED, detail="removed by an operator")

            await self._each(entries, one)

    async def recover(
        self, ids: Iterable[str], *, from_: Literal["removed", "quarantine"] | Queue
    ) -> None:
        """Bring messages back from ``removed`` or ``quarantine`` as frozen."""
        source = Queue(from_)
        if source not in (Queue.REMOVED, Queue.QUARANTINE):
            raise ValueError(f"recover takes messages from removed or quarantine, not {source}")
        async with self._op_lock:
            self._refuse_if_closing("recover")
            found: list[Message] = []
            for raw in dict.fromkeys(ids):
                mid = validate_id(raw)
                try:
                    found.append(await self._disk.read_message(source, mid))
                except NotFoundError:
                    raise NotFoundError(f"{mid}: no such message in {source}") from None
                except RecordError as exc:
                    raise OperationRefusedError(
                        f"cannot recover {mid}: its record cannot be read ({exc})"
                    ) from None
            for msg in found:
                new = msg.copy()
                new.status = Frozen()
                new.removed_at = None
                await self._disk.save(new, from_queue=source)
                if source is Queue.QUARANTINE:
                    await self._disk.clear_reason(source, new.id)
                entry = Entry(new, Queue.FROZEN)
                self._index_put(entry)
                self._publish(EventKind.RECOVERED, new, detail=source.value)

    async def reroute(
        self,
        ids: Iterable[str] | None = None,
        *,
        which: Literal["ids", "all"] = "ids",
    ) -> list[str]:
        """Route the remaining recipients of messages again through the
        current :attr:`routes` (``which="all"``: every message in active and
        frozen not being sent).

        Recipients that still go one way keep the message (new next hops
        and route, same id, status unchanged). Recipients that now go
        different ways split it: the first way keeps the message, each other
        way becomes a new message (new id; same body, parent id, flows,
        spool date, retry intervals and relay attempts; every part names the
        others in ``related_ids``; its envelope lists its own recipients).
        The original records where each recipient went
        (:attr:`Message.rerouted_to`), so its history line says
        ``rerouted``, not ``delivered``, for them. Failed recipients stay
        with the original message. Returns the ids of every resulting message. The new parts
        are written before the original is narrowed: a crash in between may
        send to some recipients twice, never to none.
        """
        routes = self._parts.routes
        if routes is None:
            raise OperationRefusedError("cannot reroute: this spool has no routes to ask")
        async with self._op_lock:
            self._refuse_if_closing("reroute")
            if which == "ids":
                if ids is None:
                    raise ValueError("reroute needs ids, or which='all'")
                entries = self._lookup(ids)
                self._refuse_if_busy(entries, "reroute")
            elif which == "all":
                entries = [e for e in self._index.values() if not e.busy]
            else:
                raise ValueError(f"reroute: unknown selection {which!r}")
            out: list[str] = []

            async def one(e: Entry) -> None:
                out.extend(await self._reroute_one(e, routes))

            await self._each(entries, one)
            return out

    async def _reroute_one(self, entry: Entry, routes: Routes) -> list[str]:
        msg = entry.msg
        if not msg.remaining_recipients:
            return [msg.id]
        envelopes = await routes.reroute(msg.copy())
        if not envelopes:
            raise OperationRefusedError(f"cannot reroute {msg.id}: the routes gave no way")
        first, *others = envelopes
        added: list[Message] = []
        if others:
            body = await self._disk.read_body(msg.id)
            status = msg.status

            def builder(env: RoutedEnvelope) -> Callable[[str, list[str]], Message]:
                def build(mid: str, related: list[str]) -> Message:
                    part = message_for_envelope(
                        env,
                        id=mid,
                        spool_date=msg.spool_date,
                        parent_id=msg.parent_id,
                        status=status,
                        flows=msg.flows,
                        relay_attempts=msg.relay_attempts,
                        related_ids=[*msg.related_ids, msg.id, *related],
                        size=len(body),
                    )
                    part.retry_intervals = list(msg.retry_intervals)
                    # Its own recipients only, as for a submission split by
                    # route: the others are not this part's to deliver.
                    part.envelope_info = msgspec.structs.replace(
                        msg.envelope_info, recipients=list(env.recipients)
                    )
                    return part

                return build

            added = await self._add_to_disk(
                [NewMessage(body, status, builder(env)) for env in others]
            )
        new_ids = [m.id for m in added]
        for part in added:  # live at once: if narrowing fails below, they still go
            part_entry = Entry(part, entry.queue)
            self._index_put(part_entry)
            self._schedule(part_entry)
            self._publish(EventKind.SPOOLED, part)
            log.info(
                "rerouted part spooled",
                id=part.id,
                flows=part.flows,
                parent_id=part.parent_id,
                split_from=msg.id,
                route=part.route,
                next_hops=part.next_hop_choices,
            )
        self._adding.difference_update(new_ids)

        def narrow(m: Message) -> None:
            m.remaining_recipients = list(first.recipients)
            m.next_hop_choices = list(first.next_hop_choices)
            m.route = first.route
            m.related_ids = list(dict.fromkeys([*m.related_ids, *new_ids]))
            moved = {rcpt: part.id for part in added for rcpt in part.remaining_recipients}
            if moved:
                m.rerouted_to = {**m.rerouted_to, **moved}

        new = await self._change(entry, msg.status, edit=narrow)
        self._publish(EventKind.REROUTED, new, detail=" ".join(new.next_hop_choices))
        log.info(
            "rerouted",
            id=new.id,
            flows=new.flows,
            route=new.route,
            next_hops=new.next_hop_choices,
            split_into=new_ids,
        )
        return [new.id, *new_ids]

    async def _each(self, entries: Sequence[Entry], fn: Callable[[Entry], Any]) -> None:
        """Apply ``fn`` to each entry in turn. All are busy from the start (no
        attempt may begin on one not yet changed), and each is released as
        soon as its own change is done, before the scheduler can look at the
        timer that change set."""
        pending = list(entries)
        for e in pending:
            e.busy = True
        try:
            while pending:
                e = pending[0]
                await fn(e)
                e.busy = False
                pending.pop(0)
        finally:
            for e in pending:  # not changed (an error stopped us): their timers
                e.busy = False  # may have been dropped while they were busy
                self._schedule(e)

    async def quarantine(
        self,
        reason: str,
        batch: RoutedBatch,
        *,
        flows: Sequence[str] = (),
        parent_id: str | None = None,
    ) -> list[str]:
        """Spool a submission straight into ``quarantine`` with ``reason``."""
        messages = await self._write_new(batch, Quarantined(reason=reason), flows, parent_id)
        for msg in messages:
            self._publish(EventKind.QUARANTINED, msg, detail=reason)
            log.warning("quarantined", id=msg.id, flows=msg.flows, reason=reason)
        self._adding.difference_update(m.id for m in messages)
        return [m.id for m in messages]

    def retry_plan(self, message_id: str) -> RetryPlan:
        """What would happen to a message of ``active`` or ``frozen`` if
        every attempt from now failed with a temporary error: its attempt
        times (with jitter bounds) and when it would freeze or bounce, by its
        retry intervals, lifetime and the current policy
        (:func:`spoold.outcome.retry_plan`). Sends nothing, reads no file."""
        mid = validate_id(message_id)
        entry = self._index.get(mid)
        if entry is None:
            raise NotFoundError(f"{mid}: no such message in active or frozen")
        msg = entry.msg.copy()
        return retry_plan(msg, now=self.clock.now(), policy=self.policy_for(msg))
