"""The history journal: the final outcome of every message that left the queue.

When a message is done with (delivered, bounced, or removed by an operator
or a policy: a final :class:`~spoold.kinds.OutcomeKind`,
:data:`~spoold.kinds.FINAL_OUTCOMES`), the spool appends one
:class:`Outcome` to the journal: who
sent it, what became of each recipient (the next hop's code, enhanced
status and text where the last attempt had one), the hop, when it was
spooled and when it ended. A recipient that a reroute moved into another
message is ``rerouted`` (naming that message, whose own line says how it
ended), never ``delivered``: only a next hop's acceptance is. ``frozen``
is not final (an operator may still send the message) and is never
journalled. A message brought back from
``removed`` and sent again gets a second line; the newest line wins.

On disk (``SPOOL/history/``) the journal is one append-only file per UTC
day, ``YYYY-MM-DD.jsonl``, one JSON object per line (the day is the one
the outcome's ``time`` falls on). Files are never rewritten: a day's file
is deleted whole once its last possible line is older than the retention
(:meth:`History.prune`).

Contract:

* :meth:`History.append` is synchronous and does no I/O: it queues the line
  in memory. :meth:`History.run` (a task of the spool's task group) writes
  what has queued up in one worker-thread hop per batch, so the hot path
  never pays a file write, and never an ``fsync``, per message.
* The journal is a record, not a durability promise: lines are written
  without ``fsync``, so a crash or power loss may lose the last lines (the
  ones still queued, or written but not yet on the disk). What it lost can
  no longer be looked up; the mail itself is not affected.
* Readers (:meth:`History.find`, :meth:`History.query`) see queued lines
  too. A line that cannot be decoded (a torn last line after a crash) is
  skipped, never fatal.
* All file I/O runs in worker threads; errors writing are logged and the
  lines dropped (a full disk must not stop delivery), errors reading raise
  :class:`~spoold.errors.StoreError`.
* :meth:`History.query` (what ``Spool.history`` and the control ``history``
  answer with) returns at most :data:`MAX_QUERY_RESULTS` outcomes: past
  that it stops reading and raises
  :class:`~spoold.errors.OperationRefusedError` (narrow it with ``since`` or
  ``recipient``), so one request cannot hold a busy spool's whole journal
  in the daemon's memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from spoold.errors import OperationRefusedError, StoreError
from spoold.kinds import FINAL_OUTCOMES, FinalOutcomeKind, OutcomeKind
from spoold.message import Message

__all__ = [
    "HISTORY_DIR",
    "DEFAULT_HISTORY_RETENTION",
    "FinalOutcome",
    "RecipientState",
    "RecipientReply",
    "Outcome",
    "History",
    "outcome_of",
    "read_history",
    "MAX_QUERY_RESULTS",
]

HISTORY_DIR = "history"
DEFAULT_HISTORY_RETENTION = timedelta(days=7)
MAX_QUERY_RESULTS = 100_000
"""The most outcomes one :meth:`History.query` answers with."""
_SUFFIX = ".jsonl"

log = structlog.get_logger("spoold.history")

RunBlocking = Callable[..., Awaitable[Any]]
"""Runs a short blocking call off the event loop: ``await run(fn, *args)``."""


FinalOutcome = OutcomeKind
"""How a message left the queue: one of :data:`~spoold.kinds.FINAL_OUTCOMES`
(the name from before outcomes were one set; ``FinalOutcome.DELIVERED`` is
``OutcomeKind.DELIVERED``)."""


class RecipientState(StrEnum):
    DELIVERED = "delivered"  # accepted by a next hop
    FAILED = "failed"  # failed permanently
    UNDELIVERED = "undelivered"  # still to deliver when the message left (removed)
    REROUTED = "rerouted"  # moved into another message by a reroute (rerouted_to)


class RecipientReply(msgspec.Struct, frozen=True, kw_only=True):
    """One recipient's end: the state, and the next hop's reply when the
    last attempt gave one (``code`` None: accepted in an earlier attempt,
    or never answered). ``rerouted_to``: for state ``rerouted``, the id of
    the message that took the recipient over (its own line says how that
    ended)."""

    recipient: str
    state: RecipientState
    code: int | None = None
    enhanced_status: str | None = None
    text: str = ""
    rerouted_to: str | None = None


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the journal: the final outcome of one message."""

    id: str
    outcome: OutcomeKind  # a final one (FINAL_OUTCOMES), checked
    time: datetime  # when it left the queue
    spool_date: datetime
    sender: str
    recipients: list[RecipientReply]
    hop: str = ""  # the next hop of the last attempt ("" when none answered)
    parent_id: str = ""
    flows: list[str] = msgspec.field(default_factory=list)
    idempotency_key: str | None = None
    detail: str = ""  # e.g. the last relay error of a removed message
    # An attempt may have reached a next hop without our knowing (a crash, or
    # no reply to the end of the message): a recipient may have it twice.
    in_doubt: bool = False
    submitter_uid: int | None = None  # the local user who submitted it, if known

    def __post_init__(self) -> None:
        # Read from disk, a line that is not final is skipped as undecodable.
        if self.outcome not in FINAL_OUTCOMES:
            raise ValueError(f"{self.outcome!r} is not a final outcome")


