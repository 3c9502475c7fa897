"""The queue listing in pages: what to list (filters) and a bounded walk.

A listing is a snapshot of message ids, sorted (ids are time-ordered, so
this is the order of arrival), taken once per request. It is walked from a
cursor (``after``: list the ids after this one) page by page: each page
looks up at most :data:`SCAN_LIMIT` ids and keeps at most ``page_size`` of
the messages that match the filter, so the caller (the control server, or
the CLI reading the disk) pauses between pages with a bounded amount of
work and memory in each. A message that left the queue after the snapshot
was taken is skipped; one that came after is not listed (ask again).

:class:`ListingFilter` is pure: a message and a time give a yes or no.
Filters are on the remaining recipients' domain, the age (spool date) and
the text of the last error (that of the latest relay attempt, or the
quarantine reason). A record that cannot be read has none of those: it is
listed only when no filter narrows the listing.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from spoold.message import Message, Quarantined
from spoold.ondisk import Unreadable

__all__ = [
    "ID_PAGE_SIZE",
    "PAGE_SIZE",
    "SCAN_LIMIT",
    "ListingFilter",
    "Listing",
    "last_error_text",
]

PAGE_SIZE = 200
"""Messages per page: a page's views take a few milliseconds to build."""

SCAN_LIMIT = 2000
"""Ids looked up per page at most (a filter that matches little still
ends pages, maybe empty ones, this often)."""

ID_PAGE_SIZE = 5000
"""Ids per page of a listing of ids with no filter (``status --format
id``): nothing is looked up, so a page is its ids alone (about 100 KB to
encode, well under a millisecond), and a queue of a million takes 200
pages, not 5,000."""

_T = TypeVar("_T")


def last_error_text(msg: Message) -> str:
    """What the listing shows as the message's last error: the quarantine
    reason, else the error of the latest relay attempt, else ``""``."""
    if isinstance(msg.status, Quarantined):
        return msg.status.reason
    return msg.relay_attempts[0].error if msg.relay_attempts else ""


@dataclass(frozen=True, slots=True)
class ListingFilter:
    """Which messages a listing keeps (every one given must hold).

    ``domain``: a recipient still to deliver is in this domain (any case;
    all the recipients when none remain, as ``qshape`` counts them);
    ``older_than`` / ``newer_than``: the age by spool date is at least /
    less than this; ``error``: the last error contains this text (any
    case)."""

    domain: str | None = None
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.domain is not None:
            domain = self.domain.strip().lstrip("@").lower()
            if not domain or "@" in domain:
                raise ValueError(f"domain must be a domain name, got {self.domain!r}")
            object.__setattr__(self, "domain", domain)
        if self.error is not None:
            if not self.error:
                raise ValueError("error must be a non-empty text")
            object.__setattr__(self, "error", self.error.casefold())
        for name in ("older_than", "newer_than"):
            span = getattr(self, name)
            if span is not None and span < timedelta(0):
                raise ValueError(f"{name} must not be negative")

    @property
    def narrows(self) -> bool:
        """Whether anything is filtered at all."""
        return any(
            v is not None for v in (self.domain, self.older_than, self.newer_than, self.error)
        )

    def keeps(self, item: Message | Unreadable, now: datetime) -> bool:
        """Whether ``item`` is listed at time ``now``."""
        if isinstance(item, Unreadable):
            return not self.narrows
        if self.older_than is not None or self.newer_than is not None:
            age = now - item.spool_date
            if self.older_than is not None and age < self.older_than:
                return False
            if self.newer_than is not None and age >= self.newer_than:
                return False
        if self.domain is not None:
            recipients = item.remaining_recipients or item.envelope_info.recipients
            if not any(r.rpartition("@")[2].lower() == self.domain for r in recipients):
                return False
        return self.error is None or self.error in last_error_text(item).casefold()


class Listing(Generic[_T]):
    """One walk over a sorted snapshot of ``ids``: call :meth:`page` until
    :attr:`done`. ``lookup`` gives an id's message now (None once it left);
    ``keep`` says whether it is listed. ``after``: start after this id;
    ``limit``: list at most this many, then stop (:attr:`next_after` is
    then the id to give as ``after`` to go on)."""

    def __init__(
        self,
        ids: Sequence[str],
        lookup: Callable[[str], _T | None],
        keep: Callable[[_T], bool],
        *,
        after: str | None = None,
        limit: int | None = None,
        page_size: int = PAGE_SIZE,
        scan_limit: int = SCAN_LIMIT,
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError("limit must be a positive number of messages")
        if page_size < 1 or scan_limit < page_size:
            raise ValueError("page_size must be positive and at most scan_limit")
        self._ids = ids
        self._lookup = lookup
        self._keep = keep
        self._pos = 0 if after is None else bisect.bisect_right(ids, after)
        self._limit = limit
        self._page_size = page_size
        self._scan_limit = scan_limit
        self.listed = 0  # messages given so far
        self.next_after: str | None = None  # set when the limit ended the listing early

    @property
    def done(self) -> bool:
        return self._pos >= len(self._ids) or self.listed == self._limit

    @property
    def position(self) -> int:
        """The index in ``ids`` of the next id to look up."""
        return self._pos

    def page(self, stop: int | None = None) -> list[_T]:
        """The next messages (maybe none, when the filter kept none of the
        ids looked at); at most ``page_size`` of them, looking up no id at
        or past index ``stop`` (when given: what a caller has at hand)."""
        out: list[_T] = []
        want = self._page_size
        if self._limit is not None:
            want = min(want, self._limit - self.listed)
        end = min(len(self._ids), self._pos + self._scan_limit)
        if stop is not None:
            end = min(end, stop)
        pos = self._pos
        while pos < end and len(out) < want:
            item = self._lookup(self._ids[pos])
            pos += 1
            if item is not None and self._keep(item):
                out.append(item)
        self._pos = pos
        self.listed += len(out)
        if self.listed == self._limit and pos < len(self._ids) and out:
            self.next_after = self._ids[pos - 1]
        return out
