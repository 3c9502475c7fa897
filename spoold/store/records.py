"""What goes into a store and what comes out of it: plain values, no I/O.

An entry to add (:class:`NewEntry`), a record read back
(:class:`StoredRecord`), a finding of the consistency check
(:class:`Problem`), what opening as owner repaired
(:class:`RecoveryReport`), and the hook that names each filesystem step
(:data:`StepHook`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "NewEntry",
    "StoredRecord",
    "Problem",
    "ProblemKind",
    "RecoveryReport",
    "StepHook",
    "SyncMode",
]

SyncMode = Literal["fsync", "syncfs"]
"""How :meth:`~spoold.store.Store.enqueue` makes new entries durable:
each call's files and directories fsynced, or the calls under way at once
committed together with two ``syncfs`` (group commit)."""

StepHook = Callable[[str], None]
"""Called with the name of each filesystem step just before it runs (tests
use it to simulate a crash at that step). It may run in two threads at
once: a large group commit's files are written by two (see
:mod:`spoold.store.sharing`), so a hook that keeps state must lock it."""


@dataclass(frozen=True, slots=True)
class NewEntry:
    """One entry to enqueue. ``make_record(name, batch_names)`` turns the
    name the store reserved (and those of the whole batch, in order) into
    the record's bytes, so a record can contain its own and its siblings'
    ids.

    Threads: the callbacks of one ``enqueue`` call (these, and its
    ``on_reserve``) all run in one thread, one after another; those of
    different calls committed together may run at the same time in two
    threads (see :mod:`spoold.store.sharing`). State they share between
    calls must be locked."""

    queue: str
    body: bytes
    make_record: Callable[[str, Sequence[str]], bytes]
    # Bytes written before ``body`` in the body file, given the name (e.g.
    # a header naming the entry); ``body`` itself is never copied for it.
    # Called before ``make_record`` for the same name, in the same thread.
    make_prefix: Callable[[str], bytes] | None = None


@dataclass(frozen=True, slots=True)
class StoredRecord:
    name: str
    queue: str
    data: bytes
    checked_out: bool
    # Why the file could not be read (``data`` is then empty), e.g. its
    # permissions: a caller treats it as a record that cannot be decoded.
    error: str | None = None


ProblemKind = Literal[
    "orphan_body",  # a body no record names (its writer is gone, or it is old)
    "orphan_registry",  # a registry entry with nothing behind it
    "missing_body",  # a record whose body is gone
    "duplicate",  # one name in two places
    "damaged_body",  # a body that is not what was spooled (its size or checksum)
    "stale_tmp",  # a file left in tmp/ past the age limit
    "unusable_dir",  # a directory of the store this process cannot use
    "stale_checkout",  # a record checked out past the age limit
    "stray_file",  # a file in a queue whose name is not an id
    "unreadable",  # (ondisk) a record that cannot be decoded
]


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of the consistency check."""

    kind: ProblemKind
    name: str
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.name}: {self.detail} ({self.path})"


@dataclass(slots=True)
class RecoveryReport:
    """What opening the store as owner found and repaired."""

    returned_checkouts: list[tuple[str, str]] = field(default_factory=list)
    # (queue, name) found checked out in a ``keep_checkouts`` queue, left there.
    kept_checkouts: list[tuple[str, str]] = field(default_factory=list)
    removed_tmp: list[str] = field(default_factory=list)
    removed_unacknowledged: list[str] = field(default_factory=list)
    # The names of each usable queue the owner asked for (``keep_listings``)
    # as recovery left them, as :meth:`~spoold.store.Store.list_queue` gives
    # them: the owner loading a queue right after the open takes its listing
    # from here (:meth:`take_listing`) instead of listing a large directory
    # again. Not a repair: no part of what the report says (nor of its truth
    # value, nor of its equality).
    listings: dict[str, list[tuple[str, bool]]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def take_listing(self, queue: str) -> list[tuple[str, bool]] | None:
        """``queue``'s listing at open, once (then forgotten, so the memory
        goes and nobody takes an old listing later); None if there is none."""
        return self.listings.pop(queue, None)

    def __bool__(self) -> bool:
        return bool(
            self.returned_checkouts
            or self.kept_checkouts
            or self.removed_tmp
            or self.removed_unacknowledged
        )
