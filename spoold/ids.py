"""Message ids: generation and validation.

An id is 1 to 64 characters of ``[A-Za-z0-9_-]``: safe as a file name on any
filesystem and never a path. Generated ids are 17 characters, a fixed-width
base-62 timestamp in microseconds followed by 8 random base-62 characters.
The alphabet is in ASCII order, so sorting ids as strings sorts them by time
of creation. Randomness keeps ids unique across restarts; the spool registry
(``.registry/ID`` created with ``O_CREAT|O_EXCL``) makes uniqueness certain
across processes sharing a spool.

Every id that comes from outside (CLI, control socket, file names found on
disk) goes through :func:`validate_id` before a path is built from it.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import time

from spoold.errors import InvalidIdError

__all__ = ["MAX_ID_LENGTH", "is_valid_id", "new_id", "validate_id"]

MAX_ID_LENGTH = 64
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TIME_WIDTH = 9  # 62**9 microseconds is about 428 years after 1970
_RANDOM_WIDTH = 8


def _base62(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


# new_id is on every message's path (twice): its digits are taken two at a
# time from a table, and the timestamp's first five digits (which change
# every 62**4 us, about 15 s) are kept from one id to the next.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # _PAIRS[n]: n < 62**2 in 2 digits
_PAIR = 62**2
_LOW = 62**4  # the timestamp's last four digits
# (stamp // _LOW, its 5 digits), replaced whole; None until the first id (any
# int is a real prefix: a negative one for a time before 1970)
_high: tuple[int, str] | None = None


def _stamp_digits(stamp: int) -> str:
    global _high  # a cache of one value
    high, low = divmod(stamp, _LOW)
    cached = _high
    if cached is not None and cached[0] == high:
        text = cached[1]
    else:
        text = _base62(high, _TIME_WIDTH - 4)
        _high = (high, text)
    a, b = divmod(low, _PAIR)
    return text + _PAIRS[a] + _PAIRS[b]


# The random part comes from a generator seeded from the system's randomness
# (and seeded again in a forked child): ids need to be unique, not secret,
# and a system call per id is a cost the hot path need not pay.
_random = random.Random(secrets.randbits(128))


def _reseed() -> None:
    _random.seed(secrets.randbits(128))


os.register_at_fork(after_in_child=_reseed)


def new_id(now_us: int | None = None) -> str:
    """A fresh id; ``now_us`` (microseconds since the epoch) is for tests."""
    stamp = time.time_ns() // 1000 if now_us is None else now_us
    rest, d = divmod(_random.getrandbits(47), _PAIR)  # 2**47 < 62**8: 8 digits
    rest, c = divmod(rest, _PAIR)
    a, b = divmod(rest, _PAIR)
    return _stamp_digits(stamp) + _PAIRS[a] + _PAIRS[b] + _PAIRS[c] + _PAIRS[d]


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def validate_id(value: object) -> str:
    """Return ``value`` if it is an id; raise :class:`InvalidIdError` otherwise."""
    if is_valid_id(value):
        assert isinstance(value, str)
        return value
    if not isinstance(value, str):
        raise InvalidIdError(f"not a message id: expected a string, got {type(value).__name__}")
    if not value:
        raise InvalidIdError("not a message id: empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidIdError(
            f"not a message id: {len(value)} characters, at most {MAX_ID_LENGTH} allowed"
        )
    raise InvalidIdError(
        f"not a message id: {value!r} (only letters, digits, '_' and '-' are allowed)"
    )
