"""The suppression list shared by a fleet: suppressed at one node, suppressed at every node.

Each node keeps its own list (:class:`~spoold.suppression.Suppressions`,
one file in its spool) and checks recipients against it alone: the submit
path never waits on Redis. :class:`SuppressionMirror` keeps that list and
the fleet's in step, in the background:

* **Out (write-through).** Every change the node makes (an operator's
  ``spoold suppress add`` / ``remove``, a hard bounce) is told to the
  mirror (:attr:`Suppressions.on_change <spoold.suppression.Suppressions.on_change>`)
  and pushed at once, one Lua call for all that waited: the entry put in
  (or taken out of) the fleet's hash and a line appended to the fleet's
  change log, in one step.
* **In (a poll).** Every :attr:`SuppressionMirror.interval` seconds (1 s)
  the node reads the change log after the last line it read, one call,
  and applies the other nodes' changes to its own list (one durable write
  for all of them). So a change reaches every node within about the
  interval (plus a call's time).
* **Expiry.** Entries end at their ``until`` on every node by themselves;
  the fleet's hash drops ended entries now and then (any node, one Lua
  call of at most a thousand).
* **Redis down or slow** (a call returning None, logged once per outage by
  :class:`~spoold.fleet.SharedState`): the node's own list alone; its own
  changes wait (one per address, the last) and are pushed when Redis
  answers again, then it reads what it missed. While they wait they are
  kept on disk too, in ``SPOOL/suppressed.pending`` (:data:`PENDING_FILE`:
  written whole, atomically, in a worker thread, within a round of the
  change; removed once they are all pushed), so a node that stops before
  Redis answers pushes them at its next start, before its catch-up, and
  they win over the fleet's entries as they would have: a removal stays
  removed, a changed end stays changed.
* **Catch-up** (at start, and when the change log no longer holds the line
  last read: it is trimmed to about :data:`LOG_LENGTH` lines, or Redis
  lost its data): the node reads the whole fleet's hash a page at a time
  (keeping only its addresses, and the entries to take), takes every
  entry in force it lacks or holds otherwise (at most its
  ``max_suppressed``, those that last longest; put on the list in slices,
  each a turn of the event loop, then written once), and puts every entry in
  force it has that the fleet lacks, in a Lua step that writes an address
  only where the fleet's hash still has none (another node's change made
  meanwhile is never overwritten: its line is read next); at most
  :data:`CATCH_UP_LINES` of them get a line in the change log. This errs on
  the side of not sending, as the list does: an address taken off at
  another node while this one was stopped (or cut off past the log's
  length) is put back by it, if it still held the address; remove it
  again.

Conflicts: the change log's order decides (the last change to an address
is the one every node ends with). A full list (``spool.max_suppressed``) is
per node: what a node drops to make room stays on the others.

Keys: ``spoold:suppressed`` (hash: address → the entry, JSON),
``spoold:suppressed:ends`` (sorted set: address → its end, ms),
``spoold:suppressed:log`` (stream: ``node``, ``address``, ``entry``, ""
for a removal).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import math
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from spoold.errors import StoreError
from spoold.fleet import KEY_PREFIX, SharedState
from spoold.log import get_logger
from spoold.store.directory import fsync_directory, replace_file
from spoold.suppression import Suppression, Suppressions, clean_reason, normalise

__all__ = [
    "SuppressionMirror",
    "LOG_LENGTH",
    "HASH_KEY",
    "ENDS_KEY",
    "LOG_KEY",
    "PENDING_FILE",
    "CATCH_UP_LINES",
]

log = get_logger("spoold.fleet_suppression")

HASH_KEY = f"{KEY_PREFIX}suppressed"
ENDS_KEY = f"{KEY_PREFIX}suppressed:ends"
LOG_KEY = f"{KEY_PREFIX}suppressed:log"
LOG_LENGTH = 100_000
"""About how many changes the fleet's change log keeps."""
CATCH_UP_LINES = LOG_LENGTH // 10
"""At most how many of the entries one catch-up puts in the fleet's list
get a line in the change log (so the others read them at once): one
node's catch-up never trims the log past the others. The rest are in the
fleet's list; the others take them at their own next catch-up."""
_PAGE = 1000  # entries read or pushed per call
_APPLY_SLICE = 2000  # entries put on the local list in one turn of the event loop
_PRUNE_EVERY = 60.0  # seconds between two prunes of the fleet's hash