def outcome_of(
    msg: Message,
    outcome: FinalOutcomeKind,
    *,
    time: datetime,
    replies: Iterable[tuple[str, int | None, str | None, str]] = (),
    hop: str = "",
    detail: str = "",
) -> Outcome:
    """The journal line for ``msg`` leaving the queue. ``replies`` are the
    last attempt's answers as ``(recipient, code, enhanced status, text)``;
    every original recipient is listed, with its state from the record
    (failed, still remaining, moved into another message by a reroute, or
    else delivered)."""
    answers = {r[0]: r for r in replies}
    failed = set(msg.failed_recipients)
    remaining = set(msg.remaining_recipients)
    lines = []
    for rcpt in dict.fromkeys([*msg.envelope_info.recipients, *failed, *remaining]):
        moved_to = None
        if rcpt in failed:
            state = RecipientState.FAILED
        elif rcpt in remaining:
            state = (
                RecipientState.FAILED
                if outcome is OutcomeKind.BOUNCED
                else RecipientState.UNDELIVERED
            )
        elif rcpt in msg.rerouted_to:
            state, moved_to = RecipientState.REROUTED, msg.rerouted_to[rcpt]
        else:
            state = RecipientState.DELIVERED
        answer = answers.get(rcpt)
        lines.append(
            RecipientReply(
                recipient=rcpt,
                state=state,
                code=answer[1] if answer else None,
                enhanced_status=answer[2] if answer else None,
                text=answer[3] if answer else "",
                rerouted_to=moved_to,
            )
        )
    last = msg.last_relay_attempt
    if last is not None and outcome is not OutcomeKind.DELIVERED:
        detail = f"{detail}; last error: {last.error}" if detail else last.error
    return Outcome(
        id=msg.id,
        outcome=outcome,
        time=time,
        spool_date=msg.spool_date,
        sender=msg.envelope_info.sender,
        recipients=lines,
        hop=hop,
        parent_id=msg.parent_id,
        flows=list(msg.flows),
        idempotency_key=msg.idempotency_key,
        detail=detail,
        in_doubt=msg.in_doubt,
        submitter_uid=msg.submitter_uid,
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Outcome)


def _day_of(name: str) -> date | None:
    if not name.endswith(_SUFFIX):
        return None
    try:
        return date.fromisoformat(name[: -len(_SUFFIX)])
    except ValueError:
        return None


