"""The one way a submission becomes new messages on disk.

The spool's owner (:meth:`Spool.add <spoold.spool.Spool.add>`) and another
process's :class:`~spoold.writer.SpoolWriter` add messages the same way:
:func:`new_messages` checks the submission and makes its records (one per
envelope), an ``idempotency_key`` is held from looking it up to recording
the new ids (:mod:`spoold.idempotency`; with :attr:`Submission.shared_keys`,
a fleet's, it is claimed in Redis too: :mod:`spoold.fleet_keys`), and every record and body is
durable on disk before the ids are returned. A message whose ``From:``
domain has a DKIM key is signed first, once (:mod:`spoold.dkim`, in a
worker thread): its signature fields are written before the body, with
the trace header, so they are part of the stored message and every attempt
and every message of a fan-out sends the same signed bytes.
:class:`Submission` is that
path; the two differ only in what follows the write, which each gives as a
subclass: the owner indexes the new messages, schedules them and publishes
``spooled`` (:class:`OwnerSubmission`); a writer wakes the owner, which
adopts them.

Invariants:

* A message is acknowledged (``add`` returns) only once its record and body
  are durable.
* The owner's new ids are in :attr:`SpoolState.adding
  <spoold.state.SpoolState.adding>` from their reservation until they are
  indexed, so a rescan never adopts a message the owner is adding (and
  could bring back after it was delivered).
* ``spooled`` is published before ``add`` returns and before any attempt
  can start on the message: no ``await`` between indexing and publishing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Protocol

import anyio

from spoold.address import validate_address, validate_recipients
from spoold.body import Body
from spoold.dkim import DkimSigner
from spoold.errors import RecipientSuppressedError, SpoolClosedError
from spoold.events import EventKind
from spoold.idempotency import KeyFiles
from spoold.ids import new_id
from spoold.message import (
    SEND_NOW,
    Frozen,
    Message,
    Queue,
    RetryInterval,
    RoutedBatch,
    RoutedEnvelope,
    Status,
    message_for_envelope,
)
from spoold.ondisk import NewMessage, OnDiskSpool
from spoold.state import Entry, SpoolState, log
from spoold.suppression import SuppressedRecipients, Suppressions

if TYPE_CHECKING:
    from spoold.fleet_keys import FleetKeys

__all__ = ["new_messages", "signature_prefix", "AddSettings", "Submission", "OwnerSubmission"]


def new_messages(
    batch: RoutedBatch,
    *,
    status: Status,
    spool_date: datetime,
    default_retry_intervals: Sequence[RetryInterval],
    flows: Sequence[str] = (),
    parent_id: str | None = None,
    prefix: Callable[[str], bytes] | None = None,
    idempotency_key: str | None = None,
    submitter_uid: int | None = None,
) -> list[NewMessage]:
    """The new records of one submission, one per envelope, after checking
    every address (:class:`~spoold.errors.AddressError`) and that each
    envelope has a next hop. ``prefix(id)``: wire lines put before the body
    of the message with that id (called once per message).
    ``idempotency_key``, ``submitter_uid``: stored in each record."""
    if not batch.envelopes:
        raise ValueError("a submission needs at least one envelope")
    parent = parent_id or new_id()
    prefixes: dict[str, bytes] = {}

    def prefix_of(mid: str) -> bytes:
        if prefix is None:
            return b""
        if mid not in prefixes:
            prefixes[mid] = prefix(mid)
        return prefixes[mid]

    def builder(env: RoutedEnvelope) -> Callable[[str, list[str]], Message]:
        def build(mid: str, related: list[str]) -> Message:
            msg = message_for_envelope(
                env,
                id=mid,
                spool_date=spool_date,
                parent_id=parent,
                status=status,
                flows=flows,
                related_ids=related,
                size=len(prefix_of(mid)) + len(batch.body),
            )
            if not msg.retry_intervals:
                msg.retry_intervals = list(default_retry_intervals)
            msg.idempotency_key = idempotency_key
            msg.submitter_uid = submitter_uid
            return msg

        return build

    new = []
    for env in batch.envelopes:
        validate_address(env.sender, role="sender")
        validate_recipients(list(env.recipients))
        if not env.next_hop_choices:
            raise ValueError("an envelope needs at least one next hop")
        new.append(NewMessage(batch.body, status, builder(env), prefix_of if prefix else None))
    return new


def signature_prefix(
    prefix: Callable[[str], bytes] | None, signature: bytes
) -> Callable[[str], bytes]:
    """``prefix`` followed by the signature fields: written before the body
    by the store (no copy of the body is made), under the trace header."""
    if prefix is None:
        return lambda _mid: signature
    first = prefix
    return lambda mid: first(mid) + signature


class AddSettings(Protocol):
    """What an add reads of its owner's settings, at each add."""

    @property
    def default_retry_intervals(self) -> Sequence[RetryInterval]: ...
    @property
    def idempotency_window(self) -> timedelta: ...
    @property
    def suppressed_recipients(self) -> SuppressedRecipients: ...


