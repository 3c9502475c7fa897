"""``[webhooks.NAME]``: how the keys are read, the errors a bad table
gives (exact texts, all at once), the secret file's checks, and the
outbox's bound and order (:mod:`spoold.daemon.webhook_outbox`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
import structlog.testing

from spoold.daemon.config import load_config, restart_needed, webhook_settings
from spoold.daemon.webhook_events import (
    DEFAULT_WEBHOOK_KINDS,
    WebhookKind,
    signature,
    signature_headers,
    webhook_kind,
)
from spoold.daemon.webhook_outbox import Outbox, OutboxWriteError
from spoold.daemon.webhooks import Webhooks, WebhookSettings
from spoold.errors import ConfigError
from spoold.events import EventKind, SpoolEvent
from spoold.message import EnvelopeInfo
from spoold.times import utcnow
from tests.support import NOT_ASCII_DIGITS
from tests.webhook_receiver import WebhookReceiver

BASE = """
[spool]
dir = "spool"

[relay]
default_route = "smarthost"

[routes.smarthost]
next_hops = ["127.0.0.1:2525"]
"""


def _config(tmp_path: Path, table: str, secret_mode: int = 0o600) -> Path:
    secret = tmp_path / "hook.secret"
    secret.write_text("0123456789abcdef0123\n")
    os.chmod(secret, secret_mode)
    path = tmp_path / "spoold.toml"
    path.write_text(BASE + table)
    return path


def test_keys_are_read_with_their_defaults(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        '[webhooks.app]\nurl = "https://hooks.example.com/in"\nsecret_file = "hook.secret"\n',
    )
    cfg = load_config(path)
    hook = cfg.webhooks["app"]
    assert hook.url == "https://hooks.example.com/in"
    assert hook.secret_file == tmp_path / "hook.secret"
    assert hook.events == DEFAULT_WEBHOOK_KINDS
    assert hook.routes == ()
    assert hook.timeout == timedelta(seconds=10)
    assert (hook.backoff, hook.max_backoff) == (timedelta(seconds=1), timedelta(minutes=10))
    assert hook.max_outbox == 100_000
    assert hook.concurrency == 16
    (settings,) = webhook_settings(cfg)
    assert settings.secret == b"0123456789abcdef0123"  # the newline is not part of it
    assert settings.kinds == frozenset(DEFAULT_WEBHOOK_KINDS)


def test_http_to_loopback_and_filters_are_accepted(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        "[webhooks.local]\n"
        'url = "http://127.0.0.1:8080/hook"\n'
        'secret_file = "hook.secret"\n'
        'events = ["deferred", "in_doubt"]\n'
        'routes = ["smarthost"]\n'
        "[webhooks.v6]\n"
        'url = "http://[::1]:8080/hook"\n'
        'secret_file = "hook.secret"\n',
    )
    cfg = load_config(path)
    assert cfg.webhooks["local"].events == (WebhookKind.DEFERRED, WebhookKind.IN_DOUBT)
    assert cfg.webhooks["local"].routes == ("smarthost",)
    assert cfg.webhooks["v6"].url == "http://[::1]:8080/hook"


def test_bad_tables_report_every_problem(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        "[webhooks.clear]\n"
        'url = "http://hooks.example.com/in"\n'
        'secret_file = "hook.secret"\n'
        'events = ["delivered", "opened"]\n'
        'routes = ["nowhere"]\n'
        'backoff = "5m"\n'
        'max_backoff = "1m"\n'
        "[webhooks.bare]\n"
        'url = "ftp://example.com"\n'
        "colour = 1\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        "webhooks.clear.url: plain http would send the events in clear; use https:// "
        "(http:// only to a loopback address), got 'http://hooks.example.com/in'",
        "webhooks.clear.events: expected one of delivered, bounced, in_doubt, removed, "
        "deferred, frozen, quarantined, got 'opened'",
        "webhooks.clear.routes: no route named 'nowhere' (routes: smarthost)",
        "webhooks.clear.max_backoff: must not be shorter than backoff",
        "webhooks.bare.url: expected an https:// URL, got 'ftp://example.com'",
        "webhooks.bare.secret_file: required",
        "webhooks.bare.colour: unknown key",
    ]


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_a_secret_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = _config(
        tmp_path,
        '[webhooks.app]\nurl = "https://h.example.com/"\nsecret_file = "hook.secret"\n',
        secret_mode=mode,
    )
    cfg = load_config(path)  # read by the daemon as it builds, like an auth_file
    with pytest.raises(ConfigError) as info:
        webhook_settings(cfg)
    (problem,) = info.value.problems
    assert problem.startswith("webhooks.app.secret_file: webhook secret file ")
    assert f"(mode {mode:04o}); make it 0600" in problem


def test_a_short_or_missing_secret_is_refused(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        '[webhooks.a]\nurl = "https://h.example.com/"\nsecret_file = "hook.secret"\n'
        '[webhooks.b]\nurl = "https://h.example.com/"\nsecret_file = "missing"\n',
    )
    (tmp_path / "hook.secret").write_text("short\n")
    with pytest.raises(ConfigError) as info:
        webhook_settings(load_config(path))
    assert info.value.problems == [
        f"webhooks.a.secret_file: webhook secret file {tmp_path / 'hook.secret'}: "
        "expected at least 16 characters",
        f"webhooks.b.secret_file: webhook secret file {tmp_path / 'missing'}: "
        "No such file or directory",
    ]


def test_a_changed_webhook_needs_a_restart(tmp_path: Path) -> None:
    table = '[webhooks.app]\nurl = "https://h.example.com/"\nsecret_file = "hook.secret"\n'
    old = load_config(_config(tmp_path, table))
    new = load_config(_config(tmp_path, table.replace("h.example", "g.example")))
    assert restart_needed(old, new) == ["webhooks"]


def test_stream_events_map_onto_webhook_kinds() -> None:
    def kind(k: EventKind, detail: str | None = None) -> WebhookKind | None:
        return webhook_kind(SpoolEvent(utcnow(), k, "m1", detail=detail))

    assert kind(EventKind.DELIVERED) is WebhookKind.DELIVERED
    assert kind(EventKind.REMOVED, "bounced") is WebhookKind.BOUNCED
    assert kind(EventKind.REMOVED, "in doubt: no reply to the end of the message") is (
        WebhookKind.IN_DOUBT
    )
    assert kind(EventKind.REMOVED, "by operator") is WebhookKind.REMOVED
    assert kind(EventKind.DELAYED) is WebhookKind.DEFERRED
    assert kind(EventKind.DELAYED_RATE_LIMITED) is WebhookKind.DEFERRED
    assert kind(EventKind.SPOOLED) is None
    assert kind(EventKind.PING) is None


def test_signature_is_over_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    headers = signature_headers(b"k" * 16, b'{"a":1}', "e1", 1_700_000_000.9)
    assert headers["Spoold-Timestamp"] == "1700000000"
    expected = hmac.new(b"k" * 16, b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert headers["Spoold-Signature"] == "sha256=" + expected
    assert signature(b"k" * 16, "1700000000", b'{"a":1}') == expected
    assert headers["Spoold-Event-Id"] == "e1"


def test_outbox_keeps_order_across_reopen_and_drops_the_oldest_when_full(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "app", max_events=3)
    outbox.open()
    assert outbox.append([b"1", b"2"]) == 0
    assert outbox.append([b"3", b"4", b"5"]) == 2  # 1 and 2 dropped
    assert outbox.dropped == 2
    (tmp_path / "app" / "0000000000000009.json.tmp").write_bytes(b"half")  # a crash mid-write

    again = Outbox(tmp_path / "app", max_events=3)
    again.open()
    assert len(again) == 3
    assert not list((tmp_path / "app").glob("*.tmp"))
    bodies = []
    while (name := again.oldest()) is not None:
        body = again.read(name)
        assert body is not None
        bodies.append(body)
        again.remove([name])
    assert bodies == [b"3", b"4", b"5"]
    again.append([b"6"])  # numbering goes on after the newest seen
    assert again.read(again.oldest() or "") == b"6"
    assert sorted(p.name for p in (tmp_path / "app").iterdir()) == ["0000000000000005.json"]


def test_a_ca_file_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        '[webhooks.app]\nurl = "https://h.example.com/"\nsecret_file = "hook.secret"\n'
        'ca_file = "missing.pem"\n',
    )
    with pytest.raises(ConfigError) as info:
        webhook_settings(load_config(path))
    assert info.value.problems == [
        f"webhooks.app.ca_file: {tmp_path / 'missing.pem'}: No such file or directory"
    ]


def test_a_url_httpx_cannot_use_is_refused(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        '[webhooks.app]\nurl = "https://h.example.com:x/"\nsecret_file = "hook.secret"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith("webhooks.app.url: ")
    assert problem == "webhooks.app.url: Invalid port: 'x', got 'https://h.example.com:x/'"


def _settings(name: str = "app", url: str = "http://127.0.0.1:9/hook") -> WebhookSettings:
    return WebhookSettings(
        name=name,
        url=url,
        kinds=frozenset(DEFAULT_WEBHOOK_KINDS),
        routes=frozenset(),
        secret=b"0123456789abcdef0123",
        verify=ssl.create_default_context(),
        timeout=1.0,
        backoff=0.01,
        max_backoff=0.02,
        max_outbox=10,
        concurrency=16,
    )


async def _until(check: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not check():
            await anyio.sleep(0.01)


async def test_an_outbox_that_cannot_be_opened_is_logged_and_retried(tmp_path: Path) -> None:
    blocker = tmp_path / "webhooks"
    blocker.write_text("not a directory")
    hooks = Webhooks(tmp_path, [_settings()], lambda recipient, sender: "smarthost")
    state = hooks.states["app"]
    async with anyio.create_task_group() as tg:
        await tg.start(hooks.run)
        await _until(lambda: state.last_error is not None)
        assert not state.opened
        assert "outbox" in (state.last_error or "")
        blocker.unlink()
        await _until(lambda: state.opened)
        tg.cancel_scope.cancel()
    assert (tmp_path / "webhooks" / "app").is_dir()


@pytest.mark.parametrize("name", ["../..", "a/b", "", ".", "héllo", "x" * 65, "sp ace"])
def test_a_webhook_name_that_is_not_a_plain_word_is_refused(tmp_path: Path, name: str) -> None:
    path = _config(
        tmp_path,
        f'[webhooks."{name}"]\nurl = "https://hooks.example.com/in"\nsecret_file = "hook.secret"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        "webhooks: a webhook's name is 1 to 64 letters (A-Z, a-z), digits, "
        f"'-' or '_', got {name!r}"
    ]


def test_a_webhook_name_of_64_word_characters_is_accepted(tmp_path: Path) -> None:
    name = "A-z_0" + "x" * 59
    path = _config(
        tmp_path,
        f'[webhooks.{name}]\nurl = "https://hooks.example.com/in"\nsecret_file = "hook.secret"\n',
    )
    assert list(load_config(path).webhooks) == [name]


@pytest.mark.parametrize("digits", NOT_ASCII_DIGITS)
def test_a_file_named_in_digits_not_ascii_is_no_event(tmp_path: Path, digits: str) -> None:
    """A file the outbox did not write, named ``DIGITS.json`` in digits that
    str.isdigit() takes: the outbox still opens (``int()`` raised on
    superscript two, so it never opened and nothing was posted), numbers
    past its own newest event (Arabic-Indic ten was read as 10: the next
    event was written over event 11), and leaves the file alone."""
    outbox = Outbox(tmp_path / "app", max_events=100)
    outbox.open()
    bodies = [str(n).encode() for n in range(12)]
    outbox.append(bodies)
    foreign = tmp_path / "app" / f"{digits}.json"
    foreign.write_bytes(b"not an event")

    again = Outbox(tmp_path / "app", max_events=100)
    again.open()
    again.append([b"new"])
    read = []
    while (name := again.oldest()) is not None:
        read.append(again.read(name))
        again.remove([name])
    assert read == [*bodies, b"new"]
    assert foreign.read_bytes() == b"not an event"


def test_an_outbox_file_deleted_by_hand_is_forgotten(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "app", max_events=10)
    outbox.open()
    outbox.append([b"first", b"second"])
    first = outbox.oldest()
    assert first is not None
    (outbox.directory / first).unlink()
    assert outbox.read(first) is None
    second = outbox.oldest()
    assert second is not None and second != first
    assert outbox.read(second) == b"second"
    assert len(outbox) == 1


async def test_a_sender_skips_an_outbox_file_deleted_by_hand(tmp_path: Path) -> None:
    hooks = Webhooks(tmp_path, [_settings()], lambda recipient, sender: "smarthost")
    state = hooks.states["app"]
    async with anyio.create_task_group() as tg:
        await tg.start(hooks.run)
        await _until(lambda: state.opened)
        state.outbox.append([b"{}"])
        (state.outbox.directory / (state.outbox.oldest() or "")).unlink()
        state.wake.set()
        await _until(lambda: len(state.outbox) == 0)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://evil.example#@127.0.0.1/", "a fragment ('#')"),
        ("http://127.0.0.1#@evil.example/", "a fragment ('#')"),
        ("http://127.0.0.1@evil.example/", "a user name or password"),
        ("https://user:pw@hooks.example.com/", "a user name or password"),
        ("http://127.0.0.1\\@evil.example/", "spaces, control characters or '\\'"),
        ("http://evil.example /@127.0.0.1/", "spaces, control characters or '\\'"),
        ("http:///127.0.0.1/", None),
    ],
)
def test_a_webhook_url_that_hides_its_host_is_refused(
    tmp_path: Path, url: str, problem: str | None
) -> None:
    path = _config(
        tmp_path,
        f"[webhooks.app]\nurl = '{url}'\nsecret_file = \"hook.secret\"\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (text,) = info.value.problems
    if problem is None:
        assert text.startswith("webhooks.app.url: expected an https:// URL")
    else:
        assert text == f"webhooks.app.url: expected a URL without {problem}, got {url!r}"


def test_http_to_a_bracketed_loopback_address_is_accepted(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        '[webhooks.app]\nurl = "http://[::1]:8080/in?x=1"\nsecret_file = "hook.secret"\n',
    )
    assert load_config(path).webhooks["app"].url == "http://[::1]:8080/in?x=1"


async def test_an_endpoint_that_trickles_its_answer_times_out(tmp_path: Path) -> None:
    """Each byte comes well within httpx's per-read timeout, but the
    answer never ends: the post as a whole must time out."""
    done = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        with contextlib.suppress(OSError):
            while not done.is_set():
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = dataclasses.replace(
        _settings(url=f"http://127.0.0.1:{port}/hook"), timeout=0.5, backoff=60, max_backoff=60
    )
    hooks = Webhooks(tmp_path, [settings], lambda recipient, sender: "smarthost")
    state = hooks.states["app"]
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(hooks.run)
            await _until(lambda: state.opened)  # read in the background
            state.outbox.append([b'{"event_id": "e1"}'])
            state.wake.set()
            await _until(lambda: state.last_error is not None)
            tg.cancel_scope.cancel()
    finally:
        done.set()
        server.close()
    assert state.last_error == "no answer within 0.5 s"
    assert len(state.outbox) == 1


def test_the_config_and_cli_import_without_httpx() -> None:
    """Every CLI command reads the config; a venv without httpx (a
    client-only install) must still run them."""
    code = "import sys; sys.modules['httpx'] = None; import spoold.daemon.cli, spoold.daemon.config"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


async def test_an_event_the_endpoint_got_but_did_not_2xx_comes_again_with_its_id(
    tmp_path: Path,
) -> None:
    receiver = WebhookReceiver(status=500)
    await receiver.start()
    hooks = Webhooks(tmp_path, [_settings(url=receiver.url)], lambda recipient, sender: "x")
    state = hooks.states["app"]
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(hooks.run)
            await _until(lambda: state.opened)  # read in the background
            state.outbox.append([b'{"event_id": "e1"}'])
            state.wake.set()
            await receiver.wait_for(lambda: len(receiver.posts) == 1)
            receiver.status = 200
            await receiver.wait_for(lambda: len(receiver.accepted) == 1)
            tg.cancel_scope.cancel()
    finally:
        await receiver.stop()
    assert [p.headers["spoold-event-id"] for p in receiver.posts] == ["e1", "e1"]
    assert receiver.posts[0].body == receiver.posts[1].body


def test_the_docs_name_event_id_as_the_key_to_deduplicate_on() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert "posted twice only when" not in docs
    assert (
        "`event_id` (also in\nthe `Spoold-Event-Id` header): that is the key to deduplicate on"
        in docs
    )


def test_status_hides_the_query_of_a_url(tmp_path: Path) -> None:
    settings = [
        _settings("tok", "https://hooks.example.com/in?token=s3cret"),
        _settings("plain", "https://hooks.example.com/in"),
    ]
    hooks = Webhooks(tmp_path, settings, lambda recipient, sender: "x")
    assert [s["url"] for s in hooks.status()] == [
        "https://hooks.example.com/in?...",
        "https://hooks.example.com/in",
    ]


def test_events_dropped_before_the_outbox_are_logged_once_per_spell(tmp_path: Path) -> None:
    settings = dataclasses.replace(_settings(), max_outbox=1)
    hooks = Webhooks(tmp_path, [settings], lambda recipient, sender: "x")
    with structlog.testing.capture_logs() as logged:
        for n in range(5):
            hooks._take(SpoolEvent(utcnow(), EventKind.DELIVERED, f"m{n}"))
    assert hooks.states["app"].behind == 4
    warnings = [e for e in logged if "writer is behind" in e["event"]]
    assert len(warnings) == 1


class _Counted:
    """Metrics that keep the events counted as dropped, per webhook."""

    def __init__(self) -> None:
        self.dropped: dict[str, int] = {}
        self.changed = anyio.Event()

    def webhook_started(self, name: str, waiting: int) -> None:
        pass

    def webhook_posted(self, name: str, waiting: int) -> None:
        pass

    def webhook_failed(self, name: str, waiting: int) -> None:
        pass

    def webhook_rejected(self, name: str, waiting: int) -> None:
        pass

    def webhook_queued(self, name: str, waiting: int, dropped: int) -> None:
        self.dropped[name] = self.dropped.get(name, 0) + dropped
        self.changed.set()


def _no_space(bodies: object) -> int:
    raise OSError(28, "No space left on device")


async def test_events_the_outbox_cannot_take_are_logged_and_counted(tmp_path: Path) -> None:
    metrics = _Counted()
    hooks = Webhooks(tmp_path, [_settings()], lambda recipient, sender: "x", metrics)
    state = hooks.states["app"]
    send, receive = anyio.create_memory_object_stream[SpoolEvent](10)
    hooks.subscribe(lambda size: receive)  # type: ignore[arg-type, return-value]
    with structlog.testing.capture_logs() as logged:
        async with anyio.create_task_group() as tg:
            await tg.start(hooks.run)
            await _until(lambda: state.opened)  # read in the background
            state.outbox.append = _no_space  # type: ignore[method-assign]
            for n in range(3):
                send.send_nowait(SpoolEvent(utcnow(), EventKind.DELIVERED, f"m{n}"))
            with anyio.fail_after(10):
                while metrics.dropped.get("app", 0) < 3:
                    metrics.changed = anyio.Event()
                    await metrics.changed.wait()
            tg.cancel_scope.cancel()
    assert metrics.dropped == {"app": 3}
    assert state.to_dict()["dropped"] == 3
    assert any("the outbox cannot be written" in e["event"] for e in logged)


def test_events_the_subscription_missed_are_logged_and_counted(tmp_path: Path) -> None:
    metrics = _Counted()
    settings = [_settings("a"), _settings("b")]
    hooks = Webhooks(tmp_path, settings, lambda recipient, sender: "x", metrics)
    with structlog.testing.capture_logs() as logged:
        hooks._overflowed(7)
    assert metrics.dropped == {"a": 7, "b": 7}
    assert [s["dropped"] for s in hooks.status()] == [7, 7]
    assert [e["missed"] for e in logged if "overflowed" in e["event"]] == [7]


def test_events_the_writer_fell_behind_on_are_counted(tmp_path: Path) -> None:
    metrics = _Counted()
    settings = dataclasses.replace(_settings(), max_outbox=1)
    hooks = Webhooks(tmp_path, [settings], lambda recipient, sender: "x", metrics)
    for n in range(5):
        hooks._take(SpoolEvent(utcnow(), EventKind.DELIVERED, f"m{n}"))
    assert metrics.dropped == {"app": 4}


async def test_an_event_that_cannot_be_made_is_logged_counted_and_the_next_taken(
    tmp_path: Path,
) -> None:
    """A route lookup that fails with an unexpected error (a bug) for one
    message: that event is logged and counted as dropped, the collector
    goes on with the next, and the daemon's task group is not ended."""
    metrics = _Counted()

    def route_of(recipient: str, sender: str) -> str:
        if recipient == "bad@example.com":
            raise RuntimeError("injected")
        return "x"

    hooks = Webhooks(tmp_path, [_settings()], route_of, metrics)
    state = hooks.states["app"]
    send, receive = anyio.create_memory_object_stream[SpoolEvent](10)
    hooks.subscribe(lambda size: receive)  # type: ignore[arg-type, return-value]
    info = EnvelopeInfo(sender="app@example.org", recipients=["bad@example.com"])
    good = EnvelopeInfo(sender="app@example.org", recipients=["ok@example.com"])
    with structlog.testing.capture_logs() as logged:
        async with anyio.create_task_group() as tg:
            await tg.start(hooks.run)
            send.send_nowait(SpoolEvent(utcnow(), EventKind.DELIVERED, "m1", envelope_info=info))
            send.send_nowait(SpoolEvent(utcnow(), EventKind.DELIVERED, "m2", envelope_info=good))
            send.close()
            with anyio.fail_after(10):
                await hooks.written.wait()
            tg.cancel_scope.cancel()
    assert metrics.dropped == {"app": 1} and state.to_dict()["dropped"] == 1
    assert len(state.outbox) == 1
    errors = [e for e in logged if e["event"] == "webhook event dropped: it cannot be made"]
    assert [(e["message"], e["error"]) for e in errors] == [("m1", "RuntimeError: injected")]


