"""The suppression list: recipients spoold does not send to, each until a time.

A recipient lands on the list when a next hop refuses it for good in a way
that says the mailbox does not exist (a *hard bounce*: see
:func:`spoold.outcome.hard_bounces`), for ``spool.suppress_after_hard_bounce``,
or when an operator adds it (``spoold suppress add``). While an entry lasts,
a new submission to the address is refused (``suppressed_recipients =
"refuse"``: 550 at ``RCPT``, :class:`~spoold.errors.RecipientSuppressedError`
from ``add``) or taken and failed at its first attempt (``"fail"``), and no
attempt of a queued message sends to it.

Addresses are kept *normalised* (:func:`normalise`): the whole address in
lower case, the domain as its ASCII (``xn--``) form, the local part in NFC
and without quotes it does not need. The domain is case-blind by definition; the local part may be
case-sensitive by RFC 5321, but no mailbox provider in use treats
``Alice@`` and ``alice@`` as two people, and the list errs on the side of
not sending: a dead mailbox must not be reachable again by changing case.

On disk: one file, ``SPOOL/suppressed``, JSON lines: a first line
``{"version": 1}``, then one entry a line (``address``, ``since``,
``until``, ``reason``, ``source``: ``bounce`` or ``operator``), sorted by
address. Only the spool's owner writes it, always whole (a temporary file
in ``tmp/``, fsynced, renamed over it, the directory fsynced), in a worker
thread, one write at a time: changes made while a write is under way (many
bounces at once) go out together in the next one. A change is made in
memory first, so this process applies it at once; the call that made it
returns once it is durable. Entries that ended are dropped when the list
is full and by housekeeping (:meth:`Suppressions.prune`).
Other processes (the SMTP ingest workers) read it and read it again when it
changed (:meth:`Suppressions.stale`, asked at each ``RCPT`` and ``add``;
:meth:`Suppressions.refresh` reads it again in a worker thread, one reading
at a time: the sessions that find it changed meanwhile wait for it). How a
reader knows it changed:

* an ingest worker follows the owner's change count
  (:meth:`Suppressions.change_counter`, passed to it by the daemon;
  :meth:`Suppressions.follow`): a :class:`~spoold.shared_counter.SharedCounter`
  the owner adds one to once each write is durable, before the change's
  caller returns. ``stale`` is then one load from shared memory: no system
  call, no file touched on the event loop;
* any other reader (a :class:`~spoold.writer.SpoolWriter` in a process the
  daemon did not start) compares the file's identity (inode, size, change
  and modification times) with what was read: one ``stat(2)`` of a file the
  kernel has cached (the owner sets each new file's modification time at
  least a microsecond past the last one's, so two writes within one clock
  tick still differ, even when the inode is reused and the size is the
  same; see ``docs/on-disk-format.md``).

Either way an entry is in force in every reader from the first question
asked after the change's caller (``spoold suppress add``) returned.

The list is bounded (``spool.max_suppressed``): when an addition would take
it past the bound, the entries closest to their end are dropped first.

A damaged file (a line that does not decode: the file was edited or cut by
something other than spoold) loses only the damaged lines: the others are
kept, the damage is logged with the line numbers, and the owner copies the
damaged file aside to ``SPOOL/suppressed.damaged`` (``.damaged.1``, ... when
that exists) before its next write replaces it. A file of a newer format version is refused with a
:class:`~spoold.errors.StoreError` (nothing is overwritten).
"""

from __future__ import annotations

import heapq
import os
import re
import shutil
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from time import monotonic, time_ns
from typing import Annotated, Literal

import anyio
import msgspec
import structlog

from spoold.errors import StoreError
from spoold.relay import RecipientResult
from spoold.shared_counter import SharedCounter
from spoold.store.directory import replace_file

__all__ = [
    "SUPPRESSION_FILE",
    "SUPPRESSION_FORMAT_VERSION",
    "DEFAULT_MAX_SUPPRESSED",
    "DEFAULT_OPERATOR_SPAN",
    "SUPPRESSED_STATUS",
    "SuppressedRecipients",
    "SuppressionSource",
    "SuppressionCount",
    "SUPPRESSION_COUNTS",
    "Suppression",
    "Suppressions",
    "normalise",
    "suppression_for",
    "refused_everyone",
    "STORM_RECIPIENTS",
    "clean_reason",
    "MAX_REASON",
    "encode_list",
    "decode_list",
]

