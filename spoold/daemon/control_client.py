"""The asyncio client of a daemon's control socket (what ``spoold``'s
commands, ``spoold sendmail`` and ``spoold top`` use).

One request per connection, as :mod:`spoold.protocol` declares it:
:meth:`ControlClient.ask` sends a request object and returns its result;
:meth:`ControlClient.request` sends any operation by name. An error reply
raises :class:`~spoold.errors.ControlError` with the reply's ``kind`` (an
unknown kind reads as ``internal``); a socket that is not there, or that
this user may not use, raises it with ``unavailable`` or ``denied``
before anything is sent. ``timeout`` bounds each request (connect, send,
reply); a stream (``events``, the pages of ``status``) bounds each line.

Older daemons keep working: a daemon from before paged listings refuses
``stream``, and :meth:`ControlClient.status_pages` then asks for the whole
listing and hands it on as one page.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

from spoold.errors import ControlError
from spoold.protocol import (
    EventsRequest,
    Reply,
    Request,
    StatusRequest,
    SubmitRequest,
    decode_raw_page,
    decode_reply,
    encode_operation,
    encode_request,
    reply_kind,
)

__all__ = ["ControlClient", "unreachable"]

_MAX_REPLY = 1 << 30  # one reply line (a whole listing from an older daemon)
_MAX_EVENT = 1 << 24


def unreachable(path: Path, exc: OSError) -> ControlError:
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


def _older_daemon(reply: Reply, request: StatusRequest) -> bool:
    """Whether an error reply to a paged ``status`` is an older daemon's
    word that it knows no ``stream``, for a listing it can give whole."""
    return reply.kind == "invalid" and "stream" in reply.error and not request.narrows()


def _result(reply: Reply) -> Any:
    if not reply.ok:
        raise ControlError(reply.error, reply_kind(reply))
    return reply.result


class ControlClient:
    """Talks to a daemon's control socket (one connection per request)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    async def _connect(self) -> anyio.abc.SocketStream:
        try:
            return await anyio.connect_unix(self.path)
        except OSError as exc:
            raise unreachable(self.path, exc) from None

    async def ask(self, request: Request) -> Any:
        """Send one request; return its result or raise :class:`ControlError`."""
        return await self._exchange(encode_request(request))

    async def request(self, op: str, **params: Any) -> Any:
        """Send one request by operation name (``params`` as they go on
        the wire); return its result or raise :class:`ControlError`."""
        return await self._exchange(encode_operation(op, params))

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
        request = SubmitRequest(
            sender=sender,
            recipients=list(recipients),
            content_length=len(content),
            idempotency_key=idempotency_key,
        )
        ids = await self._exchange(encode_request(request), content)
        return [str(i) for i in ids]

    async def _exchange(self, line: bytes, content: bytes = b"") -> Any:
        with anyio.fail_after(self.timeout):
            stream = await self._connect()
            async with stream:
                # A daemon that refuses before reading everything (a message
                # over its limit) answers and hangs up: its reply says why.
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await stream.send(line)
                    if content:
                        await stream.send(content)
                reader = BufferedByteReceiveStream(stream)
                try:
                    answer = await reader.receive_until(b"\n", _MAX_REPLY)
                except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
                    raise ControlError("the daemon closed the connection", "internal") from None
        return _result(decode_reply(answer))

    async def status_pages(
        self, raw: bool = False, request: StatusRequest | None = None, **params: Any
    ) -> AsyncIterator[list[Any]]:
        """``status`` in pages (``stream``): yield each page (listing
        objects, or ids with ``only_ids``) as it arrives, so a large queue
        is never held whole on either side. What to list: ``request``, or
        ``params``, the fields of :class:`~spoold.protocol.StatusRequest`
        (``queue``, ``after``, ``limit``, filters). With ``raw``, each listing object comes as its
        JSON text, undecoded (``bytes``, UTF-8, compact). Raises
        :class:`ControlError` for an error reply, or when the daemon hangs
        up before the last line."""
        asked = request if request is not None else StatusRequest(**params)
        asked = msgspec.structs.replace(asked, stream=False)
        stream = await self._connect()
        async with stream:
            with anyio.fail_after(self.timeout):
                await stream.send(encode_request(msgspec.structs.replace(asked, stream=True)))
            reader = BufferedByteReceiveStream(stream)
            first = True
            while True:
                try:
                    with anyio.fail_after(self.timeout):
                        line = await reader.receive_until(b"\n", _MAX_REPLY)
                except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
                    raise ControlError(
                        "the daemon closed the connection before the end of the listing",
                        "internal",
                    ) from None
                if raw and (objects := decode_raw_page(line)) is not None:
                    yield objects
                    continue
                reply = decode_reply(line)
                if not reply.ok:
                    if first and _older_daemon(reply, asked):
                        break  # asked again below, the way it understands
                    raise ControlError(reply.error, reply_kind(reply))
                first = False
                if isinstance(reply.page, list):
                    yield reply.page
                    continue
                return
        # A daemon from before paged listings (not restarted since an
        # upgrade): the whole listing in one reply, handed on as one page.
        views = await self.ask(asked)
        yield [json.dumps(v, separators=(",", ":")).encode() for v in views] if raw else views

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Yield event dicts until the daemon goes away."""
        stream = await self._connect()
        async with stream:
            await stream.send(encode_request(EventsRequest()))
            reader = BufferedByteReceiveStream(stream)
            while True:
                try:
                    line = await reader.receive_until(b"\n", _MAX_EVENT)
                except (anyio.IncompleteRead, anyio.EndOfStream):
                    return
                reply = decode_reply(line)
                if not reply.ok:
                    raise ControlError(reply.error, reply_kind(reply))
                if isinstance(reply.event, dict):
                    yield reply.event
