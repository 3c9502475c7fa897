"""The documentation runs: every shell example in README.md and docs/*.md is
executed, so the docs cannot drift from the program.

Conventions (also stated in docs/README.md):

* A fenced block tagged ``sh`` is a script: it runs with ``bash -euo
  pipefail`` and must exit 0. Its output is not compared.
* A block tagged ``console`` is a terminal session: each line starting with
  ``$ `` is a command (a line ending in ``\\`` continues on the next), and
  the lines up to the next ``$ `` are its output (stdout and stderr),
  compared line by line. In the expected output ``...`` stands for any text
  within a line (ids, times), and a line that is only ``...`` for any
  number of lines. A command with no output shown must print nothing. A
  command that exits non-zero fails the test, unless the next command is
  ``echo $?``, whose output then shows the exit status.
* Every other fence needs a tag from :data:`NOT_RUN` (``toml``, ``json``,
  ...): those are never shell. ``bash``, ``shell`` and untagged fences are
  refused, so there is one convention.
* ``<!-- doc-test: install -->`` on the line before a fence runs the block
  against a staged root (below). Nothing else changes how a block runs.

How a file runs: its blocks run in order, like a reader's terminal, in a
fresh sandbox (a temporary copy of the project layout: ``config/``,
``docs/``, ``systemd/``, README, Makefile, pyproject.toml, and ``.venv``
linking to this checkout's venv; ``var/`` is the sandbox's own), with a
fixed locale (``C.UTF-8``). Shell variables, functions and the working
directory carry over from one block to the next. Each block is bounded in
time; a block that fails fails the test with its file, line and output. At
the end the daemon must stop cleanly, and whatever the blocks left running
is killed.

* README.md runs as a fresh checkout: nothing on PATH but the system's, no
  daemon until the README starts one (``make run``).
* docs/*.md run as an installed system: ``spoold`` on PATH, a daemon started
  from the sample config (as ``make run`` starts it) before the first block,
  and ``SPOOLD_CONFIG`` naming the sandbox's config, which stands in for
  /etc/spoold/spoold.toml (the paths of an installed system are mapped to
  the sandbox, see :data:`RULES`). A local SMTP sink (aiosmtpd) stands in
  for the provider's smarthost ``smtp.example.net:587``.
* ``install`` blocks run in the sandbox with ``$ROOT``, an empty staged root
  where ``/opt/spoold`` links to this checkout's venv; the install commands
  are pointed at it with systemd's offline tools (``systemd-sysusers
  --root``, ``systemd-tmpfiles --root``, ``systemctl --root``), and the
  staged tree is checked afterwards.

Before each console command (except in install blocks) the test waits until
the daemon, if one runs, has no attempt under way or about to start, as a
person typing the next command would find it: outputs do not depend on how
fast the machine is.

Commands that cannot run here are rewritten by :data:`RULES`, each with its
reason, never dropped: ``make run`` starts the daemon in the background and
waits until it answers, ``make test`` becomes ``make -n test`` (the suite
would run itself), ``apt-get install`` is simulated (``-s``), ``systemctl``
acts on the sandbox's daemon (start/stop/restart/reload) or on the staged
root (enable), and the SMTP ports of the sample config (2525, and the
smarthost's 25) become free ports. A rule that no longer matches any doc
fails :func:`test_every_rule_is_used`, and a command that still looks
unrunnable after the rules fails its block.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from tests.support import accepting, free_port, wait_until

REPO = Path(__file__).absolute().parent.parent
VENV = REPO / ".venv"
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])

RUN = ("sh", "console")
NOT_RUN = ("toml", "json", "text", "python", "ini")
BLOCK_TIMEOUT = 30.0  # seconds for one block
WAIT_TIMEOUT = 20  # seconds the daemon helper waits for the daemon

# ------------------------------------------------------------------ parsing

_FENCE = re.compile(r"^(```+)\s*([^\s`]*)\s*(.*)$")
_DIRECTIVE = re.compile(r"^<!--\s*doc-test:\s*(\S+)\s*-->\s*$")


@dataclass
class Command:
    text: str  # with continuation lines joined by newlines
    line: int
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence
    lang: str
    text: str
    install: bool = False

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    def commands(self) -> list[Command]:
        """The ``$ `` commands of a console block, with their output."""
        out: list[Command] = []
        lines = self.text.split("\n")
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("$ "):
                start = i
                parts = [line[2:]]
                while parts[-1].endswith("\\") and i + 1 < len(lines):
                    i += 1
                    parts.append(lines[i])
                out.append(Command("\n".join(parts), self.line + 1 + start))
            elif out:
                out[-1].expected.append(line)
            else:
                raise AssertionError(f"{self.where}: console output before any '$ ' command")
            i += 1
        for cmd in out:
            while cmd.expected and not cmd.expected[-1].strip():
                cmd.expected.pop()
        return out


def parse(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file; checks the tag convention."""
    blocks: list[Block] = []
    lines = path.read_text().split("\n")
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2)
        start = i
        where = f"{path.relative_to(REPO)}:{start + 1}"
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{where}: fence never closed"
        i += 1
        assert lang in RUN + NOT_RUN, (
            f"{where}: fence tagged {lang!r}; use sh or console for shell (executed), "
            f"or one of {', '.join(NOT_RUN)}"
        )
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        directive = _DIRECTIVE.match(before)
        if directive:
            assert directive.group(1) == "install", f"{where}: unknown directive {before}"
            assert lang in RUN, f"{where}: an install directive on a block that is not run"
        blocks.append(Block(path, start + 1, lang, "\n".join(body), bool(directive)))
    return blocks


