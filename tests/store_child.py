"""Run in a child process by the store tests: do one store operation and,
when told, die with os._exit at a named step (a crash, not an exception)."""

from __future__ import annotations

import os
import sys

import anyio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spoold.message import Frozen, Queue, SendAt
from spoold.ondisk import OnDiskSpool
from spoold.times import utcnow
from tests.factories import new_message

CRASH_EXIT = 77

# The steps of a group commit (sync="syncfs") a child can die at, in order.
GROUPED_STEPS = [
    "reserve",
    "write_body",
    "write_record",
    "sync_data",
    "rename_body",
    "rename_record",
    "fsync_dirs",
    "done",
]


def crash_at(step: str, nth: int = 1):  # type: ignore[no-untyped-def]
    seen = {"n": 0}

    def hook(name: str) -> None:
        if name == step:
            seen["n"] += 1
            if seen["n"] == nth:
                os._exit(CRASH_EXIT)

    return hook


async def main(spool_dir: str, op: str, arg: str) -> None:
    if op == "enqueue_many":
        od, _ = await OnDiskSpool.open(spool_dir, owner=False)
        async with od, anyio.create_task_group() as tg:
            count = int(arg)
            per_task = count // 10
            for _ in range(10):

                async def run() -> None:
                    for _ in range(per_task):
                        await od.add([new_message()])

                tg.start_soon(run)
        return
    hook = crash_at(arg)
    if op in ("enqueue", "enqueue_syncfs"):
        sync = "syncfs" if op == "enqueue_syncfs" else "fsync"
        od, _ = await OnDiskSpool.open(spool_dir, owner=True, on_step=hook, sync=sync)
        await od.add([new_message(b".leading dot\r\nbody\r\n")])
    elif op == "enqueue_reuse":
        # Two group commits: the first claims files of the pool, the
        # second writes into them and dies at the step named (its nth).
        hook = crash_at(arg, 2)
        od, _ = await OnDiskSpool.open(spool_dir, owner=True, on_step=hook, sync="syncfs")
        await od.add([new_message(b"first\r\n")])
        await od.add([new_message(b"second\r\n")])
    elif op in ("move", "move_checked_out"):
        od, _ = await OnDiskSpool.open(spool_dir, owner=True, on_step=hook)
        (msg,), _ = await od.load(Queue.ACTIVE)
        checked_out = op == "move_checked_out"
        if checked_out:
            await od.checkout(msg)
            msg.status = SendAt(at=utcnow())
        else:
            msg.status = Frozen()
        await od.save(msg, from_queue=Queue.ACTIVE, checked_out=checked_out)
    elif op == "delete":
        od, _ = await OnDiskSpool.open(spool_dir, owner=True, on_step=hook)
        (msg,), _ = await od.load(Queue.ACTIVE)
        await od.store.delete(Queue.ACTIVE.value, msg.id)
    else:
        raise SystemExit(f"unknown op {op}")
    await od.close()


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:4])
