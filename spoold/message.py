"""The spooled message: its metadata record, status, queue and record codec.

A :class:`Message` is the small metadata record of one spooled message; its
body is kept apart (:mod:`spoold.body`). The record says everything needed to
schedule and relay the message, and its :attr:`Message.status` is the single
truth about where it stands: :func:`queue_of` maps a status to the queue
(directory) that holds the record, and nothing else decides that.

On disk a record is one line of JSON whose ``"version"`` field names its
schema. :func:`decode_record` reads every version this code has ever written
and upgrades it to the current one; anything else (corrupt bytes, an unknown
version, a record whose id is not an id) raises
:class:`~spoold.errors.RecordError`, which the spool answers by setting the
file aside in ``quarantine``, never by deleting it.

Messages are changed only through the spool, which writes every change to
disk; the setters here change the in-memory record alone. A record's lists
may be shared with other records (:meth:`Message.intern`, in a large
queue): a change assigns a new list, never changes one in place.
"""

from __future__ import annotations

import gc
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Final, Generic, TypeVar

import msgspec

from spoold.body import Body, BodyCheck
from spoold.errors import InvalidIdError, RecordError
from spoold.ids import validate_id
from spoold.times import utcnow

__all__ = [
    "RECORD_VERSION",
    "Queue",
    "SendNow",
    "SendAt",
    "Sending",
    "Frozen",
    "Removed",
    "Quarantined",
    "Delivered",
    "Status",
    "SEND_NOW",
    "queue_of",
    "RetryInterval",
    "RelayAttempt",
    "EnvelopeInfo",
    "Message",
    "RoutedEnvelope",
    "RoutedBatch",
    "of_envelope_batch",
    "encode_record",
    "decode_record",
]

RECORD_VERSION: Final = 2

_V = TypeVar("_V")


