"""The spool: in-memory index, scheduler, operator operations and events.

A :class:`Spool` owns one spool directory (through
:class:`~spoold.ondisk.OnDiskSpool`) and keeps the records of ``active`` and
``frozen`` in memory (never the bodies). It is opened with
``async with Spool.open(...) as spool`` and runs its scheduler in a task
group that the context owns; leaving the context stops sending, waits up to
``flush_timeout`` for attempts under way, then cancels what is left (a
cancelled attempt leaves its record checked out, and the next open tries it
again: delivery is at least once).

Invariants:

* Every change is written to disk before it is applied in memory, before an
  event is published and before the operation returns.
* A message is "busy" while one attempt or one operator change is under way
  on it; nothing else touches it then. Operator operations on a message that
  is being sent are refused with a clear error.
* The scheduler arms one timer per message (:class:`~spoold.timers.Timers`);
  any change to a message re-arms or cancels it, so a stale timer is
  skipped when it comes up: it never sends a message that was frozen,
  removed, quarantined, rescheduled or is being sent.
* At most ``max_concurrent_send_jobs`` attempts run at once (changeable
  while running).
* A message's events are published in the order of its changes, after
  each is written; ``spooled`` before ``add`` returns and before any
  attempt can start on the message (see :mod:`spoold.events`). The
  outcomes among them (delivered, frozen, removed, quarantined, bounced)
  are also remembered for :meth:`Spool.wait` (:mod:`spoold.waiting`).
* Per destination (a route), at most ``max_connections`` attempts at once
  and at most its ``rate``; a next hop that throttled us is backed off for
  every message (:mod:`spoold.limits`). A message held by these waits in
  memory, due as it was: it is not an attempt, so nothing is written, no
  retry interval is used and no relay attempt is recorded; other
  destinations are not slowed by it (a held message takes no send job).
* After :meth:`Spool.kill_and_flush` (and while closing) the operator
  operations and :meth:`Spool.add` are refused with
  :class:`~spoold.errors.SpoolClosedError`.
* ``sending`` is a status this spool holds in memory only, during an
  attempt. A record stored as ``sending`` (by hand or by another tool) is
  loaded, or adopted, as ``send_now``: never left unscheduled.
* A body that is not what was spooled (the record's ``size`` and
  ``body_sha256``, checked by the relay as it reads the file) is never
  sent on: the attempt stops before the end of DATA and the message goes
  to ``quarantine`` with the reason (event ``quarantined``).
* In doubt after a crash: a record found checked out when the spool is
  opened (an attempt was under way when the owner died), or stored as
  ``sending``, may already be at the next hop. It is marked ``in_doubt``
  on disk and, by ``after_crash``, sent again at once (``resend``: at least
  once) or frozen for an operator (``freeze``).

The outcome of an attempt (which recipients are done, failed or left, and
the message's next status) is decided by :func:`spoold.outcome.attempt_outcome`,
a pure function; the spool asks ``on_error`` about each refusal, writes the
record it returns (retrying until the disk takes it: the hop's answers are
never thrown away) and publishes its event. The message's
:class:`~spoold.outcome.DeliveryPolicy` (lifetime, repeating the last
retry interval or freezing once they are used up, bounce or freeze, delay
warning) is an input of that function; the delivery status notifications it
asks for (:mod:`spoold.dsn`) are added as new messages, with the null sender,
routed like any other mail, before the outcome is written (a crash in
between may send a notification twice, never lose it). A bounce that cannot
be added (disk full, no route) is never lost: when nobody is left to try,
the message is frozen instead of removed (its failed recipients kept for an
operator); when others are still to be tried, the unreported recipients go
back among the remaining ones (out of the failed ones), are tried again with
the rest and, failing again, reported again (at the lifetime's end they fail
with the rest). A delay warning that cannot be added is tried again at the
next attempt. :meth:`Spool.retry_plan` applies the same function to foresee a
message's attempts.

A message that leaves the queue for good (delivered, removed, or bounced by
whoever calls :meth:`Spool._record_final`) gets a line in the history
journal (:mod:`spoold.history`) once its record's change is on disk;
:meth:`Spool.find_outcome` and :meth:`Spool.history` read it. A
housekeeping task (at open, then every ``housekeeping_interval`` on the
spool's clock) deletes removed messages past ``removed_retention`` (in
batches, each under the operator lock so no ``recover`` runs meanwhile),
journal files past ``history_retention`` and idempotency keys past
``idempotency_window``; a failed round is logged and tried at the next.
:meth:`Spool.add` with an ``idempotency_key`` holds the key's lock
(:mod:`spoold.idempotency`) from looking it up to recording the new ids.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Container,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import anyio.abc
import msgspec

from spoold.clock import Clock, SystemClock
from spoold.dsn import build_dsn, dsn_body, header_section
from spoold.errors import (
    BodyDamagedError,
    NotFoundError,
    OperationRefusedError,
    RecordError,
    SpoolClosedError,
    SpooldError,
    StoreError,
    WaitTimeoutError,
)
from spoold.events import EventHub, EventKind, SpoolEvent, Subscription
from spoold.history import FinalOutcome, History, Outcome, RecipientState, outcome_of
from spoold.hooks import (
    PRESEND_CHOICES,
    ErrorAction,
    OnErrorHook,
    PresendDecision,
    PresendHook,
    call_hook,
    default_on_error,
    default_presend,
)
from spoold.hostname import local_hostname
from spoold.idempotency import DEFAULT_IDEMPOTENCY_WINDOW, KeyFiles
from spoold.ids import validate_id
from spoold.limits import DestinationGate, DestinationLimits, Hold, LimitsSource
from spoold.listing import SCAN_LIMIT, Listing
from spoold.log import get_logger
from spoold.message import (
    SEND_NOW,
    Delivered,
    EnvelopeInfo,
    Frozen,
    Message,
    Quarantined,
    Queue,
    Removed,
    RetryInterval,
    RoutedBatch,
    RoutedEnvelope,
    SendAt,
    Sending,
    SendNow,
    SharedParts,
    Status,
    gc_paused,
    message_for_envelope,
)
from spoold.ondisk import NewMessage, OnDiskSpool, Unreadable
from spoold.outcome import (
    AfterCrash,
    DeliveryPolicy,
    HopFeedback,
    Notice,
    NoticeKind,
    RetriesExhausted,
    RetryPlan,
    attempt_outcome,
    refusals,
    retry_plan,
)
from spoold.relay import (
    AttemptFailed,
    BodyHandle,
    Delivery,
    RecipientResult,
    Relay,
)
from spoold.settings import (  # the defaults are written there, re-exported here
    DEFAULT_AFTER_CRASH,
    DEFAULT_FLUSH_TIMEOUT,
    DEFAULT_HISTORY_RETENTION,
    DEFAULT_HOUSEKEEPING_INTERVAL,
    DEFAULT_MAX_CONCURRENT_SEND_JOBS,
    DEFAULT_MAX_QUEUE_LIFETIME,
    DEFAULT_MIN_FREE_SPACE,
    DEFAULT_PING_INTERVAL,
    DEFAULT_REMOVED_RETENTION,
    DEFAULT_RETRY_INTERVALS,
    DEFAULT_RETRY_JITTER,
    DEFAULT_RETRY_SPANS,
    DEFAULT_SYNC,
    Setting,
    SpoolSettings,
)
from spoold.store import CHECKOUT, StepHook, SyncMode
from spoold.tasks import own_tasks
from spoold.timers import Timers
from spoold.waiting import MessageOutcome, OutcomeBoard, OutcomeKind
from spoold.writer import new_messages

__all__ = [
    "Spool",
    "Routes",
    "SpoolSettings",
    "DEFAULT_MAX_CONCURRENT_SEND_JOBS",
    "DEFAULT_RETRY_SPANS",
    "DEFAULT_RETRY_JITTER",
    "DEFAULT_RETRY_INTERVALS",
    "DEFAULT_FLUSH_TIMEOUT",
    "DEFAULT_PING_INTERVAL",
    "DEFAULT_MIN_FREE_SPACE",
    "DEFAULT_SYNC",
    "DEFAULT_MAX_QUEUE_LIFETIME",
    "DEFAULT_AFTER_CRASH",
    "AfterCrash",
    "DEFAULT_REMOVED_RETENTION",
    "DEFAULT_HISTORY_RETENTION",
    "DEFAULT_IDEMPOTENCY_WINDOW",
    "DEFAULT_HOUSEKEEPING_INTERVAL",
]

log = get_logger("spoold.spool")


_RETENTION_BATCH = 256  # removed messages deleted per thread hop (and per hold of the op lock)

_LOADED_QUEUES = (Queue.ACTIVE, Queue.FROZEN)
_OUTCOME_NAMES = frozenset(kind.value for kind in OutcomeKind)
_OUTCOME_RETRY_FIRST = 1.0  # seconds before the first retry of an outcome write
_OUTCOME_RETRY_MAX = 60.0


class _Entry(msgspec.Struct, eq=False, gc=False):
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
    and must not block. ``reroute(message)`` routes the message's remaining
    recipients again, one envelope per way they go (it may look up DNS);
    it raises a :class:`~spoold.errors.SpooldError` when it cannot.
    """

    def current_hops(self, message: Message) -> Sequence[str] | None: ...

    async def reroute(self, message: Message) -> list[RoutedEnvelope]: ...


