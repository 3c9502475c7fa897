"""The side-by-side harness ``bench/vs_postfix.py`` runs and cleans up.

Two small runs as a subprocess, each bounded in count (10 messages) and
time: scenario a (smtp-source -> private Postfix / spoold daemon ->
smtp-sink) and d (``Spool.add`` next to the disk loop) write a results
section whose figures are all numbers; a run that fails after both servers
started (spoold refusing smtp-source's sessions) exits 1 and prints the
logs' tails. Either way nothing of the run is left: no work directory, no
process still working in it. Needs root (Postfix's master) and Postfix's
tools; skipped otherwise. Nothing here looks at how fast anything is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

HARNESS = Path(__file__).resolve().parent.parent / "bench" / "vs_postfix.py"
SPOOLD = Path(sys.executable).parent / "spoold"
TOOLS = ("postfix", "postconf", "smtp-sink", "smtp-source")

if os.geteuid() != 0 or not all(
    shutil.which(t) or shutil.which(t, path="/usr/sbin") for t in TOOLS
):
    pytest.skip("needs root and Postfix (postfix, smtp-sink, smtp-source)", allow_module_level=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """An empty directory that user postfix can reach (pytest's tmp_path is
    in a directory only root may enter)."""
    path = Path(tempfile.mkdtemp(prefix="spoold-bench-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_harness(
    workdir: Path, *args: str, harness: Path = HARNESS
) -> subprocess.CompletedProcess[str]:
    """``harness`` (this tree's, or a copy's) on a small run in ``workdir``."""
    common = ["--quick", "--count", "10", "--timeout", "60", "--spoold", str(SPOOLD)]
    return subprocess.run(
        [sys.executable, str(harness), *common, "--workdir", str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def processes_in(workdir: Path) -> list[str]:
    """Processes whose command line or working directory is under workdir."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(workdir) in cmdline or cwd.startswith(str(workdir)):
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_scenarios_a_and_d_write_a_results_section(tmp_path: Path, workdir: Path) -> None:
    results = tmp_path / "RESULTS.md"

    done = run_harness(workdir, "--scenarios", "a,d", "--results", str(results))

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = results.read_text()
    assert "Postfix: 3." in text
    rows = [line for line in text.splitlines() if re.match(r"\| [ad]: ", line)]
    assert [row.split(" | ")[1] for row in rows] == [
        "SMTP-only ceiling msg/s (smtp-source -> smtp-sink, no server)",
        "ingest msg/s",
        "end to end msg/s",
        "server CPU ms per message (lower is better)",
        "end to end / SMTP-only ceiling",
        "durable adds/s, 1 at once",
        "CPU ms per add, 1 at once (lower is better)",
        "durable adds/s, 16 at once",
        "CPU ms per add, 16 at once (lower is better)",
    ]
    ceiling, *rows = rows  # the sink alone: no spoold figure, no ratio
    cells = ceiling.strip("| ").split(" | ")
    assert cells[2] == "no server" and cells[4:] == ["-", "-"], ceiling
    assert re.fullmatch(r"\*\*[\d.]+\*\* \([\d.]+-[\d.]+\)", cells[3]), ceiling
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert re.fullmatch(r"\*\*[\d.]+\*\* \([\d.]+-[\d.]+\)", cells[4]), row
        if "CPU" not in cells[1]:  # CPU time comes in 10 ms ticks: 0 is possible for 10 messages
            assert float(cells[5]) > 0, row
    assert list(workdir.iterdir()) == []
    assert processes_in(workdir) == []


def test_a_signing_variant_runs_once_its_warm_up_was_all_signed(
    tmp_path: Path, workdir: Path
) -> None:
    """--dkim: the variant warms up at log level debug, where spoold logs
    every message it signs or not, and runs only when all were signed."""
    results = tmp_path / "RESULTS.md"

    done = run_harness(
        workdir, "--scenarios", "a", "--dkim", "none,ed25519", "--results", str(results)
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in results.read_text().splitlines() if line.startswith("| a: ")]
    assert sum("DKIM Ed25519" in row for row in rows) == 4  # ingest, end to end, CPU, share
    assert list(workdir.iterdir()) == []


def test_another_spoold_build_can_be_the_reference(tmp_path: Path, workdir: Path) -> None:
    """``--reference-spoold``: two spoold builds alternate on scenario a (here
    the same one twice), no Postfix is started, and the section says so."""
    results = tmp_path / "RESULTS.md"

    done = run_harness(workdir, "--reference-spoold", str(SPOOLD), "--results", str(results))

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    servers = re.findall(r"^([ab]) round 1 (\S+)", done.stdout, re.MULTILINE)
    assert servers == [
        *[("a", "ceiling"), ("a", "reference"), ("a", "spoold")],  # ceiling: no server
        *[("b", "ceiling"), ("b", "reference"), ("b", "spoold")],
    ]
    text = results.read_text()
    assert ", against another spoold build" in text
    assert re.search(
        rf"- Reference: spoold \S+ \(`{re.escape(str(SPOOLD))}`\), instead of Postfix", text
    )
    rows = [line for line in text.splitlines() if re.match(r"\| [ab]: ", line)]
    assert [row.split(" | ")[2] for row in rows] == (
        ["no server"] + ["spoold (reference build)"] * 4
    ) * 2
    assert list(workdir.iterdir()) == []
    assert processes_in(workdir) == []


