"""The control socket: a JSON-lines protocol over a Unix socket.

One request per connection, one JSON object per line::

    -> {"v": 1, "op": "freeze", "ids": ["8Dq..."]}
    <- {"ok": true, "result": null}
    <- {"ok": false, "kind": "refused", "error": "cannot remove 8Dq...: ..."}

``kind`` is ``invalid`` (a bad request or id), ``not_found``, ``refused``
(the operation is not allowed for the message's status), ``closed`` (the
daemon is stopping), ``temporary`` (try again later: a disk error, a DNS
timeout) or ``internal``. ``events`` answers with one
``{"ok": true, "event": {...}}`` line per event until the client hangs up.

Operations mirror the Python API of :class:`~spoold.spool.Spool`:
``status`` (``queue``: all|active|frozen|quarantine; a quarantined record
that cannot be read is listed with ``unreadable: true`` and its reason),
``count``, ``freeze``, ``send``
(``ids`` or ``which``: all|frozen_only, ``retry_intervals``: spans),
``remove``, ``reroute`` (``ids`` or ``which``: all), ``recover`` (``from``:
removed|quarantine), ``show`` (``id``,
``body``), ``events``, ``reload``, ``check``, ``info`` (pid, config and
live limits), ``submit`` (a message for ``spoold sendmail``) and ``ping``.

The socket file gets the configured mode (0660 by default); the server
refuses to start in a directory anyone may write to unless it is sticky.
A request the server cannot parse gets an error reply, never a crash.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket as socketlib
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream

from spoold.config import parse_span
from spoold.errors import (
    InvalidIdError,
    NotFoundError,
    OperationRefusedError,
    SpoolClosedError,
    SpooldError,
    StoreError,
)
from spoold.message import Message, Quarantined, Queue, SendAt, queue_of
from spoold.mx import MxError
from spoold.ondisk import Unreadable
from spoold.spool import Spool, retry_intervals_from_spans

__all__ = [
    "PROTOCOL_VERSION",
    "ControlServer",
    "ControlClient",
    "ControlError",
    "message_view",
    "unreadable_view",
    "describe_view",
    "rfc3339",
]

PROTOCOL_VERSION = 1
MAX_REQUEST = 64 * 1024 * 1024 + 1024 * 1024  # a submitted message and its envelope

log = structlog.get_logger("spoold.control")


def rfc3339(t: datetime) -> str:
    """An aware time as RFC 3339 in UTC, e.g. ``2026-11-24T03:40:30.533104Z``."""
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def message_view(msg: Message) -> dict[str, Any]:
    """The JSON listing of a message (``status --format json``): the
    record's fields plus ``queue``; ``status`` as a string, with ``send_at``
    and ``quarantine_reason`` when they apply; times RFC 3339 UTC; retry
    intervals as seconds."""
    status = msg.status
    queue = queue_of(status)
    env = msg.envelope_info
    view: dict[str, Any] = {
        "id": msg.id,
        "queue": queue.value if queue else None,
        "status": status.name,
        "parent_id": msg.parent_id,
        "related_ids": list(msg.related_ids),
        "flows": list(msg.flows),
        "spool_date": rfc3339(msg.spool_date),
        "next_hop_choices": list(msg.next_hop_choices),
        "retry_intervals": [
            {
                "span": r.span.total_seconds(),
                "jitter": r.jitter.total_seconds() if r.jitter else None,
            }
            for r in msg.retry_intervals
        ],
        "remaining_recipients": list(msg.remaining_recipients),
        "failed_recipients": list(msg.failed_recipients),
        "relay_attempts": [{"time": rfc3339(a.time), "error": a.error} for a in msg.relay_attempts],
        "envelope_info": {
            "sender": env.sender,
            "recipients": list(env.recipients),
            "mail_params": list(env.mail_params),
            "envelope_id": env.envelope_id,
        },
        "route": msg.route,
        "size": msg.size,
    }
    if isinstance(status, SendAt):
        view["send_at"] = rfc3339(status.at)
    if isinstance(status, Quarantined):
        view["quarantine_reason"] = status.reason
    return view


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


class ControlError(SpooldError):
    """An error reply from the daemon, or no daemon to talk to."""

    def __init__(self, message: str, kind: str = "internal") -> None:
        self.kind = kind
        super().__init__(message)


def _ids(request: dict[str, Any]) -> list[str]:
    ids = request.get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise InvalidIdError("expected 'ids': a non-empty list of message ids")
    return ids


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def _encode(obj: object) -> bytes:
    return json.dumps(obj, default=_json_default, separators=(",", ":")).encode() + b"\n"


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlServer:
    """Serves the control protocol for a running spool.

    ``extra`` maps further operations (``reload``, ``check``, ``submit``)
    to coroutines the daemon provides.
    """

    def __init__(self, spool: Spool, extra: dict[str, Handler] | None = None) -> None:
        self.spool = spool
        self.extra = dict(extra or {})

    async def serve(
        self,
        path: Path,
        mode: int,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``path`` until cancelled; reports started once listening."""
        listener = await _listen(path, mode)
        try:
            async with listener, anyio.create_task_group() as tg:
                task_status.started()
                await listener.serve(self._connection, task_group=tg)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                await anyio.Path(path).unlink()

    async def _connection(self, stream: anyio.abc.ByteStream) -> None:
        try:
            await self._serve_one(stream)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:  # one bad connection must never end the server
            log.exception("control connection failed")

    async def _serve_one(self, stream: anyio.abc.ByteStream) -> None:
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            try:
                line = await reader.receive_until(b"\n", MAX_REQUEST)
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
                return
            except anyio.DelimiterNotFound:
                await self._reply(stream, _error("invalid", "request too long"))
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
            if request.get("op") == "events":
                await self._events(stream)
                return
            await self._reply(stream, await self._dispatch(request))

    @staticmethod
    async def _reply(stream: anyio.abc.ByteStream, reply: dict[str, Any]) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await stream.send(_encode(reply))

    async def _events(self, stream: anyio.abc.ByteStream) -> None:
        async with self.spool.events() as events:
            try:
                async for event in events:
                    await stream.send(_encode({"ok": True, "event": event.to_dict()}))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return

    async def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        try:
            result = await self._run(op, request)
        except InvalidIdError as exc:
            return _error("invalid", str(exc))
        except NotFoundError as exc:
            return _error("not_found", str(exc))
        except OperationRefusedError as exc:
            return _error("refused", str(exc))
        except SpoolClosedError as exc:
            return _error("closed", str(exc))
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

    async def _run(self, op: object, request: dict[str, Any]) -> Any:
        spool = self.spool
        override = self.extra.get(op) if isinstance(op, str) else None
        if override is not None:
            return await override(request)
        if op == "ping":
            return "pong"
        if op == "status":
            queue = request.get("queue", "all")
            if queue == "quarantine":
                readable, unreadable = await spool.quarantined()
                views = [message_view(m) for m in readable]
                views += [unreadable_view(u) for u in unreadable]
                return sorted(views, key=lambda v: str(v["id"]))
            if queue not in ("all", "active", "frozen"):
                raise ValueError("queue must be all, active, frozen or quarantine")
            return [
                message_view(m)
                for m in spool.status()
                if queue == "all" or queue_of(m.status) == queue
            ]
        if op == "freeze":
            await spool.freeze(_ids(request))
            return None
        if op == "send":
            spans = request.get("retry_intervals", [])
            if not isinstance(spans, list):
                raise ValueError("retry_intervals must be a list of spans")
            intervals = retry_intervals_from_spans([parse_span(s) for s in spans], 0.0)
            which = request.get("which", "ids")
            if which == "ids":
                return await spool.send(_ids(request), retry_intervals=intervals)
            if which in ("all", "frozen_only"):
                return await spool.send(which=which, retry_intervals=intervals)
            raise ValueError("which must be ids, all or frozen_only")
        if op == "remove":
            await spool.remove(_ids(request))
            return None
        if op == "reroute":
            which = request.get("which", "ids")
            if which == "ids":
                return await spool.reroute(_ids(request))
            if which == "all":
                return await spool.reroute(which="all")
            raise ValueError("which must be ids or all")
        if op == "recover":
            source = request.get("from")
            if source not in ("removed", "quarantine"):
                raise ValueError("'from' must be removed or quarantine")
            await spool.recover(_ids(request), from_=source)
            return None
        if op == "show":
            mid = request.get("id")
            found = await spool.describe(mid if isinstance(mid, str) else "")
            view = describe_view(found)
            if request.get("body"):
                body = await spool.ondisk.read_body(found.id)
                view["body"] = base64.b64encode(body.content()).decode()
            return view
        raise ValueError(f"unknown operation {op!r}")