class Spool:
    """A running spool. Create it with :meth:`open`."""

    def __init__(
        self,
        ondisk: OnDiskSpool,
        *,
        relay: Relay,
        presend: PresendHook | None,
        on_error: OnErrorHook | None,
        clock: Clock,
        settings: SpoolSettings,
        rng: random.Random | None,
        routes: Routes | None = None,
        route_lifetimes: Mapping[str, timedelta] | None = None,
        route_retries_exhausted: Mapping[str, RetriesExhausted] | None = None,
        reporting_mta: str | None = None,
        limits: LimitsSource | None = None,
    ) -> None:
        self._disk = ondisk
        # Replaceable while open (a reload), as one value: see the settings property.
        self._settings = settings
        # Replaceable while open (a reload): the queue lifetime and
        # retries-exhausted rule of messages of some routes, and the host
        # name notifications report as.
        self.route_lifetimes: dict[str, timedelta] = dict(route_lifetimes or {})
        self.route_retries_exhausted: dict[str, RetriesExhausted] = dict(
            route_retries_exhausted or {}
        )
        self.reporting_mta = reporting_mta or local_hostname()
        self._history = History(ondisk.dir)
        self._keys = KeyFiles(ondisk.dir)
        self.relay = relay
        self.routes = routes  # may be replaced while open (a reload)
        self.presend: PresendHook = presend or default_presend
        self.on_error: OnErrorHook = on_error or default_on_error
        self.clock = clock
        self._rng = rng or random.Random()
        self._index: dict[str, _Entry] = {}
        self._timers = Timers()
        self._queue_counts: dict[Queue, int] = dict.fromkeys(_LOADED_QUEUES, 0)
        self._adding: set[str] = set()  # ids add()/reroute() are writing now
        # In doubt after a crash, mark not yet written: (record as found, checked out).
        self._unsettled: dict[str, tuple[Message, bool]] = {}
        self._wake = anyio.Event()
        self._running = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._stopping = False
        self._closed = False
        self._op_lock = anyio.Lock()
        self._hub = EventHub()
        self._outcomes = OutcomeBoard()
        self._tg: anyio.abc.TaskGroup | None = None
        self._limits = limits
        # Messages held by their destination wait here as (entry, generation).
        self._gate: DestinationGate[tuple[_Entry, int]] = DestinationGate()

    # ----------------------------------------------------------- lifecycle

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        spool_dir: str | Path,
        *,
        relay: Relay,
        presend: PresendHook | None = None,
        on_error: OnErrorHook | None = None,
        clock: Clock | None = None,
        max_concurrent_send_jobs: int = DEFAULT_MAX_CONCURRENT_SEND_JOBS,
        default_retry_intervals: Sequence[RetryInterval] = DEFAULT_RETRY_INTERVALS,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        rng: random.Random | None = None,
        max_threads: int = 16,
        min_free_space: int = DEFAULT_MIN_FREE_SPACE,
        on_step: StepHook | None = None,
        routes: Routes | None = None,
        sync: SyncMode = DEFAULT_SYNC,
        delivery_policy: DeliveryPolicy = DeliveryPolicy(),  # noqa: B008
        route_lifetimes: Mapping[str, timedelta] | None = None,
        route_retries_exhausted: Mapping[str, RetriesExhausted] | None = None,
        after_crash: AfterCrash = DEFAULT_AFTER_CRASH,
        reporting_mta: str | None = None,
        limits: LimitsSource | None = None,
        removed_retention: timedelta = DEFAULT_REMOVED_RETENTION,
        history_retention: timedelta = DEFAULT_HISTORY_RETENTION,
        idempotency_window: timedelta = DEFAULT_IDEMPOTENCY_WINDOW,
        housekeeping_interval: timedelta = DEFAULT_HOUSEKEEPING_INTERVAL,
        settings: SpoolSettings | None = None,
    ) -> AsyncIterator[Spool]:
        """Open the spool at ``spool_dir`` as its owner and start scheduling.

        ``spool_dir``: the spool directory, created if missing.
        ``relay``: what sends messages (:class:`~spoold.relay.Relay`; usually
        :class:`~spoold.smtp_relay.SmtpRelay`). The spool does not close it.
        ``presend`` / ``on_error``: the policy hooks (:mod:`spoold.hooks`);
        None is the default policy. Replaceable later with :meth:`set_hooks`.
        ``clock``: the time source (:class:`~spoold.clock.Clock`); default the
        wall clock; tests give :class:`spoold.testing.FakeClock`.
        ``max_concurrent_send_jobs``: attempts under way at most (changeable).
        ``default_retry_intervals``: the intervals of a message added without
        its own (changeable through :attr:`default_retry_intervals`).
        ``flush_timeout``: seconds that attempts under way may take to finish
        when the context is left; then they are cut (and retried at the next
        open).
        ``ping_interval``: seconds between ``ping`` events; each also rescans
        the directories for messages added by other processes.
        ``rng``: the random source of retry jitter (seed it for exact tests).
        ``max_threads``: worker threads the store may use at once.
        ``min_free_space``: bytes that must stay free on the spool's disk, or
        :meth:`add` refuses with a temporary error (0: no floor; changeable).
        ``on_step``: called with the name of each filesystem step before it
        runs (fault injection: :class:`spoold.testing.Faults`).
        ``routes``: the routing to ask for a message's current next hops and
        for :meth:`reroute` (:class:`Routes`); None: messages keep their hops.
        ``sync``: how new messages are made durable: ``"fsync"`` (each file
        and directory) or ``"syncfs"`` (concurrent adds share two syncs of
        the filesystem: group commit). Changeable through :attr:`sync`.
        ``delivery_policy``: queue lifetime, what to do once the retry
        intervals are used up, bounce or freeze on permanent failure, delay
        warning (:class:`~spoold.outcome.DeliveryPolicy`; default: no
        lifetime, which leaves the seed's rules: a message whose intervals
        are used up is frozen); ``route_lifetimes`` and
        ``route_retries_exhausted``: the queue lifetime and the
        retries-exhausted rule of messages of the named routes, overriding
        the policy's. ``after_crash``: what to do with a message found in
        doubt (``resend`` or ``freeze``). ``reporting_mta``: the host name
        that delivery status notifications report as, and the right-hand
        side of their ``Message-ID:`` (default: this machine's,
        :func:`~spoold.hostname.local_hostname`). All five are changeable
        through the attributes of the same names.
        ``limits``: where a message's destination limits come from
        (:class:`~spoold.limits.LimitsSource`; the daemon's router); None:
        no limits (next hops that throttle are backed off all the same).
        Replaceable through :attr:`limits`.
        ``removed_retention``: how long a removed message stays in
        ``removed`` (counted from its removal) before housekeeping deletes it.
        ``history_retention``: how long the history journal keeps outcomes
        (:meth:`history`, :meth:`find_outcome`).
        ``idempotency_window``: how long an idempotency key given to
        :meth:`add` is remembered. All three changeable through the
        attributes of the same names.
        ``housekeeping_interval``: time between two housekeeping rounds
        (deleting expired removed messages, history and keys; the first
        round runs at open), on the spool's clock.
        ``settings``: all of ``max_concurrent_send_jobs``,
        ``default_retry_intervals``, ``ping_interval``, ``min_free_space``,
        ``sync``, ``delivery_policy``, ``after_crash``, ``removed_retention``,
        ``history_retention``, ``idempotency_window`` and
        ``housekeeping_interval`` as one value
        (:class:`~spoold.settings.SpoolSettings`); given, it is used instead
        of those keyword arguments. Readable and replaceable while open
        through :attr:`settings`.

        Raises :class:`~spoold.errors.SpoolLockedError` at once if another
        process owns it. Leaving the context stops new attempts, waits up to
        ``flush_timeout`` for those under way and closes the directory.
        An exception raised in the body comes out unchanged (never wrapped
        in an ``ExceptionGroup``); a failure of the spool's own tasks comes
        out as :class:`~spoold.errors.SpoolFailedError`, the failure as its
        ``__cause__`` (see :mod:`spoold.tasks`).
        """
        if settings is None:  # checked as it is built (ValueError)
            settings = SpoolSettings(
                max_concurrent_send_jobs=max_concurrent_send_jobs,
                default_retry_intervals=tuple(default_retry_intervals),
                min_free_space=min_free_space,
                sync=sync,
                delivery_policy=delivery_policy,
                after_crash=after_crash,
                removed_retention=removed_retention,
                history_retention=history_retention,
                idempotency_window=idempotency_window,
                housekeeping_interval=housekeeping_interval,
                ping_interval=ping_interval,
            )
        if not reporting_mta:
            reporting_mta = await anyio.to_thread.run_sync(local_hostname)  # may ask DNS
        ondisk, report = await OnDiskSpool.open(
            spool_dir,
            max_threads=max_threads,
            min_free_bytes=settings.min_free_space,
            on_step=on_step,
            sync=settings.sync,
            # An attempt cut short stays checked out until it is marked in
            # doubt (see _settle_in_doubt): never back in its queue unmarked.
            keep_checkouts=(Queue.ACTIVE,),
        )
        try:
            ondisk.require(Queue.ACTIVE)  # no mail can be queued or sent without it
            spool = cls(
                ondisk,
                relay=relay,
                presend=presend,
                on_error=on_error,
                clock=clock or SystemClock(),
                settings=settings,
                rng=rng,
                routes=routes,
                route_lifetimes=route_lifetimes,
                route_retries_exhausted=route_retries_exhausted,
                reporting_mta=reporting_mta,
                limits=limits,
            )
            cut_short = {name for queue, name in report.kept_checkouts if queue == Queue.ACTIVE}
            await spool._load(cut_short)
            await spool._repair_keys()
            async with own_tasks(f"spool {spool.spool_dir}") as tg:
                spool._tg = tg
                tg.start_soon(spool._dispatch_loop, tg)
                tg.start_soon(spool._ping_loop)
                tg.start_soon(spool._history.run)
                tg.start_soon(spool._housekeeping_loop)
                await tg.start(spool._wakeup_loop)
                try:
                    yield spool
                finally:
                    with anyio.CancelScope(shield=True):
                        try:
                            await spool.kill_and_flush(flush_timeout)
                        except TimeoutError:
                            log.warning(
                                "attempts still running at close; they will be retried",
                                running=spool._running,
                            )
                    spool._closed = True
                    spool._hub.close()
                    spool._outcomes.close()
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        await spool._history.flush()
        finally:
            with anyio.CancelScope(shield=True):
                await ondisk.close()

    async def _load(self, cut_short: Container[str] = ()) -> None:
        """Index and schedule every record of ``active`` and ``frozen``, batch
        by batch as they are read (so a large queue is built compactly: the
        temporaries of one batch are reused by the next). ``cut_short``: ids
        of ``active`` the store found (and left) checked out, an attempt
        under way when the last owner died: they, and records stored as
        ``sending``, are in doubt, and are settled once both queues are
        read (:meth:`_settle_in_doubt`)."""
        shared = SharedParts()
        doubtful: list[Message] = []
        for queue in _LOADED_QUEUES:

            def index(messages: list[Message], queue: Queue = queue) -> None:
                with gc_paused():
                    for msg in messages:
                        if queue is Queue.ACTIVE and (
                            msg.id in cut_short or isinstance(msg.status, Sending)
                        ):
                            doubtful.append(msg)
                            continue
                        entry = _Entry(msg, queue)
                        self._index_put(entry)
                        self._schedule(entry)

            if queue is not Queue.ACTIVE and not self._disk.usable(queue):
                continue  # reported below; the rest is served
            # Records are interned in the reading thread (one batch at a time:
            # ``shared`` is only ever used there), as soon as they are decoded.
            await self._disk.load(queue, on_batch=index, prepare=lambda m: m.intern(shared))
        for msg in doubtful:
            await self._settle_in_doubt(msg, checked_out=msg.id in cut_short)
        for path, why in self._disk.unusable().items():
            log.error("spool directory unusable; what it holds is skipped", path=path, error=why)
        log.info(
            "spool opened",
            spool_dir=str(self._disk.dir),
            active=self._queue_counts[Queue.ACTIVE],
            frozen=self._queue_counts[Queue.FROZEN],
            unsettled_in_doubt=len(self._unsettled),
        )

    async def _settle_in_doubt(self, msg: Message, *, checked_out: bool) -> None:
        """A message whose attempt was cut by a crash: write it ``in_doubt``,
        due now (``after_crash = resend``) or frozen (``freeze``), then index
        it. The mark is written over the record where it was found (still
        checked out, or stored as ``sending``) before the record goes back to
        a queue, so no failure leaves it there unmarked. When the write fails
        (a full disk), the record stays as it was found, and so in doubt for
        the next open too; this spool keeps it aside, never sends it, and
        tries again at each ping (:meth:`_settle_unsettled`)."""
        new = msg.copy()
        new.in_doubt = True
        new.status = Frozen() if self.after_crash == "freeze" else SEND_NOW
        try:
            await self._disk.save(new, from_queue=Queue.ACTIVE, checked_out=checked_out)
        except StoreError as exc:
            if msg.id not in self._unsettled:
                log.error(
                    "message cut short by a crash cannot be marked in doubt yet; "
                    "it is held (never sent) and tried again at each ping",
                    id=msg.id,
                    flows=msg.flows,
                    error=str(exc),
                )
            self._unsettled[msg.id] = (msg, checked_out)
            return
        self._unsettled.pop(msg.id, None)
        log.warning(
            "message was being sent when the spool was last closed uncleanly; "
            "the next hop may already have it",
            id=new.id,
            flows=new.flows,
            after_crash=self.after_crash,
        )
        entry = _Entry(new, Queue.FROZEN if isinstance(new.status, Frozen) else Queue.ACTIVE)
        self._index_put(entry)
        self._schedule(entry)

    async def _settle_unsettled(self) -> None:
        """Try again to mark the messages found in doubt whose mark the disk
        refused at open."""
        async with self._op_lock:
            for msg, checked_out in list(self._unsettled.values()):
                try:
                    await self._settle_in_doubt(msg, checked_out=checked_out)
                except NotFoundError:  # its record is gone (removed by hand)
                    self._unsettled.pop(msg.id, None)
                    log.warning("message held in doubt is no longer on disk", id=msg.id)
                except (SpooldError, OSError):
                    log.exception("could not settle a message in doubt", id=msg.id)

    @property
    def unsettled_in_doubt(self) -> int:
        """Messages found in doubt at open whose mark the disk has not
        taken yet (held, never sent, tried again at each ping)."""
        return len(self._unsettled)

    def skipped(self) -> dict[str, int]:
        """What this spool skips, by kind: ``unreadable_record`` (a record
        that could neither be read nor set aside at open), ``unusable_dir``
        (a directory this process cannot use), ``unmarked_in_doubt`` (see
        :attr:`unsettled_in_doubt`). Each is in the log too; ``check``
        reports the first two."""
        return {
            "unreadable_record": len(self._disk.skipped),
            "unusable_dir": len(self._disk.store.unusable),
            "unmarked_in_doubt": len(self._unsettled),
        }

    @property
    def spool_dir(self) -> Path:
        return self._disk.dir

    @property
    def ondisk(self) -> OnDiskSpool:
        return self._disk

    @property
    def settings(self) -> SpoolSettings:
        """What may change while the spool runs (concurrency, retry
        defaults, free-space floor, durability, delivery policy, crash rule,
        retention windows), as one value. Assigning a new one (a reload)
        applies it as a whole: the next attempt, add and housekeeping round
        read it, and the timers their next round."""
        return self._settings

    @settings.setter
    def settings(self, value: SpoolSettings) -> None:
        self._settings = value
        self._disk.store.min_free_bytes = value.min_free_space
        self._disk.store.sync = value.sync
        self._poke()  # more attempts may start now

    # One setting at a time: each reads :attr:`settings` and, assigned,
    # replaces it with a value that differs in that field. min_free_space:
    # bytes that must stay free on the spool's filesystem, or add() raises
    # InsufficientStorageError (0: no floor).
    max_concurrent_send_jobs = Setting[int]()
    min_free_space = Setting[int]()
    sync = Setting[SyncMode]()
    default_retry_intervals = Setting[Sequence[RetryInterval]](convert=tuple)
    delivery_policy = Setting[DeliveryPolicy]()
    after_crash = Setting[AfterCrash]()
    removed_retention = Setting[timedelta]()
    history_retention = Setting[timedelta]()
    idempotency_window = Setting[timedelta]()
    _max_jobs = Setting[int]("max_concurrent_send_jobs")
    _ping_interval = Setting[float]("ping_interval")
    _housekeeping_interval = Setting[timedelta]("housekeeping_interval")

    @property
    def limits(self) -> LimitsSource | None:
        """Where destination limits come from (None: none). Replacing it
        (a reload) applies the new limits to messages already waiting."""
        return self._limits

    @limits.setter
    def limits(self, value: LimitsSource | None) -> None:
        self._limits = value
        for name, (entry, _gen) in self._gate.heads():
            found = self._destination_of(entry.msg)
            self._gate.set_limits(name, found[1] if found and found[0] == name else None)
        self._poke()

    def set_hooks(self, presend: PresendHook | None, on_error: OnErrorHook | None) -> None:
        """Replace both hooks at once (None: the default)."""
        self.presend = presend or default_presend
        self.on_error = on_error or default_on_error

    @property
    def running_sends(self) -> int:
        return self._running

    async def kill_and_flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Start no new attempt; wait for those under way. Raises
        :class:`TimeoutError` if they are not done within ``timeout``.
        From then on :meth:`add` and the operator operations are refused
        (:class:`~spoold.errors.SpoolClosedError`)."""
        self._stopping = True
        self._poke()
        if self._running == 0:
            return
        with anyio.fail_after(timeout):
            await self._idle.wait()

    # ---------------------------------------------------------- scheduling

    def _poke(self) -> None:
        self._wake.set()

    def _schedule(self, entry: _Entry) -> None:
        """(Re)arm ``entry``'s timer by its status; any older timer is stale."""
        status = entry.msg.status
        if isinstance(status, SendNow):
            entry.gen = self._timers.arm(entry.msg.id, 0.0)
        elif isinstance(status, SendAt):
            entry.gen = self._timers.arm(entry.msg.id, status.at.timestamp())
        else:
            entry.gen = self._timers.new_generation()
            return
        self._poke()

    async def _dispatch_loop(self, tg: anyio.abc.TaskGroup) -> None:
        gate = self._gate
        while True:
            wake = self._wake
            now_ts = self.clock.now().timestamp()
            timers = self._timers
            if not self._stopping and self._running < self._max_jobs:
                # Those waiting on their destination first: they were due earlier.
                for name, (waiting, gen) in gate.ready(now_ts):
                    current = self._index.get(waiting.msg.id)
                    if current is not waiting or waiting.gen != gen or waiting.busy:
                        gate.give_back(name)  # changed while it waited: not for us
                    elif hold := gate.hops_hold(_held_hops(waiting), now_ts):
                        gate.give_back(name)  # its hops were backed off while it waited
                        self._hold(waiting, gen, hold)
                    else:
                        self._start(tg, waiting, name)
                    if self._running >= self._max_jobs:
                        break
            while not self._stopping and self._running < self._max_jobs:
                due = timers.pop_due(now_ts)
                if due is None:
                    break
                mid, gen = due
                entry = self._index.get(mid)
                if entry is None or entry.gen != gen or entry.busy:
                    continue
                destination = self._destination_of(entry.msg)
                hold = gate.admit(destination, _held_hops(entry), now_ts)
                if hold is not None:
                    self._hold(entry, gen, hold)
                    continue
                self._start(tg, entry, destination[0] if destination else None)
            deadline = None
            if not self._stopping and self._running < self._max_jobs:
                times = [t for t in (timers.next_time(), gate.next_wake(now_ts)) if t is not None]
                if times:
                    deadline = datetime.fromtimestamp(min(times), UTC)
            await self.clock.wait(wake, deadline)
            if wake.is_set():
                self._wake = anyio.Event()

    def _start(self, tg: anyio.abc.TaskGroup, entry: _Entry, destination: str | None) -> None:
        entry.busy = True
        entry.destination = destination
        self._running += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        tg.start_soon(self._send, entry, name=f"send {entry.msg.id}")

    def _destination_of(self, msg: Message) -> tuple[str, DestinationLimits] | None:
        source = self._limits
        if source is None:
            return None
        try:
            return source.limits_for(msg)
        except Exception:
            log.exception("limits could not be found; sending unlimited", id=msg.id)
            return None

    def _hold(self, entry: _Entry, gen: int, hold: Hold) -> None:
        """Keep a due message back for its destination's limits or its
        hops' backoff; in memory only (its record still says it is due)."""
        if hold.until is not None:
            entry.gen = self._timers.arm(entry.msg.id, hold.until)
        elif hold.destination is not None:
            self._gate.wait(hold.destination, (entry, gen))
        log.debug(
            "held by its destination",
            id=entry.msg.id,
            flows=entry.msg.flows,
            destination=hold.destination,
            reason=hold.reason,
        )

    async def _wakeup_loop(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Adopt messages other processes added (they send their ids)."""
        async with self._disk.wakeups() as batches:
            task_status.started()
            async for names in batches:
                try:
                    await self._adopt(names)
                except (SpooldError, OSError):
                    log.exception("could not adopt added messages; the next rescan will")

    async def _rescan(self) -> None:
        """Backstop for lost wake-ups: adopt records on disk that the index
        does not know (a directory listing; records are read only for new
        names)."""
        unknown = []
        for queue in _LOADED_QUEUES:
            if not self._disk.usable(queue):
                continue
            for name, checked_out in await self._disk.names(queue):
                if not checked_out and name not in self._index:
                    unknown.append(name)
        if unknown:
            await self._adopt(unknown)

    async def _adopt(self, names: Sequence[str]) -> None:
        async with self._op_lock:  # no operator change runs meanwhile
            await self._adopt_locked(names)

    async def _adopt_locked(self, names: Sequence[str]) -> None:
        # Not what this spool is adding: add() indexes it itself, and
        # adopting it first could bring it back after it was delivered.
        wanted = [
            n
            for n in dict.fromkeys(names)
            if n not in self._adding
            and n not in self._index
            and n not in self._unsettled
            and n not in self._disk.skipped  # unreadable: reported once, at open
        ]
        if not wanted:
            return
        found = await self._disk.read_new(wanted, _LOADED_QUEUES)  # one thread hop for all
        for name, (queue, result) in found.items():
            if isinstance(result, RecordError):
                log.error("added record cannot be read", id=name, error=str(result))
                continue
            msg = result
            if name in self._index or name in self._adding:
                continue  # indexed meanwhile
            if msg.queue is not queue:
                continue  # written elsewhere than its status says: next open repairs it
            _sending_reads_as_send_now(msg)
            entry = _Entry(msg, queue)
            self._index_put(entry)  # no await before the publish (as in add)
            self._schedule(entry)
            self._publish(EventKind.SPOOLED, msg)
            log.debug("adopted", id=name, flows=msg.flows, queue=queue.value)

    async def _ping_loop(self) -> None:
        never = anyio.Event()
        while True:
            await self.clock.wait(never, self.clock.now() + timedelta(seconds=self._ping_interval))
            self._publish(EventKind.PING)
            if self._unsettled:
                await self._settle_unsettled()
            try:
                await self._rescan()
            except (SpooldError, OSError):
                log.exception("rescan of the spool failed; trying again at the next ping")

    # ------------------------------------------------------------- sending

    async def _send(self, entry: _Entry) -> None:
        try:
            await self._attempt(entry)
        except Exception:
            log.exception(
                "attempt failed unexpectedly; retrying in a minute",
                id=entry.msg.id,
                flows=entry.msg.flows,
            )
            await self._recover_from_failed_attempt(entry)
        finally:
            entry.busy = False
            if entry.destination is not None:
                self._gate.done(entry.destination)
                entry.destination = None
            self._running -= 1
            if self._running == 0:
                self._idle.set()
            self._poke()

    async def _attempt(self, entry: _Entry) -> None:
        msg = entry.msg
        mlog = log.bind(id=msg.id, flows=msg.flows)
        kicked, entry.kicked = entry.kicked, False
        before = msg.status
        msg.status = Sending()
        try:
            decision = await self._ask_presend(msg)
        except Exception as exc:  # noqa: BLE001 (a hook's failure must not lose the message)
            mlog.exception("presend hook failed; trying later")
            msg.status = before
            await self._checkout(entry)
            await self._finish_attempt(
                entry,
                AttemptFailed(f"presend hook failed: {exc!r}"),
                operator_kick=kicked,
            )
            return
        self._publish(EventKind.PRESEND, msg, detail=_decision_name(decision))
        if not isinstance(decision, SendNow):
            msg.status = before
            new = await self._change(entry, decision)
            if isinstance(decision, SendAt):
                self._publish(EventKind.DELAYED, new, at=decision.at)
            if isinstance(decision, Removed):
                self._record_final(new, FinalOutcome.REMOVED, detail="removed by the presend hook")
            return
        await self._checkout(entry)
        self._follow_route(msg)
        snapshot = msg.copy()
        # Hops backed off go last for this attempt (the record keeps its order).
        snapshot.next_hop_choices = self._gate.order_hops(
            msg.next_hop_choices, self.clock.now().timestamp()
        )
        body = BodyHandle(
            self._disk.body_path(msg.id), self._disk.store.run_grouped, msg.body_check()
        )
        try:
            outcome = await self.relay.relay(snapshot, body, list(msg.remaining_recipients))
        except BodyDamagedError as exc:
            await self._set_aside_damaged(entry, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 (a relay bug must not lose the message)
            mlog.exception("relay raised; trying later")
            outcome = AttemptFailed(f"relay error: {exc!r}")
        await self._finish_attempt(entry, outcome, operator_kick=kicked)

    async def _set_aside_damaged(self, entry: _Entry, reason: str) -> None:
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

    def _follow_route(self, msg: Message) -> None:
        """Before an attempt: if the message's route now has other hops (a
        reload changed it), use them. Changed in memory only; the record
        written after the attempt carries them."""
        if self.routes is None or msg.route is None:
            return
        try:
            hops = self.routes.current_hops(msg)
        except Exception:
            log.exception("routes could not say the current hops", id=msg.id, flows=msg.flows)
            return
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

    async def _recover_from_failed_attempt(self, entry: _Entry) -> None:
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
        decision = await call_hook(self.presend, msg.copy())
        if not isinstance(decision, PRESEND_CHOICES):
            raise TypeError(f"presend answered {decision!r}, not one of its choices")
        if isinstance(decision, SendAt) and decision.at.tzinfo is None:
            raise TypeError(f"presend answered {decision!r}: the time needs a time zone")
        return decision

    async def _checkout(self, entry: _Entry) -> None:
        await self._disk.checkout(entry.msg, entry.queue)
        entry.checked_out = True

    async def _finish_attempt(
        self, entry: _Entry, outcome: Delivery | AttemptFailed, *, operator_kick: bool
    ) -> None:
        old = entry.msg
        actions = {
            rcpt: await self._ask_on_error(old, rcpt, result)
            for rcpt, result in refusals(old, outcome).items()
            if not result.in_doubt  # not a refusal: handled as after a crash
        }
        now = self.clock.now()
        policy = self.policy_for(old)
        result = attempt_outcome(
            old,
            outcome,
            actions,
            now=now,
            draw=lambda interval: interval.draw(self._rng),
            operator_kick=operator_kick,
            policy=policy,
            after_crash=self.after_crash,
        )
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
        await self._save_outcome(entry, new)
        entry.checked_out = False
        self._apply(entry, new)
        if isinstance(new.status, Delivered):
            self._record_final(new, FinalOutcome.DELIVERED, relay_outcome=outcome)
        elif event is EventKind.REMOVED:
            self._record_final(new, FinalOutcome.BOUNCED, relay_outcome=outcome, detail="bounced")
        detail = "bounced" if event is EventKind.REMOVED else None
        if result.in_doubt:
            detail = "in doubt: no reply to the end of the message"
        self._publish(event, new, at=result.at, detail=detail)
        self._hop_feedback(result.hops, new)
        log.info(
            "attempt done",
            id=new.id,
            flows=new.flows,
            outcome=event,
            delivered=len(result.delivered),
            failed=len(result.failed),
            later=len(result.later),
            at=result.at,
        )

    def policy_for(self, msg: Message) -> DeliveryPolicy:
        """The delivery policy of ``msg``: the spool's, with the queue
        lifetime and retries-exhausted rule of its route when
        :attr:`route_lifetimes` or :attr:`route_retries_exhausted` name it."""
        policy = self.delivery_policy
        if not msg.route:
            return policy
        lifetime = self.route_lifetimes.get(msg.route)
        if lifetime is not None:
            policy = dataclasses.replace(policy, max_queue_lifetime=lifetime)
        exhausted = self.route_retries_exhausted.get(msg.route)
        if exhausted is not None:
            policy = dataclasses.replace(policy, retries_exhausted=exhausted)
        return policy

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
                reporting_mta=self.reporting_mta,
                now=now,
                retry_until=expiry,
            )
            wire = dsn_body(dsn)
            params = [] if sender.isascii() else ["SMTPUTF8"]
            probe = RoutedEnvelope("", [sender], original.next_hop_choices, mail_params=params)
            envelopes = [probe]
            if self.routes is not None:
                envelopes = await self.routes.reroute(
                    message_for_envelope(
                        probe, id=original.id, spool_date=now, parent_id=original.id
                    )
                )
            if len(envelopes) != 1:
                raise OperationRefusedError(f"the sender {sender} has no single route")
            env = envelopes[0]
            intervals = list(env.retry_intervals) or list(self.default_retry_intervals)

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

            (added,) = await self._add_to_disk([NewMessage(wire, SEND_NOW, build)])
        except (SpooldError, OSError, ValueError) as exc:
            mlog.error("could not add a delivery status notification", error=str(exc))
            return None
        if added.id not in self._index:
            entry = _Entry(added, Queue.ACTIVE)
            self._index_put(entry)
            self._schedule(entry)
            self._publish(EventKind.SPOOLED, added)
        self._adding.discard(added.id)
        mlog.info("delivery status notification spooled", dsn_id=added.id, to=sender)
        return added.id

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

    def _hop_feedback(self, hops: HopFeedback, msg: Message) -> None:
        """What an attempt said about its next hops: back off those that
        throttled us, forgive one that answered. (The one place per-hop
        results of attempts are known: per-hop counters belong here.)"""
        now = self.clock.now()
        for hop in hops.throttled:
            backoff = self._gate.throttled(hop, now.timestamp(), hops.reason)
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

    async def _save_outcome(self, entry: _Entry, new: Message) -> None:
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
        never = anyio.Event()
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
                await self.clock.wait(never, self.clock.now() + timedelta(seconds=delay))
                delay = min(delay * 2, _OUTCOME_RETRY_MAX)
                retried = True
                continue
            if retried:
                log.info("outcome of an attempt written", id=new.id, flows=new.flows)
            return

    async def _rewrite_outcome(self, entry: _Entry, new: Message) -> None:
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
            action = await call_hook(self.on_error, msg.copy(), rcpt, result)
            return ErrorAction(action)
        except Exception:
            log.exception("on_error hook failed; trying later", id=msg.id, flows=msg.flows)
            return ErrorAction.TRY_LATER

    # --------------------------------------------------- applying changes

    def _apply(self, entry: _Entry, new: Message) -> None:
        """Put a record already written to disk into the index."""
        queue = new.queue
        if queue in _LOADED_QUEUES:
            entry.msg = new
            self._index_put(entry, queue)
            self._schedule(entry)
        else:
            entry.gen = self._timers.new_generation()
            self._index_drop(new.id)

    async def _change(
        self, entry: _Entry, status: Status, *, edit: Callable[[Message], None] | None = None
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

    def _publish(
        self,
        kind: EventKind,
        msg: Message | None = None,
        *,
        detail: str | None = None,
        at: datetime | None = None,
    ) -> None:
        event = SpoolEvent(
            self.clock.now(),
            kind,
            msg.id if msg else None,
            msg.envelope_info if msg else None,
            detail,
            at,
        )
        self._hub.publish(event)
        if msg is not None:
            self._note_outcome(event, msg)

    # -------------------------------------------------------------- adding

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
        """Spool one submission: one message per envelope of ``batch``.

        ``prefix(id)``, when given, makes wire-form lines (CRLF, none
        starting with a dot) put before the body of the message with that
        id: the SMTP listener's ``Received:`` header names the message's own
        id this way. Returns once every message is durable on disk; their
        ids in order. Each message's ``spooled`` event is published before
        this returns and before any attempt on it can start.
        ids in order.

        ``idempotency_key``: a submission given a key that an earlier one
        had, within :attr:`idempotency_window`, queues nothing and returns
        the earlier submission's ids (no error), whether those messages
        are still queued or already gone, and across restarts and
        processes (see :mod:`spoold.idempotency`). Raises
        :class:`~spoold.errors.IdempotencyKeyError` for an unusable key, or
        one an earlier submission with another envelope (sender and
        recipients) had: a reused key is a mistake, not a retry.

        ``submitter_uid``: the local user who submitted it (the daemon's
        control socket knows), kept in each record and its history line.
        """
        if idempotency_key is None:
            return await self._add_new(batch, frozen, flows, parent_id, prefix, None, submitter_uid)
        ids, repeated = await self._keys.add_once(
            idempotency_key,
            batch,
            self.clock.now(),
            self.idempotency_window,
            lambda: self._add_new(
                batch, frozen, flows, parent_id, prefix, idempotency_key, submitter_uid
            ),
        )
        if repeated:
            log.info("duplicate submission: idempotency key seen", ids=ids)
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
        status: Status = Frozen() if frozen else SEND_NOW
        messages = await self._write_new(
            batch,
            status,
            flows,
            parent_id,
            prefix,
            idempotency_key=idempotency_key,
            submitter_uid=submitter_uid,
        )
        for msg in messages:
            if msg.id in self._index:
                continue  # a rescan adopted it while we were writing
            entry = _Entry(msg, Queue.FROZEN if frozen else Queue.ACTIVE)
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
        self._adding.difference_update(m.id for m in messages)
        return [m.id for m in messages]

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

    async def _write_new(
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
        if self._closed or self._stopping:
            raise SpoolClosedError(f"spool {self.spool_dir} is closing and takes no new mail")
        new = new_messages(
            batch,
            status=status,
            spool_date=self.clock.now(),
            default_retry_intervals=self.default_retry_intervals,
            flows=flows,
            parent_id=parent_id,
            prefix=prefix,
            idempotency_key=idempotency_key,
            submitter_uid=submitter_uid,
        )
        return await self._add_to_disk(new)

    async def _add_to_disk(self, new: Sequence[NewMessage]) -> list[Message]:
        """Write new messages; their ids stay in ``_adding`` (so rescans leave
        them alone) until the caller has indexed them and discards them."""
        reserved: list[str] = []

        def on_reserve(name: str) -> None:  # in the store's worker thread
            reserved.append(name)
            self._adding.add(name)

        try:
            return await self._disk.add(new, on_reserve)
        except BaseException:
            self._adding.difference_update(reserved)
            raise

    # ----------------------------------------------- operator operations

    def _lookup(self, ids: Iterable[str]) -> list[_Entry]:
        entries = []
        for raw in dict.fromkeys(ids):  # an id given twice is handled once
            mid = validate_id(raw)
            entry = self._index.get(mid)
            if entry is None:
                raise NotFoundError(f"{mid}: no such message in active or frozen")
            entries.append(entry)
        return entries

    def _refuse_if_closing(self, verb: str) -> None:
        if self._closed or self._stopping:
            raise SpoolClosedError(
                f"cannot {verb}: spool {self.spool_dir} is shutting down (kill_and_flush) "
                "and takes no more changes"
            )

    @staticmethod
    def _refuse_if_busy(entries: Sequence[_Entry], verb: str) -> None:
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

            async def one(e: _Entry) -> None:
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

            async def one(e: _Entry) -> None:
                new = await self._change(e, Removed())
                self._record_final(new, FinalOutcome.REMOVED, detail="removed by an operator")

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
                entry = _Entry(new, Queue.FROZEN)
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
        routes = self.routes
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

            async def one(e: _Entry) -> None:
                out.extend(await self._reroute_one(e, routes))

            await self._each(entries, one)
            return out

    async def _reroute_one(self, entry: _Entry, routes: Routes) -> list[str]:
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
            part_entry = _Entry(part, entry.queue)
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

    async def _each(self, entries: Sequence[_Entry], fn: Callable[[_Entry], Any]) -> None:
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

    # ------------------------------------------------- history and retention

    def _record_final(
        self,
        msg: Message,
        outcome: FinalOutcome,
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

    async def _housekeeping_loop(self) -> None:
        """Delete expired removed messages, history and keys: at open, then
        every ``housekeeping_interval`` on the spool's clock."""
        never = anyio.Event()
        while True:
            try:
                await self.housekeeping()
            except (SpooldError, OSError):
                log.exception("housekeeping failed; trying again at the next round")
            await self.clock.wait(never, self.clock.now() + self._housekeeping_interval)

    async def housekeeping(self) -> dict[str, int]:
        """One housekeeping round now: delete the removed messages older
        than :attr:`removed_retention` (from their removal), the history
        older than :attr:`history_retention` and the idempotency keys older
        than :attr:`idempotency_window`. Returns how many of each went."""
        now = self.clock.now()
        removed = await self._expire_removed(now)
        history = await self._history.prune(now, self.history_retention)
        keys = await self._keys.expire(now, self.idempotency_window)
        if removed or history or keys:
            log.info(
                "housekeeping", removed_deleted=removed, history_files=history, keys_expired=keys
            )
        return {"removed": removed, "history_files": history, "keys": keys}

    async def _expire_removed(self, now: datetime) -> int:
        messages, _unreadable = await self._disk.load(Queue.REMOVED)
        cutoff = now - self.removed_retention
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

    async def _repair_keys(self) -> None:
        """At open: key files name every queued message submitted with a
        key (a crash may have come between the record and the key file)."""
        found = [
            (e.msg.idempotency_key, e.msg.id, e.msg.spool_date)
            for e in self._index.values()
            if e.msg.idempotency_key is not None
        ]
        if found:
            await self._keys.repair(found, self.clock.now(), self.idempotency_window)

    # -------------------------------------------------------------- reading

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

    @property
    def sending(self) -> int:
        """How many messages of ``active`` are in a send job now (their
        status is, or is about to be, ``sending``)."""
        return self._running

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

    # --------------------------------------------------------------- index

    def _index_put(self, entry: _Entry, queue: Queue | None = None) -> None:
        """Index ``entry`` (in ``queue``, when it moves there), keeping the
        per-queue counts."""
        old = self._index.get(entry.msg.id)
        if old is not None:
            self._queue_counts[old.queue] -= 1
        if queue is not None:
            entry.queue = queue
        self._index[entry.msg.id] = entry
        self._queue_counts[entry.queue] += 1

    def _index_drop(self, message_id: str) -> None:
        old = self._index.pop(message_id, None)
        if old is not None:
            self._queue_counts[old.queue] -= 1

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

    # ---------------------------------------------------- waiting for outcomes

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
            if self._closed:
                raise SpoolClosedError(f"spool {self.spool_dir} closed while waiting for {mid}")
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
            if found is not None and found.queue in _LOADED_QUEUES:
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
        kinds = {
            FinalOutcome.DELIVERED: OutcomeKind.DELIVERED,
            FinalOutcome.BOUNCED: OutcomeKind.BOUNCED,
            FinalOutcome.REMOVED: OutcomeKind.REMOVED,
        }
        failed = tuple(r.recipient for r in found.recipients if r.state is RecipientState.FAILED)
        return MessageOutcome(
            id=found.id,
            kind=kinds[found.outcome],
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

    def _note_outcome(self, event: SpoolEvent, msg: Message) -> None:
        """Remember the outcome an event stands for (if it is one) and wake
        the :meth:`wait` calls for its message. An event named like an
        outcome is one; ``removed`` with detail ``bounced`` is ``bounced``;
        ``recovered`` leaves the message frozen."""
        name = OutcomeKind.FROZEN.value if event.kind is EventKind.RECOVERED else event.kind.value
        if event.kind is EventKind.REMOVED and event.detail == "bounced":
            name = OutcomeKind.BOUNCED.value  # removed after a report to its sender
        if name not in _OUTCOME_NAMES:
            return
        kind = OutcomeKind(name)
        detail = event.detail if kind is OutcomeKind.QUARANTINED else None
        self._outcomes.reached(MessageOutcome.of(kind, msg, event.time, detail))

    @staticmethod
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

    @staticmethod
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

    @staticmethod
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


def _held_hops(entry: _Entry) -> Sequence[str]:
    """The next hops whose backoff may hold ``entry`` back: none for a
    message an operator asked to send (``spoold send`` tries it now; its
    route's connection and rate limits still apply)."""
    return () if entry.kicked else entry.msg.next_hop_choices


def _sending_reads_as_send_now(msg: Message) -> None:
    """A record stored as ``sending`` (written by hand or by another tool:
    this spool only says so in memory) has no attempt under way in this
    process: it is due now, else nothing would ever schedule it."""
    if isinstance(msg.status, Sending):
        msg.status = SEND_NOW


def _decision_name(decision: PresendDecision) -> str:
    return {SendNow: "send_now", SendAt: "send_at", Frozen: "freeze", Removed: "remove"}[
        type(decision)
    ]
