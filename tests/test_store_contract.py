"""Details of the store's commit path that the other store tests do not pin
down, each found by a mutation run (mutmut on the modules of ``spoold/store/``):

* the named steps each operation passes, in order: they are the contract
  :class:`spoold.testing.Faults` and the crash tests rely on, so a renamed
  or skipped step would make those tests pass without testing anything;
* the mode of every file written (0640: mail is not for other users);
* the prefix an entry asks for is written before its body;
* ``write`` reports a failed write with the errno (a full disk says so)
  and the path; ``delete`` and ``write`` of a name that is not there say
  which name and queue;
* ``delete`` works when the registry entry is gone (it is never fsynced,
  so a power loss may take it).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from spoold.errors import NotFoundError, StoreError
from spoold.store import NewEntry, Store
from spoold.testing import Faults
from tests.support import spool_files

QUEUES = ["active", "frozen"]


class Steps:
    """A step hook that records every step, in order."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, step: str) -> None:
        self.seen.append(step)

    def take(self) -> list[str]:
        out, self.seen = self.seen, []
        return out


def entry(body: bytes = b"body\r\n", prefix: bytes | None = None) -> NewEntry:
    return NewEntry(
        "active",
        body,
        lambda name, names: f"record of {name} among {' '.join(names)}".encode(),
        (lambda name: prefix + name.encode() + b"\r\n") if prefix is not None else None,
    )


async def test_each_operation_passes_its_named_steps_in_order(tmp_path: Path) -> None:
    steps = Steps()
    store, _ = await Store.open(tmp_path, QUEUES, on_step=steps)
    async with store:
        steps.take()
        a, b = await store.enqueue([entry(), entry()])
        assert steps.take() == [
            "check_space",
            *["reserve"] * 2,
            *["write_body", "write_record"] * 2,
            *["rename_body", "rename_record"] * 2,
            "fsync_dirs",
            "done",
        ]
        await store.write("active", a, b"new content")
        assert steps.take() == ["write_record", "replace", "fsync_dirs", "done"]
        await store.write("active", a, b"frozen now", to_queue="frozen")
        assert steps.take() == ["write_record", "replace", "move", "fsync_dirs", "done"]
        await store.checkout("active", b)
        await store.release("active", b)
        assert steps.take() == ["move", "fsync_dirs", "done"]
        await store.delete("frozen", a)
        assert steps.take() == ["unlink_registry", "unlink_record", "unlink_body", "done"]


async def test_a_group_commit_passes_its_named_steps_in_order(tmp_path: Path) -> None:
    steps = Steps()
    store, _ = await Store.open(tmp_path, QUEUES, on_step=steps, sync="syncfs")
    async with store:
        steps.take()
        await store.enqueue([entry(), entry()])
        assert steps.take() == [
            "check_space",
            *["reserve"] * 2,
            *["write_body", "write_record"] * 2,
            "sync_data",
            *["rename_body", "rename_record"] * 2,
            "fsync_dirs",
            "done",
        ]


async def test_every_file_written_is_0640_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store, _ = await Store.open(tmp_path, QUEUES)
        async with store:
            (name,) = await store.enqueue([entry()])
            await store.write("active", name, b"rewritten", to_queue="frozen")
            for path in (f"data/{name}", f"frozen/{name}", f".registry/{name}"):
                mode = stat.S_IMODE((tmp_path / path).stat().st_mode)
                assert mode == 0o640, (path, oct(mode))
    finally:
        os.umask(old)


async def test_the_prefix_is_written_before_the_body(tmp_path: Path) -> None:
    store, _ = await Store.open(tmp_path, QUEUES)
    async with store:
        with_prefix, without = await store.enqueue(
            [entry(b"the body\r\n", prefix=b"Received: for "), entry(b"plain\r\n")]
        )
        assert await store.read_body(with_prefix) == (
            f"Received: for {with_prefix}\r\n".encode() + b"the body\r\n"
        )
        assert await store.read_body(without) == b"plain\r\n"
        record = await store.read("active", with_prefix)
        assert record.data == f"record of {with_prefix} among {with_prefix} {without}".encode()