class Submission:
    """The add path of one spool directory (see the module's docstring).
    A subclass says what follows the write (:meth:`_written`)."""

    def __init__(
        self,
        disk: OnDiskSpool,
        keys: KeyFiles,
        settings: Callable[[], AddSettings],
        now: Callable[[], datetime],
        suppressions: Suppressions,
        signer: Callable[[], DkimSigner | None] = lambda: None,
    ) -> None:
        self._disk = disk
        self.keys = keys
        self._settings = settings
        self._now = now
        self._signer = signer
        self.suppressions = suppressions
        # [fleet]: idempotency keys claimed fleet-wide too (spoold.fleet_keys);
        # None: this node's own keys alone.
        self.shared_keys: FleetKeys | None = None

    async def add(
        self,
        batch: RoutedBatch,
        *,
        frozen: bool = False,
        flows: Sequence[str] = (),
        parent_id: str | None = None,
        prefix: Callable[[str], bytes] | None = None,
        idempotency_key: str | None = None,
        submitter_uid: int | None = None,
    ) -> list[str]:
        """Spool one submission; its ids in order, once it is durable (the
        earlier submission's, for an ``idempotency_key`` seen within the
        window)."""
        if idempotency_key is None:
            return await self._add_new(batch, frozen, flows, parent_id, prefix, None, submitter_uid)
        shared = self.shared_keys
        add_once = self.keys.add_once if shared is None else partial(shared.add_once, self.keys)
        ids, repeated = await add_once(
            idempotency_key,
            batch,
            self._now(),
            self._settings().idempotency_window,
            lambda: self._add_new(
                batch, frozen, flows, parent_id, prefix, idempotency_key, submitter_uid
            ),
        )
        if repeated:
            self._repeated(ids)
        return ids

    async def _add_new(
        self,
        batch: RoutedBatch,
        frozen: bool,
        flows: Sequence[str],
        parent_id: str | None,
        prefix: Callable[[str], bytes] | None,
        idempotency_key: str | None,
        submitter_uid: int | None = None,
    ) -> list[str]:
        if self._settings().suppressed_recipients == "refuse":
            # No coroutine made unless the list must be read again (the
            # usual add: a look at the owner's count, or one stat, and no list).
            listed = self.suppressions
            if listed.stale():
                await listed.refresh()
            if len(listed):
                self._refuse_suppressed(batch, listed)
        status: Status = Frozen() if frozen else SEND_NOW
        messages = await self.write_new(
            batch,
            status,
            flows,
            parent_id,
            prefix,
            idempotency_key=idempotency_key,
            submitter_uid=submitter_uid,
        )
        return self._written(messages, frozen)

    async def write_new(
        self,
        batch: RoutedBatch,
        status: Status,
        flows: Sequence[str],
        parent_id: str | None,
        prefix: Callable[[str], bytes] | None = None,
        *,
        idempotency_key: str | None = None,
        submitter_uid: int | None = None,
    ) -> list[Message]:
        """Check ``batch`` and write its messages with ``status``; nothing
        follows (see :meth:`_written`)."""
        self._refuse_if_closing()
        # Without a signer, no coroutine made and awaited for nothing.
        signature = await self.signature(batch.body, flows) if self._signer() else b""
        if signature:
            prefix = signature_prefix(prefix, signature)
        new = new_messages(
            batch,
            status=status,
            spool_date=self._now(),
            default_retry_intervals=self._settings().default_retry_intervals,
            flows=flows,
            parent_id=parent_id,
            prefix=prefix,
            idempotency_key=idempotency_key,
            submitter_uid=submitter_uid,
        )
        return await self._write(new)

    async def signature(self, body: Body, flows: Sequence[str]) -> bytes:
        """The DKIM-Signature fields of ``body``, to write before it, when
        the signer has a key for its ``From:`` domain; else b"" (logged
        with the reason). A notice the spool makes (a DSN) is signed with
        this too."""
        signer = self._signer()
        if not signer:
            return b""
        wire = body.wire
        # CPU work (0.1-0.4 ms for a small message, more for a large one):
        # off the event loop. ``cryptography`` holds the GIL while it signs,
        # yet the daemon measured less CPU and a higher rate signing here in
        # a thread than on the loop (RSA-2048, 5 alternated pairs).
        outcome = await anyio.to_thread.run_sync(signer.sign, wire, self._now())
        if not outcome.header:
            # Mail of a domain without a key is usual (debug); a message of a
            # signed domain that cannot be read is worth an operator's look.
            report = log.debug if outcome.no_key else log.info
            report("not DKIM-signed", flows=list(flows), reason=outcome.reason)
            return b""
        log.debug(
            "DKIM-signed",
            flows=list(flows),
            signatures=[f"d={d} s={s}" for d, s in outcome.signed_by],
        )
        return outcome.header

    def _refuse_suppressed(self, batch: RoutedBatch, listed: Suppressions) -> None:
        """Under ``suppressed_recipients = "refuse"`` (the caller checks it,
        and reads ``listed`` again first if another process changed it):
        raise :class:`~spoold.errors.RecipientSuppressedError` naming every
        recipient of ``batch`` on the suppression list. Under ``"fail"``
        they are taken: their first attempt fails them
        (:mod:`spoold.transitions`)."""
        held = listed.held((r for env in batch.envelopes for r in env.recipients), self._now())
        if held:
            listed.count("refused", len(held))
            log.info("submission refused: suppressed recipients", recipients=sorted(held))
            raise RecipientSuppressedError({r: e.describe() for r, e in held.items()})

    # ----------------------------------------------- what a subclass says

    def _refuse_if_closing(self) -> None:
        """Raise when no new mail is taken any more."""

    async def _write(self, new: Sequence[NewMessage]) -> list[Message]:
        """Write ``new`` durably; the messages written, in order."""
        raise NotImplementedError

    def _written(self, messages: list[Message], frozen: bool) -> list[str]:
        """What follows the write of an add; the ids to return."""
        raise NotImplementedError

    def _repeated(self, ids: list[str]) -> None:
        """An idempotency key was seen: ``ids`` are the earlier submission's."""


