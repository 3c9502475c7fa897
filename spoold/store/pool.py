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

The pool is ``tmp/pool.PID.N.KIND`` (``body`` or ``record``: a file is
reused for one of its kind, so its size changes little and its blocks are
written over, not freed and allocated again): files of nobody, never an entry (recovery
leaves them; an older recovery removes them as leftovers, which is as
safe). Two sides:

* the owner's delete *puts* a record or body it removes (renamed into the
  pool instead of unlinked; unlinked when the pool is full, about
  :data:`POOL_FILES` files, or the file larger than :data:`POOL_FILE_SIZE`,
  or the store in ``fsync`` mode, or the disk short of room for a full
  pool above ``spool.min_free_space``);
* a writer (group commit only, ``spool.sync = "syncfs"``) *claims* files
  (renamed to ``tmp/PID.reuse.N``, its own: a dead writer's are removed by
  recovery like any of its ``tmp/`` files) before the first ``syncfs`` of
  a batch, and *reuses* them only in a later batch: opened at that name,
  overwritten from the start, cut to the new length, synced and renamed
  into place as a new file would be.

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
from collections.abc import Callable

__all__ = ["FilePool", "KINDS", "POOL_PREFIX", "POOL_FILES", "POOL_FILE_SIZE", "claimed_pid"]

POOL_PREFIX = "pool."  # tmp/pool.PID.N.KIND (a tmp/ name whose first part is no pid)
POOL_FILES = 1024  # about as many files as the pool holds (a bound, not exact)
POOL_FILE_SIZE = 64 * 1024  # larger files are removed, not pooled
KINDS = ("body", "record")  # a file is reused for one of its own kind (sizes alike)
_COUNT_EVERY = 256  # puts between two counts of the pool
_CLAIM_MAX = 32  # files of one kind a writer holds claimed or ready at most
_LIST_EVERY = 8  # claims between two listings of the pool by a writer (at most)
# One count for the whole process: two stores of one process (or one opened
# again) never give two files one name (a rename would replace the other).
_names = itertools.count()


def claimed_pid(tmp_name: str) -> int | None:
    """The pid of the writer that claimed the ``tmp/`` file ``tmp_name``
    (``PID.reuse.N``), or None for any other name. A writer holds its
    claimed files as long as it runs (an idle one too)."""
    pid, _, rest = tmp_name.partition(".")
    return int(pid) if pid.isdigit() and rest.startswith("reuse.") else None


class _Kind:
    """A writer's files of one kind."""

    __slots__ = ("claimed", "ready", "seen")

    def __init__(self) -> None:
        self.seen: list[str] = []  # pool names found by the last listing
        self.claimed: list[str] = []  # claimed, no syncfs since
        self.ready: list[str] = []  # claimed before a syncfs that returned


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
        self._room_left = 0  # files the pool takes until then
        # a writer's side
        self._kinds = {kind: _Kind() for kind in KINDS}
        self._random = random.Random()
        self._claims_left = 0  # claims before the pool may be listed again

    # ------------------------------------------------------ the owner's side

    def put(self, path: str, kind: str, size: int, links: int) -> None:
        """Remove ``path`` (a file of ``kind`` being deleted, ``size`` bytes,
        ``links`` names, as its ``lstat`` says) from its place: into the
        pool while it has room, else unlinked. A file with another name (a
        hard link: an operator's ``cp -al`` snapshot, an ``ln``) is always
        unlinked: its content must stay what it is under that name.
        Raises :class:`FileNotFoundError` if it is not there."""
        if links == 1 and size <= POOL_FILE_SIZE and self._room():
            try:
                os.rename(path, f"{self._tmp}/{POOL_PREFIX}{self._pid}.{next(_names)}.{kind}")
            except FileNotFoundError:
                raise
            except OSError:
                self._room_left = 0  # e.g. tmp/ cannot grow on a full disk: an unlink can
            else:
                return
        os.unlink(path)

    def _room(self) -> bool:
        """Whether the pool takes one more file: it is counted once every
        :data:`_COUNT_EVERY` puts (a listing of ``tmp/``), writers' claims
        since then not seen. It takes none while writers claim none
        (``spool.sync = "fsync"``), or while the disk has not room for a
        full pool above ``spool.min_free_space`` (a delete then frees what
        it removes, as it would without a pool)."""
        if self._puts_left <= 0:
            self._puts_left, self._room_left = _COUNT_EVERY, 0
            if self._wanted():
                with contextlib.suppress(OSError):  # no pool then: the delete goes on
                    st = os.statvfs(self._tmp)
                    if st.f_bavail * st.f_frsize >= self._min_free() + POOL_FILES * POOL_FILE_SIZE:
                        self._room_left = POOL_FILES - len(self._names())
        self._puts_left -= 1
        self._room_left -= 1
        return self._room_left >= 0

    # ------------------------------------------------------- a writer's side

    def take(self, kind: str) -> str | None:
        """A claimed file of ``kind`` that may be written now (see the
        module's durability argument), or None."""
        ready = self._kinds[kind].ready
        return ready.pop() if ready else None

    def claim(self, wanted: int) -> list[str]:
        """Claim up to ``wanted`` more files of each kind (at most a few
        dozen held); the files claimed and not yet written, for
        :meth:`synced` once a ``syncfs`` that starts after this call has
        returned."""
        claimed: list[str] = []
        self._claims_left -= 1
        for mine in self._kinds.values():
            n = min(wanted, _CLAIM_MAX - len(mine.claimed) - len(mine.ready))
            if n > 0 and not mine.seen and self._claims_left <= 0:
                # A listing costs more than a claim: the pool fills between two.
                self._list()
                self._claims_left = _LIST_EVERY
            self._claim(mine, n)
            claimed += mine.claimed
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
            while wanted > 0 and seen:
                path = f"{self._tmp}/{self._pid}.reuse.{next(_names)}"  # see claimed_pid
                try:
                    os.rename(f"{self._tmp}/{seen.pop()}", path)
                except FileNotFoundError:
                    seen.clear()  # taken by another writer: the listing is old
                    return
                mine.claimed.append(path)
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
                mine.ready += [p for p in mine.claimed if p in done]
                mine.claimed = [p for p in mine.claimed if p not in done]

    def close_sync(self) -> None:
        """Remove the files this writer holds (also after a failed
        ``syncfs``: a later one that succeeds does not prove the removals
        before it reached the disk)."""
        for mine in self._kinds.values():
            for path in mine.ready + mine.claimed:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            mine.ready.clear()
            mine.claimed.clear()

    def empty_sync(self) -> int:
        """Remove every file of the pool and those this writer holds (the
        disk is short of room, or writers no longer claim any); how many
        were in the pool. Files other writers claimed are theirs."""
        self.close_sync()
        self._room_left = 0
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