log = structlog.get_logger("spoold.suppression")

SUPPRESSION_FILE = "suppressed"
DAMAGED_SUFFIX = ".damaged"
SUPPRESSION_FORMAT_VERSION = 1
DEFAULT_MAX_SUPPRESSED = 100_000
DEFAULT_OPERATOR_SPAN = timedelta(days=30)
"""How long ``spoold suppress add`` without ``--for`` suppresses, when
``suppress_after_hard_bounce`` is off (when it is set, that span)."""
UNREADABLE_LOG_INTERVAL = 60.0
"""Seconds between two log lines of a reader that cannot read the list."""
SUPPRESSED_STATUS = "5.7.1"
"""The enhanced status of a recipient refused or failed because it is
suppressed: a refusal by our own policy, not news about the mailbox."""

SuppressedRecipients = Literal["refuse", "fail"]
"""What a submission to a suppressed recipient gets: refused (550 at RCPT,
an error from ``add``), or taken and the recipient failed at once."""
SuppressionSource = Literal["bounce", "operator"]
SuppressionCount = Literal["refused", "failed", "bounced"]
SUPPRESSION_COUNTS: tuple[SuppressionCount, ...] = ("refused", "failed", "bounced")


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")


def normalise(address: str) -> str:
    """The form an address is kept and looked up in, one for every spelling
    of a mailbox: surrounding spaces and angle brackets dropped; the local
    part in Unicode NFC and lower case (see the module's docstring for
    why), and unquoted when the quotes are not needed (``"gone"@`` is
    ``gone@``); the domain in lower case as its ASCII form (``xn--``
    labels for a non-ASCII one)."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    local, at, domain = text.rpartition("@")
    if not at:
        return unicodedata.normalize("NFC", text.lower())
    local = unicodedata.normalize("NFC", local.lower())
    if len(local) > 2 and local[0] == local[-1] == '"' and _DOT_ATOM.fullmatch(local[1:-1]):
        local = local[1:-1]
    return f"{local}@{_ascii_domain(domain)}"


def _ascii_domain(domain: str) -> str:
    """``domain`` in lower case, its A-labels when it is not ASCII (left
    as it is, in lower case, when it cannot be: it is refused elsewhere)."""
    text = domain.lower()
    if text.isascii():
        return text
    try:
        return text.encode("idna").decode("ascii")
    except UnicodeError:
        return unicodedata.normalize("NFC", text)


_Time = Annotated[datetime, msgspec.Meta(tz=True)]


class Suppression(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One suppressed address (normalised) from ``since`` until ``until``
    (UTC), with the reason (the next hop's reply, or an operator's words)."""

    address: str
    since: _Time
    until: _Time
    reason: str = ""
    source: SuppressionSource = "operator"

    def describe(self, *, reason: bool = True) -> str:
        """One line for a person: ``suppressed until TIME (REASON)``.
        Without ``reason`` for whoever is not the operator (an SMTP
        client, a notification's reader): the reason may be an operator's
        private note, or a next hop's reply naming its internal hosts."""
        until = self.until.strftime("%Y-%m-%dT%H:%M:%SZ")
        shown = f" ({self.reason})" if self.reason and reason else ""
        return f"suppressed until {until}{shown}"


class _Header(msgspec.Struct):
    version: int


_encoder = msgspec.json.Encoder()
_header_decoder = msgspec.json.Decoder(_Header)
_entry_decoder = msgspec.json.Decoder(Suppression)
_all_decoder = msgspec.json.Decoder(list[Suppression])


def encode_list(entries: Iterable[Suppression]) -> bytes:
    """The file's bytes for ``entries`` (sorted by address)."""
    lines = [_encoder.encode(_Header(SUPPRESSION_FORMAT_VERSION))]
    lines += [_encoder.encode(e) for e in sorted(entries, key=lambda e: e.address)]
    return b"\n".join(lines) + b"\n"


