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
* ``sending`` is a status this spool holds in memory only, during an
  attempt. A record stored as ``sending`` (by hand or by another tool) is
  loaded, or adopted, as ``send_now``: never left unscheduled.

The outcome of an attempt (which recipients are done, failed or left, and
the message's next status) is decided by :func:`spoold.outcome.attempt_outcome`,
a pure function; the spool asks ``on_error`` about each refusal, writes the
record it returns (retrying until the disk takes it: the hop's answers are
never thrown away) and publishes its event.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import anyio.abc
import msgspec
import structlog

from spoold.clock import Clock, SystemClock
from spoold.errors import (
    NotFoundError,
    OperationRefusedError,
    RecordError,
    SpoolClosedError,
    SpooldError,
    StoreError,
)
from spoold.events import EventHub, EventKind, SpoolEvent, Subscription
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
from spoold.ids import validate_id
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
    SendAt,
    Sending,
    SendNow,
    SharedParts,
    Status,
    gc_paused,
    message_for_envelope,
)
from spoold.ondisk import NewMessage, OnDiskSpool, Unreadable
from spoold.outcome import attempt_outcome, refusals
from spoold.relay import AttemptFailed, BodyHandle, Delivery, RecipientResult, Relay
from spoold.store import StepHook, SyncMode
from spoold.timers import Timers
from spoold.writer import new_messages

__all__ = [
    "Spool",
    "Routes",
    "DEFAULT_MAX_CONCURRENT_SEND_JOBS",
    "DEFAULT_RETRY_SPANS",
    "DEFAULT_RETRY_JITTER",
    "DEFAULT_RETRY_INTERVALS",
    "DEFAULT_FLUSH_TIMEOUT",
    "DEFAULT_PING_INTERVAL",
    "DEFAULT_MIN_FREE_SPACE",
    "DEFAULT_SYNC",
]

log = structlog.get_logger("spoold.spool")


# The one place the spool's defaults are written (the daemon's config reads them).
DEFAULT_MAX_CONCURRENT_SEND_JOBS = 64
DEFAULT_RETRY_SPANS = tuple(timedelta(minutes=m) for m in (1, 5, 15, 60, 120, 240, 480))
DEFAULT_RETRY_JITTER = 0.1  # a fraction of each interval
DEFAULT_RETRY_INTERVALS = RetryInterval.from_spans(DEFAULT_RETRY_SPANS, DEFAULT_RETRY_JITTER)
DEFAULT_FLUSH_TIMEOUT = 30.0  # seconds
DEFAULT_PING_INTERVAL = 30.0
DEFAULT_MIN_FREE_SPACE = 64 * 1024 * 1024
DEFAULT_SYNC: SyncMode = "syncfs"  # group commit: see spoold.store

