"""Talking to systemd: our own small ``sd_notify``.

One datagram per call on ``$NOTIFY_SOCKET`` (a leading ``@`` means the
abstract namespace), with every field in it, newline-separated: systemd
applies ``RELOADING=1`` and ``MONOTONIC_USEC=...`` together only when they
arrive in one datagram. Without ``NOTIFY_SOCKET`` every call does nothing.
A send that fails raises :class:`OSError`: the caller decides whether that
matters (the daemon logs it).
"""

from __future__ import annotations

import os
import socket
import time

from spoold.numerals import ascii_decimal

__all__ = ["Notifier", "watchdog_interval", "listen_fds", "LISTEN_FDS_START"]

LISTEN_FDS_START = 3  # sd_listen_fds(3): passed sockets start at this fd


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address

    def notify(self, *fields: str) -> None:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) in one datagram."""
        if self.address is None:
            return
        payload = "\n".join(f.replace("\n", " ") for f in fields).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, self.address)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or
    None when systemd asked for none (or asked another process). As
    sd_watchdog_enabled(3): a value that is not ASCII digits asks for none."""
    usec = ascii_decimal(os.environ.get("WATCHDOG_USEC", ""))
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and ascii_decimal(pid) != os.getpid():
        return None
    return usec / 1_000_000 / 2


def listen_fds(*, unset: bool = True) -> list[socket.socket]:
    """The listening sockets systemd passed (socket activation), or none.

    Read from ``LISTEN_FDS`` when ``LISTEN_PID`` names this process; fds
    ``3 .. 3+n-1`` become :class:`socket.socket` objects (close-on-exec
    set, non-blocking). The variables are removed afterwards (``unset``) so
    that no child process takes the sockets for its own.
    """
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    fds = ascii_decimal(count)
    if ascii_decimal(pid) != os.getpid() or fds is None:
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + fds):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
