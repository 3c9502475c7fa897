"""The Python examples of docs/library.md run as written.

Every ``python`` block of the document is a program of its own: it runs
in this process, in a fresh namespace, in an empty working directory (its
spool goes there), with a time limit. A ``text`` block that follows it,
introduced by a sentence ending in ``prints:``, is what it must print,
line for line (``...`` in a line stands for any text, as in the shell
examples of docs/README.md). The examples use the doubles of
:mod:`spoold.testing` or relays of their own; a connection anywhere but
the loopback address fails the example. What an example changes in the
standard logging module is undone after it.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "library.md"
TIME_LIMIT = 60.0  # seconds for one example

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


@dataclass(frozen=True)
class Example:
    line: int  # of the opening fence
    code: str
    output: str | None  # what it prints, when the document shows it


def examples(text: str) -> list[Example]:
    """The python blocks of ``text``, each with the output shown under it."""
    fences = list(_FENCE.finditer(text))
    out = []
    for n, fence in enumerate(fences):
        if fence.group(1) != "python":
            continue
        output = None
        after = fences[n + 1] if n + 1 < len(fences) else None
        if after is not None and after.group(1) == "text":
            between = text[fence.end() : after.start()].strip()
            if between.endswith("prints:"):
                output = after.group(2)
        out.append(Example(text.count("\n", 0, fence.start()) + 1, fence.group(2), output))
    return out


EXAMPLES = examples(DOC.read_text())


def matches(expected: str, printed: str) -> bool:
    """Line for line; ``...`` in an expected line stands for any text."""
    want, got = expected.rstrip("\n").split("\n"), printed.rstrip("\n").split("\n")
    if len(want) != len(got):
        return False
    for pattern, line in zip(want, got, strict=True):
        regex = ".*".join(re.escape(part) for part in pattern.split("..."))
        if not re.fullmatch(regex, line):
            return False
    return True


@contextlib.contextmanager
def logging_restored() -> Iterator[None]:
    """Undo what an example does to logging (levels, the root's handlers)."""
    manager = logging.Logger.manager
    levels = {
        name: logger.level
        for name, logger in manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        for name, logger in manager.loggerDict.items():
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))
        for handler in root.handlers[:]:
            if handler not in root_handlers:
                root.removeHandler(handler)
        root.setLevel(root_level)


def _loopback_only(connect: Any) -> Any:
    def guarded(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = host == "localhost"
            if not loopback:
                raise AssertionError(f"an example connects to {host}: examples stay on 127.0.0.1")
        return connect(sock, address)

    return guarded


def run(example: Example) -> str:
    """Run ``example`` as a program (``__name__`` is ``"__main__"``); what
    it printed. Runs in a thread of its own, so that it may call
    ``asyncio.run`` and be given up on after :data:`TIME_LIMIT`."""
    printed = io.StringIO()
    failure: list[BaseException] = []
    code = compile(example.code, f"{DOC}:{example.line + 1}", "exec")

    def program() -> None:
        try:
            exec(code, {"__name__": "__main__"})
        except BaseException as exc:  # given to the test, below
            failure.append(exc)

    with contextlib.redirect_stdout(printed), logging_restored():
        thread = threading.Thread(target=program, name=f"library.md:{example.line}", daemon=True)
        thread.start()
        thread.join(TIME_LIMIT)
    if thread.is_alive():
        pytest.fail(f"library.md:{example.line}: still running after {TIME_LIMIT:.0f}s")
    if failure:
        raise failure[0]
    return printed.getvalue()


def test_the_document_has_its_examples() -> None:
    assert len(EXAMPLES) >= 5, "the python blocks of docs/library.md were not found"
    shown = [e for e in EXAMPLES if e.output is not None]
    assert len(shown) >= 4, "the outputs shown under the examples were not found"


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"library.md:{e.line}" for e in EXAMPLES])
def test_example_runs_as_written(
    example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(socket.socket, "connect", _loopback_only(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", _loopback_only(socket.socket.connect_ex))
    printed = run(example)
    if example.output is not None:
        assert matches(example.output, printed), (
            f"library.md:{example.line} printed:\n{printed}\nthe document shows:\n{example.output}"
        )
