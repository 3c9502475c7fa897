"""The control sockets' files and peers: where the server listens, and who
connects.

:func:`listen` makes the listening Unix socket of a control server: the
file gets the configured mode (and group, when one is configured) before
anyone can connect; a stale socket of a daemon that is gone is replaced;
the server refuses to start in a directory anyone may write to unless it
is sticky, on a path that is not a socket, or where another daemon
answers. :func:`peer_credentials` asks the kernel who is on the other end
of a connection (``SO_PEERCRED``: pid, uid, gid; Linux), which the daemon
writes into a submission's ``Received:`` header, record and history line.

Errors are :class:`~spoold.errors.SpooldError` with a sentence for the
operator; the blocking file work runs in a worker thread.
"""

from __future__ import annotations

import os
import socket as socketlib
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import anyio

from spoold.errors import SpooldError

__all__ = ["PeerCredentials", "peer_credentials", "listen"]

_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is on the other end of a Unix socket connection, as the kernel
    says (``SO_PEERCRED``): the process, its user and its group at the time
    it connected."""

    pid: int
    uid: int
    gid: int


_PEERCRED = struct.Struct("3i")


def peer_credentials(conn: socketlib.socket) -> PeerCredentials | None:
    """The peer of a connected Unix socket; None where the system does not
    tell (no ``SO_PEERCRED`` outside Linux)."""
    option = getattr(socketlib, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        raw = conn.getsockopt(socketlib.SOL_SOCKET, option, _PEERCRED.size)
    except OSError:
        return None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


async def listen(path: Path, mode: int, group: str = "") -> socketlib.socket:
    """A listening, non-blocking Unix socket at ``path`` with ``mode`` (and
    ``group``, a group name, when given)."""

    def prepare() -> None:
        directory = path.parent
        st = directory.stat()
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise SpooldError(
                f"control socket directory {directory} is writable by anyone and not sticky"
            )
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise SpooldError(f"{path} exists and is not a socket")
            probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # a stale socket of a daemon that is gone
            else:
                raise SpooldError(f"another daemon is answering on {path}")
            finally:
                probe.close()

    await anyio.to_thread.run_sync(prepare)
    sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        # Mode and group are set before listen(): until then nobody can
        # connect, whatever the file's mode (no process-wide umask change,
        # which would race with files other threads create meanwhile).
        try:
            sock.bind(str(path))
        except OSError as exc:
            # Two daemons given one path (each control socket, and the
            # submission socket beside it by default, must be its own).
            raise SpooldError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        await anyio.to_thread.run_sync(os.chmod, path, mode)
        if group:
            await anyio.to_thread.run_sync(_give_to_group, path, group)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _give_to_group(path: Path, group: str) -> None:
    import grp

    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise SpooldError(f"{path}: no group named {group!r} on this system") from None
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        raise SpooldError(
            f"cannot give {path} to group {group!r}: the daemon's user must be a member "
            f"of it (usermod -aG {group} USER) or root"
        ) from None
