"""The benchmark harness starts each spoold build, and runs its commands,
in the build's own home directory under the run's work directory (asks
its version in ``/``), never in the harness's working directory: a build
started by a ``python -c`` wrapper (or as ``python -m spoold``) imports
spoold from its working directory first, and the harness is usually run
from a checkout of another build. A stand-in for ``spoold`` records where
it was started."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.daemon

HARNESS = Path(__file__).resolve().parent.parent / "bench" / "vs_postfix.py"

STAND_IN = """\
import os, signal, socket, sys
with open(os.environ["STAND_IN_RECORD"], "a") as f:
    f.write(sys.argv[1] + " " + os.getcwd() + "\\n")
if sys.argv[1] == "run":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ready.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
    signal.pause()
"""


def load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vs_postfix_under_test", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_a_spoold_build_runs_in_its_own_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = load_harness()
    stand_in = tmp_path / "spoold"
    stand_in.write_text(f"#!{sys.executable}\n{STAND_IN}")
    stand_in.chmod(0o755)
    record = tmp_path / "started-in"
    monkeypatch.setenv("STAND_IN_RECORD", str(record))
    monkeypatch.chdir(tmp_path)  # the harness's own working directory
    home = tmp_path / "work" / "spoold"
    home.parent.mkdir()

    with harness.SpooldInstance(home, str(stand_in), 9, harness.Logs(), "info", {}):
        pass
    harness.SpooldInstance.version_of(str(stand_in))  # for the results' header

    assert record.read_text() == f"run {home}\n--version /\n"
