"""Recovery at open, and the consistency check.

:func:`recover_sync` runs once, when the owner opens the store (it holds the
lock): checked-out records go back to their queues (but in the queues the
owner keeps checked out, where they are only reported), files left in
``tmp/`` by dead writers are removed (the pool of removed files,
``tmp/pool.*``, is kept: :mod:`spoold.store.pool`), bodies and registry entries with no
record are removed once their writer is gone (it never acknowledged them),
and so are the ``.writer`` files of dead writers. A duplicate (one name in
a queue and in its checkout) is left for the check to report. The
directories changed are fsynced before it returns.

:func:`check_sync` reports inconsistencies and changes nothing.

Both block: the store runs them in a worker thread. Directories this
process cannot use are skipped (open reports them).
"""

from __future__ import annotations

import os
import time

from spoold.ids import is_valid_id
from spoold.numerals import ascii_decimal
from spoold.store.directory import CHECKOUT, REASONS, StoreDirectory, unlink_quiet
from spoold.store.pool import POOL_PREFIX, claimed_pid
from spoold.store.records import Problem, RecoveryReport
from spoold.store.registry import Registry, pid_alive

__all__ = ["recover_sync", "check_sync"]


def recover_sync(
    d: StoreDirectory,
    registry: Registry,
    keep_checkouts: frozenset[str],
    keep_listings: frozenset[str] = frozenset(),
) -> RecoveryReport:
    """Repair what a crash may have left; say what was done. The listings
    of the ``keep_listings`` queues are kept in the report (for the owner's
    load right after the open)."""
    report = RecoveryReport()
    touched: list[str] = []
    for q in d.queues:
        if not (d.usable(d.qdir(q, True)) and d.usable(d.qdir(q))):
            continue  # reported at open; what is there waits
        for name in d.names(d.qdir(q, True)):
            dst = f"{d.qdir(q)}/{name}"
            if os.path.exists(dst):
                continue  # a duplicate: leave both for the check to report
            if q in keep_checkouts:
                report.kept_checkouts.append((q, name))
                continue
            os.rename(f"{d.qdir(q, True)}/{name}", dst)
            report.returned_checkouts.append((q, name))
            touched += [d.qdir(q, True), d.qdir(q)]
    with os.scandir(d.tmp) as it:
        tmp_names = [e.name for e in it]
    for tmp_name in tmp_names:
        if tmp_name.startswith(POOL_PREFIX):
            continue  # the pool of removed files: nobody's, kept for reuse
        pid = ascii_decimal(tmp_name.split(".", 1)[0])
        if pid is not None and pid != d.pid and pid_alive(pid):
            continue  # a live writer's work in progress
        # Anything in tmp/ was never renamed into place: it was never
        # acknowledged, and the committed copy (if any) is elsewhere.
        unlink_quiet(f"{d.tmp}/{tmp_name}")
        report.removed_tmp.append(tmp_name)
    report.listings, records = _listings(d, keep_listings)
    # A body or a registry entry of a record (nearly all of them) is passed
    # over before anything else is asked of its name: two listings of a
    # large spool cost little more than the listings themselves.
    for name in os.listdir(d.data):
        if name in records or not is_valid_id(name) or os.path.isdir(f"{d.data}/{name}"):
            continue
        if registry.writer_gone(name) and not _has_record(d, name):
            unlink_quiet(f"{d.data}/{name}")
            unlink_quiet(f"{d.registry}/{name}")
            report.removed_unacknowledged.append(name)
            touched += [d.data, d.registry]
    entries, writers = registry.listing(skip=records)
    for name in entries:
        if registry.writer_gone(name) and not _has_record(d, name):
            unlink_quiet(f"{d.registry}/{name}")
            if name not in report.removed_unacknowledged:
                report.removed_unacknowledged.append(name)
            touched.append(d.registry)
    for writer in writers:
        if registry.writer_gone(writer):
            unlink_quiet(f"{d.registry}/{writer}")  # its entries (if any) keep their content
    if touched:
        d.fsync_dirs(touched)
    return report


