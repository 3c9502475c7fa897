"""One webhook's durable outbox: the events still to be posted to it.

The outbox is a directory, ``SPOOL/webhooks/NAME/``, holding one file per
event, named by a sequence number that orders the events (``0000000000000042.json``).
The file's content is the event's JSON body, exactly the bytes posted.

Invariants and commit points:

* An event is in the outbox once :meth:`Outbox.append` has returned: each
  file is written under a temporary name, synced, renamed, and the
  directory is synced once per batch. A crash before that leaves at most a
  ``.tmp`` file, removed at the next open. The files of a batch are
  written by several threads at once (their syncs are committed together).
* An event leaves the outbox through :meth:`Outbox.remove`, which the
  sender calls after the endpoint answered 2xx, for several events at once
  (their files unlinked, the directory synced once). A crash between the
  answer and the removal posts the event again after a restart.
* The sender posts several events at once: :meth:`Outbox.claim` hands out
  the oldest event not yet claimed, :meth:`Outbox.unclaim` gives one back
  (its post failed: it is the oldest again), and a removed or dropped
  event is no longer claimed. Claims live in memory only.
* The outbox holds at most ``max_events``; appending to a full outbox
  drops the oldest events first (counted in :attr:`Outbox.dropped`), so
  a dead endpoint costs bounded disk.
* An event that cannot be posted (its file cannot be read, it is not an
  event spoold wrote, or the endpoint refuses it for good) is set aside by
  :meth:`Outbox.set_aside`: moved to ``SPOOL/webhooks/NAME/rejected/``
  (counted in :attr:`Outbox.rejected`), so it never holds up the others.
  ``rejected/`` keeps at most ``max_events`` too (the oldest go), and no
  number is used twice (it counts past the events set aside).
* :meth:`Outbox.open` re-reads the directory: what was not posted before a
  stop or a crash is posted after the next start.

The blocking methods (``open``, ``append``, ``read``, ``remove``) do file
work: call them through ``anyio.to_thread``. They may run at once in
different threads (the writer appends while the sender removes): the
in-memory list of names and the claims are guarded by a lock never held
over file work.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from spoold.numerals import ascii_decimal
from spoold.store.directory import fsync_directory

__all__ = ["Outbox", "OutboxWriteError", "OUTBOX_DIR", "REJECTED_DIR"]

OUTBOX_DIR = "webhooks"  # under the spool directory
REJECTED_DIR = "rejected"  # under an outbox: the events set aside
_SUFFIX = ".json"
_TMP = ".tmp"
_WIDTH = 16
_WRITERS = 16  # threads writing one batch's files at once


class OutboxWriteError(Exception):
    """:meth:`Outbox.append` failed part-way (a full disk, a disk error):
    ``written`` of the events are in the outbox (and will be posted), the
    others are not; ``dropped`` were dropped from a full outbox."""

    def __init__(self, written: int, dropped: int, error: OSError) -> None:
        super().__init__(str(error))
        self.written = written
        self.dropped = dropped
        self.error = error


class Outbox:
    """The outbox of one webhook (module docstring)."""

    def __init__(self, directory: Path, max_events: int) -> None:
        self.directory = directory
        self.max_events = max_events
        self.dropped = 0  # events dropped because the outbox was full, since start
        self.rejected = 0  # events set aside (never posted), since start
        self._names: deque[str] = deque()
        self._claimed: set[str] = set()  # being posted, or posted and not yet removed
        self._rejected: deque[str] = deque()  # the events in rejected/, oldest first
        self._next = 0
        # Guards the names only (never held over file work): the sender
        # reads the oldest on the event loop while a batch is written.
        self._lock = threading.Lock()

    def open(self) -> None:
        """Create the directory if missing, clear half-written files and
        load the names of the events waiting (oldest first)."""
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        for entry in os.scandir(self.directory):
            if entry.name.endswith(_TMP):
                with contextlib.suppress(OSError):  # not ours to fail on (a directory)
                    os.unlink(entry.path)
        numbered = _events_in(self.directory)
        rejected = self.directory / REJECTED_DIR
        aside = _events_in(rejected) if rejected.is_dir() else []
        with self._lock:
            self._names = deque(name for _, name in numbered)
            self._rejected = deque(name for _, name in aside)
            self._claimed.clear()
        # Numbered past the events set aside too: a name is never reused.
        self._next = max((n for n, _ in numbered[-1:] + aside[-1:]), default=-1) + 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._names)

    def append(self, bodies: Sequence[bytes]) -> int:
        """Write ``bodies`` as new events (one directory sync for all) and
        drop the oldest beyond ``max_events``; returns how many were dropped.
        An error part-way raises :class:`OutboxWriteError` once the events
        written before it are synced; no ``.tmp`` file is left."""
        if not bodies:
            return 0
        with self._lock:
            first = self._next
            self._next += len(bodies)
        names = [f"{first + n:0{_WIDTH}d}{_SUFFIX}" for n in range(len(bodies))]
        # The files are written and synced by several threads at once: the
        # file system commits concurrent syncs together, many times faster
        # than one after another.
        with ThreadPoolExecutor(min(_WRITERS, len(bodies))) as pool:
            errors = list(pool.map(self._write_one, names, bodies))
        error = next((e for e in errors if e is not None), None)
        done = [name for name, e in zip(names, errors, strict=True) if e is None]
        written = len(done)
        with self._lock:
            self._names.extend(done)  # in order: the names are numbered in order
        dropped = 0
        if written:
            with self._lock:
                gone = [self._names.popleft() for _ in range(len(self._names) - self.max_events)]
                self._claimed.difference_update(gone)
                self.dropped += len(gone)
            dropped = len(gone)
            try:
                for name in gone:
                    self._unlink(name)
                fsync_directory(self.directory)
            except OSError as exc:
                error = error or exc
        if error is not None:
            raise OutboxWriteError(written, dropped, error)
        return dropped

    def _write_one(self, name: str, body: bytes) -> OSError | None:
        """One event: written under a temporary name, synced, renamed; the
        error, if any (its temporary file removed)."""
        tmp = self.directory / (name + _TMP)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            try:
                _write_all(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.directory / name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return exc
        return None

    def oldest(self) -> str | None:
        """The name of the oldest event waiting, None when empty."""
        with self._lock:
            return self._names[0] if self._names else None

    def claim(self) -> str | None:
        """The oldest event waiting that is not claimed, now claimed; None
        when every event waiting is. Claims are few (the events in flight
        and those waiting for their removal), so this looks at few names."""
        with self._lock:
            for name in self._names:
                if name not in self._claimed:
                    self._claimed.add(name)
                    return name
            return None

    def unclaim(self, name: str) -> None:
        """Give ``name`` back: it is posted again, in its place by age."""
        with self._lock:
            self._claimed.discard(name)

    def unclaim_all(self) -> None:
        """Give every claim back (the sender starts over)."""
        with self._lock:
            self._claimed.clear()

    def read(self, name: str) -> bytes | None:
        """The body of event ``name``; None if it is gone (dropped from a
        full outbox, or its file deleted by hand): then the name is
        forgotten too, so the next oldest comes next."""
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            with self._lock, contextlib.suppress(ValueError):
                self._claimed.discard(name)
                self._names.remove(name)
            return None

    def set_aside(self, name: str) -> None:
        """Take event ``name`` out of the outbox without posting it: its
        file (or whatever has its name) is moved to ``rejected/``; if even
        that fails, the name is forgotten until the next open. Never raises."""
        with self._lock:
            self._claimed.discard(name)
            with contextlib.suppress(ValueError):
                self._names.remove(name)
            self.rejected += 1
        rejected = self.directory / REJECTED_DIR
        with contextlib.suppress(OSError):
            rejected.mkdir(mode=0o750, exist_ok=True)
            os.rename(self.directory / name, rejected / name)
            fsync_directory(self.directory)
            with self._lock:
                self._rejected.append(name)
                gone = [
                    self._rejected.popleft() for _ in range(len(self._rejected) - self.max_events)
                ]
            for old in gone:  # rejected/ is bounded like the outbox: the oldest go
                with contextlib.suppress(OSError):
                    if (rejected / old).is_dir():
                        os.rmdir(rejected / old)
                    else:
                        os.unlink(rejected / old)

    def remove(self, names: Sequence[str]) -> None:
        """Forget the events ``names`` (posted): their files unlinked, then
        one directory sync for all; durable when this returns. A name
        already gone (dropped from a full outbox meanwhile) is skipped."""
        wanted = set(names)
        gone = []
        with self._lock:
            self._claimed.difference_update(wanted)
            # Posted events are nearly always the oldest: taken from the front.
            while self._names and self._names[0] in wanted:
                gone.append(self._names.popleft())
                wanted.discard(gone[-1])
            for name in wanted:
                with contextlib.suppress(ValueError):
                    self._names.remove(name)
                    gone.append(name)
        if not gone:
            return
        for name in gone:
            self._unlink(name)
        fsync_directory(self.directory)

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / name)


def _events_in(directory: Path) -> list[tuple[int, str]]:
    """The events in ``directory`` as (number, file name), oldest first. A
    name that is not ASCII digits and ``.json`` is no event (it is left as
    it is): ``"².json"`` or Arabic-Indic digits pass :meth:`str.isdigit`,
    and numbering past such a name would fail or reuse an event's name."""
    events = []
    for entry in os.scandir(directory):
        if entry.name.endswith(_SUFFIX):
            number = ascii_decimal(entry.name[: -len(_SUFFIX)])
            if number is not None:
                events.append((number, entry.name))
    events.sort()
    return events


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (``os.write`` may write part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
