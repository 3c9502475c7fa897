"""Idempotency keys: one submission per key, across retries, processes and restarts.

A client that retries a submission after losing the reply (a dropped
connection, a timeout) gives the same key both times; the second
submission gets the first one's message ids back and queues nothing. The
key is remembered for ``window`` (``spool.idempotency_window``) from the
first submission.

On disk (``SPOOL/idempotency/``) each key has one small file named by the
SHA-256 of the key (hex): a JSON object ``{"key", "time", "ids"}``. The
file is the key's lock as well: a submission takes ``flock(LOCK_EX)`` on it
for the whole check-add-record sequence, so two processes (the daemon and
its ingest workers) or two tasks submitting the same key at once are
serialised, and the second finds the first's ids. A process that dies
holding the lock releases it with its descriptors; nothing stale is left.
Within one process, submitters of the same key first queue on an
in-memory lock, so at most one worker thread per key ever waits in
``flock``: many submissions of one key at once (a client retrying hard)
cannot take every worker thread while the holder needs one to record its
ids.

Order of a keyed submission (:meth:`KeyFiles.claim`):

1. open (create) the key file and lock it (a worker thread; it may wait
   for another submitter of the same key);
2. if it holds ids younger than the window, return them;
3. else the caller writes the messages, each record carrying the key
   (durable when ``add`` returns, as always);
4. the ids are written to the key file (a temporary file, fsynced, renamed
   over it) and the lock is released.

The key file also keeps a fingerprint of the submission's envelope (sender
and the set of recipients): a key given again with another envelope is a
client's mistake (one key reused for several messages), not a retry, and is
refused with :class:`~spoold.errors.IdempotencyKeyError` rather than
answered with the first message's ids (which would drop the new message
without a word). The body is not part of it: a retry is the same
submission even if the client rebuilt its headers.

A crash between 3 and 4 leaves records with the key but a key file without
their ids: the owner rebuilds those from the records when it opens the spool
(:meth:`KeyFiles.repair`). Only a retry arriving in that window, while the
owner has not yet been restarted after the crash of an ingest worker, could
queue a second copy. Expired key files are deleted by the owner's
housekeeping (:meth:`KeyFiles.expire`), under the same lock.

All file work runs in worker threads; filesystem errors are raised as
:class:`~spoold.errors.StoreError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import anyio
import msgspec

from spoold.errors import IdempotencyKeyError, StoreError
from spoold.message import RoutedBatch
from spoold.store.directory import fsync_directory

__all__ = [
    "IDEMPOTENCY_DIR",
    "DEFAULT_IDEMPOTENCY_WINDOW",
    "MAX_KEY_LENGTH",
    "validate_key",
    "user_key",
    "KeyFiles",
    "Claim",
]

IDEMPOTENCY_DIR = "idempotency"
DEFAULT_IDEMPOTENCY_WINDOW = timedelta(days=1)
MAX_KEY_LENGTH = 1000


def validate_key(key: str) -> str:
    """``key`` if it can be used: 1 to 1000 characters, none of them a
    control character. Raises :class:`IdempotencyKeyError`."""
    if not key:
        raise IdempotencyKeyError("an idempotency key cannot be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise IdempotencyKeyError(
            f"an idempotency key is at most {MAX_KEY_LENGTH} characters (got {len(key)})"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise IdempotencyKeyError("an idempotency key cannot hold control characters")
    return key


def user_key(key: str, uid: int) -> str:
    """The key a local user's submission is kept under: the client's key
    (checked) scoped by the user's uid, so users never share keys: one user
    can neither suppress another's mail by giving its key first, nor get
    it refused. A key too long to take the prefix is kept by its SHA-256."""
    scoped = f"uid {uid}: {validate_key(key)}"
    if len(scoped) > MAX_KEY_LENGTH:
        scoped = (
            f"uid {uid}: sha256 {hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"
        )
    return scoped


class _KeyRecord(msgspec.Struct):
    key: str
    time: datetime
    ids: list[str]
    envelope: str = ""  # fingerprint of the submission's envelope ("": not known)


def batch_fingerprint(batch: RoutedBatch) -> str:
    """:func:`envelope_fingerprint` of a batch: its sender and every
    recipient of its envelopes."""
    return envelope_fingerprint(
        batch.envelopes[0].sender if batch.envelopes else "",
        (r for e in batch.envelopes for r in e.recipients),
    )


def envelope_fingerprint(sender: str, recipients: Iterable[str]) -> str:
    """What a repeat of a keyed submission must match: the sender and the
    set of recipients (order, repeats and the case of domains aside)."""

    def norm(addr: str) -> str:
        local, at, domain = addr.rpartition("@")
        return f"{local}{at}{domain.lower()}" if at else addr

    text = "\0".join([sender, *sorted({norm(r) for r in recipients})])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_KeyRecord)


def _file_name(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(slots=True)
class Claim:
    """A key locked by this process (see :meth:`KeyFiles.claim`)."""

    key: str
    path: Path
    fd: int
    found: _KeyRecord | None

    def ids(self, now: datetime, window: timedelta, envelope: str = "") -> list[str] | None:
        """The ids of an earlier submission with this key still inside the
        window, or None. ``envelope`` (:func:`envelope_fingerprint`): an
        earlier submission with another envelope raises
        :class:`~spoold.errors.IdempotencyKeyError`."""
        found = self.found
        if found is None or found.key != self.key or not found.ids:
            return None
        if now - found.time >= window:
            return None
        if envelope and found.envelope and envelope != found.envelope:
            raise IdempotencyKeyError(
                f"idempotency key {self.key!r} was given to another submission "
                f"(message {', '.join(found.ids)}) with a different envelope; "
                "a new message needs a new key"
            )
        return list(found.ids)


def _lock_sync(directory: Path, key: str) -> Claim:
    path = directory / _file_name(key)
    try:
        os.makedirs(directory, mode=0o750, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # The file may have been replaced (ids written) or deleted
                # (expired) while we waited: then lock the one there now.
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        data = os.pread(fd, 1 << 20, 0)
    except OSError as exc:
        raise StoreError(f"cannot lock the idempotency key file {path}: {exc.strerror}") from None
    found = None
    if data:
        with contextlib.suppress(msgspec.DecodeError):
            found = _decoder.decode(data)
    return Claim(key, path, fd, found)


def _write_sync(claim: Claim, record: _KeyRecord) -> None:
    tmp = claim.path.with_name(f".{claim.path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, _encoder.encode(record) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, claim.path)
        fsync_directory(claim.path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StoreError(f"cannot write the idempotency key file {claim.path}: {exc}") from None


class KeyFiles:
    """The idempotency keys of one spool directory."""

    def __init__(self, spool_dir: Path) -> None:
        self.dir = spool_dir / IDEMPOTENCY_DIR
        # key -> (its in-process lock, how many tasks hold or wait for it)
        self._local: dict[str, tuple[anyio.Lock, int]] = {}

    @asynccontextmanager
    async def claim(self, key: str) -> AsyncIterator[Claim]:
        """Lock ``key`` for the block (waiting for any other submitter of the
        same key); the claim says what an earlier submission left."""
        validate_key(key)
        async with self._local_lock(key):
            claim = await anyio.to_thread.run_sync(_lock_sync, self.dir, key)
            try:
                yield claim
            finally:
                os.close(claim.fd)  # releases the lock

    @asynccontextmanager
    async def _local_lock(self, key: str) -> AsyncIterator[None]:
        """The in-process lock of ``key``, forgotten when no task wants it."""
        lock, users = self._local.get(key, (anyio.Lock(), 0))
        self._local[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._local[key]
            if users == 1:
                del self._local[key]
            else:
                self._local[key] = (lock, users - 1)

    async def record(
        self, claim: Claim, ids: list[str], time: datetime, envelope: str = ""
    ) -> None:
        """Remember ``ids`` (and the ``envelope`` fingerprint) for the
        claimed key (durable when it returns)."""
        record = _KeyRecord(claim.key, time, ids, envelope)
        await anyio.to_thread.run_sync(_write_sync, claim, record)

    async def add_once(
        self,
        key: str,
        batch: RoutedBatch,
        now: datetime,
        window: timedelta,
        add: Callable[[], Awaitable[list[str]]],
    ) -> tuple[list[str], bool]:
        """A keyed submission (steps 1-4 above): ``add()`` writes the
        messages (each record carrying the key) unless an earlier
        submission of ``key`` within ``window`` did. Returns the ids and
        whether they are an earlier submission's."""
        envelope = batch_fingerprint(batch)
        async with self.claim(validate_key(key)) as claim:
            earlier = claim.ids(now, window, envelope)
            if earlier is not None:
                return earlier, True
            ids = await add()
            await self.record(claim, ids, now, envelope)
            return ids, False

    async def repair(
        self, found: Iterable[tuple[str, str, datetime]], now: datetime, window: timedelta
    ) -> int:
        """(Owner, at open) make sure every key in ``found`` — ``(key,
        message id, spool date)`` from the records — names its messages in
        its key file (a crash may have come between the two writes).
        Returns how many key files were written."""
        by_key: dict[str, tuple[datetime, list[str]]] = {}
        for key, mid, spooled in found:
            if now - spooled >= window:
                continue
            when, ids = by_key.setdefault(key, (spooled, []))
            ids.append(mid)
            by_key[key] = (min(when, spooled), ids)
        written = 0
        for key, (when, ids) in by_key.items():
            async with self.claim(key) as claim:
                have = claim.found.ids if claim.found and claim.found.key == key else []
                if set(ids) <= set(have):
                    continue
                envelope = claim.found.envelope if claim.found and claim.found.key == key else ""
                merged = list(dict.fromkeys([*have, *sorted(ids)]))
                await self.record(claim, merged, when, envelope)
                written += 1
        return written

    async def expire(self, now: datetime, window: timedelta) -> int:
        """Delete the key files older than ``window`` (and unreadable ones
        left by a crash); return how many."""
        return await anyio.to_thread.run_sync(self._expire_sync, now, window)

    def _expire_sync(self, now: datetime, window: timedelta) -> int:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return 0
        gone = 0
        for name in names:
            path = self.dir / name
            if name.startswith("."):  # a temporary file of a writer that died
                if time.time() - _mtime(path) > 3600:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                continue
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use: it is not expiring now
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    continue
                data = os.pread(fd, 1 << 20, 0)
                try:
                    record = _decoder.decode(data)
                except msgspec.DecodeError:
                    record = None
                if record is not None and record.ids and now - record.time < window:
                    continue
                # Expired, or empty (a submission that failed): nobody holds
                # it, and one about to lock it finds it gone and makes another.
                os.unlink(path)
                gone += 1
            except FileNotFoundError:
                continue
            finally:
                os.close(fd)
        return gone


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
