"""A synchronous client of a running daemon, for programs that are not asyncio.

:class:`Client` speaks the control protocol (``docs/control-protocol.md``)
over the daemon's Unix socket with plain blocking sockets: no event loop, no
thread, nothing of the daemon imported. One request is one connection, so a
client object holds no resource between calls and may be shared by threads.

Requests and replies are those :mod:`spoold.protocol` declares.

Errors are those of the asyncio API, from :mod:`spoold.errors`:

* before anything is sent, a bad id raises
  :class:`~spoold.errors.InvalidIdError` and a bad address
  :class:`~spoold.errors.AddressError` (checked here as the daemon would);
* the daemon's refusals come back typed by their ``kind``: ``not_found``
  :class:`~spoold.errors.NotFoundError`, ``refused``
  :class:`~spoold.errors.OperationRefusedError`, ``closed``
  :class:`~spoold.errors.SpoolClosedError`, ``temporary``
  :class:`~spoold.errors.StoreError` (try again later), ``timeout`` (of
  :meth:`Client.wait`) :class:`~spoold.errors.WaitTimeoutError`,
  ``suppressed`` (of :meth:`Client.submit`: a recipient on the suppression
  list) :class:`~spoold.errors.RecipientSuppressedError`;

:meth:`Client.wait` returns the :class:`~spoold.waiting.MessageOutcome`
that :meth:`spoold.Spool.wait` gives the daemon (with the envelope's
sender and recipients only).
* anything else (a request the daemon calls invalid, a daemon that is busy,
  absent, or answers nothing within ``timeout``) is a
  :class:`~spoold.errors.ControlError` whose ``kind`` says which; ``denied``
  when this user may not use the socket, or asked the submission socket for
  an admin operation.

Two sockets: :meth:`Client.submit` goes to the daemon's submission socket,
which any local user may use by default; everything else goes to the socket
the client was made with. A client made with the submission socket can
submit, wait and ping; one made with the admin socket can do everything.
"""

from __future__ import annotations

import contextlib
import copy
import email.generator
import email.message
import io
import os
import socket as socketlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NoReturn, cast

import msgspec

from spoold.address import validate_address
from spoold.errors import (
    ControlError,
    ControlErrorKind,
    NotFoundError,
    OperationRefusedError,
    RecipientSuppressedError,
    SpoolClosedError,
    StoreError,
    WaitTimeoutError,
)
from spoold.idempotency import validate_key
from spoold.ids import validate_id
from spoold.message import EnvelopeInfo
from spoold.protocol import (
    ERROR_KINDS,
    CountRequest,
    FleetStatusRequest,
    FreezeRequest,
    HistoryRequest,
    InfoRequest,
    OutcomeView,
    PingRequest,
    QueueChoice,
    RecoverRequest,
    RecoverSource,
    ReloadRequest,
    RemoveRequest,
    Reply,
    Request,
    RerouteChoice,
    RerouteRequest,
    RetryPlanRequest,
    SendChoice,
    SendRequest,
    ShowRequest,
    StatusRequest,
    SubmitRequest,
    SuppressAddRequest,
    SuppressListRequest,
    SuppressRemoveRequest,
    WaitRequest,
    WebhooksRequest,
    decode_reply,
    encode_operation,
    encode_request,
)
from spoold.suppression import normalise
from spoold.times import parse_span
from spoold.waiting import MessageOutcome, OutcomeKind

__all__ = ["Client"]

_SUBMISSION_SOCKET_NAME = "submit.sock"  # the daemon's default, beside the admin socket


def _ids(ids: str | Iterable[str]) -> list[str]:
    """A list of valid ids (a single string is one id, never its letters)."""
    out = [validate_id(ids)] if isinstance(ids, str) else [validate_id(i) for i in ids]
    if not out:
        raise ValueError("no message ids given")
    return out


def _content(message: bytes | email.message.Message) -> bytes:
    """The bytes to submit. A message object is written out by the
    standard generator itself, not by its ``as_bytes``, which subclasses
    (Django's ``SafeMIMEText``) override with another signature: CRLF
    lines, 8-bit parts as they are, no ``>From`` mangling, and without
    ``Bcc:`` (its recipients are in the envelope; the caller's object is
    left as it was)."""
    if isinstance(message, bytes | bytearray | memoryview):
        return bytes(message)
    if isinstance(message, email.message.Message):
        if "Bcc" in message:
            message = copy.copy(message)  # deleting assigns a new header list
            del message["Bcc"]
        out = io.BytesIO()
        policy = message.policy.clone(linesep="\r\n")
        email.generator.BytesGenerator(out, mangle_from_=False, policy=policy).flatten(message)
        return out.getvalue()
    raise TypeError(f"a message is bytes or an email.message.Message, not {type(message).__name__}")