# Push changes: KEYS hash, ends, log; ARGV: node, log length, then for each
# change address, entry (JSON, "" for a removal), end (ms). One step.
_PUSH = """
for i = 3, #ARGV, 3 do
  local address, entry = ARGV[i], ARGV[i + 1]
  if entry == '' then
    redis.call('HDEL', KEYS[1], address)
    redis.call('ZREM', KEYS[2], address)
  else
    redis.call('HSET', KEYS[1], address, entry)
    redis.call('ZADD', KEYS[2], ARGV[i + 2], address)
  end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*',
             'node', ARGV[1], 'address', address, 'entry', entry)
end
return (#ARGV - 2) / 3
"""

# Put entries only where the fleet has none in force (catch-up): KEYS
# hash, ends, log; ARGV: node, log length, now (ms), how many of them may
# have a line in the log, then for each address, entry (JSON), end (ms).
# An address the fleet holds meanwhile is left as it is (its line is in
# the log: the node reads it); one whose entry ended (not pruned yet) is
# not held. Returns how many were put, and how many of them have a line.
# One step.
_PUT_ABSENT = """
local put, logged = 0, 0
local now, lines = tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 5, #ARGV, 3 do
  local address, entry = ARGV[i], ARGV[i + 1]
  local ends = tonumber(redis.call('ZSCORE', KEYS[2], address))
  if redis.call('HEXISTS', KEYS[1], address) == 0 or (ends ~= nil and ends <= now) then
    redis.call('HSET', KEYS[1], address, entry)
    redis.call('ZADD', KEYS[2], ARGV[i + 2], address)
    if logged < lines then
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*',
                 'node', ARGV[1], 'address', address, 'entry', entry)
      logged = logged + 1
    end
    put = put + 1
  end
end
return {put, logged}
"""

# Drop ended entries: KEYS hash, ends; ARGV: now (ms), at most how many.
_PRUNE = """
local ended = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, address in ipairs(ended) do redis.call('HDEL', KEYS[1], address) end
if #ended > 0 then redis.call('ZREM', KEYS[2], unpack(ended)) end
return #ended
"""

PENDING_FILE = "suppressed.pending"
"""The changes of this node not yet in the fleet's list, kept while Redis
does not answer (beside ``SPOOL/suppressed``)."""
_PENDING_VERSION = 1


class _Change(msgspec.Struct, frozen=True):
    address: str
    entry: Suppression | None  # None: a removal


class _PendingFile(msgspec.Struct):
    version: int
    changes: list[_Change]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Suppression)
_pending_decoder = msgspec.json.Decoder(_PendingFile)


def _write_pending(
    path: Path, tmp_dir: Path, pending: list[tuple[str, Suppression | None]] | None
) -> None:
    """Replace the file of changes waiting for the fleet with ``pending``
    (None: remove it): a temporary file in ``tmp/``, fsynced, renamed over
    it, the directory fsynced. Raises :class:`StoreError`."""
    tmp = tmp_dir / f"{os.getpid()}.{PENDING_FILE}.tmp"  # tmp/'s PID.NAME.KIND
    data = None
    if pending is not None:
        changes = [_Change(a, e) for a, e in pending]
        data = msgspec.json.encode(_PendingFile(_PENDING_VERSION, changes))
    try:
        if data is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                fsync_directory(path.parent)
            return
        replace_file(path, tmp, data, mode=0o640)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc}") from None


