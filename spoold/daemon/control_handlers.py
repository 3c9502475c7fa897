"""The control operations, bound: what the daemon does for each request.

:data:`HANDLERS` binds each request class of :mod:`spoold.protocol`
(those answered with one reply line) to a handler that calls the spool,
or the daemon for the operations it adds (``reload``, ``info``, ``webhooks``, ``count``,
``check``, ``fleet_status``; ``submit`` too, served by the server for its framing).
:func:`answer` runs a handler and turns its outcome into the reply: the
result, or the error kind its exception means (an exception nobody
expected is logged and answered ``internal``; nothing here ends the
server).

The operations that change messages (``freeze``, ``send``, ``remove``,
``recover``, ``reroute``) take effect on disk before the reply; the spool
checks every id of a list first and changes nothing when one is refused.
``status`` is built a page at a time from a snapshot of the ids
(:func:`listing`), the event loop given back between two pages.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec
import structlog

from spoold.address import validate_address
from spoold.daemon.control_socket import PeerCredentials
from spoold.errors import (
    AddressError,
    InvalidIdError,
    MxError,
    NotFoundError,
    OperationRefusedError,
    RecipientSuppressedError,
    SpoolClosedError,
    SpooldError,
    StoreError,
    WaitTimeoutError,
)
from spoold.ids import validate_id
from spoold.listing import ID_PAGE_SIZE, Listing, ListingFilter
from spoold.message import Message, Queue, RetryInterval, gc_paused
from spoold.ondisk import Unreadable
from spoold.protocol import (
    CheckRequest,
    CountRequest,
    Encoded,
    FleetStatusRequest,
    FreezeRequest,
    HistoryRequest,
    InfoRequest,
    PingRequest,
    RecoverRequest,
    ReloadRequest,
    RemoveRequest,
    Request,
    RerouteRequest,
    RetryPlanRequest,
    SendRequest,
    ShowRequest,
    StatusRequest,
    SuppressAddRequest,
    SuppressListRequest,
    SuppressRemoveRequest,
    WebhooksRequest,
    departed_view,
    describe_view,
    error_reply,
    history_view,
    listing_view,
    ok_reply,
    op_of,
    retry_plan_view,
    suppression_view,
)
from spoold.spool import Spool
from spoold.suppression import DEFAULT_OPERATOR_SPAN, Suppression
from spoold.times import parse_span

__all__ = [
    "DaemonOperations",
    "ControlContext",
    "Handler",
    "HANDLERS",
    "OPERATIONS",
    "listing",
    "answer",
]

log = structlog.get_logger("spoold.daemon.control")

_ENCODER = msgspec.json.Encoder()


class DaemonOperations(Protocol):
    """What the daemon adds to the spool's own operations (the
    :class:`~spoold.daemon.main.Daemon` is one)."""

    async def reload(self) -> dict[str, Any]: ...

    async def info(self) -> dict[str, Any]: ...

    async def webhooks(self) -> list[dict[str, Any]]: ...

    async def fleet_status(self) -> dict[str, Any]: ...

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


class ControlContext(Protocol):
    """What a handler is given: the spool, and the daemon to ask (the
    :class:`~spoold.daemon.control_server.ControlServer` is one)."""

    @property
    def spool(self) -> Spool: ...

    def daemon_operations(self) -> DaemonOperations: ...


def _require_ids(ids: list[str]) -> list[str]:
    if not ids:
        raise InvalidIdError("expected 'ids': a non-empty list of message ids")
    return ids


async def _ping(ctx: ControlContext, p: PingRequest) -> Any:
    return "pong"


def _listing_filter(p: StatusRequest) -> ListingFilter:
    return ListingFilter(
        domain=p.domain,
        older_than=None if p.older_than is None else parse_span(p.older_than),
        newer_than=None if p.newer_than is None else parse_span(p.newer_than),
        error=p.error,
    )


async def listing(
    ctx: ControlContext, p: StatusRequest
) -> tuple[Listing[Any], Callable[[Any], Any]]:
    """The walk over what ``status`` lists (a snapshot of the ids, taken
    now) and how each item is shown: its listing object, or its id."""
    wanted = _listing_filter(p)
    if p.after is not None:
        validate_id(p.after)
    spool = ctx.spool
    now = spool.clock.now()
    render: Callable[[Any], Any]
    if p.queue == "quarantine":
        readable, unreadable = await spool.quarantined()
        found: dict[str, Message | Unreadable] = {m.id: m for m in readable}
        found.update((u.id, u) for u in unreadable)
        render = (lambda item: item.id) if p.only_ids else describe_view
        walk: Listing[Any] = Listing(
            sorted(found),
            found.get,
            lambda item: wanted.keeps(item, now),
            after=p.after,
            limit=p.limit,
        )
        return walk, render
    ids = spool.status_ids(None if p.queue == "all" else Queue(p.queue))
    if p.only_ids and not wanted.narrows:  # nothing to look at but the ids
        walk = Listing(
            ids,
            lambda mid: mid,
            lambda _: True,
            after=p.after,
            limit=p.limit,
            page_size=ID_PAGE_SIZE,
            scan_limit=ID_PAGE_SIZE,
        )
        return walk, lambda mid: mid
    # Each page is looked up, filtered and shown with no pause between:
    # the spool's own records are read, never kept, never changed.
    walk = Listing(
        ids,
        lambda mid: spool.peek(mid, now),
        lambda seen: wanted.keeps(seen[0], now),
        after=p.after,
        limit=p.limit,
    )
    if p.only_ids:
        return walk, lambda seen: seen[0].id
    return walk, listing_view


async def _status(ctx: ControlContext, p: StatusRequest) -> Any:
    """``status`` in one reply (the form older clients ask for). Built
    page by page all the same, with a pause for the event loop between two
    pages, and each page encoded as it is built."""
    walk, render = await listing(ctx, p)
    parts: list[bytes] = []
    while not walk.done:
        with gc_paused():  # many small objects, no cycles: see gc_paused
            parts += [_ENCODER.encode(render(item)) for item in walk.page()]
        await anyio.lowlevel.checkpoint()
    return Encoded(b"[" + b",".join(parts) + b"]")


async def _freeze(ctx: ControlContext, p: FreezeRequest) -> Any:
    await ctx.spool.freeze(_require_ids(p.ids))


async def _send(ctx: ControlContext, p: SendRequest) -> Any:
    intervals = RetryInterval.from_spans([parse_span(s) for s in p.retry_intervals], 0.0)
    if p.which == "ids":
        return await ctx.spool.send(_require_ids(p.ids), retry_intervals=intervals)
    return await ctx.spool.send(which=p.which, retry_intervals=intervals)


async def _remove(ctx: ControlContext, p: RemoveRequest) -> Any:
    await ctx.spool.remove(_require_ids(p.ids))


async def _reroute(ctx: ControlContext, p: RerouteRequest) -> Any:
    if p.which == "ids":
        return await ctx.spool.reroute(_require_ids(p.ids))
    return await ctx.spool.reroute(which="all")


async def _recover(ctx: ControlContext, p: RecoverRequest) -> Any:
    await ctx.spool.recover(_require_ids(p.ids), from_=p.source)


async def _show(ctx: ControlContext, p: ShowRequest) -> Any:
    spool = ctx.spool
    try:
        found = await spool.describe(p.id)
    except NotFoundError:
        outcome = await spool.find_outcome(p.id)
        if outcome is None:
            raise
        if p.body:
            raise NotFoundError(
                f"{outcome.id}: {outcome.outcome.value}; its body is gone"
            ) from None
        return departed_view(outcome)
    view = describe_view(found)
    if p.body:
        body = await spool.ondisk.read_body(found.id)
        view["body"] = base64.b64encode(body.content()).decode()
    return view


async def _retry_plan(ctx: ControlContext, p: RetryPlanRequest) -> Any:
    return retry_plan_view(ctx.spool.retry_plan(p.id))


async def _history(ctx: ControlContext, p: HistoryRequest) -> Any:
    spool = ctx.spool
    since = None
    if p.since is not None:
        since = spool.clock.now() - parse_span(p.since)
    if p.recipient is not None:
        validate_address(p.recipient, role="recipient", smtputf8=True)
    found = await spool.history(since=since, recipient=p.recipient)
    views = [history_view(o) for o in found]
    for view in views:
        for rcpt in view["recipients"]:
            if "rerouted_to" in rcpt:
                rcpt["rerouted_state"] = await _state_now(spool, rcpt["rerouted_to"])
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


def _addresses(addresses: list[str]) -> list[str]:
    if not addresses:
        raise ValueError("expected 'addresses': a non-empty list of addresses")
    for address in addresses:
        validate_address(address, role="recipient", smtputf8=True)
    return addresses


async def _suppress_list(ctx: ControlContext, p: SuppressListRequest) -> Any:
    """The list, or the entries of some addresses. A whole list (100,000
    entries are some 20 MB of JSON) is sorted, shown and encoded in a
    worker thread from a copy of the references (the entries are frozen),
    so the daemon's loop is not held up by a large list."""
    spool = ctx.spool
    listed = spool.suppressions
    now = spool.clock.now()
    head = {
        "total": listed.in_force(now),
        "max_suppressed": spool.settings.max_suppressed,
        "counts": dict(listed.counts),
    }
    if p.addresses:
        entries = spool.suppressed(_addresses(p.addresses))
        return {"entries": [suppression_view(e) for e in entries], **head}
    return await anyio.to_thread.run_sync(_encoded_list, listed.snapshot(), now, head)


