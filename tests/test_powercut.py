"""Power cuts under SMTP load: nothing the spool acknowledged is lost.

``kill -9`` leaves the page cache, so it cannot tell a sync from no sync.
Here the spool lives on :mod:`tests.powercut_fs`, a FUSE filesystem that
keeps only what was synced (its docstring gives the model) and forgets the
rest when the test cuts the power. The daemon (``spoold run`` with one
ingest worker, ``spool.sync = "fsync"``) takes mail from several SMTP
sessions; each message carries a unique tag (recipient, Message-ID and
subject), and the client notes the id of each message the daemon answered
``250`` for. At a random moment the filesystem is frozen (the power goes
off: nothing more becomes durable, every call fails), the daemon and its
worker are killed, the filesystem is unmounted and mounted again from what
was durable. Then, before any recovery, every message acknowledged since
the last cut must be in the spool: its record readable and naming its
recipient, its body holding what was sent, byte for byte. Recovery is run
and the consistency check must find nothing; then the daemon starts again
on the same spool. The next hop is a closed port: nothing is delivered, so
every message of every round must still be there at the end (checked once
more then); relay attempts rewrite the records while the power goes off,
so those writes are cut too.

Each cut draws the layer's order of directory changes: ``ordered`` (ext4's
journal) or ``strict`` (POSIX: a sync of one directory commits nothing
elsewhere). One state only ``strict`` can leave is allowed: a record
without its body, of a message that was never acknowledged. The store
renames a new message's body into ``data/`` and then its record into its
queue, and syncs the two directories after both renames; when another
writer's sync of the queue directory lands between, the record is durable
and the body not. On ext4 or XFS the journal keeps the two renames in order
and this cannot happen; on a filesystem without that order, syncing
``data/`` before renaming the record would close it (same number of
syncs). Any other finding of the check fails the test, and so does this
one after an ``ordered`` cut.

Why only ``sync = "fsync"``: the kernel does not forward ``syncfs(2)`` to a
FUSE filesystem (``test_syncfs_reaches_no_operation`` shows it), so on this
layer the group-commit mode would make nothing durable, whatever its order
of calls. That mode's calls are checked under strace in
``tests/test_durability.py``.

The delays and orders are drawn from a seeded generator; the seed is
printed and ``SPOOLD_POWERCUT_SEED=N`` replays a run (as far as the
daemon's own timing allows). The tests need root, ``/dev/fuse``, libfuse 3
(Debian ``fuse3``) and mfusepy (the ``dev`` extra); without them they skip.
Marked ``powercut``: ``pytest -m powercut`` runs them alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from spoold.errors import NotFoundError
from spoold.ondisk import OnDiskSpool, Unreadable
from spoold.spool import Spool
from spoold.store import Problem
from tests.daemon_helpers import NotifySocket, child_env, prefill, spooled
from tests.powercut_fs import PowercutMount, fuse_missing
from tests.support import WAIT_TIMEOUT, free_port

_missing = fuse_missing()
pytestmark = [
    pytest.mark.powercut,
    pytest.mark.skipif(_missing is not None, reason=f"power-cut tests: {_missing}"),
]

CUTS = 20
SESSIONS = 4  # concurrent SMTP sessions under load
LATEST_CUT = 0.6  # seconds after the round's first 250: the cut comes at a random moment before
SEED = int(os.environ.get("SPOOLD_POWERCUT_SEED") or random.SystemRandom().randrange(2**32))


# ------------------------------------------------------- the layer itself


def write_file(path: Path, data: bytes, *, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_the_layer_keeps_only_what_was_synced(tmp_path: Path) -> None:
    mount = PowercutMount(tmp_path / "mnt", tmp_path)
    with mount.mounted() as root:
        cases = ["rewrite", "file_only", "both", "tmp", "data", "tmp2", "data2"]
        cases += ["tmp3", "data3", "gone", "links"]
        for name in cases:
            (root / name).mkdir()
        sync_dir(root)
        # Written after its last fsync: the disk keeps the synced content.
        write_file(root / "rewrite" / "f", b"old", sync=True)
        sync_dir(root / "rewrite")
        with (root / "rewrite" / "f").open("r+b") as f:
            f.write(b"new")
        # The file synced, its directory not: the new name is lost.
        write_file(root / "file_only" / "f", b"data", sync=True)
        # Both synced: kept.
        write_file(root / "both" / "f", b"data", sync=True)
        sync_dir(root / "both")
        # Synced in tmp/, renamed into data/, data/ synced: in data/ only.
        write_file(root / "tmp" / "f", b"data", sync=True)
        os.rename(root / "tmp" / "f", root / "data" / "f")
        sync_dir(root / "data")
        # Renamed and the directory synced, the content never: an empty file.
        write_file(root / "tmp2" / "f", b"data", sync=False)
        os.rename(root / "tmp2" / "f", root / "data2" / "f")
        sync_dir(root / "data2")
        # A durable file renamed, neither directory synced: still in tmp3/.
        write_file(root / "tmp3" / "f", b"data", sync=True)
        sync_dir(root / "tmp3")
        os.rename(root / "tmp3" / "f", root / "data3" / "f")
        # An unlink not synced: the file comes back.
        write_file(root / "gone" / "f", b"data", sync=True)
        sync_dir(root / "gone")
        (root / "gone" / "f").unlink()
        # A hard link synced; the first name's unlink not.
        write_file(root / "links" / "a", b"data", sync=True)
        os.link(root / "links" / "a", root / "links" / "b")
        sync_dir(root / "links")
        (root / "links" / "a").unlink()
        # A directory never synced into its parent: gone, with what it held.
        (root / "new").mkdir()
        write_file(root / "new" / "f", b"data", sync=True)
        sync_dir(root / "new")
        assert sorted(os.listdir(root / "data3")) == ["f"]
        assert (root / "rewrite" / "f").read_bytes() == b"new"
        mount.cut()
        with pytest.raises(OSError):
            os.listdir(root / "both")
    with mount.mounted() as root:
        assert sorted(os.listdir(root)) == sorted(cases)
        assert (root / "rewrite" / "f").read_bytes() == b"old"
        assert os.listdir(root / "file_only") == []
        assert (root / "both" / "f").read_bytes() == b"data"
        assert os.listdir(root / "tmp") == []
        assert (root / "data" / "f").read_bytes() == b"data"
        assert (root / "data2" / "f").read_bytes() == b""
        assert os.listdir(root / "tmp3") == ["f"]
        assert os.listdir(root / "data3") == []
        assert (root / "gone" / "f").read_bytes() == b"data"
        assert sorted(os.listdir(root / "links")) == ["a", "b"]
        assert os.stat(root / "links" / "a").st_nlink == 2


@pytest.mark.parametrize("ordered", [False, True])
def test_a_directory_sync_keeps_earlier_changes_only_when_ordered(
    tmp_path: Path, ordered: bool
) -> None:
    """``ordered`` is ext4's journal: a sync of one directory also commits
    the changes made before it elsewhere; ``strict`` commits only its own."""
    mount = PowercutMount(tmp_path / "mnt", tmp_path, ordered=ordered)
    with mount.mounted() as root:
        for name in ("tmp", "data", "active"):
            (root / name).mkdir()
        sync_dir(root)
        write_file(root / "tmp" / "body", b"body", sync=True)
        write_file(root / "tmp" / "record", b"record", sync=True)
        sync_dir(root / "tmp")
        os.rename(root / "tmp" / "body", root / "data" / "m")
        os.rename(root / "tmp" / "record", root / "active" / "m")
        sync_dir(root / "active")  # and data/ never
        mount.cut()
    with mount.mounted() as root:
        assert (root / "active" / "m").read_bytes() == b"record"
        assert os.listdir(root / "data") == (["m"] if ordered else [])
        assert os.listdir(root / "tmp") == ([] if ordered else ["body"])


def test_syncfs_reaches_no_operation(tmp_path: Path) -> None:
    """Why the spool's ``syncfs`` mode is not power-cut here: the call never
    reaches a FUSE filesystem (only virtiofs asks the kernel for it), so the
    layer cannot make anything durable at it. If this fails, the kernel
    forwards it now: model it and cut the syncfs mode too."""
    mount = PowercutMount(tmp_path / "mnt", tmp_path)
    libc = ctypes.CDLL(None, use_errno=True)
    with mount.mounted() as root:
        write_file(root / "f", b"data", sync=False)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            before = mount.stats()
            assert libc.syncfs(fd) == 0, os.strerror(ctypes.get_errno())
            after = mount.stats()
            os.fsync(fd)
            synced = mount.stats()
        finally:
            os.close(fd)
    assert after == before
    assert synced["counts"]["fsyncdir"] == 1  # the same probe sees a directory fsync


async def test_a_new_spool_keeps_its_first_message(tmp_path: Path) -> None:
    """The spool's directories are made durable when it is created: a
    message acknowledged in a brand-new spool survives a power cut (the
    directories' own names must be synced into their parents, not only the
    entries inside them)."""
    mount = PowercutMount(tmp_path / "mnt", tmp_path)
    spool_dir = mount.mountpoint / "var" / "spool"
    await anyio.to_thread.run_sync(mount.mount)
    try:
        [mid] = await prefill(spool_dir, [spooled("127.0.0.1:9")])
        await anyio.to_thread.run_sync(mount.cut)
    finally:
        await anyio.to_thread.run_sync(mount.unmount)
    await anyio.to_thread.run_sync(mount.mount)
    try:
        messages, unreadable = await Spool.status_from_disk(spool_dir)
        assert [m.id for m in messages] == [mid] and unreadable == []
    finally:
        await anyio.to_thread.run_sync(mount.unmount)


# ------------------------------------------------------------- the daemon


def daemon_config(work: Path, spool_dir: Path, port: int, hop: str) -> Path:
    run = work / "run"
    run.mkdir(mode=0o750, exist_ok=True)
    config = work / "spoold.toml"
    config.write_text(
        "[spool]\n"
        f'dir = "{spool_dir}"\n'
        'sync = "fsync"\n'
        'retry_intervals = ["1h"]\n'
        'flush_timeout = "1s"\n'
        "\n[control]\n"
        'socket = "run/ctl.sock"\n'
        "\n[log]\n"
        'format = "json"\n'
        "\n[relay]\n"
        'default_route = "smarthost"\n'
        'connect_timeout = "2s"\n'
        "\n[routes.smarthost]\n"
        f'next_hops = ["{hop}"]\n'
        'tls = "none"\n'
        "\n[smtp]\n"
        f'listen = ["127.0.0.1:{port}"]\n'
        "workers = 1\n"
        f"max_connections_per_client = {SESSIONS * 2}\n"
    )
    return config


async def start_daemon(config: Path, notify: NotifySocket, log: Path) -> asyncio.subprocess.Process:
    """``spoold run`` in a session of its own (so the cut kills its worker
    too); returns once it says READY=1."""
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "spoold.daemon.cli",
            "run",
            "--config",
            str(config),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=child_env({"NOTIFY_SOCKET": str(notify.path)}),
            start_new_session=True,
        )
    ready = asyncio.ensure_future(notify.wait_for("READY", "1"))
    exited = asyncio.ensure_future(proc.wait())
    done, _ = await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
    for task in (ready, exited):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, BaseException):
            await task
    if ready not in done:
        pytest.fail(f"the daemon did not get ready:\n{log.read_text(errors='replace')}")
    return proc


def live_members(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that are not zombies (a zombie holds
    no file open: the mount can go)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


async def kill_session(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL to the daemon's session (daemon and worker); wait until
    none of them runs."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await asyncio.wait_for(proc.wait(), WAIT_TIMEOUT)
    deadline = time.monotonic() + WAIT_TIMEOUT
    while live_members(proc.pid):
        assert time.monotonic() < deadline, "the daemon's worker outlived the kill"
        await asyncio.sleep(0.01)  # polling: nothing tells us when a process is gone


# ------------------------------------------------------------- the client


def message_content(tag: str, rng: random.Random) -> bytes:
    """A unique message, CRLF lines, one of them starting with a dot."""
    filler = "".join(f"line {i} of {tag}\r\n" for i in range(rng.randrange(1, 200)))
    return (
        f"Message-ID: <{tag}@powercut.example>\r\nSubject: {tag}\r\n\r\n"
        f"{filler}.a line that starts with a dot\r\nend of {tag}\r\n"
    ).encode()


def dot_stuffed(content: bytes) -> bytes:
    lines = content.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


async def reply(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), WAIT_TIMEOUT)
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"connection ended: {lines} {line!r}")
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


@dataclass(frozen=True)
class Ack:
    """A message the daemon answered 250 for."""

    tag: str
    id: str  # from "250 ... queued as ID"
    content: bytes


async def submit_until_cut(
    port: int, prefix: str, rng: random.Random, acked: list[Ack], first: asyncio.Event
) -> None:
    """One SMTP session sending tagged messages until the daemon stops
    answering; each message answered 250 goes into ``acked``."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), WAIT_TIMEOUT
        )
    except OSError:
        return
    try:
        if not (await reply(reader)).startswith(b"220"):
            return
        writer.write(b"EHLO client.example\r\n")
        assert (await reply(reader)).startswith(b"250")
        for n in range(10_000):
            tag = f"{prefix}-{n}"
            content = message_content(tag, rng)
            for command, expected in (
                (b"MAIL FROM:<sender@example.org>", b"250"),
                (f"RCPT TO:<{tag}@example.com>".encode(), b"250"),
                (b"DATA", b"354"),
            ):
                writer.write(command + b"\r\n")
                if not (await reply(reader)).startswith(expected):
                    return
            writer.write(dot_stuffed(content) + b".\r\n")
            answer = await reply(reader)
            queued = re.fullmatch(rb"250 2\.0\.0 OK queued as (\S+)\r\n", answer)
            if queued is None:
                return  # the power is off: the spool cannot sync, so it refuses
            acked.append(Ack(tag, queued.group(1).decode(), content))
            first.set()
    except (OSError, ConnectionError, asyncio.IncompleteReadError):
        return  # the daemon was killed
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


