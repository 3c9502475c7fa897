"""How the daemon's log lines are made and written (spoold/daemon/logs.py):
the JSON and the times are what json.dumps and rfc3339 write; the lines of
one event-loop turn are written together when the turn ends, in whole
lines of at most PIPE_BUF bytes a write; a line logged where no loop runs
is written at once; what is still held is written at exit; a write that
fails, or a line that cannot be made, never reaches the code that logged."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from enum import IntEnum, StrEnum
from pathlib import PurePosixPath
from typing import Any

import pytest
import structlog

from spoold.daemon import logs
from spoold.log import event_fields, get_logger
from spoold.times import rfc3339
from tests.log_helpers import logging_kept


class Kind(StrEnum):
    DELIVERED = "delivered"


class Code(IntEnum):
    OK = 250


AT = datetime(2026, 12, 6, 11, 30, 27, 500000, tzinfo=UTC)


class Stream(io.StringIO):
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("stderr is gone")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    stderr = sys.stderr
    held_for = logs._HELD_FOR
    logs._HELD_FOR = 3600.0  # the flusher never writes, unless a test says so
    try:
        with logging_kept():
            yield
    finally:
        logs._HELD_FOR = held_for
        sys.stderr = stderr


def configured(stream: io.StringIO, fmt: str = "json") -> None:
    sys.stderr = stream
    logs.configure(fmt, "info")


@pytest.mark.parametrize(
    "fields",
    [
        {"id": "8Dx", "flows": ["f1"], "outcome": Kind.DELIVERED, "delivered": 1, "at": AT},
        {"n": 2**70, "x": 0.1, "big": 1e300, "neg": -0.0, "inf": float("-inf"), "nan": 1e999 * 0},
        {"t": True, "f": False, "none": None, "code": Code.OK, "kinds": [Kind.DELIVERED, "x"]},
        {"ints": [1, 2], "tuple": (1, "a"), "empty": (), "mixed": [None, 1.5, ["a", {"b": 2}]]},
        {"é": "✓", "\x00key": "\ud800", "tab\t": 'quote " back \\'},
        {"set": {"b", "a"}, "frozen": frozenset({3}), "path": PurePosixPath("/var"), "at": [AT]},
        {"nested": {"at": AT, "k": {"deeper": [AT, 1]}}, "other": Code},
    ],
)
def test_a_json_line_is_what_json_dumps_writes(fields: dict[str, Any]) -> None:
    fields = {**fields, "event": "e", "level": "info", "timestamp": "now"}
    expected = json.dumps(fields, default=logs._json_default)
    assert logs._json_line(fields) == expected


@pytest.mark.parametrize(
    "at",
    [
        AT,
        AT.replace(microsecond=0),
        AT.replace(microsecond=1),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        AT.astimezone(timezone(timedelta(hours=5, minutes=30))),
        AT.replace(tzinfo=timezone.utc),  # noqa: UP017 - the same object as UTC
    ],
)
def test_a_time_is_what_rfc3339_writes(at: datetime) -> None:
    assert logs._utc_text(at) == rfc3339(at)
    assert logs._utc_text(at) == rfc3339(at)  # a second time, from what was kept


@pytest.mark.parametrize("us", [0, 1, 500000, 999999])
def test_the_time_of_a_line_is_what_structlog_wrote(
    monkeypatch: pytest.MonkeyPatch, us: int
) -> None:
    ns = 1_796_557_827 * 1_000_000_000 + us * 1000 + 999
    monkeypatch.setattr(logs.time, "time_ns", lambda: ns)
    then = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)
    assert logs._now_text() == then.isoformat().replace("+00:00", "Z")


@pytest.mark.usefixtures("restore_logging")
async def test_the_lines_of_one_turn_are_written_together_when_it_ends() -> None:
    stream = Stream()
    configured(stream)
    get_logger("spoold.spool").info("first", id="a")
    structlog.get_logger("spoold.smtp").info("second", id="b")
    logging.getLogger("asyncio").warning("third")
    assert stream.writes == []  # the turn has not ended
    await asyncio.sleep(0)
    assert len(stream.writes) == 1
    lines = [json.loads(line) for line in stream.writes[0].splitlines()]
    assert [line["event"] for line in lines] == ["first", "second", "third"]
    get_logger("spoold.spool").info("fourth", id="c")
    await asyncio.sleep(0)
    assert len(stream.writes) == 2 and json.loads(stream.writes[1])["event"] == "fourth"


@pytest.mark.usefixtures("restore_logging")
async def test_flush_writes_the_lines_of_this_turn_before_it_ends() -> None:
    """What the daemon does before telling systemd of a state (READY after
    a reload): the lines that led there are written first."""
    stream = Stream()
    configured(stream)
    get_logger("spoold.daemon").info("reloaded")
    assert stream.writes == []
    logs.flush()
    assert [json.loads(line)["event"] for line in stream.writes] == ["reloaded"]
    await asyncio.sleep(0)
    assert len(stream.writes) == 1  # nothing written twice at the turn's end


@pytest.mark.usefixtures("restore_logging")
async def test_a_busy_turn_writes_whole_lines_at_most_pipe_buf_bytes_at_a_time() -> None:
    stream = Stream()
    configured(stream)
    for n in range(1000):
        get_logger("spoold.spool").info("attempt done", id=f"{n:05d}", note="é" * (n % 50))
    await asyncio.sleep(0)
    assert all(len(text.encode()) <= 4096 and text.endswith("\n") for text in stream.writes)
    lines = "".join(stream.writes).splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"{n:05d}" for n in range(1000)]
    assert len(stream.writes) < 1000


@pytest.mark.usefixtures("restore_logging")
async def test_a_console_line_with_a_lone_surrogate_is_written_too() -> None:
    stream = Stream()
    configured(stream, "console")
    get_logger("spoold.spool").info("odd text", text="\ud800")
    await asyncio.sleep(0)
    assert "odd text" in "".join(stream.writes)


@pytest.mark.usefixtures("restore_logging")
def test_a_line_where_no_loop_runs_is_written_at_once() -> None:
    stream = Stream()
    configured(stream)
    get_logger("spoold.spool").info("no loop here")
    assert len(stream.writes) == 1
    done = threading.Thread(target=lambda: get_logger("spoold.spool").info("a thread"))
    done.start()
    done.join()
    assert [json.loads(text)["event"] for text in stream.writes] == ["no loop here", "a thread"]


class WatchedStream(Stream):
    """A stream that says when something was written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()

    def write(self, text: str) -> int:
        self.written.set()
        return super().write(text)