def _span_text(span: timedelta) -> str:
    """``span`` as the protocol's span text, to the microsecond."""
    text = f"{span.total_seconds():.6f}".rstrip("0").rstrip(".")
    return f"{text}s"


def _raise_for(reply: Reply) -> NoReturn:
    text = reply.error
    kind = reply.kind
    if kind == "not_found":
        raise NotFoundError(text)
    if kind == "refused":
        raise OperationRefusedError(text)
    if kind == "closed":
        raise SpoolClosedError(text)
    if kind == "temporary":
        raise StoreError(text)
    if kind == "suppressed":
        raise RecipientSuppressedError({}, text)
    known = cast(ControlErrorKind, kind) if kind in ERROR_KINDS else "internal"
    raise ControlError(text, known)


class Client:
    """The daemon at control socket ``socket`` (the admin socket
    ``control.socket``, or the submission socket for a program that only
    submits). ``timeout`` bounds each request (connect, send, reply) in
    seconds; :meth:`wait` adds its own.

    ``submission_socket``: where :meth:`submit` goes (the daemon's
    ``control.submission_socket``). By default ``submit.sock`` beside
    ``socket``, the daemon's own default; when nothing is there, ``socket``
    itself (the admin socket takes submissions too)."""

    def __init__(
        self,
        socket: str | os.PathLike[str],
        *,
        timeout: float = 60.0,
        submission_socket: str | os.PathLike[str] | None = None,
    ) -> None:
        self.socket = Path(socket)
        self.timeout = timeout
        self.submission_socket = Path(
            submission_socket
            if submission_socket is not None
            else self.socket.parent / _SUBMISSION_SOCKET_NAME
        )
        self._submission_given = submission_socket is not None

    # ------------------------------------------------------------ plumbing

    def _ask(self, request: Request) -> Any:
        """One request of :mod:`spoold.protocol`; its result."""
        return self._exchange(encode_request(request), timeout=self.timeout)

    def _exchange(
        self,
        line: bytes,
        content: bytes = b"",
        *,
        timeout: float | None = None,
        path: Path | None = None,
    ) -> Any:
        where = path or self.socket
        with self._connect(where, timeout) as sock:
            try:
                # A daemon that refuses before reading everything (a message
                # over its limit) answers and hangs up: its reply says why.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(line + content)
                with sock.makefile("rb") as reader:
                    answer = reader.readline()
            except TimeoutError:
                raise ControlError(
                    f"no reply from the daemon at {where} within {timeout:g} s",
                    "unavailable",
                ) from None
            except OSError as exc:
                raise ControlError(
                    f"lost the daemon at {where}: {exc.strerror or exc}", "unavailable"
                ) from None
        if not answer.endswith(b"\n"):
            raise ControlError("the daemon closed the connection without a reply", "internal")
        reply = decode_reply(answer)
        if not reply.ok:
            _raise_for(reply)
        return reply.result

    @staticmethod
    def _connect(where: Path, timeout: float | None) -> socketlib.socket:
        sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(str(where))
            except FileNotFoundError:
                raise ControlError(
                    f"no daemon: control socket {where} does not exist", "unavailable"
                ) from None
            except TimeoutError:
                raise ControlError(
                    f"the daemon at {where} did not answer within {timeout:g} s",
                    "unavailable",
                ) from None
            except PermissionError:
                raise ControlError(
                    f"cannot reach the daemon at {where}: permission denied (this user "
                    "may not use that socket)",
                    "denied",
                ) from None
            except OSError as exc:
                raise ControlError(
                    f"cannot reach the daemon at {where}: {exc.strerror or exc}",
                    "unavailable",
                ) from None
        except BaseException:
            sock.close()
            raise
        return sock

    def request(self, op: str, **params: Any) -> Any:
        """Any operation of the protocol by name (``params`` as they go on
        the wire); its ``result``."""
        return self._exchange(encode_operation(op, params), timeout=self.timeout)

    # ------------------------------------------------------------- reading

    def ping(self) -> bool:
        return bool(self._ask(PingRequest()) == "pong")

    def status(self, queue: QueueChoice = "all") -> list[dict[str, Any]]:
        """The listing of ``spoold status --format json``: one dict per
        message (``all``: active and frozen)."""
        views: list[dict[str, Any]] = self._ask(StatusRequest(queue=queue))
        return views

    def iter_status(
        self,
        queue: QueueChoice = "all",
        *,
        domain: str | None = None,
        older_than: str | timedelta | None = None,
        newer_than: str | timedelta | None = None,
        error: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """:meth:`status` a page at a time (the daemon's ``stream``): one
        dict per message as the pages come, by id, so a large queue is
        never held whole; the filters and cursor of ``spoold status``
        (``--domain``, ``--older-than``, ...; spans as for :meth:`history`).
        Stop early, and the daemon stops too."""

        def span_text(span: str | timedelta | None) -> str | None:
            if span is None:
                return None
            return _span_text(span if isinstance(span, timedelta) else parse_span(span))

        request = StatusRequest(
            queue=queue,
            stream=True,
            after=None if after is None else validate_id(after),
            limit=limit,
            domain=domain,
            older_than=span_text(older_than),
            newer_than=span_text(newer_than),
            error=error,
        )
        with self._connect(self.socket, self.timeout) as sock:
            try:
                sock.sendall(encode_request(request))
                with sock.makefile("rb") as reader:
                    for answer in reader:
                        reply = decode_reply(answer)
                        if not reply.ok:
                            _raise_for(reply)
                        if not isinstance(reply.page, list):
                            return
                        yield from reply.page
            except TimeoutError:
                raise ControlError(
                    f"no reply from the daemon at {self.socket} within {self.timeout:g} s",
                    "unavailable",
                ) from None
            except OSError as exc:
                raise ControlError(
                    f"lost the daemon at {self.socket}: {exc.strerror or exc}", "unavailable"
                ) from None
        raise ControlError("the daemon closed the connection before the end", "internal")

    def count(self) -> dict[str, int]:
        """Messages per queue: ``active``, ``frozen``, ``sending``,
        ``removed``, ``quarantine``."""
        counts: dict[str, int] = self._ask(CountRequest())
        return counts

    def show(self, message_id: str) -> dict[str, Any]:
        """One message's listing, from any queue."""
        view: dict[str, Any] = self._ask(ShowRequest(id=validate_id(message_id)))
        return view

    def retry_plan(self, message_id: str) -> dict[str, Any]:
        """What would happen to a message of active or frozen if every
        attempt from now failed with a temporary error, as ``spoold
        retry-plan --format json`` prints it: ``attempts`` (each with
        ``number``, ``earliest``, ``latest``, ``conditional``), ``repeats``
        (the attempts of a repeating last interval, summed up, or None),
        ``ends`` (``action`` freeze|bounce, ``reason``, ``earliest``,
        ``latest``), ``delay_warning``, ``expiry``, ``on_permanent_failure``,
        ``retries_exhausted``, ``note``; times RFC 3339 UTC strings."""
        plan: dict[str, Any] = self._ask(RetryPlanRequest(id=validate_id(message_id)))
        return plan

    def history(
        self, since: str | timedelta | None = None, recipient: str | None = None
    ) -> list[dict[str, Any]]:
        """The outcomes of messages that left the queue (delivered, bounced,
        removed) that the daemon's history journal keeps, oldest first, as
        ``spoold history --format json`` gives them. ``since``: only those
        of the last span (``"2h"``, or a :class:`~datetime.timedelta`);
        ``recipient``: only those with this recipient (any case). Both are
        checked before anything is sent (``ValueError``,
        :class:`~spoold.errors.AddressError`)."""
        request = HistoryRequest(recipient=recipient)
        if since is not None:
            span = since if isinstance(since, timedelta) else parse_span(since)
            if span < timedelta(0):
                raise ValueError(f"since must be a span back from now, not {since!r}")
            request.since = _span_text(span) if isinstance(since, timedelta) else since
        if recipient is not None:
            validate_address(recipient, role="recipient", smtputf8=True)
        found: list[dict[str, Any]] = self._ask(request)
        return found

    def info(self) -> dict[str, Any]:
        """What the daemon runs with (pid, config, live limits)."""
        found: dict[str, Any] = self._ask(InfoRequest())
        return found

    def webhooks(self) -> list[dict[str, Any]]:
        """Each webhook's state (``spoold status --webhooks``): url, events
        waiting in its outbox, last success, last error, next retry."""
        found: list[dict[str, Any]] = self._ask(WebhooksRequest())
        return found

    def fleet_status(self) -> dict[str, Any]:
        """The fleet as this daemon sees it: its Redis up or down, and the
        nodes with a live heartbeat (the ``fleet_status`` result)."""
        found: dict[str, Any] = self._ask(FleetStatusRequest())
        return found

    # ------------------------------------------------------------- writing

    def submit(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes | email.message.Message,
        *,
        idempotency_key: str | None = None,
    ) -> list[str]:
        """Spool one message (``sender`` ``""`` is the null sender); return
        the ids of the messages spooled (one per route), once they are on
        disk. The content may use LF or CRLF line endings.

        ``idempotency_key``: a submission repeated with the same key (a retry
        after a lost reply) within the daemon's ``spool.idempotency_window``
        queues nothing and returns the first one's ids.

        It goes to the submission socket (see the class), and the daemon
        records the uid of the process that calls it in the message's
        ``Received:`` header."""
        if isinstance(recipients, str):
            raise TypeError("recipients is a list of addresses, not one string")
        validate_address(sender, role="sender", smtputf8=True)
        for rcpt in recipients:
            validate_address(rcpt, role="recipient", smtputf8=True)
        content = _content(message)
        request = SubmitRequest(
            sender=sender,
            recipients=list(recipients),
            content_length=len(content),
            idempotency_key=None if idempotency_key is None else validate_key(idempotency_key),
        )
        ids = self._submit_exchange(request, content)
        return [str(i) for i in ids]

    def _submit_exchange(self, request: SubmitRequest, content: bytes) -> Any:
        path = self.submission_socket
        if not self._submission_given and path != self.socket and not path.exists():
            path = self.socket  # a daemon without one beside it: the admin socket takes it
        return self._exchange(encode_request(request), content, timeout=self.timeout, path=path)

    def wait(self, message_id: str, timeout: float | None = None) -> MessageOutcome:
        """Block until the message has an outcome and return it (as
        :meth:`spoold.Spool.wait` does in the daemon): at once for one that
        already has one. :class:`~spoold.errors.WaitTimeoutError` if it is
        still queued after ``timeout`` seconds (None: no limit; 0: look once)."""
        mid = validate_id(message_id)
        if timeout is not None and not 0 <= timeout < float("inf"):
            raise ValueError("timeout must be a number of seconds, or None")
        limit = None if timeout is None else timeout + self.timeout
        try:
            found = self._exchange(
                encode_request(WaitRequest(id=mid, timeout=timeout)), timeout=limit
            )
        except ControlError as exc:
            if exc.kind == "timeout" and timeout is not None:
                raise WaitTimeoutError(mid, timeout) from None
            raise
        view = msgspec.convert(found, OutcomeView)
        envelope = None
        if isinstance(view.sender, str):
            recipients = view.recipients if isinstance(view.recipients, list) else []
            envelope = EnvelopeInfo(sender=view.sender, recipients=list(recipients))
        when = view.time
        return MessageOutcome(
            id=view.id,
            kind=OutcomeKind(view.outcome),
            time=datetime.fromisoformat(when.replace("Z", "+00:00")) if when else None,
            envelope_info=envelope,
            failed_recipients=tuple(view.failed_recipients),
            last_error=view.last_error,
            detail=view.detail,
        )

    def freeze(self, ids: str | Iterable[str]) -> None:
        self._ask(FreezeRequest(ids=_ids(ids)))

    def send(
        self,
        ids: str | Iterable[str] = (),
        *,
        which: SendChoice = "ids",
        retry_intervals: Sequence[str] = (),
    ) -> list[str]:
        """Send now: thaw frozen messages (their failed recipients return to
        the remaining ones), kick delayed ones. ``retry_intervals`` (spans
        such as ``"10m"``) go first. Returns the ids sent."""
        request = SendRequest(which=which, retry_intervals=list(retry_intervals))
        if which == "ids":
            request.ids = _ids(ids)
        sent: list[str] = self._ask(request)
        return sent

    def remove(self, ids: str | Iterable[str]) -> None:
        """Move frozen messages to the removed queue."""
        self._ask(RemoveRequest(ids=_ids(ids)))

    def recover(self, ids: str | Iterable[str], *, from_: RecoverSource) -> None:
        """Bring messages back from removed or quarantine, frozen."""
        self._ask(RecoverRequest(ids=_ids(ids), source=from_))

    def reroute(self, ids: str | Iterable[str] = (), *, which: RerouteChoice = "ids") -> list[str]:
        """Route messages again through the current routes; the ids of
        every resulting message."""
        request = RerouteRequest(which=which)
        if which == "ids":
            request.ids = _ids(ids)
        result: list[str] = self._ask(request)
        return result

    def reload(self) -> dict[str, Any]:
        """Re-read the daemon's config: ``{"applied": true, "restart_needed":
        [...]}`` or ``{"applied": false, "errors": [...]}``."""
        result: dict[str, Any] = self._ask(ReloadRequest())
        return result

    # ------------------------------------------------ the suppression list

    def suppressed(self, addresses: str | Iterable[str] = ()) -> dict[str, Any]:
        """The suppression list: ``{"entries": [...], "total",
        "max_suppressed", "counts"}``, each entry ``{"address", "since",
        "until", "reason", "source"}``; with ``addresses``, only the
        entries of those (the others are not suppressed)."""
        request = SuppressListRequest(addresses=_addresses(addresses, empty_ok=True))
        found: dict[str, Any] = self._ask(request)
        return found

    def check_suppressed(self, addresses: str | Iterable[str]) -> dict[str, dict[str, Any]]:
        """Which of ``addresses`` are suppressed now: each one (as given)
        that is, with its entry; an address not in the result is not."""
        given = _addresses(addresses)
        entries = {e["address"]: e for e in self.suppressed(given)["entries"]}
        return {a: entries[normalise(a)] for a in given if normalise(a) in entries}

    def suppress(
        self,
        addresses: str | Iterable[str],
        *,
        for_: str | timedelta | None = None,
        reason: str = "",
    ) -> list[dict[str, Any]]:
        """Suppress ``addresses`` for ``for_`` (a span such as ``"30d"``;
        default: the daemon's ``suppress_after_hard_bounce``, else 30 days)
        with ``reason``; an entry an address had is replaced. Returns the
        entries made. Every process taking mail for the daemon applies them
        from its next recipient."""
        request = SuppressAddRequest(addresses=_addresses(addresses), reason=reason)
        if for_ is not None:
            span = for_ if isinstance(for_, timedelta) else parse_span(for_)
            if span <= timedelta(0):
                raise ValueError(f"a suppression must last longer than 0s, not {for_!r}")
            request.span = _span_text(span) if isinstance(for_, timedelta) else for_
        made: list[dict[str, Any]] = self._ask(request)
        return made

    def unsuppress(self, addresses: str | Iterable[str]) -> list[str]:
        """Lift the suppression of ``addresses``; the (normalised) ones
        that were suppressed."""
        lifted: list[str] = self._ask(SuppressRemoveRequest(addresses=_addresses(addresses)))
        return lifted

    def unsuppress_source(
        self, source: Literal["bounce", "operator"], *, since: str | timedelta | None = None
    ) -> list[str]:
        """Lift every suppression ``source`` made (``"bounce"``: after a
        hop refused good addresses), or only those made in the last
        ``since`` (a span such as ``"2h"``); the addresses that were
        suppressed."""
        request = SuppressRemoveRequest(source=source)
        if since is not None:
            span = since if isinstance(since, timedelta) else parse_span(since)
            if span <= timedelta(0):
                raise ValueError(f"since: expected a span > 0, not {since!r}")
            request.since = _span_text(span) if isinstance(since, timedelta) else since
        lifted: list[str] = self._ask(request)
        return lifted


def _addresses(addresses: str | Iterable[str], *, empty_ok: bool = False) -> list[str]:
    """``addresses`` as a list, each checked as a recipient address."""
    listed = [addresses] if isinstance(addresses, str) else list(addresses)
    if not listed and not empty_ok:
        raise ValueError("expected at least one address")
    for address in listed:
        validate_address(address, role="recipient", smtputf8=True)
    return listed
