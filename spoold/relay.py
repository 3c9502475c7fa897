"""What the spool asks of a relay, and an in-memory relay for tests.

A relay attempt is given a snapshot of the message, a handle on its body and
the recipients to deliver to. It returns a value, never raises for an SMTP
outcome:

* :class:`Delivery` — the attempt reached a next hop; one
  :class:`RecipientResult` per recipient (a refusal at MAIL FROM or DATA is
  given to every recipient, marked with its :data:`ReplyPhase`);
* :class:`AttemptFailed` — no recipient got an answer (no hop reachable,
  timeout, give-up); the spool treats it as try-later.

An exception escaping a relay is a bug; the spool logs it and treats it as
:class:`AttemptFailed`, so nothing is lost. The one exception meant to
escape is :class:`~spoold.errors.BodyDamagedError`: the body file is not
what was spooled (a :class:`~spoold.body.BodyCheck` given with the handle
failed), nothing was sent past it, and the spool quarantines the message.

The body is reached through a :class:`BodyHandle`: :meth:`BodyHandle.read`
loads it whole (for tests and small tools); :meth:`BodyHandle.open` gives a
:class:`BodyReader` that streams the file as it is on disk, in chunks read
in worker threads, so relaying a message of any size takes a few chunks of
memory. A small body (one chunk) costs one thread hop in all: open, size,
read and close together (anyio's worker threads rather than aiofiles, which
would take a hop each for open, read and close: about 60 us of CPU apiece
here, more than the rest of a small message's relay). The file is only ever read, never rewritten. A
failure to read it is a :class:`~spoold.errors.StoreError` naming the file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import anyio

from spoold.body import Body, BodyCheck
from spoold.errors import BodyDamagedError, StoreError
from spoold.message import Message

__all__ = [
    "RecipientResult",
    "ReplyPhase",
    "Delivery",
    "AttemptFailed",
    "RelayOutcome",
    "BodyHandle",
    "BodyReader",
    "BodyFacts",
    "CHUNK_SIZE",
    "Relay",
]


ReplyPhase = Literal["rcpt", "mail", "data", "local"]
"""Where a :class:`RecipientResult` came from: the hop's reply to this
recipient's own ``RCPT`` (``rcpt``), a reply to ``MAIL FROM`` or to the
message (``data``: the ``DATA`` command or the end of the message) that was
given to every recipient of the transaction, or an answer spoold made
itself without asking the hop (``local``: an address it cannot send, a
message the hop cannot take, a suppressed recipient, no reply at all).
Only a ``rcpt`` reply says something about the recipient's mailbox."""


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The next hop's answer for one recipient. ``in_doubt``: there was no
    answer to the end of the message (a timeout or a lost connection after
    the final ``.`` was sent), so the hop may have taken it: not a refusal,
    not a delivery; the spool handles it as after a crash
    (``after_crash``). ``phase``: which reply it is (:data:`ReplyPhase`;
    a relay that answers per recipient leaves the default)."""

    code: int
    text: str = ""
    enhanced_status: str | None = None
    in_doubt: bool = False
    phase: ReplyPhase = field(default="rcpt", compare=False)  # equal replies are equal

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def throttling(self) -> bool:
        """Whether the hop asks us to slow down: ``421``, or an enhanced
        status of class 4, subject 7 (``4.7.x``: a policy deferral)."""
        return self.code == 421 or (self.enhanced_status or "").startswith("4.7.")

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced_status:
            parts.append(self.enhanced_status)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A hop answered: ``recipients`` maps each recipient to its answer;
    ``hop`` is the next hop that gave them."""

    recipients: Mapping[str, RecipientResult]
    hop: str = ""


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    """No hop answered for any recipient (none reachable, a timeout or a
    lost connection before the end of DATA): everyone is tried later.
    ``throttled_hops``: the hops that turned us away with a throttling
    reply before any transaction (a ``421`` greeting, say)."""

    error: str
    throttled_hops: tuple[str, ...] = ()


RelayOutcome = Delivery | AttemptFailed