@pytest.mark.usefixtures("restore_logging")
async def test_a_thread_line_while_the_loop_holds_lines_writes_them_all_at_once() -> None:
    stream = Stream()
    configured(stream)
    get_logger("spoold.spool").info("first", id="a")
    structlog.get_logger("spoold.smtp").info("second", id="b")
    done = threading.Thread(target=lambda: get_logger("spoold.relay").warning("a thread"))
    done.start()
    done.join()  # the loop's turn goes on: a hung loop would never end it
    assert len(stream.writes) == 1
    lines = [json.loads(line)["event"] for line in stream.writes[0].splitlines()]
    assert lines == ["first", "second", "a thread"]
    get_logger("spoold.spool").info("third")
    await asyncio.sleep(0)
    assert [json.loads(line)["event"] for line in stream.writes[1].splitlines()] == ["third"]


@pytest.mark.usefixtures("restore_logging")
async def test_lines_held_by_a_loop_that_does_not_turn_are_written_by_the_flusher() -> None:
    logs._HELD_FOR = 0.01
    stream = WatchedStream()
    configured(stream)
    get_logger("spoold.spool").info("before the loop blocked", id="a")
    structlog.get_logger("spoold.smtp").info("this too", id="b")
    assert stream.written.wait(60)  # the loop blocks here: its turn never ends
    lines = [json.loads(line)["event"] for line in "".join(stream.writes).splitlines()]
    assert lines == ["before the loop blocked", "this too"]
    await asyncio.sleep(0)
    get_logger("spoold.spool").info("later")
    await asyncio.sleep(0)
    assert json.loads(stream.writes[-1])["event"] == "later"


