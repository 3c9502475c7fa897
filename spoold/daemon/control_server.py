"""The control server: serves the control protocol (:mod:`spoold.protocol`)
on one Unix socket for a running spool.

One request per connection: the request line, then the reply line (see
``docs/control-protocol.md``). Each operation answered with one reply is
bound in :mod:`spoold.daemon.control_handlers`; the server itself serves
what has a framing of its own: ``submit`` (the message's bytes after the
line), ``events`` (a stream until the client hangs up), ``wait`` (a reply
once the message has an outcome, or never if the client hangs up first)
and ``status`` with ``stream`` (one line per page, as fast as the client
reads, then a last line).

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
only :data:`~spoold.protocol.SUBMISSION_OPERATIONS` (``submit``, ``wait``,
``ping``) on the submission socket (``control.submission_socket``, mode
0666 by default: any local user, as Postfix's postdrop lets anyone
submit). Any other operation there is answered ``{"ok": false, "kind":
"denied", ...}`` saying to use the admin socket, and nothing is done. Each
socket has a server of its own (its own ``max_clients``), so a crowd of
submitters cannot lock the operator out. ``wait`` there is for the
messages the same user submitted (the record's ``submitter_uid``);
another's id is answered ``not_found``, as an unknown one is. The queue
listing is not served there (it holds every user's addresses): ``mailq``
is for admins. There one user holds at most an eighth of the places, and
the messages being read add up to at most
:data:`SUBMISSION_CONTENT_BUDGET` times the size limit.

The daemon learns who is on the other end of each connection from the
kernel (:func:`~spoold.daemon.control_socket.peer_credentials`) and hands a
submission's :class:`~spoold.daemon.control_socket.PeerCredentials` to
:meth:`DaemonOperations.submit`.

A request the server cannot parse gets an error reply, never a crash; one
connection's failure is logged and never ends the server.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import socket as socketlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream

from spoold.daemon.config import SmtpConfig
from spoold.daemon.control_handlers import OPERATIONS, DaemonOperations, answer, listing
from spoold.daemon.control_socket import PeerCredentials, listen, peer_credentials
from spoold.daemon.resources import AcceptFailures, accept_forever
from spoold.errors import NotFoundError, OperationRefusedError
from spoold.message import Message, gc_paused
from spoold.protocol import (
    PAGE_HEAD,
    PROTOCOL_VERSION,
    REQUESTS,
    SUBMISSION_OPERATIONS,
    StatusRequest,
    SubmitRequest,
    WaitRequest,
    decode_params,
    encode_reply,
    error_reply,
    outcome_view,
)
from spoold.spool import Spool
from spoold.times import format_size

__all__ = [
    "MAX_REQUEST",
    "REQUEST_TIMEOUT",
    "MAX_CLIENTS",
    "SUBMISSION_CONTENT_BUDGET",
    "ControlServer",
]

MAX_REQUEST = 1024 * 1024  # one request line, without its newline
REQUEST_TIMEOUT = 30.0  # seconds from accept to the request's newline
MAX_CLIENTS = 64  # connections served at once, events subscribers included

_READ_CHUNK = 256 * 1024

log = structlog.get_logger("spoold.daemon.control")

_ENCODER = msgspec.json.Encoder()


def _default_max_message_size() -> int:
    return SmtpConfig().max_message_size


def _too_large(size: int, limit: int) -> str:
    return f"submit: message of {size} bytes exceeds the limit of {limit} (smtp.max_message_size)"


class ControlServer:
    """Serves the control protocol for a running spool (see the module
    docstring for the limits).

    The operations are :data:`~spoold.daemon.control_handlers.HANDLERS`
    and those with a framing of their own; those the daemon adds (``reload``,
    ``info``, ``count``, ``check``, ``submit``) go to ``daemon`` (without
    one, they are refused as unavailable). ``submit`` takes the messages of
    ``spoold sendmail``, at most ``max_message_size()`` bytes each (read at
    every submit, so a reload applies). ``accept_failures`` is where accept
    errors for lack of resources are counted and logged (the daemon shares
    one with its other listeners). ``submission_only``: this is the
    submission socket's server, which answers only
    :data:`~spoold.protocol.SUBMISSION_OPERATIONS` and denies the rest.
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
        sock = await listen(path, mode, group)
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
        def take(conn: socketlib.socket, _address: object) -> None:
            if self.clients >= self.max_clients:
                self._turn_away(conn)
                return
            self.clients += 1
            tg.start_soon(self._connection, conn)

        await accept_forever(sock, where, self.accept_failures, take)

    def _turn_away(self, conn: socketlib.socket) -> None:
        """Answer ``busy`` and close, without a task: the reply is far
        smaller than a new socket's buffer, so a non-blocking send takes it."""
        reply = error_reply(
            "busy",
            f"the daemon is serving {self.clients} control clients, the most it takes; "
            "try again later",
        )
        with conn, contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(encode_reply(reply))

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
                    await self._reply(stream, error_reply("busy", _user_busy(peer)))
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
            await self._reply(stream, error_reply("invalid", f"not a JSON request: {exc}"))
            return
        if not isinstance(request, dict):
            await self._reply(stream, error_reply("invalid", "a request is a JSON object"))
            return
        if request.get("v") != PROTOCOL_VERSION:
            await self._reply(
                stream,
                error_reply("invalid", f"unsupported protocol version {request.get('v')!r}"),
            )
            return
        op = request.get("op")
        if self.submission_only and op not in SUBMISSION_OPERATIONS and _known(op):
            await self._reply(stream, error_reply("denied", _admin_only(op)))
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
            reply = await answer(op, lambda: handler(self, decode_params(kind, request)))
        else:
            reply = error_reply("invalid", f"unknown operation {op!r}")
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
            await self._reply(stream, error_reply("busy", text))
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
                return None, error_reply("invalid", f"request over {format_size(self.max_request)}")
            return line, None
        return None, error_reply(
            "invalid", f"no request within {self.request_timeout:g} s; disconnected"
        )

    async def _submit(
        self,
        reader: BufferedByteReceiveStream,
        request: dict[str, Any],
        peer: PeerCredentials | None = None,
    ) -> dict[str, Any]:
        try:
            p = decode_params(SubmitRequest, request)
        except ValueError as exc:
            return error_reply("invalid", f"submit: {exc}")
        if p.content_length is not msgspec.UNSET and p.content is not msgspec.UNSET:
            return error_reply("invalid", "submit: give content_length or content, not both")
        limit = self.max_message_size()
        if not isinstance(p.content_length, msgspec.UnsetType):
            length = p.content_length
            if length < 0:
                return error_reply("invalid", "submit: content_length must be a number of bytes")
            if length > limit:
                return error_reply("invalid", _too_large(length, limit))  # before reading any of it
            budget = SUBMISSION_CONTENT_BUDGET * limit
            if self.submission_only and self.reading + length > budget:
                return error_reply(
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
                return error_reply(
                    "invalid",
                    f"submit: the message ended before its {length} bytes, or paused for "
                    f"{self.request_timeout:g} s",
                )
        else:  # an older client: base64 inside the line
            try:
                encoded = "" if isinstance(p.content, msgspec.UnsetType) else p.content
                content = base64.b64decode(encoded, validate=True)
            except (ValueError, TypeError):
                return error_reply("invalid", "submit: content must be base64")
            if len(content) > limit:
                return error_reply("invalid", _too_large(len(content), limit))
        daemon = self.daemon
        if daemon is None:
            return error_reply("refused", "submit: this control server has no daemon to ask")
        key = p.idempotency_key
        return await answer(
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
            await stream.send(encode_reply(reply))

    async def _status_stream(self, stream: anyio.abc.ByteStream, request: dict[str, Any]) -> None:
        """``status`` with ``stream``: one line per page as it is built,
        ``{"ok": true, "page": [...]}``, then ``{"ok": true, "result":
        {"listed": N, "next_after": ID or null}}``. The loop is given back
        after each page (and the send waits for a slow reader: nothing
        piles up here); a reader that takes no page for the request timeout,
        or hangs up, ends the listing."""
        made: dict[str, Any] = await answer(
            "status", lambda: listing(self, decode_params(StatusRequest, request))
        )
        if not made.get("ok"):
            await self._reply(stream, made)
            return
        walk, render = made["result"]
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            while not walk.done:
                with gc_paused():  # many small objects, no cycles: see gc_paused
                    items = [render(item) for item in walk.page()]
                    line = PAGE_HEAD + _ENCODER.encode(items)[1:] + b"}\n"
                if items:
                    with anyio.move_on_after(self.request_timeout) as waited:
                        await stream.send(line)
                    if waited.cancelled_caught:
                        return  # a reader that stopped reading holds its place no longer
                await anyio.lowlevel.checkpoint()
            end = {"listed": walk.listed, "next_after": walk.next_after}
            await self._reply(stream, {"ok": True, "result": end})

    async def _events(
        self, stream: anyio.abc.ByteStream, reader: BufferedByteReceiveStream
    ) -> None:
        """Stream events until the client hangs up: noticed at once (not at
        the next event), so a gone subscriber frees its place at once."""
        async with self.spool.events() as events, anyio.create_task_group() as tg:
            tg.start_soon(_cancel_when_hung_up, reader, tg.cancel_scope)
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                async for event in events:
                    await stream.send(encode_reply({"ok": True, "event": event.to_dict()}))
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
            p = decode_params(WaitRequest, request)
        except ValueError as exc:
            return error_reply("invalid", f"wait: {exc}")
        if p.timeout is not None and not 0 <= p.timeout < math.inf:
            return error_reply("invalid", "wait: timeout must be a number of seconds, or null")
        if self.submission_only:
            if peer is None:  # who asks is unknown: nothing is told
                return error_reply("denied", "wait: the daemon cannot tell who is asking")
            uid = peer.uid
            checked = await answer("wait", lambda: self._not_theirs(p.id, uid))
            refusal: dict[str, Any] | None = checked["result"] if checked.get("ok") else checked
            if refusal is not None:
                return refusal
        reply: dict[str, Any] | None = None
        async with anyio.create_task_group() as tg:

            async def outcome() -> None:
                nonlocal reply
                reply = await answer("wait", lambda: self._outcome(p.id, p.timeout))
                tg.cancel_scope.cancel()

            tg.start_soon(_cancel_when_hung_up, reader, tg.cancel_scope)
            tg.start_soon(outcome)
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
        return error_reply(
            "not_found", f"{message_id}: no message of this user (uid {uid}) by that id"
        )

    async def _outcome(self, message_id: str, seconds: float | None) -> dict[str, Any]:
        return outcome_view(await self.spool.wait(message_id, seconds))


SUBMISSION_CONTENT_BUDGET = 4
"""On the submission socket, the messages being read at once may add up to
this many times the submit size limit (the rest are answered ``busy``)."""


async def _cancel_when_hung_up(reader: BufferedByteReceiveStream, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` as soon as the client hangs up (whatever it sends
    meanwhile is dropped: nothing more is expected of it)."""
    with contextlib.suppress(
        anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError
    ):
        while True:
            await reader.receive()
    scope.cancel()


def _user_busy(peer: PeerCredentials | None) -> str:
    who = "this user" if peer is None else f"uid {peer.uid}"
    return (
        f"{who} already has as many connections to the submission socket as one user may; "
        "try again later"
    )


def _known(op: object) -> bool:
    return isinstance(op, str) and op in REQUESTS


def _admin_only(op: object) -> str:
    allowed = ", ".join(sorted(SUBMISSION_OPERATIONS))
    return (
        f"{op} is an admin operation and this is the submission socket (it takes {allowed}); "
        "use the admin socket (control.socket) as its owner or a member of its group, "
        "or ask an administrator"
    )
