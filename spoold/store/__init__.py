"""A durable, generic on-disk queue store. It knows nothing about mail.

Layout of a store directory::

    lock              flock()ed by the owner; holds the owner's pid
    wakeup            the owner's datagram socket: other writers send the
                      names they enqueued, so the owner need not poll
    .registry/NAME    one per live entry, created exclusively; holds the
                      pid of the process that created the entry
    .registry/.writer.PID.N   that pid, written once per writer process:
                      each entry is a hard link to it (see below)
    tmp/              staging: PID.NAME.KIND.RANDOM, never read back
    tmp/pool.PID.N.SIZE.KIND   a removed record or body kept to be written again by a
                      group commit (``tmp/PID.reuse.N`` once a writer claimed it)
    data/NAME         the entry's body (opaque bytes)
    QUEUE/NAME        the entry's record (opaque bytes), one directory per queue
    QUEUE/.checkout/NAME   a record a worker has checked out of QUEUE
    QUEUE/.reasons/NAME    why an unreadable record was set aside in QUEUE

Invariants:

* A name lives in at most one place among all ``QUEUE/`` and
  ``QUEUE/.checkout/`` directories. Every change of place is one rename.
* New files are written under ``tmp/``, fsynced, then renamed into place, and
  the directories touched are fsynced before the call returns. So a record is
  either wholly there or absent, and once a call returns its effect survives
  a crash or power loss (``delete`` excepted: see below).
* ``enqueue`` renames the body into ``data/`` first and the record into its
  queue last: the record's rename is the commit point. A crash before it
  leaves a body and a registry entry with no record; recovery removes those
  when the process that wrote them is gone (it never acknowledged them).
* ``delete`` unlinks the registry entry, then removes the record (the
  commit point), then the body. It is the one change that is not fsynced:
  after a power loss a deleted entry may come back (a delivered message is
  then sent again: at least once, never lost), which saves a delivery three
  directory fsyncs. The record and body are renamed into the pool
  (``tmp/pool.*``) rather than unlinked while it has room: a group commit
  writes into them again, but only after a ``syncfs`` that followed its
  claim of them, so a deleted entry that comes back after a power loss
  comes back with its own content (:mod:`spoold.store.pool`).
* A checked-out record belongs to its queue: recovery renames it back,
  except in the queues the owner asks to keep (``keep_checkouts``): those
  stay checked out, reported, for the owner to settle (rewrite, then move
  back) before it uses them, so what a cut-short job means is written down
  before the record is back in its queue.
* A registry entry is a hard link to its writer's ``.writer.PID.N`` file,
  made with ``link()``, which fails when the name exists just as
  ``O_CREAT|O_EXCL`` does. Its content is the writer's pid, as a file of its
  own would hold, but creating and removing it allocates and frees no inode
  and no data block: on a busy spool those are what a new file costs most.
  When links are not possible (a filesystem without them) an entry is a
  file of its own. Recovery removes the ``.writer`` files of dead writers.
* A store is created only in a missing or empty directory; an existing
  directory that is not a store (other files, no ``.registry``) is refused.
  Each directory it creates (the store's own, and missing parents) is
  synced into its parent before the store opens.

One process owns a store at a time (``owner=True`` takes the lock); only the
owner recovers, checks out, moves and deletes. Any number of other processes
may open it with ``owner=False`` and ``enqueue`` concurrently.

Every public operation is a coroutine that makes one hop to a worker thread,
behind a :class:`anyio.CapacityLimiter`, so no file I/O ever runs on the
event loop; short ones (checkout, delete) may share their hop with others
asked for at the same moment (:meth:`Store.run_grouped`). Errors from the
filesystem are raised as :class:`~spoold.errors.StoreError` naming the path;
an ``enqueue`` that fails removes whatever it had written.

Callbacks given to the store (``on_step``; an ``enqueue`` call's
``on_reserve``, ``make_prefix`` and ``make_record``) run in worker threads,
and may run in two threads at once: a large group commit writes its files
in two (``sharing.py``). One ``enqueue`` call's callbacks all run in one
thread; a callback that keeps state across calls must lock it.

Where each part lives (``spoold/store/``):

* ``store.py``: :class:`Store`, opening and closing, and every operation
  on entries, each written once as the blocking method that runs in a
  worker thread with its async twin derived from it;
* ``hops.py``: the worker-thread hops (limit, grouping, closing) and the
  decorators that derive an async twin (``read = one_hop(_read_sync)``);
* ``batching.py``: jobs asked for at the same moment run as one batch, for
  grouped hops and the group commit;
* ``commit.py``: ``enqueue``'s commit path, fsynced per call or as a group
  commit with two ``syncfs``;
* ``sharing.py``: the group commit's second writer thread, which writes
  part of a large batch's files;
* ``directory.py``: the layout, the directory descriptors, the lock, and
  the file steps (write under ``tmp/``, fsync, ``syncfs``);
* ``registry.py``: name reservations and the writers' pid files;
* ``wakeup.py``: the owner's wake-up socket and the writers' end of it;
* ``recovery.py``: recovery at open, and the consistency check;
* ``records.py``: the values that go in and come out.
"""

from spoold.store.directory import CHECKOUT as CHECKOUT
from spoold.store.directory import REASONS as REASONS
from spoold.store.directory import still_named as still_named
from spoold.store.records import NewEntry as NewEntry
from spoold.store.records import Problem as Problem
from spoold.store.records import ProblemKind as ProblemKind
from spoold.store.records import RecoveryReport as RecoveryReport
from spoold.store.records import StepHook as StepHook
from spoold.store.records import StoredRecord as StoredRecord
from spoold.store.records import SyncMode as SyncMode
from spoold.store.store import Store as Store
from spoold.store.wakeup import NotifyResult as NotifyResult
from spoold.store.wakeup import Woken as Woken

__all__ = [
    "Store",
    "NewEntry",
    "StoredRecord",
    "Problem",
    "ProblemKind",
    "RecoveryReport",
    "StepHook",
]
