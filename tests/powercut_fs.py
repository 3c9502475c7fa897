"""A FUSE filesystem that forgets, at a "power cut", everything not synced.

Run as its own process (``python -m tests.powercut_fs MOUNTPOINT CONTROL
STATE strict|ordered``): it mounts an in-memory filesystem on ``MOUNTPOINT`` and answers
commands on the Unix socket ``CONTROL``. ``STATE`` is a file on the real
disk: the durable state is loaded from it at mount (when it exists) and
written to it at a cut. The test side is :class:`PowercutMount`.

The model: what a disk keeps
----------------------------

Every file and directory has two layers: the *volatile* one (what programs
see: the page cache and the dirty metadata of a real kernel) and the
*durable* one (what the disk holds). Only these make anything durable:

* ``fsync``/``fdatasync`` of a file: its content, size and mode, as they
  are now. Nothing about names: a new file whose directory was never synced
  is gone after a cut however often it was fsynced.
* ``fsync`` of a directory: every change of its entries made so far
  (create, mknod, mkdir, link, unlink, rmdir, and each rename into or out
  of it). A rename is one change that touches two entries: made durable by
  a sync of either directory, it is made durable whole, on both sides (a
  journalling filesystem such as ext4 logs a rename as one transaction; it
  never keeps a file under both names or under none). A change is made
  durable only together with the earlier unsynced changes of the same
  names, in order (a file created in ``tmp/`` and renamed into ``data/``:
  syncing ``data/`` keeps it in ``data/``, never in both).
* Nothing else: not ``close``, not a rename over an old file (ext4's
  ``auto_da_alloc`` flush on rename is a heuristic, not a promise), not
  ``syncfs`` (the kernel does not forward it to a FUSE daemon: see below),
  not time passing.

After a cut, the filesystem holds the durable layer only: a directory's
durable entries, each file's durable content (empty if it was never
synced). A directory whose own entry never became durable in its parent
is unreachable, and with it everything under it (a real filesystem would
put its inodes in ``lost+found``: a program finds nothing at the old path
either way). Link counts are recounted from the durable entries.

Two orders of entry changes, chosen per mount:

* ``strict`` (POSIX): only what a directory sync names becomes durable, as
  above. A change made later in another directory may reach the disk while
  an earlier one does not (a record renamed into ``active/`` is kept by
  another writer's sync of ``active/``, while the body renamed into
  ``data/`` just before it is lost).
* ``ordered`` (ext4's journal): changes of entries reach the disk in the
  order they were made, so a directory sync also makes every earlier
  change durable, in every directory. ext4 (any ``data=`` mode) and XFS
  commit their metadata journal this way.

Both are stricter than ext4 in what a program must not count on anyway:
ext4 commits its whole journal at *any* fsync, so a file's fsync usually
keeps its new name too; here a file's fsync keeps only its content, and in
``ordered`` mode only a directory sync commits the journal. Data is never
written ahead of its fsync (ext4 writes it at the latest with the next
journal commit; here it stays volatile). Mode, owner and times of an inode
follow its content (durable at the file's fsync; the mode given at
creation is durable from the start). Extended attributes, fallocate, flock
across the cut and mmap writes are not modelled (the spool does not use
them; flock is done by the kernel).

``syncfs(2)``: Linux sends ``FUSE_SYNCFS`` only to filesystems that ask for
it at mount, which only virtiofs does; a libfuse filesystem never sees the
call, and with libfuse's default (no writeback cache) there are no dirty
pages for the kernel to flush either. So a ``syncfs`` on this mount makes
nothing durable here, which would be unfair to a program that relies on it
(on ext4 it commits everything): the spool's ``sync = "syncfs"`` mode cannot
be tested on this layer. ``stats`` counts the operations seen, so a test
can show that a ``syncfs`` reaches none of them.

The cut
-------

``cut`` on the control socket freezes the filesystem at once: the durable
layer is written to ``STATE`` and from then on every operation fails with
``EIO`` (a program still running may go on, but can no longer sync anything,
so it can acknowledge nothing new). The test then kills the program and
unmounts; the next mount, from ``STATE``, shows what survived.

Commands (one line each, one JSON reply line): ``ping``, ``stats`` (counts of
fsync, fsyncdir and every other operation, pending entry changes), ``cut``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PowercutMount", "fuse_missing", "main"]

ROOT_INO = 1


# ------------------------------------------------------------------ model


@dataclass
class Inode:
    """One file, directory, socket or symlink: both layers."""

    ino: int
    mode: int  # type and permission bits (volatile)
    uid: int
    gid: int
    data: bytearray = field(default_factory=bytearray)  # volatile content
    entries: dict[str, int] = field(default_factory=dict)  # volatile (directories)
    links: int = 0  # volatile names of a file (directories count their own)
    mtime: float = field(default_factory=time.time)
    ctime: float = field(default_factory=time.time)
    durable_data: bytes = b""
    durable_mode: int = 0
    durable_entries: dict[str, int] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass(frozen=True)
class EntryChange:
    """One unsynced change of directory entries: ``old`` is removed
    (``(dir ino, name)``) and/or ``new`` is set to ``ino``."""

    old: tuple[int, str] | None
    new: tuple[int, str] | None
    ino: int

    def slots(self) -> set[tuple[int, str]]:
        return {s for s in (self.old, self.new) if s is not None}

    def dirs(self) -> set[int]:
        return {d for d, _ in self.slots()}


class Model:
    """The two-layer filesystem, by path, as the FUSE operations need it.

    Not thread-safe: :class:`PowercutOps` calls it under one lock."""

    def __init__(self, durable: dict[int, Inode] | None = None, *, ordered: bool = False) -> None:
        self.ordered = ordered
        self.inodes: dict[int, Inode] = {}
        self.pending: list[EntryChange] = []
        self.next_ino = ROOT_INO + 1
        if durable is None:
            root = Inode(ROOT_INO, stat.S_IFDIR | 0o755, os.getuid(), os.getgid())
            root.durable_mode = root.mode
            self.inodes[ROOT_INO] = root
        else:
            self._restore(durable)

    # -------------------------------------------------- after a cut

    def _restore(self, durable: dict[int, Inode]) -> None:
        """Keep what the durable layer reaches from the root."""
        seen: set[int] = set()
        todo = [ROOT_INO]
        while todo:
            ino = todo.pop()
            if ino in seen:
                continue
            seen.add(ino)
            old = durable[ino]
            node = Inode(ino, old.durable_mode, old.uid, old.gid)
            node.data = bytearray(old.durable_data)
            node.durable_data = old.durable_data
            node.durable_mode = old.durable_mode
            node.mtime = node.ctime = old.mtime
            if stat.S_ISDIR(old.durable_mode):
                node.entries = dict(old.durable_entries)
                node.durable_entries = dict(old.durable_entries)
                todo.extend(node.entries.values())
            self.inodes[ino] = node
        for node in self.inodes.values():
            for ino in node.entries.values():
                self.inodes[ino].links += 1
        self.next_ino = max(durable) + 1

    def durable_snapshot(self) -> dict[int, Inode]:
        """A copy of the durable layer (what a cut keeps)."""
        out: dict[int, Inode] = {}
        for ino, node in self.inodes.items():
            copy = Inode(ino, node.mode, node.uid, node.gid, mtime=node.mtime)
            copy.durable_data = node.durable_data
            copy.durable_mode = node.durable_mode
            copy.durable_entries = dict(node.durable_entries)
            out[ino] = copy
        return out

    # -------------------------------------------------------- lookup

    def resolve(self, path: str) -> Inode:
        node = self.inodes[ROOT_INO]
        for part in path.split("/"):
            if not part:
                continue
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, path)
            try:
                node = self.inodes[node.entries[part]]
            except KeyError:
                raise OSError(errno.ENOENT, path) from None
        return node

    def parent_of(self, path: str) -> tuple[Inode, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self.resolve(head or "/")
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, path)
        return parent, name

    def nlink(self, node: Inode) -> int:
        if node.is_dir:
            return 2 + sum(1 for ino in node.entries.values() if self.inodes[ino].is_dir)
        return node.links

    # -------------------------------------------------------- changes

    def _change(self, old: tuple[int, str] | None, new: tuple[int, str] | None, ino: int) -> None:
        self.pending.append(EntryChange(old, new, ino))

    def create(self, path: str, mode: int, uid: int, gid: int) -> Inode:
        parent, name = self.parent_of(path)
        if name in parent.entries:
            raise OSError(errno.EEXIST, path)
        node = Inode(self.next_ino, mode, uid, gid, links=1)
        node.durable_mode = mode
        self.next_ino += 1
        self.inodes[node.ino] = node
        parent.entries[name] = node.ino
        parent.mtime = time.time()
        self._change(None, (parent.ino, name), node.ino)
        return node

    def link(self, target: str, path: str) -> None:
        node = self.resolve(target)
        if node.is_dir:
            raise OSError(errno.EPERM, path)
        parent, name = self.parent_of(path)
        if name in parent.entries:
            raise OSError(errno.EEXIST, path)
        parent.entries[name] = node.ino
        node.links += 1
        node.ctime = time.time()
        self._change(None, (parent.ino, name), node.ino)

    def unlink(self, path: str, *, directory: bool) -> None:
        parent, name = self.parent_of(path)
        node = self.resolve(path)
        if directory != node.is_dir:
            raise OSError(errno.ENOTDIR if directory else errno.EISDIR, path)
        if directory and node.entries:
            raise OSError(errno.ENOTEMPTY, path)
        del parent.entries[name]
        node.links -= 1
        parent.mtime = time.time()
        self._change((parent.ino, name), None, node.ino)

    def rename(self, old: str, new: str, flags: int) -> None:
        if flags:  # RENAME_NOREPLACE / RENAME_EXCHANGE: the spool uses neither
            raise OSError(errno.EINVAL, old)
        src_dir, src_name = self.parent_of(old)
        dst_dir, dst_name = self.parent_of(new)
        node = self.resolve(old)
        replaced = dst_dir.entries.get(dst_name)
        if replaced == node.ino:
            return  # two names of one file: rename(2) does nothing
        if replaced is not None:
            other = self.inodes[replaced]
            if other.is_dir != node.is_dir or (other.is_dir and other.entries):
                raise OSError(errno.EISDIR if other.is_dir else errno.ENOTDIR, new)
            other.links -= 1
        del src_dir.entries[src_name]
        dst_dir.entries[dst_name] = node.ino
        src_dir.mtime = dst_dir.mtime = node.ctime = time.time()
        self._change((src_dir.ino, src_name), (dst_dir.ino, dst_name), node.ino)

    # ---------------------------------------------------------- syncs

    def sync_file(self, node: Inode) -> None:
        node.durable_data = bytes(node.data)
        node.durable_mode = node.mode

    def sync_dir(self, directory: Inode) -> int:
        """Make the pending changes of ``directory`` durable, with the
        earlier ones of the same names (``ordered``: with every earlier
        one); return how many were applied."""
        chosen: list[bool] = [False] * len(self.pending)
        needed: set[tuple[int, str]] = set()
        for i in range(len(self.pending) - 1, -1, -1):
            change = self.pending[i]
            if directory.ino in change.dirs() or change.slots() & needed:
                chosen[i] = True
                needed |= change.slots()
                if self.ordered:  # the journal: all that came before goes too
                    chosen[:i] = [True] * i
                    break
        keep: list[EntryChange] = []
        applied = 0
        for change, take in zip(self.pending, chosen, strict=True):
            if not take:
                keep.append(change)
                continue
            applied += 1
            if change.old is not None:
                d, name = change.old
                self.inodes[d].durable_entries.pop(name, None)
            if change.new is not None:
                d, name = change.new
                self.inodes[d].durable_entries[name] = change.ino
        self.pending = keep
        return applied


# ---------------------------------------------------------- FUSE process


def _load_mfusepy() -> Any:
    import mfusepy  # a test dependency (the "dev" extra); needs libfuse

    return mfusepy


class PowercutOps:
    """The FUSE operations over a :class:`Model` (built by :func:`main`,
    where mfusepy is imported: this module itself imports without it)."""

    use_ns = True

    def init_with_config(self, conn: Any, config: Any) -> None:
        # Operations on an open file or directory get its handle (our inode
        # number) and no path: an unlinked open file is still reachable,
        # and libfuse must not rename it to .fuse_hidden* instead of
        # unlinking (hard_remove). Inode numbers are ours (use_ino).
        config.nullpath_ok = 1
        config.hard_remove = 1
        config.use_ino = 1

    def __init__(self, model: Model, state: Path) -> None:
        self.model = model
        self.state = state
        self._mutex = threading.Lock()
        self.frozen = False
        self.counts: dict[str, int] = {}

    # Every operation runs through here: counted, under the lock, EIO once cut.
    def _op(self, name: str, fn: Callable[[], Any], path: str | None = None) -> Any:
        with self._mutex:
            self.counts[name] = self.counts.get(name, 0) + 1
            if self.frozen and path != "/":  # the root stays visible: umount looks at it
                raise OSError(errno.EIO, "the power is off")
            return fn()

    def cut(self) -> None:
        with self._mutex:
            if not self.frozen:
                self.frozen = True
                tmp = self.state.with_suffix(".tmp")
                tmp.write_bytes(pickle.dumps(self.model.durable_snapshot()))
                tmp.replace(self.state)

    def stats(self) -> dict[str, Any]:
        with self._mutex:
            return {"counts": dict(self.counts), "pending": len(self.model.pending)}

    # ----------------------------------------------------- attributes

    def _named(self, path: str | None) -> Inode:
        if path is None:  # fchmod and the like on an unlinked file: not needed here
            raise OSError(errno.EOPNOTSUPP, "no path")
        return self.model.resolve(path)

    def _attrs(self, node: Inode) -> dict[str, Any]:
        mtime_ns = int(node.mtime * 1e9)
        return {
            "st_ino": node.ino,
            "st_mode": node.mode,
            "st_nlink": self.model.nlink(node),
            "st_uid": node.uid,
            "st_gid": node.gid,
            "st_size": len(node.data),
            "st_blocks": (len(node.data) + 511) // 512,
            "st_atime": mtime_ns,
            "st_mtime": mtime_ns,
            "st_ctime": int(node.ctime * 1e9),
        }

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            node = self.model.inodes[fh] if fh else self.model.resolve(path or "/")
            return self._attrs(node)

        return self._op("getattr", run, path)

    def statfs(self, path: str) -> dict[str, int]:
        with self._mutex:
            used = sum(len(n.data) for n in self.model.inodes.values())
        total = 1 << 30
        free = (total - used) // 4096
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": total // 4096,
            "f_bfree": free,
            "f_bavail": free,
            "f_files": 1 << 20,
            "f_ffree": (1 << 20) - len(self.model.inodes),
            "f_namemax": 255,
        }

    def chmod(self, path: str | None, mode: int) -> None:
        def run() -> None:
            node = self._named(path)
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
            node.ctime = time.time()

        self._op("chmod", run)

    def chown(self, path: str | None, uid: int, gid: int) -> None:
        def run() -> None:
            node = self._named(path)
            if uid != 0xFFFFFFFF and uid != -1:
                node.uid = uid
            if gid != 0xFFFFFFFF and gid != -1:
                node.gid = gid

        self._op("chown", run)

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> None:
        def run() -> None:
            node = self._named(path)
            node.mtime = times[1] / 1e9 if times else time.time()

        self._op("utimens", run)

    # ---------------------------------------------------- directories

    def mkdir(self, path: str, mode: int) -> None:
        uid, gid, _ = _context()
        self._op("mkdir", lambda: self.model.create(path, stat.S_IFDIR | mode, uid, gid))

    def rmdir(self, path: str) -> None:
        self._op("rmdir", lambda: self.model.unlink(path, directory=True))

    def opendir(self, path: str) -> int:
        def run() -> int:
            node = self.model.resolve(path)
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, path)
            return node.ino

        result: int = self._op("opendir", run)
        return result

    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # With a mode and an inode number each: an entry of inode 0 is skipped.
        def run() -> list[tuple[str, dict[str, int], int]]:
            node = self.model.inodes[fh] if fh else self.model.resolve(path or "/")
            out = [(".", {"st_mode": node.mode, "st_ino": node.ino}, 0)]
            out.append(("..", {"st_mode": stat.S_IFDIR, "st_ino": ROOT_INO}, 0))
            for name, ino in node.entries.items():
                out.append((name, {"st_mode": self.model.inodes[ino].mode, "st_ino": ino}, 0))
            return out

        result: list[tuple[str, dict[str, int], int]] = self._op("readdir", run)
        return result

    def releasedir(self, path: str | None, fh: int) -> None:
        return None

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> None:
        def run() -> None:
            node = self.model.inodes[fh] if fh else self.model.resolve(path or "/")
            self.model.sync_dir(node)

        self._op("fsyncdir", run)

    # ---------------------------------------------------------- files

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        uid, gid, _ = _context()
        node: Inode = self._op("create", lambda: self.model.create(path, mode, uid, gid))
        return node.ino

    def mknod(self, path: str, mode: int, dev: int) -> None:
        uid, gid, _ = _context()
        self._op("mknod", lambda: self.model.create(path, mode, uid, gid))

    def symlink(self, target: str, source: str) -> None:
        uid, gid, _ = _context()

        def run() -> None:
            node = self.model.create(target, stat.S_IFLNK | 0o777, uid, gid)
            node.data = bytearray(source.encode())
            node.durable_data = bytes(node.data)  # written with the inode

        self._op("symlink", run)

    def readlink(self, path: str) -> str:
        result: str = self._op("readlink", lambda: self.model.resolve(path).data.decode())
        return result

    def link(self, target: str, source: str) -> None:
        self._op("link", lambda: self.model.link(source, target))

    def unlink(self, path: str) -> None:
        self._op("unlink", lambda: self.model.unlink(path, directory=False))

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        self._op("rename", lambda: self.model.rename(old, new, flags))

    def open(self, path: str, flags: int) -> int:
        def run() -> int:
            node = self.model.resolve(path)
            if flags & os.O_TRUNC:
                node.data.clear()
            return node.ino

        result: int = self._op("open", run)
        return result

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        result: bytes = self._op(
            "read", lambda: bytes(self.model.inodes[fh].data[offset : offset + size])
        )
        return result

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        def run() -> int:
            node = self.model.inodes[fh]
            if offset > len(node.data):
                node.data.extend(bytes(offset - len(node.data)))
            node.data[offset : offset + len(data)] = data
            node.mtime = time.time()
            return len(data)

        result: int = self._op("write", run)
        return result

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        def run() -> None:
            node = self.model.inodes[fh] if fh else self.model.resolve(path or "/")
            if length < len(node.data):
                del node.data[length:]
            else:
                node.data.extend(bytes(length - len(node.data)))
            node.mtime = time.time()

        self._op("truncate", run)

    def flush(self, path: str | None, fh: int) -> None:
        return None

    def release(self, path: str | None, fh: int) -> None:
        return None

    def fsync(self, path: str | None, datasync: int, fh: int) -> None:
        self._op("fsync", lambda: self.model.sync_file(self.model.inodes[fh]))


def _context() -> tuple[int, int, int]:
    mfusepy = _load_mfusepy()
    uid, gid, pid = mfusepy.fuse_get_context()
    return int(uid), int(gid), int(pid)


def _serve_control(ops: PowercutOps, path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    while True:
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as f:
            for line in f:
                command = line.strip().decode()
                reply: dict[str, Any]
                if command == "cut":
                    ops.cut()
                    reply = {"ok": True}
                elif command == "stats":
                    reply = ops.stats()
                else:
                    reply = {"ok": command == "ping"}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()


def main(argv: list[str]) -> int:
    mountpoint, control, state_file, order = argv
    state = Path(state_file)
    durable = pickle.loads(state.read_bytes()) if state.exists() else None
    ops = PowercutOps(Model(durable, ordered=order == "ordered"), state)
    threading.Thread(target=_serve_control, args=(ops, control), daemon=True).start()
    mfusepy = _load_mfusepy()
    # The kernel may cache names and attributes (every change goes through
    # it); other users may use the mount, with the usual permission checks.
    mfusepy.FUSE(ops, mountpoint, foreground=True, allow_other=True, default_permissions=True)
    return 0


# ------------------------------------------------------------ test side


def fuse_missing() -> str | None:
    """Why this layer cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (load the fuse module, or give the container the device)"
    if os.geteuid() != 0:
        return "mounting a FUSE filesystem for the power-cut tests needs root"
    try:
        _load_mfusepy()
    except (ImportError, OSError) as exc:
        return (
            f"mfusepy or libfuse3 missing ({exc}): apt-get install fuse3 libfuse3-3, "
            "pip install -e '.[dev]'"
        )
    return None


