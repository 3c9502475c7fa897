"""The task group behind each of the library's ``async with`` objects.

A :class:`~spoold.spool.Spool` or :class:`~spoold.writer.SpoolWriter` runs
tasks of its own while the caller's block runs inside its ``async with``.
A bare anyio task group would wrap whatever leaves it in an
``ExceptionGroup``, so a caller's ``except BareLineEndingError`` around the
block would no longer match. :func:`own_tasks` keeps the two apart:

* an exception raised in the block (an ``Exception``: cancellation and
  ``KeyboardInterrupt`` pass through untouched) stops the tasks and then
  comes out as itself, same object, same traceback;
* a failure of the object's own tasks comes out as one
  :class:`~spoold.errors.SpoolFailedError` whose ``__cause__`` is the
  failure (the exception, or the group when several failed at once); when
  the block raised too, the failure wins (a note on it names the block's
  error).

Every task still belongs to the group and is awaited before the block is
left; nothing is swallowed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc

from spoold.errors import SpoolFailedError

__all__ = ["own_tasks"]


@asynccontextmanager
async def own_tasks(what: str) -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group for ``what`` (named in the error, e.g. ``"spool
    /var/spool/spoold"``) whose block's exceptions come out unwrapped."""
    block_error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            try:
                yield tg
            except Exception as exc:  # noqa: BLE001 (the block's own: raised as itself below)
                block_error = exc
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if group.subgroup(lambda e: not isinstance(e, Exception)) is not None:
            raise  # KeyboardInterrupt, SystemExit and the like are not ours to rename
        cause = group.exceptions[0] if len(group.exceptions) == 1 else group
        failure = SpoolFailedError(f"{what} stopped: {_describe(cause)}")
        if block_error is not None:
            failure.add_note(f"the block raised too: {block_error!r}")
        raise failure from cause
    if block_error is not None:
        raise block_error


def _describe(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in error.exceptions)
    return str(error) or type(error).__name__