class FlusherClock(threading.Event):
    """The flusher's ``_stopped``: each timed wait of the flusher (a look
    due later) blocks until the test lets it go, and says it began."""

    def __init__(self) -> None:
        super().__init__()
        self.looks: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.go = threading.Semaphore(0)

    def wait(self, timeout: float | None = None) -> bool:
        if not self.is_set():
            self.looks.put(None)
            self.go.acquire()
        return self.is_set()


class CountedWake(threading.Condition):
    """The flusher's ``_wake``: counts the loop's notifies, says when the
    flusher goes to sleep for lines."""

    def __init__(self, lock: threading.RLock) -> None:
        super().__init__(lock)
        self.notified = 0
        self.sleeping: queue.SimpleQueue[None] = queue.SimpleQueue()

    def notify(self, n: int = 1) -> None:
        self.notified += 1
        super().notify(n)

    def wait(self, timeout: float | None = None) -> bool:
        self.sleeping.put(None)
        return super().wait(timeout)


async def test_a_loop_that_logs_every_turn_wakes_the_flusher_once_not_every_turn() -> None:
    """The flusher keeps looking while lines keep coming (once per
    _HELD_FOR), and sleeps for lines only after a look with none since the
    last: the loop's turns do not each wake it (a thread wake-up and a GIL
    hand-off per turn that logs)."""
    stream = Stream()
    output = logs._Output(stream)
    clock = FlusherClock()
    wake = CountedWake(output._lock)
    output._stopped, output._wake = clock, wake
    output.start()
    try:
        wake.sleeping.get(timeout=60)  # nothing held yet: it sleeps for lines
        output.write("turn 1")
        await asyncio.sleep(0)  # the turn ends: its line is written
        clock.looks.get(timeout=60)  # woken, it looks again later
        for turn in range(2, 6):
            output.write(f"turn {turn}")
            await asyncio.sleep(0)
        clock.go.release()  # lines came since its last look: it looks again later
        clock.looks.get(timeout=60)
        assert wake.notified == 1
        clock.go.release()  # none since: it sleeps for lines
        wake.sleeping.get(timeout=60)
        output.write("turn 6")
        await asyncio.sleep(0)
        clock.looks.get(timeout=60)
        assert wake.notified == 2
    finally:
        output.stop()
        clock.go.release()
    assert "".join(stream.writes).splitlines() == [f"turn {t}" for t in range(1, 7)]


@pytest.mark.usefixtures("restore_logging")
def test_a_filter_a_handler_or_no_propagation_on_a_library_logger_is_obeyed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("json", "info")

    class Redact(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            fields = event_fields(record)
            if fields is not None and "rcpt" in fields[1]:
                fields[1]["rcpt"] = "<redacted>"  # type: ignore[index]
            return True

    redact, records = Redact(), []
    other = logging.Handler()
    other.emit = records.append  # type: ignore[method-assign]
    relay, fleet, spool = (logging.getLogger(f"spoold.{n}") for n in ("relay", "fleet", "spool"))
    relay.addFilter(redact)
    fleet.propagate = False
    spool.addHandler(other)
    try:
        get_logger("spoold.relay").info("attempt done", rcpt="alice@example.org")
        get_logger("spoold.fleet").info("not shown")
        get_logger("spoold.spool").info("seen twice", id="x")
    finally:
        relay.removeFilter(redact)
        fleet.propagate = True
        spool.removeHandler(other)
    get_logger("spoold.relay").info("attempt done", rcpt="bob@example.org")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["event"], line.get("rcpt")) for line in lines] == [
        ("attempt done", "<redacted>"),
        ("seen twice", None),
        ("attempt done", "bob@example.org"),
    ]
    assert [r.getMessage() for r in records] == ["seen twice id='x'"]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fmt", ["json", "console"])
