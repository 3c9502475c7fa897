"""Taking mail in: what the SMTP listener and ``spoold sendmail`` share.

:class:`Submitter` turns one submission (envelope + message bytes) into
spooled messages: it applies the bare CR/LF policy, adds a ``Received:``
trace header naming each message's own id and, when missing, ``Message-ID:``
and ``Date:`` (and ``From:`` for local submissions), routes each
recipient (one message per route, siblings sharing ``parent_id``), and
returns once every message is durable. :meth:`Submitter.submit` takes the
message as content (``spoold sendmail``); :meth:`Submitter.submit_wire`
takes what an SMTP client sent after DATA, already in the on-disk wire form
(CRLF, dot-stuffed), and keeps those bytes as they are: the trace headers
are prepended, nothing is decoded or encoded again. It raises
:class:`~spoold.errors.BareLineEndingError` for content it refuses, and lets
store errors (:class:`~spoold.errors.StoreError`) through for the caller to
turn into a temporary failure; nothing half-written remains either way.

The router is read through a callable so a reload's new routes apply to the
next submission; messages already spooled keep their next hops.
"""

from __future__ import annotations

import email.utils
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from spoold.body import Body, LineEndingPolicy
from spoold.daemon.routing import Router
from spoold.hostname import local_hostname
from spoold.idempotency import MAX_KEY_LENGTH
from spoold.ids import new_id
from spoold.message import RoutedBatch
from spoold.suppression import SuppressedRecipients, Suppressions

__all__ = ["Submitter", "Origin", "missing_headers", "received_header", "message_id_key"]

_HEADER_END = re.compile(rb"\r\n\r\n|\n\n")
_STARTS_WITH_HEADER = re.compile(rb"[!-9;-~]+:")  # an RFC 5322 field name and its colon


class Origin(NamedTuple):
    """Where a submission came from, for the Received: header. (A named
    tuple: immutable, made with one call, one per SMTP message.)"""

    protocol: str  # "ESMTP", "SMTP", "local"
    helo: str = ""
    peer: str = ""  # the client's address, "" for local
    uid: int | None = None  # local: the submitting process's user (kernel's word), if known
    user: str = ""  # local: that user's login name, if known


def missing_headers(
    content: bytes, submission_id: str, hostname: str, *, sender: str | None = None
) -> bytes:
    """Header lines to add to a message that lacks them: ``Message-ID:``
    and ``Date:`` always, ``From:`` too when ``sender`` is given (local
    submissions, as Postfix's cleanup does for sendmail). Works on CRLF
    content and on the wire form alike: no line starts with a dot."""
    # Plain searches, not patterns: the leftmost blank line (CRLF CRLF or
    # LF LF) ends the header; a field is there when a line (at the start,
    # or after an LF) starts with its name, in any ASCII case.
    end = _header_end(content)
    header = (content if end < 0 else content[:end]).lower()
    extra = b""
    if sender is not None and not _has_field(header, b"from:"):
        extra += f"From: <{sender or 'MAILER-DAEMON'}>\r\n".encode()
    if not _has_field(header, b"message-id:"):
        extra += f"Message-ID: <{submission_id}@{hostname}>\r\n".encode()
    if not _has_field(header, b"date:"):
        extra += f"Date: {_header_date()}\r\n".encode()
    return extra


def _header_end(content: bytes) -> int:
    """Where ``_HEADER_END`` first matches in ``content`` (-1: nowhere)."""
    crlf = content.find(b"\r\n\r\n")
    lf = content.find(b"\n\n", 0, len(content) if crlf < 0 else crlf)
    return crlf if lf < 0 else lf


def _has_field(header: bytes, name: bytes) -> bool:
    """Whether a line of ``header`` (lower-cased) starts with ``name``."""
    # find, not ``in`` (a TypeError made and dropped per test: see body.py)
    return header.startswith(name) or header.find(b"\n" + name) >= 0


_MESSAGE_ID_FIELD = re.compile(
    rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE
)


