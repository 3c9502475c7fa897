"""The spool: a facade over its rooms, and its lifecycle.

A :class:`Spool` owns one spool directory (through
:class:`~spoold.ondisk.OnDiskSpool`) and keeps the records of ``active`` and
``frozen`` in memory (never the bodies). It is opened with
``async with Spool.open(...) as spool`` and runs its tasks in a task group
that the context owns; leaving the context stops sending, waits up to
``flush_timeout`` for attempts under way, then cancels what is left (a
cancelled attempt leaves its record checked out, and the next open tries it
again: delivery is at least once).

This module holds the lifecycle (open, then stop) and
the public methods, each handed on to the room that holds its concern:

==========================  ===============================================
:mod:`spoold.state`         what the rooms share: index, events, settings
:mod:`spoold.scheduler`     timers, destination gate, send jobs, adoption
:mod:`spoold.submission`    the add path (shared with the ``SpoolWriter``)
:mod:`spoold.transitions`   one message's attempt and its outcome
:mod:`spoold.operations`    freeze, send, remove, recover, reroute...
:mod:`spoold.queries`       status, counts, events, wait, history
:mod:`spoold.housekeeping`  retention of removed messages, history, keys
:mod:`spoold.loading`       the index at open; messages in doubt after a crash
==========================  ===============================================

Each room's docstring states its own invariants. ``Spool`` stands above
them: it makes each, hands it the state it needs, and no room imports this
module.

Invariants of the lifecycle:

* Every change is written to disk before it is applied in memory, before an
  event is published and before the operation returns (in every room).
* After :meth:`Spool.kill_and_flush` (and while closing) the operator
  operations and :meth:`Spool.add` are refused with
  :class:`~spoold.errors.SpoolClosedError`.
* At open, the index is loaded and the messages in doubt after a crash
  are marked before anything is sent (:mod:`spoold.loading`).
* At open, before anything is sent, the idempotency keys are repaired
  (:meth:`Housekeeping.repair_keys <spoold.housekeeping.Housekeeping.repair_keys>`).
"""

from __future__ import annotations

import random
from collections.abc import (
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast, overload

import anyio
import anyio.abc

from spoold.address import validate_address
from spoold.clock import Clock, SystemClock
from spoold.dkim import DkimSigner
from spoold.events import Subscription
from spoold.history import History, Outcome
from spoold.hooks import OnErrorHook, PresendHook, default_on_error, default_presend
from spoold.hostname import local_hostname
from spoold.housekeeping import Housekeeping
from spoold.idempotency import DEFAULT_IDEMPOTENCY_WINDOW, KeyFiles
from spoold.limits import LimitsSource, SharedRates, SharedSlots
from spoold.loading import Loading
from spoold.message import (
    Message,
    Queue,
    RetryInterval,
    RoutedBatch,
    Status,
)
from spoold.ondisk import OnDiskSpool, Unreadable
from spoold.operations import Operations
from spoold.outcome import AfterCrash, DeliveryPolicy, RetriesExhausted, RetryPlan
from spoold.policy import LibraryPolicies, PolicySource
from spoold.queries import Queries, count_from_disk, status_from_disk, status_from_disk_pages
from spoold.relay import Relay
from spoold.scheduler import Scheduler
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
from spoold.state import LOADED_QUEUES, Routes, SpoolParts, SpoolState, log
from spoold.store import StepHook, SyncMode
from spoold.submission import OwnerSubmission
from spoold.suppression import (
    SuppressedRecipients,
    Suppression,
    Suppressions,
    SuppressionSource,
    suppression_for,
)
from spoold.tasks import own_tasks
from spoold.transitions import Transitions
from spoold.waiting import MessageOutcome

if TYPE_CHECKING:
    from spoold.fleet_keys import FleetKeys

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


_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])


