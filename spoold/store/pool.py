"""The file pool: the files of removed entries kept under ``tmp/`` and
written again by the next commits, instead of removing them and creating
new ones.

Why: on a filesystem without a journal (ext4 with no journal, as on the
machines this was measured on), the kernel will not hand out an inode
deleted in the last minute or more while a free one is left in the group;
it reads each recently deleted inode of the group, one by one, before every
new one it allocates. A spool removes and creates two files a message, so
at a few hundred messages a second every creation scans the whole group:
that scan was 20% of the machine in one profile. A file taken from the pool
is opened, not created, and no inode is freed or allocated.

The pool is ``tmp/pool.PID.N.SIZE.KIND`` (``body`` or ``record``, and the
size the file had when it was put there): files of nobody, never an entry
(recovery leaves them; an older recovery removes them as leftovers, which
is as safe). Two sides:

* the owner's delete *puts* a record or body it removes (renamed into the
  pool instead of unlinked; unlinked when the pool is full, about
  :data:`POOL_FILES` files or :data:`POOL_BYTES` bytes counted in whole
  blocks, or the file larger than :data:`POOL_FILE_SIZE`, or the store in
  ``fsync`` mode, or the disk short of room for a full pool above
  ``spool.min_free_space``);
* a writer (group commit only, ``spool.sync = "syncfs"``) *claims* files
  (renamed to ``tmp/PID.reuse.N``, its own: a dead writer's are removed by
  recovery like any of its ``tmp/`` files) before the first ``syncfs`` of
  a batch, and *reuses* them only in a later batch: opened at that name,
  overwritten from the start, cut to the new length, synced and renamed
  into place as a new file would be.

Which file for which content: one of its own kind (a record's file for a
record), and of those the writer holds (a few dozen at most, and at most
:data:`_CLAIM_BYTES` of a kind), one of the nearest size (by powers of
two, the name tells the size: no ``stat``). Its blocks are then written
over: few are freed (cut off a larger file) or allocated (written past a
smaller one's end), and no inode is.

The durability argument. A writer writes into a file only after a
``syncfs`` that started after the file got its claimed name has returned.
Before the claim, the file was in the pool, and before that in its entry's
place; every rename that took it from there happened before the claim. So
when the first byte of new content is written, no name but the writer's
own ``tmp/`` name is left on disk for that inode, even after a power loss:
the old entry cannot come back holding the new content (a delete that a
power loss undoes brings the old entry back with its own content, as an
unlink would). From then on the file is a ``tmp/`` file like a new one:
until its rename into place it is nobody's message, and the content and
length it has when renamed were made durable by the batch's first
``syncfs`` (the length too, so no byte of the old content is left past
the new end). A crash between any two steps leaves: a file in the entry's
place (delete not done), in the pool, or under a writer's ``tmp/`` name
(removed by recovery once that writer is gone); never old content under a
new entry's name, or new content under an old one's.

The argument needs the file to have had exactly one name: a file with
more (a hard link) is never put in the pool, and a writer checks again
(``fstat``: one link, its own) when it opens a claimed file, else drops it
and creates a new one. Registry entries are links to writer files, never
to a record or body. A reader that opened an entry's file by its name
before the delete may read a later message's bytes through its descriptor:
the store's readers check after reading that the name still leads to the
inode they read (else the entry is gone: not found), and the relay checks
a body's size and SHA-256 against its record.

Every method blocks: callers run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import threading
from collections.abc import Callable

from spoold.numerals import ascii_decimal

__all__ = [
    "FilePool",
    "KINDS",
    "POOL_PREFIX",
    "POOL_FILES",
    "POOL_BYTES",
    "POOL_FILE_SIZE",
    "claimed_pid",
]

POOL_PREFIX = "pool."  # tmp/pool.PID.N.SIZE.KIND (a tmp/ name whose first part is no pid)
POOL_FILES = 1024  # about as many files as the pool holds (a bound, not exact)
POOL_BYTES = 64 * 1024 * 1024  # about as many bytes (whole blocks) as it holds
POOL_FILE_SIZE = 1024 * 1024  # larger files are removed, not pooled
KINDS = ("body", "record")  # a file is reused for one of its own kind (sizes alike)
_BLOCK = 4096  # what a file holds on disk is counted in blocks of this size
_OLD_SIZE = 64 * 1024  # a pool name without its size (an older spoold's): at most this
_SIZES = 9  # size classes: up to 4 KiB, 8 KiB, ... 512 KiB, and larger
_COUNT_EVERY = 256  # puts between two counts of the pool
_COUNT_FULL = 32  # puts between two counts at most while the pool is full
_CLAIM_MAX = 32  # files of one kind a writer holds claimed or ready at most
_CLAIM_BYTES = POOL_BYTES // 8  # and bytes (whole blocks) of one kind at most
_LIST_EVERY = 8  # claims between two listings of the pool by a writer (at most)
# One count for the whole process: two stores of one process (or one opened
# again) never give two files one name (a rename would replace the other).
_names = itertools.count()


def claimed_pid(tmp_name: str) -> int | None:
    """The pid of the writer that claimed the ``tmp/`` file ``tmp_name``
    (``PID.reuse.N``), or None for any other name. A writer holds its
    claimed files as long as it runs (an idle one too)."""
    pid, _, rest = tmp_name.partition(".")
    return ascii_decimal(pid) if rest.startswith("reuse.") else None


def _held(size: int) -> int:
    """The bytes a file of ``size`` bytes holds on disk, as the pool counts
    them (whole blocks, one at least)."""
    return max(_BLOCK, -(-size // _BLOCK) * _BLOCK)


def _pooled_size(name: str) -> int:
    """The size of the pool's file ``name`` (``pool.PID.N.SIZE.KIND``), as
    its delete found it."""
    parts = name.split(".")
    size = ascii_decimal(parts[3]) if len(parts) == 5 else None
    if size is not None:
        # No more than the pool takes: a name made by hand cannot fill it.
        return min(size, POOL_FILE_SIZE)
    return _OLD_SIZE  # pool.PID.N.KIND (an older spoold): its bound


def _size_class(size: int) -> int:
    """The class of ``size``: 0 up to 4 KiB, then one per power of two,
    the last for every larger size."""
    return min(_SIZES - 1, max(0, (size - 1).bit_length() - 12))


# For a class, the classes to take a file from, nearest first (the same,
# then one larger, one smaller, two larger...): the file's blocks are
# written over, and few are freed (cut off) or allocated (written past).
def _nearest(c: int) -> list[int]:
    return sorted(range(_SIZES), key=lambda other: (abs(other - c), other < c))


_NEAREST = [_nearest(c) for c in range(_SIZES)]


class _Kind:
    """A writer's files of one kind."""

    __slots__ = ("claimed", "held", "ready", "ready_count", "seen")

    def __init__(self) -> None:
        self.seen: list[str] = []  # pool names found by the last listing
        self.claimed: list[tuple[str, int]] = []  # (path, size) claimed, no syncfs since
        # claimed before a syncfs that returned, by size class
        self.ready: list[list[tuple[str, int]]] = [[] for _ in range(_SIZES)]
        self.ready_count = 0
        self.held = 0  # bytes (whole blocks) of the files claimed and ready

    def take(self, size: int) -> str | None:
        if not self.ready_count:
            return None
        for c in _NEAREST[_size_class(size)]:
            files = self.ready[c]
            if files:
                path, was = files.pop()
                self.ready_count -= 1
                self.held -= _held(was)
                return path
        raise AssertionError("ready_count and ready disagree")  # pragma: no cover

    def paths(self) -> list[str]:
        """Every file held, claimed or ready."""
        return [p for p, _ in self.claimed] + [p for files in self.ready for p, _ in files]

    def drop(self) -> None:
        self.claimed.clear()
        for files in self.ready:
            files.clear()
        self.ready_count = self.held = 0