async def test_a_write_that_fails_loses_its_lines_not_the_daemon(fmt: str) -> None:
    configured(BrokenStream(), fmt)
    get_logger("spoold.spool").info("lost", id="a")
    structlog.get_logger("spoold.smtp").info("lost too")
    await asyncio.sleep(0)
    stream = Stream()
    configured(stream, fmt)
    get_logger("spoold.spool").info("written")
    await asyncio.sleep(0)
    assert "written" in "".join(stream.writes)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")

    __repr__ = __str__


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_line_that_cannot_be_made_is_said_on_stderr_and_logging_goes_on(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure(fmt, "info")
    get_logger("spoold.spool").info("bad", thing=Unprintable())
    structlog.get_logger("spoold.smtp").info("bad too", thing=Unprintable())
    get_logger("spoold.spool").info("good", id="g")
    err = capsys.readouterr().err
    assert err.count("--- Logging error ---") == 2
    assert err.count("RuntimeError: no text") == 2
    assert "good" in err.splitlines()[-1]


@pytest.mark.usefixtures("restore_logging")
def test_a_library_line_still_reaches_another_handler_on_the_root_logger(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("json", "info")
    records: list[logging.LogRecord] = []
    other = logging.Handler()
    other.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(other)
    get_logger("spoold.spool").info("seen twice", id="x")
    assert [r.getMessage() for r in records] == ["seen twice id='x'"]
    line = json.loads(capsys.readouterr().err)
    assert (line["id"], line["event"], line["level"]) == ("x", "seen twice", "info")


EXITS = """
import asyncio, sys
from spoold.daemon import logs
from spoold.log import event_fields, get_logger

logs.configure("json", "info")

async def main():
    get_logger("spoold.spool").info("held when the loop stopped", id="x")
    asyncio.get_running_loop().stop()

loop = asyncio.new_event_loop()
loop.create_task(main())
loop.run_forever()  # stops before the turn's end writes the line
loop.close()
sys.exit(3)
"""


def test_lines_still_held_are_written_at_exit() -> None:
    done = subprocess.run(
        [sys.executable, "-c", EXITS], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 3, done.stderr
    (line,) = done.stderr.splitlines()
    assert json.loads(line)["event"] == "held when the loop stopped"


HANGS = """
import asyncio, sys, threading, time
import structlog
from spoold.daemon import logs
from spoold.log import get_logger

logs.configure("json", "info")

async def main():
    structlog.get_logger("spoold.smtp").info("A: about to fsync", id="M1")
    get_logger("spoold.relay").info("B: attempt done", id="M1")
    if sys.argv[1] == "thread":
        said = threading.Thread(target=lambda: get_logger("spoold.spool").warning("C: disk slow"))
        said.start()
        said.join()
    print("blocked", flush=True)
    time.sleep(600)  # a hung disk: the turn never ends, the watchdog aborts

asyncio.run(main())
"""


@pytest.mark.parametrize("case", ["thread", "flusher"])
def test_a_hung_loop_aborted_by_the_watchdog_keeps_the_lines_that_explain_it(case: str) -> None:
    """SIGABRT (systemd's watchdog) runs no exit handler: the lines the
    stuck turn logged are written by a thread's line, or by the flusher."""
    child = subprocess.Popen(
        [sys.executable, "-c", HANGS, case],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stderr is not None
    abort = threading.Timer(60, child.send_signal, (signal.SIGABRT,))  # lines never come
    abort.start()
    try:
        assert child.stdout.readline() == "blocked\n"
        wanted = ["A: about to fsync", "B: attempt done"] + (
            ["C: disk slow"] if case == "thread" else []
        )
        events: list[str] = []
        if case == "thread":  # written before the thread's join returned
            child.send_signal(signal.SIGABRT)
        while len(events) < len(wanted) and (line := child.stderr.readline()):
            events.append(json.loads(line)["event"])
        child.send_signal(signal.SIGABRT)
        rest = child.stderr.read()
    finally:
        abort.cancel()
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGABRT, rest
    assert events == wanted, rest
