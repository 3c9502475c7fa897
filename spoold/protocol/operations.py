"""The operations of the control protocol: each one's request and result.

A request is one JSON object on one line: ``"v"`` (the protocol version),
``"op"`` (the operation) and the operation's parameters. Each operation's
parameters are declared here once, as a :class:`Request` tagged with its
``op`` (a tagged union on the wire, as msgspec writes one), and its result
in :data:`RESULTS`. The daemon decodes a request's parameters into its
class, which refuses an unknown or ill-typed field naming it; the clients
build the same classes and encode them with :func:`encode_request`.

Defaults are left out of an encoded request: a daemon from before a
parameter was added refuses the parameter's name, so a client says only
what differs from the default (``check`` without ``quick``, ``status``
without ``stream``).

``submit`` and ``events`` have a framing of their own (the message's bytes
after the line; a stream of events), and ``status`` with ``stream`` answers
in pages: see :mod:`spoold.protocol.framing`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, TypeVar, get_args, get_origin

import msgspec

from spoold.protocol.views import (
    DepartedView,
    EventView,
    HistoryView,
    MessageView,
    OutcomeView,
    RetryPlanView,
    SuppressionListView,
    SuppressionView,
    UnreadableView,
    View,
)

__all__ = [
    "PROTOCOL_VERSION",
    "SUBMISSION_OPERATIONS",
    "QueueChoice",
    "SendChoice",
    "RerouteChoice",
    "RecoverSource",
    "Request",
    "PingRequest",
    "StatusRequest",
    "CountRequest",
    "ShowRequest",
    "RetryPlanRequest",
    "HistoryRequest",
    "FreezeRequest",
    "SendRequest",
    "RemoveRequest",
    "RecoverRequest",
    "RerouteRequest",
    "CheckRequest",
    "InfoRequest",
    "FleetStatusRequest",
    "FleetStatus",
    "FleetNodeView",
    "ReloadRequest",
    "SubmitRequest",
    "WaitRequest",
    "EventsRequest",
    "SuppressListRequest",
    "SuppressAddRequest",
    "SuppressRemoveRequest",
    "WebhooksRequest",
    "REQUESTS",
    "Counts",
    "StatusEnd",
    "Info",
    "ReloadResult",
    "WebhookStatus",
    "RESULTS",
    "op_of",
    "encode_request",
    "encode_operation",
    "decode_params",
]

PROTOCOL_VERSION = 1

QueueChoice = Literal["all", "active", "frozen", "quarantine"]
"""``status``'s queues (``all``: active and frozen)."""
SendChoice = Literal["ids", "all", "frozen_only"]
RerouteChoice = Literal["ids", "all"]
RecoverSource = Literal["removed", "quarantine"]

# What the submission socket serves; every other operation is for the admin socket.
SUBMISSION_OPERATIONS: frozenset[str] = frozenset({"submit", "wait", "ping"})


class Request(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, omit_defaults=True):
    """The parameters of one operation (``op`` is the class's tag)."""


class PingRequest(Request, tag="ping"):
    pass


class StatusRequest(Request, tag="status"):
    queue: QueueChoice = "all"
    only_ids: bool = False  # the ids alone, sorted (no listing object is built)
    stream: bool = False  # pages as they are built, then a last line (a large queue)
    after: str | None = None  # list the ids after this one (a cursor)
    limit: int | None = None  # at most this many
    domain: str | None = None  # a recipient still to deliver is in this domain
    older_than: str | None = None  # a span: at least this old (by spool date)
    newer_than: str | None = None  # a span: younger than this
    error: str | None = None  # the last error contains this text (any case)

    def narrows(self) -> bool:
        """Whether a filter or a cursor is given (a daemon from before
        paged listings can give only the whole queue)."""
        return any(
            v is not None
            for v in (
                self.after,
                self.limit,
                self.domain,
                self.older_than,
                self.newer_than,
                self.error,
            )
        )