# ------------------------------------------------------------- the checks


async def lost(spool_dir: Path, acks: list[Ack]) -> list[str]:
    """What the spool lacks of ``acks``, read as it is (after a cut, before
    recovery): a record missing, unreadable or not naming the message's
    recipient, a body missing or not what was sent."""
    problems = []
    ondisk, _ = await OnDiskSpool.open(spool_dir, owner=False, create=False)
    try:
        for ack in acks:
            try:
                msg = await ondisk.find(ack.id)  # in any queue, checked out or not
            except NotFoundError:
                problems.append(f"{ack.tag}: no record {ack.id}")
                continue
            if isinstance(msg, Unreadable):
                problems.append(f"{ack.tag}: record {ack.id} unreadable: {msg.reason}")
                continue
            if f"{ack.tag}@example.com" not in msg.remaining_recipients:
                problems.append(f"{ack.tag}: record {ack.id} names {msg.remaining_recipients}")
            try:
                body = await ondisk.read_body(ack.id)
            except NotFoundError:
                problems.append(f"{ack.tag}: no body {ack.id}")
                continue
            if not body.content().endswith(ack.content):
                problems.append(f"{ack.tag}: body {ack.id} is not what was sent")
    finally:
        await ondisk.close()
    return problems


async def recover_and_check(spool_dir: Path) -> list[Problem]:
    """Recovery as the daemon runs it at start, then the consistency check."""
    ondisk, _ = await OnDiskSpool.open(spool_dir)
    try:
        return await ondisk.check()
    finally:
        await ondisk.close()


