"""Delivery events pushed to applications: ``[webhooks.NAME]``.

What it owns: one subscription to the spool's events, one durable
:class:`~spoold.daemon.webhook_outbox.Outbox` per webhook, and per webhook
a sender task with ``concurrency`` posters (each with its own HTTP
connection) and one remover of posted events, all in the task group of
:meth:`Webhooks.run`.

The path of an event:

1. The spool publishes an event (delivery never waits for any of this:
   publishing only appends to the subscription's buffer).
2. The collector maps it to a webhook event (:func:`webhook_kind`), keeps
   it for every webhook whose ``events`` and ``routes`` take it, and hands
   it to the writer. The writer writes what gathered meanwhile to the
   outboxes in one thread hop per batch. Both buffers are bounded: a
   subscription that overflows, or a writer that falls more than
   ``max_outbox`` events behind, loses the oldest events, counted and
   logged (``webhook events dropped``).
3. Each webhook's sender posts its outbox's events, oldest first, up to
   ``concurrency`` at once (so the order in which they arrive is not
   strictly oldest first), each with a timestamp and an HMAC-SHA256
   signature (:func:`signature_headers`). Those answered 2xx are removed
   from the outbox in batches (one directory sync each). Any other
   answer, a timeout or a connection error gives the event back and
   starts a backoff: while the endpoint fails, one event at a time is
   tried (a probe), after a wait that doubles from ``backoff`` up to
   ``max_backoff``; the first 2xx ends the spell and resets the wait.
   An event that cannot be posted at all (its file cannot be read, it is
   not an event spoold wrote, its request cannot be made, the endpoint
   refuses that event: 400, 413, 415 or 422) is set aside
   (:meth:`Outbox.set_aside <spoold.daemon.webhook_outbox.Outbox.set_aside>`),
   logged and counted, and the others go on.

So delivery to the endpoint is at least once for every event in an outbox:
an event is posted again after any post whose 2xx was not seen (a timeout,
a lost connection, another answer, a stop or crash during the post or
between the 2xx and the removal), even if the endpoint acted on it; its
``event_id`` stays the same, the key an endpoint deduplicates on. One
published in the instant before a crash, before its batch was written, is
lost (the event stream is not itself durable).

What is posted, the body, its id and signature: :mod:`spoold.daemon.webhook_events`.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
import structlog

from spoold.daemon.webhook_events import (
    WebhookKind,
    event_body,
    event_id_of,
    event_time,
    signature_headers,
    webhook_kind,
)
from spoold.daemon.webhook_outbox import OUTBOX_DIR, Outbox, OutboxWriteError
from spoold.errors import SpooldError
from spoold.events import (
    EventKind,
    SpoolEvent,
    Subscription,
)
from spoold.times import utcnow

__all__ = [
    "WebhookSettings",
    "WebhookState",
    "WebhookMetrics",
    "Webhooks",
]

if TYPE_CHECKING:
    import httpx

log = structlog.get_logger("spoold.webhooks")

_SUBSCRIPTION_BUFFER = 100_000
_MAX_ANSWER = 16 * 1024  # bytes of an answer's body read (and dropped), at most


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """One webhook as the daemon runs it (from ``[webhooks.NAME]``)."""

    name: str
    url: str
    kinds: frozenset[WebhookKind]
    routes: frozenset[str]  # empty: every route
    secret: bytes
    verify: ssl.SSLContext  # the endpoint's certificate is checked against it
    timeout: float
    backoff: float
    max_backoff: float
    max_outbox: int
    concurrency: int  # posts in flight at once while the endpoint answers


@dataclass(slots=True)
class WebhookState:
    """What ``spoold status --webhooks`` shows of one webhook."""

    name: str
    url: str
    outbox: Outbox
    up: bool = True
    behind: int = 0  # events dropped before the outbox (the writer was behind)
    posted: int = 0
    failures: int = 0
    last_success: datetime | None = None
    last_error: str | None = None
    last_error_time: datetime | None = None
    next_retry: datetime | None = None
    dropping: bool = False  # events are being dropped before the outbox (logged once)
    write_failing: bool = False  # the outbox cannot be written (logged once)
    opened: bool = False  # the outbox could be opened (retried by the sender until it is)
    open_tried: bool = False  # the first try to open the outbox is over
    delay: float = 0.0  # the backoff after the next failure (reset by a success)
    retry_at: float = 0.0  # anyio.current_time() of the next probe while down
    wake: anyio.Event = field(default_factory=anyio.Event)  # an event to post, or given back
    to_remove: list[str] = field(default_factory=list)  # posted, removal not yet under way
    removal_ready: anyio.Event = field(default_factory=anyio.Event)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": _shown_url(self.url),
            "outbox": len(self.outbox),
            "dropped": self.outbox.dropped + self.behind,
            "rejected": self.outbox.rejected,
            "up": self.up,
            "posted": self.posted,
            "failures": self.failures,
            "last_success": event_time(self.last_success),
            "last_error": self.last_error,
            "last_error_time": event_time(self.last_error_time),
            "next_retry": event_time(self.next_retry),
        }


class WebhookMetrics(Protocol):
    """Where the webhooks report (:class:`spoold.daemon.metrics.Metrics`)."""

    def webhook_started(self, name: str, waiting: int) -> None: ...
    def webhook_posted(self, name: str, waiting: int) -> None: ...
    def webhook_failed(self, name: str, waiting: int) -> None: ...
    def webhook_queued(self, name: str, waiting: int, dropped: int) -> None: ...
    def webhook_rejected(self, name: str, waiting: int) -> None: ...


class Webhooks:
    """The webhooks of one daemon run (module docstring). Make it, then
    :meth:`subscribe` before the spool can publish the events wanted (in
    ``Spool.open``'s ``before_start``, before any attempt), then run
    :meth:`run` in the daemon's task group until cancelled."""

    def __init__(
        self,
        spool_dir: Path,
        settings: Sequence[WebhookSettings],
        route_of: Callable[[str, str], str],
        metrics: WebhookMetrics | None = None,
    ) -> None:
        self.settings = {s.name: s for s in settings}
        self._outboxes = spool_dir / OUTBOX_DIR
        self._route_of = route_of
        self._metrics = metrics
        self.states = {
            s.name: WebhookState(
                s.name,
                s.url,
                Outbox(spool_dir / OUTBOX_DIR / s.name, s.max_outbox),
                delay=s.backoff,
            )
            for s in settings
        }
        self._pending: dict[str, list[bytes]] = {name: [] for name in self.states}
        self._pending_ready = anyio.Event()
        self._subscription: Subscription | None = None
        self._collecting = True
        self.written = anyio.Event()  # set once the last events collected are in the outboxes

    def subscribe(self, subscribe: Callable[[int], Subscription]) -> None:
        self._subscription = subscribe(_SUBSCRIPTION_BUFFER)

    def use_secrets(self, secrets: dict[str, bytes]) -> None:
        """Sign the next posts of the webhooks named with their new secret
        (a secret file rotated, seen at a reload); each change is logged."""
        for name, secret in secrets.items():
            settings = self.settings.get(name)
            if settings is not None and settings.secret != secret:
                self.settings[name] = dataclasses.replace(settings, secret=secret)
                log.info("webhook secret changed; the next posts are signed with it", webhook=name)

    def status(self) -> list[dict[str, Any]]:
        return [state.to_dict() for state in self.states.values()]

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Collect, write and post until cancelled; started at once: each
        webhook's sender opens (reads) its outbox in a worker thread, the
        events collected meanwhile wait for it, so a large outbox does not
        hold up the daemon's start. When the spool closes (its subscription
        ends), the events collected are written and :attr:`written` is set;
        the senders go on posting until the caller cancels them."""
        async with anyio.create_task_group() as tg:
            if self._subscription is not None:
                tg.start_soon(self._collect, self._subscription)
            else:
                self._collecting = False
            tg.start_soon(self._write)
            tg.start_soon(self._warn_orphans)
            for name, state in self.states.items():
                if self._metrics is not None:
                    self._metrics.webhook_started(name, len(state.outbox))
                tg.start_soon(self._send, self.settings[name], state)
            task_status.started()

    async def _warn_orphans(self) -> None:
        """Warn once of each outbox whose webhook is no longer configured
        (removed or renamed): its events are never posted."""
        try:
            orphans = await anyio.to_thread.run_sync(self._orphans)
        except OSError as exc:
            log.warning("webhook outboxes cannot be listed", error=_describe(exc))
            return
        for name, events in orphans:
            log.warning(
                "webhook outbox of a webhook no longer configured; its events are not posted",
                webhook=name,
                path=str(self._outboxes / name),
                events=events,
            )

    def _orphans(self) -> list[tuple[str, int]]:
        """The outbox directories without a webhook, with their events."""
        if not self._outboxes.is_dir():
            return []
        found = []
        for entry in sorted(os.scandir(self._outboxes), key=lambda e: e.name):
            if entry.is_dir() and entry.name not in self.settings:
                events = sum(1 for e in os.scandir(entry.path) if e.name.endswith(".json"))
                found.append((entry.name, events))
        return found

    # ------------------------------------------------------------ collecting

    async def _collect(self, subscription: Subscription) -> None:
        async with subscription:
            async for event in subscription:
                if event.kind is EventKind.OVERFLOW:
                    self._overflowed(int(event.detail or 0))
                    continue
                try:
                    self._take(event)
                except Exception as exc:  # noqa: BLE001 (an event never ends the daemon)
                    self._untaken(event, exc)
        self._collecting = False
        self._pending_ready.set()

    def _overflowed(self, missed: int) -> None:
        """The subscription lost ``missed`` stream events (the collector
        fell 100 000 behind). Which webhooks wanted them is unknown: each
        counts them all as dropped (an upper bound)."""
        log.warning(
            "webhook events dropped: the event subscription overflowed",
            missed=missed,
        )
        for name, state in self.states.items():
            state.behind += missed
            if self._metrics is not None:
                self._metrics.webhook_queued(name, len(state.outbox), missed)

    def _untaken(self, event: SpoolEvent, exc: Exception) -> None:
        """``event`` could not be made into webhook events (a bug, or a
        value the body cannot carry): logged, and counted as dropped by
        each webhook that takes its kind (or every one, if even its kind
        is unknown)."""
        log.error(
            "webhook event dropped: it cannot be made",
            message=event.id,
            kind=str(event.kind),
            error=_describe(exc),
        )
        try:
            kind = webhook_kind(event)
        except Exception:  # noqa: BLE001 (counted for every webhook then)
            kind = None
        for name, settings in self.settings.items():
            if kind is None or kind in settings.kinds:
                state = self.states[name]
                state.behind += 1
                if self._metrics is not None:
                    self._metrics.webhook_queued(name, len(state.outbox), 1)

    def _take(self, event: SpoolEvent) -> None:
        kind = webhook_kind(event)
        if kind is None:
            return
        routes = self._routes(event)
        for name, settings in self.settings.items():
            if kind not in settings.kinds:
                continue
            if settings.routes and not settings.routes.intersection(routes):
                continue
            event_id = f"{event.id or '-'}.{time.time_ns():x}.{name}"
            pending = self._pending[name]
            pending.append(event_body(event, kind, name, event_id, routes))
            if len(pending) > settings.max_outbox:
                del pending[0]
                state = self.states[name]
                state.behind += 1
                if not state.dropping:  # once per spell, not once per event
                    state.dropping = True
                    log.warning(
                        "webhook events dropped: the writer is behind (counted in dropped)",
                        webhook=name,
                    )
                if self._metrics is not None:
                    self._metrics.webhook_queued(name, len(self.states[name].outbox), 1)
        self._pending_ready.set()

    def _routes(self, event: SpoolEvent) -> list[str]:
        info = event.envelope_info
        if info is None:
            return []
        routes = set()
        for recipient in info.recipients:
            try:
                routes.add(self._route_of(recipient, info.sender))
            except SpooldError:
                continue  # no route for it now (a reload took it away)
        return sorted(routes)

    async def _write(self) -> None:
        while True:
            if not self._collecting and not any(
                bodies
                for name, bodies in self._pending.items()
                if self.states[name].opened or not self.states[name].open_tried
            ):
                self.written.set()
                return
            await self._pending_ready.wait()
            self._pending_ready = anyio.Event()
            batches = {
                name: bodies
                for name, bodies in self._pending.items()
                if bodies and self.states[name].opened
            }
            for name in batches:
                self._pending[name] = []
            async with anyio.create_task_group() as tg:  # the webhooks' outboxes at once
                for name, bodies in batches.items():
                    tg.start_soon(self._write_batch, self.states[name], bodies)

    async def _write_batch(self, state: WebhookState, bodies: list[bytes]) -> None:
        name = state.name
        try:
            dropped = await anyio.to_thread.run_sync(state.outbox.append, bodies)
        except Exception as exc:  # noqa: BLE001 (never the end of the daemon)
            self._not_written(state, len(bodies), exc)
            return
        if state.write_failing:
            state.write_failing = False
            log.info("webhook outbox written again", webhook=name)
        state.dropping = False
        if dropped:
            log.warning(
                "webhook events dropped: the outbox is full",
                webhook=name,
                dropped=dropped,
                max_outbox=state.outbox.max_events,
            )
        if self._metrics is not None:
            self._metrics.webhook_queued(name, len(state.outbox), dropped)
        state.wake.set()

    def _not_written(self, state: WebhookState, events: int, exc: Exception) -> None:
        """A batch of ``events`` could not all be written: those that could
        are posted as usual, the others are counted as dropped; logged once
        per spell of errors."""
        written, dropped = 0, 0
        if isinstance(exc, OutboxWriteError):
            written, dropped, error = exc.written, exc.dropped, _describe(exc.error)
        else:
            error = _describe(exc)
        lost = events - written
        if not state.write_failing:  # once per spell, not once per batch
            state.write_failing = True
            log.error(
                "webhook events dropped: the outbox cannot be written",
                webhook=state.name,
                events=lost,
                error=error,
            )
        state.behind += lost
        if self._metrics is not None:
            self._metrics.webhook_queued(state.name, len(state.outbox), lost + dropped)
        if written:
            state.wake.set()

    # ------------------------------------------------------------ posting

    async def _open(self, state: WebhookState) -> None:
        """Open ``state``'s outbox; an error is logged and kept in the
        state (the sender tries again after its backoff)."""
        try:
            await anyio.to_thread.run_sync(state.outbox.open)
        except Exception as exc:  # noqa: BLE001 (logged; the sender retries)
            state.open_tried = True
            self._pending_ready.set()  # the writer does not wait for it (at the end)
            self._note_error(state, f"outbox: {_describe(exc)}", 0.0)
            state.up = False
            log.error("webhook outbox cannot be opened", webhook=state.name, error=_describe(exc))
            return
        state.opened = state.open_tried = True
        self._pending_ready.set()  # events collected meanwhile can be written now
        if self._metrics is not None:
            self._metrics.webhook_queued(state.name, len(state.outbox), 0)
        if len(state.outbox):
            log.info("webhook outbox re-read", webhook=state.name, events=len(state.outbox))

    def _note_error(self, state: WebhookState, error: str, delay: float) -> None:
        state.failures += 1
        state.last_error = error
        state.last_error_time = utcnow()
        state.next_retry = datetime.fromtimestamp(
            state.last_error_time.timestamp() + delay, state.last_error_time.tzinfo
        )

    async def _send(self, settings: WebhookSettings, state: WebhookState) -> None:
        """Post ``state``'s outbox until cancelled. Whatever goes wrong
        (the outbox's files, the endpoint, a bug) is logged and tried
        again after the backoff: a webhook never ends the daemon."""
        while True:
            try:
                if not state.opened:
                    await self._open(state)
                if state.opened:
                    state.outbox.unclaim_all()  # a new start: every event waiting is posted
                    await self._post_all(settings, state)
            except Exception as exc:  # noqa: BLE001 (a webhook never ends the daemon)
                self._note_error(state, _describe(exc), state.delay)
                state.up = False  # status shows the failure, with its error
                log.error(
                    "webhook sender failed; tried again", webhook=state.name, error=_describe(exc)
                )
                if self._metrics is not None:
                    self._metrics.webhook_failed(state.name, len(state.outbox))
            await anyio.sleep(state.delay)
            state.delay = min(state.delay * 2, settings.max_backoff)

    async def _post_all(self, settings: WebhookSettings, state: WebhookState) -> None:
        """Post the outbox with ``concurrency`` posters, each on its own
        connection: all of them post while the endpoint answers; while it
        fails, one at a time after each backoff (a probe), so a failing
        endpoint is not hammered."""
        probe = anyio.Lock()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._remove_posted, state)
            for _ in range(settings.concurrency):
                tg.start_soon(self._poster, settings, state, probe)

    async def _poster(
        self, settings: WebhookSettings, state: WebhookState, probe: anyio.Lock
    ) -> None:
        """One of a webhook's posters. Each has its own client of one
        connection: a shared pool checks every connection at every request,
        which costs more than the post itself at 16 connections."""
        # Imported here, not at the top: the config (read by every CLI
        # command) imports this module, and a client-only install has no httpx.
        import httpx

        async with httpx.AsyncClient(
            verify=settings.verify,
            timeout=settings.timeout,
            follow_redirects=False,
            trust_env=False,  # no proxy or certificates from the environment
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        ) as client:
            while True:
                if state.up:
                    name = await self._claim(state)
                    if state.up:
                        await self._post_one(client, settings, state, name, probe=False)
                        continue
                    state.outbox.unclaim(name)  # a post failed meanwhile: probes from now on
                    state.wake.set()
                async with probe:  # failing: one post at a time, after the backoff
                    if state.up:
                        continue  # a post under way succeeded meanwhile
                    await anyio.sleep_until(state.retry_at)
                    name = await self._claim(state)
                    await self._post_one(client, settings, state, name, probe=True)

    async def _claim(self, state: WebhookState) -> str:
        """The oldest event of the outbox not being posted (waits for one).
        The posters share one :attr:`WebhookState.wake`: it is replaced
        only once set, so no waiter is left on an event nobody sets."""
        while True:
            name = state.outbox.claim()
            if name is not None:
                return name
            if state.wake.is_set():
                state.wake = anyio.Event()
                continue
            await state.wake.wait()

    async def _post_one(
        self,
        client: httpx.AsyncClient,
        settings: WebhookSettings,
        state: WebhookState,
        name: str,
        *,
        probe: bool,
    ) -> None:
        """Post the claimed event ``name``. A 2xx queues its removal; an
        event that cannot be posted, or that the endpoint refuses for good
        (:func:`_refused`), is set aside; any other failure gives it back
        to the outbox and, when it is the first of a spell or a probe's,
        starts (or doubles) the backoff."""
        try:
            body = await anyio.to_thread.run_sync(state.outbox.read, name)
        except OSError as exc:  # a directory, a file we may not read, a disk error
            await self._set_aside(state, name, f"cannot be read: {_describe(exc)}")
            return
        if body is None:
            return  # dropped from a full outbox meanwhile, or deleted by hand: forgotten
        event_id = event_id_of(body)
        if event_id is None:  # a damaged file: never ours to post
            await self._set_aside(state, name, "not an event spoold wrote")
            return
        try:
            status, error = await self._post(client, settings, body, event_id)
        except Exception as exc:  # noqa: BLE001 (this event's request cannot be made)
            await self._set_aside(state, name, f"cannot be posted: {_describe(exc)}")
            return
        if status is not None and _refused(status):
            # The endpoint answers but will never take this event: it must
            # not hold up the others.
            await self._set_aside(state, name, f"refused by the endpoint: {error}")
            return
        if error is None:
            self._posted(state, name)
            state.posted += 1
            state.last_success = utcnow()
            state.next_retry = None
            if not state.up:
                log.info("webhook endpoint answers again", webhook=state.name)
            state.up = True
            state.delay = settings.backoff  # the next spell of failures starts over
            if self._metrics is not None:
                self._metrics.webhook_posted(state.name, len(state.outbox))
            return
        state.outbox.unclaim(name)  # the oldest again: posted first once the endpoint is back
        state.wake.set()
        if state.up or probe:
            # A post started before the spell began fails too: it does not
            # double the backoff (one failure per probe does).
            self._note_error(state, error, state.delay)
            state.retry_at = anyio.current_time() + state.delay
            state.delay = min(state.delay * 2, settings.max_backoff)
        else:
            state.failures += 1
        if state.up:
            log.warning(
                "webhook endpoint failing; events wait in its outbox",
                webhook=state.name,
                error=error,
            )
        state.up = False
        if self._metrics is not None:
            self._metrics.webhook_failed(state.name, len(state.outbox))

    async def _set_aside(self, state: WebhookState, name: str, reason: str) -> None:
        """Move event ``name``, which cannot be posted, out of the way
        (``rejected/``), logged with ``reason`` and counted."""
        await anyio.to_thread.run_sync(state.outbox.set_aside, name)
        log.error(
            "webhook event set aside in rejected/",
            webhook=state.name,
            path=str(state.outbox.directory / name),
            reason=reason,
        )
        if self._metrics is not None:
            self._metrics.webhook_rejected(state.name, len(state.outbox))

    def _posted(self, state: WebhookState, name: str) -> None:
        """Queue the removal of event ``name`` (done in batches)."""
        state.to_remove.append(name)
        state.removal_ready.set()

    async def _remove_posted(self, state: WebhookState) -> None:
        """Remove the events posted, all those posted meanwhile at once
        (one directory sync per batch)."""
        while True:
            await state.removal_ready.wait()
            state.removal_ready = anyio.Event()
            names, state.to_remove = state.to_remove, []
            if names:
                await anyio.to_thread.run_sync(state.outbox.remove, names)

    async def _post(
        self, client: httpx.AsyncClient, settings: WebhookSettings, body: bytes, event_id: str
    ) -> tuple[int | None, str | None]:
        """Post one event: the status of the answer (None without one) and
        None on a 2xx, else what went wrong. The whole
        post, answer included, has ``timeout`` (an endpoint that trickles
        its answer cannot hold the sender); of the answer only the status
        is used. Up to ``_MAX_ANSWER`` bytes of its body are read as they
        come (never decompressed) and dropped, which lets a keep-alive
        connection carry the next post; a longer body closes it."""
        import httpx

        secret = self.settings[settings.name].secret  # a reload may have rotated it
        headers = signature_headers(secret, body, event_id, time.time())
        try:
            with anyio.fail_after(settings.timeout):
                async with client.stream(
                    "POST", settings.url, content=body, headers=headers
                ) as response:
                    status = response.status_code
                    # A short answer is read to its end, undecoded, so that the
                    # connection serves the next post; a long one is cut.
                    seen = 0
                    async for chunk in response.aiter_raw():
                        seen += len(chunk)
                        if seen > _MAX_ANSWER:
                            break
        except TimeoutError:
            return None, f"no answer within {settings.timeout:g} s"
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            return None, _describe(exc)
        if 200 <= status < 300:
            return status, None
        return status, f"HTTP {status}"


# The answers that refuse one event for good: it is the event the endpoint
# cannot take (bad request, too large, unsupported type, unprocessable).
# Every other 4xx is about the endpoint or its set-up (401/403: a wrong
# secret or token, 404/405/410: a wrong URL, 408, 429: later): retried, so
# a mistake in the config moves no event aside.
_REFUSED_FOR_GOOD = frozenset({400, 413, 415, 422})


def _refused(status: int) -> bool:
    """Whether an answer refuses the event for good (400, 413, 415, 422)."""
    return status in _REFUSED_FOR_GOOD


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]  # the error itself, not its task group's wrapper
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _shown_url(url: str) -> str:
    """``url`` as status shows it: a query (often a token) hidden."""
    base, sep, _query = url.partition("?")
    return base + "?..." if sep else base
