"""Postfix's ``smtp-sink`` as a next hop, for the interop tests.

``await start_smtp_sink("-r", "RCPT", dump=True)`` starts ``smtp-sink`` as a
subprocess on a free ``127.0.0.1`` port with those fault options (``-r``
soft reject, ``-f`` hard reject, ``-Q`` 421 and disconnect, ...) and returns
once it accepts connections (the probe connection counts as one session).
It always runs with ``-c``, so it prints ``sess= quit= mesg=`` counters on
its standard output, which goes to a file (never an unread pipe); with
``dump=True`` it writes every message it receives to a file of its own
(``-d``), for byte-exact checks. Every sink is stopped at teardown.

Tests that use it are marked ``interop``; without Postfix installed they
are skipped, saying which package to install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import accepting, free_port, wait_until

__all__ = ["SmtpSink", "StartSmtpSink", "postfix_tool", "start_smtp_sink"]

_COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


def postfix_tool(name: str) -> str:
    """The path of a Postfix tool (``smtp-sink``, ``smtp-source``); skips
    the test when Postfix is not installed."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.skip(
            f"{name} not found in PATH or /usr/sbin: install Debian package 'postfix' "
            "(apt-get install postfix)"
        )
    return found


@dataclass
class SmtpSink:
    """One ``smtp-sink`` process and what it wrote."""

    process: subprocess.Popen[bytes]
    port: int
    output: Path  # its stdout: the -c counters
    dump_dir: Path | None

    @property
    def hop(self) -> str:
        return f"127.0.0.1:{self.port}"

    def counters(self) -> dict[str, int]:
        """The latest ``-c`` counters: sessions ended, QUITs, messages."""
        found = _COUNTERS.findall(self.output.read_bytes())
        sess, quit_, mesg = (int(x) for x in found[-1]) if found else (0, 0, 0)
        return {"sess": sess, "quit": quit_, "mesg": mesg}

    def dumps(self) -> list[bytes]:
        assert self.dump_dir is not None, "start the sink with dump=True"
        return [p.read_bytes() for p in sorted(self.dump_dir.iterdir())]

    def stop(self) -> dict[str, int]:
        """Terminate it (idempotent); its final counters."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.counters()


StartSmtpSink = Callable[..., Awaitable[SmtpSink]]


@pytest.fixture
async def start_smtp_sink(tmp_path: Path) -> AsyncIterator[StartSmtpSink]:
    """``await start_smtp_sink(*options, dump=False)``: a started
    :class:`SmtpSink`; every one is terminated at teardown."""
    binary = postfix_tool("smtp-sink")
    sinks: list[SmtpSink] = []
    scratch: list[Path] = []

    async def start(*options: str, dump: bool = False) -> SmtpSink:
        port = free_port()
        output = tmp_path / f"smtp-sink-{port}.out"
        argv = [binary, "-c"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # required as root; it then writes dumps as nobody
        dump_dir = None
        if dump:
            # Outside tmp_path, whose parents only root may enter.
            dump_dir = Path(tempfile.mkdtemp(prefix="spoold-sink-dump-"))
            dump_dir.chmod(0o777)
            scratch.append(dump_dir)
            argv += ["-d", f"{dump_dir}/msg."]
        argv += [*options, f"127.0.0.1:{port}", "256"]
        with output.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        sink = SmtpSink(process, port, output, dump_dir)
        sinks.append(sink)

        async def accepts() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"smtp-sink exited with {process.returncode}: {output.read_text()}"
                )
            return await accepting(port)  # a connection accepted counts as one session

        await wait_until(accepts, f"smtp-sink to accept on port {port}", interval=0.02)
        return sink

    try:
        yield start
    finally:
        for sink in sinks:
            sink.stop()
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)
