"""Scale of the queue: a spool of ``--count`` delayed messages, in process and in a daemon.

Fills a spool with ``--count`` messages in ``active`` whose ``send_at`` is a
day ahead (written directly, without fsync: set-up is not measured; with
``--dir`` the filled spool is kept and reused by the next run of the same
count), then measures, each ``--runs`` times (medians are printed, with the
CPU time next to the wall time):

In this process (``Spool.open`` with an in-memory relay):

* ``open``: ``Spool.open`` until its body runs (lock, recovery, reading and
  decoding every record, scheduling each);
* ``rss/msg``: resident memory the open spool added, per queued message;
* ``status()`` and ``counts()`` on the open spool.

Through a daemon (``spoold run`` as a subprocess, no SMTP listener):

* ``ready``: from the exec to ``READY=1`` on ``NOTIFY_SOCKET``;
* ``rss/msg``: the daemon's resident memory once ready, less that of the
  same daemon on an empty spool, per queued message;
* ``status --format id`` and ``count``: the CLI as an operator runs it
  (a new Python process each), its output read to the end.

Usage: ``python bench/queue_scale.py [--count 100000] [--runs 3] [--dir PATH]
[--no-daemon] [--no-inprocess]``
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from spool_open import fill, rss_bytes  # bench/ is on the path when run as a script

from spoold.spool import Spool
from spoold.testing import InMemoryRelay

SPOOLD = str(Path(sys.executable).with_name("spoold"))
_FILLED_MARK = ".bench-filled"


def filled_spool(root: Path, count: int) -> None:
    """Fill ``root`` with ``count`` messages unless a run already did."""
    mark = root / _FILLED_MARK
    if mark.exists() and mark.read_text() == str(count):
        print(f"reusing {root} ({count} messages)")
        return
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    fill(root, count)
    mark.write_text(str(count))
    print(f"filled {count} messages in {time.perf_counter() - t0:.1f}s ({root})")


class Timed:
    """Wall and CPU seconds of a step (CPU of this process, or of the
    children it waited for)."""

    def __init__(self, children: bool = False) -> None:
        self.children = children
        self.wall = 0.0
        self.cpu = 0.0

    def _cpu(self) -> float:
        if self.children:
            ru = resource.getrusage(resource.RUSAGE_CHILDREN)
            return ru.ru_utime + ru.ru_stime
        return time.process_time()

    def __enter__(self) -> Timed:
        self._w, self._c = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = self._cpu() - self._c


async def measure_inprocess(root: Path, count: int) -> dict[str, float]:
    gc.collect()
    before = rss_bytes()
    with Timed() as t_open:
        cm = Spool.open(root, relay=InMemoryRelay())
        spool = await cm.__aenter__()
    try:
        gc.collect()
        per_msg = (rss_bytes() - before) / count
        with Timed() as t_status:
            listing = spool.status()
        assert len(listing) == count
        del listing
        with Timed() as t_counts:
            spool.counts()
    finally:
        await cm.__aexit__(None, None, None)
    return {
        "open s": t_open.wall,
        "open cpu s": t_open.cpu,
        "rss/msg B": per_msg,
        "status() s": t_status.wall,
        "status() cpu s": t_status.cpu,
        "counts() ms": t_counts.wall * 1000,
    }


def _proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _write_config(work: Path, spool_dir: Path) -> tuple[Path, Path]:
    sock = work / "control.sock"
    cfg = work / "spoold.toml"
    cfg.write_text(
        f'[spool]\ndir = "{spool_dir}"\n[control]\nsocket = "{sock}"\n'
        '[log]\nformat = "json"\nlevel = "warning"\n'
    )
    return cfg, sock


def run_daemon(
    work: Path, spool_dir: Path, then: Callable[[Path], dict[str, float]]
) -> dict[str, float]:
    """Start a daemon on ``spool_dir``, time it to READY=1, run ``then``
    (given the config path) while it runs, stop it."""
    cfg, _ = _write_config(work, spool_dir)
    notify_path = work / "notify.sock"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(600)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [SPOOLD, "run", "--config", str(cfg)], env=env, stdout=subprocess.DEVNULL
    )
    try:
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
        out = {"ready s": time.perf_counter() - t0, "ready cpu s": _proc_cpu(proc.pid)}
        time.sleep(0.5)  # let start-up garbage go before reading the RSS
        out["rss B"] = _proc_rss(proc.pid)
        out.update(then(cfg))
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        notify.close()


def _cli(cfg: Path, *args: str) -> tuple[Timed, bytes, str]:
    """Run ``spoold --config CFG ARGS``; its timing, output and (when it
    failed) its last line of error."""
    with Timed(children=True) as t:
        done = subprocess.run(
            [SPOOLD, "--config", str(cfg), *args],
            check=False,
            capture_output=True,
        )
    failure = ""
    if done.returncode != 0:
        failure = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        print(f"  spoold {' '.join(args)} failed after {t.wall:.1f}s: {failure}")
    return t, done.stdout, failure


def measure_daemon_cli(count: int) -> Callable[[Path], dict[str, float]]:
    def then(cfg: Path) -> dict[str, float]:
        t_ids, out, failure = _cli(cfg, "status", "--format", "id")
        if not failure:
            assert out.count(b"\n") == count, (out.count(b"\n"), count)
        t_count, _, _ = _cli(cfg, "count")
        mark = " (FAILED)" if failure else ""
        return {
            f"status --format id s{mark}": t_ids.wall,
            f"status --format id cpu s{mark}": t_ids.cpu,
            "count s": t_count.wall,
        }

    return then


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", type=Path, help="spool to fill and keep (reused by the next run)")
    p.add_argument("--no-daemon", action="store_true")
    p.add_argument("--no-inprocess", action="store_true")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spoold-bench-scale-"))
    root = args.dir or work / "spool"
    try:
        filled_spool(root, args.count)
        results: dict[str, list[float]] = {}

        def keep(r: dict[str, float]) -> None:
            for k, v in r.items():
                results.setdefault(k, []).append(v)

        for _ in range(args.runs):
            if not args.no_inprocess:
                keep(anyio.run(measure_inprocess, root, args.count))
            if not args.no_daemon:
                empty = work / "empty"
                shutil.rmtree(empty, ignore_errors=True)
                base = run_daemon(work, empty, lambda _cfg: {})["rss B"]
                r = run_daemon(work, root, measure_daemon_cli(args.count))
                r["daemon rss/msg B"] = (r.pop("rss B") - base) / args.count
                keep(r)
        print(f"median of {args.runs} runs, {args.count} messages in active (send_at):")
        for k, v in results.items():
            print(
                f"  {k:28s} {statistics.median(v):10.2f}   runs: {', '.join(f'{x:.2f}' for x in v)}"
            )
        print(f"load average: {os.getloadavg()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