def strict_order_artefact(problem: Problem, acked_ids: set[str]) -> bool:
    """A record without its body, of a message never acknowledged: what a
    cut in ``strict`` order may leave (see the module docstring)."""
    return problem.kind == "missing_body" and problem.name not in acked_ids


# ------------------------------------------------------------- the test


async def test_power_cuts_under_smtp_load_lose_no_acknowledged_message(tmp_path: Path) -> None:
    print(f"power-cut seed {SEED} (SPOOLD_POWERCUT_SEED={SEED} replays it)")
    rng = random.Random(SEED)
    mount = PowercutMount(tmp_path / "mnt", tmp_path)
    spool_dir = mount.mountpoint / "spool"
    port = free_port()
    config = daemon_config(tmp_path, spool_dir, port, f"127.0.0.1:{free_port()}")
    log = tmp_path / "spoold.log"
    acked: list[Ack] = []
    per_cut: list[int] = []
    orders: list[str] = []
    artefacts: set[str] = set()
    started = time.monotonic()
    for cut in range(CUTS + 1):
        mount.ordered = rng.random() < 0.5
        orders.append("ordered" if mount.ordered else "strict")
        await anyio.to_thread.run_sync(mount.mount)
        try:
            if cut:
                # This cut's messages now; every cut's once more at the end.
                missing = await lost(spool_dir, acked[-per_cut[-1] :])
                assert missing == [], f"cut {cut} (seed {SEED}) lost {len(missing)}: {missing[:5]}"
                problems = await recover_and_check(spool_dir)
                acked_ids = {a.id for a in acked}
                known = {p.name for p in problems if strict_order_artefact(p, acked_ids)}
                assert known <= artefacts or orders[cut - 1] == "strict", (
                    f"cut {cut} (seed {SEED}, ordered): a record without its body: {known}"
                )
                artefacts |= known
                others = [str(p) for p in problems if p.name not in known]
                assert others == [], f"cut {cut} (seed {SEED}): check found {others[:5]}"
            if cut == CUTS:
                missing = await lost(spool_dir, acked)
                assert missing == [], f"(seed {SEED}) lost in the end: {missing[:5]}"
                break
            notify = NotifySocket(tmp_path / f"notify{cut}.sock")
            try:
                proc = await start_daemon(config, notify, log)
            finally:
                notify.close()
            try:
                before = len(acked)
                first = asyncio.Event()
                delay = rng.uniform(0, LATEST_CUT)
                async with asyncio.TaskGroup() as tg:
                    for s in range(SESSIONS):
                        session_rng = random.Random(rng.random())
                        tg.create_task(
                            submit_until_cut(port, f"c{cut}s{s}", session_rng, acked, first)
                        )
                    await asyncio.wait_for(first.wait(), WAIT_TIMEOUT)
                    await asyncio.sleep(delay)  # the random moment of the cut: the point here
                    await anyio.to_thread.run_sync(mount.cut)
                    await kill_session(proc)
                per_cut.append(len(acked) - before)
            finally:
                await kill_session(proc)
        finally:
            await anyio.to_thread.run_sync(mount.unmount)
    print(
        f"{CUTS} cuts in {time.monotonic() - started:.1f} s: {len(acked)} messages "
        f"acknowledged, all of them found; per cut {per_cut}, orders {orders[:CUTS]}; "
        f"records without a body of unacknowledged messages: {sorted(artefacts)}"
    )
    assert len(per_cut) == CUTS and all(n > 0 for n in per_cut)