class _Part(Generic[_T]):
    """An attribute of :class:`Spool` that its owner may replace while it is
    open (a reload), kept in the :class:`~spoold.state.SpoolParts` that
    the rooms read."""

    def __set_name__(self, owner: type[Spool], name: str) -> None:
        self._name = name

    @overload
    def __get__(self, spool: None, owner: type[Spool]) -> _Part[_T]: ...
    @overload
    def __get__(self, spool: Spool, owner: type[Spool]) -> _T: ...
    def __get__(self, spool: Spool | None, owner: type[Spool]) -> _Part[_T] | _T:
        if spool is None:
            return self
        return cast(_T, getattr(spool._state.parts, self._name))

    def __set__(self, spool: Spool, value: _T) -> None:
        setattr(spool._state.parts, self._name, value)


def _doc_of(room_method: Callable[..., Any]) -> Callable[[_F], _F]:
    """Give a method handed on to a room the docstring of the room's method
    (the contract is written once, beside the code that keeps it)."""

    def give(method: _F) -> _F:
        method.__doc__ = room_method.__doc__
        return method

    return give


class Spool:
    """A running spool. Create it with :meth:`open`."""

    # Replaceable while open (a reload); see open() for each.
    relay = _Part[Relay]()
    presend = _Part[PresendHook]()
    on_error = _Part[OnErrorHook]()
    reporting_mta = _Part[str]()
    dkim = _Part[DkimSigner | None]()

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
    suppress_after_hard_bounce = Setting[timedelta | None]()
    suppressed_recipients = Setting[SuppressedRecipients]()
    max_suppressed = Setting[int]()

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
        policies: PolicySource | None = None,
        dkim: DkimSigner | None = None,
    ) -> None:
        self._disk = ondisk
        self.clock = clock
        library = LibraryPolicies(
            routes=routes,
            limits=limits,
            delivery=settings.delivery_policy,
            route_lifetimes=route_lifetimes,
            route_retries_exhausted=route_retries_exhausted,
        )
        parts = SpoolParts(
            relay=relay,
            presend=presend or default_presend,
            on_error=on_error or default_on_error,
            routes=routes,
            policies=policies or library,
            library=library,
            reporting_mta=reporting_mta or local_hostname(),
            settings=settings,
            dkim=dkim,
        )
        self._state = state = SpoolState(ondisk, clock, parts)
        self._history = history = History(ondisk.dir, ondisk.store.run_grouped)
        keys = KeyFiles(ondisk.dir)  # one per spool: its locks are per key
        self._scheduler = scheduler = Scheduler(state)
        self._submission = submission = OwnerSubmission(state, keys, scheduler.schedule)
        self._transitions = transitions = Transitions(
            state, scheduler, submission, history, rng or random.Random()
        )
        self._operations = Operations(state, scheduler, submission, transitions)
        self._queries = Queries(state, scheduler, history)
        self._housekeeping = Housekeeping(state, history, keys)
        self._loading = Loading(state, scheduler)

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
        policies: PolicySource | None = None,
        settings: SpoolSettings | None = None,
        dkim: DkimSigner | None = None,
        before_start: Callable[[Spool], None] | None = None,
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
        runs (fault injection: :class:`spoold.testing.Faults`), in worker
        threads, possibly two at once (a large group commit writes its
        files in two): a hook that keeps state must lock it.
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
        ``policies``: where each message's destination policy comes from
        (:class:`~spoold.policy.PolicySource`: next hops, session settings,
        limits, delivery rules; the daemon's router); None: one made of
        ``routes``, ``limits``, ``delivery_policy``, ``route_lifetimes``
        and ``route_retries_exhausted`` (:class:`~spoold.policy.LibraryPolicies`),
        which are then ignored otherwise. Replaceable through :attr:`policies`.
        ``settings``: all of ``max_concurrent_send_jobs``,
        ``default_retry_intervals``, ``ping_interval``, ``min_free_space``,
        ``sync``, ``delivery_policy``, ``after_crash``, ``removed_retention``,
        ``history_retention``, ``idempotency_window`` and
        ``housekeeping_interval`` as one value
        (:class:`~spoold.settings.SpoolSettings`); given, it is used instead
        of those keyword arguments. Readable and replaceable while open
        through :attr:`settings`.
        ``dkim``: the signing keys (:class:`~spoold.dkim.DkimSigner`): each
        message added (:meth:`add`, :meth:`quarantine`) whose ``From:``
        domain has a key gets its ``DKIM-Signature:`` fields once, before it
        is written, so every attempt sends the same signed message. None:
        nothing is signed. Replaceable through :attr:`dkim` (a reload).
        ``before_start``: called with the spool once its messages are
        loaded, before any attempt or other task starts: a subscription made
        there (:meth:`events`) misses no event of this open.

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
            # doubt (see Loading.settle_in_doubt): never back in its queue unmarked.
            keep_checkouts=(Queue.ACTIVE,),
            keep_listings=LOADED_QUEUES,  # the load takes them: not listed twice
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
                policies=policies,
                dkim=dkim,
            )
            cut_short = {name for queue, name in report.kept_checkouts if queue == Queue.ACTIVE}
            await spool._loading.load(cut_short, report.take_listing)
            report.listings.clear()  # a listing not taken: no old listing is kept
            await spool._housekeeping.repair_keys()
            await spool._state.suppressions.load()
            if before_start is not None:
                before_start(spool)
            async with own_tasks(f"spool {spool.spool_dir}") as tg:
                tg.start_soon(spool._scheduler.dispatch_loop, tg, spool._transitions.send)
                tg.start_soon(spool._scheduler.ping_loop, spool._loading.settle_unsettled)
                tg.start_soon(spool._history.run)
                tg.start_soon(spool._housekeeping.loop)
                await tg.start(spool._scheduler.wakeup_loop)
                try:
                    yield spool
                finally:
                    with anyio.CancelScope(shield=True):
                        try:
                            await spool.kill_and_flush(flush_timeout)
                        except TimeoutError:
                            log.warning(
                                "attempts still running at close; they will be retried",
                                running=spool._scheduler.running,
                            )
                    spool._state.closed = True
                    spool._state.hub.close()
                    spool._state.outcomes.close()
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        await spool._history.flush()
        finally:
            with anyio.CancelScope(shield=True):
                await ondisk.close()

    @property
    def unsettled_in_doubt(self) -> int:
        """Messages found in doubt at open whose mark the disk has not
        taken yet (held, never sent, tried again at each ping)."""
        return len(self._state.unsettled)

    def skipped(self) -> dict[str, int]:
        """What this spool skips, by kind: ``unreadable_record`` (a record
        that could neither be read nor set aside at open), ``unusable_dir``
        (a directory this process cannot use), ``unmarked_in_doubt`` (see
        :attr:`unsettled_in_doubt`). Each is in the log too; ``check``
        reports the first two."""
        return {
            "unreadable_record": len(self._disk.skipped),
            "unusable_dir": len(self._disk.store.unusable),
            "unmarked_in_doubt": len(self._state.unsettled),
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
        retention windows, periods), as one value. Assigning a new one (a
        reload) applies it as a whole: the next attempt, add and
        housekeeping round read it, and the timers their next round."""
        return self._state.parts.settings

    @settings.setter
    def settings(self, value: SpoolSettings) -> None:
        parts = self._state.parts
        parts.settings = value
        parts.library.delivery = value.delivery_policy
        self._disk.store.min_free_bytes = value.min_free_space
        self._disk.store.sync = value.sync
        self._scheduler.poke()  # more attempts may start now

    @property
    def policies(self) -> PolicySource:
        """Where destination policies come from. Replacing it (a reload)
        applies to attempts started from then on, and the new limits to
        messages already waiting for their destination."""
        return self._state.parts.policies

    @policies.setter
    def policies(self, value: PolicySource) -> None:
        self._state.parts.policies = value
        self._scheduler.policies_changed()

    # The parts of the library's policy source (when :attr:`policies` is
    # it), under the names of the arguments of :meth:`open` that set them.

    @property
    def routes(self) -> Routes | None:
        """The routing asked for :meth:`reroute` and a notice's route (and,
        through the library's policy source, a message's current hops)."""
        return self._state.parts.routes

    @routes.setter
    def routes(self, value: Routes | None) -> None:
        self._state.parts.routes = self._state.parts.library.routes = value

    @property
    def limits(self) -> LimitsSource | None:
        return self._state.parts.library.limits

    @limits.setter
    def limits(self, value: LimitsSource | None) -> None:
        self._state.parts.library.limits = value
        self._scheduler.policies_changed()  # the new limits apply to those waiting

    @property
    def route_lifetimes(self) -> dict[str, timedelta]:
        return self._state.parts.library.route_lifetimes

    @route_lifetimes.setter
    def route_lifetimes(self, value: Mapping[str, timedelta]) -> None:
        self._state.parts.library.route_lifetimes = dict(value)

    @property
    def route_retries_exhausted(self) -> dict[str, RetriesExhausted]:
        return self._state.parts.library.route_retries_exhausted

    @route_retries_exhausted.setter
    def route_retries_exhausted(self, value: Mapping[str, RetriesExhausted]) -> None:
        self._state.parts.library.route_retries_exhausted = dict(value)

    def set_hooks(self, presend: PresendHook | None, on_error: OnErrorHook | None) -> None:
        """Replace both hooks at once (None: the default)."""
        self.presend = presend or default_presend
        self.on_error = on_error or default_on_error

    @property
    def running_sends(self) -> int:
        return self._scheduler.running

    async def kill_and_flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Start no new attempt; wait for those under way. Raises
        :class:`TimeoutError` if they are not done within ``timeout``.
        From then on :meth:`add` and the operator operations are refused
        (:class:`~spoold.errors.SpoolClosedError`)."""
        await self._scheduler.stop(timeout)

    @property
    def waiters(self) -> int:
        """How many :meth:`wait` calls are waiting for an outcome now."""
        return self._queries.waiters

    @property
    def subscribers(self) -> int:
        """How many :meth:`events` subscriptions are open now."""
        return self._queries.subscribers

    async def flush_history(self) -> None:
        """Write the history journal's pending lines now (they are written
        in the background, in batches, and at close)."""
        await self._history.flush()

    # ------------------------------------------------------------ adding
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
        return await self._submission.add(
            batch,
            frozen=frozen,
            flows=flows,
            parent_id=parent_id,
            prefix=prefix,
            idempotency_key=idempotency_key,
            submitter_uid=submitter_uid,
        )

    @_doc_of(Operations.quarantine)
    async def quarantine(
        self,
        reason: str,
        batch: RoutedBatch,
        *,
        flows: Sequence[str] = (),
        parent_id: str | None = None,
    ) -> list[str]:
        return await self._operations.quarantine(reason, batch, flows=flows, parent_id=parent_id)

    # ----------------------------------------------- operator operations
    @_doc_of(Operations.freeze)
    async def freeze(self, ids: Iterable[str]) -> None:
        await self._operations.freeze(ids)

    @_doc_of(Operations.send)
    async def send(
        self,
        ids: Iterable[str] | None = None,
        *,
        which: Literal["ids", "all", "frozen_only"] = "ids",
        retry_intervals: Sequence[RetryInterval] = (),
    ) -> list[str]:
        return await self._operations.send(ids, which=which, retry_intervals=retry_intervals)

    @_doc_of(Operations.remove)
    async def remove(self, ids: Iterable[str]) -> None:
        await self._operations.remove(ids)

    @_doc_of(Operations.recover)
    async def recover(
        self, ids: Iterable[str], *, from_: Literal["removed", "quarantine"] | Queue
    ) -> None:
        await self._operations.recover(ids, from_=from_)

    @_doc_of(Operations.reroute)
    async def reroute(
        self,
        ids: Iterable[str] | None = None,
        *,
        which: Literal["ids", "all"] = "ids",
    ) -> list[str]:
        return await self._operations.reroute(ids, which=which)

    @_doc_of(Operations.retry_plan)
    def retry_plan(self, message_id: str) -> RetryPlan:
        return self._operations.retry_plan(message_id)

    @_doc_of(Transitions.policy_for)
    def policy_for(self, msg: Message) -> DeliveryPolicy:
        return self._transitions.policy_for(msg)

    # ----------------------------------------------------------- reading
    @_doc_of(Queries.status)
    def status(self) -> list[Message]:
        return self._queries.status()

    @_doc_of(Queries.snapshot)
    def snapshot(self, message_id: str, now: datetime) -> Message | None:
        return self._queries.snapshot(message_id, now)

    @_doc_of(Queries.peek)
    def peek(self, message_id: str, now: datetime) -> tuple[Message, Status] | None:
        return self._queries.peek(message_id, now)

    @_doc_of(Queries.status_ids)
    def status_ids(self, queue: Queue | None = None) -> list[str]:
        return self._queries.status_ids(queue)

    @_doc_of(Queries.counts)
    def counts(self) -> dict[Queue, int]:
        return self._queries.counts()

    @property
    def shared_rates(self) -> SharedRates | None:
        """Rates shared with other spools (a fleet's Redis:
        :class:`spoold.fleet.SharedState`): when set, an attempt of a
        destination with a rate also takes the shared token, and waits in
        its send job for it; None (the default): this spool's limits alone."""
        return self._scheduler.shared_rates

    @shared_rates.setter
    def shared_rates(self, shared: SharedRates | None) -> None:
        self._scheduler.shared_rates = shared

    @property
    def shared_keys(self) -> FleetKeys | None:
        """Fleet-wide idempotency claims (:mod:`spoold.fleet_keys`; the
        daemon's ``[fleet]``): a keyed :meth:`add` claims its key there too.
        None (the default): this spool's own keys alone."""
        return self._submission.shared_keys

    @shared_keys.setter
    def shared_keys(self, shared: FleetKeys | None) -> None:
        self._submission.shared_keys = shared

    @property
    def shared_slots(self) -> SharedSlots | None:
        """Connection slots shared with other spools (a fleet's Redis:
        :class:`spoold.fleet_slots.FleetSlots`): when set, an attempt of a
        destination with limits first takes a slot of its
        ``max_connections`` counted over all of them, is held back a moment
        when there is none, and its connection is closed when it ends (not
        kept for reuse); None (the default): this spool's limits alone."""
        return self._scheduler.shared_slots

    @shared_slots.setter
    def shared_slots(self, shared: SharedSlots | None) -> None:
        self._scheduler.shared_slots = shared

    @property
    def sending(self) -> int:
        """How many messages of ``active`` are in a send job now (their
        status is, or is about to be, ``sending``)."""
        return self._scheduler.running

    @_doc_of(Queries.oldest_spool_dates)
    def oldest_spool_dates(self) -> dict[Queue, datetime]:
        return self._queries.oldest_spool_dates()

    @_doc_of(Queries.get_message)
    async def get_message(self, message_id: str) -> Message:
        return await self._queries.get_message(message_id)

    @_doc_of(Queries.describe)
    async def describe(self, message_id: str) -> Message | Unreadable:
        return await self._queries.describe(message_id)

    @_doc_of(Queries.quarantined)
    async def quarantined(self) -> tuple[list[Message], list[Unreadable]]:
        return await self._queries.quarantined()

    @_doc_of(Queries.events)
    def events(self, max_buffer: int | None = None) -> Subscription:
        return self._queries.events(max_buffer)

    # ----------------------------------------------- waiting and history
    @_doc_of(Queries.wait)
    async def wait(self, message_id: str, timeout: float | None = None) -> MessageOutcome:  # noqa: ASYNC109
        return await self._queries.wait(message_id, timeout)

    @_doc_of(Queries.history)
    async def history(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        recipient: str | None = None,
    ) -> list[Outcome]:
        return await self._queries.history(since=since, until=until, recipient=recipient)

    @_doc_of(Queries.find_outcome)
    async def find_outcome(self, message_id: str) -> Outcome | None:
        return await self._queries.find_outcome(message_id)

    @_doc_of(Housekeeping.run_round)
    async def housekeeping(self) -> dict[str, int]:
        return await self._housekeeping.run_round()

    # ------------------------------------------------ the suppression list

    @property
    def suppressions(self) -> Suppressions:
        """The suppression list (:mod:`spoold.suppression`), with its
        :attr:`~spoold.suppression.Suppressions.counts`."""
        return self._state.suppressions

    def suppressed(self, addresses: Iterable[str] | None = None) -> list[Suppression]:
        """The suppressions in force now, by address: every one, or those
        of ``addresses`` (the others are not suppressed)."""
        now = self.clock.now()
        listed = self._state.suppressions
        if addresses is None:
            return listed.entries(now)
        found = listed.held(_checked_addresses(addresses), now).values()
        return sorted({e.address: e for e in found}.values(), key=lambda e: e.address)

    async def suppress(
        self, addresses: Iterable[str], *, for_: timedelta, reason: str = ""
    ) -> list[Suppression]:
        """Suppress ``addresses`` from now for ``for_`` (an operator's
        entry: it replaces one the address had). Durable when it returns;
        every process adding to the spool sees it from its next
        recipient. Raises :class:`~spoold.errors.AddressError` for an
        address that is not one (nothing is changed)."""
        if for_ <= timedelta(0):
            raise ValueError(f"a suppression must last longer than 0s, got {for_}")
        now = self.clock.now()
        new = [
            suppression_for(a, now=now, span=for_, reason=reason, source="operator")
            for a in _checked_addresses(addresses)
        ]
        return await self._state.suppressions.add(
            new, now=now, max_entries=self.settings.max_suppressed, extend_only=False
        )

    async def unsuppress(self, addresses: Iterable[str]) -> list[str]:
        """Lift the suppression of ``addresses``; the (normalised) ones that
        were suppressed. Durable when it returns. An address that is not
        valid is taken when the list holds it as it is (a line edited by
        hand); otherwise it raises :class:`~spoold.errors.AddressError`."""
        listed = self._state.suppressions
        given = [addresses] if isinstance(addresses, str) else list(addresses)
        if not given:
            raise ValueError("expected at least one address")
        for address in given:
            if not listed.holds(address):
                validate_address(address, role="recipient", smtputf8=True)
        return await listed.remove(given, now=self.clock.now())

    async def unsuppress_source(
        self, source: SuppressionSource, *, within: timedelta | None = None
    ) -> list[str]:
        """Lift every suppression ``source`` made (``"bounce"``: after a
        wave of bounces a broken hop gave), or only those made in the last
        ``within``; the addresses lifted that were in force. Durable when
        it returns."""
        now = self.clock.now()
        since = None if within is None else now - within
        return await self._state.suppressions.remove_where(source=source, since=since, now=now)

    # ------------------------------------ reading a spool without owning it

    status_from_disk = staticmethod(status_from_disk)
    status_from_disk_pages = staticmethod(status_from_disk_pages)
    count_from_disk = staticmethod(count_from_disk)


def _checked_addresses(addresses: Iterable[str]) -> list[str]:
    """``addresses`` as a list, each a valid recipient address (raises
    :class:`~spoold.errors.AddressError`), at least one."""
    if isinstance(addresses, str):
        addresses = [addresses]
    checked = list(addresses)
    if not checked:
        raise ValueError("expected at least one address")
    for address in checked:
        validate_address(address, role="recipient", smtputf8=True)
    return checked