def check_sync(d: StoreDirectory, registry: Registry, max_age: float) -> list[Problem]:
    """Bodies and registry entries with no record (once their writer is
    gone or they are older than ``max_age`` seconds), records with no body,
    one name in two places, files in ``tmp/`` or a checkout older than
    ``max_age``, unusable directories, and files in a queue whose names
    are not ids."""
    problems: list[Problem] = []
    now = time.time()

    def old(path: str) -> bool:
        # The later of the two times: a rename (a checkout) or a link
        # (a registry entry: see the registry module) changes only ctime.
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        return now - max(st.st_mtime, st.st_ctime) > max_age

    records = _all_records(d)
    for name, places in sorted(records.items()):
        # A queue and its own checkout: a rename between the two listings
        # (an attempt starting or ending while the daemon runs), not a copy.
        if len({q for q, _c in places}) > 1:
            where = ", ".join(q + ("/.checkout" if c else "") for q, c in places)
            problems.append(
                Problem("duplicate", name, f"{d.root}", f"one id in several places: {where}")
            )
        for q, checked_out in places:
            path = f"{d.qdir(q, checked_out)}/{name}"
            if checked_out and old(path):
                problems.append(
                    Problem("stale_checkout", name, path, f"checked out over {max_age:.0f}s")
                )
        if not os.path.exists(f"{d.data}/{name}"):
            q, c = places[0]
            problems.append(
                Problem("missing_body", name, f"{d.qdir(q, c)}/{name}", "record has no body")
            )
    for name in d.names(d.data):
        path = f"{d.data}/{name}"
        if name not in records and (registry.writer_gone(name) or old(path)):
            problems.append(Problem("orphan_body", name, path, "body with no record"))
    for name in d.names(d.registry):
        path = f"{d.registry}/{name}"
        if (
            name not in records
            and not os.path.exists(f"{d.data}/{name}")
            and (registry.writer_gone(name) or old(path))
        ):
            problems.append(Problem("orphan_registry", name, path, "registry entry, no record"))
    with os.scandir(d.tmp) as it:
        for e in it:
            if old(e.path) and not _pool_file(e.name):
                problems.append(Problem("stale_tmp", e.name, e.path, "left in tmp/"))
    for u in sorted(d.unusable):
        problems.append(Problem("unusable_dir", os.path.basename(u), u, d.unusable_text(u)))
    for q in d.queues:
        for checked_out in (False, True):
            qd = d.qdir(q, checked_out)
            if not d.usable(qd):
                continue
            with os.scandir(qd) as it:
                for e in it:
                    if e.name in (CHECKOUT, REASONS):
                        continue
                    if not is_valid_id(e.name) or e.is_dir():
                        problems.append(Problem("stray_file", e.name, e.path, "not a record name"))
    return problems


def _pool_file(tmp_name: str) -> bool:
    """A file of the pool, or one a live writer claimed from it: however
    old, not a leftover."""
    if tmp_name.startswith(POOL_PREFIX):
        return True
    pid = claimed_pid(tmp_name)
    return pid is not None and pid_alive(pid)


def _has_record(d: StoreDirectory, name: str) -> bool:
    """Whether a record ``name`` is in a queue (or its checkout) now. Asked
    of a name with no record in the listings once its writer is known to be
    gone: a short-lived writer may have committed the record after the
    queues were listed, and exited since; gone, it can commit no more."""
    return any(
        os.path.lexists(f"{d.qdir(q, checked_out)}/{name}")
        for q in d.queues
        for checked_out in (False, True)
    )


def _all_records(d: StoreDirectory) -> dict[str, list[tuple[str, bool]]]:
    found: dict[str, list[tuple[str, bool]]] = {}
    for q in d.queues:
        if not d.usable(d.qdir(q)):
            continue
        for name, checked_out in d.list_queue(q):
            found.setdefault(name, []).append((q, checked_out))
    return found


def _listings(
    d: StoreDirectory, keep: frozenset[str]
) -> tuple[dict[str, list[tuple[str, bool]]], set[str]]:
    """The listing (:meth:`StoreDirectory.list_queue`) of each usable queue
    of ``keep``, and the name of every record in every queue (a set: a
    large spool's recovery asks only whether a name has a record), a
    checkout whose queue is unusable included. The other queues (``removed``
    can be the largest) are neither sorted nor held."""
    listings: dict[str, list[tuple[str, bool]]] = {}
    found: set[str] = set()
    for q in d.queues:
        if q in keep and d.usable(d.qdir(q)):
            listing = listings[q] = d.list_queue(q)
            found.update([name for name, _checked_out in listing])
            continue
        for checked_out in (False, True):
            if d.usable(d.qdir(q, checked_out)):
                found.update(d.names(d.qdir(q, checked_out)))
    return listings, found