def decode_list(data: bytes, path: str = SUPPRESSION_FILE) -> tuple[list[Suppression], list[int]]:
    """The entries of a file's bytes and the numbers of its damaged lines
    (each skipped). An empty file is an empty list; a file whose first line
    is not a header counts that line as damaged and reads on. Raises
    :class:`StoreError` for a newer format version."""
    entries: list[Suppression] = []
    damaged: list[int] = []
    lines = data.split(b"\n")
    start = 0
    if lines and lines[0].strip():
        try:
            header = _header_decoder.decode(lines[0])
        except msgspec.DecodeError:
            header = None
        if header is not None:
            if header.version > SUPPRESSION_FORMAT_VERSION:
                raise StoreError(
                    f"{path}: written by a newer spoold (format version {header.version}; "
                    f"this one reads up to {SUPPRESSION_FORMAT_VERSION})"
                )
            start = 1
    body = [line for line in lines[start:] if line.strip()]
    try:  # one call for the whole file: what a file spoold wrote takes
        entries = _all_decoder.decode(b"[" + b",".join(body) + b"]")
    except msgspec.DecodeError:  # damaged: line by line, to keep the rest
        entries = []
        for number, line in enumerate(lines[start:], start + 1):
            if not line.strip():
                continue
            try:
                entries.append(_entry_decoder.decode(line))
            except msgspec.DecodeError:
                damaged.append(number)
    entries = [
        e
        if e.address == normalise(e.address)
        else msgspec.structs.replace(e, address=normalise(e.address))
        for e in entries
    ]
    return entries, damaged


class _FileId(msgspec.Struct, frozen=True):
    ino: int
    size: int
    ctime_ns: int
    mtime_ns: int


_UNREADABLE = _FileId(-1, -1, -1, -1)
"""The identity of a file ``stat`` fails on: never what was read, so a
reader tries to read it again (and says why it cannot)."""


def _file_id(path: Path) -> _FileId | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return _UNREADABLE
    return _FileId(st.st_ino, st.st_size, st.st_ctime_ns, st.st_mtime_ns)


def _read_sync(path: Path) -> tuple[list[Suppression], list[int], _FileId | None]:
    """The file's entries, its damaged lines and the identity of what was
    read (None: no file)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return [], [], None
    except OSError as exc:
        raise StoreError(f"cannot read the suppression list {path}: {exc.strerror}") from None
    entries, damaged = decode_list(data, str(path))
    return entries, damaged, _FileId(st.st_ino, st.st_size, st.st_ctime_ns, st.st_mtime_ns)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _copy_damaged(path: Path) -> None:
    """Copy a damaged list aside, to a name of its own (``suppressed.damaged``,
    then ``.damaged.1``, ...): an earlier copy is never overwritten, and a
    symbolic link in the copy's place is never followed."""
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for n in range(1000):
            name = path.name + DAMAGED_SUFFIX + (f".{n}" if n else "")
            try:
                dst = os.open(path.with_name(name), _CREATE, 0o640)
            except FileExistsError:
                continue
            with open(dst, "wb") as writer, open(src, "rb", closefd=False) as reader:
                shutil.copyfileobj(reader, writer)
            return
        raise OSError(f"{path}{DAMAGED_SUFFIX}.*: 1000 copies already, none made")
    finally:
        os.close(src)


def _write_sync(
    path: Path, tmp_dir: Path, entries: list[Suppression], keep_damaged: bool, mtime_ns: int = 0
) -> None:
    """Write the whole list (temporary file, fsync, rename, fsync dir).
    ``mtime_ns``: the file's modification time (readers see a change by
    it even when inode, size and change time come out the same)."""
    tmp = tmp_dir / f"{os.getpid()}.{SUPPRESSION_FILE}.list.tmp"  # tmp/'s PID.NAME.KIND
    try:
        if keep_damaged and path.exists():
            _copy_damaged(path)
        replace_file(path, tmp, encode_list(entries), mode=0o640, mtime_ns=mtime_ns)
    except OSError as exc:
        raise StoreError(f"cannot write the suppression list {path}: {exc}") from None