CHUNK_SIZE: Final = 64 * 1024
"""How much of a body is read (and sent) at a time."""

_SCAN_SIZE: Final = 256 * 1024  # read size when looking for 8-bit bytes


_WHOLE_SIZE: Final = 256 * 1024
"""A body up to this size is read whole when opened (one read, then closed)."""

RunBlocking = Callable[..., Awaitable[Any]]
"""Runs a short blocking call off the event loop: ``await run(fn, *args)``."""


class BodyHandle:
    """Where a message's body is on disk; reading it runs in worker threads
    (through ``run``, by default a hop of its own). With ``check``, every
    read is checked against what was spooled: :meth:`read` and :meth:`open`
    at once for a body read whole, :meth:`BodyReader.facts` and each pass
    of :meth:`BodyReader.chunks` (at its end, before the last chunk is
    handed on) for a larger one.

    ``ready``: what :meth:`read_ahead_sync` found, read in an earlier hop
    the caller made anyway (the spool reads it with the checkout of the
    record): the first :meth:`open` or :meth:`read` gives it (a reader, or
    its error raised) with no hop of its own."""

    __slots__ = ("_ready", "_run", "check", "path")

    def __init__(
        self,
        path: Path,
        run: RunBlocking | None = None,
        check: BodyCheck | None = None,
        ready: BodyReader | Exception | None = None,
    ) -> None:
        self.path = path
        self._run: RunBlocking = run or anyio.to_thread.run_sync
        self.check = check
        self._ready = ready

    @staticmethod
    def read_ahead_sync(path: Path, check: BodyCheck | None) -> BodyReader | Exception | None:
        """(Blocking) the body at ``path`` read whole and checked, as
        :meth:`open` would give it, or the error opening it would raise;
        None for a body not known to fit in one read (no check, or larger
        than that), which :meth:`open` reads itself. Never holds a file,
        never raises (it runs in the checkout's hop: an error there would
        fail the checkout)."""
        if check is None or check.size > max(CHUNK_SIZE, _WHOLE_SIZE):
            return None
        try:
            reader = BodyReader.open_sync(path, CHUNK_SIZE, check)
        except Exception as exc:  # noqa: BLE001 (raised where the body is opened)
            return exc
        if reader.holds_file:  # not read whole after all: open() reads it itself
            with suppress(OSError):
                reader.close_sync()
            return None
        return reader

    def _take_ready(self) -> BodyReader | None:
        """What was read ahead, once (a body read whole is the same
        whatever the chunk size asked for)."""
        ready, self._ready = self._ready, None
        if isinstance(ready, Exception):
            raise ready
        return ready

    async def read(self) -> Body:
        """The whole body in memory."""
        ready = self._take_ready()
        if ready is not None:
            return Body(ready.head)
        try:
            wire = await anyio.Path(self.path).read_bytes()
        except OSError as exc:
            raise _read_error(self.path, exc) from exc
        if self.check is not None:
            self.check.sizes(self.path, len(wire))
            self.check.digest(self.path, hashlib.sha256(wire).hexdigest())
        return Body(wire)

    @asynccontextmanager
    async def open(self, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[BodyReader]:
        """The body open for streaming; closed on leaving the block."""
        reader = self._take_ready() or await self._run(
            BodyReader.open_sync, self.path, chunk_size, self.check
        )
        try:
            yield reader
        finally:
            if reader.holds_file:
                with anyio.CancelScope(shield=True):
                    await reader.aclose()

    def __repr__(self) -> str:
        return f"BodyHandle({str(self.path)!r})"


def _read_error(path: Path, exc: OSError) -> StoreError:
    return StoreError(f"cannot read the message body {path}: {exc.strerror or exc}")


class BodyFacts:
    """``content_size``: the size of the message as SIZE counts it (RFC
    1870: CRLF included, the dots added by dot-stuffing not); ``eight_bit``:
    whether any byte is beyond ASCII (the message needs 8BITMIME).

    The facts of a body held whole (:meth:`of`) count its dot-stuffed lines
    only when ``content_size`` is first asked for: a pass over the whole
    body that a hop not offering SIZE never needs."""

    __slots__ = ("_content_size", "_wire", "eight_bit")

    def __init__(self, content_size: int, eight_bit: bool) -> None:
        self._content_size: int | None = content_size
        self._wire = b""
        self.eight_bit = eight_bit

    @classmethod
    def of(cls, wire: bytes) -> BodyFacts:
        """The facts of ``wire``, a whole body in wire form."""
        facts = cls(0, not wire.isascii())
        facts._content_size, facts._wire = None, wire
        return facts

    @property
    def content_size(self) -> int:
        size = self._content_size
        if size is None:
            wire, self._wire = self._wire, b""
            stuffed = wire.count(b"\r\n.") + (1 if wire.startswith(b".") else 0)
            self._content_size = size = len(wire) - stuffed
        return size

    def __repr__(self) -> str:
        return f"BodyFacts(content_size={self.content_size}, eight_bit={self.eight_bit})"


class BodyReader:
    """A body file open for reading: its ``size``, its first chunk
    (``head``: the whole body when it fits in one chunk) and chunks from
    the start on demand (:meth:`chunks`, any number of times: one per next
    hop tried). Reads use ``pread``, so scans and streams never disturb each
    other."""

    __slots__ = ("_chunk_size", "_facts", "_fd", "check", "head", "path", "size")

    def __init__(
        self,
        path: Path,
        fd: int | None,
        size: int,
        head: bytes,
        chunk_size: int,
        check: BodyCheck | None = None,
    ) -> None:
        self.path = path
        self.size = size
        self.head = head
        self._fd = fd  # None once everything is in ``head``
        self._chunk_size = chunk_size
        self._facts: BodyFacts | None = None
        self.check = check  # for a body read whole: checked already

    @classmethod
    def open_sync(cls, path: Path, chunk_size: int, check: BodyCheck | None = None) -> BodyReader:
        """Open, measure and read the first chunk (in a worker thread): the
        whole body, and the file closed at once, when it is small. With
        ``check``: the size is checked, and a body read whole is checked
        whole."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _read_error(path, exc) from exc
        try:
            if check is not None and check.size <= max(chunk_size, _WHOLE_SIZE):
                # Small, of a known size: read one byte more than it has (a
                # longer file shows) instead of asking its size first.
                head = os.pread(fd, check.size + 1, 0)
                size = len(head)
                if size != check.size:
                    check.sizes(path, os.fstat(fd).st_size)  # the error says its size
                    check.sizes(path, size)  # (it changed while read)
            else:
                size = os.fstat(fd).st_size
                if check is not None:
                    check.sizes(path, size)
                head = os.pread(fd, size if size <= max(chunk_size, _WHOLE_SIZE) else chunk_size, 0)
        except OSError as exc:
            os.close(fd)
            raise _read_error(path, exc) from exc
        except BodyDamagedError:
            os.close(fd)
            raise
        if len(head) >= size:
            os.close(fd)
            if check is not None:
                check.sizes(path, len(head))
                check.digest(path, hashlib.sha256(head).hexdigest())
            return cls(path, None, len(head), head, chunk_size)
        return cls(path, fd, size, head, chunk_size, check)

    @property
    def holds_file(self) -> bool:
        """Whether the file is still open (a small body is read and closed
        at once)."""
        return self._fd is not None

    def close_sync(self) -> None:
        """(Blocking) close the file, if still open."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    async def aclose(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            await anyio.to_thread.run_sync(os.close, fd)

    async def facts(self) -> BodyFacts:
        """What SMTP needs to know before MAIL; found once, by one pass over
        the file in chunks in a worker thread (no thread for a body that
        fits in one chunk)."""
        if self._facts is None:
            if len(self.head) >= self.size:
                self._facts = BodyFacts.of(self.head)
            else:
                self._facts = await anyio.to_thread.run_sync(self._scan_sync)
        return self._facts

    def _scan_sync(self) -> BodyFacts:
        offset = 0
        stuffed = 1 if self.head.startswith(b".") else 0
        eight_bit = False
        tail = b""
        digest = hashlib.sha256()
        while offset < self.size:
            chunk = self.head if offset == 0 else self._pread(_SCAN_SIZE, offset)
            if not chunk:
                break
            # A "\r\n." is counted in the chunk holding its last byte.
            stuffed += (tail + chunk[:2]).count(b"\r\n.") + chunk.count(b"\r\n.")
            eight_bit = eight_bit or not chunk.isascii()
            tail = chunk[-2:]
            offset += len(chunk)
            digest.update(chunk)
        if self.check is not None:  # before anything is sent
            self.check.sizes(self.path, offset)
            self.check.digest(self.path, digest.hexdigest())
        return BodyFacts(offset - stuffed, eight_bit)

    def _pread(self, size: int, offset: int) -> bytes:
        if self._fd is None:
            raise _read_error(self.path, OSError(9, "the body file is closed"))
        try:
            return os.pread(self._fd, size, offset)
        except OSError as exc:
            raise _read_error(self.path, exc) from exc

    async def read_at(self, offset: int) -> bytes:
        """The chunk at ``offset`` (b"" at the end)."""
        if offset >= self.size:
            return b""
        if offset == 0:
            return self.head
        size = min(self._chunk_size, self.size - offset)
        return await anyio.to_thread.run_sync(self._pread, size, offset)

    def _pread_hashed(self, size: int, offset: int, digest: hashlib._Hash) -> bytes:
        chunk = self._pread(size, offset)
        digest.update(chunk)
        return chunk

    def chunks(self) -> AsyncIterator[bytes]:
        """The body from its start, one chunk per step."""
        return _Chunks(self)


class _Chunks:
    """An async iterator over a :class:`BodyReader` (a plain object, not an
    async generator: dropping it half-way leaves nothing to finalise).

    A body with a check (one not read whole) is hashed as it is read, in
    the reading threads, and checked when its end is reached, before the
    iteration ends: a sender that writes each chunk only once it has the
    next (as :meth:`SmtpClient.send_content
    <spoold.smtp_client.SmtpClient.send_content>` does) never sends the
    last chunk, nor the final dot, of a damaged body."""

    __slots__ = ("_digest", "_offset", "_reader")

    def __init__(self, reader: BodyReader) -> None:
        self._reader = reader
        self._offset = 0
        self._digest = hashlib.sha256() if reader.check is not None else None

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        reader, digest, offset = self._reader, self._digest, self._offset
        if digest is None:
            chunk = await reader.read_at(offset)
        elif offset >= reader.size:
            chunk = b""
        elif offset == 0:
            chunk = reader.head
            digest.update(chunk)
        else:
            size = min(reader._chunk_size, reader.size - offset)
            chunk = await anyio.to_thread.run_sync(reader._pread_hashed, size, offset, digest)
        if not chunk:
            if digest is not None and reader.check is not None:
                reader.check.sizes(reader.path, offset)
                reader.check.digest(reader.path, digest.hexdigest())
            raise StopAsyncIteration
        self._offset += len(chunk)
        return chunk


class Relay(Protocol):
    """What the spool asks of a relay: one attempt at one message.

    ``relay(message, body, recipients)`` gets a snapshot of the record
    (changing it changes nothing), a handle on the body file (read it
    through :meth:`BodyHandle.open`, never write it) and the recipients
    still to deliver. It returns a :class:`Delivery` with one
    :class:`RecipientResult` per recipient it reached a hop for (a
    recipient it gives no result for counts as ``451``), or
    :class:`AttemptFailed` when no hop answered. It must not raise for an
    SMTP outcome; an exception that escapes is a bug, which the spool logs
    and treats as :class:`AttemptFailed`. Several attempts (of different
    messages) run at once; cancellation (a shutdown) may cut one short, and
    the message is then tried again at the next start.
    """

    async def relay(
        self, message: Message, body: BodyHandle, recipients: Sequence[str]
    ) -> RelayOutcome: ...
