"""A webhook's sender against a receiver on 127.0.0.1
(:mod:`tests.webhook_receiver`): several posts in flight while the
endpoint answers, one probe at a time while it fails, the backoff reset
by a success, no redirect followed, and each event posted until one 2xx,
always under its own ``event_id``."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import anyio

from spoold.daemon.webhook_events import DEFAULT_WEBHOOK_KINDS
from spoold.daemon.webhooks import Webhooks, WebhookSettings, WebhookState
from tests.webhook_receiver import WebhookReceiver

_W = TypeVar("_W", bound=Webhooks)


def _settings(url: str, **changes: float) -> WebhookSettings:
    values: dict[str, float] = {
        "timeout": 5.0,
        "backoff": 0.05,
        "max_backoff": 0.05,
        "concurrency": 4,
    }
    values.update(changes)
    return WebhookSettings(
        name="app",
        url=url,
        kinds=frozenset(DEFAULT_WEBHOOK_KINDS),
        routes=frozenset(),
        secret=b"0123456789abcdef0123",
        verify=ssl.create_default_context(),
        timeout=values["timeout"],
        backoff=values["backoff"],
        max_backoff=values["max_backoff"],
        max_outbox=10_000,
        concurrency=int(values["concurrency"]),
    )


def _bodies(count: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"event_id": f"e{n}"}).encode() for n in range(start, start + count)]


async def _until(check: Callable[[], bool], timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.01)


def _hooks(spool: Path, settings: WebhookSettings, kind: type[Webhooks] = Webhooks) -> Webhooks:
    """The webhooks of one endpoint, ``app``, in the spool ``spool``."""
    return kind(spool, [settings], lambda recipient, sender: "x")


@contextlib.asynccontextmanager
async def _serving(receiver: WebhookReceiver) -> AsyncIterator[WebhookReceiver]:
    """The receiver, listening for the block's length."""
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@contextlib.asynccontextmanager
async def _sending(hooks: Webhooks, *, opened: bool = True) -> AsyncIterator[WebhookState]:
    """``app``'s state while its sender runs (once its outbox is read in
    the background, unless ``opened`` is false); stopped at the block's end."""
    state = hooks.states["app"]
    async with anyio.create_task_group() as tg:
        await tg.start(hooks.run)
        if opened:
            await _until(lambda: state.opened)
        yield state
        tg.cancel_scope.cancel()


def _queue(state: WebhookState, bodies: list[bytes]) -> None:
    """Puts events in ``state``'s outbox and wakes its sender."""
    state.outbox.append(bodies)
    state.wake.set()


async def test_a_slow_endpoint_gets_several_posts_at_once(tmp_path: Path) -> None:
    """At 20 ms per answer, one post at a time would manage 50 events a
    second; with ``concurrency = 4`` four are in flight at the receiver."""
    async with (
        _serving(WebhookReceiver(delay=0.02)) as receiver,
        _sending(_hooks(tmp_path, _settings(receiver.url))) as state,
    ):
        _queue(state, _bodies(200))
        await receiver.wait_for(lambda: len(receiver.accepted) >= 200)
        await _until(lambda: len(state.outbox) == 0)
    assert 1 < receiver.max_in_flight <= 4  # several at once, never more than concurrency
    ids = [p.headers["spoold-event-id"] for p in receiver.posts]
    assert sorted(ids) == sorted(f"e{n}" for n in range(200))  # each once
    assert state.posted == 200 and state.up
    assert not list((tmp_path / "webhooks" / "app").glob("*.json"))


