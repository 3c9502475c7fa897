"""What every kind of test here shares: a free port, waiting for a
condition, and the files of a spool.

* :func:`free_port` -- a ``127.0.0.1`` port nothing listens on;
  :func:`accepting` -- whether something accepts connections on one.
* :func:`wait_until` -- the one way a test waits for something it cannot
  await directly (a count in a server, a file, a daemon's log line, a reply
  of a control socket). It polls a condition until it holds; the deadline is
  only a safety net that turns a hang into a failure saying what was awaited,
  never the thing a test measures. A test that must show that something does
  *not* happen waits instead for a later event that proves the moment has
  passed (a probe message delivered, a connection closed).
* :func:`spool_files` -- every file of a spool with its content, to compare
  a spool before and after (the lock left out); :func:`records_in` -- the ids
  whose record is in one queue, checked out or not.
"""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from spoold.store import NewEntry, Store

__all__ = [
    "WAIT_TIMEOUT",
    "SUPERSCRIPT_TWO",
    "ARABIC_TEN",
    "NOT_ASCII_DIGITS",
    "free_port",
    "accepting",
    "wait_until",
    "spool_files",
    "records_in",
    "enqueue_each_at_once",
]

WAIT_TIMEOUT = 30.0
"""How long :func:`wait_until` waits by default: far more than anything here
takes on a loaded machine, so reaching it means a bug, not a slow run."""

# Digits that str.isdigit() takes but a protocol or a file does not write:
SUPERSCRIPT_TWO = "\u00b2"  # int() raises ValueError on it
ARABIC_TEN = "\u0661\u0660"  # Arabic-Indic one, zero: int() reads 10
NOT_ASCII_DIGITS = (SUPERSCRIPT_TWO, ARABIC_TEN)


def free_port() -> int:
    """A ``127.0.0.1`` TCP port nothing listens on now: a connection to it is
    refused at once, and a server may bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def accepting(port: int) -> bool:
    """Whether a connection to ``127.0.0.1:port`` is accepted now (it is
    closed at once): a condition for :func:`wait_until` while a server
    starts."""
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def wait_until(
    condition: Callable[[], Any],
    what: str | Callable[[], str],
    *,
    timeout: float = WAIT_TIMEOUT,
    interval: float = 0.0,
) -> Any:
    """Call ``condition`` (a function, or one returning an awaitable) until
    its value is true; return that value.

    ``interval`` is the pause between two calls: 0 (yield to the event loop)
    for state that tasks of this loop change, a few hundredths of a second
    for state another process changes (a file, a daemon's socket), so that
    the wait leaves the CPU to that process. ``what`` names what is awaited
    for the failure; a callable is asked only then (to show the state).
    Exceptions of ``condition`` propagate; after ``timeout`` seconds the test
    fails with an :class:`AssertionError`.
    """
    with anyio.move_on_after(timeout):
        while True:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await anyio.sleep(interval)
    text = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout:g}s waiting for {text}")


def spool_files(root: Path, *under: str) -> dict[str, bytes]:
    """Every regular file below ``root`` -- or below its subdirectories
    ``under`` (``"data"``, ``"active/.checkout"``) -- by its path relative to
    ``root`` ('/'-separated), with its content. The lock is left out (its
    content is the owner's pid); sockets are not regular files."""
    out: dict[str, bytes] = {}
    for top in [root / u for u in under] if under else [root]:
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                path = Path(dirpath, name)
                rel = path.relative_to(root).as_posix()
                if rel == "lock" or rel.startswith(".registry/.writer."):
                    continue
                if path.is_file():
                    out[rel] = path.read_bytes()
    return dict(sorted(out.items()))


def without_pool(files: dict[str, bytes]) -> dict[str, bytes]:
    """``files`` (from :func:`spool_files`) less the pool of removed files
    kept for reuse (``tmp/pool.*``: see spoold.store.pool)."""
    return {k: v for k, v in files.items() if not k.startswith("tmp/pool.")}


def records_in(root: Path, queue: str) -> set[str]:
    """The ids whose record is in ``queue`` (``"active"``, ``"frozen"``, ...),
    checked out or not; ``"active/.checkout"`` gives the checked-out ones
    only. Reasons kept beside set-aside records are not records. Names
    only, no content: safe to call while a daemon moves and deletes them."""
    found: set[str] = set()
    for dirpath, _dirs, files in os.walk(root / queue):
        if Path(dirpath).name in (Path(queue).name, ".checkout"):
            found.update(files)
    return found


def unnamed_files_work(directory: Path) -> bool:
    """Whether an unnamed file (``O_TMPFILE``) can be made in ``directory``
    (not on FUSE or an old kernel): the store then makes its files that way
    where two threads create them at once."""
    try:
        os.close(os.open(directory, os.O_WRONLY | os.O_TMPFILE, 0o600))
    except OSError:
        return False
    return True


async def enqueue_each_at_once(
    store: Store, entries: Sequence[NewEntry], timeout: float = WAIT_TIMEOUT
) -> list[list[str] | BaseException]:
    """One ``store.enqueue`` call for each of ``entries``, all made at once
    (a group commit takes them together); each call's names or error, in
    the order of ``entries``."""
    results: list[list[str] | BaseException] = [[] for _ in entries]

    async def one(n: int) -> None:
        try:
            results[n] = await store.enqueue([entries[n]])
        except Exception as exc:
            results[n] = exc

    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as tg:
            for n in range(len(entries)):
                tg.start_soon(one, n)
    return results
