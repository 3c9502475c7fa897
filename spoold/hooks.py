"""Policy hooks of the spool, with their closed choices and defaults.

* ``presend(message)`` is asked before each attempt and answers one of
  :data:`PRESEND_CHOICES`: ``SendNow()`` (go ahead), ``SendAt(at=...)``
  (not before then), ``Frozen()`` (freeze for an operator) or ``Removed()``
  (move to ``removed``). Default: always ``SendNow()``.
* ``on_error(message, recipient, result)`` is asked for each recipient a
  next hop refused and answers an :class:`ErrorAction`. Default: 5xx fails
  permanently, anything else is tried later. ``suppress`` fails the
  recipient permanently and counts it as a hard bounce whatever the reply
  (``fail_permanently`` counts as one only for a 5xx reply to the
  recipient's own RCPT that says the address is bad: see
  :func:`spoold.outcome.is_hard_bounce`).

A hook may be a plain function or a coroutine function. A hook that raises,
or answers something else, is logged and taken as "try later": nothing is
lost. Hooks get a snapshot of the message; changing it changes nothing.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar, cast

from spoold.message import Frozen, Message, Removed, SendAt, SendNow
from spoold.relay import RecipientResult

__all__ = [
    "ErrorAction",
    "PresendDecision",
    "PRESEND_CHOICES",
    "PresendHook",
    "OnErrorHook",
    "default_presend",
    "default_on_error",
    "call_hook",
    "load_hook",
]

PresendDecision = SendNow | SendAt | Frozen | Removed
PRESEND_CHOICES = (SendNow, SendAt, Frozen, Removed)


class ErrorAction(StrEnum):
    FAIL_PERMANENTLY = "fail_permanently"
    TRY_LATER = "try_later"
    TRY_LATER_RATE_LIMITED = "try_later_rate_limited"
    DONE = "done"  # count the recipient as dealt with; no retry, no failure
    SUPPRESS = "suppress"  # fail permanently, and a hard bounce: put on the suppression list


PresendHook = Callable[[Message], PresendDecision | Awaitable[PresendDecision]]
OnErrorHook = Callable[[Message, str, RecipientResult], ErrorAction | Awaitable[ErrorAction]]


def default_presend(message: Message) -> PresendDecision:
    return SendNow()


def default_on_error(message: Message, recipient: str, result: RecipientResult) -> ErrorAction:
    return ErrorAction.FAIL_PERMANENTLY if result.permanent else ErrorAction.TRY_LATER


_T = TypeVar("_T")


async def call_hook(hook: Callable[..., _T | Awaitable[_T]], *args: object) -> _T:
    """Call a sync or async hook and return its answer."""
    answer = hook(*args)
    if inspect.isawaitable(answer):
        return cast(_T, await answer)
    return answer


def load_hook(spec: str) -> Callable[..., object]:
    """Import ``"package.module:function"``; raise ValueError with a clear
    text when it cannot be found or is not callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"hook {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"hook {spec!r}: cannot import {module_name}: {exc}") from exc
    target: object = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"hook {spec!r}: {module_name} has no {attr}") from None
    if not callable(target):
        raise ValueError(f"hook {spec!r}: {attr} is not callable")
    return target
