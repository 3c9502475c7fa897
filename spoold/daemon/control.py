"""The control socket: a JSON-lines protocol over a Unix socket.

One request per connection: one JSON object on one line, then the reply::

    -> {"v": 1, "op": "freeze", "ids": ["8Dq..."]}
    <- {"ok": true, "result": null}
    <- {"ok": false, "kind": "refused", "error": "cannot remove 8Dq...: ..."}

``kind`` is ``invalid`` (a bad request, id or address), ``not_found``,
``refused`` (the operation is not allowed for the message's status),
``denied`` (an admin operation asked on the submission socket),
``closed`` (the daemon is stopping), ``temporary`` (try again later: a disk
error, a DNS timeout), ``busy`` (too many clients at once: try again) or
``internal``. ``events`` answers with one ``{"ok": true, "event": {...}}``
line per event until the client hangs up.

Operations mirror the Python API of :class:`~spoold.spool.Spool`:
``status`` (``queue``: all|active|frozen|quarantine; a quarantined record
that cannot be read is listed with ``unreadable: true`` and its reason;
``only_ids: true`` answers the sorted ids alone, cheap for a large queue;
filters ``domain``, ``older_than``, ``newer_than``, ``error`` and a cursor
``after``, ``limit``, see :mod:`spoold.listing`; ``stream: true`` answers
one ``{"ok": true, "page": [...]}`` line per page, then ``{"ok": true,
"result": {"listed": N, "next_after": ID|null}}``. Either form is built a
page at a time from a snapshot of the ids, the event loop given back
between two pages; the streamed one also sends each page as it is built,
as fast as the client reads, so neither side holds the whole listing),
``count``, ``freeze``, ``send``
(``ids`` or ``which``: all|frozen_only, ``retry_intervals``: spans),
``remove``, ``reroute`` (``ids`` or ``which``: all), ``recover`` (``from``:
removed|quarantine), ``show`` (``id``,
``body``; a message that left the queue is shown from the history journal:
``queue`` null, ``status`` its final outcome, and ``outcome``), ``history``
(``since``: a span back from now, ``recipient``: an address; a list of
outcomes, oldest first; ``refused`` past
:data:`~spoold.history.MAX_QUERY_RESULTS` of them), ``retry_plan`` (``id``: the message's future
attempts, see :func:`retry_plan_view`), ``events``, ``reload``, ``check``,
``info`` (pid, config and live limits), ``submit`` (a message for ``spoold
sendmail``; optional ``idempotency_key``: a retry with the same key gets the
first submission's ids and queues nothing), ``wait`` and ``ping``.

``wait`` (``id``, ``timeout`` in seconds or null) is
:meth:`~spoold.spool.Spool.wait`: it answers once the message has an
outcome (:func:`outcome_view`), at once if it already has one. A message
still queued when the time is up is answered with kind ``timeout``; an id
the spool knows nothing of is ``not_found``. A waiting client holds its
place among ``max_clients``, and hanging up ends its wait at once.

``submit`` carries the message outside the JSON line: the line holds
``sender``, ``recipients`` and ``"content_length": N``, and exactly N raw
bytes follow its newline. A length over the submit size limit
(``smtp.max_message_size``, given by the daemon) is refused before a byte
of the message is read. An older client's base64 ``"content"`` inside the
line still works while the whole line is under the line limit. Addresses
are checked by the handler the daemon gives (``kind`` ``invalid`` for a bad
one); nothing in a request is ever rewritten.

Limits (constructor parameters; defaults in brackets) keep one client, or
many, from taking the daemon's memory or descriptors:

* a request line is at most ``max_request`` bytes [1 MiB]; a longer one gets
  ``{"ok": false, "kind": "invalid", "error": "request over 1 MiB"}`` and the
  connection is closed without reading the rest;
* the request line must arrive within ``request_timeout`` seconds of the
  connection [30 s], and a submit's content may pause at most that long
  between two reads; a client that stays silent is told so and
  disconnected. Once ``events`` is requested, the stream has no timeout;
* at most ``max_clients`` connections are served at once [64]. Every open
  connection holds one place from accept to close, an ``events`` subscriber
  included, for as long as it stays subscribed. One more client is answered
  ``{"ok": false, "kind": "busy", ...}`` and disconnected at once, by the
  accept loop itself (no task, no read).
* the requests that stay (``events``, ``wait``) may hold at most
  ``max_clients`` less a quarter (at least one place) of those places: one
  more is answered ``busy``, so clients that wait for ever cannot lock the
  operator's ``status`` or ``reload`` out.

The accept loop is our own: an ``accept()`` that fails for lack of
resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) is logged once per burst (see
:class:`~spoold.daemon.resources.AcceptFailures`) and retried after a pause that
grows from 0.1 s to 1 s; the server, and every connection it already has,
goes on. Any other accept error ends the server (it is a bug, not load).

Two sockets, one protocol. The daemon serves every operation on the admin
socket (``control.socket``, mode 0660 by default: its owner and group) and
only :data:`SUBMISSION_OPERATIONS` (``submit``, ``wait``, ``ping``) on the
submission socket (``control.submission_socket``, mode 0666 by default: any
local user, as Postfix's postdrop lets anyone submit). Any other operation
there is answered ``{"ok": false, "kind": "denied", ...}`` saying to use the
admin socket, and nothing is done. Each socket has a server of its own (its
own ``max_clients``), so a crowd of submitters cannot lock the operator out.
``wait`` there is for the messages the same user submitted (the record's
``submitter_uid``); another's id is answered ``not_found``, as an unknown
one is. The queue listing is not served there (it holds every user's
addresses): ``mailq`` is for admins.

The daemon learns who is on the other end of each connection from the
kernel (``SO_PEERCRED``: pid, uid, gid; Linux) and hands a submission's
:class:`PeerCredentials` to :meth:`DaemonOperations.submit`, which writes
the uid into the message's ``Received:`` header, its record and history
line (``submitter_uid``) and its log line.

The socket file gets the configured mode (and group, when one is
configured); the server refuses to start in a directory anyone may write to
unless it is sticky.
A request the server cannot parse gets an error reply, never a crash; one
connection's failure is logged and never ends the server.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import math
import os
import re
import socket as socketlib
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, cast, get_args, get_origin

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream

from spoold.address import validate_address
from spoold.daemon.config import SmtpConfig
from spoold.daemon.resources import AcceptFailures, accept_forever
from spoold.errors import (
    AddressError,
    ControlError,
    ControlErrorKind,
    InvalidIdError,
    MxError,
    NotFoundError,
    OperationRefusedError,
    SpoolClosedError,
    SpooldError,
    StoreError,
    WaitTimeoutError,
)
from spoold.history import Outcome
from spoold.ids import validate_id
from spoold.listing import Listing, ListingFilter
from spoold.message import (
    Message,
    Quarantined,
    Queue,
    RetryInterval,
    SendAt,
    Status,
    gc_paused,
    queue_of,
)
from spoold.ondisk import Unreadable
from spoold.outcome import RetryPlan
from spoold.spool import Spool
from spoold.times import format_size, parse_span, rfc3339
from spoold.waiting import MessageOutcome

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_REQUEST",
    "REQUEST_TIMEOUT",
    "MAX_CLIENTS",
    "ControlServer",
    "DaemonOperations",
    "OPERATIONS",
    "SUBMISSION_OPERATIONS",
    "PeerCredentials",
    "peer_credentials",
    "ControlClient",
    "message_view",
    "unreadable_view",
    "describe_view",
    "retry_plan_view",
    "outcome_view",
    "history_view",
    "departed_view",
]

PROTOCOL_VERSION = 1
MAX_REQUEST = 1024 * 1024  # one request line, without its newline
REQUEST_TIMEOUT = 30.0  # seconds from accept to the request's newline
MAX_CLIENTS = 64  # connections served at once, events subscribers included
DEFAULT_MAX_MESSAGE_SIZE = 32 * 1024 * 1024  # smtp.max_message_size's default

# What the submission socket serves; every other operation is for the admin socket.
SUBMISSION_OPERATIONS: frozenset[str] = frozenset({"submit", "wait", "ping"})

_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
_READ_CHUNK = 256 * 1024

log = structlog.get_logger("spoold.daemon.control")


@functools.lru_cache(maxsize=64)
def _intervals_view(intervals: tuple[RetryInterval, ...]) -> tuple[dict[str, Any], ...]:
    """Retry intervals as seconds (most messages share a few lists of them:
    shared views, to encode and never to change)."""
    return tuple(
        {"span": r.span.total_seconds(), "jitter": r.jitter.total_seconds() if r.jitter else None}
        for r in intervals
    )


def _as_is(value: Any) -> Any:
    return value


def _utc_time(t: datetime) -> Any:
    """A time for msgspec to encode: it writes a UTC time exactly as
    :func:`~spoold.times.rfc3339` does."""
    return t if t.tzinfo is UTC else rfc3339(t)


def message_view(msg: Message, status: Status | None = None) -> dict[str, Any]:
    """The JSON listing of a message (``status --format json``): the
    record's fields plus ``queue``; ``status`` as a string (``status``, when
    given, instead of the record's), with ``send_at``
    and ``quarantine_reason`` when they apply (and ``removed_at``,
    ``idempotency_key``, ``rerouted_to``, ``submitter_uid`` when set); times RFC 3339 UTC; retry
    intervals as seconds. Nothing of ``msg`` is kept: the view is new."""
    return _view(msg, status, shared=False)


def _listing_view(item: tuple[Message, Status]) -> dict[str, Any]:
    """:func:`message_view` of a record of the spool's, to encode with
    msgspec at once (before any ``await``) and drop: it shares the record's
    lists and leaves UTC times to the encoder (a large listing's cost is
    mostly here)."""
    return _view(*item, shared=True)


def _view(msg: Message, status: Status | None, *, shared: bool) -> dict[str, Any]:
    if status is None:
        status = msg.status
    some: Callable[[Any], Any] = _as_is if shared else list
    when: Callable[[datetime], Any] = _utc_time if shared else rfc3339
    intervals = _intervals_view(tuple(msg.retry_intervals))
    queue = queue_of(status)
    env = msg.envelope_info
    view: dict[str, Any] = {
        "id": msg.id,
        "queue": queue.value if queue else None,
        "status": status.name,
        "parent_id": msg.parent_id,
        "related_ids": some(msg.related_ids),
        "flows": some(msg.flows),
        "spool_date": when(msg.spool_date),
        "next_hop_choices": some(msg.next_hop_choices),
        "retry_intervals": intervals if shared else [dict(i) for i in intervals],
        "remaining_recipients": some(msg.remaining_recipients),
        "failed_recipients": some(msg.failed_recipients),
        "relay_attempts": [{"time": when(a.time), "error": a.error} for a in msg.relay_attempts],
        "envelope_info": {
            "sender": env.sender,
            "recipients": some(env.recipients),
            "mail_params": some(env.mail_params),
            "envelope_id": env.envelope_id,
        },
        "route": msg.route,
        "size": msg.size,
        "in_doubt": msg.in_doubt,
        "delay_warned_at": when(msg.delay_warned_at) if msg.delay_warned_at else None,
    }
    if msg.rerouted_to:
        view["rerouted_to"] = dict(msg.rerouted_to)
    if isinstance(status, SendAt):
        view["send_at"] = when(status.at)
    if isinstance(status, Quarantined):
        view["quarantine_reason"] = status.reason
    if msg.removed_at is not None:
        view["removed_at"] = when(msg.removed_at)
    if msg.idempotency_key is not None:
        view["idempotency_key"] = msg.idempotency_key
    if msg.submitter_uid is not None:
        view["submitter_uid"] = msg.submitter_uid
    return view


def retry_plan_view(plan: RetryPlan) -> dict[str, Any]:
    """The JSON form of a :class:`~spoold.outcome.RetryPlan` (times RFC
    3339 UTC): ``attempts`` (``number``, ``earliest``, ``latest``,
    ``conditional``), ``repeats`` (the attempts of a repeating last
    interval, summed up: ``first``, ``earliest``, ``latest``,
    ``shortest_wait`` and ``longest_wait`` in seconds, ``until``,
    ``min_count``, ``max_count``; or null), ``ends`` (``action``
    freeze|bounce, ``reason`` lifetime|intervals, ``earliest``, ``latest``),
    ``delay_warning`` (``earliest``, ``latest``, or null), ``expiry``, the
    policy's ``on_permanent_failure`` and ``retries_exhausted``, and
    ``note`` when nothing is planned."""
    warning = plan.delay_warning
    repeats = plan.repeats
    return {
        "id": plan.id,
        "now": rfc3339(plan.now),
        "expiry": rfc3339(plan.expiry) if plan.expiry else None,
        "on_permanent_failure": plan.policy.on_permanent_failure.value,
        "retries_exhausted": plan.policy.retries_exhausted.value,
        "attempts": [
            {
                "number": a.number,
                "earliest": rfc3339(a.earliest),
                "latest": rfc3339(a.latest),
                "conditional": a.conditional,
            }
            for a in plan.attempts
        ],
        "repeats": (
            {
                "first": repeats.first,
                "earliest": rfc3339(repeats.earliest),
                "latest": rfc3339(repeats.latest),
                "shortest_wait": repeats.shortest.total_seconds(),
                "longest_wait": repeats.longest.total_seconds(),
                "until": rfc3339(repeats.until),
                "min_count": repeats.min_count,
                "max_count": repeats.max_count,
            }
            if repeats
            else None
        ),
        "ends": [
            {
                "action": e.action,
                "reason": e.reason,
                "earliest": rfc3339(e.earliest),
                "latest": rfc3339(e.latest),
            }
            for e in plan.ends
        ],
        "delay_warning": (
            {"earliest": rfc3339(warning[0]), "latest": rfc3339(warning[1])} if warning else None
        ),
        "note": plan.note,
    }


def unreadable_view(item: Unreadable) -> dict[str, Any]:
    """The listing of a record that cannot be read: what is known of it."""
    return {
        "id": item.id,
        "queue": item.queue.value,
        "status": "quarantined" if item.queue is Queue.QUARANTINE else "unreadable",
        "quarantine_reason": item.reason,
        "unreadable": True,
        "path": str(item.path),
    }


def describe_view(found: Message | Unreadable) -> dict[str, Any]:
    return unreadable_view(found) if isinstance(found, Unreadable) else message_view(found)


def outcome_view(outcome: MessageOutcome) -> dict[str, Any]:
    """The ``wait`` result: a :class:`~spoold.waiting.MessageOutcome` as
    JSON (``outcome`` is its kind; ``sender`` and ``recipients`` are the
    envelope's, when known)."""
    view: dict[str, Any] = {
        "id": outcome.id,
        "outcome": outcome.kind.value,
        "time": rfc3339(outcome.time) if outcome.time else None,
        "failed_recipients": list(outcome.failed_recipients),
        "last_error": outcome.last_error,
        "detail": outcome.detail,
    }
    if outcome.envelope_info is not None:
        view["sender"] = outcome.envelope_info.sender
        view["recipients"] = list(outcome.envelope_info.recipients)
    return view


def history_view(outcome: Outcome) -> dict[str, Any]:
    """A journalled final outcome (``history``, and ``show`` of a message
    that left the queue): the journal line's fields, times RFC 3339 UTC."""
    view: dict[str, Any] = msgspec.to_builtins(outcome)
    view["time"] = rfc3339(outcome.time)
    view["spool_date"] = rfc3339(outcome.spool_date)
    for rcpt in view["recipients"]:
        if rcpt.get("rerouted_to") is None:
            rcpt.pop("rerouted_to", None)  # only a rerouted recipient has one
    return view


def departed_view(outcome: Outcome) -> dict[str, Any]:
    """``show`` of a message no queue holds any more."""
    return {
        "id": outcome.id,
        "queue": None,
        "status": outcome.outcome.value,
        "outcome": history_view(outcome),
    }


_P = TypeVar("_P", bound="_Params")

_KINDS: frozenset[str] = frozenset(get_args(ControlErrorKind))


def _older_daemon(reply: dict[str, Any], params: dict[str, Any]) -> bool:
    """Whether an error reply to a paged ``status`` is an older daemon's
    word that it knows no ``stream``, for a listing it can give whole."""
    return (
        reply.get("kind") == "invalid"
        and "stream" in str(reply.get("error", ""))
        and set(params) <= {"queue", "only_ids"}
    )


def _reply_kind(reply: dict[str, Any]) -> ControlErrorKind:
    """The ``kind`` of an error reply (an unknown one reads as internal)."""
    kind = reply.get("kind")
    return cast(ControlErrorKind, kind) if kind in _KINDS else "internal"


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class _Encoded:
    """A result already encoded as JSON (a listing, page by page)."""

    json: bytes


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(dict[str, Any])
_RAW_PAGE_HEAD = b'{"ok":true,"page":['  # how a page line starts
_RAW_PAGE = msgspec.json.Decoder(list[msgspec.Raw])


def _encode(obj: object) -> bytes:
    if isinstance(obj, dict) and isinstance(result := obj.get("result"), _Encoded):
        head = json.dumps({k: v for k, v in obj.items() if k != "result"}, separators=(",", ":"))
        return head[:-1].encode() + b',"result":' + result.json + b"}\n"
    return json.dumps(obj, default=_json_default, separators=(",", ":")).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is on the other end of a Unix socket connection, as the kernel
    says (``SO_PEERCRED``): the process, its user and its group at the time
    it connected."""

    pid: int
    uid: int
    gid: int


_PEERCRED = struct.Struct("3i")


def peer_credentials(conn: socketlib.socket) -> PeerCredentials | None:
    """The peer of a connected Unix socket; None where the system does not
    tell (no ``SO_PEERCRED`` outside Linux)."""
    option = getattr(socketlib, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        raw = conn.getsockopt(socketlib.SOL_SOCKET, option, _PEERCRED.size)
    except OSError:
        return None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


class DaemonOperations(Protocol):
    """What the daemon adds to the spool's own operations (the
    :class:`~spoold.daemon.main.Daemon` is one)."""

    async def reload(self) -> dict[str, Any]: ...

    async def info(self) -> dict[str, Any]: ...

    async def count(self) -> dict[str, int]: ...

    async def check(self, max_age: float, quick: bool = False) -> list[str]: ...

    async def submit(
        self,
        sender: str,
        recipients: list[str],
        content: bytes,
        idempotency_key: str | None = None,
        peer: PeerCredentials | None = None,
    ) -> list[str]: ...


# ------------------------------------------------------ the operations
# One table: operation name -> (its parameters, its handler). The request
# object (without "v" and "op") is decoded into the parameters' type, which
# refuses unknown or ill-typed fields with a message naming the field.


class _Params(msgspec.Struct, forbid_unknown_fields=True):
    pass


class _NoParams(_Params):
    pass


class _StatusParams(_Params):
    queue: Literal["all", "active", "frozen", "quarantine"] = "all"
    only_ids: bool = False  # the ids alone, sorted (no listing object is built)
    stream: bool = False  # pages as they are built, then a last line (a large queue)
    after: str | None = None  # list the ids after this one (a cursor)
    limit: int | None = None  # at most this many
    domain: str | None = None  # a recipient still to deliver is in this domain
    older_than: str | None = None  # a span: at least this old (by spool date)
    newer_than: str | None = None  # a span: younger than this
    error: str | None = None  # the last error contains this text (any case)


class _IdsParams(_Params):
    ids: list[str]


class _SendParams(_Params):
    which: Literal["ids", "all", "frozen_only"] = "ids"
    ids: list[str] = []
    retry_intervals: list[str] = []


class _RerouteParams(_Params):
    which: Literal["ids", "all"] = "ids"
    ids: list[str] = []


class _RecoverParams(_Params):
    ids: list[str]
    source: Literal["removed", "quarantine"] = msgspec.field(name="from")


class _ShowParams(_Params):
    id: str
    body: bool = False


class _IdParams(_Params):
    id: str


class _CheckParams(_Params):
    max_age: float = 3600.0
    quick: bool = False  # bodies by size only, no checksums


class _WaitParams(_Params):
    id: str
    timeout: float | None = None


class _HistoryParams(_Params):
    since: str | None = None  # a span back from now
    recipient: str | None = None


class _SubmitParams(_Params):
    sender: str
    recipients: list[str]
    content_length: int | msgspec.UnsetType = msgspec.UNSET  # the message follows, raw
    content: str | msgspec.UnsetType = msgspec.UNSET  # or (older clients) base64 in the line
    idempotency_key: str | None = None


def _require_ids(ids: list[str]) -> list[str]:
    if not ids:
        raise InvalidIdError("expected 'ids': a non-empty list of message ids")
    return ids


async def _ping(server: ControlServer, p: _NoParams) -> Any:
    return "pong"


def _listing_filter(p: _StatusParams) -> ListingFilter:
    return ListingFilter(
        domain=p.domain,
        older_than=None if p.older_than is None else parse_span(p.older_than),
        newer_than=None if p.newer_than is None else parse_span(p.newer_than),
        error=p.error,
    )


async def _listing(
    server: ControlServer, p: _StatusParams
) -> tuple[Listing[Any], Callable[[Any], Any]]:
    """The walk over what ``status`` lists (a snapshot of the ids, taken
    now) and how each item is shown: its listing object, or its id."""
    wanted = _listing_filter(p)
    if p.after is not None:
        validate_id(p.after)
    now = server.spool.clock.now()
    render: Callable[[Any], Any]
    if p.queue == "quarantine":
        readable, unreadable = await server.spool.quarantined()
        found: dict[str, Message | Unreadable] = {m.id: m for m in readable}
        found.update((u.id, u) for u in unreadable)
        render = (lambda item: item.id) if p.only_ids else describe_view
        listing: Listing[Any] = Listing(
            sorted(found),
            found.get,
            lambda item: wanted.keeps(item, now),
            after=p.after,
            limit=p.limit,
        )
        return listing, render
    ids = server.spool.status_ids(None if p.queue == "all" else Queue(p.queue))
    if p.only_ids and not wanted.narrows:  # nothing to look at but the ids
        listing = Listing(ids, lambda mid: mid, lambda _: True, after=p.after, limit=p.limit)
        return listing, lambda mid: mid
    # Each page is looked up, filtered and shown with no pause between:
    # the spool's own records are read, never kept, never changed.
    listing = Listing(
        ids,
        lambda mid: server.spool.peek(mid, now),
        lambda seen: wanted.keeps(seen[0], now),
        after=p.after,
        limit=p.limit,
    )
    if p.only_ids:
        return listing, lambda seen: seen[0].id
    return listing, _listing_view


async def _status(server: ControlServer, p: _StatusParams) -> Any:
    """``status`` in one reply (the form older clients ask for). Built
    page by page all the same, with a pause for the event loop between two
    pages, and each page encoded as it is built."""
    listing, render = await _listing(server, p)
    parts: list[bytes] = []
    while not listing.done:
        with gc_paused():  # many small objects, no cycles: see gc_paused
            parts += [_ENCODER.encode(render(item)) for item in listing.page()]
        await anyio.lowlevel.checkpoint()
    return _Encoded(b"[" + b",".join(parts) + b"]")


async def _freeze(server: ControlServer, p: _IdsParams) -> Any:
    await server.spool.freeze(_require_ids(p.ids))


async def _send(server: ControlServer, p: _SendParams) -> Any:
    intervals = RetryInterval.from_spans([parse_span(s) for s in p.retry_intervals], 0.0)
    if p.which == "ids":
        return await server.spool.send(_require_ids(p.ids), retry_intervals=intervals)
    return await server.spool.send(which=p.which, retry_intervals=intervals)


async def _remove(server: ControlServer, p: _IdsParams) -> Any:
    await server.spool.remove(_require_ids(p.ids))


async def _reroute(server: ControlServer, p: _RerouteParams) -> Any:
    if p.which == "ids":
        return await server.spool.reroute(_require_ids(p.ids))
    return await server.spool.reroute(which="all")


async def _recover(server: ControlServer, p: _RecoverParams) -> Any:
    await server.spool.recover(_require_ids(p.ids), from_=p.source)


async def _show(server: ControlServer, p: _ShowParams) -> Any:
    try:
        found = await server.spool.describe(p.id)
    except NotFoundError:
        outcome = await server.spool.find_outcome(p.id)
        if outcome is None:
            raise
        if p.body:
            raise NotFoundError(
                f"{outcome.id}: {outcome.outcome.value}; its body is gone"
            ) from None
        return departed_view(outcome)
    view = describe_view(found)
    if p.body:
        body = await server.spool.ondisk.read_body(found.id)
        view["body"] = base64.b64encode(body.content()).decode()
    return view


async def _retry_plan(server: ControlServer, p: _IdParams) -> Any:
    return retry_plan_view(server.spool.retry_plan(p.id))


async def _history(server: ControlServer, p: _HistoryParams) -> Any:
    since = None
    if p.since is not None:
        since = server.spool.clock.now() - parse_span(p.since)
    if p.recipient is not None:
        validate_address(p.recipient, role="recipient", smtputf8=True)
    found = await server.spool.history(since=since, recipient=p.recipient)
    views = [history_view(o) for o in found]
    for view in views:
        for rcpt in view["recipients"]:
            if "rerouted_to" in rcpt:
                rcpt["rerouted_state"] = await _state_now(server.spool, rcpt["rerouted_to"])
    return views


async def _state_now(spool: Spool, message_id: str) -> str:
    """Where a message stands now: its status while queued, else its final
    outcome from the journal, else ``unknown``."""
    try:
        msg = await spool.get_message(message_id)
    except NotFoundError:
        outcome = await spool.find_outcome(message_id)
        return outcome.outcome.value if outcome is not None else "unknown"
    return msg.effective_status(spool.clock.now()).name


async def _reload(server: ControlServer, p: _NoParams) -> Any:
    return await server.daemon_operations().reload()


async def _info(server: ControlServer, p: _NoParams) -> Any:
    return await server.daemon_operations().info()


async def _count(server: ControlServer, p: _NoParams) -> Any:
    return await server.daemon_operations().count()


async def _check(server: ControlServer, p: _CheckParams) -> Any:
    return await server.daemon_operations().check(p.max_age, p.quick)


_Handler = Callable[["ControlServer", Any], Awaitable[Any]]

OPERATIONS: dict[str, tuple[type[_Params], _Handler]] = {
    "ping": (_NoParams, _ping),
    "status": (_StatusParams, _status),
    "freeze": (_IdsParams, _freeze),
    "send": (_SendParams, _send),
    "remove": (_IdsParams, _remove),
    "reroute": (_RerouteParams, _reroute),
    "recover": (_RecoverParams, _recover),
    "show": (_ShowParams, _show),
    "retry_plan": (_IdParams, _retry_plan),
    "history": (_HistoryParams, _history),
    "reload": (_NoParams, _reload),
    "info": (_NoParams, _info),
    "count": (_NoParams, _count),
    "check": (_CheckParams, _check),
    # and two with a framing of their own, served by ControlServer itself:
    # "submit" (_SubmitParams, then the message) and "events" (a stream)
}


def _params(op: str, kind: type[_P], request: dict[str, Any]) -> _P:
    fields = {k: v for k, v in request.items() if k not in ("v", "op")}
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as exc:
        raise ValueError(_explain(kind, fields, str(exc))) from None


def _explain(kind: type[_Params], fields: dict[str, Any], text: str) -> str:
    """msgspec's text, or for a closed choice the choices themselves."""
    m = re.search(r"- at `\$\.(\w+)`$", text)
    if m is None:
        return text
    name = m.group(1)
    for info in msgspec.structs.fields(kind):
        if info.encode_name == name and get_origin(info.type) is Literal:
            choices = ", ".join(str(c) for c in get_args(info.type))
            return f"{name} must be one of {choices}, got {fields.get(name)!r}"
    return text


