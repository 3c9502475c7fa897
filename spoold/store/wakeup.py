"""The wake-up socket: how writers tell the owner about new entries.

The owner binds a Unix datagram socket at ``STORE/wakeup``
(:meth:`Wakeup.receive`); a writer that enqueued entries sends their names
to it (:meth:`Wakeup.try_send`, :meth:`Wakeup.send`), so the owner need not
poll. It is only a trigger: the truth stays on disk, and an owner that
missed a datagram (it was not running, or its queue stayed full) finds the
entries at its next rescan or open.

A datagram carries names separated by spaces; what is not an id is
ignored. A writer may add, after a space, a NUL and a version byte (1),
the records it just made durable, one frame per name in the order of the
names (a 4-byte big-endian length, then the record's bytes; length 0: none
for that name), so the owner need not read them back. An owner of an
earlier version splits a datagram on whitespace: it hears every name (and
tokens of the records, found nowhere on disk) and reads the records.

The records are taken on two assumptions, not checked against the disk:

- only the owner's own user sends them: the socket is 0660, and anyone in
  the spool's group may send to it, so the owner asks the kernel for each
  sender's uid (``SO_PASSCRED``) and takes a datagram from any other user
  for its names alone (the records are read from disk, as before). Root is
  trusted too: it can write the spool's files themselves.
- the owner never rewrites a file it has not indexed, and a writer writes a
  record once (it sends it after its commit is durable): so a file still
  in the queue named, with the size of the record sent, is that record.
  The owner checks just that (a ``stat``), and reads the file otherwise.

A datagram whose frames do not exactly match its names (truncated, from a
later version) is taken for its names alone, and a name sent with two
different records in one batch is read from disk.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import re
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Literal

import anyio
import anyio.abc
import anyio.lowlevel

from spoold.ids import MAX_ID_LENGTH, is_valid_id

__all__ = ["Wakeup", "NotifyResult", "Woken", "MAX_DATAGRAM"]

NotifyResult = Literal["sent", "busy", "absent"]

# What the owner hears in one go: each name reported, with the record sent
# along with it (None: none came, read it from disk), in the order heard.
Woken = dict[str, bytes | None]

_NAMES_DATAGRAM = 8192  # bytes: a datagram of names alone (a few hundred ids)
# What the owner reads at once, and the largest datagram a writer sends:
# a batch of a group commit (about 8 records of 1 KiB a worker) goes in
# one, and several fit in a Unix socket's default send buffer (212,992
# bytes on Linux), which counts the datagrams not read yet.
MAX_DATAGRAM = 65536
_SEND_DATAGRAM = 32768
# Names, then the records (format 1). The space keeps the last name apart
# for an owner of an earlier version, which splits a datagram on whitespace.
_RECORDS = b" \x00\x01"
_FRAME = 4  # bytes of a record's length
# The sender's credentials (Linux): struct ucred (pid, uid, gid), which the
# kernel adds to each datagram for a socket with SO_PASSCRED. Without it
# (another system), no sender is trusted with records.
_PASSCRED: int | None = getattr(socket, "SO_PASSCRED", None)
_CREDENTIALS: int | None = getattr(socket, "SCM_CREDENTIALS", None)
_UCRED = struct.Struct("iII")
_ANCILLARY = socket.CMSG_SPACE(_UCRED.size)
# Ids (as spoold.ids allows them) separated by single spaces.
_NAMES = re.compile(
    rb"[A-Za-z0-9_-]{1,%d}(?: [A-Za-z0-9_-]{1,%d})*" % (MAX_ID_LENGTH, MAX_ID_LENGTH)
)


def sender_uid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The sender's uid in a datagram's ancillary data (``recvmsg``'s, on a
    socket with ``SO_PASSCRED``); None if it is not there."""
    uid = None
    for level, kind, data in ancillary:
        if level != socket.SOL_SOCKET:
            continue
        if kind == _CREDENTIALS and len(data) >= _UCRED.size:
            uid = _UCRED.unpack_from(data)[1]
        elif kind == socket.SCM_RIGHTS:  # never asked for: close what came
            for fd in array.array("i", data[: len(data) - len(data) % 4]):
                with contextlib.suppress(OSError):
                    os.close(fd)
    return uid


def parse_datagram(packet: bytes, *, trusted: bool = True) -> Woken:
    """The names of one datagram, each with the record sent for it (if the
    frames match the names exactly; else none). ``trusted``: False for a
    sender not trusted with records (names only)."""
    head, sep, tail = packet.partition(b"\x00")
    if head[-1:] == b" ":  # (the space before the records)
        head = head[:-1]
    tokens = head.decode("ascii", "replace").split()
    if _NAMES.fullmatch(head):  # every name an id (as writers send them): one check
        woken: Woken = dict.fromkeys(tokens)
    else:
        woken = dict.fromkeys(n for n in tokens if is_valid_id(n))
    if not trusted or not sep or tail[:1] != _RECORDS[2:] or len(woken) != len(tokens):
        return woken
    records: list[bytes] = []
    at, end = 1, len(tail)
    while at < end and len(records) < len(tokens):
        size = int.from_bytes(tail[at : at + _FRAME], "big")
        at += _FRAME
        records.append(tail[at : at + size])
        at += size
    if at != end or len(records) != len(tokens) or len(woken) != len(tokens):
        return woken  # truncated, or not what it says: names only
    for name, record in zip(tokens, records, strict=True):
        if record:
            woken[name] = record
    return woken


def _merge(into: Woken, more: Woken, conflicts: set[str]) -> None:
    """Add ``more`` to ``into``; a name heard twice keeps a record it was
    sent, unless two different ones came (then none: read from disk, and
    ``conflicts`` keeps it so for the datagrams after)."""
    for name, record in more.items():
        if name not in into:
            into[name] = record
        elif record is not None and name not in conflicts:
            known = into[name]
            if known is None:
                into[name] = record
            elif known != record:
                into[name] = None
                conflicts.add(name)


