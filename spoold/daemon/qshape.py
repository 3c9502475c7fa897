"""The shape of the queue: recipient domains by message age (``status --format qshape``).

The table Postfix operators know from ``qshape``: one row per next-hop
domain (the domain of a recipient still to deliver), one column per age
bucket, each cell the number of messages of that domain in that bucket,
and a ``TOTAL`` row above. A glance shows where mail piles up and since
when.

Buckets are in minutes and double from 5: a message ``m`` minutes old
counts in the first bucket ``b`` with ``m < b`` (``5``: younger than 5
minutes, ``10``: 5 to 10, ...), and in ``1280+`` when it is older than
every bucket. ``T`` is the row's total. A message with recipients in
several domains counts once in each; its remaining recipients decide
(all of its recipients when none remain, as for a frozen message whose
recipients all failed).

Pure functions over the JSON listing (the dicts of ``status --format
json``) and a given ``now``: the same listing and time always give the
same table. Listing entries without a spool date (unreadable records) are
left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

__all__ = [
    "BUCKETS",
    "BUCKET_NAMES",
    "QueueShape",
    "QueueShapeCounter",
    "queue_shape",
    "render_queue_shape",
]

BUCKETS: Final = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
"""Upper bounds of the age buckets, in minutes; a last one holds the rest."""

BUCKET_NAMES: Final = (*(str(b) for b in BUCKETS), f"{BUCKETS[-1]}+")


@dataclass(frozen=True, slots=True)
class QueueShape:
    """Counts per bucket (``len(BUCKET_NAMES)`` of them) for every domain,
    busiest domain first, and over all messages in ``total``."""

    total: tuple[int, ...]
    domains: tuple[tuple[str, tuple[int, ...]], ...]


def _bucket(age_minutes: float) -> int:
    for i, bound in enumerate(BUCKETS):
        if age_minutes < bound:
            return i
    return len(BUCKETS)


def _domains(view: Mapping[str, Any]) -> set[str]:
    recipients = view.get("remaining_recipients") or (view.get("envelope_info") or {}).get(
        "recipients", []
    )
    return {str(r).rpartition("@")[2].lower() or "(no domain)" for r in recipients}


class QueueShapeCounter:
    """Counts a listing as it comes, page by page (``status --format
    qshape`` of a large queue): memory holds the counters, never the
    listing. :meth:`shape` is the table so far."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self._total = [0] * len(BUCKET_NAMES)
        self._by_domain: dict[str, list[int]] = {}

    def add(self, views: Iterable[Mapping[str, Any]]) -> None:
        for view in views:
            spool_date = view.get("spool_date")
            if not spool_date:
                continue
            when = datetime.fromisoformat(str(spool_date).replace("Z", "+00:00"))
            bucket = _bucket((self.now - when).total_seconds() / 60)
            self._total[bucket] += 1
            for domain in _domains(view):
                self._by_domain.setdefault(domain, [0] * len(BUCKET_NAMES))[bucket] += 1

    def shape(self) -> QueueShape:
        ordered = sorted(self._by_domain.items(), key=lambda item: (-sum(item[1]), item[0]))
        return QueueShape(tuple(self._total), tuple((d, tuple(c)) for d, c in ordered))


def queue_shape(views: Iterable[Mapping[str, Any]], now: datetime) -> QueueShape:
    """The shape of the messages listed in ``views`` at time ``now``."""
    counter = QueueShapeCounter(now)
    counter.add(views)
    return counter.shape()


def render_queue_shape(shape: QueueShape) -> str:
    """The table as text: a header line, ``TOTAL``, then one line per domain."""
    rows = [("TOTAL", shape.total), *shape.domains]
    name_width = max(len(name) for name, _ in rows)
    cell = max(5, *(len(str(n)) for _, counts in rows for n in (sum(counts), *counts)))

    def line(name: str, cells: Iterable[str]) -> str:
        return f"{name:>{name_width}} " + " ".join(f"{c:>{cell}}" for c in cells)

    out = [line("", ("T", *BUCKET_NAMES))]
    for name, counts in rows:
        out.append(line(name, (str(sum(counts)), *(str(n) for n in counts))))
    return "\n".join(out)
