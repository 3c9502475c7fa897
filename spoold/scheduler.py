"""The scheduler: when each queued message is tried, and how many at once.

:class:`Scheduler` owns the timers of the messages of the index
(:class:`~spoold.timers.Timers`), the destination gate
(:class:`~spoold.limits.DestinationGate`), the count of send jobs under way
and the loops that wake it: the dispatch loop, the wake-up socket through
which other processes tell of messages they added, and the ping that also
rescans the directories for wake-ups that were lost. It starts an attempt
with the function it is handed (:meth:`Scheduler.dispatch_loop`); what the
attempt does to the message is :mod:`spoold.transitions`'.

Invariants:

* One timer per message; any change to a message re-arms or cancels it
  (:meth:`Scheduler.schedule`), so a stale timer is skipped when it comes
  up: it never sends a message that was frozen, removed, quarantined,
  rescheduled or is being sent (busy).
* At most ``max_concurrent_send_jobs`` attempts run at once (a setting,
  changeable while running).
* Per destination (a route), at most ``max_connections`` attempts at once
  (an attempt's slot is freed once its connection is back and its outcome
  throttles no hop, before that outcome is written: :meth:`Scheduler.relayed`)
  and at most its ``rate``; a next hop that throttled us is backed off for
  every message (:mod:`spoold.limits`). A message held by these waits in
  memory, due as it was: it is not an attempt, so nothing is written, no
  retry interval is used and no relay attempt is recorded; other
  destinations are not slowed by it (a held message takes no send job).
* ``sending`` is a status this spool holds in memory only, during an
  attempt. A record adopted as ``sending`` is due now: never left
  unscheduled.
* A message adopted from another process is indexed, scheduled and its
  ``spooled`` event published with no ``await`` in between (no attempt can
  start before the event is out); never one this spool is adding itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import anyio
import anyio.abc
import msgspec

from spoold.errors import RecordError, SpooldError
from spoold.events import EventKind
from spoold.limits import DestinationGate, Hold, SharedRates, SharedSlots, SlotWait
from spoold.message import SEND_NOW, Message, SendAt, Sending, SendNow
from spoold.policy import DestinationPolicy
from spoold.state import LOADED_QUEUES, Entry, SpoolState, log
from spoold.timers import Timers

__all__ = ["Scheduler", "Attempt"]

# What the scheduler runs in a send job: one attempt on one message, under
# the destination policy asked for as it started.
Attempt = Callable[[Entry, DestinationPolicy], Awaitable[None]]

# A message handed to a send job: its entry, timer generation, policy and
# whether it asks for its fleet-wide token.
_Job = tuple[Entry, int, DestinationPolicy, bool]


class Scheduler:
    """Timers, the destination gate and the send jobs of one spool."""

    def __init__(self, state: SpoolState) -> None:
        self._state = state
        self._disk = state.disk
        self._index = state.index
        self._publish = state.publish
        self._index_put = state.index_put
        self.clock = state.clock
        self._timers = Timers()
        self._wake = anyio.Event()
        self._running = 0
        # Send jobs with nothing to do, each waiting for the next message
        # (not counted in ``running``); ended when the spool closes.
        self._parked: list[asyncio.Future[_Job]] = []
        self._idle = anyio.Event()
        self._idle.set()
        # Messages held by their destination wait here as (entry, generation).
        self.gate: DestinationGate[tuple[Entry, int]] = DestinationGate()
        # A fleet's shared rates (None: this spool's own limits alone).
        self.shared_rates: SharedRates | None = None
        # A fleet's shared connection slots (None: this spool's own limits).
        self.shared_slots: SharedSlots | None = None
        # Attempts whose slot was freed early (relayed): message id -> destination.
        self._finishing: dict[str, str] = {}

    # ------------------------------------------------------------ settings

    @property
    def running(self) -> int:
        """Send jobs under way."""
        return self._running

    @property
    def _max_jobs(self) -> int:
        return self._state.parts.settings.max_concurrent_send_jobs

    def policies_changed(self) -> None:
        """The policy source was replaced (a reload): its limits apply to
        the messages already waiting for their destination too."""
        for name, (entry, _gen) in self.gate.heads():
            found = self.policy_of(entry.msg).limited
            self.gate.set_limits(name, found[1] if found and found[0] == name else None)
        self.poke()

    async def stop(self, timeout: float | None) -> None:  # noqa: ASYNC109
        """Start no new attempt; wait up to ``timeout`` for those under way."""
        self._state.stopping = True
        self.poke()
        if self._running == 0:
            return
        with anyio.fail_after(timeout):
            await self._idle.wait()

    # ---------------------------------------------------------- scheduling

    def poke(self) -> None:
        """Have the dispatch loop look again (a slot or a hop came free)."""
        self._wake.set()

    def schedule(self, entry: Entry) -> None:
        """(Re)arm ``entry``'s timer by its status; any older timer is stale."""
        status = entry.msg.status
        if isinstance(status, SendNow):
            entry.gen = self._timers.arm(entry.msg.id, 0.0)
        elif isinstance(status, SendAt):
            entry.gen = self._timers.arm(entry.msg.id, status.at.timestamp())
        else:
            entry.gen = self._timers.new_generation()
            return
        self.poke()

    def apply(self, entry: Entry, new: Message) -> None:
        """Put a record already written to disk into the index."""
        queue = new.queue
        if queue in LOADED_QUEUES:
            entry.msg = new
            self._index_put(entry, queue)
            self.schedule(entry)
        else:
            entry.gen = self._timers.new_generation()
            self._state.index_drop(new.id)

    async def dispatch_loop(self, tg: anyio.abc.TaskGroup, attempt: Attempt) -> None:
        """Start ``attempt`` on each message as it comes due, in send jobs
        of ``tg``, within the job count and the destination limits. A send
        job whose attempt ends takes the next message due itself
        (:meth:`_send_job`): with a backlog, no task is made and this loop
        is not woken per message."""
        while True:
            wake = self._wake
            now_ts = self.clock.now().timestamp()
            while not self._state.stopping and self._running < self._max_jobs:
                start = self._next_start(now_ts)
                if start is None:
                    break
                self._start(tg, attempt, *start)
            deadline = None
            if not self._state.stopping and self._running < self._max_jobs:
                times = [
                    t
                    for t in (self._timers.next_time(), self.gate.next_wake(now_ts))
                    if t is not None
                ]
                if times:
                    deadline = datetime.fromtimestamp(min(times), UTC)
            await self.clock.wait(wake, deadline)
            if wake.is_set():
                self._wake = anyio.Event()

    def _next_start(
        self, now_ts: float
    ) -> tuple[Entry, str | None, DestinationPolicy, bool] | None:
        """The next message to start at ``now_ts``, admitted by its
        destination (a connection and a token taken): ``(entry,
        destination, policy, booked)``; None when none may go now. Those
        waiting on their destination first (they were due earlier), then
        the timers; stale ones are skipped and held ones held."""
        gate = self.gate
        for name, (waiting, gen) in gate.ready(now_ts):
            current = self._index.get(waiting.msg.id)
            if current is not waiting or waiting.gen != gen or waiting.busy:
                gate.give_back(name)  # changed while it waited: not for us
            elif hold := gate.hops_hold(_held_hops(waiting), now_ts):
                gate.give_back(name)  # its hops were backed off while it waited
                self._hold(waiting, gen, hold)
            else:
                booked = gate.take_booking(name)
                return waiting, name, self.policy_of(waiting.msg), booked
        timers = self._timers
        while (due := timers.pop_due(now_ts)) is not None:
            mid, gen = due
            entry = self._index.get(mid)
            if entry is None or entry.gen != gen or entry.busy:
                continue
            policy = self.policy_of(entry.msg)
            destination = policy.limited
            hold = gate.admit(destination, _held_hops(entry), now_ts, front=entry.kicked)
            if hold is not None:
                self._hold(entry, gen, hold)
                continue
            return entry, destination[0] if destination else None, policy, False
        return None

    def _start(
        self,
        tg: anyio.abc.TaskGroup,
        attempt: Attempt,
        entry: Entry,
        destination: str | None,
        policy: DestinationPolicy,
        booked: bool,
    ) -> None:
        """A send job for ``entry`` (see :meth:`_claim`): a parked one if
        any waits, else a new task."""
        self._running += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        gen, asks = self._claim(entry, destination, policy, booked)
        parked = self._parked
        while parked:
            job = parked.pop()
            if not job.done():  # done: cancelled (the spool is closing)
                job.set_result((entry, gen, policy, asks))
                return
        tg.start_soon(self._send_job, attempt, entry, gen, policy, asks, name="send job")

    def _claim(
        self, entry: Entry, destination: str | None, policy: DestinationPolicy, booked: bool
    ) -> tuple[int, bool]:
        """Mark ``entry`` busy for an attempt counted under ``destination``;
        its timer generation, and whether it asks for its fleet-wide token
        (not ``booked`` for it already)."""
        entry.busy = True
        entry.destination = destination
        asks = (
            not booked
            and destination is not None
            and self.shared_rates is not None
            and policy.limited is not None
            and policy.limited[1].rate is not None
        )
        if asks and destination is not None:
            self.gate.asking(destination, True)  # the rest of its line waits for the answer
        return entry.gen, asks

    async def _send_job(
        self, attempt: Attempt, entry: Entry, gen: int, policy: DestinationPolicy, asks: bool
    ) -> None:
        """One send job: attempts, one message after another. Once one
        ends, the job takes the next message due now (:meth:`_next_start`,
        as the dispatch loop would for the job it frees), while the spool
        is not stopping and the job count allows. With none due it parks
        (no longer counted as running) until :meth:`_start` hands it the
        next message; a job over the count ends. A job whose attempt held
        a fleet-wide connection slot ends with it: the slot goes back after
        the job is no longer counted."""
        slot: list[str] = []  # the fleet-wide connection slot taken, if any
        counted = True  # in ``running`` (not while parked)
        try:
            while True:
                await self._one_attempt(attempt, entry, gen, policy, asks, slot)
                if slot or self._state.stopping or self._running > self._max_jobs:
                    break
                start = self._next_start(self.clock.now().timestamp())
                if start is not None:
                    entry, destination, policy, booked = start
                    gen, asks = self._claim(entry, destination, policy, booked)
                    continue
                counted = False
                self._job_ended()
                job = asyncio.get_running_loop().create_future()
                self._parked.append(job)
                try:
                    entry, gen, policy, asks = await job
                except BaseException:
                    if job in self._parked:
                        self._parked.remove(job)
                    elif job.done() and not job.cancelled():
                        # Handed a message as it was cancelled: not sent.
                        counted = True
                        self._unclaim(*job.result())
                    raise
                counted = True  # _start counted it
        finally:
            if counted:
                self._job_ended()
            if slot and self.shared_slots is not None:
                # Last: no await while the message is busy (its timer
                # coming due meanwhile would be passed over).
                await self.shared_slots.give_back(slot[0])
                if policy.limited is not None and self.gate.wake(policy.limited[0]):
                    self.poke()  # its line, refused a slot meanwhile, asks again

    def relayed(self, entry: Entry, policy: DestinationPolicy) -> None:
        """The attempt on ``entry`` is done with its connection (the relay
        returned, the connection is back in the cache or closed) and its
        outcome throttles no hop (the caller checks: a backoff must be in
        place before the next attempt): its destination's slot is free from
        now on, while the attempt goes on to write its outcome, so the next
        of the line starts without waiting for that local work. The
        attempt's send job still counts. Not for an attempt that holds a
        fleet-wide connection slot (its policy does not reuse
        connections): that slot stays with its send job to the end."""
        destination = entry.destination
        if destination is None or not policy.reuse_connections:
            return
        if not self.gate.relayed(destination):
            return  # as many of its line are finishing: it keeps its slot
        entry.destination = None
        self._finishing[entry.msg.id] = destination
        if self.gate.waiting(destination):
            self.poke()

    def _unclaim(self, entry: Entry, gen: int, policy: DestinationPolicy, asks: bool) -> None:
        """Undo :meth:`_claim` for a message no attempt was made on (it
        stays due as it was: its timer is armed again)."""
        entry.busy = False
        if entry.destination is not None:
            if asks:
                self.gate.asking(entry.destination, False)
            self.gate.done(entry.destination)
            entry.destination = None
        self.schedule(entry)

    def _job_ended(self) -> None:
        """A send job is no longer counted (it ended, or parked)."""
        self._running -= 1
        if self._running == 0:
            self._idle.set()
        self.poke()

    async def _one_attempt(
        self,
        attempt: Attempt,
        entry: Entry,
        gen: int,
        policy: DestinationPolicy,
        asks: bool,
        slot: list[str],
    ) -> None:
        """One message in a send job: the attempt, then the message is no
        longer busy and its destination's connection is given back (a
        fleet-wide slot taken is put in ``slot``, for the job to give
        back). A message
        that ``asks`` for its fleet-wide token (not booked already) while
        the rest of its line waits, and is told it is booked for later,
        goes back to the head of its destination's line until then (no
        attempt); when its time comes it is sent without asking again. One
        whose destination's fleet-wide connection slots are all held is
        held a moment. Either way the job ends at once and waits for
        nothing.

        A message refused a slot goes back to the head of its line too,
        which waits the moment the fleet suggests, or until this spool
        gives back a slot of the destination (so a backlog behind it takes
        no send job and asks nothing meanwhile); the rate token it took is
        booked for the line (the next out goes without asking again)."""
        try:
            # The rate first: a message the rate holds costs no slot (two
            # calls fewer), and its token is taken without a slot's call
            # first (late tokens are lost rate).
            due = None
            # Whether this attempt holds a fleet token: one booked for it
            # (it did not ask), or one taken now.
            token_held = not asks and self._rated(policy)
            if asks:
                try:
                    due, token_held = await self._shared_due(policy)
                finally:
                    if entry.destination is not None:
                        self.gate.asking(entry.destination, False)
                    self.poke()
            if due is not None:
                self._defer(entry, gen, *due)
                return
            if self.shared_slots is not None:
                with anyio.CancelScope(shield=True):
                    # Bounded by the fleet's timeout; a slot Redis granted is
                    # held here, so a stop meanwhile still gives it back.
                    taken = await self._shared_slot(policy)
                if isinstance(taken, SlotWait):
                    until = self.clock.now().timestamp() + taken.seconds
                    # A token held is kept for the line; none (Redis did not
                    # answer for it) is not made up.
                    self._defer(entry, gen, until, token_held, slot=True)
                    return
                if taken is not None:
                    slot.append(taken)
            if slot:
                # The slot is one attempt: its connection is not kept idle.
                await attempt(entry, msgspec.structs.replace(policy, reuse_connections=False))
            else:
                await attempt(entry, policy)
        finally:
            entry.busy = False
            if entry.destination is not None:
                self.gate.done(entry.destination)
                entry.destination = None
            elif self._finishing and (freed := self._finishing.pop(entry.msg.id, None)):
                self.gate.finished(freed)
                if self.gate.waiting(freed):
                    self.poke()

    async def _shared_slot(self, policy: DestinationPolicy) -> str | SlotWait | None:
        """The destination's fleet-wide connection slot, if
        :attr:`shared_slots` is set and the destination has limits that are
        shared: its holder (given back when the attempt ends), or a wait
        (the fleet holds ``max_connections``); None:
        nothing to take."""
        shared, limited = self.shared_slots, policy.limited
        if shared is None or limited is None or not limited[1].shared_connections:
            return None
        return await shared.take(limited[0], limited[1].max_connections)

    def _rated(self, policy: DestinationPolicy) -> bool:
        """Whether the destination's rate is fleet-wide."""
        limited = policy.limited
        return self.shared_rates is not None and limited is not None and limited[1].rate is not None

    async def _shared_due(
        self, policy: DestinationPolicy
    ) -> tuple[tuple[float, bool] | None, bool]:
        """When the destination's shared token (a fleet-wide rate) may be
        used, if not at once: a timestamp, and whether the token is booked
        for this message (else it asks again then); None: taken for now,
        or nothing to take (no :attr:`shared_rates`, or no rate), or the
        shared state did not answer (then the local gate, which admitted
        this attempt, is the only rate: each attempt asks once, so no line
        of waiting jobs is let go at once). Second: whether a token was
        taken for now (False when there was none to take or no answer).

        The wait it answers is counted from when the shared state looked
        at its clock, somewhere in the round trip; it is added to the time
        the question was sent, so a message held for it goes when the
        shared state's schedule says (counted from the answer, every hold
        would be late by the way back)."""
        shared, limited = self.shared_rates, policy.limited
        if shared is None or limited is None or limited[1].rate is None:
            return None, False
        asked = self.clock.now().timestamp()
        token = await shared.gcra(limited[0], limited[1].rate)
        if token is None:
            return None, False
        if token.booked and token.wait <= 0:
            return None, True
        return (asked + token.wait, token.booked), False

    def _defer(
        self, entry: Entry, gen: int, until: float, booked: bool, *, slot: bool = False
    ) -> None:
        """``entry`` (admitted, not sent) may go at ``until`` for the fleet
        (``booked``: its token is booked then, so it goes without asking
        again; ``slot``: it was refused a connection slot, and the wait
        ends early when this spool gives one back): back to the head of
        its destination's line, which waits until then (the connection and
        the local token are given back: no attempt was made). A message
        changed meanwhile is left to its new
        status, and one found as the spool stops stays queued on disk (a
        token booked then is lost). Frozen, removed or sent by an operator
        later, while it waits, the token goes to the next of the line
        (:meth:`DestinationGate.take_booking`)."""
        destination = entry.destination
        current = self._index.get(entry.msg.id)
        if current is not entry or entry.gen != gen or self._state.stopping:
            return
        reason = "fleet-wide connections" if slot else "fleet-wide rate"
        if destination is None:  # not counted under a destination: a timer
            self._hold(entry, gen, Hold(None, until, reason))
            return
        entry.destination = None  # given back here, not as done
        self.gate.defer(destination, (entry, gen), until, booked=booked, early=slot)
        self.poke()  # its line now waits until then: the dispatch loop's next wake
        log.debug(
            "held by its destination",
            id=entry.msg.id,
            flows=entry.msg.flows,
            destination=destination,
            reason=f"{reason} (booked)" if booked else reason,
        )

    def policy_of(self, msg: Message) -> DestinationPolicy:
        """``msg``'s destination policy (asked once per attempt)."""
        try:
            return self._state.parts.policies.policy_for(msg)
        except Exception:
            log.exception(
                "no destination policy; sending with the spool's delivery rules", id=msg.id
            )
            # No limits and the relay's own hop settings, but the spool's
            # delivery rules (lifetime, bounce) still hold.
            return DestinationPolicy(delivery=self._state.parts.settings.delivery_policy)

    def _hold(self, entry: Entry, gen: int, hold: Hold) -> None:
        """Keep a due message back for its destination's limits or its
        hops' backoff; in memory only (its record still says it is due)."""
        if hold.until is not None:
            entry.gen = self._timers.arm(entry.msg.id, hold.until)
        elif hold.destination is not None:
            self.gate.wait(hold.destination, (entry, gen), front=hold.front)
        self.poke()  # held from a send job: the dispatch loop's next wake may be sooner
        log.debug(
            "held by its destination",
            id=entry.msg.id,
            flows=entry.msg.flows,
            destination=hold.destination,
            reason=hold.reason,
        )

    # ------------------------------------------- messages other processes add

    async def wakeup_loop(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Adopt messages other processes added (they send their ids)."""
        async with self._disk.wakeups() as batches:
            task_status.started()
            async for woken in batches:
                try:
                    await self.adopt(woken, woken)
                except (SpooldError, OSError):
                    log.exception("could not adopt added messages; the next rescan will")

    async def _rescan(self) -> None:
        """Backstop for lost wake-ups: adopt records on disk that the index
        does not know (a directory listing; records are read only for new
        names)."""
        unknown = []
        for queue in LOADED_QUEUES:
            if not self._disk.usable(queue):
                continue
            for name, checked_out in await self._disk.names(queue):
                if not checked_out and name not in self._index:
                    unknown.append(name)
        if unknown:
            await self.adopt(unknown)

    async def adopt(
        self, names: Iterable[str], sent: Mapping[str, bytes | None] | None = None
    ) -> None:
        """Index and schedule records other processes added (by id);
        ``sent``: records their writers sent along (see
        :meth:`OnDiskSpool.read_new <spoold.ondisk.OnDiskSpool.read_new>`)."""
        async with self._state.op_lock:  # no operator change runs meanwhile
            await self._adopt_locked(names, sent)

    async def _adopt_locked(
        self, names: Iterable[str], sent: Mapping[str, bytes | None] | None = None
    ) -> None:
        # Not what this spool is adding: add() indexes it itself, and
        # adopting it first could bring it back after it was delivered.
        adding = self._state.adding
        wanted = [
            n
            for n in dict.fromkeys(names)
            if n not in adding
            and n not in self._index
            and n not in self._state.unsettled
            and n not in self._disk.skipped  # unreadable: reported once, at open
        ]
        if not wanted:
            return
        found = await self._disk.read_new(wanted, LOADED_QUEUES, sent)  # one thread hop for all
        for name, (queue, result) in found.items():
            if isinstance(result, RecordError):
                log.error("added record cannot be read", id=name, error=str(result))
                continue
            msg = result
            if name in self._index or name in adding:
                continue  # indexed meanwhile
            if msg.queue is not queue:
                continue  # written elsewhere than its status says: next open repairs it
            _sending_reads_as_send_now(msg)
            entry = Entry(msg, queue)
            self._index_put(entry)  # no await before the publish (as in add)
            self.schedule(entry)
            self._publish(EventKind.SPOOLED, msg)
            log.debug("adopted", id=name, flows=msg.flows, queue=queue.value)

    async def ping_loop(self, settle: Callable[[], Awaitable[None]]) -> None:
        """Every ``ping_interval``: the ``ping`` event, ``settle`` (the
        messages held in doubt, if any), and a rescan."""
        never = anyio.Event()
        while True:
            await self.clock.wait(
                never,
                self.clock.now() + timedelta(seconds=self._state.parts.settings.ping_interval),
            )
            self._publish(EventKind.PING)
            if self._state.unsettled:
                await settle()
            try:
                await self._rescan()
            except (SpooldError, OSError):
                log.exception("rescan of the spool failed; trying again at the next ping")


def _held_hops(entry: Entry) -> Sequence[str]:
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
