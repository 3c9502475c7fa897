"""``spoold top``: a live view of a running daemon, over its control socket.

What it shows, refreshed in place every ``interval`` seconds: messages per
queue; ingest and delivery rates (``spooled`` and ``delivered`` events per
second over the last :data:`RATE_WINDOW` seconds); the busiest next hops
(the first hop of each queued message) with their backlog and newest relay
error; the oldest messages; the latest events.

Where the data comes from: ``count`` and ``status`` requests every
interval (``status`` lists every queued message: on a queue of many
thousands, choose a longer interval), and one ``events`` stream for the
rates and the latest events. A daemon that goes away is shown as such, and
asked again at the next interval; the view stays up.

The terminal: the view takes the alternate screen (rich's ``Live`` with
``screen=True``) and,
when standard input is a terminal, puts it in cbreak mode to read keys
one at a time. ``q`` quits, and so do Ctrl-C and SIGTERM (their handlers
only end the view's task group); on the way out the screen and the
terminal modes are restored whatever happened, and the exit status is 0.

:class:`TopState` holds what was seen; :func:`render` turns it into a
screen with no I/O (tests call it with a fixed ``now``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import anyio
import anyio.abc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from spoold.daemon.control_client import ControlClient
from spoold.errors import ControlError
from spoold.protocol import CountRequest, StatusRequest

__all__ = ["RATE_WINDOW", "TopState", "render", "run_top"]

RATE_WINDOW: Final = 10.0  # seconds of events behind a rate
_QUEUES: Final = ("active", "frozen", "sending", "removed", "quarantine")
_SHOWN: Final = 8  # rows per table


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass
class TopState:
    """What the view has seen of the daemon."""

    counts: dict[str, int] = field(default_factory=dict)
    views: list[dict[str, Any]] = field(default_factory=list)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=_SHOWN))
    error: str | None = None  # why the daemon could not be asked, if it could not
    _times: dict[str, deque[float]] = field(
        default_factory=lambda: {"spooled": deque(), "delivered": deque()}
    )

    def saw(self, event: Mapping[str, Any], at: float) -> None:
        """Take one event of the stream, seen at monotonic time ``at``."""
        kind = str(event.get("event"))
        if kind == "ping":
            return
        if kind in self._times:
            self._times[kind].append(at)
        self.recent.appendleft(dict(event))

    def rate(self, kind: str, at: float) -> float:
        """Events of ``kind`` per second over the window ending at ``at``."""
        times = self._times[kind]
        while times and times[0] < at - RATE_WINDOW:
            times.popleft()
        return len(times) / RATE_WINDOW


def _hops(views: Sequence[Mapping[str, Any]]) -> list[tuple[str, int, str]]:
    """(next hop, messages queued for it, its newest relay error), busiest first."""
    backlog: dict[str, int] = {}
    newest: dict[str, tuple[str, str]] = {}  # hop -> (time, error)
    for v in views:
        hops = v.get("next_hop_choices") or ["(none)"]
        hop = str(hops[0])
        backlog[hop] = backlog.get(hop, 0) + 1
        attempts = v.get("relay_attempts") or []
        if attempts:
            when, error = str(attempts[0]["time"]), str(attempts[0]["error"])
            if hop not in newest or when > newest[hop][0]:
                newest[hop] = (when, error)
    ordered = sorted(backlog.items(), key=lambda item: (-item[1], item[0]))
    return [(hop, n, newest.get(hop, ("", ""))[1]) for hop, n in ordered]


def render(state: TopState, now: datetime, at: float, *, where: str = "") -> RenderableType:
    """The screen for ``state`` at wall time ``now`` (ages) and monotonic
    time ``at`` (rates)."""
    title = Text(f"spoold top  {where}  {now:%H:%M:%S}  (q quits)", style="bold")
    counts = "   ".join(f"{q} {state.counts.get(q, 0)}" for q in _QUEUES)
    rates = (
        f"ingest {state.rate('spooled', at):.1f}/s   "
        f"delivered {state.rate('delivered', at):.1f}/s   "
        f"(last {RATE_WINDOW:g} s)"
    )
    parts: list[RenderableType] = [title, Text(counts), Text(rates)]
    if state.error:
        parts.append(Text(f"daemon: {state.error}", style="bold red"))

    hops = Table(title="busiest next hops", title_justify="left", expand=True)
    hops.add_column("NEXT HOP", no_wrap=True)
    hops.add_column("BACKLOG", justify="right")
    hops.add_column("LAST ERROR", overflow="ellipsis", no_wrap=True, ratio=1)
    for hop, n, error in _hops(state.views)[:_SHOWN]:
        hops.add_row(hop, str(n), error)

    oldest = Table(title="oldest messages", title_justify="left", expand=True)
    for head in ("ID", "AGE", "STATUS", "TO"):
        oldest.add_column(head, no_wrap=True)
    oldest.add_column("LAST ERROR", overflow="ellipsis", no_wrap=True, ratio=1)
    dated = [(d, v) for v in state.views if (d := _parse_time(v.get("spool_date")))]
    dated.sort(key=lambda item: item[0])
    for when, v in dated[:_SHOWN]:
        rcpts = v.get("remaining_recipients") or v.get("failed_recipients") or []
        to = (rcpts[0] + (f" +{len(rcpts) - 1}" if len(rcpts) > 1 else "")) if rcpts else ""
        attempts = v.get("relay_attempts") or []
        oldest.add_row(
            str(v["id"]),
            _age((now - when).total_seconds()),
            str(v.get("status")),
            to,
            str(attempts[0]["error"]) if attempts else "",
        )

    events = Table(title="latest events", title_justify="left", expand=True)
    for head in ("TIME", "EVENT", "ID"):
        events.add_column(head, no_wrap=True)
    events.add_column("DETAIL", overflow="ellipsis", no_wrap=True, ratio=1)
    for e in state.recent:
        seen = _parse_time(e.get("time"))
        events.add_row(
            f"{seen:%H:%M:%S}" if seen else "",
            str(e.get("event", "")),
            str(e.get("id", "")),
            str(e.get("detail") or e.get("at") or ""),
        )
    return Group(*parts, hops, oldest, events)


@contextlib.contextmanager
def _keys_one_at_a_time(fd: int) -> Iterator[bool]:
    """cbreak mode on ``fd`` if it is a terminal (yields whether it is),
    the old modes back on the way out."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def run_top(client: ControlClient, interval: float, *, where: str = "") -> None:
    """Show the view until ``q``, Ctrl-C or SIGTERM. A daemon that cannot
    be reached at the start is an error (raised before the screen changes)."""
    state = TopState()
    state.counts = await client.ask(CountRequest())
    state.views = await client.ask(StatusRequest())
    console = Console()
    stdin = sys.stdin.fileno()
    with (
        _keys_one_at_a_time(stdin) as keys,
        anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
    ):

        async def on_signal(tg: anyio.abc.TaskGroup) -> None:
            async for _ in signals:
                tg.cancel_scope.cancel()

        async def on_key(tg: anyio.abc.TaskGroup) -> None:
            while True:
                await anyio.wait_readable(stdin)
                typed = os.read(stdin, 64)
                if not typed:
                    return  # end of input: only a signal ends the view now
                if b"q" in typed.lower() or b"\x03" in typed:
                    tg.cancel_scope.cancel()

        async def follow() -> None:
            while True:
                try:
                    # A cancellation inside the stream ends the generator too.
                    async for event in client.events():
                        state.saw(event, time.monotonic())
                except ControlError:
                    pass  # shown by the next poll
                await anyio.sleep(interval)

        live = Live(
            console=console,
            screen=True,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        with live:
            async with anyio.create_task_group() as tg:
                tg.start_soon(on_signal, tg)
                if keys:
                    tg.start_soon(on_key, tg)
                tg.start_soon(follow)
                while True:
                    now = datetime.now(UTC)
                    live.update(render(state, now, time.monotonic(), where=where), refresh=True)
                    await anyio.sleep(interval)
                    try:
                        state.counts = await client.ask(CountRequest())
                        state.views = await client.ask(StatusRequest())
                        state.error = None
                    except ControlError as exc:
                        state.error = str(exc)