def message_id_key(sender: str, wire: bytes, recipients: Sequence[str] = ()) -> str | None:
    """The idempotency key of ``smtp.deduplicate = "message-id"``: the
    envelope sender, the ``Message-ID:`` header (unfolded, trimmed) and the
    set of ``recipients`` (their SHA-256: order and repeats do not count),
    or None when the message has no such header (then it is never taken for
    a retry of another).

    The recipients belong to the key because a retry after a lost reply
    repeats the whole transaction, while a sending MTA that splits one
    message's recipients over several transactions (Postfix does past its
    recipient limit) repeats sender and Message-ID with other recipients:
    that is not a copy. A key longer than an idempotency key may be
    (:data:`~spoold.idempotency.MAX_KEY_LENGTH`: a long sender and a long
    Message-ID) is replaced by its SHA-256, so such a message is still
    taken, once."""
    m = _HEADER_END.search(wire)
    header = wire[: m.start()] if m else wire
    found = _MESSAGE_ID_FIELD.search(header)
    if found is None:
        return None
    value = re.sub(rb"\r?\n[ \t]+", b" ", found.group(1)).strip()
    value = bytes(b for b in value if b >= 32 and b != 127)
    if not value:
        return None
    key = f"message-id <{sender}> {value.decode('utf-8', 'replace')}"
    if recipients:
        listed = "\n".join(sorted(set(recipients))).encode("utf-8", "surrogateescape")
        key += f" to {hashlib.sha256(listed).hexdigest()[:32]}"
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        key = f"message-id sha256 {digest}"
    return key


_date: tuple[int, str] = (-1, "")  # (second, that second as a header's date)


def _header_date() -> str:
    """The time now as a header's date (RFC 5322, local time), made once a
    second: ``email.utils.formatdate`` was a good part of a small message's
    work in the commit thread. One tuple, read and replaced whole: threads
    racing each other only format it once more."""
    global _date  # a cache of one value
    now = time.time()
    second, text = _date
    if int(now) != second:
        text = email.utils.formatdate(now, localtime=True)
        _date = (int(now), text)
    return text


def received_header(origin: Origin, message_id: str, hostname: str) -> bytes:
    """The ``Received:`` trace header naming the message's own spool id (and,
    for a local submission, the submitting uid and user name)."""
    source = f"from {_clean(origin.helo) or 'localhost'}"
    if origin.peer:
        source += f" ([{_clean(origin.peer)}])"
    if origin.uid is not None:  # who submitted locally, as Postfix's "from userid N"
        user = f", user {_clean(origin.user)}" if origin.user else ""
        source += f" (uid {origin.uid}{user})"
    return (
        f"Received: {source}\r\n\tby {hostname} (spoold) with {origin.protocol} "
        f"id {message_id};\r\n\t{_header_date()}\r\n"
    ).encode()


_UNSAFE = re.compile(r"[^\x21-\x7e]")


def _clean(text: str) -> str:
    """What a client told us (its HELO name) made safe for a header: printable
    ASCII without spaces, at most 255 characters; anything else becomes '?'."""
    text = text[:255]
    if text.isascii() and text.isprintable() and " " not in text:
        return text  # the usual name: nothing to replace
    return _UNSAFE.sub("?", text)


class MessageAdder(Protocol):
    """Where a submission goes: the owner's :class:`~spoold.spool.Spool`, or
    a :class:`~spoold.writer.SpoolWriter` in an ingest worker process."""

    @property
    def spool_dir(self) -> Path: ...

    @property
    def min_free_space(self) -> int:
        """Bytes that must stay free on the spool's filesystem (0: no floor)."""
        ...

    @property
    def suppressed_recipients(self) -> SuppressedRecipients:
        """Refuse or take (and fail) a submission to a suppressed recipient."""
        ...

    @property
    def suppressions(self) -> Suppressions:
        """The spool's suppression list as this process last read it."""
        ...

    async def add(
        self,
        batch: RoutedBatch,
        *,
        frozen: bool = False,
        flows: Sequence[str] = (),
        parent_id: str | None = None,
        prefix: Callable[[str], bytes] | None = None,
        idempotency_key: str | None = None,
        submitter_uid: int | None = None,
    ) -> list[str]: ...