async def test_a_failing_endpoint_is_probed_one_post_at_a_time(tmp_path: Path) -> None:
    # The receiver holds each post 50 ms: posts sent at once overlap there,
    # so its count of posts in flight measures the sender.
    async with _serving(WebhookReceiver(status=503, delay=0.05)) as receiver:
        settings = _settings(receiver.url, backoff=0.2, max_backoff=0.2)
        async with _sending(_hooks(tmp_path, settings)) as state:
            _queue(state, _bodies(20))
            await receiver.wait_for(lambda: len(receiver.posts) >= 8)
            assert state.up is False
            receiver.status = 200
            await _until(lambda: len(state.outbox) == 0)
    # The first round may be up to 4 at once; after it, one probe at a time
    # until a 2xx; then several at once again.
    failed = [p for p in receiver.posts if p.status == 503]
    assert max(p.in_flight for p in failed[:4]) > 1  # the measure sees posts at once
    assert max(p.in_flight for p in failed[4:]) == 1
    assert {p.headers["spoold-event-id"] for p in receiver.accepted} == {f"e{n}" for n in range(20)}


class _NotingWebhooks(Webhooks):
    """Webhooks that keep the wait noted at each failure that starts or
    doubles the backoff."""

    waits: list[float]

    def _note_error(self, state: WebhookState, error: str, delay: float) -> None:
        self.waits.append(delay)
        super()._note_error(state, error, delay)


async def test_the_backoff_starts_over_after_a_success(tmp_path: Path) -> None:
    async with _serving(WebhookReceiver(status=500)) as receiver:
        settings = _settings(receiver.url, backoff=0.02, max_backoff=0.16)
        hooks = _hooks(tmp_path, settings, _NotingWebhooks)
        hooks.waits = []
        async with _sending(hooks) as state:
            _queue(state, _bodies(1))
            await _until(lambda: len(hooks.waits) >= 5)
            receiver.status = 200
            await _until(lambda: len(state.outbox) == 0)
            assert state.up
            first_spell = len(hooks.waits)
            receiver.status = 500
            _queue(state, _bodies(1, start=1))
            await _until(lambda: len(hooks.waits) >= first_spell + 2)
    # Doubled up to max_backoff, then from backoff again after the 2xx.
    assert hooks.waits[:5] == [0.02, 0.04, 0.08, 0.16, 0.16]
    assert hooks.waits[first_spell : first_spell + 2] == [0.02, 0.04]


async def test_a_redirect_is_not_followed_and_is_a_failure(tmp_path: Path) -> None:
    async with (
        _serving(WebhookReceiver(status=302)) as receiver,
        _sending(_hooks(tmp_path, _settings(receiver.url))) as state,
    ):
        _queue(state, _bodies(1))
        await receiver.wait_for(lambda: len(receiver.posts) >= 3)
    assert {p.path for p in receiver.posts} == {"/hook"}  # never /elsewhere
    assert state.last_error == "HTTP 302" and state.up is False
    assert state.posted == 0 and len(state.outbox) == 1


async def test_each_event_is_posted_until_a_2xx_under_its_own_id(tmp_path: Path) -> None:
    """The receiver answers 500 to the first post of each event, then
    200: every event arrives accepted exactly once, and a repeat always
    carries the same event_id (and the same body) as the first post."""
    seen: set[bytes] = set()

    def once_500(body: bytes) -> int:
        if body in seen:
            return 200
        seen.add(body)
        return 500

    async with (
        _serving(WebhookReceiver(answer=once_500, delay=0.005)) as receiver,
        _sending(_hooks(tmp_path, _settings(receiver.url))) as state,
    ):
        _queue(state, _bodies(30))
        await _until(lambda: len(state.outbox) == 0)
    accepted = Counter(p.headers["spoold-event-id"] for p in receiver.accepted)
    assert accepted == Counter({f"e{n}": 1 for n in range(30)})
    for post in receiver.posts:
        assert json.loads(post.body)["event_id"] == post.headers["spoold-event-id"]
    tries = Counter(p.headers["spoold-event-id"] for p in receiver.posts)
    assert set(tries.values()) == {2}  # refused once, accepted once