_LOADED_QUEUES = (Queue.ACTIVE, Queue.FROZEN)
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
        max_concurrent_send_jobs: int,
        default_retry_intervals: Sequence[RetryInterval],
        ping_interval: float,
        rng: random.Random | None,
        routes: Routes | None = None,
    ) -> None:
        self._disk = ondisk
        self.relay = relay
        self.routes = routes  # may be replaced while open (a reload)
        self.presend: PresendHook = presend or default_presend
        self.on_error: OnErrorHook = on_error or default_on_error
        self.clock = clock
        self.default_retry_intervals = list(default_retry_intervals)
        self._max_jobs = max_concurrent_send_jobs
        self._ping_interval = ping_interval
        self._rng = rng or random.Random()
        self._index: dict[str, _Entry] = {}
        self._timers = Timers()
        self._queue_counts: dict[Queue, int] = dict.fromkeys(_LOADED_QUEUES, 0)
        self._adding: set[str] = set()  # ids add()/reroute() are writing now
        self._wake = anyio.Event()
        self._running = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._stopping = False
        self._closed = False
        self._op_lock = anyio.Lock()
        self._hub = EventHub()
        self._tg: anyio.abc.TaskGroup | None = None

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

        Raises :class:`~spoold.errors.SpoolLockedError` at once if another
        process owns it. Leaving the context stops new attempts, waits up to
        ``flush_timeout`` for those under way and closes the directory;
        an exception raised in the body leaves the context unchanged.
        """
        if max_concurrent_send_jobs < 1:
            raise ValueError("max_concurrent_send_jobs must be at least 1")
        if min_free_space < 0:
            raise ValueError("min_free_space must be >= 0")
        ondisk, _ = await OnDiskSpool.open(
            spool_dir,
            max_threads=max_threads,
            min_free_bytes=min_free_space,
            on_step=on_step,
            sync=sync,
        )
        try:
            spool = cls(
                ondisk,
                relay=relay,
                presend=presend,
                on_error=on_error,
                clock=clock or SystemClock(),
                max_concurrent_send_jobs=max_concurrent_send_jobs,
                default_retry_intervals=default_retry_intervals,
                ping_interval=ping_interval,
                rng=rng,
                routes=routes,
            )
            await spool._load()
            async with anyio.create_task_group() as tg:
                spool._tg = tg
                tg.start_soon(spool._dispatch_loop, tg)
                tg.start_soon(spool._ping_loop)
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
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await ondisk.close()

    async def _load(self) -> None:
        """Index and schedule every record of ``active`` and ``frozen``, batch
        by batch as they are read (so a large queue is built compactly: the
        temporaries of one batch are reused by the next)."""
        shared = SharedParts()
        for queue in _LOADED_QUEUES:

            def index(messages: list[Message], queue: Queue = queue) -> None:
                with gc_paused():
                    for msg in messages:
                        _sending_reads_as_send_now(msg)
                        entry = _Entry(msg, queue)
                        self._index_put(entry)
                        self._schedule(entry)

            # Records are interned in the reading thread (one batch at a time:
            # ``shared`` is only ever used there), as soon as they are decoded.
            await self._disk.load(queue, on_batch=index, prepare=lambda m: m.intern(shared))
        log.info(
            "spool opened",
            spool_dir=str(self._disk.dir),
            active=self._queue_counts[Queue.ACTIVE],
            frozen=self._queue_counts[Queue.FROZEN],
        )

    @property
    def spool_dir(self) -> Path:
        return self._disk.dir

    @property
    def ondisk(self) -> OnDiskSpool:
        return self._disk

    @property
    def max_concurrent_send_jobs(self) -> int:
        return self._max_jobs

    @max_concurrent_send_jobs.setter
    def max_concurrent_send_jobs(self, value: int) -> None:
        if value < 1:
            raise ValueError("max_concurrent_send_jobs must be at least 1")
        self._max_jobs = value
        self._poke()

    @property
    def min_free_space(self) -> int:
        """Bytes that must stay free in the spool's filesystem: below it,
        :meth:`add` raises :class:`~spoold.errors.InsufficientStorageError`
        (a temporary error); 0 turns the check off. Changeable while open."""
        return self._disk.store.min_free_bytes

    @min_free_space.setter
    def min_free_space(self, value: int) -> None:
        if value < 0:
            raise ValueError("min_free_space must be >= 0")
        self._disk.store.min_free_bytes = value

    @property
    def sync(self) -> SyncMode:
        return self._disk.store.sync

    @sync.setter
    def sync(self, value: SyncMode) -> None:
        self._disk.store.sync = value

    def set_hooks(self, presend: PresendHook | None, on_error: OnErrorHook | None) -> None:
        """Replace both hooks at once (None: the default)."""
        self.presend = presend or default_presend
        self.on_error = on_error or default_on_error

    @property
    def running_sends(self) -> int:
        return self._running

    async def kill_and_flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Start no new attempt; wait for those under way. Raises
        :class:`TimeoutError` if they are not done within ``timeout``."""
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
        while True:
            wake = self._wake
            now_ts = self.clock.now().timestamp()
            timers = self._timers
            while not self._stopping and self._running < self._max_jobs:
                due = timers.pop_due(now_ts)
                if due is None:
                    break
                mid, gen = due
                entry = self._index.get(mid)
                if entry is None or entry.gen != gen or entry.busy:
                    continue
                entry.busy = True
                self._running += 1
                self._idle = anyio.Event() if self._idle.is_set() else self._idle
                tg.start_soon(self._send, entry, name=f"send {mid}")
            deadline = None
            first = timers.next_time()
            if first is not None and not self._stopping and self._running < self._max_jobs:
                deadline = datetime.fromtimestamp(first, UTC)
            await self.clock.wait(wake, deadline)
            if wake.is_set():
                self._wake = anyio.Event()

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
        wanted = [n for n in dict.fromkeys(names) if n not in self._adding and n not in self._index]
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
            self._index_put(entry)
            self._schedule(entry)
            self._publish(EventKind.SPOOLED, msg)
            log.debug("adopted", id=name, flows=msg.flows, queue=queue.value)

    async def _ping_loop(self) -> None:
        never = anyio.Event()
        while True:
            await self.clock.wait(never, self.clock.now() + timedelta(seconds=self._ping_interval))
            self._publish(EventKind.PING)
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
            await self._change(entry, decision)
            return
        await self._checkout(entry)
        self._follow_route(msg)
        snapshot = msg.copy()
        try:
            outcome = await self.relay.relay(
                snapshot,
                BodyHandle(self._disk.body_path(msg.id)),
                list(msg.remaining_recipients),
            )
        except Exception as exc:  # noqa: BLE001 (a relay bug must not lose the message)
            mlog.exception("relay raised; trying later")
            outcome = AttemptFailed(f"relay error: {exc!r}")
        await self._finish_attempt(entry, outcome, operator_kick=kicked)

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
        }
        result = attempt_outcome(
            old,
            outcome,
            actions,
            now=self.clock.now(),
            draw=lambda interval: interval.draw(self._rng),
            operator_kick=operator_kick,
        )
        new = result.record
        await self._save_outcome(entry, new)
        entry.checked_out = False
        self._apply(entry, new)
        self._publish(result.event, new, at=result.at)
        log.info(
            "attempt done",
            id=new.id,
            flows=new.flows,
            outcome=result.event,
            delivered=len(result.delivered),
            failed=len(result.failed),
            later=len(result.later),
            at=result.at,
        )

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
        self._hub.publish(
            SpoolEvent(
                self.clock.now(),
                kind,
                msg.id if msg else None,
                msg.envelope_info if msg else None,
                detail,
                at,
            )
        )

    # -------------------------------------------------------------- adding

    async def add(
        self,
        batch: RoutedBatch,
        *,
        frozen: bool = False,
        flows: Sequence[str] = (),
        parent_id: str | None = None,
        prefix: Callable[[str], bytes] | None = None,
    ) -> list[str]:
        """Spool one submission: one message per envelope of ``batch``.

        ``prefix(id)``, when given, makes wire-form lines (CRLF, none
        starting with a dot) put before the body of the message with that
        id: the SMTP listener's ``Received:`` header names the message's own
        id this way. Returns once every message is durable on disk; their
        ids in order.
        """
        status: Status = Frozen() if frozen else SEND_NOW
        messages = await self._write_new(batch, status, flows, parent_id, prefix)
        for msg in messages:
            if msg.id in self._index:
                continue  # a rescan adopted it while we were writing
            entry = _Entry(msg, Queue.FROZEN if frozen else Queue.ACTIVE)
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
            entries = self._lookup(ids)
            self._refuse_if_busy(entries, "remove")
            for e in entries:
                if e.queue is not Queue.FROZEN:
                    raise OperationRefusedError(
                        f"cannot remove {e.msg.id}: only frozen messages can be removed "
                        "(freeze it first)"
                    )
            await self._each(entries, lambda e: self._change(e, Removed()))

    async def recover(
        self, ids: Iterable[str], *, from_: Literal["removed", "quarantine"] | Queue
    ) -> None:
        """Bring messages back from ``removed`` or ``quarantine`` as frozen."""
        source = Queue(from_)
        if source not in (Queue.REMOVED, Queue.QUARANTINE):
            raise ValueError(f"recover takes messages from removed or quarantine, not {source}")
        async with self._op_lock:
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
        others in ``related_ids``). Failed recipients stay with the original
        message. Returns the ids of every resulting message. The new parts
        are written before the original is narrowed: a crash in between may
        send to some recipients twice, never to none.
        """
        routes = self.routes
        if routes is None:
            raise OperationRefusedError("cannot reroute: this spool has no routes to ask")
        async with self._op_lock:
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
                    part.envelope_info = msg.envelope_info
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
        Use as ``async with spool.events() as stream`` to unsubscribe."""
        return self._hub.subscribe(max_buffer)

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