def _error(kind: str, text: str) -> dict[str, Any]:
    return {"ok": False, "kind": kind, "error": text}


async def _listen(path: Path, mode: int) -> anyio.abc.SocketListener:
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
    old_umask = os.umask(0o777 & ~mode)  # the socket is born with the right mode
    try:
        listener = await anyio.create_unix_listener(path)
    finally:
        os.umask(old_umask)
    await anyio.to_thread.run_sync(os.chmod, path, mode)
    return listener


class ControlClient:
    """Talks to a daemon's control socket (one connection per request)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    async def _connect(self) -> anyio.abc.SocketStream:
        try:
            return await anyio.connect_unix(self.path)
        except FileNotFoundError:
            raise ControlError(
                f"no daemon: control socket {self.path} does not exist", "unavailable"
            ) from None
        except OSError as exc:
            raise ControlError(
                f"cannot reach the daemon at {self.path}: {exc.strerror or exc}", "unavailable"
            ) from None

    async def request(self, op: str, **params: Any) -> Any:
        """Send one request; return its result or raise :class:`ControlError`."""
        with anyio.fail_after(self.timeout):
            stream = await self._connect()
            async with stream:
                await stream.send(_encode({"v": PROTOCOL_VERSION, "op": op, **params}))
                reader = BufferedByteReceiveStream(stream)
                try:
                    line = await reader.receive_until(b"\n", 1 << 30)
                except (anyio.IncompleteRead, anyio.EndOfStream):
                    raise ControlError("the daemon closed the connection", "internal") from None
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "unknown error"), reply.get("kind", "internal"))
        return reply.get("result")

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
                    raise ControlError(reply.get("error", "?"), reply.get("kind", "internal"))
                yield reply["event"]
