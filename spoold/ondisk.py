"""Mail plugged into the generic store: messages and bodies on disk.

:class:`OnDiskSpool` is a :class:`~spoold.store.Store` whose queues are the
:class:`~spoold.message.Queue` values, whose records are encoded
:class:`~spoold.message.Message` values and whose bodies are
:class:`~spoold.body.Body` wire bytes. It adds the two rules that need to
know what a record means:

* the queue a record is saved into is always ``queue_of(message.status)``;
  a delivered message is deleted;
* when the owner loads a queue, a record that cannot be read (corrupt, or a
  file this process may not read) is set aside in ``quarantine`` with the
  reason (never deleted); one that cannot even be moved is skipped, kept in
  :attr:`OnDiskSpool.skipped` and reported, and the rest is served. A
  record whose status
  belongs to another queue (a crash between the two renames of a move) is
  moved to where its status says.

It holds no state of its own beyond the open store and what it skipped;
scheduling is the
spool's (:mod:`spoold.spool`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from spoold.body import Body
from spoold.errors import BodyDamagedError, NotFoundError, RecordError, StoreError
from spoold.log import get_logger
from spoold.message import (
    Message,
    Queue,
    Status,
    decode_record,
    encode_record,
    gc_paused,
    queue_of,
)
from spoold.store import (
    CHECKOUT,
    NewEntry,
    Problem,
    RecoveryReport,
    StepHook,
    Store,
    StoredRecord,
    SyncMode,
    Woken,
    still_named,
)

__all__ = [
    "OnDiskSpool",
    "NewMessage",
    "Unreadable",
    "QUEUES",
    "LOAD_BATCH",
    "LOAD_READ_AHEAD",
    "LOAD_READERS",
]

QUEUES: tuple[str, ...] = tuple(q.value for q in Queue)

log = get_logger("spoold.ondisk")

# What the reading thread makes of one batch: the message of each record
# that can be read and is in the queue of its status; each other record with
# its message (misplaced) or why it cannot be read, for load() to handle.
_Decoded = list[Message | tuple[StoredRecord, Message | RecordError]]

_CHECK_READ = 1 << 20  # bytes per read when check hashes a body
LOAD_BATCH = 2048  # records read and decoded in one worker-thread hop by load()
LOAD_READ_AHEAD = 2  # batches load() reads ahead of the one it is handing over
# Threads reading batches at once in load() when the records are not in memory:
# with a cold page cache (after a reboot) a record's read waits for the disk,
# and one reader alone leaves the disk idle while it decodes.
LOAD_READERS = 4
_PROBES = 32  # records load() samples across a queue to tell a cold cache


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to add: ``build(id, related_ids)`` makes its record, with
    status ``status``, from the id the store reserved and the ids of the
    other messages added with it."""

    body: Body
    status: Status
    build: Callable[[str, list[str]], Message]
    # Wire bytes to put before ``body`` for this id (e.g. a Received: line
    # naming it); called once per message, before ``build``.
    prefix: Callable[[str], bytes] | None = None


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A record file that could not be read, and why."""

    id: str
    queue: Queue
    path: Path
    reason: str


class OnDiskSpool:
    """The spool directory as messages and bodies. Use :meth:`open`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.dir = store.root
        # Records that could not be read nor set aside when loaded, by id.
        self.skipped: dict[str, Unreadable] = {}
        self._dir_text = str(self.dir)  # every record's spool_dir: one string

    @classmethod
    async def open(
        cls,
        spool_dir: str | os.PathLike[str],
        *,
        owner: bool = True,
        create: bool = True,
        max_threads: int = 16,
        on_step: StepHook | None = None,
        min_free_bytes: int = 0,
        sync: SyncMode = "fsync",
        keep_checkouts: Sequence[Queue] = (),
        keep_listings: Sequence[Queue] = (),
    ) -> tuple[OnDiskSpool, RecoveryReport]:
        """Open the spool directory (see :meth:`Store.open`); records found
        checked out in ``keep_checkouts`` stay so, for the owner to settle
        (:meth:`save` with ``checked_out=True``); recovery's listings of the
        ``keep_listings`` queues are kept in the report, for a load right
        after the open."""
        store, report = await Store.open(
            spool_dir,
            QUEUES,
            owner=owner,
            create=create,
            max_threads=max_threads,
            on_step=on_step,
            min_free_bytes=min_free_bytes,
            sync=sync,
            keep_checkouts=[q.value for q in keep_checkouts],
            keep_listings=[q.value for q in keep_listings],
        )
        if report:
            log.info(
                "spool recovered",
                spool_dir=str(store.root),
                returned_checkouts=len(report.returned_checkouts),
                found_checked_out=len(report.kept_checkouts),
                removed_tmp=len(report.removed_tmp),
                removed_unacknowledged=report.removed_unacknowledged,
            )
        return cls(store), report

    async def close(self) -> None:
        await self.store.close()

    def usable(self, queue: Queue) -> bool:
        """Whether this process can use ``queue``'s directory (one it
        cannot is reported at open, by :meth:`unusable`, and skipped)."""
        return str(self.dir / queue.value) not in self.store.unusable

    def require(self, queue: Queue) -> None:
        """Raise :class:`StoreError` (with what to run) unless ``queue``'s
        directory and its checkout directory are usable: what cannot work
        without them (the owner's ``active``) stops here."""
        for d in (self.dir / queue.value, self.dir / queue.value / CHECKOUT):
            if str(d) in self.store.unusable:
                raise StoreError(errno.EACCES, self.store.unusable_text(str(d)), str(d))

    def unusable(self) -> dict[str, str]:
        """Directories of the spool this process cannot use: path, and
        what is wrong and what to run about it."""
        return {d: self.store.unusable_text(d) for d in sorted(self.store.unusable)}

    async def __aenter__(self) -> OnDiskSpool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- add

    async def add(
        self,
        new: Sequence[NewMessage],
        on_reserve: Callable[[str], None] | None = None,
        *,
        notify: bool = True,
        records: dict[str, bytes] | None = None,
    ) -> list[Message]:
        """Durably write new messages; return them (with their ids) in order.

        Each record goes to the queue of its status. Nothing is left behind
        if this raises. ``records``: filled with each message's record as
        written (its id to the bytes of :func:`encode_record`).
        """
        built: dict[str, Message] = {}
        prefixes: dict[str, bytes] = {}  # the store asks for a prefix before the record

        def make_prefix(n: NewMessage) -> Callable[[str], bytes] | None:
            if n.prefix is None:
                return None
            prefix_of = n.prefix

            def prefix(name: str) -> bytes:
                prefixes[name] = data = prefix_of(name)
                return data

            return prefix

        def make_record(n: NewMessage) -> Callable[[str, Sequence[str]], bytes]:
            def encode(name: str, batch: Sequence[str]) -> bytes:
                msg = n.build(name, [other for other in batch if other != name])
                if msg.id != name or msg.status != n.status:
                    raise ValueError(f"message {msg.id} was not built as announced")
                # What the body file holds, computed here (in the store's
                # worker thread) from the very bytes the store writes.
                prefix = prefixes.pop(name, b"")
                digest = hashlib.sha256(prefix)
                digest.update(n.body.wire)
                msg.size = len(prefix) + len(n.body.wire)
                msg.body_sha256 = digest.hexdigest()
                msg.spool_dir = self._dir_text
                built[name] = msg
                record = encode_record(msg)
                if records is not None:
                    records[name] = record
                return record

            return encode

        entries = []
        for n in new:
            queue = queue_of(n.status)
            if queue is None:
                raise ValueError("a new message cannot be delivered already")
            entries.append(NewEntry(queue.value, n.body.wire, make_record(n), make_prefix(n)))
        names = await self.store.enqueue(entries, on_reserve)
        if notify and not self.store.owner:
            await self.store.notify_owner(names)
        return [built[name] for name in names]

    # ------------------------------------------------------------ changes

    async def save(self, msg: Message, *, from_queue: Queue, checked_out: bool = False) -> None:
        """Write ``msg`` to disk in the queue of its status (or delete it,
        with its body, when delivered)."""
        to_queue = queue_of(msg.status)
        if to_queue is None:
            await self.store.delete(from_queue.value, msg.id, checked_out=checked_out)
            return
        await self.store.write(
            from_queue.value,
            msg.id,
            encode_record(msg),
            to_queue=to_queue.value,
            checked_out=checked_out,
        )

    async def move_home(self, msg: Message, *, from_queue: Queue, checked_out: bool) -> None:
        """Move a record whose content is right but whose place is not to
        the queue of its status: renames only, nothing written (so it works
        on a full disk too)."""
        to_queue = queue_of(msg.status)
        if to_queue is None:
            await self.store.delete(from_queue.value, msg.id, checked_out=checked_out)
            return
        await self.store.write(
            from_queue.value, msg.id, None, to_queue=to_queue.value, checked_out=checked_out
        )

    async def delete_many(self, queue: Queue, message_ids: Sequence[str]) -> int:
        """Delete records of ``queue`` and their bodies in one thread hop
        (removed-message retention); ids no longer there are skipped."""
        return await self.store.delete_many(queue.value, message_ids)

    async def checkout(self, msg: Message, queue: Queue | None = None) -> None:
        """Mark ``msg`` as taken by an attempt; it is in ``queue`` (by
        default the queue of its status)."""
        where = queue or queue_of(msg.status)
        if where is None:
            raise ValueError(f"{msg.id}: a delivered message has no record to check out")
        await self.store.checkout(where.value, msg.id)

    async def release(self, msg: Message, queue: Queue) -> None:
        """Give a checked-out record back to ``queue`` unchanged."""
        await self.store.release(queue.value, msg.id)

    async def clear_reason(self, queue: Queue, message_id: str) -> None:
        """Forget why a record was set aside (it left ``queue``)."""
        await self.store.clear_reason(queue.value, message_id)

    async def names(self, queue: Queue) -> list[tuple[str, bool]]:
        """Ids in ``queue`` as ``(id, checked_out)``: a listing, no record read."""
        return await self.store.list_queue(queue.value)

    def wakeups(self) -> AbstractAsyncContextManager[AsyncIterator[Woken]]:
        """(Owner) ids that other processes report adding, each with the
        record sent along (if any); see Store.wakeups."""
        return self.store.wakeups()

    async def read_body(self, message_id: str) -> Body:
        return Body(await self.store.read_body(message_id))

    def body_path(self, message_id: str) -> Path:
        return self.store.body_path(message_id)

    # ------------------------------------------------------------ reading

    def _decode(self, rec: StoredRecord) -> Message | RecordError:
        return _decode_one(rec, self._dir_text)

    async def load(
        self,
        queue: Queue,
        *,
        on_batch: Callable[[list[Message]], None] | None = None,
        prepare: Callable[[Message], None] | None = None,
        batch_size: int = LOAD_BATCH,
        names: list[tuple[str, bool]] | None = None,
        on_moved: Callable[[Message], None] | None = None,
    ) -> tuple[list[Message], list[Unreadable]]:
        """Read every record of ``queue``, in name order.

        As owner: unreadable records are set aside in ``quarantine`` with
        their reason, and records whose status belongs elsewhere are moved
        there (and not returned). Without ownership nothing is changed and
        unreadable records are only reported.

        Records are read and decoded in a worker thread, ``batch_size`` at a
        time, a batch or so ahead of the one the event loop is handling; by
        :data:`LOAD_READERS` threads at once when a sample of the records
        is not in the page cache (after a reboot: the disk is kept busy), so
        memory holds a few batches of raw records at most. With
        ``on_batch``, the messages of each batch are handed to it as soon
        as they are read (and the list returned is empty): a caller that
        keeps them (the spool's index) then builds its own
        structures batch by batch, which keeps a large queue's memory
        compact. ``prepare``, when given, is called on each message read, in
        the reading thread, right after it is decoded (e.g.
        :meth:`~spoold.message.Message.intern`; the reading threads call it
        at once, each on its own batches, so it must be safe for that): what
        it makes and drops then never reaches the event loop, nor the cyclic
        collector. A :class:`~spoold.errors.StoreError` (reading, or setting a
        record aside) stops the load and is raised as it is. ``names``: the
        queue's listing, when the caller has one made just before
        (:meth:`RecoveryReport.take_listing
        <spoold.store.RecoveryReport.take_listing>`, right after the open);
        else the queue is listed here. ``on_moved``, when given, is called
        with each record moved to the queue of its status (as owner), once it
        is there: that queue may have been listed (or loaded) already.
        """
        messages: list[Message] = []
        unreadable: list[Unreadable] = []
        if names is None:
            names = await self.store.list_queue(queue.value)
        batches = [names[i : i + batch_size] for i in range(0, len(names), batch_size)]
        failure: StoreError | None = None
        # Reader k reads batches k, k + readers, ... into its own stream; they
        # are taken in turn, so batches are handled in name order. Several
        # readers only when the records must come from the disk: in memory
        # (a restart) more threads only hand the GIL back and forth.
        readers = 1
        if len(batches) > 1 and not await self.store.in_memory(
            queue.value, names[:: max(1, len(names) // _PROBES)]
        ):
            readers = min(LOAD_READERS, len(batches))
        streams = [
            anyio.create_memory_object_stream[_Decoded | StoreError](
                max(1, LOAD_READ_AHEAD // readers)
            )
            for _ in range(readers)
        ]
        receives = [receive for _send, receive in streams]
        with contextlib.ExitStack() as stack:
            for receive in receives:
                stack.enter_context(receive)
            async with anyio.create_task_group() as tg:
                decode = functools.partial(_decode_batch, queue, prepare, self._dir_text)
                for k, (send, _receive) in enumerate(streams):
                    tg.start_soon(self._read_ahead, queue, batches[k::readers], decode, send)
                for i in range(len(batches)):
                    decoded = await receives[i % readers].receive()
                    try:
                        if isinstance(decoded, StoreError):
                            raise decoded
                        good = await self._sort_batch(queue, decoded, unreadable, on_moved)
                    except StoreError as exc:
                        failure = exc
                        tg.cancel_scope.cancel()
                        break
                    if on_batch is None:
                        messages += good
                    else:
                        on_batch(good)
        if failure is not None:
            raise failure
        return messages, unreadable

    async def _read_ahead(
        self,
        queue: Queue,
        batches: list[list[tuple[str, bool]]],
        decode: Callable[[list[StoredRecord]], _Decoded],
        send: MemoryObjectSendStream[_Decoded | StoreError],
    ) -> None:
        """Read and decode ``batches`` in turn into ``send`` (a read that
        fails is sent as its error, and ends the reading)."""
        with send:
            for names in batches:
                try:
                    decoded = await self.store.read_records(queue.value, names, decode)
                except StoreError as exc:
                    await send.send(exc)
                    return
                await send.send(decoded)

    async def _sort_batch(
        self,
        queue: Queue,
        decoded: _Decoded,
        unreadable: list[Unreadable],
        on_moved: Callable[[Message], None] | None = None,
    ) -> list[Message]:
        """The readable messages of one batch that belong in ``queue``; the
        others are set aside or moved (as owner) and reported."""
        messages: list[Message] = []
        for item in decoded:
            if isinstance(item, Message):
                messages.append(item)
                continue
            rec, result = item
            if isinstance(result, RecordError):
                path = self.dir / queue.value / rec.name
                reason = f"unreadable record: {result}"
                if queue is Queue.QUARANTINE:
                    reason = await self.store.set_aside_reason(queue.value, rec.name) or reason
                elif self.store.owner:
                    try:
                        await self.store.set_aside(
                            queue.value, rec.name, Queue.QUARANTINE.value, reason
                        )
                    except StoreError as exc:
                        # Not even movable: skipped, and reported (log,
                        # check, metric); the rest of the queue is served.
                        reason = f"{reason}; left in place, cannot set it aside: {exc}"
                        log.error("record skipped", id=rec.name, path=str(path), reason=reason)
                        self.skipped[rec.name] = Unreadable(rec.name, queue, path, reason)
                        unreadable.append(self.skipped[rec.name])
                        continue
                    log.error("record set aside", id=rec.name, path=str(path), reason=reason)
                    path = self.dir / Queue.QUARANTINE.value / rec.name
                unreadable.append(Unreadable(rec.name, queue, path, reason))
                continue
            home = queue_of(result.status)
            if home is not queue and self.store.owner:
                log.warning(
                    "record moved to the queue of its status",
                    id=rec.name,
                    found_in=queue.value,
                    status=result.status.name,
                )
                await self.move_home(result, from_queue=queue, checked_out=rec.checked_out)
                if on_moved is not None:
                    on_moved(result)
                continue
            messages.append(result)
        return messages

    async def read_message(self, queue: Queue, message_id: str) -> Message:
        """One record; raises NotFoundError or RecordError."""
        rec = await self.store.read(queue.value, message_id)
        result = self._decode(rec)
        if isinstance(result, RecordError):
            raise RecordError(f"{message_id}: {result}")
        return result

    async def read_new(
        self,
        ids: Sequence[str],
        queues: Sequence[Queue],
        sent: Mapping[str, bytes | None] | None = None,
    ) -> dict[str, tuple[Queue, Message | RecordError]]:
        """Records of ``ids`` (messages other processes added), each from the
        first of ``queues`` that holds it, in one worker-thread hop; ids
        found nowhere are left out. Changes nothing.

        ``sent``: records their writers sent along with their names (the
        wake-up socket's). Such a record is used instead of reading the
        file when the file is still there, in the first queue that holds
        it, with the same size: a ``stat`` in a grouped hop instead of
        reading it. A record no longer there is left out, as when it is
        read. The size stands for the content on two assumptions (see
        :mod:`spoold.store.wakeup`): only the owner's own user (or root)
        sends records (the socket checks the sender's uid), and the owner
        never rewrites a file it has not indexed, so a file of the size of
        the record its writer sent is that record."""
        names = [q.value for q in queues]
        if sent and any(sent.get(i) for i in ids):
            records = await self.store.read_many_grouped(names, ids, sent)
        else:
            records = await self.store.read_many(names, ids)
        return {rec.name: (Queue(rec.queue), self._decode(rec)) for rec in records}

    async def find(
        self, message_id: str, queues: Sequence[Queue] = tuple(Queue)
    ) -> Message | Unreadable:
        """The record of ``message_id`` from the first of ``queues`` that
        holds it, or what is known of it when it cannot be read (in
        quarantine: the reason it was set aside). Changes nothing; raises
        NotFoundError when no queue holds it."""
        for queue in queues:
            try:
                rec = await self.store.read(queue.value, message_id)
            except NotFoundError:
                continue
            result = self._decode(rec)
            if not isinstance(result, RecordError):
                return result
            where = f"{queue.value}/{CHECKOUT}" if rec.checked_out else queue.value
            reason = f"unreadable record: {result}"
            if queue is Queue.QUARANTINE:
                reason = await self.store.set_aside_reason(queue.value, message_id) or reason
            return Unreadable(message_id, queue, self.dir / where / message_id, reason)
        raise NotFoundError(f"{message_id}: no such message")

    async def count(self, queue: Queue) -> int:
        return len(await self.store.list_queue(queue.value))

    async def check(self, max_age: float = 3600.0, *, quick: bool = False) -> list[Problem]:
        """The store's consistency check, plus every record of ``active``,
        ``frozen`` and ``removed`` that cannot be read (kind
        ``unreadable``; quarantine holds such records on purpose), and every
        body of theirs that is not what was spooled (kind ``damaged_body``:
        its size, and unless ``quick`` its SHA-256, against the record's).
        Reads and decodes every record (and hashes every body) off the event
        loop, one queue per worker-thread hop; changes nothing."""
        problems = await self.store.check(max_age)
        for queue in (Queue.ACTIVE, Queue.FROZEN, Queue.REMOVED):
            if not self.usable(queue):
                continue  # the store's check reports the directory
            records = await self.store.read_queue(queue.value)
            bad = await anyio.to_thread.run_sync(_unreadable_records, records)
            for rec, error in bad:
                where = f"{queue.value}/{CHECKOUT}" if rec.checked_out else queue.value
                problems.append(
                    Problem("unreadable", rec.name, str(self.dir / where / rec.name), str(error))
                )
            unreadable = {rec.name for rec, _ in bad}
            readable = [rec for rec in records if rec.name not in unreadable]
            problems += await anyio.to_thread.run_sync(self._damaged_bodies, readable, quick)
        return problems

    def _damaged_bodies(self, records: list[StoredRecord], quick: bool) -> list[Problem]:
        problems = []
        for rec in records:
            msg = _decode_one(rec)
            if isinstance(msg, RecordError):
                continue
            check = msg.body_check()
            if check is None:
                continue  # written before bodies had a checksum
            path = self.store.body_path(rec.name)
            try:
                if quick:
                    check.sizes(path, os.stat(path).st_size)
                else:
                    digest = hashlib.sha256()
                    size = 0
                    with open(path, "rb") as f:
                        while chunk := f.read(_CHECK_READ):
                            digest.update(chunk)
                            size += len(chunk)
                        if not still_named(str(path), f.fileno()):
                            continue  # deleted while read: its file may hold another's now
                    check.sizes(path, size)
                    check.digest(path, digest.hexdigest())
            except FileNotFoundError:
                continue  # missing_body: the store's check says so
            except OSError as exc:
                problems.append(Problem("damaged_body", rec.name, str(path), str(exc)))
            except BodyDamagedError as exc:
                problems.append(Problem("damaged_body", rec.name, str(path), str(exc)))
        return problems

    async def set_aside_reason(self, queue: Queue, message_id: str) -> str | None:
        """Why a record was set aside in ``queue`` (None: no reason kept)."""
        return await self.store.set_aside_reason(queue.value, message_id)


def _decode_batch(
    queue: Queue,
    prepare: Callable[[Message], None] | None,
    spool_dir: str,
    records: list[StoredRecord],
) -> _Decoded:
    """Decode one batch of ``queue`` (in the worker thread that read it)."""
    out: _Decoded = []
    with gc_paused():
        for rec in records:
            msg = _decode_one(rec, spool_dir)
            if isinstance(msg, RecordError):
                out.append((rec, msg))
                continue
            if prepare is not None:
                prepare(msg)
            out.append(msg if queue_of(msg.status) is queue else (rec, msg))
    return out


def _unreadable_records(records: list[StoredRecord]) -> list[tuple[StoredRecord, RecordError]]:
    out = []
    with gc_paused():
        for rec in records:
            result = _decode_one(rec)
            if isinstance(result, RecordError):
                out.append((rec, result))
    return out


def _decode_one(rec: StoredRecord, spool_dir: str | None = None) -> Message | RecordError:
    """The message of ``rec``, or why there is none (a file that could not
    be read counts as a record that cannot be decoded)."""
    if rec.error is not None:
        return RecordError(f"cannot read the file: {rec.error}")
    try:
        return decode_record(rec.data, expected_id=rec.name, spool_dir=spool_dir)
    except RecordError as exc:
        return exc