def _encoded_list(entries: list[Suppression], now: datetime, head: dict[str, Any]) -> Encoded:
    """The ``suppress_list`` result for ``entries`` (in force at ``now``,
    by address), encoded (a worker thread)."""
    shown = sorted((e for e in entries if e.until > now), key=lambda e: e.address)
    views = [suppression_view(e) for e in shown]
    return Encoded(msgspec.json.encode({"entries": views, **head}))


async def _suppress_add(ctx: ControlContext, p: SuppressAddRequest) -> Any:
    spool = ctx.spool
    if p.span is not None:
        span = parse_span(p.span)
    else:
        span = spool.settings.suppress_after_hard_bounce or DEFAULT_OPERATOR_SPAN
    added = await spool.suppress(_addresses(p.addresses), for_=span, reason=p.reason)
    log.info(
        "suppressed by an operator",
        addresses=[e.address for e in added],
        until=added[0].until if added else None,
        reason=p.reason,
    )
    return [suppression_view(e) for e in added]


async def _suppress_remove(ctx: ControlContext, p: SuppressRemoveRequest) -> Any:
    if p.source is None:
        if p.since is not None:
            raise ValueError("'since' goes with 'source'")
        if not p.addresses:
            raise ValueError("expected 'addresses': a non-empty list of addresses")
        lifted = await ctx.spool.unsuppress(p.addresses)  # checks those it does not hold
    else:
        if p.addresses:
            raise ValueError("give 'addresses' or 'source', not both")
        within = parse_span(p.since) if p.since is not None else None
        lifted = await ctx.spool.unsuppress_source(p.source, within=within)
    log.info(
        "suppression lifted by an operator",
        addresses=lifted[:100],
        lifted=len(lifted),
        source=p.source,
        since=p.since,
    )
    return lifted