class CountRequest(Request, tag="count"):
    pass


class ShowRequest(Request, tag="show"):
    id: str
    body: bool = False  # also the message, base64 in "body"


class RetryPlanRequest(Request, tag="retry_plan"):
    id: str


class HistoryRequest(Request, tag="history"):
    since: str | None = None  # a span back from now
    recipient: str | None = None


class FreezeRequest(Request, tag="freeze"):
    ids: list[str]


class SendRequest(Request, tag="send"):
    which: SendChoice = "ids"
    ids: list[str] = []
    retry_intervals: list[str] = []  # spans, put first


class RemoveRequest(Request, tag="remove"):
    ids: list[str]


class RecoverRequest(Request, tag="recover"):
    ids: list[str]
    source: RecoverSource = msgspec.field(name="from")


class RerouteRequest(Request, tag="reroute"):
    which: RerouteChoice = "ids"
    ids: list[str] = []


class CheckRequest(Request, tag="check"):
    max_age: float = 3600.0
    quick: bool = False  # bodies by size only, no checksums


class InfoRequest(Request, tag="info"):
    pass


class ReloadRequest(Request, tag="reload"):
    pass


class WebhooksRequest(Request, tag="webhooks"):
    pass


class FleetStatusRequest(Request, tag="fleet_status"):
    pass


class SubmitRequest(Request, tag="submit"):
    sender: str
    recipients: list[str]
    content_length: int | msgspec.UnsetType = msgspec.UNSET  # the message follows, raw
    content: str | msgspec.UnsetType = msgspec.UNSET  # or (older clients) base64 in the line
    idempotency_key: str | None = None


class WaitRequest(Request, tag="wait"):
    id: str
    timeout: float | None = None  # seconds; None: no limit


class EventsRequest(Request, tag="events"):
    pass


class SuppressListRequest(Request, tag="suppress_list"):
    addresses: list[str] = []  # only these (the ones suppressed); empty: every entry


class SuppressAddRequest(Request, tag="suppress_add"):
    addresses: list[str]
    span: str | None = msgspec.field(default=None, name="for")  # None: the daemon's default
    reason: str = ""


class SuppressRemoveRequest(Request, tag="suppress_remove"):
    addresses: list[str] = []  # these; or, empty, every entry of `source`
    source: Literal["bounce", "operator"] | None = None  # every entry it made
    since: str | None = None  # with source: only those made in the last SPAN


def op_of(kind: type[Request] | Request) -> str:
    """The ``op`` of a request class (or of a request)."""
    tag = kind.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


REQUESTS: dict[str, type[Request]] = {
    op_of(kind): kind
    for kind in (
        PingRequest,
        StatusRequest,
        CountRequest,
        ShowRequest,
        RetryPlanRequest,
        HistoryRequest,
        FreezeRequest,
        SendRequest,
        RemoveRequest,
        RecoverRequest,
        RerouteRequest,
        CheckRequest,
        InfoRequest,
        ReloadRequest,
        WebhooksRequest,
        SubmitRequest,
        WaitRequest,
        EventsRequest,
        SuppressListRequest,
        SuppressAddRequest,
        SuppressRemoveRequest,
        FleetStatusRequest,
    )
}
"""Every operation by name."""


def encode_request(request: Request) -> bytes:
    """The request line: ``{"v":1,"op":...,PARAMS}`` and its newline,
    compact, non-ASCII written as ``\\u`` escapes, defaults left out."""
    params = msgspec.to_builtins(request)
    return encode_operation(params.pop("op"), params)


def encode_operation(op: str, params: dict[str, Any]) -> bytes:
    """The request line of operation ``op`` with ``params`` as they are
    (unchecked: for a client that asks by name)."""
    line = {"v": PROTOCOL_VERSION, "op": op, **params}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


_R = TypeVar("_R", bound=Request)