class OwnerSubmission(Submission):
    """The spool owner's add path: the new messages are indexed, scheduled
    (with ``schedule``) and their ``spooled`` event published at once."""

    def __init__(
        self, state: SpoolState, keys: KeyFiles, schedule: Callable[[Entry], None]
    ) -> None:
        super().__init__(
            state.disk,
            keys,
            lambda: state.parts.settings,
            state.clock.now,
            state.suppressions,
            lambda: state.parts.dkim,
        )
        self._state = state
        self._index = state.index
        self._index_put = state.index_put
        self._publish = state.publish
        self._schedule = schedule

    def _refuse_if_closing(self) -> None:
        if self._state.closed or self._state.stopping:
            raise SpoolClosedError(
                f"spool {self._state.spool_dir} is closing and takes no new mail"
            )

    async def _write(self, new: Sequence[NewMessage]) -> list[Message]:
        return await self.add_to_disk(new)

    def _repeated(self, ids: list[str]) -> None:
        log.info("duplicate submission: idempotency key seen", ids=ids)

    def _written(self, messages: list[Message], frozen: bool) -> list[str]:
        for msg in messages:
            if msg.id in self._index:
                continue  # a rescan adopted it while we were writing
            entry = Entry(msg, Queue.FROZEN if frozen else Queue.ACTIVE)
            # No await from here to the publish: the scheduler cannot start
            # an attempt before ``spooled`` is out (spoold.events' ordering).
            self._index_put(entry)
            self._schedule(entry)
            self._publish(EventKind.SPOOLED, msg)
            if frozen:
                self._publish(EventKind.FROZEN, msg)
            log.info(
                "spooled",
                id=msg.id,
                flows=msg.flows,
                sender=msg.envelope_info.sender,
                recipients=len(msg.remaining_recipients),
                next_hops=msg.next_hop_choices,
            )
        self._state.adding.difference_update(m.id for m in messages)
        return [m.id for m in messages]

    async def add_to_disk(self, new: Sequence[NewMessage]) -> list[Message]:
        """Write new messages; their ids stay in ``adding`` (so rescans leave
        them alone) until the caller has indexed them and discards them."""
        reserved: list[str] = []
        adding = self._state.adding

        def on_reserve(name: str) -> None:  # in the store's worker thread
            reserved.append(name)
            adding.add(name)

        try:
            return await self._disk.add(new, on_reserve)
        except BaseException:
            adding.difference_update(reserved)
            raise