class FilePool:
    """The pool of the store whose ``tmp/`` is ``tmp``, as process ``pid``
    uses it."""

    def __init__(
        self,
        tmp: str,
        pid: int,
        *,
        wanted: Callable[[], bool] = lambda: True,
        min_free: Callable[[], int] = lambda: 0,
    ) -> None:
        self._tmp = tmp
        self._pid = pid
        self._wanted = wanted  # whether writers claim files (group commit)
        self._min_free = min_free  # bytes that must stay free (spool.min_free_space)
        # the owner's side
        self._puts_left = 0  # puts before the pool is counted again
        self._puts_counted = 0  # puts since it was counted
        self._files_left = 0  # files the pool takes until then
        self._bytes_left = 0  # and bytes (whole blocks)
        # a writer's side
        self._kinds = {kind: _Kind() for kind in KINDS}
        self._random = random.Random()
        self._claims_left = 0  # claims before the pool may be listed again
        # Two threads may write one batch's files (spoold.store.sharing) and
        # take files at once; the claims and the rest come after, in one.
        self._take_lock = threading.Lock()

    # ------------------------------------------------------ the owner's side

    def put(self, path: str, kind: str, size: int, links: int) -> None:
        """Remove ``path`` (a file of ``kind`` being deleted, ``size`` bytes,
        ``links`` names, as its ``lstat`` says) from its place: into the
        pool while it has room, else unlinked. A file with another name (a
        hard link: an operator's ``cp -al`` snapshot, an ``ln``) is always
        unlinked: its content must stay what it is under that name.
        Raises :class:`FileNotFoundError` if it is not there."""
        if links == 1 and size <= POOL_FILE_SIZE and self._room(_held(size)):
            try:
                os.rename(
                    path, f"{self._tmp}/{POOL_PREFIX}{self._pid}.{next(_names)}.{size}.{kind}"
                )
            except FileNotFoundError:
                raise
            except OSError:
                self._files_left = 0  # e.g. tmp/ cannot grow on a full disk: an unlink can
            else:
                return
        os.unlink(path)

    def _room(self, held: int) -> bool:
        """Whether the pool takes one more file holding ``held`` bytes: it
        is counted (a listing of ``tmp/``) once every :data:`_COUNT_EVERY`
        puts, or every :data:`_COUNT_FULL` while it is full; writers'
        claims since then are not seen. It takes none while writers claim
        none (``spool.sync = "fsync"``), or while the disk has not room for
        a full pool (:data:`POOL_BYTES`) above ``spool.min_free_space`` (a
        delete then frees what it removes, as it would without a pool)."""
        fits = self._files_left > 0 and held <= self._bytes_left
        # Counted again soon only when full by bytes (big bodies): a count
        # reads every name's size, and a pool full by files (small mail,
        # the steady state) would be counted every few puts for nothing.
        soon = not fits and self._files_left > 0 and self._puts_counted >= _COUNT_FULL
        if self._puts_left <= 0 or soon:
            self._count()
            fits = self._files_left > 0 and held <= self._bytes_left
        self._puts_left -= 1
        self._puts_counted += 1
        if fits:
            self._files_left -= 1
            self._bytes_left -= held
        return fits

    def _count(self) -> None:
        self._puts_left, self._puts_counted = _COUNT_EVERY, 0
        self._files_left = self._bytes_left = 0
        if self._wanted():
            with contextlib.suppress(OSError):  # no pool then: the delete goes on
                st = os.statvfs(self._tmp)
                if st.f_bavail * st.f_frsize >= self._min_free() + POOL_BYTES:
                    names = self._names()
                    self._files_left = POOL_FILES - len(names)
                    self._bytes_left = POOL_BYTES - sum(_held(_pooled_size(n)) for n in names)

    # ------------------------------------------------------- a writer's side

    def take(self, kind: str, size: int) -> str | None:
        """A claimed file of ``kind`` that may be written now (see the
        module's durability argument), the nearest in size to ``size``
        bytes of those held, or None."""
        with self._take_lock:
            return self._kinds[kind].take(size)

    def ready(self) -> int:
        """How many entries the files ready to be written would take (a
        body and a record each)."""
        return min(mine.ready_count for mine in self._kinds.values())

    def claim(self, wanted: int) -> list[str]:
        """Claim up to ``wanted`` more files of each kind (at most a few
        dozen, and :data:`_CLAIM_BYTES`, held); the files claimed and not
        yet written, for :meth:`synced` once a ``syncfs`` that starts after
        this call has returned."""
        claimed: list[str] = []
        self._claims_left -= 1
        for mine in self._kinds.values():
            n = min(wanted, _CLAIM_MAX - len(mine.claimed) - mine.ready_count)
            if n > 0 and not mine.seen and self._claims_left <= 0:
                # A listing costs more than a claim: the pool fills between two.
                self._list()
                self._claims_left = _LIST_EVERY
            self._claim(mine, n)
            claimed += [path for path, _ in mine.claimed]
        return claimed

    def _list(self) -> None:
        """List the pool, from a point of this writer's own (two writers
        going through one listing in one order would race for each file)."""
        try:
            names = self._names()
        except OSError:
            return
        start = self._random.randrange(len(names) or 1)
        names = names[start:] + names[:start]
        for kind, mine in self._kinds.items():
            ending = f".{kind}"
            mine.seen = [n for n in names if n.endswith(ending)]

    def _claim(self, mine: _Kind, wanted: int) -> None:
        seen = mine.seen
        try:
            while wanted > 0 and seen and mine.held < _CLAIM_BYTES:
                path = f"{self._tmp}/{self._pid}.reuse.{next(_names)}"  # see claimed_pid
                name = seen.pop()
                try:
                    os.rename(f"{self._tmp}/{name}", path)
                except FileNotFoundError:
                    seen.clear()  # taken by another writer: the listing is old
                    return
                size = _pooled_size(name)
                mine.claimed.append((path, size))
                mine.held += _held(size)
                wanted -= 1
        except OSError:
            seen.clear()  # best effort: a file not claimed is a file created

    def synced(self, claimed: list[str]) -> None:
        """A ``syncfs`` that started after the files ``claimed`` (as
        :meth:`claim` returned them) were claimed has returned: they may be
        written."""
        done = set(claimed)
        for mine in self._kinds.values():
            if mine.claimed:
                left = []
                for path, size in mine.claimed:
                    if path in done:
                        mine.ready[_size_class(size)].append((path, size))
                        mine.ready_count += 1
                    else:
                        left.append((path, size))
                mine.claimed = left

    def close_sync(self) -> None:
        """Remove the files this writer holds (also after a failed
        ``syncfs``: a later one that succeeds does not prove the removals
        before it reached the disk)."""
        for mine in self._kinds.values():
            for path in mine.paths():
                with contextlib.suppress(OSError):
                    os.unlink(path)
            mine.drop()

    def empty_sync(self) -> int:
        """Remove every file of the pool and those this writer holds (the
        disk is short of room, or writers no longer claim any); how many
        were in the pool. Files other writers claimed are theirs."""
        self.close_sync()
        self._files_left = self._bytes_left = 0
        for mine in self._kinds.values():
            mine.seen.clear()
        removed = 0
        with contextlib.suppress(OSError):
            for name in self._names():
                with contextlib.suppress(OSError):
                    os.unlink(f"{self._tmp}/{name}")
                    removed += 1
        return removed

    def _names(self) -> list[str]:
        """The names of the pool's files in ``tmp/`` (a listing)."""
        return [n for n in os.listdir(self._tmp) if n.startswith(POOL_PREFIX)]
