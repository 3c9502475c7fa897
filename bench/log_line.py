"""What one of the daemon's log lines costs, in one process, through the
daemon's logging (spoold/daemon/logs.py) configured for JSON lines, written
to /dev/null:

* ``attempt``: the ``attempt done`` line the owner writes for every attempt
  (the library's logger, spoold.log, with the fields it has there: an
  outcome kind, counts, a time);
* ``accepted``: the line an ingest worker writes for every message it takes
  (a structlog logger in the daemon).

The lines are logged from a task on an event loop (uvloop, as the daemon
runs), ``--per-turn`` lines per loop turn, as a daemon under load logs
them; the cost of the empty loop turns is measured alone and taken off.
Prints the median of ``--rounds`` rounds of ``--lines`` lines each, in
microseconds of CPU (user + system: the machine is shared) per line, for
each line. ``--where`` also looks up each
line's source file, line, thread and process, as the logging module does
when nothing turns that off (what the daemon did before it did).

Usage: ``.venv/bin/python bench/log_line.py [--lines 50000] [--rounds 5]
[--per-turn 4] [--line attempt|accepted|both] [--where]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from spoold.daemon.logs import configure
from spoold.kinds import OutcomeKind
from spoold.log import get_logger


def attempt_line() -> Callable[[], None]:
    log = get_logger("spoold.transitions")
    at = datetime(2026, 12, 6, 21, 57, 3, 123456, tzinfo=UTC)

    def line() -> None:
        log.info(
            "attempt done",
            id="8DsqySGkoCEZf4VCJ",
            flows=["0"],
            outcome=OutcomeKind.DELIVERED,
            delivered=1,
            failed=0,
            later=0,
            at=at,
        )

    return line


def accepted_line() -> Callable[[], None]:
    log = structlog.get_logger("spoold.smtp")

    def line() -> None:
        log.info("accepted", ids=["8DsqySGkoCEZf4VCJ"], peer="127.0.0.1", recipients=1)

    return line


async def one_round(line: Callable[[], None] | None, lines: int, per_turn: int) -> float:
    """CPU seconds (of this process: the machine may be busy) to log
    ``lines`` lines, ``per_turn`` per loop turn (none: the loop turns alone)."""
    turns = lines // per_turn
    start = time.process_time()
    for _ in range(turns):
        if line is not None:
            for _ in range(per_turn):
                line()
        await asyncio.sleep(0)
    await asyncio.sleep(0)  # the last turn's lines written
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-turn", type=int, default=4)
    parser.add_argument("--line", choices=["attempt", "accepted", "both"], default="both")
    parser.add_argument("--where", action="store_true", help="look up source and thread")
    args = parser.parse_args()
    out = sys.stdout
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the handler writes here until exit
    configure("json", "info")
    if args.where:
        logging._srcfile = os.path.normcase(logging.addLevelName.__code__.co_filename)
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = True
    chosen = {"attempt": attempt_line(), "accepted": accepted_line()}
    if args.line != "both":
        chosen = {args.line: chosen[args.line]}

    async def run() -> dict[str, list[float]]:
        rounds: dict[str, list[float]] = {name: [] for name in chosen}
        for _ in range(args.rounds):
            empty = await one_round(None, args.lines, args.per_turn)
            for name, line in chosen.items():
                spent = await one_round(line, args.lines, args.per_turn) - empty
                rounds[name].append(spent / args.lines * 1e6)
        return rounds

    try:
        import uvloop
    except ImportError:
        rounds = asyncio.run(run())
    else:
        rounds = uvloop.run(run())
    for name, values in rounds.items():
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(
            f"{name}: {statistics.median(values):.1f} us per line (rounds: {shown})",
            file=out,
        )


if __name__ == "__main__":
    main()