class Suppressions:
    """The suppression list of one spool directory (see the module's
    docstring). ``owner``: this process writes it (the spool's owner);
    otherwise it only reads it, again whenever it changed."""

    def __init__(self, spool_dir: Path, *, owner: bool) -> None:
        self.path = spool_dir / SUPPRESSION_FILE
        self._tmp_dir = spool_dir / "tmp"
        self.owner = owner
        self._entries: dict[str, Suppression] = {}
        self._read: _FileId | None = None  # what the entries were read from
        self._damaged = False  # the file on disk has damaged lines (owner: copy it aside)
        self._write_lock = anyio.Lock()
        self._load_lock = anyio.Lock()
        self._quiet_until = 0.0  # monotonic: no "cannot read" log line before
        self._mtime_ns = 0  # owner: the modification time of its last write
        # Owner: counts its durable writes for the processes it starts
        # (change_counter); reader: the owner's count it follows, and its
        # value when the entries were read (None: not read since following).
        self._changes: SharedCounter | None = None
        self._seen: int | None = None
        self._version = 0  # changes made in memory (owner)
        self._written = 0  # the last of them on disk
        # What this process did because of the list: recipients refused,
        # failed, and put on it by a hard bounce (see count()).
        self.counts: dict[SuppressionCount, int] = dict.fromkeys(SUPPRESSION_COUNTS, 0)
        # Told of each count too (an ingest worker passes them to the daemon).
        self.on_count: Callable[[SuppressionCount, int], None] | None = None
        # Owner: told of each change this process makes (entries put on the
        # list, addresses taken off), unless made with ``announce=False``:
        # the fleet's mirror (spoold.fleet_suppression) passes them on.
        # Entries that end or that a full list drops are not changes.
        self.on_change: Callable[[list[Suppression], list[str]], None] | None = None

    def count(self, what: SuppressionCount, n: int = 1) -> None:
        """Count ``n`` recipients ``refused`` (at RCPT or by ``add``),
        ``failed`` (taken and failed at once) or ``bounced`` (put on the
        list by a hard bounce)."""
        self.counts[what] += n
        if self.on_count is not None:
            self.on_count(what, n)

    # ----------------------------------------------------------- reading

    def change_counter(self) -> SharedCounter:
        """Owner: the count of its writes, for the processes it starts
        (they :meth:`follow` it); made at the first call."""
        self._require_owner()
        if self._changes is None:
            self._changes = SharedCounter.create("spoold-suppressed-changes")
        return self._changes

    def follow(self, changes: SharedCounter) -> None:
        """Reader: from now on, the list changed when the owner's count
        ``changes`` did (:meth:`stale` without a system call); read again
        at the next :meth:`refresh`."""
        if self.owner:
            raise RuntimeError("the owner counts the changes; it does not follow them")
        self._changes = changes
        self._seen = None

    async def load(self) -> None:
        """Read the file (a worker thread); damaged lines are logged."""
        # The count before the file: a write meanwhile is seen at the next look.
        seen = self._changes.value if self._changes is not None and not self.owner else None
        entries, damaged, file_id = await anyio.to_thread.run_sync(_read_sync, self.path)
        self._entries = {e.address: e for e in entries}
        self._read = file_id
        self._seen = seen
        if file_id is not None:
            self._mtime_ns = max(self._mtime_ns, file_id.mtime_ns)
        self._damaged = bool(damaged)
        if damaged:
            log.error(
                "suppression list damaged: these lines were skipped, the rest kept",
                path=str(self.path),
                lines=damaged[:20],
                damaged=len(damaged),
                kept=len(entries),
            )

    def stale(self) -> bool:
        r"""Whether another process wrote the file since it was read: the
        owner's count moved (a reader that :meth:`follow`\ s it), or one
        ``stat`` (any other reader); always False for the owner, the only
        writer."""
        if self.owner:
            return False
        if self._changes is not None:
            return self._changes.value != self._seen
        return _file_id(self.path) != self._read

    async def refresh(self) -> None:
        """Read the file again if it changed (:meth:`stale`). Raises
        :class:`StoreError` when it cannot be read (or is of a newer
        format): the entries read before stay, the caller defers (451), and
        the next call tries again; the error is logged once a minute at
        most while it lasts."""
        if not self.stale():
            return
        async with self._load_lock:  # one reading, however many sessions ask
            if self.stale():
                try:
                    await self.load()
                except StoreError as exc:
                    now = monotonic()
                    if now >= self._quiet_until:
                        self._quiet_until = now + UNREADABLE_LOG_INTERVAL
                        log.error(
                            "cannot read the suppression list; recipients are deferred",
                            path=str(self.path),
                            error=str(exc),
                        )
                    raise

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, address: str) -> bool:
        """Whether the list has an entry for ``address`` (in force or not)."""
        return normalise(address) in self._entries

    def find(self, address: str, now: datetime) -> Suppression | None:
        """The entry that suppresses ``address`` now, or None."""
        entry = self._entries.get(normalise(address))
        if entry is None or entry.until <= now:
            return None
        return entry

    def held(self, recipients: Iterable[str], now: datetime) -> dict[str, Suppression]:
        """The recipients suppressed now (as given), with their entries."""
        if not self._entries:
            return {}
        found = {}
        for rcpt in recipients:
            entry = self.find(rcpt, now)
            if entry is not None:
                found[rcpt] = entry
        return found

    def snapshot(self) -> list[Suppression]:
        """Every entry as it is now (ended or not, in no order): a copy of
        the references, cheap enough for the event loop; the entries are
        frozen, so another thread may sort and show them."""
        return list(self._entries.values())

    def in_force(self, now: datetime) -> int:
        """How many entries are in force now (a count, nothing sorted)."""
        return sum(e.until > now for e in self._entries.values())

    def entries(self, now: datetime) -> list[Suppression]:
        """Every entry in force now, by address."""
        return sorted((e for e in self._entries.values() if e.until > now), key=lambda e: e.address)

    # ----------------------------------------------------------- writing

    async def add(
        self,
        new: Iterable[Suppression],
        *,
        now: datetime,
        max_entries: int,
        extend_only: bool,
        announce: bool = True,
        durable: bool = True,
    ) -> list[Suppression]:
        """Put ``new`` on the list and write it (durable when it returns).
        ``extend_only``: an address already suppressed keeps the later of
        its two ends (a bounce); otherwise the new entry replaces it (an
        operator's word). Entries past ``max_entries`` are dropped, those
        closest to their end first (logged). Returns the entries added.
        ``announce``: tell :attr:`on_change` (False: a change that came from
        elsewhere, the fleet's list). ``durable=False``: in memory only,
        for a caller that adds in slices and then calls :meth:`flush`."""
        self._require_owner()
        entries = self._entries
        added = []
        for entry in new:
            entry = msgspec.structs.replace(entry, address=normalise(entry.address))
            old = entries.get(entry.address)
            if extend_only and old is not None and old.until >= entry.until:
                continue
            entries[entry.address] = entry
            added.append(entry)
        if added:
            self._version += 1
        if len(entries) > max_entries:
            self._drop_ended(now)
        if len(entries) > max_entries:
            self._drop_excess(max_entries, bounces_only=all(e.source == "bounce" for e in added))
        kept = [e for e in added if entries.get(e.address) is e]
        if announce and kept and self.on_change is not None:
            self.on_change(kept, [])
        if added and durable:
            await self._commit()
        return kept

    def _drop_excess(self, max_entries: int, *, bounces_only: bool) -> None:
        """Bring a full list back to ``max_entries``: entries a bounce made
        go first, closest to their end first, then an operator's. To make
        room for bounce entries (``bounces_only``) no operator entry is
        ever dropped: a bounce entry that finds no room is not kept."""
        entries = self._entries
        excess = len(entries) - max_entries
        candidates: Iterable[Suppression] = entries.values()
        if bounces_only:
            candidates = [e for e in entries.values() if e.source == "bounce"]
        dropped = heapq.nsmallest(
            excess, candidates, key=lambda e: (e.source == "operator", e.until)
        )
        for entry in dropped:
            del entries[entry.address]
        by_source = {s: sum(e.source == s for e in dropped) for s in ("bounce", "operator")}
        log.warning(
            "suppression list full (spool.max_suppressed): "
            "dropped the entries closest to their end, those of bounces first",
            max_suppressed=max_entries,
            dropped=len(dropped),
            dropped_bounces=by_source["bounce"],
            dropped_operators=by_source["operator"],
            addresses=[e.address for e in dropped[:20]],
        )

    async def remove(
        self, addresses: Iterable[str], *, now: datetime, announce: bool = True
    ) -> list[str]:
        """Take ``addresses`` off the list (written, durable when it
        returns); the normalised addresses that were on it (in force).
        ``announce``: as for :meth:`add` (every address given is told, held
        here or not: the fleet's list may hold one this copy has not yet)."""
        self._require_owner()
        entries = self._entries
        gone = []
        asked = sorted({normalise(a) for a in addresses})
        for address in asked:
            entry = entries.pop(address, None)
            if entry is not None:
                self._version += 1
                if entry.until > now:
                    gone.append(address)
        if announce and asked and self.on_change is not None:
            self.on_change([], asked)
        await self._commit()
        return gone

    async def remove_where(
        self, *, source: SuppressionSource, since: datetime | None, now: datetime
    ) -> list[str]:
        """Take off the list every entry ``source`` made (``since``: only
        those made at or after it), written, durable when it returns; the
        addresses lifted that were in force, by address."""
        self._require_owner()
        entries = self._entries
        chosen = sorted(
            (
                e
                for e in entries.values()
                if e.source == source and (since is None or e.since >= since)
            ),
            key=lambda e: e.address,
        )
        for entry in chosen:
            del entries[entry.address]
        if chosen:
            self._version += 1
            if self.on_change is not None:
                self.on_change([], [e.address for e in chosen])
        await self._commit()
        return [e.address for e in chosen if e.until > now]

    async def prune(self, now: datetime, max_entries: int | None = None) -> int:
        """Drop the entries that have ended, and with ``max_entries`` (a
        bound lowered by a reload) those past it as a full list does
        (written); how many went."""
        self._require_owner()
        gone = self._drop_ended(now)
        if max_entries is not None and len(self._entries) > max_entries:
            gone += len(self._entries) - max_entries
            self._drop_excess(max_entries, bounces_only=False)
            self._version += 1
        await self._commit()
        return gone

    def _drop_ended(self, now: datetime) -> int:
        ended = [a for a, e in self._entries.items() if e.until <= now]
        for address in ended:
            del self._entries[address]
        if ended:
            self._version += 1
        return len(ended)

    async def flush(self) -> None:
        """Write what this process holds in memory and a write that failed
        left off the disk (nothing when the file is up to date). Raises
        :class:`StoreError` when it cannot be written."""
        self._require_owner()
        await self._commit()

    async def _commit(self) -> None:
        """Make the list in memory durable. Changes made while a write is
        under way are written together by the next one (one write for
        many bounces at once); returns once a write that began after this
        call's changes has ended. A write that fails is tried again by the
        next change (meanwhile this process keeps the change in memory)."""
        target = self._version
        async with self._write_lock:
            if self._written >= target:
                return
            version = self._version
            snapshot = list(self._entries.values())
            # Strictly later than the file it replaces (see stale()).
            mtime_ns = max(time_ns(), self._mtime_ns + 1000)
            await anyio.to_thread.run_sync(
                _write_sync, self.path, self._tmp_dir, snapshot, self._damaged, mtime_ns
            )
            self._mtime_ns = mtime_ns
            self._damaged = False
            self._written = version
            if self._changes is not None:
                self._changes.bump()  # durable: the readers may read it now

    def _require_owner(self) -> None:
        if not self.owner:
            raise RuntimeError("only the spool's owner changes the suppression list")