async def _reload(ctx: ControlContext, p: ReloadRequest) -> Any:
    return await ctx.daemon_operations().reload()


async def _info(ctx: ControlContext, p: InfoRequest) -> Any:
    return await ctx.daemon_operations().info()


async def _webhooks(ctx: ControlContext, p: WebhooksRequest) -> Any:
    return await ctx.daemon_operations().webhooks()


async def _fleet_status(ctx: ControlContext, p: FleetStatusRequest) -> Any:
    return await ctx.daemon_operations().fleet_status()


async def _count(ctx: ControlContext, p: CountRequest) -> Any:
    return await ctx.daemon_operations().count()


async def _check(ctx: ControlContext, p: CheckRequest) -> Any:
    return await ctx.daemon_operations().check(p.max_age, p.quick)


Handler = Callable[[ControlContext, Any], Awaitable[Any]]

HANDLERS: dict[type[Request], Handler] = {
    PingRequest: _ping,
    StatusRequest: _status,
    FreezeRequest: _freeze,
    SendRequest: _send,
    RemoveRequest: _remove,
    RerouteRequest: _reroute,
    RecoverRequest: _recover,
    ShowRequest: _show,
    RetryPlanRequest: _retry_plan,
    HistoryRequest: _history,
    ReloadRequest: _reload,
    InfoRequest: _info,
    WebhooksRequest: _webhooks,
    CountRequest: _count,
    CheckRequest: _check,
    SuppressListRequest: _suppress_list,
    SuppressAddRequest: _suppress_add,
    SuppressRemoveRequest: _suppress_remove,
    FleetStatusRequest: _fleet_status,
    # and three with a framing of their own, served by ControlServer itself:
    # SubmitRequest (then the message), EventsRequest (a stream) and
    # WaitRequest (it stays until an outcome, or the client hangs up)
}
"""The operations answered with one reply line, by request class."""

OPERATIONS: dict[str, tuple[type[Request], Handler]] = {
    op_of(kind): (kind, handler) for kind, handler in HANDLERS.items()
}
"""The same, by operation name."""


async def answer(op: object, call: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    """The reply to one request: ``call``'s result, or the error kind its
    exception means."""
    try:
        result = await call()
    except RecipientSuppressedError as exc:
        return error_reply("suppressed", str(exc))
    except (InvalidIdError, AddressError) as exc:
        return error_reply("invalid", str(exc))
    except NotFoundError as exc:
        return error_reply("not_found", str(exc))
    except OperationRefusedError as exc:
        return error_reply("refused", str(exc))
    except SpoolClosedError as exc:
        return error_reply("closed", str(exc))
    except WaitTimeoutError as exc:
        return error_reply("timeout", str(exc))
    except StoreError as exc:
        return error_reply("temporary", f"{op}: {exc}")
    except MxError as exc:
        return error_reply("invalid" if exc.permanent else "temporary", str(exc))
    except (ValueError, TypeError, KeyError) as exc:
        return error_reply("invalid", f"{op}: {exc}")
    except SpooldError as exc:
        return error_reply("internal", str(exc))
    except Exception as exc:
        log.exception("control request failed", op=op)
        return error_reply("internal", f"{op}: {exc!r}")
    return ok_reply(result)