@pytest.mark.parametrize("step", ["write_record", "replace", "move", "fsync_dirs"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
async def test_a_failed_write_says_why_and_where(tmp_path: Path, step: str, code: int) -> None:
    faults = Faults()
    store, _ = await Store.open(tmp_path, QUEUES, on_step=faults)
    async with store:
        (name,) = await store.enqueue([entry()])
        faults.fail(step, OSError(code, os.strerror(code), f"{tmp_path}/somewhere"))
        with pytest.raises(StoreError) as raised:
            await store.write("active", name, b"new", to_queue="frozen")
        error = raised.value
        assert error.errno == code
        assert error.disk_full is (code == errno.ENOSPC)
        assert error.filename == f"{tmp_path}/somewhere"
        assert f"writing {name} in {tmp_path} failed" in str(error)
        assert not any((tmp_path / "tmp").iterdir())


async def test_a_name_that_is_not_there_is_named_in_the_error(tmp_path: Path) -> None:
    store, _ = await Store.open(tmp_path, QUEUES)
    async with store:
        (name,) = await store.enqueue([entry()])
        for call, queue in (
            (lambda: store.delete("frozen", name), "frozen"),
            (lambda: store.write("frozen", name, b"x"), "frozen"),
            (lambda: store.delete("active", name, checked_out=True), "active"),
        ):
            with pytest.raises(NotFoundError) as raised:
                await call()
            assert str(raised.value) == f"{name}: not in queue {queue}"


async def test_delete_works_without_the_registry_entry(tmp_path: Path) -> None:
    store, _ = await Store.open(tmp_path, QUEUES)
    async with store:
        (name,) = await store.enqueue([entry()])
        (tmp_path / ".registry" / name).unlink()  # as a power loss may leave it
        await store.delete("active", name)
        assert not (tmp_path / "active" / name).exists()
        assert not (tmp_path / "data" / name).exists()
        assert await store.check(max_age=0) == []


# ------------------------------------------------------------- recovery

DEAD_PID = 999_999_999  # no such process


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every descriptor this process fsyncs from now on
    (recovery runs inside :meth:`Store.open`, before a test could look)."""
    seen: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


async def test_recovery_fsyncs_every_directory_it_changed(
    tmp_path: Path, fsynced: list[str]
) -> None:
    store, _ = await Store.open(tmp_path, QUEUES)
    async with store:
        a, b = await store.enqueue([entry(), entry()])
        await store.write("active", b, b"frozen", to_queue="frozen")
        await store.checkout("active", a)
        await store.checkout("frozen", b)
    (tmp_path / "data" / "DeadWriterBody").write_bytes(b"never acknowledged")
    (tmp_path / ".registry" / "DeadWriterBody").write_text(f"{DEAD_PID}\n")
    (tmp_path / ".registry" / "DeadWriterNoBody").write_text(f"{DEAD_PID}\n")
    fsynced.clear()

    store, report = await Store.open(tmp_path, QUEUES)
    async with store:
        assert sorted(report.returned_checkouts) == [("active", a), ("frozen", b)]
        assert report.removed_unacknowledged == ["DeadWriterBody", "DeadWriterNoBody"]
        assert set(fsynced) == {
            f"{os.path.realpath(tmp_path)}/{d}"
            for d in (
                "active",
                "active/.checkout",
                "frozen",
                "frozen/.checkout",
                "data",
                ".registry",
            )
        }


async def test_recovery_reports_a_registry_entry_without_a_body_once(
    tmp_path: Path, fsynced: list[str]
) -> None:
    store, _ = await Store.open(tmp_path, QUEUES)
    await store.close()
    (tmp_path / ".registry" / "OnlyARegistryEntry").write_text(f"{DEAD_PID}\n")
    fsynced.clear()

    store, report = await Store.open(tmp_path, QUEUES)
    async with store:
        assert report.removed_unacknowledged == ["OnlyARegistryEntry"]
        assert fsynced == [f"{os.path.realpath(tmp_path)}/.registry"]
        assert not (tmp_path / ".registry" / "OnlyARegistryEntry").exists()


@pytest.mark.parametrize(
    ("step", "nth"),
    [("rename_body", 2), ("rename_record", 2), ("fsync_dirs", 1)],
    ids=["second-body-rename", "second-record-rename", "directory-fsync"],
)
async def test_a_batch_failing_after_its_first_renames_takes_them_back(
    tmp_path: Path, step: str, nth: int
) -> None:
    """Some entries of the batch are already in place when the failure
    comes: they are removed too (nothing was acknowledged)."""
    faults = Faults()
    store, _ = await Store.open(tmp_path, QUEUES, on_step=faults)
    async with store:
        faults.fail(
            step,
            OSError(errno.EIO, os.strerror(errno.EIO), f"{tmp_path}/where"),
            when=lambda: faults.seen[step] == nth,
        )
        with pytest.raises(StoreError) as raised:
            await store.enqueue([entry(), entry()])
        assert faults.raised[step] == 1
        assert raised.value.errno == errno.EIO
        assert raised.value.filename == f"{tmp_path}/where"
        assert f"enqueue into {tmp_path} failed" in str(raised.value)
        for directory in ("tmp", "data", "active", ".registry"):
            assert spool_files(tmp_path, directory) == {}