def _datagrams(
    names: Sequence[str], records: Sequence[bytes | None] | None
) -> list[tuple[bytes, int]]:
    """``names`` (with ``records``, in the same order) as datagrams of at
    most :data:`_SEND_DATAGRAM` bytes, each with the count of names it
    carries; a record too large to go in one is left out (the owner reads
    it)."""
    if records is None or not any(records):
        chunk = _NAMES_DATAGRAM // (17 + 1)
        return [
            (
                " ".join(names[start : start + chunk]).encode("ascii"),
                len(names[start : start + chunk]),
            )
            for start in range(0, len(names), chunk)
        ]
    out: list[tuple[bytes, int]] = []
    batch: list[str] = []
    frames: list[bytes] = []
    size = len(_RECORDS)
    for name, record in zip(names, records, strict=True):
        data = record or b""
        cost = len(name) + 1 + _FRAME + len(data)
        if len(_RECORDS) + cost > _SEND_DATAGRAM:
            data = b""  # too large to send: the owner reads it from disk
            cost = len(name) + 1 + _FRAME
        if batch and size + cost > _SEND_DATAGRAM:
            out.append((_pack(batch, frames), len(batch)))
            batch, frames, size = [], [], len(_RECORDS)
        batch.append(name)
        frames.append(len(data).to_bytes(_FRAME, "big") + data)
        size += cost
    if batch:
        out.append((_pack(batch, frames), len(batch)))
    return out


def _pack(names: list[str], frames: list[bytes]) -> bytes:
    return b"".join([" ".join(names).encode("ascii"), _RECORDS, *frames])


class Wakeup:
    """The wake-up socket at ``path``: the owner's end and the writers'."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._send_socket: socket.socket | None = None

    @asynccontextmanager
    async def receive(self) -> AsyncIterator[AsyncIterator[Woken]]:
        """(Owner) bind the socket; yields an iterator of what other
        processes report (names, each with the record sent along, if any).
        A stale socket file is replaced."""
        path = self.path
        with contextlib.suppress(FileNotFoundError):
            await anyio.Path(path).unlink()
        sock = await anyio.create_unix_datagram_socket(local_path=path, local_mode=0o660)

        raw: socket.socket = sock.extra(anyio.abc.SocketAttribute.raw_socket)
        if _PASSCRED is not None:  # each datagram then comes with its sender's uid
            raw.setsockopt(socket.SOL_SOCKET, _PASSCRED, 1)
        senders = {os.geteuid(), 0}  # trusted with records: see the module's doc

        def read_one() -> Woken | None:
            """One queued datagram's names (and records, if the sender may
            send them); None when none is queued."""
            try:
                packet, ancillary, _, _ = raw.recvmsg(MAX_DATAGRAM, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return None
            return parse_datagram(packet, trusted=sender_uid(ancillary) in senders)

        async def batches() -> AsyncIterator[Woken]:
            while True:
                woken = read_one()
                if woken is None:
                    await anyio.wait_readable(raw)
                    continue
                # Take every datagram already queued too: one batch for all
                # (the queue is short, and writers wait while it is full).
                conflicts: set[str] = set()
                while (more := read_one()) is not None:
                    _merge(woken, more, conflicts)
                if woken:
                    yield woken
                else:
                    await anyio.lowlevel.checkpoint()

        try:
            yield batches()
        finally:
            with anyio.CancelScope(shield=True):
                await sock.aclose()
                with contextlib.suppress(OSError):
                    await anyio.Path(path).unlink()

    def try_send(
        self, names: Sequence[str], records: Sequence[bytes | None] | None = None
    ) -> NotifyResult:
        """(Writer) tell the owner about new entries, without waiting: a
        non-blocking send (fit for the event loop). ``records``: their
        records as just made durable (never before), in the order of
        ``names`` (None for one not sent), so the owner need not read them
        back. ``"sent"``; ``"busy"`` when the owner's queue is full (try
        again shortly: ``names`` not sent yet, or not all); ``"absent"``
        when no owner listens (it will find them when it opens the spool).
        Long lists go in several datagrams."""
        return self.send_some(names, records)[0]

    def send_some(
        self, names: Sequence[str], records: Sequence[bytes | None] | None = None
    ) -> tuple[NotifyResult, int]:
        """:meth:`try_send`, and how many of ``names`` were sent: on
        ``"busy"``, those after them are to be sent again (not the others:
        a writer that sends all again fills the queue again with them)."""
        if self._send_socket is None:
            self._send_socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        done = 0
        for payload, count in _datagrams(names, records):
            try:
                self._send_socket.sendto(payload, self.path)
            except (BlockingIOError, InterruptedError):
                return "busy", done
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:
                    return "absent", done
                # Larger than this socket takes (a smaller send buffer):
                # the names alone, and the owner reads the records.
                result, sent = self.send_some(names[done : done + count])
                if result != "sent":
                    return result, done + sent
            done += count
        return "sent", done

    async def send(self, names: Sequence[str]) -> bool:
        """(Writer) tell the owner about new entries, waiting up to 2 s while
        its queue is full; False if no owner listens or it stayed busy (it
        will still find them, at its next rescan or open)."""
        pause = 0.005
        for _ in range(9):  # about 2.5 s in all
            result = self.try_send(names)
            if result != "busy":
                return result == "sent"
            await anyio.sleep(pause)
            pause *= 2
        return False

    def close_sync(self) -> None:
        if self._send_socket is not None:
            self._send_socket.close()
            self._send_socket = None