class Submitter:
    """Turns submissions (SMTP, sendmail) into spooled messages: the line
    ending policy, trace headers, routing through the router the callable
    gives now (so a reload applies to the next submission), then
    :meth:`Spool.add <spoold.spool.Spool.add>`. Returns only once the
    messages are durable; raises for what the caller must refuse (bad
    content, no route, DNS) or report as temporary (store errors). Safe to
    use from many sessions at once."""

    def __init__(
        self,
        spool: MessageAdder,
        router: Callable[[], Router],
        *,
        hostname: str | None = None,
    ) -> None:
        self.spool = spool
        self.router = router
        # Our name in Received: and the Message-IDs we add (default: the
        # machine's, spoold.hostname); a reload may set it for what comes next.
        self.hostname = hostname or local_hostname()

    async def submit(
        self,
        sender: str,
        recipients: Sequence[str],
        content: bytes,
        *,
        origin: Origin,
        policy: LineEndingPolicy,
        mail_params: Sequence[str] = (),
        envelope_id: str = "",
        idempotency_key: str | None = None,
    ) -> list[str]:
        """Spool one submission given as message content; return the new
        message ids (for an ``idempotency_key`` seen before, the earlier
        submission's: nothing new is queued)."""
        return await self._spool(
            sender,
            recipients,
            Body.from_content(content, policy),
            origin,
            mail_params,
            envelope_id,
            idempotency_key,
        )

    async def submit_wire(
        self,
        sender: str,
        recipients: Sequence[str],
        wire: bytes,
        *,
        origin: Origin,
        policy: LineEndingPolicy,
        mail_params: Sequence[str] = (),
        envelope_id: str = "",
        idempotency_key: str | None = None,
        cut_at_end: bool = False,
    ) -> list[str]:
        """Spool one submission given in wire form (what an SMTP client sent
        between DATA and the final ``.`` line); return the new message ids.
        The bytes go to disk as they came, after our trace headers.
        ``cut_at_end``: the caller vouches that ``wire`` holds no
        end-of-data line (an SMTP session's :attr:`Delivery.wire
        <spoold.daemon.smtp_server.Delivery.wire>`, cut at the first), and
        it is not searched for one again; else :meth:`Body.from_wire
        <spoold.body.Body.from_wire>` refuses one (ValueError)."""
        take = Body._from_cut_wire if cut_at_end else Body.from_wire
        return await self._spool(
            sender,
            recipients,
            take(wire, policy),
            origin,
            mail_params,
            envelope_id,
            idempotency_key,
        )

    async def _spool(
        self,
        sender: str,
        recipients: Sequence[str],
        body: Body,
        origin: Origin,
        mail_params: Sequence[str],
        envelope_id: str,
        idempotency_key: str | None,
    ) -> list[str]:
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        submission_id = new_id()
        # The policy was applied above, before our own (CRLF) headers exist.
        local = origin.protocol == "local"
        extra = missing_headers(
            body.wire, submission_id, self.hostname, sender=sender if local else None
        )
        if extra:
            wire = body.wire
            if not _STARTS_WITH_HEADER.match(wire):
                extra += b"\r\n"  # no header section at all: ours ends before the text
            body = Body(extra + wire)
        envelopes = await self.router().route_with_mx(sender, recipients, mail_params, envelope_id)
        batch = RoutedBatch(envelopes, body)

        def received(message_id: str) -> bytes:
            return received_header(origin, message_id, self.hostname)

        return await self.spool.add(
            batch,
            parent_id=submission_id,
            flows=[submission_id],
            prefix=received,
            idempotency_key=idempotency_key,
            submitter_uid=origin.uid,
        )
