"""What the rooms of the spool share: its state, its settings, its logger.

:class:`~spoold.spool.Spool` is a facade over small rooms, one concern
each (:mod:`spoold.scheduler`, :mod:`spoold.submission`,
:mod:`spoold.transitions`, :mod:`spoold.operations`, :mod:`spoold.queries`,
:mod:`spoold.housekeeping`). This module lies below all of them and holds
what more than one of them reads or changes; none of them imports
``spool.py``, and this module imports none of them.

:class:`SpoolState` is the one copy of the shared state: the index of the
messages of ``active`` and ``frozen`` (one :class:`Entry` each, never the
bodies) with its per-queue counts, the ids being added, the messages held
in doubt, the operator lock, the closing flags, the event hub and the
outcome board. :meth:`SpoolState.publish` is the one way an event goes out:
it reaches every subscriber and, when it stands for an outcome, the board
that :meth:`Spool.wait <spoold.spool.Spool.wait>` watches.

:class:`SpoolSettings` holds what a reload may replace while the spool is
open (the relay, hooks, routes, delivery policy, retention spans...); the
rooms read it at each use, so a change takes effect at the next attempt,
add or housekeeping round.

Invariants:

* The index and its counts change only through :meth:`SpoolState.index_put`
  and :meth:`SpoolState.index_drop` (the counts are never walked for).
* An event is published after the change it tells of is written to disk.
* No I/O and no ``await`` here: everything is plain memory.

Every room logs as ``spoold.spool`` (:data:`log`): operators' log filters
name the spool, not its rooms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import anyio
import msgspec

from spoold.clock import Clock
from spoold.dkim import DkimSigner
from spoold.errors import SpoolClosedError
from spoold.events import EventHub, EventKind, RecipientOutcome, SpoolEvent, stream_form
from spoold.hooks import OnErrorHook, PresendHook
from spoold.kinds import OutcomeKind
from spoold.log import get_logger
from spoold.message import Message, Queue, RoutedEnvelope
from spoold.ondisk import OnDiskSpool
from spoold.policy import LibraryPolicies, PolicySource
from spoold.relay import Relay
from spoold.settings import SpoolSettings
from spoold.suppression import Suppressions
from spoold.waiting import MessageOutcome, OutcomeBoard

__all__ = [
    "log",
    "LOADED_QUEUES",
    "Entry",
    "Routes",
    "SpoolParts",
    "SpoolState",
]

log = get_logger("spoold.spool")

LOADED_QUEUES = (Queue.ACTIVE, Queue.FROZEN)  # the queues held in memory


class Entry(msgspec.Struct, eq=False, gc=False):
    """One message of the index. Not tracked by the cyclic collector (it
    refers to no container that could lead back to it): a queue of a
    million entries costs every collection nothing."""

    msg: Message  # status reads Sending() in memory while an attempt runs
    queue: Queue  # where the record is on disk now
    gen: int = 0
    busy: bool = False
    checked_out: bool = False  # this entry's attempt holds the record's checkout
    kicked: bool = False  # an operator asked for the next attempt (spoold send)
    destination: str | None = None  # the destination whose slot its attempt holds


class Routes(Protocol):
    """What the spool asks of the routing of its owner (the daemon's
    :class:`~spoold.daemon.routing.Router` is one; a library user may give none).

    ``current_hops(message)`` gives the next hops the message's route has
    now, or None to keep the message's own; it is asked before each attempt
    (by the library's policy source, :class:`~spoold.policy.LibraryPolicies`)
    and must not block. ``reroute(message)`` routes the message's remaining
    recipients again, one envelope per way they go (it may look up DNS);
    it raises a :class:`~spoold.errors.SpooldError` when it cannot.
    """

    def current_hops(self, message: Message) -> Sequence[str] | None: ...

    async def reroute(self, message: Message) -> list[RoutedEnvelope]: ...


@dataclass(eq=False)
class SpoolParts:
    """What the spool's owner may replace while it is open (a reload), each
    read by the rooms at its next use: the relay, the hooks, the routing,
    the policy source, the name notifications report as, the settings
    value (:class:`~spoold.settings.SpoolSettings`: concurrency, retry
    defaults, durability, crash rule, retention, periods) and the DKIM
    signer of new messages.
    :class:`~spoold.spool.Spool` shows each as an attribute."""

    relay: Relay
    presend: PresendHook
    on_error: OnErrorHook
    # The routing asked for reroute and a notice's route (None: none).
    routes: Routes | None
    # Where each attempt's destination policy comes from (the daemon's
    # router, or the library's source made of the arguments of open).
    policies: PolicySource
    library: LibraryPolicies
    reporting_mta: str
    settings: SpoolSettings
    # Signs each new message as it is added (None: nothing is signed).
    dkim: DkimSigner | None = None


class SpoolState:
    """The state the spool's rooms share (see the module's docstring)."""

    def __init__(self, disk: OnDiskSpool, clock: Clock, parts: SpoolParts) -> None:
        self.disk = disk
        self.clock = clock
        self.parts = parts
        self.suppressions = Suppressions(disk.dir, owner=True)  # read at open (Spool.open)
        self.index: dict[str, Entry] = {}
        self.queue_counts: dict[Queue, int] = dict.fromkeys(LOADED_QUEUES, 0)
        self.adding: set[str] = set()  # ids add()/reroute() are writing now
        # In doubt after a crash, mark not yet written: (record as found, checked out).
        self.unsettled: dict[str, tuple[Message, bool]] = {}
        self.stopping = False  # kill_and_flush: no new attempt, no change
        self.closed = False
        self.op_lock = anyio.Lock()  # one operator change (or adoption) at a time
        self.hub = EventHub()
        self.outcomes = OutcomeBoard()

    @property
    def spool_dir(self) -> Path:
        return self.disk.dir

    def refuse_if_closing(self, verb: str) -> None:
        if self.closed or self.stopping:
            raise SpoolClosedError(
                f"cannot {verb}: spool {self.spool_dir} is shutting down (kill_and_flush) "
                "and takes no more changes"
            )

    # --------------------------------------------------------------- index

    def index_put(self, entry: Entry, queue: Queue | None = None) -> None:
        """Index ``entry`` (in ``queue``, when it moves there), keeping the
        per-queue counts."""
        old = self.index.get(entry.msg.id)
        if old is not None:
            self.queue_counts[old.queue] -= 1
        if queue is not None:
            entry.queue = queue
        self.index[entry.msg.id] = entry
        self.queue_counts[entry.queue] += 1

    def index_drop(self, message_id: str) -> None:
        old = self.index.pop(message_id, None)
        if old is not None:
            self.queue_counts[old.queue] -= 1

    # -------------------------------------------------------------- events

    def publish(
        self,
        kind: EventKind,
        msg: Message | None = None,
        *,
        detail: str | None = None,
        at: datetime | None = None,
        results: tuple[RecipientOutcome, ...] = (),
    ) -> EventKind:
        """Publish ``kind`` (in its stream form,
        :func:`~spoold.events.stream_form`: a bounce is ``removed``) and
        note the outcome it stands for; the kind as published.
        ``results``: each recipient's outcome, for an attempt's event.
        With no subscriber no event is made (only the outcome is noted)."""
        shown, shown_detail = stream_form(kind, detail)
        outcome = kind.outcome if msg is not None else None
        if outcome is None and not self.hub.subscriber_count:
            return shown
        now = self.clock.now()
        if self.hub.subscriber_count:
            self.hub.publish(
                SpoolEvent(
                    now,
                    shown,
                    msg.id if msg else None,
                    msg.envelope_info if msg else None,
                    shown_detail,
                    at,
                    results,
                )
            )
        if msg is not None and outcome is not None:
            reason = detail if outcome is OutcomeKind.QUARANTINED else None
            self.outcomes.reached(MessageOutcome.of(outcome, msg, now, reason))
        return shown