def _read_pending(path: Path) -> list[_Change] | None:
    """The changes kept in ``path`` (None: no file; none when it cannot be
    read: logged)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot read the changes waiting for the fleet", path=str(path), error=str(exc))
        return []
    try:
        kept = _pending_decoder.decode(data)
    except msgspec.DecodeError as exc:
        log.error("changes waiting for the fleet: damaged, skipped", path=str(path), error=str(exc))
        return []
    if kept.version > _PENDING_VERSION:
        log.error("changes waiting for the fleet: of a newer spoold, skipped", path=str(path))
        return []
    return kept.changes


def _end_ms(entry: Suppression) -> int:
    return math.ceil(entry.until.timestamp() * 1000)


def _decode(raw: str) -> Suppression | None:
    """An entry of the fleet's list, fit to keep as a local one is: None
    for what this version did not write (skipped); a reason cut and
    cleaned as :func:`~spoold.suppression.clean_reason` does."""
    try:
        entry = _decoder.decode(raw)
    except msgspec.DecodeError:
        return None
    if entry.address != normalise(entry.address) or entry.until <= entry.since:
        return None
    reason = clean_reason(entry.reason)
    return entry if reason == entry.reason else msgspec.structs.replace(entry, reason=reason)


class SuppressionMirror:
    """Keeps one node's suppression list (its owner's
    :class:`~spoold.suppression.Suppressions`) and the fleet's in step (see
    the module's docstring). Run :meth:`run` in a task group; ``now``:
    the spool's clock; ``max_entries``: its ``max_suppressed`` now."""

    def __init__(
        self,
        shared: SharedState,
        suppressions: Suppressions,
        *,
        now: Callable[[], datetime],
        max_entries: Callable[[], int],
        interval: float = 1.0,
    ) -> None:
        self.shared = shared
        self.suppressions = suppressions
        self.interval = interval
        self._now = now
        self._max_entries = max_entries
        # address -> the entry to push, None for a removal (the last change)
        self._pending: dict[str, Suppression | None] = {}
        self._last: str | None = None  # the last log line read (None: catch up)
        self._wake = anyio.Event()
        self._pruned = -math.inf
        self._push = shared.client.register_script(_PUSH)
        self._put_absent = shared.client.register_script(_PUT_ABSENT)
        self._prune = shared.client.register_script(_PRUNE)
        self.synced = anyio.Event()  # set after the first catch-up
        self._failing = False  # the local list could not be written (logged once)
        # The changes waiting, kept on disk while Redis does not answer.
        self._pending_path = suppressions.path.with_name(PENDING_FILE)
        self._tmp_dir = suppressions.path.parent / "tmp"
        self._revision = 0  # changes told or pushed so far
        self._saved: int | None = None  # the revision in the file (None: no file)
        self._loaded = False  # the file read (at the first catch-up)
        suppressions.on_change = self._changed

    @property
    def node(self) -> str:
        return self.shared.settings.node

    def _changed(self, added: list[Suppression], removed: list[str]) -> None:
        for entry in added:
            self._pending[entry.address] = entry
        for address in removed:
            self._pending[address] = None
        self._revision += 1
        self._wake.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Push, read and apply, every :attr:`interval` seconds (and at once
        after a local change), until cancelled."""
        task_status.started()
        while True:
            try:
                await self.step()
            except StoreError as exc:
                # The local file cannot be written (disk full, EIO): the
                # fleet's changes are read again next round (the last line
                # read moves on only once they are applied). Never the end
                # of the daemon.
                if not self._failing:
                    log.error(
                        "suppression list: cannot apply the fleet's changes; trying again",
                        error=str(exc),
                    )
                self._failing = True
            else:
                if self._failing:
                    log.info("suppression list: the fleet's changes are applied again")
                self._failing = False
            with anyio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def step(self) -> bool:
        """One round: catch up if needed, push what waits, read and apply
        the others' changes, prune now and then. Returns whether Redis
        answered every call. Raises :class:`~spoold.errors.StoreError`
        when the local list cannot be written (nothing is lost: the same
        changes are applied next round)."""
        if self._failing:
            await self.suppressions.flush()  # what a failed write left in memory
        if not self._loaded:
            await self._load_pending()
        if self._last is None and not await self._catch_up():
            await self._save_pending()
            return False
        if not await self._push_pending():
            await self._save_pending()
            return False
        await self._save_pending()
        if not await self._pull():
            return False
        if time.monotonic() - self._pruned >= _PRUNE_EVERY:
            now_ms = math.floor(self._now().timestamp() * 1000)
            pruned = await self.shared.call(
                lambda: self._prune(keys=[HASH_KEY, ENDS_KEY], args=[now_ms, _PAGE])
            )
            if pruned is None:
                return False
            self._pruned = time.monotonic()
        return True

    # -- out

    async def _load_pending(self) -> None:
        """Take the changes a run before this one kept (Redis did not
        answer before it stopped): they go out first, and win over the
        fleet's entries at catch-up, as they would have. A change made
        since this run began is newer and stays."""
        changes = await anyio.to_thread.run_sync(_read_pending, self._pending_path)
        self._loaded = True
        if changes is None:
            return
        now = self._now()
        for change in changes:
            if change.entry is None or change.entry.until > now:
                self._pending.setdefault(normalise(change.address), change.entry)
        self._saved = -1  # the file is not what waits now: written again or removed
        log.info("suppression list: changes kept for the fleet", changes=len(changes))

    async def _save_pending(self) -> None:
        """Keep the changes waiting in :data:`PENDING_FILE` (a worker
        thread), or remove it once none waits; nothing when the file is
        already what waits. A write that fails is logged and tried again
        next round."""
        pending: list[tuple[str, Suppression | None]] | None = None
        if not self._pending:
            if self._saved is None:
                return
        elif self._saved == self._revision:
            return
        else:
            pending = list(self._pending.items())  # a copy; encoded in the thread
        told = self._revision
        try:
            await anyio.to_thread.run_sync(
                _write_pending, self._pending_path, self._tmp_dir, pending
            )
        except StoreError as exc:
            log.error("cannot keep the changes waiting for the fleet", error=str(exc))
            return
        self._saved = None if pending is None else told

    async def _push_pending(self) -> bool:
        while self._pending:
            chosen = list(itertools.islice(self._pending.items(), _PAGE // 3))
            args: list[str | int] = [self.node, LOG_LENGTH]
            for address, entry in chosen:
                if entry is None:
                    args += [address, "", 0]
                else:
                    args += [address, _encoder.encode(entry).decode(), _end_ms(entry)]
            done = await self.shared.call(
                functools.partial(self._push, keys=[HASH_KEY, ENDS_KEY, LOG_KEY], args=args)
            )
            if done is None:
                return False
            for address, entry in chosen:
                if address in self._pending and self._pending[address] is entry:
                    del self._pending[address]
            self._revision += 1
        return True

    # -- in

    async def _pull(self) -> bool:
        """Read the change log after the last line read, every page of it,
        and apply the other nodes' changes once (the last change to each
        address, over all the pages: a line of this node's after another
        node's keeps this node's); a gap (the line is gone) means catching
        up. The last line read moves on only once they are applied."""
        client = self.shared.client
        last = self._last
        assert last is not None
        # address -> (node, entry) of the last line about it read so far
        final: dict[str, tuple[str, str]] = {}
        first = True
        while True:
            start = "-" if last == "0-0" else last  # inclusive: the last line proves no gap
            got = await self.shared.call(
                functools.partial(client.xrange, LOG_KEY, start, "+", _PAGE + 1)
            )
            if got is None:
                return False
            lines = [(str(i), {str(k): str(v) for k, v in (f or {}).items()}) for i, f in got]
            if last != "0-0":
                if not lines or lines[0][0] != last:
                    if first:  # else the gap opened mid-read: caught up all the same
                        log.info("fleet suppression log moved past this node: catching up")
                    self._last = None
                    return await self._catch_up()
                lines = lines[1:]
            first = False
            for _, fields in lines:
                address = fields.get("address", "")
                if address:
                    final.pop(address, None)  # kept in the order of the last line
                    final[address] = (fields.get("node", ""), fields.get("entry", ""))
            if lines:
                last = lines[-1][0]
            if len(lines) < _PAGE:
                break
        if final:
            await self._apply_lines(final)
        self._last = last
        return True

    async def _apply_lines(self, final: dict[str, tuple[str, str]]) -> None:
        added: list[Suppression] = []
        removed: list[str] = []
        for address, (node, raw) in final.items():
            if node == self.node or address in self._pending:
                continue  # ours (this copy has it), or ours waits to go out after it
            if not raw:
                removed.append(address)
            elif (entry := _decode(raw)) is not None:
                added.append(entry)
        await self._apply(added, removed)

    async def _apply(self, added: list[Suppression], removed: list[str]) -> None:
        listed = self.suppressions
        now = self._now()
        have = {e.address: e for e in listed.snapshot()}
        added = [e for e in added if e.until > now and have.get(e.address) != e]
        removed = [a for a in removed if a in have]
        if added:
            # In slices, each its own turn of the event loop (a catch-up may
            # take a whole list), then one write of the file for them all.
            for i in range(0, len(added), _APPLY_SLICE):
                if i:
                    await anyio.lowlevel.checkpoint()
                # A change this node made meanwhile waits to go out: it wins.
                chosen = [e for e in added[i : i + _APPLY_SLICE] if e.address not in self._pending]
                await listed.add(
                    chosen,
                    now=now,
                    max_entries=self._max_entries(),
                    extend_only=False,
                    announce=False,
                    durable=False,
                )
            await listed.flush()
        removed = [a for a in removed if a not in self._pending]
        if removed:
            await listed.remove(removed, now=now, announce=False)
        if added or removed:
            log.info(
                "suppression list: fleet changes applied", added=len(added), removed=len(removed)
            )

    # -- catch-up

    async def _catch_up(self) -> bool:
        """Read the whole fleet's list, a page at a time; take what this
        node lacks (at most its ``max_suppressed``, those that last longest),
        then put what the fleet lacks where it still lacks it (see the
        module's docstring). Only the fleet's addresses are kept in memory,
        and the entries to take."""
        client = self.shared.client
        newest = await self.shared.call(lambda: client.xrevrange(LOG_KEY, "+", "-", 1))
        if newest is None:
            return False
        mark = str(newest[0][0]) if newest else "0-0"
        now = self._now()
        limit = max(1, self._max_entries())
        have = {e.address: e for e in self.suppressions.snapshot()}
        in_fleet: set[str] = set()
        # the entries to take, at most ``limit``: a heap, the soonest to end first
        take: list[tuple[datetime, str, Suppression]] = []
        cursor = 0
        while True:
            page = await self.shared.call(
                functools.partial(client.hscan, HASH_KEY, cursor, count=_PAGE)
            )
            if page is None:
                return False
            cursor, found = int(page[0]), page[1]
            assert isinstance(found, dict)
            for address, raw in found.items():
                address = str(address)
                entry = _decode(str(raw))
                if entry is None or entry.until > now:
                    in_fleet.add(address)  # (one not read: left as it is)
                if address in self._pending:
                    continue  # this node's change waits to go out: it wins
                if (
                    entry is not None
                    and entry.address == address
                    and entry.until > now
                    and have.get(address) != entry
                ):
                    if len(take) < limit:
                        heapq.heappush(take, (entry.until, address, entry))
                    elif entry.until > take[0][0]:
                        heapq.heapreplace(take, (entry.until, address, entry))
            if cursor == 0:
                break
        await self._apply([e for _, _, e in take], [])
        absent = [
            e
            for e in self.suppressions.snapshot()
            if e.until > now and e.address not in in_fleet and e.address not in self._pending
        ]
        del have, in_fleet
        # An operator's entries first: they get the lines in the log.
        absent = [e for e in absent if e.source == "operator"] + [
            e for e in absent if e.source != "operator"
        ]
        put = 0
        lines = CATCH_UP_LINES
        now_ms = math.floor(now.timestamp() * 1000)
        for i in range(0, len(absent), _PAGE // 3):
            args: list[str | int] = [self.node, LOG_LENGTH, now_ms, lines]
            for entry in absent[i : i + _PAGE // 3]:
                args += [entry.address, _encoder.encode(entry).decode(), _end_ms(entry)]
            done = await self.shared.call(
                functools.partial(self._put_absent, keys=[HASH_KEY, ENDS_KEY, LOG_KEY], args=args)
            )
            if done is None:
                return False  # caught up again next round, from the start
            put += int(done[0])
            lines -= int(done[1])
        self._last = mark
        if not self.synced.is_set():
            self.synced.set()
        log.info(
            "suppression list caught up with the fleet",
            taken=len(take),
            put=put,
            to_push=len(self._pending),
        )
        return await self._push_pending()
