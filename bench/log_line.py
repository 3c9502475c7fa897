"""What one of the daemon's log lines costs, in one process: the
``attempt done`` line the owner writes for every attempt, through the
daemon's logging (spoold/daemon/logs.py: the library's stdlib record,
structlog's processors, a JSON line), written to /dev/null.

Prints the median of ``--rounds`` rounds of ``--lines`` lines each, in
microseconds per line. ``--where`` also looks up each line's source file,
line, thread and process, as the logging module does when nothing turns
that off (what the daemon did before it did).

Usage: ``.venv/bin/python bench/log_line.py [--lines 50000] [--rounds 5] [--where]``
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

from spoold.daemon.logs import configure
from spoold.log import get_logger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--where", action="store_true", help="look up source and thread")
    args = parser.parse_args()
    out = sys.stdout
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the handler writes here until exit
    configure("json", "info")
    if args.where:
        logging._srcfile = os.path.normcase(logging.addLevelName.__code__.co_filename)
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = True
    log = get_logger("spoold.transitions")
    rounds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.lines):
            log.info(
                "attempt done",
                id="01JABCDEFGHJKMNPQRSTVWXYZ",
                flows=["0"],
                outcome="delivered",
                next_hop="127.0.0.1:25",
                seconds=0.0123,
            )
        rounds.append((time.perf_counter() - start) / args.lines * 1e6)
    print(f"{statistics.median(rounds):.1f} us per line (rounds: {rounds})", file=out)


if __name__ == "__main__":
    main()
