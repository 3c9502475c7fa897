"""The settings of the library's parts, each one frozen value.

A part that can be tuned while it runs holds one settings value and reads
every setting from it; a change (the daemon's reload) is one assignment of
a whole new value, never a field-by-field copy:

* :class:`SpoolSettings`: a :class:`~spoold.spool.Spool`'s concurrency,
  retry defaults, free-space floor, durability mode, delivery policy,
  crash rule, retention windows and timer periods (``spool.settings = new``);
* :class:`WriterSettings`: a :class:`~spoold.writer.SpoolWriter`'s share of
  them, the part that adds messages (``writer.settings = new``);
  :attr:`SpoolSettings.writer` derives it, so an ingest process and the
  spool's owner add with the same rules;
* :class:`~spoold.connection_cache.CacheSettings` (re-exported here): the
  relay's connection cache limits and idle time (``cache.settings = new``).

The values are msgspec Structs: they decode from plain data (a config
table) with the constraints written on their fields (``msgspec.Meta``),
and a value built in Python is checked the same way (``__post_init__``),
raising :class:`ValueError` with the setting's name. The defaults written
here are the only ones: :mod:`spoold.spool` re-exports them and the
daemon's configuration reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any, Generic, Protocol, TypeVar, overload

import msgspec

from spoold.connection_cache import CacheSettings
from spoold.idempotency import DEFAULT_IDEMPOTENCY_WINDOW
from spoold.message import RetryInterval
from spoold.outcome import AfterCrash, DeliveryPolicy
from spoold.store import SyncMode
from spoold.suppression import DEFAULT_MAX_SUPPRESSED, SuppressedRecipients

__all__ = [
    "SpoolSettings",
    "WriterSettings",
    "CacheSettings",
    "Setting",
    "DEFAULT_MAX_CONCURRENT_SEND_JOBS",
    "DEFAULT_RETRY_SPANS",
    "DEFAULT_RETRY_JITTER",
    "DEFAULT_RETRY_INTERVALS",
    "DEFAULT_FLUSH_TIMEOUT",
    "DEFAULT_PING_INTERVAL",
    "DEFAULT_MIN_FREE_SPACE",
    "DEFAULT_SYNC",
    "DEFAULT_MAX_QUEUE_LIFETIME",
    "DEFAULT_AFTER_CRASH",
    "DEFAULT_REMOVED_RETENTION",
    "DEFAULT_HISTORY_RETENTION",
    "DEFAULT_IDEMPOTENCY_WINDOW",
    "DEFAULT_HOUSEKEEPING_INTERVAL",
    "DEFAULT_MAX_SUPPRESSED",
    "DEFAULT_SUPPRESSED_RECIPIENTS",
]

DEFAULT_MAX_CONCURRENT_SEND_JOBS = 64
DEFAULT_RETRY_SPANS = tuple(timedelta(minutes=m) for m in (1, 5, 15, 60, 120, 240, 480))
DEFAULT_RETRY_JITTER = 0.1  # a fraction of each interval
DEFAULT_RETRY_INTERVALS = RetryInterval.from_spans(DEFAULT_RETRY_SPANS, DEFAULT_RETRY_JITTER)
DEFAULT_FLUSH_TIMEOUT = 30.0  # seconds
DEFAULT_PING_INTERVAL = 30.0
DEFAULT_MIN_FREE_SPACE = 64 * 1024 * 1024
DEFAULT_SYNC: SyncMode = "syncfs"  # group commit: see spoold.store
# The daemon's default queue lifetime (spool.max_queue_lifetime); a library
# user opts in through ``delivery_policy`` (the default policy has none, so
# its messages freeze when their retry intervals are used up, as the seed's).
DEFAULT_MAX_QUEUE_LIFETIME = timedelta(days=5)
DEFAULT_AFTER_CRASH: AfterCrash = "resend"
DEFAULT_REMOVED_RETENTION = timedelta(days=7)
DEFAULT_HISTORY_RETENTION = timedelta(days=7)
DEFAULT_HOUSEKEEPING_INTERVAL = timedelta(hours=1)
DEFAULT_SUPPRESSED_RECIPIENTS: SuppressedRecipients = "refuse"

_V = TypeVar("_V")


class _Part(Protocol):
    settings: Any


class Setting(Generic[_V]):
    """An attribute of a part that holds a ``settings`` value: reading it
    reads one field of the value (``field``, else the attribute's own
    name); assigning it assigns a whole new value that differs in that
    field (``convert`` applied first), so the part's ``settings`` setter is
    the one place where a change is checked and applied."""

    def __init__(self, field: str = "", *, convert: Callable[[Any], _V] | None = None) -> None:
        self._field = field
        self._convert = convert

    def __set_name__(self, owner: type, name: str) -> None:
        self._field = self._field or name

    @overload
    def __get__(self, part: None, owner: type) -> Setting[_V]: ...
    @overload
    def __get__(self, part: _Part, owner: type | None = None) -> _V: ...
    def __get__(self, part: _Part | None, owner: type | None = None) -> Setting[_V] | _V:
        if part is None:
            return self
        value: _V = getattr(part.settings, self._field)
        return value

    def __set__(self, part: _Part, value: _V) -> None:
        if self._convert is not None:
            value = self._convert(value)
        part.settings = msgspec.structs.replace(part.settings, **{self._field: value})


_Jobs = Annotated[int, msgspec.Meta(ge=1)]
_Bytes = Annotated[int, msgspec.Meta(ge=0)]
_Seconds = Annotated[float, msgspec.Meta(gt=0)]


class WriterSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How new messages are added: the retry intervals of a message added
    without its own, the free space that must stay on the spool's disk (0:
    no floor), how additions are made durable (``"fsync"`` or
    ``"syncfs"``), how long an idempotency key is remembered, and what a
    submission to a suppressed recipient gets (``suppressed_recipients``:
    ``"refuse"`` or ``"fail"``, see :mod:`spoold.suppression`)."""

    default_retry_intervals: tuple[RetryInterval, ...] = tuple(DEFAULT_RETRY_INTERVALS)
    min_free_space: _Bytes = 0
    sync: SyncMode = "fsync"
    idempotency_window: timedelta = DEFAULT_IDEMPOTENCY_WINDOW
    suppressed_recipients: SuppressedRecipients = DEFAULT_SUPPRESSED_RECIPIENTS

    def __post_init__(self) -> None:
        if self.min_free_space < 0:
            raise ValueError("min_free_space must be >= 0")


class SpoolSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything about a running spool that may change while it runs.

    ``max_concurrent_send_jobs``: attempts under way at most.
    ``default_retry_intervals``, ``min_free_space``, ``sync``,
    ``idempotency_window``: how messages are added (see
    :class:`WriterSettings`). ``delivery_policy``: queue lifetime,
    retries exhausted, bounce or freeze, delay warning.
    ``after_crash``: what to do with a message found in doubt at open
    (``resend`` or ``freeze``). ``removed_retention``: how long a removed
    message stays in ``removed``; ``history_retention``: how long the
    history journal keeps outcomes. ``housekeeping_interval`` (a span) and
    ``ping_interval`` (seconds): the periods of housekeeping rounds and of
    ``ping`` events (a new period applies from the next round).
    ``suppress_after_hard_bounce``: how long a recipient that hard-bounced
    is suppressed (None: not at all); ``suppressed_recipients``: refuse or
    fail a submission to a suppressed recipient; ``max_suppressed``: the
    suppression list's bound (:mod:`spoold.suppression`)."""

    max_concurrent_send_jobs: _Jobs = DEFAULT_MAX_CONCURRENT_SEND_JOBS
    default_retry_intervals: tuple[RetryInterval, ...] = tuple(DEFAULT_RETRY_INTERVALS)
    min_free_space: _Bytes = DEFAULT_MIN_FREE_SPACE
    sync: SyncMode = DEFAULT_SYNC
    delivery_policy: DeliveryPolicy = DeliveryPolicy()
    after_crash: AfterCrash = DEFAULT_AFTER_CRASH
    removed_retention: timedelta = DEFAULT_REMOVED_RETENTION
    history_retention: timedelta = DEFAULT_HISTORY_RETENTION
    idempotency_window: timedelta = DEFAULT_IDEMPOTENCY_WINDOW
    housekeeping_interval: timedelta = DEFAULT_HOUSEKEEPING_INTERVAL
    ping_interval: _Seconds = DEFAULT_PING_INTERVAL
    suppress_after_hard_bounce: timedelta | None = None
    suppressed_recipients: SuppressedRecipients = DEFAULT_SUPPRESSED_RECIPIENTS
    max_suppressed: _Jobs = DEFAULT_MAX_SUPPRESSED

    def __post_init__(self) -> None:
        if self.max_suppressed < 1:
            raise ValueError("max_suppressed must be at least 1")
        if self.suppress_after_hard_bounce is not None and (
            self.suppress_after_hard_bounce <= timedelta(0)
        ):
            raise ValueError("suppress_after_hard_bounce must be longer than 0s")
        if self.max_concurrent_send_jobs < 1:
            raise ValueError("max_concurrent_send_jobs must be at least 1")
        if self.min_free_space < 0:
            raise ValueError("min_free_space must be >= 0")

    @property
    def writer(self) -> WriterSettings:
        """The share of these settings that adding messages follows."""
        return WriterSettings(
            default_retry_intervals=self.default_retry_intervals,
            min_free_space=self.min_free_space,
            sync=self.sync,
            idempotency_window=self.idempotency_window,
            suppressed_recipients=self.suppressed_recipients,
        )
