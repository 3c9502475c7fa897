"""Adding messages to a spool another process owns.

A spool has one owner (a :class:`~spoold.spool.Spool`, usually the daemon)
that schedules and changes messages; any number of other processes may add
new ones at the same time (the registry keeps ids unique). A
:class:`SpoolWriter` is such a process's handle: :meth:`SpoolWriter.add`
checks the submission, writes every message durably (the same commit rules
as the owner's own ``add``) and tells the owner through its wake-up socket
(batched, never making ``add`` wait: the message is durable already), which
adopts them at once (or at its next rescan, if no datagram got through).
The daemon's SMTP ingest workers are writers.

:class:`~spoold.submission.Submission` is the one add path (records,
idempotency, disk) of the writer and of the owner's
:meth:`Spool.add <spoold.spool.Spool.add>`: they differ only in what
follows the write (the writer wakes the owner, here).
:func:`~spoold.submission.new_messages` is still importable from here.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, cast

import anyio

from spoold.dkim import DkimSigner
from spoold.idempotency import DEFAULT_IDEMPOTENCY_WINDOW, KeyFiles
from spoold.message import Message, RetryInterval, RoutedBatch, encode_record
from spoold.ondisk import NewMessage, OnDiskSpool
from spoold.settings import Setting, WriterSettings
from spoold.store import SyncMode
from spoold.submission import Submission, new_messages
from spoold.suppression import SuppressedRecipients, Suppressions
from spoold.tasks import own_tasks
from spoold.times import utcnow

if TYPE_CHECKING:
    from spoold.fleet_keys import FleetKeys

__all__ = ["SpoolWriter", "new_messages"]


class _Notifier:
    """Tells the owner about new messages without making ``add`` wait: the
    ids collect here and go out in as few datagrams as the owner's queue
    takes; while it is full, they wait and collect more (a few ms). Each
    goes with its record as written (the owner then need not read it
    back); only messages already durable are told."""

    def __init__(self, disk: OnDiskSpool) -> None:
        self._disk = disk
        self._pending: list[str] = []
        self._records: list[bytes | None] = []
        self._wake = anyio.Event()

    def tell(self, messages: Sequence[Message], records: Sequence[bytes] | None = None) -> None:
        """``records``: the messages' records as written, if known (else
        encoded here)."""
        self._pending += [m.id for m in messages]
        self._records += records if records is not None else [encode_record(m) for m in messages]
        self._wake.set()

    def flush(self) -> None:
        """One last try, without waiting (the owner rescans for the rest)."""
        if self._pending:
            self._disk.store.try_notify_owner(self._pending, self._records)
            self._pending, self._records = [], []

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            pause = 0.002
            while self._pending:
                ids, self._pending = self._pending, []
                records, self._records = self._records, []
                result, sent = self._disk.store.notify_owner_some(ids, records)
                if result == "busy":  # those not sent wait, the others are out
                    self._pending = ids[sent:] + self._pending
                    self._records = records[sent:] + self._records
                    await anyio.sleep(pause)
                    pause = min(pause * 2, 0.2)


class SpoolWriter:
    """Adds messages to a spool owned by another process. Use :meth:`open`."""

    def __init__(
        self, disk: OnDiskSpool, settings: WriterSettings, now: Callable[[], datetime]
    ) -> None:
        self._disk = disk
        self._settings = settings
        # Signs each new message (None: none); assigning a new one (a
        # reload) applies it to the next add.
        self.dkim: DkimSigner | None = None
        self._notifier = _Notifier(disk)
        self._submission = _WriterSubmission(disk, self, now, self._notifier)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        spool_dir: str | os.PathLike[str],
        *,
        default_retry_intervals: Sequence[RetryInterval] | None = None,
        min_free_space: int = 0,
        max_threads: int = 16,
        now: Callable[[], datetime] | None = None,
        sync: SyncMode = "fsync",
        idempotency_window: timedelta = DEFAULT_IDEMPOTENCY_WINDOW,
        settings: WriterSettings | None = None,
        dkim: DkimSigner | None = None,
    ) -> AsyncIterator[SpoolWriter]:
        """Open an existing spool directory for adding (never creates one,
        never takes its lock). ``min_free_space`` and ``idempotency_window``
        as for the owner. ``settings``: ``default_retry_intervals``,
        ``min_free_space``, ``sync`` and ``idempotency_window`` as one value
        (:class:`~spoold.settings.WriterSettings`), used instead of them;
        without it, ``default_retry_intervals`` is required. Replaceable
        while open through :attr:`settings`. ``dkim``: signs new messages
        as the owner's does (:meth:`Spool.open <spoold.spool.Spool.open>`);
        replaceable through :attr:`dkim`. An exception raised in the body
        comes out unchanged; a failure of the writer's own task, as
        :class:`~spoold.errors.SpoolFailedError`."""
        if settings is None:
            if default_retry_intervals is None:
                raise TypeError("SpoolWriter.open needs default_retry_intervals or settings")
            settings = WriterSettings(
                default_retry_intervals=tuple(default_retry_intervals),
                min_free_space=min_free_space,
                sync=sync,
                idempotency_window=idempotency_window,
            )
        disk, _ = await OnDiskSpool.open(
            spool_dir,
            owner=False,
            create=False,
            max_threads=max_threads,
            min_free_bytes=settings.min_free_space,
            sync=settings.sync,
        )
        try:
            writer = cls(disk, settings, now or utcnow)
            writer.dkim = dkim
            async with own_tasks(f"spool writer on {disk.dir}") as tg:
                tg.start_soon(writer._notifier.run)
                try:
                    yield writer
                finally:
                    writer._notifier.flush()
                    tg.cancel_scope.cancel()
        finally:
            await disk.close()

    @property
    def settings(self) -> WriterSettings:
        """How this writer adds, as one value; assigning a new one (a
        reload) applies it to the next :meth:`add`."""
        return self._settings

    @settings.setter
    def settings(self, value: WriterSettings) -> None:
        self._settings = value
        self._disk.store.min_free_bytes = value.min_free_space
        self._disk.store.sync = value.sync

    @property
    def spool_dir(self) -> Path:
        return self._disk.dir

    @property
    def suppressions(self) -> Suppressions:
        """The spool's suppression list as this process last read it (the
        owner writes it; :meth:`Suppressions.refresh` reads it again when
        it changed, as :meth:`add` does)."""
        return self._submission.suppressions

    @property
    def shared_keys(self) -> FleetKeys | None:
        """Fleet-wide idempotency claims (:mod:`spoold.fleet_keys`), as for
        :attr:`Spool.shared_keys <spoold.spool.Spool.shared_keys>`."""
        return self._submission.shared_keys

    @shared_keys.setter
    def shared_keys(self, shared: FleetKeys | None) -> None:
        self._submission.shared_keys = shared

    # One setting at a time: each reads :attr:`settings` and, assigned,
    # replaces it with a value that differs in that field.
    sync = Setting[SyncMode]()
    min_free_space = Setting[int]()
    default_retry_intervals = Setting[Sequence[RetryInterval]](convert=tuple)
    idempotency_window = Setting[timedelta]()
    suppressed_recipients = Setting[SuppressedRecipients]()

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
        """Like :meth:`Spool.add <spoold.spool.Spool.add>`: durable when it
        returns; the owner is told (it adopts the messages). An
        ``idempotency_key`` another process (the owner, another writer)
        used within the window gives back that submission's ids."""
        return await self._submission.add(
            batch,
            frozen=frozen,
            flows=flows,
            parent_id=parent_id,
            prefix=prefix,
            idempotency_key=idempotency_key,
            submitter_uid=submitter_uid,
        )