def _default_max_message_size() -> int:
    return SmtpConfig().max_message_size


def _too_large(size: int, limit: int) -> str:
    return f"submit: message of {size} bytes exceeds the limit of {limit} (smtp.max_message_size)"


class ControlServer:
    """Serves the control protocol for a running spool (see the module
    docstring for the limits).

    The operations are :data:`OPERATIONS`; those the daemon adds (``reload``,
    ``info``, ``count``, ``check``, ``submit``) go to ``daemon`` (without
    one, they are refused as unavailable). ``submit`` takes the messages of
    ``spoold sendmail``, at most ``max_message_size()`` bytes each (read at
    every submit, so a reload applies). ``accept_failures`` is where accept
    errors for lack of resources are counted and logged (the daemon shares
    one with its other listeners). ``submission_only``: this is the
    submission socket's server, which answers only
    :data:`SUBMISSION_OPERATIONS` and denies the rest.
    """

    def __init__(
        self,
        spool: Spool,
        daemon: DaemonOperations | None = None,
        *,
        max_message_size: Callable[[], int] = _default_max_message_size,
        accept_failures: AcceptFailures | None = None,
        max_request: int = MAX_REQUEST,
        request_timeout: float = REQUEST_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
        submission_only: bool = False,
    ) -> None:
        if max_request < 1 or max_clients < 1 or not request_timeout > 0:
            raise ValueError("control server limits must be positive")
        self.spool = spool
        self.daemon = daemon
        self.max_message_size = max_message_size
        self.accept_failures = accept_failures or AcceptFailures()
        self.max_request = max_request
        self.request_timeout = request_timeout
        self.max_clients = max_clients
        self.clients = 0  # connections being served now, events subscribers included
        self.staying = 0  # of those, the ones in events or wait
        self.max_staying = max(1, max_clients - max(1, max_clients // 4))
        self.submission_only = submission_only
        # Submission socket: connections per user (uid; None: unknown peer).
        self.max_per_user = max(1, max_clients // 8)
        self.reading = 0  # bytes of submitted messages being read now
        self.clients_by_uid: dict[int | None, int] = {}

    def daemon_operations(self) -> DaemonOperations:
        if self.daemon is None:
            raise OperationRefusedError("this control server has no daemon to ask")
        return self.daemon

    async def serve(
        self,
        path: Path,
        mode: int,
        group: str = "",
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``path`` (with ``mode``, and ``group`` when given) until
        cancelled; reports started once listening."""
        sock = await _listen(path, mode, group)
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                await self._accept_loop(sock, str(path), tg)
        finally:
            sock.close()
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                await anyio.Path(path).unlink()

    async def _accept_loop(
        self, sock: socketlib.socket, where: str, tg: anyio.abc.TaskGroup
    ) -> None:
        def take(conn: socketlib.socket) -> None:
            if self.clients >= self.max_clients:
                self._turn_away(conn)
                return
            self.clients += 1
            tg.start_soon(self._connection, conn)

        await accept_forever(sock, where, self.accept_failures, take)

    def _turn_away(self, conn: socketlib.socket) -> None:
        """Answer ``busy`` and close, without a task: the reply is far
        smaller than a new socket's buffer, so a non-blocking send takes it."""
        reply = _error(
            "busy",
            f"the daemon is serving {self.clients} control clients, the most it takes; "
            "try again later",
        )
        with conn, contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(_encode(reply))

    async def _connection(self, conn: socketlib.socket) -> None:
        try:
            try:
                conn.setblocking(False)
                stream = await anyio.abc.UNIXSocketStream.from_socket(conn)
            except BaseException:
                conn.close()
                raise
            peer = peer_credentials(conn)
            async with stream:
                if self.submission_only and not self._take_user_place(peer):
                    await self._reply(stream, _error("busy", _user_busy(peer)))
                    return
                try:
                    await self._serve_one(stream, peer)
                finally:
                    self._leave_user_place(peer)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:  # one bad connection must never end the server
            log.exception("control connection failed")
        finally:
            self.clients -= 1

    def _take_user_place(self, peer: PeerCredentials | None) -> bool:
        """On the submission socket: one user (uid; an unknown peer counts
        as one user) holds at most :attr:`max_per_user` connections, so a
        user cannot take every place from the others."""
        uid = None if peer is None else peer.uid
        held = self.clients_by_uid.get(uid, 0)
        if held >= self.max_per_user:
            return False
        self.clients_by_uid[uid] = held + 1
        return True

    def _leave_user_place(self, peer: PeerCredentials | None) -> None:
        if not self.submission_only:
            return
        uid = None if peer is None else peer.uid
        left = self.clients_by_uid.get(uid, 0) - 1
        if left > 0:
            self.clients_by_uid[uid] = left
        else:
            self.clients_by_uid.pop(uid, None)

    async def _serve_one(
        self, stream: anyio.abc.ByteStream, peer: PeerCredentials | None = None
    ) -> None:
        reader = BufferedByteReceiveStream(stream)
        line, refusal = await self._read_line(reader)
        if line is None:
            if refusal is not None:
                await self._reply(stream, refusal)
            return
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as exc:
            await self._reply(stream, _error("invalid", f"not a JSON request: {exc}"))
            return
        if not isinstance(request, dict):
            await self._reply(stream, _error("invalid", "a request is a JSON object"))
            return
        if request.get("v") != PROTOCOL_VERSION:
            await self._reply(
                stream,
                _error("invalid", f"unsupported protocol version {request.get('v')!r}"),
            )
            return
        op = request.get("op")
        if self.submission_only and op not in SUBMISSION_OPERATIONS and _known(op):
            await self._reply(stream, _error("denied", _admin_only(op)))
            return
        if op in ("events", "wait"):
            await self._staying(op, stream, reader, request, peer)
            return
        if op == "status" and request.get("stream") is True:
            await self._status_stream(stream, request)
            return
        if op == "submit":
            reply = await self._submit(reader, request, peer)
        elif isinstance(op, str) and op in OPERATIONS:
            kind, handler = OPERATIONS[op]
            reply = await self._dispatch(op, lambda: handler(self, _params(op, kind, request)))
        else:
            reply = _error("invalid", f"unknown operation {op!r}")
        await self._reply(stream, reply)

    async def _staying(
        self,
        op: str,
        stream: anyio.abc.ByteStream,
        reader: BufferedByteReceiveStream,
        request: dict[str, Any],
        peer: PeerCredentials | None = None,
    ) -> None:
        """``events`` or ``wait``, unless too many places are held so."""
        if self.staying >= self.max_staying:
            text = (
                f"{self.staying} control clients are waiting or streaming events, the most "
                "the daemon takes; try again later"
            )
            await self._reply(stream, _error("busy", text))
            return
        self.staying += 1
        try:
            if op == "events":
                await self._events(stream, reader)
                return
            reply = await self._wait(reader, request, peer)
            if reply is not None:
                await self._reply(stream, reply)
        finally:
            self.staying -= 1

    async def _read_line(
        self, reader: BufferedByteReceiveStream
    ) -> tuple[bytes | None, dict[str, Any] | None]:
        """The request line; or None and the reply to send before hanging
        up (None too when the client left without a request)."""
        with anyio.move_on_after(self.request_timeout):
            try:
                line = await reader.receive_until(b"\n", self.max_request + 1)
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
                return None, None
            except anyio.DelimiterNotFound:
                line = None
            if line is None or len(line) > self.max_request:
                # The rest is never read: hanging up is what bounds the memory.
                return None, _error("invalid", f"request over {format_size(self.max_request)}")
            return line, None
        return None, _error(
            "invalid", f"no request within {self.request_timeout:g} s; disconnected"
        )

    async def _submit(
        self,
        reader: BufferedByteReceiveStream,
        request: dict[str, Any],
        peer: PeerCredentials | None = None,
    ) -> dict[str, Any]:
        try:
            p = _params("submit", _SubmitParams, request)
        except ValueError as exc:
            return _error("invalid", f"submit: {exc}")
        if p.content_length is not msgspec.UNSET and p.content is not msgspec.UNSET:
            return _error("invalid", "submit: give content_length or content, not both")
        limit = self.max_message_size()
        if not isinstance(p.content_length, msgspec.UnsetType):
            length = p.content_length
            if length < 0:
                return _error("invalid", "submit: content_length must be a number of bytes")
            if length > limit:
                return _error("invalid", _too_large(length, limit))  # before reading any of it
            budget = SUBMISSION_CONTENT_BUDGET * limit
            if self.submission_only and self.reading + length > budget:
                return _error(
                    "busy",
                    f"submit: {format_size(self.reading)} of messages are being read already; "
                    "try again later",
                )
            self.reading += length
            try:
                content = await self._read_content(reader, length)
            finally:
                self.reading -= length
            if content is None:
                return _error(
                    "invalid",
                    f"submit: the message ended before its {length} bytes, or paused for "
                    f"{self.request_timeout:g} s",
                )
        else:  # an older client: base64 inside the line
            try:
                encoded = "" if isinstance(p.content, msgspec.UnsetType) else p.content
                content = base64.b64decode(encoded, validate=True)
            except (ValueError, TypeError):
                return _error("invalid", "submit: content must be base64")
            if len(content) > limit:
                return _error("invalid", _too_large(len(content), limit))
        daemon = self.daemon
        if daemon is None:
            return _error("refused", "submit: this control server has no daemon to ask")
        key = p.idempotency_key
        return await self._dispatch(
            "submit",
            lambda: daemon.submit(p.sender, p.recipients, content, idempotency_key=key, peer=peer),
        )

    async def _read_content(self, reader: BufferedByteReceiveStream, length: int) -> bytes | None:
        """Exactly ``length`` bytes, or None if the client stops short or
        pauses longer than the request timeout."""
        chunks: list[bytes] = []
        left = length
        while left:
            with anyio.move_on_after(self.request_timeout):
                try:
                    chunk = await reader.receive(min(left, _READ_CHUNK))
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return None
                chunks.append(chunk)
                left -= len(chunk)
                continue
            return None
        return b"".join(chunks)

    async def _reply(self, stream: anyio.abc.ByteStream, reply: dict[str, Any]) -> None:
        """Send one reply; a client that does not take it within the
        request timeout is dropped (it would hold its place forever)."""
        with (
            anyio.move_on_after(self.request_timeout),
            contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError),
        ):
            await stream.send(_encode(reply))

    async def _status_stream(self, stream: anyio.abc.ByteStream, request: dict[str, Any]) -> None:
        """``status`` with ``stream``: one line per page as it is built,
        ``{"ok": true, "page": [...]}``, then ``{"ok": true, "result":
        {"listed": N, "next_after": ID or null}}``. The loop is given back
        after each page (and the send waits for a slow reader: nothing
        piles up here); a reader that takes no page for the request timeout,
        or hangs up, ends the listing."""
        made: dict[str, Any] = await self._dispatch(
            "status", lambda: _listing(self, _params("status", _StatusParams, request))
        )
        if not made.get("ok"):
            await self._reply(stream, made)
            return
        listing, render = made["result"]
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            while not listing.done:
                with gc_paused():  # many small objects, no cycles: see gc_paused
                    items = [render(item) for item in listing.page()]
                    line = _RAW_PAGE_HEAD + _ENCODER.encode(items)[1:] + b"}\n"
                if items:
                    with anyio.move_on_after(self.request_timeout) as waited:
                        await stream.send(line)
                    if waited.cancelled_caught:
                        return  # a reader that stopped reading holds its place no longer
                await anyio.lowlevel.checkpoint()
            end = {"listed": listing.listed, "next_after": listing.next_after}
            await self._reply(stream, {"ok": True, "result": end})

    async def _events(
        self, stream: anyio.abc.ByteStream, reader: BufferedByteReceiveStream
    ) -> None:
        """Stream events until the client hangs up: noticed at once (not at
        the next event), so a gone subscriber frees its place at once."""
        async with self.spool.events() as events, anyio.create_task_group() as tg:

            async def until_hung_up() -> None:
                with contextlib.suppress(
                    anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError
                ):
                    while True:
                        await reader.receive()  # nothing more is expected: dropped
                tg.cancel_scope.cancel()

            tg.start_soon(until_hung_up)
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                async for event in events:
                    await stream.send(_encode({"ok": True, "event": event.to_dict()}))
            tg.cancel_scope.cancel()

    async def _wait(
        self,
        reader: BufferedByteReceiveStream,
        request: dict[str, Any],
        peer: PeerCredentials | None = None,
    ) -> dict[str, Any] | None:
        """``wait``: the reply once the message has an outcome; None if the
        client hung up first (that ends the wait at once). On the
        submission socket, only for a message the same user submitted."""
        try:
            p = _params("wait", _WaitParams, request)
        except ValueError as exc:
            return _error("invalid", f"wait: {exc}")
        if p.timeout is not None and not 0 <= p.timeout < math.inf:
            return _error("invalid", "wait: timeout must be a number of seconds, or null")
        if self.submission_only:
            if peer is None:  # who asks is unknown: nothing is told
                return _error("denied", "wait: the daemon cannot tell who is asking")
            uid = peer.uid
            checked = await self._dispatch("wait", lambda: self._not_theirs(p.id, uid))
            refusal: dict[str, Any] | None = checked["result"] if checked.get("ok") else checked
            if refusal is not None:
                return refusal
        reply: dict[str, Any] | None = None
        async with anyio.create_task_group() as tg:

            async def until_hung_up() -> None:
                with contextlib.suppress(
                    anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError
                ):
                    while True:
                        await reader.receive()  # nothing more is expected: dropped
                tg.cancel_scope.cancel()

            async def answer() -> None:
                nonlocal reply
                reply = await self._dispatch("wait", lambda: self._outcome(p.id, p.timeout))
                tg.cancel_scope.cancel()

            tg.start_soon(until_hung_up)
            tg.start_soon(answer)
        return reply

    async def _not_theirs(self, message_id: str, uid: int) -> dict[str, Any] | None:
        """The reply for a ``wait`` on a message that ``uid`` did not submit
        (as for one that does not exist: nothing is told of it), or None."""
        submitter: int | None = None
        try:
            found = await self.spool.describe(message_id)
        except NotFoundError:
            outcome = await self.spool.find_outcome(message_id)
            submitter = outcome.submitter_uid if outcome is not None else None
        else:
            submitter = found.submitter_uid if isinstance(found, Message) else None
        if submitter == uid:
            return None
        return _error("not_found", f"{message_id}: no message of this user (uid {uid}) by that id")

    async def _outcome(self, message_id: str, seconds: float | None) -> dict[str, Any]:
        return outcome_view(await self.spool.wait(message_id, seconds))

    async def _dispatch(self, op: object, call: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
        try:
            result = await call()
        except (InvalidIdError, AddressError) as exc:
            return _error("invalid", str(exc))
        except NotFoundError as exc:
            return _error("not_found", str(exc))
        except OperationRefusedError as exc:
            return _error("refused", str(exc))
        except SpoolClosedError as exc:
            return _error("closed", str(exc))
        except WaitTimeoutError as exc:
            return _error("timeout", str(exc))
        except StoreError as exc:
            return _error("temporary", f"{op}: {exc}")
        except MxError as exc:
            return _error("invalid" if exc.permanent else "temporary", str(exc))
        except (ValueError, TypeError, KeyError) as exc:
            return _error("invalid", f"{op}: {exc}")
        except SpooldError as exc:
            return _error("internal", str(exc))
        except Exception as exc:
            log.exception("control request failed", op=op)
            return _error("internal", f"{op}: {exc!r}")
        return {"ok": True, "result": result}


SUBMISSION_CONTENT_BUDGET = 4
"""On the submission socket, the messages being read at once may add up to
this many times the submit size limit (the rest are answered ``busy``)."""


def _user_busy(peer: PeerCredentials | None) -> str:
    who = "this user" if peer is None else f"uid {peer.uid}"
    return (
        f"{who} already has as many connections to the submission socket as one user may; "
        "try again later"
    )


def _error(kind: ControlErrorKind, text: str) -> dict[str, Any]:
    return {"ok": False, "kind": kind, "error": text}


def _known(op: object) -> bool:
    return isinstance(op, str) and (op in OPERATIONS or op in ("submit", "events", "wait"))


def _admin_only(op: object) -> str:
    allowed = ", ".join(sorted(SUBMISSION_OPERATIONS))
    return (
        f"{op} is an admin operation and this is the submission socket (it takes {allowed}); "
        "use the admin socket (control.socket) as its owner or a member of its group, "
        "or ask an administrator"
    )


async def _listen(path: Path, mode: int, group: str = "") -> socketlib.socket:
    """A listening, non-blocking Unix socket at ``path`` with ``mode`` (and
    ``group``, a group name, when given)."""

    def prepare() -> None:
        directory = path.parent
        st = directory.stat()
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise SpooldError(
                f"control socket directory {directory} is writable by anyone and not sticky"
            )
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise SpooldError(f"{path} exists and is not a socket")
            probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # a stale socket of a daemon that is gone
            else:
                raise SpooldError(f"another daemon is answering on {path}")
            finally:
                probe.close()

    await anyio.to_thread.run_sync(prepare)
    sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        # Mode and group are set before listen(): until then nobody can
        # connect, whatever the file's mode (no process-wide umask change,
        # which would race with files other threads create meanwhile).
        sock.bind(str(path))
        await anyio.to_thread.run_sync(os.chmod, path, mode)
        if group:
            await anyio.to_thread.run_sync(_give_to_group, path, group)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _give_to_group(path: Path, group: str) -> None:
    import grp

    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise SpooldError(f"{path}: no group named {group!r} on this system") from None
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        raise SpooldError(
            f"cannot give {path} to group {group!r}: the daemon's user must be a member "
            f"of it (usermod -aG {group} USER) or root"
        ) from None


def _unreachable(path: Path, exc: OSError) -> ControlError:
    """The client's error for a socket it cannot connect to: ``denied`` when
    the socket's permissions keep this user out, else ``unavailable``."""
    if isinstance(exc, FileNotFoundError):
        return ControlError(f"no daemon: control socket {path} does not exist", "unavailable")
    if isinstance(exc, PermissionError):
        return ControlError(
            f"cannot reach the daemon at {path}: permission denied (this user may not use "
            "that socket)",
            "denied",
        )
    return ControlError(f"cannot reach the daemon at {path}: {exc.strerror or exc}", "unavailable")


class ControlClient:
    """Talks to a daemon's control socket (one connection per request)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    async def _connect(self) -> anyio.abc.SocketStream:
        try:
            return await anyio.connect_unix(self.path)
        except OSError as exc:
            raise _unreachable(self.path, exc) from None

    async def request(self, op: str, **params: Any) -> Any:
        """Send one request; return its result or raise :class:`ControlError`."""
        return await self._exchange({"v": PROTOCOL_VERSION, "op": op, **params})

    async def submit(
        self,
        sender: str,
        recipients: Sequence[str],
        content: bytes,
        idempotency_key: str | None = None,
    ) -> list[str]:
        """Hand one message to the daemon (``spoold sendmail``); return the
        ids of the messages spooled (with an ``idempotency_key`` seen
        before: the first submission's). The content follows the request
        line as raw bytes (``content_length``), never inside the JSON."""
        request: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "op": "submit",
            "sender": sender,
            "recipients": list(recipients),
            "content_length": len(content),
        }
        if idempotency_key is not None:
            request["idempotency_key"] = idempotency_key
        ids = await self._exchange(request, content)
        return [str(i) for i in ids]

    async def _exchange(self, request: dict[str, Any], content: bytes = b"") -> Any:
        with anyio.fail_after(self.timeout):
            stream = await self._connect()
            async with stream:
                # A daemon that refuses before reading everything (a message
                # over its limit) answers and hangs up: its reply says why.
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await stream.send(_encode(request))
                    if content:
                        await stream.send(content)
                reader = BufferedByteReceiveStream(stream)
                try:
                    line = await reader.receive_until(b"\n", 1 << 30)
                except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
                    raise ControlError("the daemon closed the connection", "internal") from None
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "unknown error"), _reply_kind(reply))
        return reply.get("result")

    async def status_pages(self, raw: bool = False, **params: Any) -> AsyncIterator[list[Any]]:
        """``status`` in pages (``stream``): yield each page (listing
        objects, or ids with ``only_ids``) as it arrives, so a large queue
        is never held whole on either side. ``params`` are those of
        ``status`` (``queue``, ``after``, ``limit``, filters). With ``raw``,
        each listing object comes as its JSON text, undecoded (``bytes``,
        UTF-8, compact). Raises :class:`ControlError` for an error reply, or
        when the daemon hangs up before the last line."""
        request = {"v": PROTOCOL_VERSION, "op": "status", **params, "stream": True}
        stream = await self._connect()
        async with stream:
            with anyio.fail_after(self.timeout):
                await stream.send(_encode(request))
            reader = BufferedByteReceiveStream(stream)
            first = True
            while True:
                try:
                    with anyio.fail_after(self.timeout):
                        line = await reader.receive_until(b"\n", 1 << 30)
                except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
                    raise ControlError(
                        "the daemon closed the connection before the end of the listing",
                        "internal",
                    ) from None
                if raw and line.startswith(_RAW_PAGE_HEAD):  # as the server writes it
                    yield [bytes(v) for v in _RAW_PAGE.decode(line[len(_RAW_PAGE_HEAD) - 1 : -1])]
                    continue
                reply = _DECODER.decode(line)
                if not reply.get("ok"):
                    error = str(reply.get("error", "unknown error"))
                    if first and _older_daemon(reply, params):
                        break  # asked again below, the way it understands
                    raise ControlError(error, _reply_kind(reply))
                first = False
                if "page" not in reply:
                    return
                yield reply["page"]
        # A daemon from before paged listings (not restarted since an
        # upgrade): the whole listing in one reply, handed on as one page.
        views = await self.request("status", **params)
        yield [_encode(v)[:-1] for v in views] if raw else views

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Yield event dicts until the daemon goes away."""
        stream = await self._connect()
        async with stream:
            await stream.send(_encode({"v": PROTOCOL_VERSION, "op": "events"}))
            reader = BufferedByteReceiveStream(stream)
            while True:
                try:
                    line = await reader.receive_until(b"\n", 1 << 24)
                except (anyio.IncompleteRead, anyio.EndOfStream):
                    return
                reply = json.loads(line)
                if not reply.get("ok"):
                    raise ControlError(reply.get("error", "?"), _reply_kind(reply))
                yield reply["event"]