async def test_a_huge_answer_is_cut_and_the_post_counts(tmp_path: Path) -> None:
    """A 2xx whose body says it is 1 GB of gzip: a few KB are read (never
    decompressed), the connection is dropped, the event is posted."""
    import asyncio

    sent = 0

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 1000000000\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            while sent < 100_000_000:
                writer.write(b"\x1f\x8b" + b"\0" * 65534)
                sent += 65536
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(flood, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hooks = _hooks(tmp_path, _settings(f"http://127.0.0.1:{port}/hook"))
    try:
        async with _sending(hooks) as state:
            _queue(state, _bodies(1))
            await _until(lambda: state.posted == 1)
    finally:
        server.close()
    assert state.last_error is None
    assert sent < 50_000_000  # the daemon stopped reading long before the end


async def test_events_that_cannot_be_posted_are_set_aside_and_the_rest_posted(
    tmp_path: Path,
) -> None:
    """A directory with an event's name (cannot be read) and an event
    whose ``event_id`` is not ASCII (cannot be a header) are moved to
    ``rejected/``; the 49 good events behind them all arrive."""
    async with _serving(WebhookReceiver()) as receiver:
        outbox = tmp_path / "webhooks" / "app"
        (outbox / "0000000000000000.json").mkdir(parents=True)
        (outbox / "0000000000000001.json").write_bytes(json.dumps({"event_id": "é"}).encode())
        async with _sending(_hooks(tmp_path, _settings(receiver.url))) as state:
            _queue(state, _bodies(49))
            await receiver.wait_for(lambda: len(receiver.accepted) >= 49)
            await _until(lambda: len(state.outbox) == 0)
    assert {p.headers["spoold-event-id"] for p in receiver.accepted} == {f"e{n}" for n in range(49)}
    assert sorted(p.name for p in (outbox / "rejected").iterdir()) == [
        "0000000000000000.json",
        "0000000000000001.json",
    ]
    assert state.outbox.rejected == 2 and state.to_dict()["rejected"] == 2
    assert state.up


class _BrokenRemover(Webhooks):
    """Webhooks whose remover fails: the sender's task group ends."""

    async def _remove_posted(self, state: WebhookState) -> None:
        raise OSError("the disk is gone")


async def test_a_sender_that_fails_shows_down_with_its_error(tmp_path: Path) -> None:
    """Whatever ends the posting shows in the status while it lasts: down,
    with the error itself, not the task group that wrapped it."""
    async with _serving(WebhookReceiver()) as receiver:
        hooks = _hooks(tmp_path, _settings(receiver.url), _BrokenRemover)
        async with _sending(hooks, opened=False) as state:
            await _until(lambda: state.failures >= 1)
    assert state.up is False
    assert state.last_error == "OSError: the disk is gone"


async def test_an_event_the_endpoint_refuses_is_set_aside_and_the_rest_posted(
    tmp_path: Path,
) -> None:
    """A 400 for one event sets it aside at once (it would hold up the
    others); a 429, 408, 401 or 404 says "later" or "the endpoint is not
    ready": that event is tried again."""
    later: Counter[str] = Counter()

    def answer(body: bytes) -> int:
        event_id = json.loads(body)["event_id"]
        if event_id == "e0":
            return 400
        if event_id in ("e1", "e2", "e3", "e4") and later[event_id] == 0:
            later[event_id] += 1
            return {"e1": 429, "e2": 408, "e3": 401, "e4": 404}[event_id]
        return 200

    async with _serving(WebhookReceiver(answer=answer)) as receiver:
        settings = _settings(receiver.url, backoff=0.05, max_backoff=0.4)
        async with _sending(_hooks(tmp_path, settings)) as state:
            _queue(state, _bodies(200))
            await receiver.wait_for(lambda: len(receiver.accepted) >= 199)
            await _until(lambda: len(state.outbox) == 0)
    tries = Counter(p.headers["spoold-event-id"] for p in receiver.posts)
    assert tries["e0"] == 1
    assert tries["e1"] == tries["e2"] == tries["e3"] == tries["e4"] == 2
    assert {p.headers["spoold-event-id"] for p in receiver.accepted} == {
        f"e{n}" for n in range(1, 200)
    }
    assert [p.name for p in (tmp_path / "webhooks" / "app" / "rejected").iterdir()] == [
        "0000000000000000.json"
    ]
    assert state.outbox.rejected == 1