def suppression_for(
    address: str, *, now: datetime, span: timedelta, reason: str, source: SuppressionSource
) -> Suppression:
    """A new entry for ``address`` from ``now`` for ``span``, to the
    second (as every view shows it)."""
    since = now.replace(microsecond=0)
    return Suppression(
        address=normalise(address),
        since=since,
        until=since + span,
        reason=clean_reason(reason),
        source=source,
    )


STORM_RECIPIENTS = 10
"""An attempt whose hop refused every one of more than this many recipients
as unknown suppresses none of them (:func:`refused_everyone`)."""


def refused_everyone(replies: Mapping[str, RecipientResult], bounced: Iterable[str]) -> bool:
    """Whether the hard bounces ``bounced`` of one attempt look like a
    broken or hostile hop rather than dead mailboxes: the hop answered more
    than :data:`STORM_RECIPIENTS` recipients at ``RCPT`` and refused every
    one of them. A hop that says "no such user" to a whole list at once
    (a misconfigured server, a lost directory) must not put the list on
    the suppression list; those recipients fail, and nothing is
    remembered."""
    asked = {r for r, result in replies.items() if result.phase == "rcpt"}
    return len(asked) > STORM_RECIPIENTS and asked <= set(bounced)


MAX_REASON = 300
"""Characters of a reason kept (a next hop's reply may be long)."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def clean_reason(text: str) -> str:
    """``text`` fit to keep and show: control characters (a hostile next
    hop's terminal escapes, line breaks of a multi-line reply) become one
    space, and it is cut to :data:`MAX_REASON` characters."""
    text = _CONTROL.sub(" ", text).strip()
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 3] + "..."
    return text