# ------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """Rewrites text of a block for this sandbox. ``where``: the kind of
    block it applies to (checkout: README; installed: docs/; install: the
    staged-root blocks); ``output``: also applied to expected output."""

    where: tuple[str, ...]
    pattern: str
    replacement: str
    reason: str
    output: bool = False


_PROJECT = ("checkout", "installed")
RULES: tuple[Rule, ...] = (
    Rule(
        _PROJECT,
        r"^make run\b[^\n]*",
        '"$DOC_TEST/daemon" start',
        "make run never returns: it runs in the background until the daemon answers",
    ),
    Rule(
        _PROJECT,
        r"^make test\b",
        "make -n test",
        "the suite would run itself: only show what make would run",
    ),
    Rule(
        ("installed",),
        r"\bsystemctl (start|stop|restart|reload) spoold(?:\.service)?\b",
        r'"$DOC_TEST/daemon" \1',
        "no systemd here: the helper starts, stops or signals the sandbox's daemon",
    ),
    Rule(
        _PROJECT,
        r"\b2525\b",
        "{smtp_port}",
        "the sample listener's port: a free one",
        output=True,
    ),
    Rule(
        _PROJECT,
        r"127\.0\.0\.1:25\b",
        "127.0.0.1:{dead_port}",
        "the sample smarthost's port: a free one nothing listens on",
        output=True,
    ),
    Rule(
        ("installed",),
        r"smtp\.example\.net:587",
        "127.0.0.1:{sink_port}",
        "a local SMTP sink stands in for the provider's smarthost",
        output=True,
    ),
    Rule(
        ("installed",),
        r"mx\.example\.net:25\b",
        "127.0.0.1:{mx_port}",
        "a free port nothing listens on stands in for a partner's mail server",
        output=True,
    ),
    Rule(
        ("installed",),
        r"/etc/spoold/spoold\.toml",
        "{sandbox}/config/spoold.toml",
        "the sandbox's config stands in for the installed one",
        output=True,
    ),
    Rule(
        ("installed",),
        r"/etc/spoold/dkim\b",
        "{sandbox}/config/dkim",
        "the sandbox's config directory holds the DKIM keys of the installed one's",
        output=True,
    ),
    Rule(
        ("installed",),
        r"/var/lib/spoold/spool\b",
        "{sandbox}/var/spool",
        "the sandbox's spool stands in for the installed one",
        output=True,
    ),
    Rule(
        ("installed",),
        r"/run/spoold/spoold\.sock\b",
        "{sandbox}/var/run/spoold.sock",
        "the sandbox's control socket stands in for the installed one",
        output=True,
    ),
    Rule(
        ("installed",),
        r"/run/spoold/submit\.sock\b",
        "{sandbox}/var/run/submit.sock",
        "the sandbox's submission socket stands in for the installed one",
        output=True,
    ),
    Rule(
        ("install",),
        r"\bapt-get install -y\b",
        "apt-get install -s",
        "installing packages is simulated: apt-get only says what it would do",
    ),
    Rule(
        ("install",),
        r"^python3 -m venv /opt/spoold$",
        'test -x "$ROOT/opt/spoold/bin/python"',
        "no registry in tests: $ROOT/opt/spoold links to this checkout's venv, made the"
        " same way by make",
    ),
    Rule(
        ("install",),
        r"^/opt/spoold/bin/pip install (\S+)$",
        r'"$ROOT/opt/spoold/bin/pip" show --files spoold > /dev/null',
        "no registry in tests: check that spoold is installed in the venv instead",
    ),
    Rule(
        ("install",),
        r"^systemd/install\.sh\b",
        'systemd/install.sh --root "$ROOT"',
        "install into the staged root",
    ),
    Rule(
        ("install",),
        r"^systemctl enable --now (.*)$",
        r'systemctl --root="$ROOT" enable \1',
        "no systemd as PID 1: enable in the staged root; nothing can start",
    ),
    Rule(
        ("install",),
        r"^systemctl (is-enabled|cat) (.*)$",
        r'systemctl --root="$ROOT" \1 \2',
        "asked of the staged root",
    ),
    Rule(
        ("install",),
        r"^(systemctl status .*|spoold status|journalctl .*)$",
        r"echo 'not run here (no systemd as PID 1): \1'",
        "needs the service running under systemd",
    ),
)

# Commands that must not be left to run as written.
_UNRUNNABLE = re.compile(
    r"^\s*(make (run|test)\b|sudo\b|systemctl\b(?!.*--root)|apt-get install\b(?!.*-s)"
    r"|journalctl\b|reboot\b)",
    re.MULTILINE,
)


def kind_of(block: Block) -> str:
    if block.install:
        return "install"
    return (
        "checkout" if block.path.name == "README.md" and block.path.parent == REPO else "installed"
    )


def rewrite(text: str, kind: str, values: dict[str, str], used: set[int], *, output: bool) -> str:
    for n, rule in enumerate(RULES):
        if kind not in rule.where or (output and not rule.output):
            continue
        new = re.sub(rule.pattern, rule.replacement, text, flags=re.MULTILINE)
        if new != text:
            used.add(n)
        text = new
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


# ---------------------------------------------------------------- matching


def output_pattern(expected: list[str]) -> re.Pattern[str]:
    parts = []
    for line in expected:
        line = line.rstrip()
        if line == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(re.escape(p) for p in line.split("...")) + r"\n")
    return re.compile("".join(parts))


def matches(expected: list[str], actual: str) -> bool:
    lines = [line.rstrip() for line in actual.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    text = "".join(line + "\n" for line in lines)
    return output_pattern(expected).fullmatch(text) is not None


def test_output_patterns() -> None:
    assert matches(["a ... c"], "a b c\n")
    assert matches(["a", "...", "z"], "a\nb\nc\nz\n")
    assert matches(["a", "...", "z"], "a\nz")
    assert matches([], "")
    assert matches(["x   "], "x")
    assert not matches([], "something\n")
    assert not matches(["a ... c"], "a b c d\n")
    assert not matches(["a", "z"], "a\nb\nz\n")


# ----------------------------------------------------------------- sandbox

_HELPER = r"""#!/usr/bin/env bash
# Written by tests/test_docs.py: stands in for systemd around the sandbox's
# daemon (the one `make run` starts). usage: daemon start|stop|restart|reload
set -euo pipefail
cd "$SANDBOX"
spoold=$SANDBOX/.venv/bin/spoold
log=$DOC_TEST/daemon.log
answers() { "$spoold" --socket "$SANDBOX/var/run/spoold.sock" count > /dev/null 2>&1; }
owner() { tr -d '\n' < "$SANDBOX/var/spool/lock"; }
alive() { kill -0 "$1" 2> /dev/null; }
gone() { ! alive "$1"; }
wait_for() {
    local end=$((SECONDS + WAIT))
    until "$@"; do
        if [ "$SECONDS" -ge "$end" ]; then
            echo "daemon helper: timed out waiting for: $*" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
        sleep 0.05
    done
}
start() {
    if [ -e var/spool/lock ] && alive "$(owner)"; then
        echo "daemon helper: a daemon already runs" >&2
        exit 1
    fi
    setsid make run >> "$log" 2>&1 < /dev/null &
    wait_for answers
}
stop() {
    local pid stopped
    pid=$(owner)
    stopped=$(grep -c '"spoold stopped"' "$log" || true)
    kill -TERM "$pid"
    wait_for gone "$pid"
    if [ "$(grep -c '"spoold stopped"' "$log")" -le "$stopped" ]; then
        echo "daemon helper: the daemon did not stop cleanly" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
}
case ${1:-} in
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    reload) kill -HUP "$(owner)" ;;
    *) echo "usage: daemon start|stop|restart|reload" >&2; exit 2 ;;