class PowercutMount:
    """One mount of the filesystem, from the test's side: ``mount()``
    starts the FUSE process and waits until the mount is live; ``cut()``
    freezes it (the power goes off); ``unmount()`` ends it. The state file
    carries the durable layer from one mount to the next."""

    def __init__(self, mountpoint: Path, work: Path, *, ordered: bool = False) -> None:
        self.mountpoint = mountpoint
        self.ordered = ordered
        self.control = work / "powercut.sock"
        self.state = work / "powercut.state"
        self.log = work / "powercut.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self, timeout: float = 30.0) -> None:
        self.mountpoint.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        project = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (project, env.get("PYTHONPATH")) if p)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.powercut_fs",
                    str(self.mountpoint),
                    str(self.control),
                    str(self.state),
                    "ordered" if self.ordered else "strict",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the FUSE mount did not come up:\n{self.log_text()}")
            time.sleep(0.02)
        while not self.control.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no control socket:\n{self.log_text()}")
            time.sleep(0.02)

    def command(self, command: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(self.control))
            s.sendall(command.encode() + b"\n")
            with s.makefile("rb") as f:
                reply: dict[str, Any] = json.loads(f.readline())
        return reply

    def cut(self) -> None:
        """The power goes off: nothing more becomes durable."""
        assert self.command("cut") == {"ok": True}

    def stats(self) -> dict[str, Any]:
        return self.command("stats")

    def unmount(self, timeout: float = 30.0) -> None:
        """Unmount (lazily if something still holds it) and wait for the
        FUSE process to end."""
        if self.proc is None:
            return
        for command in (["fusermount3", "-u"], ["umount", "-l"]):
            try:
                done = subprocess.run(
                    [*command, str(self.mountpoint)], capture_output=True, check=False
                )
            except FileNotFoundError:
                continue
            if done.returncode == 0:
                break
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout)
        self.proc = None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @contextlib.contextmanager
    def mounted(self) -> Iterator[Path]:
        self.mount()
        try:
            yield self.mountpoint
        finally:
            self.unmount()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