def decode_params(kind: type[_R], request: dict[str, Any]) -> _R:
    """A request object (as JSON gives it, ``v`` and ``op`` included) as
    its operation's class; ``ValueError`` naming the field that is unknown,
    missing or ill-typed (for a closed choice, the choices)."""
    fields = {k: v for k, v in request.items() if k not in ("v", "op")}
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as exc:
        raise ValueError(_explain(kind, fields, str(exc))) from None


def _explain(kind: type[Request], fields: dict[str, Any], text: str) -> str:
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


# ------------------------------------------------------------ results


class Counts(View):
    """The ``count`` result: messages per queue, and of active those being sent."""

    active: int
    frozen: int
    sending: int
    removed: int
    quarantine: int


class StatusEnd(View):
    """The last line of a paged ``status``: how many were listed, and the
    id to give as ``after`` to go on when ``limit`` ended the listing."""

    listed: int
    next_after: str | None


class Info(View):
    """The ``info`` result: what the daemon runs with."""

    pid: int
    config: str
    spool_dir: str
    max_concurrent_send_jobs: int
    routes: list[str]
    control_socket: str
    submission_socket: str
    log_level: str


class ReloadResult(View):
    """The ``reload`` result: applied (and the settings that need a
    restart), or refused (and why)."""

    applied: bool
    restart_needed: list[str] | msgspec.UnsetType = msgspec.UNSET
    errors: list[str] | msgspec.UnsetType = msgspec.UNSET


class WebhookStatus(View):
    """One webhook in the ``webhooks`` result (``spoold status --webhooks``);
    times RFC 3339 UTC, null when there is none."""

    name: str
    url: str
    outbox: int  # events waiting
    dropped: int  # events dropped (the outbox was full) since start
    up: bool  # the last post was answered 2xx (or none failed yet)
    posted: int
    failures: int
    last_success: str | None
    last_error: str | None
    last_error_time: str | None
    next_retry: str | None
    rejected: int = 0  # events set aside in rejected/ (never posted) since start


class FleetNodeView(View):
    """One node of a ``fleet_status``: its name, its last heartbeat (POSIX
    time) and its queue counts then."""

    node: str
    heartbeat: float
    queues: dict[str, int]


class FleetStatus(View):
    """The ``fleet_status`` result. Without ``[fleet]``: ``enabled`` false
    and the rest empty. ``nodes`` is None when Redis did not answer."""

    enabled: bool
    node: str
    redis: str  # the URL, without any password
    redis_up: bool
    outages: int  # times this node found Redis down since it started
    last_error: str
    slots: dict[str, int]  # fleet-wide connection slots this node holds now, by route
    nodes: list[FleetNodeView] | None


_Ids = list[str]

RESULTS: dict[str, tuple[Any, ...]] = {
    "ping": (Literal["pong"],),
    "status": (list[MessageView], list[UnreadableView], list[str]),  # list[str]: only_ids
    "count": (Counts,),
    "show": (MessageView, UnreadableView, DepartedView),
    "retry_plan": (RetryPlanView,),
    "history": (list[HistoryView],),
    "freeze": (None,),
    "send": (_Ids,),
    "remove": (None,),
    "recover": (None,),
    "reroute": (_Ids,),
    "check": (list[str],),  # one problem a line: KIND: ID: DETAIL (PATH)
    "info": (Info,),
    "reload": (ReloadResult,),
    "webhooks": (list[WebhookStatus],),
    "submit": (_Ids,),
    "wait": (OutcomeView,),
    "events": (EventView,),  # each line's "event", not a "result"
    "suppress_list": (SuppressionListView,),
    "suppress_add": (list[SuppressionView],),  # the entries made
    "suppress_remove": (list[str],),  # the addresses that were suppressed
    "fleet_status": (FleetStatus,),
}
"""Each operation's result: one of these types (decode with
:func:`msgspec.convert`). ``status`` with ``stream`` sends pages of its
listing, then a :class:`StatusEnd`."""