def test_scenario_d_measures_the_spoold_of_the_tree_the_harness_is_in(
    tmp_path: Path, workdir: Path
) -> None:
    """A copy of the tree (a build frozen for a benchmark): its scenario d
    imports the copy's spoold, not the checkout the test's Python has
    installed (editable), which it would find first. The harness checks
    the package each worker imported and fails the run on any other."""
    tree = tmp_path / "tree"
    (tree / "bench").mkdir(parents=True)
    shutil.copy(HARNESS, tree / "bench" / HARNESS.name)
    shutil.copytree(
        HARNESS.parent.parent / "spoold",
        tree / "spoold",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    results = tmp_path / "RESULTS.md"

    done = run_harness(
        workdir,
        *("--scenarios", "d", "--results", str(results)),
        harness=tree / "bench" / HARNESS.name,
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^d round 1 spoold +16 at once", done.stdout, re.MULTILINE), done.stdout
    assert list(workdir.iterdir()) == []


def test_scenario_d_settles_and_deletes_nothing_before_its_last_run(
    tmp_path: Path, workdir: Path
) -> None:
    """Each run of d finds the files of every run before it still there
    (a run started right after deletes would pay for them, ext4 without a
    journal), and settles first like a and b; the files go once the last
    run is over. Seen through a stand-in for the Python the workers run
    with (``--python``), which notes what the work directory holds, then
    runs the real one."""
    seen = tmp_path / "seen"
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'for d in {workdir}/*/d/*; do [ -d "$d" ] || continue;'
        ' printf "%s=%s " "${d##*/}" "$(find "$d" -type f | wc -l)"; done >> ' + f"{seen}\n"
        f"echo >> {seen}\n"
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)

    done = run_harness(
        workdir, "--scenarios", "d", "--rounds", "2", "--settle", "1", "--python", str(python)
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(settling 1 s before d)" in done.stdout, done.stdout
    before_each = [
        dict(pair.split("=") for pair in line.split()) for line in seen.read_text().splitlines()
    ]
    assert len(before_each) == 8, before_each  # 2 rounds x 2 concurrencies x 2 modes
    order = [
        f"{mode}-{conc}-{rnd}" for rnd in (1, 2) for conc in (1, 16) for mode in ("disk", "spoold")
    ]
    for i, found in enumerate(before_each):
        assert sorted(found) == sorted(order[:i]), (i, found)
        # Each earlier run's directory still holds its files: 10 adds each, at least.
        assert all(int(count) >= 10 for count in found.values()), (i, found)
    assert list(workdir.iterdir()) == []


def test_the_hog_runs_beside_each_measured_run_and_is_stopped(
    tmp_path: Path, workdir: Path
) -> None:
    """--hog: a busy loop pinned to CPU 0 during each measured run of a and c
    (the ceiling, Postfix, spoold), each stopped by its pid; the section says so."""
    results = tmp_path / "RESULTS.md"

    done = run_harness(workdir, "--scenarios", "a,c", "--hog", "--results", str(results))

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    said = re.findall(
        r"CPU hog: (\d+) busy loop\(s\) on CPU 0, pids ([\d, ]+), stopped", done.stdout
    )
    assert [int(n) for n, _ in said] == [3, 2]  # a: ceiling, Postfix, spoold; c: both servers
    for _, pids in said:
        for pid in pids.split(", "):
            assert (
                not Path(f"/proc/{pid}").exists()
                or b"while :" not in Path(f"/proc/{pid}/cmdline").read_bytes()
            )
    text = results.read_text()
    assert ", with a CPU hog on CPU 0" in text
    assert "- CPU hog (`--hog`): `taskset -c 0 sh -c 'while :; do :; done'`" in text
    assert "--hog" in re.findall(r"- Command: `(.*)`", text)[0]
    rows = [line for line in text.splitlines() if line.startswith("| c: ")]
    assert [row.split(" | ")[1] for row in rows] == [
        "latency p50 ms (lower is better)",
        "latency p99 ms (lower is better)",
        "server CPU ms per message (lower is better)",
    ]
    assert list(workdir.iterdir()) == []
    assert processes_in(workdir) == []


def test_a_missing_reference_build_is_refused_before_anything_starts(workdir: Path) -> None:
    done = run_harness(workdir, "--scenarios", "a", "--reference-spoold", "/nonexistent/spoold")

    assert done.returncode == 1
    assert "no spoold command at /nonexistent/spoold (--reference-spoold)" in done.stderr
    assert list(workdir.iterdir()) == []


def test_a_failure_stops_both_servers_and_prints_the_logs(workdir: Path) -> None:
    done = run_harness(
        workdir,
        "--scenarios",
        "a",
        "--spoold-set",
        "smtp.max_connections_per_client=1",
        "--spoold-set",
        "smtp.limit_relay_networks=true",  # smtp-source's 127.0.0.1 is in relay_networks
    )

    assert done.returncode == 1
    assert "FAILED" in done.stderr and "421" in done.stderr
    assert "----- spoold log:" in done.stderr
    assert "----- postfix maillog:" in done.stderr
    assert list(workdir.iterdir()) == []
    assert processes_in(workdir) == []
