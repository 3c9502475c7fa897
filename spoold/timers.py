"""When each message is due: the spool's timer heap.

:class:`Timers` keeps ``(time, generation, key)`` entries in a heap.
Every arming of a key gets a new generation (increasing: it also orders
entries due at the same time), and the caller keeps the
latest one with its message: an entry whose generation is not the latest
is stale and is skipped when it comes up. So re-arming or cancelling a
timer costs nothing at the time (no search in the heap), and a stale timer
never fires: a message frozen, removed, rescheduled or being sent is never
sent because of an old timer. Entries due at the same time come out in the
order they were armed. Times are POSIX timestamps (``0.0``: now).
"""

from __future__ import annotations

import heapq
import itertools

__all__ = ["Timers"]


class Timers:
    def __init__(self) -> None:
        # Three fields a timer, no more: a queue of a million messages keeps
        # a million of these.
        self._heap: list[tuple[float, int, str]] = []
        self._generations = itertools.count(1)  # unique across keys

    def __len__(self) -> int:
        """Entries in the heap, stale ones included."""
        return len(self._heap)

    def new_generation(self) -> int:
        """A generation no entry has: giving it to a key cancels its timer."""
        return next(self._generations)

    def arm(self, key: str, when: float) -> int:
        """Arm ``key`` for ``when``; returns the generation to keep."""
        generation = next(self._generations)
        heapq.heappush(self._heap, (when, generation, key))
        return generation

    def next_time(self) -> float | None:
        """The earliest entry's time (it may be stale: waking early is
        harmless), or None when the heap is empty."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> tuple[str, int] | None:
        """The next entry due at ``now`` as ``(key, generation)``, taken out
        of the heap; None when nothing is due. The caller skips it if the
        generation is not the key's latest."""
        heap = self._heap
        if not heap or heap[0][0] > now:
            return None
        _, generation, key = heapq.heappop(heap)
        return key, generation