# gc_paused's users (the load's reader threads and the event loop at
# once): the first to come pauses the collector, the last to leave puts it
# back as the first found it.
_gc_lock = threading.Lock()
_gc_users = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector around a synchronous bulk step
    (decoding or copying many records). Such a step makes many small objects
    and no cycles, and with a large queue in memory each collection it would
    trigger walks every record: pausing makes it several times faster. Never
    hold it across an ``await``. Thread-safe: a counted pause, the collector
    is back (if it was on when the first user came) when the last one
    leaves, in whatever order they leave."""
    global _gc_users, _gc_was_enabled
    with _gc_lock:
        if _gc_users == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0 and _gc_was_enabled:
                gc.enable()


class Queue(StrEnum):
    """The directories a record can live in."""

    ACTIVE = "active"
    FROZEN = "frozen"
    REMOVED = "removed"
    QUARANTINE = "quarantine"


# ----------------------------------------------------------------- status


class _StatusBase(msgspec.Struct, frozen=True, tag_field="kind", gc=False):
    name: ClassVar[str]


class SendNow(_StatusBase, frozen=True, tag="send_now"):
    name: ClassVar[str] = "send_now"


class SendAt(_StatusBase, frozen=True, tag="send_at"):
    at: datetime
    name: ClassVar[str] = "send_at"


class Sending(_StatusBase, frozen=True, tag="sending"):
    name: ClassVar[str] = "sending"


class Frozen(_StatusBase, frozen=True, tag="frozen"):
    name: ClassVar[str] = "frozen"


class Removed(_StatusBase, frozen=True, tag="removed"):
    name: ClassVar[str] = "removed"


class Quarantined(_StatusBase, frozen=True, tag="quarantined"):
    reason: str
    name: ClassVar[str] = "quarantined"


class Delivered(_StatusBase, frozen=True, tag="delivered"):
    name: ClassVar[str] = "delivered"


Status = SendNow | SendAt | Sending | Frozen | Removed | Quarantined | Delivered
SEND_NOW: Final = SendNow()

_QUEUE_OF: dict[type[_StatusBase], Queue | None] = {
    SendNow: Queue.ACTIVE,
    SendAt: Queue.ACTIVE,
    Sending: Queue.ACTIVE,
    Frozen: Queue.FROZEN,
    Removed: Queue.REMOVED,
    Quarantined: Queue.QUARANTINE,
    Delivered: None,
}


def queue_of(status: Status) -> Queue | None:
    """The queue that holds a record with this status (``None``: delivered,
    the record is deleted). The one place this mapping is defined."""
    return _QUEUE_OF[type(status)]


# ---------------------------------------------------------- record parts
# The parts of a record are not tracked by the cyclic garbage collector (gc=False):
# they hold only strings, times and lists of immutable values, so they can
# never be part of a reference cycle, and a queue of 100k records no longer
# makes every collection walk them.


class RetryInterval(msgspec.Struct, frozen=True, gc=False):
    """Wait this long after a failed attempt, give or take ``jitter``."""

    span: timedelta
    jitter: timedelta | None = None

    @classmethod
    def from_spans(cls, spans: Iterable[timedelta], jitter: float) -> list[RetryInterval]:
        """Intervals with ``jitter`` as a fraction of each span."""
        return [cls(s, s * jitter if jitter else None) for s in spans]

    def draw(self, rng: random.Random | None = None) -> timedelta:
        """The span with jitter applied: uniform in ``span ± jitter``, >= 0."""
        if not self.jitter:
            return self.span
        offset = (rng or random).uniform(-1.0, 1.0) * self.jitter.total_seconds()
        return max(timedelta(0), self.span + timedelta(seconds=offset))


class RelayAttempt(msgspec.Struct, frozen=True, gc=False):
    time: datetime
    error: str


class EnvelopeInfo(msgspec.Struct, frozen=True, gc=False):
    """The SMTP envelope as submitted. ``sender`` is ``""`` for the null
    sender ``<>``; ``mail_params`` are the ESMTP MAIL parameters as given
    (e.g. ``"BODY=8BITMIME"``, ``"SMTPUTF8"``)."""

    sender: str
    recipients: list[str]
    mail_params: list[str] = msgspec.field(default_factory=list)
    envelope_id: str = ""


# ---------------------------------------------------------------- record


class Message(
    msgspec.Struct,
    kw_only=True,
    tag_field="version",
    tag=RECORD_VERSION,
    gc=False,  # holds no container that could lead back to it: never in a cycle
):
    """The metadata record of one spooled message (schema version 2).

    ``size`` is the body's size in bytes, as on disk. ``removed_at`` is when
    it moved to ``removed`` (removed-message retention counts from it);
    ``idempotency_key`` the key it was submitted with, if any;
    ``submitter_uid`` the uid of the local user who submitted it, if known. ``route`` names the
    configured route that chose ``next_hop_choices``
    (``None``: hops given explicitly through the API, or a record written
    before version 2); after a reload that changes that route's hops, the
    message uses the new ones from its next attempt on.

    ``in_doubt`` says an attempt was under way when the process that made
    it died (the record was found checked out, or stored as ``sending``, at
    open): the next hop may already have the message, so a resend may be a
    duplicate. It stays set for as long as the message is on the spool.
    ``delay_warned_at`` is when the one "delayed" delivery status
    notification was sent to the sender (None: not sent), so it is sent once.
    ``body_sha256`` is the SHA-256 of the body file as written; with
    ``size`` it lets a relay (and ``check``) find a body that is no longer
    what was spooled (None: a record written before the field).
    ``rerouted_to`` maps each recipient that :meth:`Spool.reroute
    <spoold.spool.Spool.reroute>` moved into a new message to that
    message's id.

    :attr:`spool_dir` (the seed's ``spool_dir``) is where the message lives;
    it is not part of the record: the spool sets it on every record it reads
    or writes, and :func:`encode_record` leaves it out.
    """

    id: str
    parent_id: str
    related_ids: list[str] = msgspec.field(default_factory=list)
    flows: list[str] = msgspec.field(default_factory=list)
    spool_date: datetime
    next_hop_choices: list[str]
    retry_intervals: list[RetryInterval] = msgspec.field(default_factory=list)
    remaining_recipients: list[str]
    failed_recipients: list[str] = msgspec.field(default_factory=list)
    relay_attempts: list[RelayAttempt] = msgspec.field(default_factory=list)
    status: Status = SEND_NOW
    envelope_info: EnvelopeInfo
    route: str | None = None
    size: int | None = None  # bytes of the body on disk (None: before version 2)
    # Added later in version 2, at the end and with defaults: a record written
    # before reads as "nothing of this happened", and a spoold that predates
    # them reads a record that has them and ignores them (no harm done).
    in_doubt: bool = False  # an attempt was under way when a process died
    delay_warned_at: datetime | None = None  # when the one delay warning was sent
    # When the message moved to ``removed`` (None: not removed, or removed by
    # a version that did not say; the spool's retention stamps those first).
    removed_at: datetime | None = None
    # The submitter's idempotency key (Spool.add(idempotency_key=...)), kept so
    # the key index can be rebuilt from the records.
    idempotency_key: str | None = None
    # Recipients a reroute split off into new messages: recipient -> the id
    # of the message that now has it. They are no longer this message's to
    # deliver (the history journal says "rerouted", never "delivered").
    rerouted_to: dict[str, str] = msgspec.field(default_factory=dict)
    # The uid of the local process that submitted it (sendmail, Client.submit),
    # as the kernel told the daemon; None for SMTP and the Python API.
    submitter_uid: int | None = None
    # The SHA-256 (hex) of the body file as it was written, with ``size``: a
    # relay checks both while it sends (None: a record written before it).
    body_sha256: str | None = None
    # Not part of the record: the spool directory the message lives in, set
    # by the spool when it reads or writes the record (a reference to one
    # string the spool holds); never written (see encode_record).
    _spool_dir: str | msgspec.UnsetType = msgspec.UNSET

    # -- where it lives

    def body_check(self) -> BodyCheck | None:
        """What the body file must hold (its size and SHA-256), or None for
        a record written before bodies had a checksum."""
        if self.body_sha256 is None or self.size is None:
            return None
        return BodyCheck(self.size, self.body_sha256)

    @property
    def spool_dir(self) -> Path | None:
        """The spool directory the message lives in (None: not read from or
        written to a spool yet). Not stored in the record: the spool sets it
        on every record it reads or writes."""
        where = self._spool_dir
        return None if where is msgspec.UNSET else Path(where)

    @spool_dir.setter
    def spool_dir(self, value: Path | str | None) -> None:
        self._spool_dir = msgspec.UNSET if value is None else str(value)

    @property
    def queue(self) -> Queue | None:
        return queue_of(self.status)

    # -- derived values

    def time_on_spool(self, now: datetime | None = None) -> timedelta:
        return (now or utcnow()) - self.spool_date

    @property
    def last_relay_attempt(self) -> RelayAttempt | None:
        return self.relay_attempts[0] if self.relay_attempts else None

    def effective_status(self, now: datetime | None = None) -> Status:
        """The status, except that a ``send_at`` whose time has passed reads
        as ``send_now``."""
        status = self.status
        if isinstance(status, SendAt) and status.at <= (now or utcnow()):
            return SendNow()
        return status

    # -- changes (in memory; the spool writes them to disk)

    def add_retry_intervals(self, intervals: Sequence[RetryInterval]) -> None:
        """Put ``intervals`` at the head: they are used first."""
        self.retry_intervals = [*intervals, *self.retry_intervals]

    def add_relay_attempt(self, attempt: RelayAttempt) -> None:
        """Record an attempt; the newest is first."""
        self.relay_attempts = [attempt, *self.relay_attempts]

    def move_failed_to_remaining(self) -> None:
        """Failed recipients are tried again (an operator sent the message)."""
        self.remaining_recipients = list(
            dict.fromkeys([*self.remaining_recipients, *self.failed_recipients])
        )
        self.failed_recipients = []

    def copy(self) -> Message:
        """A copy that shares nothing mutable with this one (the spool hands
        these out, never its own records). Elements of the lists are
        immutable values and are shared."""
        env = self.envelope_info
        clone = msgspec.structs.replace(
            self,
            related_ids=list(self.related_ids),
            flows=list(self.flows),
            next_hop_choices=list(self.next_hop_choices),
            retry_intervals=list(self.retry_intervals),
            remaining_recipients=list(self.remaining_recipients),
            failed_recipients=list(self.failed_recipients),
            relay_attempts=list(self.relay_attempts),
            rerouted_to=dict(self.rerouted_to),
            envelope_info=msgspec.structs.replace(
                env, recipients=list(env.recipients), mail_params=list(env.mail_params)
            ),
        )
        return clone

    def intern(self, shared: SharedParts) -> None:
        """Share equal parts with other records, or within this one, to save
        memory in a large queue: empty lists, equal lists of retry
        intervals and of next hops, senders (kept once in ``shared``), a
        parent id equal to the id, and the envelope's recipients that are
        still remaining (the very list, while none is done).

        A shared list is never changed: every change to a record assigns a
        new list (the setters here, and the spool, which changes a
        :meth:`copy`), and :meth:`copy` gives lists of its own. Several
        threads may intern at once with one ``shared`` (a load's readers):
        each step reads what is kept once, so at worst an equal part is
        kept twice, never a different one given."""
        if self.parent_id == self.id:
            self.parent_id = self.id
        empty = shared.empty
        if not self.related_ids:
            self.related_ids = empty
        if not self.flows:
            self.flows = empty
        if not self.failed_recipients:
            self.failed_recipients = empty
        if not self.relay_attempts:
            self.relay_attempts = empty
        if not self.rerouted_to:
            self.rerouted_to = shared.empty_map
        self.retry_intervals = shared.intervals.share(self.retry_intervals)
        self.next_hop_choices = shared.hops.share(self.next_hop_choices)
        env = self.envelope_info
        sender = shared.senders.setdefault(env.sender, env.sender)
        recipients = env.recipients
        remaining = self.remaining_recipients
        if recipients == remaining:  # none done yet: one list for both
            recipients = remaining
        elif remaining:
            _share_items(recipients, {r: r for r in remaining})
        mail_params = env.mail_params or empty
        if (
            sender is not env.sender
            or mail_params is not env.mail_params
            or recipients is not env.recipients
        ):  # one new envelope for all three (each replace is a copy)
            self.envelope_info = msgspec.structs.replace(
                env, sender=sender, mail_params=mail_params, recipients=recipients
            )

    def __lt__(self, other: Message) -> bool:
        """Total order: by id, which is by time of spooling."""
        return (self.id, self.spool_date) < (other.id, other.spool_date)


@dataclass(slots=True)
class SharedParts:
    """Equal parts of many records, kept once (see :meth:`Message.intern`)."""

    intervals: _SharedLists[RetryInterval] = field(default_factory=lambda: _SharedLists())
    hops: _SharedLists[str] = field(default_factory=lambda: _SharedLists())
    senders: dict[str, str] = field(default_factory=dict)
    empty: list[Any] = field(default_factory=list)  # never appended to
    empty_map: dict[Any, Any] = field(default_factory=dict)  # never added to


class _SharedLists(Generic[_V]):
    """Equal lists kept once. Most records of a queue have the same list
    (the default retry intervals, the one smarthost): the last one kept is
    compared first, which is cheaper than hashing."""

    def __init__(self) -> None:
        self._kept: dict[tuple[_V, ...], list[_V]] = {}
        self._last: list[_V] | None = None

    def share(self, items: list[_V]) -> list[_V]:
        """The kept list equal to ``items`` (``items`` itself, now kept, if
        it is the first of its kind)."""
        last = self._last  # read once: threads of a load share this (see Message.intern)
        if last is not None and items == last:
            return last
        self._last = one = self._kept.setdefault(tuple(items), items)
        return one


def _share_items(items: list[_V], kept: dict[_V, _V]) -> None:
    """Replace each item of ``items`` (in place) by the equal one in ``kept``,
    adding it there if it is new."""
    for i, item in enumerate(items):
        one = kept.setdefault(item, item)
        if one is not item:
            items[i] = one


# ------------------------------------------------------- routed batches


@dataclass(frozen=True, slots=True)
class RoutedEnvelope:
    """One envelope of a submission, with where and how to relay it."""

    sender: str
    recipients: Sequence[str]
    next_hop_choices: Sequence[str]
    retry_intervals: Sequence[RetryInterval] = ()
    mail_params: Sequence[str] = ()
    envelope_id: str = ""
    route: str | None = None  # the configured route that chose the hops, if any


@dataclass(frozen=True, slots=True)
class RoutedBatch:
    """A submission after routing: envelopes sharing one body."""

    envelopes: Sequence[RoutedEnvelope]
    body: Body


def message_for_envelope(
    envelope: RoutedEnvelope,
    *,
    id: str,
    spool_date: datetime,
    parent_id: str,
    status: Status = SEND_NOW,
    flows: Sequence[str] = (),
    failed_recipients: Sequence[str] = (),
    relay_attempts: Sequence[RelayAttempt] = (),
    related_ids: Sequence[str] = (),
    size: int | None = None,
) -> Message:
    msg = Message(
        id=validate_id(id),
        parent_id=parent_id,
        related_ids=list(related_ids),
        flows=list(flows),
        spool_date=spool_date,
        next_hop_choices=list(envelope.next_hop_choices),
        retry_intervals=list(envelope.retry_intervals),
        remaining_recipients=list(envelope.recipients),
        failed_recipients=list(failed_recipients),
        relay_attempts=list(relay_attempts),
        status=status,
        envelope_info=EnvelopeInfo(
            sender=envelope.sender,
            recipients=list(envelope.recipients),
            mail_params=list(envelope.mail_params),
            envelope_id=envelope.envelope_id,
        ),
        route=envelope.route,
        size=size,
    )
    return msg


def of_envelope_batch(
    batch: RoutedBatch,
    *,
    gen_id: Callable[[], str],
    spool_date: datetime,
    parent_id: str,
    status: Status = SEND_NOW,
    flows: Sequence[str] = (),
    failed_recipients: Sequence[str] = (),
    relay_attempts: Sequence[RelayAttempt] = (),
) -> list[tuple[Message, Body]]:
    """One message (and its body) per envelope of ``batch``; siblings name
    each other in ``related_ids``."""
    ids = [gen_id() for _ in batch.envelopes]
    return [
        (
            message_for_envelope(
                env,
                id=mid,
                spool_date=spool_date,
                parent_id=parent_id,
                status=status,
                flows=flows,
                failed_recipients=failed_recipients,
                relay_attempts=relay_attempts,
                related_ids=[other for other in ids if other != mid],
                size=len(batch.body),
            ),
            batch.body,
        )
        for env, mid in zip(batch.envelopes, ids, strict=True)
    ]


# ----------------------------------------------------------------- codec

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)
_NO_TIME: Final = timedelta(0)


class _VersionOnly(msgspec.Struct):
    version: object = None


_version_decoder = msgspec.json.Decoder(_VersionOnly)


def _v1_to_v2(record: dict[str, object]) -> dict[str, object]:
    """Version 2 adds ``route`` and ``size``: unknown for a version 1 record."""
    record["route"] = None
    record["size"] = None
    return record


# Upgrades of older schema versions: version N -> a function from the
# decoded JSON object of version N to one of version N + 1. A record is
# upgraded step by step and then read as the current version.
_UPGRADES: dict[int, Callable[[dict[str, object]], dict[str, object]]] = {1: _v1_to_v2}
_generic_decoder = msgspec.json.Decoder(dict[str, object])


def _upgrade(data: bytes, version: int) -> Message:
    record = _generic_decoder.decode(data)
    while version < RECORD_VERSION:
        record = _UPGRADES[version](record)
        version += 1
    record["version"] = RECORD_VERSION
    return _decoder.decode(_encoder.encode(record))


def encode_record(message: Message) -> bytes:
    """The record as stored: every field but the spool directory."""
    if message._spool_dir is not msgspec.UNSET:
        message = msgspec.structs.replace(message, _spool_dir=msgspec.UNSET)
    return _encoder.encode(message) + b"\n"


def decode_record(
    data: bytes, *, expected_id: str | None = None, spool_dir: str | None = None
) -> Message:
    """Read a record of any known version; raise :class:`RecordError`.
    ``spool_dir``: the directory it was read from (:attr:`Message.spool_dir`),
    best one string shared by all the records of a spool."""
    try:
        msg = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        try:
            version = _version_decoder.decode(data).version
        except msgspec.DecodeError:
            raise RecordError(f"corrupt record: {exc}") from None
        if version == RECORD_VERSION:
            raise RecordError(f"invalid version {version} record: {exc}") from None
        if isinstance(version, bool) or not (isinstance(version, int) and version in _UPGRADES):
            raise RecordError(f"unknown record version {version!r}") from None
        try:
            msg = _upgrade(data, version)
        except msgspec.DecodeError as exc2:
            raise RecordError(f"invalid version {version} record: {exc2}") from None
    try:
        validate_id(msg.id)
    except InvalidIdError as exc:
        raise RecordError(f"record has a bad id: {exc}") from None
    if expected_id is not None and msg.id != expected_id:
        raise RecordError(f"record says id {msg.id!r} but is stored as {expected_id!r}")
    # Plain loops and tests, no list or generator: every record of a queue
    # passes here when the spool opens (a million records: seconds).
    status = msg.status
    if (
        msg.spool_date.tzinfo is None
        or (isinstance(status, SendAt) and status.at.tzinfo is None)
        or (msg.delay_warned_at is not None and msg.delay_warned_at.tzinfo is None)
        or (msg.removed_at is not None and msg.removed_at.tzinfo is None)
    ):
        raise RecordError("record has a time without a time zone")
    for attempt in msg.relay_attempts:
        if attempt.time.tzinfo is None:
            raise RecordError("record has a time without a time zone")
    for r in msg.retry_intervals:
        if r.span < _NO_TIME or (r.jitter is not None and r.jitter < _NO_TIME):
            raise RecordError("record has a negative retry interval")
    if spool_dir is not None:
        msg._spool_dir = spool_dir
    return msg
