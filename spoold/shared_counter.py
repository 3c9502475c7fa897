"""A counter one process writes and its child processes read from shared
memory, without a system call.

The writer makes it (:meth:`SharedCounter.create`: an anonymous memory file,
``memfd_create(2)``, of eight bytes, mapped), passes :attr:`~SharedCounter.fd`
to the children it starts, and adds one after each change it wants them to
see (:meth:`~SharedCounter.bump`). A child maps the fd it was given
(:meth:`SharedCounter.attach`, read-only) and compares :attr:`~SharedCounter.value`
with the value it saw when it last read what the counter stands for: one load
from memory, so it can be asked on the event loop as often as needed.

Ordering: a change the writer made and counted before it answered someone
is seen by a reader asked after that answer arrived (the answer and the
question pass through the kernel, which orders the memory accesses around
them). A reader takes the value *before* it reads what the counter stands
for: a change made meanwhile is then seen as a change at the next look (at
worst one reading too many, never one too few).

Nothing is on disk: the counter lives as long as its processes. It holds
no lock and never blocks; the only errors are those of making or mapping it
(:class:`OSError`), at start.
"""

from __future__ import annotations

import mmap
import os

__all__ = ["SharedCounter"]

_SIZE = 8  # one unsigned 64-bit count, naturally aligned at the page's start


class SharedCounter:
    """One shared count (see the module's docstring)."""

    def __init__(self, mapped: mmap.mmap, fd: int | None) -> None:
        self._mapped = mapped
        self._count = memoryview(mapped).cast("Q")
        self.fd = fd
        """The memory file, for the writer to pass on (None in a reader,
        which needs no descriptor once the counter is mapped)."""

    @classmethod
    def create(cls, name: str) -> SharedCounter:
        """A new counter at 0, for the writer (its fd is close-on-exec: pass
        it to a child with ``pass_fds``)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _SIZE)
            return cls(mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE), fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> SharedCounter:
        """Map the counter a writer passed as ``fd`` (read-only), and close
        ``fd``: the mapping keeps the memory."""
        try:
            return cls(mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ), None)
        finally:
            os.close(fd)

    @property
    def value(self) -> int:
        return int(self._count[0])

    def bump(self) -> None:
        """Add one (the writer only)."""
        self._count[0] = (self._count[0] + 1) & 0xFFFF_FFFF_FFFF_FFFF