esac
"""


_SETTLE = r"""
# Written by tests/test_docs.py: waits (at most WAIT seconds) until the
# sandbox's daemon has no attempt under way or about to start, as a person
# typing the next command would find it. No daemon: nothing to wait for.
import json, os, socket, sys, time
path = os.path.join(os.environ["SANDBOX"], "var", "run", "spoold.sock")
deadline = time.monotonic() + float(os.environ["WAIT"])
while time.monotonic() < deadline:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(b'{"v": 1, "op": "status"}\n')
            reply = json.loads(s.makefile("rb").readline())
    except (OSError, ValueError):
        sys.exit(0)
    busy = [v for v in reply.get("result") or [] if v["status"] in ("send_now", "sending")]
    if not busy:
        sys.exit(0)
    time.sleep(0.05)
"""


def wait_until_listening(port: int) -> None:
    """From these synchronous tests: wait until something accepts on ``port``."""
    what = f"a listener on 127.0.0.1:{port}"
    anyio.run(
        functools.partial(wait_until, functools.partial(accepting, port), what, interval=0.05)
    )


class Sandbox:
    """One doc file's sandbox: the project copy, the staged root, the
    helper, the environment and what has to be stopped at the end."""

    def __init__(self, base: Path, doc: Path) -> None:
        self.doc = doc
        self.dir = base / "project"
        self.root = base / "root"
        self.helper = base / "doc-test"
        self.state = base / "state.sh"
        self.outputs = base / "out"
        for d in (self.dir, self.root / "opt", self.helper, self.outputs):
            d.mkdir(parents=True)
        for name in ("config", "docs", "systemd"):
            shutil.copytree(REPO / name, self.dir / name)
        for name in ("README.md", "Makefile", "pyproject.toml"):
            shutil.copy2(REPO / name, self.dir / name)
        # make must see the venv as up to date, or `make run` would install the
        # sandbox's copy into this checkout's venv.
        stamp = VENV / ".installed"
        assert stamp.exists(), "run `make test` once: it makes .venv"
        older = stamp.stat().st_mtime - 1
        os.utime(self.dir / "pyproject.toml", (older, older))
        (self.dir / ".venv").symlink_to(VENV)
        (self.root / "opt" / "spoold").symlink_to(VENV)
        (self.helper / "daemon").write_text(_HELPER)
        (self.helper / "daemon").chmod(0o755)
        (self.helper / "settle.py").write_text(_SETTLE)
        self.values = {
            "smtp_port": str(free_port()),
            "dead_port": str(free_port()),
            "sink_port": str(free_port()),
            "mx_port": str(free_port()),
            "sandbox": str(self.dir),
        }
        self.used: set[int] = set()
        sample = self.dir / "config" / "spoold.toml"
        sample.write_text(rewrite(sample.read_text(), "checkout", self.values, set(), output=True))
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("COLUMNS", "LINES", "SPOOLD_CONFIG", "NOTIFY_SOCKET")
            and not k.startswith(("LISTEN_", "WATCHDOG_", "PYTEST_", "VIRTUAL_ENV"))
        }
        env["PATH"] = ":".join(
            p for p in env.get("PATH", "").split(":") if p and Path(p) != VENV / "bin"
        )
        env.update(SANDBOX=str(self.dir), DOC_TEST=str(self.helper), WAIT=str(WAIT_TIMEOUT))
        env["LC_ALL"] = "C.UTF-8"  # listings sort the same on every machine
        self.env = env
        self.state.write_text(f"cd {shlex.quote(str(self.dir))}\n")
        self.processes: list[subprocess.Popen[bytes]] = []
        self.groups: list[int] = []
        self.daemon_started = False
        self.sink: subprocess.Popen[bytes] | None = None

    # -- the installed-system set-up

    def as_installed(self) -> None:
        """What docs/*.md assume: spoold on PATH, a daemon from the sample
        config, the config named by SPOOLD_CONFIG, a smarthost sink."""
        if self.daemon_started:
            return
        self.daemon_started = True
        self.state.write_text(
            self.state.read_text()
            + f'export PATH={shlex.quote(str(VENV / "bin"))}:"$PATH"\n'
            + f"export SPOOLD_CONFIG={shlex.quote(str(self.dir / 'config' / 'spoold.toml'))}\n"
        )
        port = self.values["sink_port"]
        sink_log = (self.helper / "smarthost.log").open("wb")
        self.sink = subprocess.Popen(
            [str(VENV / "bin" / "python"), "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}"],
            stdout=sink_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        sink_log.close()
        wait_until_listening(int(self.values["sink_port"]))
        self.helper_run("start")

    def helper_run(self, action: str) -> None:
        result = subprocess.run(
            [str(self.helper / "daemon"), action],
            env=self.env,
            capture_output=True,
            timeout=WAIT_TIMEOUT * 2 + 5,
            check=False,
        )
        assert result.returncode == 0, (
            f"daemon helper {action} failed:\n{result.stdout.decode()}{result.stderr.decode()}"
        )

    def daemon_alive(self) -> bool:
        lock = self.dir / "var" / "spool" / "lock"
        try:
            pid = int(lock.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True

    def close(self) -> None:
        try:
            if self.daemon_alive():
                self.helper_run("stop")
        finally:
            for pgid in self.groups:  # what blocks left running in the background
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
            if self.sink is not None:
                self.sink.kill()
                self.sink.wait(5)

    # -- running blocks

    def _bash(self, script: str, block: Block) -> tuple[int, str]:
        path = self.helper / "block.sh"
        path.write_text(script)
        out = self.helper / "block.out"
        with out.open("wb") as sink:
            proc = subprocess.Popen(
                ["bash", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=self.env | ({"ROOT": str(self.root)} if block.install else {}),
                start_new_session=True,  # its background jobs are stopped at the end
            )
            self.groups.append(proc.pid)
            try:
                code = proc.wait(BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = -1
        return code, out.read_text(errors="replace")

    # What carries over to the next block: variables (but bash's own and
    # read-only ones), functions and the working directory.
    _SAVE = (
        "\n__SKIP='^declare -[a-zA-Z-]*r|^declare -[a-zA-Z-]* (BASH[A-Z_]*|FUNCNAME|GROUPS"
        "|DIRSTACK|PIPESTATUS|S?RANDOM|SECONDS|LINENO|HISTCMD|EPOCH[A-Z]*|OPTIND|OPTARG"
        "|PWD|OLDPWD|SHLVL|_|__rc|__STATE|__SKIP|COLUMNS|LINES)(=|$)'\n"
        '__save_state() { { declare -p | grep -Ev "$__SKIP"; declare -f; '
        'printf "cd %q\\n" "$PWD"; } > "$__STATE"; }\n'
    )

    def run(self, block: Block) -> None:
        kind = kind_of(block)
        if kind == "installed":
            self.as_installed()
        prelude = f'__STATE={shlex.quote(str(self.state))}\nsource "$__STATE"\n{self._SAVE}'
        if block.lang == "sh":
            text = rewrite(block.text, kind, self.values, self.used, output=False)
            self._refuse_unrunnable(text, block.where)
            script = f"{prelude}set -euo pipefail\n{text}\n__save_state\n"
            code, output = self._bash(script, block)
            assert code == 0, (
                f"{block.where}: sh block failed (exit {code}); as run:\n{text}\n"
                f"--- output ---\n{output}"
            )
            return
        commands = block.commands()
        assert commands, f"{block.where}: console block without a '$ ' command"
        lines = [prelude, "set -uo pipefail", "__rc=0"]
        for n, cmd in enumerate(commands):
            text = rewrite(cmd.text, kind, self.values, self.used, output=False)
            self._refuse_unrunnable(text, f"{block.path.relative_to(REPO)}:{cmd.line}")
            out = self.outputs / f"{block.line}.{n}"
            if kind != "install":
                lines.append('python3 "$DOC_TEST/settle.py"; (exit $__rc)')  # keeps $?
            lines.append(f"{{\n{text}\n}} > {shlex.quote(str(out))} 2>&1")
            lines.append(f"__rc=$?; echo $__rc > {shlex.quote(str(out))}.rc")
            followed_by_status = n + 1 < len(commands) and commands[n + 1].text == "echo $?"
            if not followed_by_status:
                lines.append("if [ $__rc -ne 0 ]; then __save_state; exit 0; fi")
            lines.append("(exit $__rc)")
        lines.append("__save_state")
        script = "\n".join(lines) + "\n"
        code, output = self._bash(script, block)
        assert code == 0, (
            f"{block.where}: console block broke (exit {code}):\n{output}\n--- as run ---\n{script}"
        )
        for n, cmd in enumerate(commands):
            where = f"{block.path.relative_to(REPO)}:{cmd.line}"
            out = self.outputs / f"{block.line}.{n}"
            rc_file = out.with_name(out.name + ".rc")
            assert rc_file.exists(), f"{where}: not run (an earlier command stopped the block)"
            rc = int(rc_file.read_text())
            actual = out.read_text(errors="replace")
            followed_by_status = n + 1 < len(commands) and commands[n + 1].text == "echo $?"
            assert rc == 0 or followed_by_status, (
                f"{where}: `{cmd.text}` exited {rc}; output:\n{actual}"
            )
            expected = [
                rewrite(line, kind, self.values, self.used, output=True) for line in cmd.expected
            ]
            assert matches(expected, actual), (
                f"{where}: `{cmd.text}` printed:\n{actual}\n--- expected ---\n"
                + "\n".join(expected)
            )

    @staticmethod
    def _refuse_unrunnable(text: str, where: str) -> None:
        m = _UNRUNNABLE.search(text)
        assert m is None, f"{where}: {m.group(0)!r} cannot run here and no rule rewrites it"


# ------------------------------------------------------------------- tests


@pytest.fixture
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    # Unix socket paths are short: a sandbox under /tmp, not under pytest's tmp_path.
    base = Path(tempfile.mkdtemp(prefix="spoold-doc-"))
    box = Sandbox(base, request.param)
    try:
        yield box
    finally:
        try:
            box.close()
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _needs_root_and_systemd(blocks: list[Block]) -> None:
    if not any(b.install for b in blocks):
        return
    missing = [
        t for t in ("systemd-sysusers", "systemd-tmpfiles", "systemctl") if not shutil.which(t)
    ]
    missing += [t for t in ("systemd-analyze", "apt-get") if not shutil.which(t)]
    if missing or os.geteuid() != 0:
        pytest.skip(
            f"install blocks need root and {', '.join(missing) or 'systemd tools'}"
            " (Debian: apt-get install systemd)"
        )


@pytest.mark.make_venv  # the sandbox links this checkout's .venv
@pytest.mark.parametrize(
    "sandbox", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS], indirect=True
)
def test_doc_runs(sandbox: Sandbox) -> None:
    blocks = [b for b in parse(sandbox.doc) if b.lang in RUN]
    _needs_root_and_systemd(blocks)
    for block in blocks:
        sandbox.run(block)
    if any(b.install for b in blocks):
        check_staged_root(sandbox.root)


def check_staged_root(root: Path) -> None:
    """What the install steps must have left in the staged root."""
    passwd = (root / "etc" / "passwd").read_text()
    assert re.search(r"^spoold:x:\d+:\d+:[^:]*:/var/lib/spoold:", passwd, re.M), passwd
    gid = next(
        int(line.split(":")[2])
        for line in (root / "etc" / "group").read_text().splitlines()
        if line.startswith("spoold:")
    )
    etc = root / "etc" / "spoold"
    assert etc.is_dir() and etc.stat().st_gid == gid and etc.stat().st_mode & 0o777 == 0o750
    config = etc / "spoold.toml"
    assert config.read_bytes() == (REPO / "config" / "production.toml").read_bytes()
    assert config.stat().st_gid == gid and config.stat().st_mode & 0o777 == 0o640
    units = root / "etc" / "systemd" / "system"
    for unit in ("spoold.service", "spoold.socket"):
        assert (units / unit).read_bytes() == (REPO / "systemd" / unit).read_bytes()
    assert (units / "multi-user.target.wants" / "spoold.service").is_symlink()
    assert (units / "sockets.target.wants" / "spoold.socket").is_symlink()
    assert os.readlink(root / "usr" / "bin" / "spoold") == "../../opt/spoold/bin/spoold"
    version = subprocess.run(
        [str(root / "usr" / "bin" / "spoold"), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert version.stdout.startswith("spoold ")
    docs = root / "usr" / "share" / "doc" / "spoold"
    assert sorted(p.name for p in docs.iterdir()) == sorted(
        p.name for p in (REPO / "docs").glob("*.md")
    )
    assert (docs / "operations.md").exists()  # the units' Documentation=


def test_every_rule_is_used() -> None:
    """A rule no doc needs any more is stale: remove it."""
    used: set[int] = set()
    values = {k: "0" for k in ("smtp_port", "dead_port", "sink_port", "mx_port", "sandbox")}
    for doc in DOCS:
        for block in parse(doc):
            if block.lang not in RUN:
                continue
            kind = kind_of(block)
            if block.lang == "sh":
                rewrite(block.text, kind, values, used, output=False)
                continue
            for cmd in block.commands():
                rewrite(cmd.text, kind, values, used, output=False)
                for line in cmd.expected:
                    rewrite(line, kind, values, used, output=True)
    stale = [RULES[n].pattern for n in range(len(RULES)) if n not in used]
    assert not stale, f"rules that match no doc: {stale}"


def test_fences_follow_the_convention() -> None:
    for doc in DOCS:
        parse(doc)  # raises on an untagged, bash or unknown fence


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_docs_are_self_contained_and_links_resolve() -> None:
    for doc in DOCS:
        text = doc.read_text()
        where = doc.relative_to(REPO)
        for banned in ("../shared", "DESIGN.md", "STYLE.md", "FACTS.md"):
            assert banned not in text, f"{where} mentions {banned}: users do not have it"
        assert not re.search(r"\bissues? \d+", text, re.I), f"{where} refers to an issue"
        for target in _LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s):, mailto:, file:
            file_part, _, anchor = target.partition("#")
            dest = (doc.parent / file_part).resolve() if file_part else doc
            assert dest.exists(), f"{where}: link to {target} leads nowhere"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest), f"{where}: no heading #{anchor} in {dest.name}"


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-'."""
    out = set()
    for line in doc.read_text().splitlines():
        m = re.match(r"^#+\s+(.*)$", line)
        if m:
            title = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower().replace("`", ""))
            out.add(title.replace(" ", "-"))
    return out


def test_every_doc_is_linked_from_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for doc in (REPO / "docs").glob("*.md"):
        assert f"docs/{doc.name}" in readme, f"README.md does not link docs/{doc.name}"


def test_production_config_matches_the_units() -> None:
    """config/production.toml goes to /etc/spoold/spoold.toml: its paths
    must be where the unit lets the daemon write, and its listen addresses
    those systemd opens."""
    sys.path.insert(0, str(REPO))
    from spoold.daemon.config import load_config

    config = load_config(REPO / "config" / "production.toml")
    service = (REPO / "systemd" / "spoold.service").read_text()
    state = re.search(r"^StateDirectory=(\S+)", service, re.M)
    runtime = re.search(r"^RuntimeDirectory=(\S+)", service, re.M)
    assert state and runtime
    assert config.spool.dir.is_relative_to(Path("/var/lib") / state.group(1))
    assert config.control.socket.parent == Path("/run") / runtime.group(1)
    # Any local user submits: the socket is open to others, in a directory they may enter.
    assert config.control.submission_path.parent == Path("/run") / runtime.group(1)
    assert config.control.submission_mode & 0o002
    runtime_mode = re.search(r"^RuntimeDirectoryMode=(\S+)", service, re.M)
    assert runtime_mode and int(runtime_mode.group(1), 8) & 0o001
    assert "--config /etc/spoold/spoold.toml" in service
    socket_unit = (REPO / "systemd" / "spoold.socket").read_text()
    listen = re.findall(r"^ListenStream=(\S+)", socket_unit, re.M)
    assert config.smtp is not None
    assert sorted(listen) == sorted(config.smtp.listen)