def _full_disk_after(monkeypatch: pytest.MonkeyPatch, writes: int) -> None:
    """Each outbox write after the first ``writes`` fails: no space left."""
    import spoold.daemon.webhook_outbox as module

    real, done, lock = module._write_all, [0], threading.Lock()

    def write_all(fd: int, data: bytes) -> None:
        with lock:  # the files of a batch are written by several threads
            done[0] += 1
            failing = done[0] > writes
        if failing:
            raise OSError(28, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(module, "_write_all", write_all)


def test_a_full_disk_keeps_what_was_written_and_leaves_no_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = Outbox(tmp_path / "app", 100)
    outbox.open()
    _full_disk_after(monkeypatch, 2)
    with pytest.raises(OutboxWriteError) as raised:
        outbox.append([b"a", b"b", b"c", b"d"])
    assert raised.value.written == 2 and raised.value.error.errno == 28
    files = sorted(p.name for p in (tmp_path / "app").iterdir())
    assert len(files) == 2 and all(name.endswith(".json") for name in files)  # no .tmp
    assert len(outbox) == 2 and outbox.oldest() == files[0]


async def test_a_full_disk_counts_only_the_events_not_written_and_logs_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = _Counted()
    hooks = Webhooks(tmp_path, [_settings()], lambda recipient, sender: "x", metrics)
    state = hooks.states["app"]
    send, receive = anyio.create_memory_object_stream[SpoolEvent](10)
    hooks.subscribe(lambda size: receive)  # type: ignore[arg-type, return-value]
    with structlog.testing.capture_logs() as logged:
        async with anyio.create_task_group() as tg:
            await tg.start(hooks.run)
            _full_disk_after(monkeypatch, 1)
            for n in range(3):
                send.send_nowait(SpoolEvent(utcnow(), EventKind.DELIVERED, f"m{n}"))
                with anyio.fail_after(10):
                    while sum(metrics.dropped.values()) + len(state.outbox) < n + 1:
                        metrics.changed = anyio.Event()
                        await metrics.changed.wait()
            tg.cancel_scope.cancel()
    assert metrics.dropped == {"app": 2} and state.to_dict()["dropped"] == 2
    errors = [e for e in logged if "cannot be written" in e["event"]]
    assert len(errors) == 1
    assert not list((tmp_path / "webhooks" / "app").glob("*.tmp"))


async def test_the_webhooks_start_before_their_outboxes_are_read(tmp_path: Path) -> None:
    """A large outbox takes seconds to read: the daemon must not wait for
    it (its control socket and listeners start after the webhooks)."""
    hooks = Webhooks(tmp_path, [_settings()], lambda recipient, sender: "x")
    state = hooks.states["app"]
    reading = threading.Event()
    real_open = state.outbox.open

    def slow_open() -> None:
        reading.wait(10)
        real_open()

    state.outbox.open = slow_open  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(5):
            await tg.start(hooks.run)
        assert not state.opened  # started while the outbox is still being read
        reading.set()
        with anyio.fail_after(10):
            while not state.opened:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()


async def test_an_outbox_whose_webhook_is_gone_is_named_at_start(tmp_path: Path) -> None:
    old = tmp_path / "webhooks" / "old"
    old.mkdir(parents=True)
    for n in range(3):
        (old / f"{n:016d}.json").write_bytes(b"{}")
    hooks = Webhooks(tmp_path, [_settings()], lambda recipient, sender: "x")
    with structlog.testing.capture_logs() as logged:
        async with anyio.create_task_group() as tg:
            await tg.start(hooks.run)
            await _until(lambda: any("no longer configured" in e["event"] for e in logged))
            await _until(lambda: hooks.states["app"].opened)
            tg.cancel_scope.cancel()
    warned = [e for e in logged if "no longer configured" in e["event"]]
    assert [(e["webhook"], e["events"]) for e in warned] == [("old", 3)]


def test_the_events_set_aside_are_bounded_and_never_overwritten(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "app", 2)
    outbox.open()
    outbox.append([b"a", b"b"])
    first = outbox.claim()
    assert first is not None
    outbox.set_aside(first)
    outbox.open()  # a restart: the next number is past the one set aside
    outbox.append([b"c"])
    for _ in range(2):
        name = outbox.claim()
        assert name is not None
        outbox.set_aside(name)
    rejected = tmp_path / "app" / "rejected"
    assert sorted(p.read_bytes() for p in rejected.iterdir()) == [b"b", b"c"]
    assert len(outbox) == 0


def test_an_outbox_opens_despite_a_tmp_it_cannot_remove(tmp_path: Path) -> None:
    (tmp_path / "app" / "0000000000000000.json.tmp").mkdir(parents=True)
    (tmp_path / "app" / "0000000000000001.json").write_bytes(b"{}")
    outbox = Outbox(tmp_path / "app", 10)
    outbox.open()
    assert len(outbox) == 1