class _WriterSubmission(Submission):
    """A writer's add path: what is written is told to the owner."""

    def __init__(
        self,
        disk: OnDiskSpool,
        writer: SpoolWriter,
        now: Callable[[], datetime],
        notifier: _Notifier,
    ) -> None:
        super().__init__(
            disk,
            KeyFiles(disk.dir),
            lambda: writer.settings,
            now,
            Suppressions(disk.dir, owner=False),
            lambda: writer.dkim,
        )
        self._notifier = notifier
        # Records as the store wrote them, from the write to the telling:
        # the owner gets the very bytes, not encoded a second time.
        self._encoded: dict[str, bytes] = {}

    async def _write(self, new: Sequence[NewMessage]) -> list[Message]:
        records: dict[str, bytes] = {}
        messages = await self._disk.add(new, notify=False, records=records)
        # Only once all are durable; no await from here to _written, so
        # these are this add's records (a write not followed by a telling
        # leaves one dict behind, replaced by the next write, never more).
        self._encoded = records
        return messages

    def _written(self, messages: list[Message], frozen: bool) -> list[str]:
        encoded, self._encoded = self._encoded, {}
        records = [encoded.get(m.id) for m in messages]
        if None in records:  # not written through _write (cannot happen): encoded anew
            self._notifier.tell(messages)
        else:
            self._notifier.tell(messages, cast("list[bytes]", records))
        return [m.id for m in messages]
