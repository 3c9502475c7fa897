"""What happens to one message: its attempt, and what the outcome does to it.

:class:`Transitions` holds the changes of one message, each written to disk
before it is applied in memory (:meth:`Scheduler.apply
<spoold.scheduler.Scheduler.apply>`), before its event is published and
before anything returns: an attempt (:meth:`Transitions.send`, what the
scheduler runs in a send job), a change of status (:meth:`Transitions.change`,
which the operator operations use too) and the journal line of a message
that leaves the queue (:meth:`Transitions.record_final`). A relay attempt
walks this module, the scheduler and the modules below them only.

An attempt: ask ``presend`` (default ``send_now``; its other choices are
written at once), check the record out, follow the route's current hops,
relay to the remaining recipients, ask ``on_error`` about each refusal,
then write what :func:`spoold.outcome.attempt_outcome` (a pure function)
decides, apply it and publish its event.

Invariants:

* A message is "busy" for the whole attempt; nothing else touches it then.
* The hop's answers are never thrown away: the outcome is kept in memory
  and its write retried with backoff until the disk takes it
  (:meth:`Transitions._save_outcome`); only a process that dies meanwhile
  sends again (at least once).
* A body that is not what was spooled (the record's ``size`` and
  ``body_sha256``, checked by the relay as it reads the file) is never
  sent on: the attempt stops before the end of DATA and the message goes
  to ``quarantine`` with the reason (event ``quarantined``).
* An attempt that breaks in an unexpected way gives the record back to its
  queue and is tried again in a minute (in memory only).

The message's :class:`~spoold.outcome.DeliveryPolicy` (lifetime, repeating
the last retry interval or freezing once they are used up, bounce or
freeze, delay warning) is an input of the outcome function
(:meth:`Transitions.policy_for`); the delivery status notifications it asks
for (:mod:`spoold.dsn`) are added as new messages, with the null sender,
routed like any other mail, before the outcome is written (a crash in
between may send a notification twice, never lose it). A bounce that cannot
be added (disk full, no route) is never lost: when nobody is left to try,
the message is frozen instead of removed (its failed recipients kept for an
operator); when others are still to be tried, the unreported recipients go
back among the remaining ones (out of the failed ones), are tried again with
the rest and, failing again, reported again (at the lifetime's end they fail
with the rest). A delay warning that cannot be added is tried again at the
next attempt.

The suppression list (:mod:`spoold.suppression`): an attempt never sends
to a recipient on it; such a recipient fails at once with ``550 5.7.1
recipient suppressed until ...`` (``on_error`` is not asked), through the
usual permanent-failure rules (frozen or bounced), when the attempt
reaches a hop or has nobody else to send to. Recipients that hard-bounced
(:func:`spoold.outcome.hard_bounces`) are put on the list, for
``suppress_after_hard_bounce``, before the outcome is written and
published: whoever learns of the bounce finds the address listed.

A message that leaves the queue for good (delivered, removed, or bounced)
gets a line in the history journal (:mod:`spoold.history`) once its
record's change is on disk (:meth:`Transitions.record_final`).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import anyio

from spoold.dsn import build_dsn, dsn_body, header_section
from spoold.errors import (
    BodyDamagedError,
    NotFoundError,
    OperationRefusedError,
    SpooldError,
    StoreError,
)
from spoold.events import EventKind
from spoold.history import History, outcome_of
from spoold.hooks import (
    PRESEND_CHOICES,
    ErrorAction,
    PresendDecision,
    call_hook,
    default_presend,
)
from spoold.kinds import FinalOutcomeKind, OutcomeKind
from spoold.message import (
    SEND_NOW,
    Delivered,
    Frozen,
    Message,
    Quarantined,
    Queue,
    Removed,
    RoutedEnvelope,
    SendAt,
    Sending,
    SendNow,
    Status,
    message_for_envelope,
)
from spoold.ondisk import NewMessage
from spoold.outcome import (
    DeliveryPolicy,
    HopFeedback,
    Notice,
    NoticeKind,
    attempt_outcome,
    recipient_outcomes,
    refusals,
)
from spoold.policy import DestinationPolicy, relay_under
from spoold.relay import AttemptFailed, BodyHandle, Delivery, RecipientResult
from spoold.scheduler import Scheduler
from spoold.state import Entry, SpoolState, log
from spoold.submission import OwnerSubmission, signature_prefix
from spoold.suppression import (
    SUPPRESSED_STATUS,
    Suppression,
    refused_everyone,
    suppression_for,
)

__all__ = ["Transitions"]

_T = TypeVar("_T")

_OUTCOME_RETRY_FIRST = 1.0  # seconds before the first retry of an outcome write
_OUTCOME_RETRY_MAX = 60.0
_SENDING = Sending()  # frozen: one for every attempt under way


class Transitions:
    """The changes of one message (see the module's docstring)."""

    def __init__(
        self,
        state: SpoolState,
        scheduler: Scheduler,
        submission: OwnerSubmission,
        history: History,
        rng: random.Random,
    ) -> None:
        self._parts = state.parts
        self._policy_of = scheduler.policy_of
        self._disk = state.disk
        self.clock = state.clock
        self._index = state.index
        self._adding = state.adding
        self._index_put = state.index_put
        self._publish = state.publish
        self._hub = state.hub
        self._schedule = scheduler.schedule
        self._apply = scheduler.apply
        self._poke = scheduler.poke
        self._gate = scheduler.gate
        self._relayed = scheduler.relayed
        self._add_to_disk = submission.add_to_disk
        self._signature = submission.signature  # DKIM, for the notices made here
        self._history = history
        self._rng = rng
        self._suppressions = state.suppressions

    async def send(self, entry: Entry, policy: DestinationPolicy) -> None:
        """One attempt on ``entry`` (busy: the scheduler's send job holds it)
        under its destination's ``policy``."""
        try:
            await self._attempt(entry, policy)
        except Exception:
            log.exception(
                "attempt failed unexpectedly; retrying in a minute",
                id=entry.msg.id,
                flows=entry.msg.flows,
            )
            await self._recover_from_failed_attempt(entry)

    async def _attempt(self, entry: Entry, policy: DestinationPolicy) -> None:
        msg = entry.msg
        kicked, entry.kicked = entry.kicked, False
        before = msg.status
        msg.status = _SENDING
        try:
            decision = await self._ask_presend(msg)
        except Exception as exc:  # a hook's failure must not lose the message
            log.exception("presend hook failed; trying later", id=msg.id, flows=msg.flows)
            msg.status = before
            await self._checkout(entry)
            await self._finish_attempt(
                entry,
                AttemptFailed(f"presend hook failed: {exc!r}"),
                operator_kick=kicked,
                policy=policy.delivery,
            )
            return
        self._publish(EventKind.PRESEND, msg, detail=_decision_name(decision))
        if not isinstance(decision, SendNow):
            msg.status = before
            new = await self.change(entry, decision)
            if isinstance(decision, SendAt):
                self._publish(EventKind.DELAYED, new, at=decision.at)
            if isinstance(decision, Removed):
                self.record_final(new, OutcomeKind.REMOVED, detail="removed by the presend hook")
            return
        body_path, check = self._disk.body_path(msg.id), msg.body_check()
        # The body is read (when small) in the checkout's hop: one hop less.
        ready = await self._checkout(
            entry, then=functools.partial(BodyHandle.read_ahead_sync, body_path, check)
        )
        self._follow_route(msg, policy)
        snapshot = msg.copy()
        now = self.clock.now()
        # Hops backed off go last for this attempt (the record keeps its order).
        snapshot.next_hop_choices = self._gate.order_hops(msg.next_hop_choices, now.timestamp())
        body = BodyHandle(body_path, self._disk.store.run_grouped, check, ready)
        held = self._suppressions.held(msg.remaining_recipients, now)
        to_send = [r for r in msg.remaining_recipients if r not in held]
        outcome: Delivery | AttemptFailed = Delivery({})
        if to_send:
            try:
                outcome = await relay_under(self._parts.relay, policy, snapshot, body, to_send)
            except BodyDamagedError as exc:
                await self._set_aside_damaged(entry, str(exc))
                return
            except Exception as exc:  # a relay bug must not lose the message
                log.exception("relay raised; trying later", id=msg.id, flows=msg.flows)
                outcome = AttemptFailed(f"relay error: {exc!r}")
        if held and isinstance(outcome, Delivery):
            outcome = Delivery({**outcome.recipients, **_suppressed_results(held)}, outcome.hop)
        else:
            held = {}  # no hop answered: they fail with the next attempt that reaches one
        await self._finish_attempt(
            entry,
            outcome,
            operator_kick=kicked,
            policy=policy.delivery,
            suppressed=held,
            relayed=bool(to_send),
            destination=policy,
        )

    async def _set_aside_damaged(self, entry: Entry, reason: str) -> None:
        """The body is not what was spooled (the relay stopped before the
        end of DATA): the message goes to ``quarantine`` with the reason,
        for an operator; it is never sent as it is."""
        new = entry.msg.copy()
        new.status = Quarantined(reason=reason)
        await self._save_outcome(entry, new)
        entry.checked_out = False
        self._apply(entry, new)
        self._publish(EventKind.QUARANTINED, new, detail=reason)
        log.error("damaged body: message quarantined", id=new.id, flows=new.flows, reason=reason)

    def _follow_route(self, msg: Message, policy: DestinationPolicy) -> None:
        """Before an attempt: if the message's destination now has other
        hops (a reload changed its route), use them. Changed in memory only;
        the record written after the attempt carries them."""
        hops = policy.next_hops
        if hops is None or list(hops) == msg.next_hop_choices:
            return
        old = msg.next_hop_choices
        msg.next_hop_choices = list(hops)
        detail = f"{' '.join(old)} -> {' '.join(hops)}"
        self._publish(EventKind.REROUTED, msg, detail=detail)
        log.info(
            "route changed: using its new next hops",
            id=msg.id,
            flows=msg.flows,
            route=msg.route,
            old_next_hops=old,
            next_hops=list(hops),
        )

    async def _recover_from_failed_attempt(self, entry: Entry) -> None:
        """An attempt broke in an unexpected way (e.g. a disk error): return
        the record to its queue if this attempt checked it out, and try
        again in a minute (in memory only: what is on disk stays the truth,
        and at worst the next open retries it)."""
        if entry.queue is Queue.ACTIVE:
            entry.msg.status = SendAt(at=self.clock.now() + timedelta(minutes=1))
        if entry.checked_out:
            try:
                await self._disk.release(entry.msg, entry.queue)
                entry.checked_out = False
            except Exception:
                log.exception(
                    "could not return a checked-out record",
                    id=entry.msg.id,
                    flows=entry.msg.flows,
                )
        self._schedule(entry)

    async def _ask_presend(self, msg: Message) -> PresendDecision:
        presend = self._parts.presend
        if presend is default_presend:
            return SEND_NOW  # what it answers, without a copy for it to look at
        decision = await call_hook(presend, msg.copy())
        if not isinstance(decision, PRESEND_CHOICES):
            raise TypeError(f"presend answered {decision!r}, not one of its choices")
        if isinstance(decision, SendAt) and decision.at.tzinfo is None:
            raise TypeError(f"presend answered {decision!r}: the time needs a time zone")
        return decision

    async def _checkout(self, entry: Entry, then: Callable[[], _T] | None = None) -> _T | None:
        """Check the record out for an attempt; ``then``, a short blocking
        call, runs in the same worker-thread hop once it is (its result
        returned)."""
        result = None
        if then is None:
            await self._disk.checkout(entry.msg, entry.queue)
        else:
            result = await self._disk.store.checkout_then(entry.queue.value, entry.msg.id, then)
        entry.checked_out = True
        return result

    async def _finish_attempt(
        self,
        entry: Entry,
        outcome: Delivery | AttemptFailed,
        *,
        operator_kick: bool,
        policy: DeliveryPolicy,
        suppressed: Mapping[str, Suppression] | None = None,
        relayed: bool = True,
        destination: DestinationPolicy | None = None,
    ) -> None:
        """Apply what an attempt did. ``suppressed``: recipients failed
        because they are on the suppression list (``on_error`` is not asked
        about them); ``relayed``: whether a hop was tried at all (else the
        attempt says nothing about hops); ``destination``: the attempt's
        policy, given when its connection is back: its destination's slot is
        then freed as soon as the outcome is known not to throttle a hop
        (the next of the line need not wait for this attempt's writes)."""
        old = entry.msg
        suppressed = suppressed or {}
        actions = {
            rcpt: (
                ErrorAction.FAIL_PERMANENTLY
                if rcpt in suppressed
                else await self._ask_on_error(old, rcpt, result)
            )
            for rcpt, result in refusals(old, outcome).items()
            if not result.in_doubt  # not a refusal: handled as after a crash
        }
        now = self.clock.now()
        result = attempt_outcome(
            old,
            outcome,
            actions,
            now=now,
            draw=lambda interval: interval.draw(self._rng),
            operator_kick=operator_kick,
            policy=policy,
            after_crash=self._parts.settings.after_crash,
        )
        if destination is not None and not result.hops.throttled:
            self._relayed(entry, destination)
        new = result.record
        event = result.event
        for notice in result.notices:
            dsn_id = await self._spool_notice(old, notice, now, policy)
            if dsn_id is not None:
                new.related_ids = [*new.related_ids, dsn_id]
            elif notice.kind is NoticeKind.DELAYED:
                new.delay_warned_at = None  # try again at the next attempt
            elif isinstance(new.status, Removed):
                new.status, event = Frozen(), EventKind.FROZEN  # the sender was not told
            else:  # others are still to try: these go with them, to fail and be told again
                _retry_unreported(new, notice)
        if isinstance(new.status, Removed):
            new.removed_at = now  # removed_retention counts from here
        # Before the outcome is out: whoever sees the bounce finds the address listed.
        await self._suppress_hard_bounces(new, result.hard_bounces, outcome)
        await self._save_outcome(entry, new)
        entry.checked_out = False
        self._apply(entry, new)
        if isinstance(new.status, Delivered):
            self.record_final(new, OutcomeKind.DELIVERED, relay_outcome=outcome)
        elif event is EventKind.BOUNCED:
            self.record_final(new, OutcomeKind.BOUNCED, relay_outcome=outcome, detail="bounced")
        detail = "in doubt: no reply to the end of the message" if result.in_doubt else None
        published = self._publish(
            event,
            new,
            at=result.at,
            detail=detail,
            # Made for subscribers only: nobody else reads them.
            results=recipient_outcomes(old, outcome, result) if self._hub.subscriber_count else (),
        )
        if relayed:
            self._hop_feedback(result.hops, new)
        if suppressed:
            self._suppressions.count("failed", len(suppressed))
            log.info(
                "suppressed recipients failed without being sent",
                id=new.id,
                flows=new.flows,
                recipients=sorted(suppressed),
            )
        log.info(
            "attempt done",
            id=new.id,
            flows=new.flows,
            outcome=published,
            delivered=len(result.delivered),
            failed=len(result.failed),
            later=len(result.later),
            at=result.at,
        )

    async def _suppress_hard_bounces(
        self, msg: Message, recipients: Sequence[str], outcome: Delivery | AttemptFailed
    ) -> None:
        """Put the recipients that hard-bounced in this attempt on the
        suppression list for ``suppress_after_hard_bounce`` (when it is
        set), the reply as the reason. Never raises: it runs before the
        outcome is written, which must not be lost (the hop has answered).
        A list that cannot be written is logged; the worst that follows is
        another attempt to the address, which bounces again."""
        span = self._parts.settings.suppress_after_hard_bounce
        if span is None or not recipients:
            return
        now = self.clock.now()
        replies = outcome.recipients if isinstance(outcome, Delivery) else {}
        if refused_everyone(replies, recipients):
            log.warning(
                "hop refused every recipient; not suppressing",
                id=msg.id,
                flows=msg.flows,
                hop=outcome.hop if isinstance(outcome, Delivery) else "",
                recipients=len(recipients),
            )
            return
        new = [
            suppression_for(
                rcpt,
                now=now,
                span=span,
                reason=str(replies[rcpt]) if rcpt in replies else "hard bounce",
                source="bounce",
            )
            for rcpt in recipients
        ]
        try:
            added = await self._suppressions.add(
                new,
                now=now,
                max_entries=self._parts.settings.max_suppressed,
                extend_only=True,
            )
        except Exception as exc:  # noqa: BLE001 (the outcome comes first)
            log.error(
                "could not write the suppression list; these recipients are not suppressed",
                id=msg.id,
                flows=msg.flows,
                recipients=list(recipients),
                error=str(exc),
            )
            return
        self._suppressions.count("bounced", len(added))
        for entry in added:
            log.info(
                "recipient suppressed after a hard bounce",
                id=msg.id,
                flows=msg.flows,
                recipient=entry.address,
                until=entry.until,
                reason=entry.reason,
            )

    def policy_for(self, msg: Message) -> DeliveryPolicy:
        """The delivery rules of ``msg`` now (its destination policy's)."""
        return self._policy_of(msg).delivery

    async def _spool_notice(
        self, original: Message, notice: Notice, now: datetime, policy: DeliveryPolicy
    ) -> str | None:
        """Add the delivery status notification ``notice`` about
        ``original`` as a new message from the null sender to its sender,
        routed like any other mail; its id, or None when it could not be
        added (logged)."""
        mlog = log.bind(id=original.id, flows=original.flows, notice=notice.kind.value)
        sender = original.envelope_info.sender
        try:
            body = await self._disk.read_body(original.id)
            expiry = policy.expiry(original)
            dsn = build_dsn(
                original,
                notice,
                original_headers=header_section(body.content()),
                reporting_mta=self._parts.reporting_mta,
                now=now,
                retry_until=expiry,
            )
            wire = dsn_body(dsn)
            params = [] if sender.isascii() else ["SMTPUTF8"]
            probe = RoutedEnvelope("", [sender], original.next_hop_choices, mail_params=params)
            envelopes = [probe]
            if self._parts.routes is not None:
                envelopes = await self._parts.routes.reroute(
                    message_for_envelope(
                        probe, id=original.id, spool_date=now, parent_id=original.id
                    )
                )
            if len(envelopes) != 1:
                raise OperationRefusedError(f"the sender {sender} has no single route")
            env = envelopes[0]
            intervals = list(env.retry_intervals) or list(
                self._parts.settings.default_retry_intervals
            )

            def build(mid: str, related: list[str]) -> Message:
                msg = message_for_envelope(
                    env,
                    id=mid,
                    spool_date=now,
                    parent_id=original.id,
                    flows=original.flows,
                    related_ids=[original.id],
                    size=len(wire),
                )
                msg.retry_intervals = intervals
                return msg

            signature = await self._signature(wire, original.flows)
            signed = signature_prefix(None, signature) if signature else None
            (added,) = await self._add_to_disk([NewMessage(wire, SEND_NOW, build, signed)])
        except (SpooldError, OSError, ValueError) as exc:
            mlog.error("could not add a delivery status notification", error=str(exc))
            return None
        if added.id not in self._index:
            entry = Entry(added, Queue.ACTIVE)
            self._index_put(entry)
            self._schedule(entry)
            self._publish(EventKind.SPOOLED, added)
        self._adding.discard(added.id)
        mlog.info("delivery status notification spooled", dsn_id=added.id, to=sender)
        return added.id

    def _hop_feedback(self, hops: HopFeedback, msg: Message) -> None:
        """What an attempt said about its next hops: back off those that
        throttled us, forgive one that answered. (The one place per-hop
        results of attempts are known: per-hop counters belong here.)"""
        for hop in hops.throttled:
            backoff = self._gate.throttled(hop, self.clock.now().timestamp(), hops.reason)
            until = datetime.fromtimestamp(backoff.until, UTC)
            log.warning(
                "next hop throttled us; backing off",
                hop=hop,
                id=msg.id,
                flows=msg.flows,
                reply=hops.reason,
                backoff_seconds=backoff.window,
                until=until,
            )
            self._publish(EventKind.THROTTLED, msg, detail=hop, at=until)
        if hops.answered is not None and self._gate.answered(hops.answered):
            log.info("next hop answered again; its backoff is over", hop=hops.answered)
            self._poke()

    async def _save_outcome(self, entry: Entry, new: Message) -> None:
        """Write the record an attempt produced, however long the disk needs.

        The next hop has answered: recipients it accepted must never be sent
        again, so the outcome is kept in memory and its write retried with
        backoff (1 s doubling to 60 s, on the spool's clock) until it is on
        disk; the message stays busy (no new attempt, no operator change)
        meanwhile. Only a process that dies before the write succeeds sends
        again (at least once).
        """
        delay = _OUTCOME_RETRY_FIRST
        retried = False
        while True:
            try:
                if retried:
                    await self._rewrite_outcome(entry, new)
                else:
                    await self._disk.save(new, from_queue=entry.queue, checked_out=True)
            except StoreError as exc:
                log.error(
                    "could not write the outcome of an attempt; keeping it and trying again",
                    id=new.id,
                    flows=new.flows,
                    error=str(exc),
                    disk_full=exc.disk_full,
                    retry_in=delay,
                )
                await self.clock.wait(anyio.Event(), self.clock.now() + timedelta(seconds=delay))
                delay = min(delay * 2, _OUTCOME_RETRY_MAX)
                retried = True
                continue
            if retried:
                log.info("outcome of an attempt written", id=new.id, flows=new.flows)
            return

    async def _rewrite_outcome(self, entry: Entry, new: Message) -> None:
        """A retry of :meth:`_save_outcome`: an earlier try may have got as far
        as moving the record (a failure after a rename), so look where it is."""
        try:
            await self._disk.save(new, from_queue=entry.queue, checked_out=True)
        except NotFoundError:
            target = new.queue
            if target is not None:  # None: delivered, the record is already gone
                await self._disk.save(new, from_queue=target)

    async def _ask_on_error(self, msg: Message, rcpt: str, result: RecipientResult) -> ErrorAction:
        try:
            action = await call_hook(self._parts.on_error, msg.copy(), rcpt, result)
            return ErrorAction(action)
        except Exception:
            log.exception("on_error hook failed; trying later", id=msg.id, flows=msg.flows)
            return ErrorAction.TRY_LATER

    async def change(
        self, entry: Entry, status: Status, *, edit: Callable[[Message], None] | None = None
    ) -> Message:
        """Write ``entry`` with a new status (and edits), then apply it."""
        new = entry.msg.copy()
        new.status = status
        if isinstance(status, Removed) and not isinstance(entry.msg.status, Removed):
            new.removed_at = self.clock.now()  # removed-message retention counts from here
        if edit is not None:
            edit(new)
        await self._disk.save(new, from_queue=entry.queue)
        was = type(entry.msg.status)
        self._apply(entry, new)
        event = {Frozen: EventKind.FROZEN, Removed: EventKind.REMOVED}.get(type(status))
        if event and was is not type(status):
            self._publish(event, new)
        return new

    def record_final(
        self,
        msg: Message,
        outcome: FinalOutcomeKind,
        *,
        relay_outcome: Delivery | AttemptFailed | None = None,
        detail: str = "",
    ) -> None:
        """Journal that ``msg`` left the queue (delivered, bounced, removed).

        Call it once the record's change is on disk, with the record as
        written; ``relay_outcome``, the last attempt's, gives each
        recipient's reply and the hop. Synchronous, no I/O: the line is
        written in the background, in batches (see :mod:`spoold.history`).
        """
        replies: list[tuple[str, int | None, str | None, str]] = []
        hop = ""
        if isinstance(relay_outcome, Delivery):
            hop = relay_outcome.hop
            replies = [
                (rcpt, r.code, r.enhanced_status, r.text)
                for rcpt, r in relay_outcome.recipients.items()
            ]
        elif isinstance(relay_outcome, AttemptFailed) and not detail:
            detail = relay_outcome.error
        self._history.append(
            outcome_of(msg, outcome, time=self.clock.now(), replies=replies, hop=hop, detail=detail)
        )


def _retry_unreported(record: Message, notice: Notice) -> None:
    """A bounce about ``notice``'s recipients could not be added while the
    message still has recipients to try: put them back among the remaining
    ones of ``record`` (out of its failed ones), so they are tried with the
    rest and, failing again, reported again; a failure is never kept
    without its report. Logged: the sender was not told yet."""
    unreported = [n.recipient for n in notice.recipients]
    record.failed_recipients = [r for r in record.failed_recipients if r not in unreported]
    record.remaining_recipients = list(dict.fromkeys([*record.remaining_recipients, *unreported]))
    log.warning(
        "a permanent failure could not be reported; its recipients will be tried again",
        id=record.id,
        flows=record.flows,
        recipients=unreported,
    )


_DECISION_NAMES: dict[type, str] = {
    SendNow: "send_now",
    SendAt: "send_at",
    Frozen: "freeze",
    Removed: "remove",
}


def _decision_name(decision: PresendDecision) -> str:
    return _DECISION_NAMES[type(decision)]


def _suppressed_results(held: Mapping[str, Suppression]) -> dict[str, RecipientResult]:
    """The answer an attempt gives itself for recipients on the
    suppression list: a permanent failure naming the suppression."""
    return {
        rcpt: RecipientResult(
            550,
            f"recipient {entry.describe(reason=False)}; not sent",  # the sender reads it
            SUPPRESSED_STATUS,
            phase="local",
        )
        for rcpt, entry in held.items()
    }