def _read_sync(
    directory: Path,
    since: datetime | None,
    until: datetime | None,
    needle: bytes | None,
    fold: bool = False,
    keep: Callable[[Outcome], bool] | None = None,
    limit: int | None = None,
) -> list[Outcome]:
    """Lines of the day files that may hold times in [since, until], oldest
    first; ``needle``: only lines containing these bytes are decoded
    (``fold``: compared in lower case; ``needle`` given in lower case);
    ``keep``: only the outcomes it accepts. More than ``limit`` of them
    raise :class:`OperationRefusedError`."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StoreError(f"cannot read the history in {directory}: {exc.strerror}") from None
    out: list[Outcome] = []
    for name in names:
        day = _day_of(name)
        if day is None:
            continue
        if since is not None and day < since.astimezone(UTC).date():
            continue
        if until is not None and day > until.astimezone(UTC).date():
            continue
        try:
            with open(directory / name, "rb") as f:
                for line in f:  # line by line: a day of a busy spool is large
                    if needle is not None and needle not in (line.lower() if fold else line):
                        continue
                    try:
                        item = _decoder.decode(line)
                    except msgspec.DecodeError:
                        continue  # a torn line (a crash while appending)
                    if since is not None and item.time < since:
                        continue
                    if until is not None and item.time > until:
                        continue
                    if keep is not None and not keep(item):
                        continue
                    out.append(item)
                    if limit is not None and len(out) > limit:
                        raise _too_many(limit)
        except FileNotFoundError:
            continue  # pruned meanwhile
        except OSError as exc:
            raise StoreError(f"cannot read {directory / name}: {exc.strerror}") from None
    return out


def _matches(
    item: Outcome, since: datetime | None, until: datetime | None, recipient: str | None
) -> bool:
    if since is not None and item.time < since:
        return False
    if until is not None and item.time > until:
        return False
    if recipient is not None:
        wanted = recipient.casefold()
        return any(r.recipient.casefold() == wanted for r in item.recipients)
    return True


def _too_many(limit: int) -> OperationRefusedError:
    return OperationRefusedError(
        f"history: more than {limit} outcomes match; ask for fewer (a shorter since, a recipient)"
    )


async def read_history(
    spool_dir: str | os.PathLike[str],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    recipient: str | None = None,
    limit: int | None = None,
) -> list[Outcome]:
    """The journal of a spool directory read straight from disk (with or
    without a daemon running; lines it has not written yet are missing),
    oldest first; more than ``limit`` outcomes raise
    :class:`~spoold.errors.OperationRefusedError`."""
    directory = Path(spool_dir) / HISTORY_DIR
    needle = recipient.lower().encode() if recipient and recipient.isascii() else None

    def keep(o: Outcome) -> bool:
        return _matches(o, since, until, recipient)

    return await anyio.to_thread.run_sync(
        _read_sync, directory, since, until, needle, True, keep, limit
    )


class History:
    """The journal of one spool directory, as its owner writes it."""

    def __init__(self, spool_dir: Path, run: RunBlocking | None = None) -> None:
        """``run(fn, *args)`` runs a short blocking call off the loop (the
        spool gives its store's grouped hops, so a batch of lines shares a
        hop with the deletes of the messages it journals); by default a
        worker thread of its own."""
        self.dir = spool_dir / HISTORY_DIR
        self._run: RunBlocking = run or anyio.to_thread.run_sync
        self._pending: list[Outcome] = []
        self._wake = anyio.Event()
        self._write_lock = anyio.Lock()
        self._writing: list[Outcome] = []  # taken from _pending, being written

    def append(self, outcome: Outcome) -> None:
        """Queue one line (no I/O; :meth:`run` or :meth:`flush` writes it)."""
        self._pending.append(outcome)
        self._wake.set()

    async def run(self) -> None:
        """Write queued lines as they come, a batch per thread hop, until
        cancelled (call :meth:`flush` after, to write what is left)."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Write every queued line now."""
        async with self._write_lock:
            if not self._pending:
                return
            self._writing, self._pending = self._pending, []
            written: list[bool] = []  # set in the thread once the lines are written
            try:
                await self._run(self._append_then_mark_sync, self._writing, written)
            except OSError as exc:
                log.error(
                    "could not write to the history journal; these outcomes are lost",
                    error=str(exc),
                    lost=len(self._writing),
                )
            except BaseException:
                # Cancelled before the thread wrote them (perhaps before it
                # started): keep them for the flush at close. Cancelled
                # after (a hop cancelled while running answers
                # CancelledError): they are in the journal, once.
                if not written:
                    self._pending[:0] = self._writing
                raise
            finally:
                self._writing = []

    def _append_then_mark_sync(self, batch: Sequence[Outcome], written: list[bool]) -> None:
        self._append_sync(batch)
        written.append(True)

    def _append_sync(self, batch: Sequence[Outcome]) -> None:
        by_day: dict[str, list[bytes]] = {}
        for item in batch:
            name = item.time.astimezone(UTC).date().isoformat() + _SUFFIX
            by_day.setdefault(name, []).append(_encoder.encode(item) + b"\n")
        os.makedirs(self.dir, mode=0o750, exist_ok=True)
        for name, lines in by_day.items():
            fd = os.open(
                self.dir / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
            try:
                os.write(fd, b"".join(lines))  # one write per day file: lines stay whole
            finally:
                os.close(fd)

    def _unwritten(self) -> list[Outcome]:
        return [*self._writing, *self._pending]

    async def query(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        recipient: str | None = None,
    ) -> list[Outcome]:
        """Outcomes with ``since <= time <= until`` (either may be None),
        for ``recipient`` if given (compared without case), oldest first; at
        most :data:`MAX_QUERY_RESULTS` (more raise
        :class:`~spoold.errors.OperationRefusedError`)."""
        found = await read_history(
            self.dir.parent,
            since=since,
            until=until,
            recipient=recipient,
            limit=MAX_QUERY_RESULTS,
        )
        found += [o for o in self._unwritten() if _matches(o, since, until, recipient)]
        if len(found) > MAX_QUERY_RESULTS:
            raise _too_many(MAX_QUERY_RESULTS)
        found.sort(key=lambda o: o.time)
        return found

    async def find(self, message_id: str) -> Outcome | None:
        """The newest outcome of ``message_id``, or None."""
        for item in reversed(self._unwritten()):
            if item.id == message_id:
                return item
        needle = f'"id":"{message_id}"'.encode()
        found = await anyio.to_thread.run_sync(_read_sync, self.dir, None, None, needle)
        matching = [o for o in found if o.id == message_id]
        return matching[-1] if matching else None

    async def prune(self, now: datetime, retention: timedelta) -> int:
        """Delete the day files whose every line is older than ``now -
        retention``; return how many."""
        return await anyio.to_thread.run_sync(self._prune_sync, now - retention)

    def _prune_sync(self, cutoff: datetime) -> int:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return 0
        gone = 0
        last_day = cutoff.astimezone(UTC).date()
        for name in names:
            day = _day_of(name)
            if day is not None and day < last_day:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / name)
                    gone += 1
        return gone
