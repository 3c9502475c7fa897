"""Files holding secrets: read only when no one but their owner can.

``auth_file`` of a route (the relay's ``user:password``) and of the SMTP
listener (``user:password`` lines) are read through
:func:`read_private_file`, which refuses a file that its group or others may
read, saying which mode to set. Errors are :class:`~spoold.errors.SpooldError`
naming the file.
"""

from __future__ import annotations

import os
import stat

from spoold.errors import SpooldError

__all__ = ["read_private_file", "load_auth_file"]


def read_private_file(path: str | os.PathLike[str], what: str = "auth file") -> str:
    """The text of a secrets file that only its owner may read (``what``
    names it in an error)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            text = f.read().decode("utf-8")
    except OSError as exc:
        raise SpooldError(f"{what} {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SpooldError(
            f"{what} {path} is readable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); make it 0600"
        )
    return text


def load_auth_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    """Read ``user:password`` from a file that only its owner may read."""
    text = read_private_file(path).strip()
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise SpooldError(f"auth file {path}: expected one line 'user:password'")
    return user, password
