"""The spool applying the delivery policy: queue lifetime and delay warning
under the fake clock, bounces (also end to end, to a real SMTP server on
127.0.0.1), null senders never bounced, and the retry plan compared with
what then happens."""

from __future__ import annotations

import email
import email.policy
import random
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import anyio
import pytest

from spoold.body import Body
from spoold.connection_cache import RouteSettings
from spoold.message import (
    Message,
    RetryInterval,
    RoutedBatch,
    RoutedEnvelope,
    SendAt,
    Sending,
    SendNow,
)
from spoold.outcome import DeliveryPolicy, OnPermanentFailure, RetriesExhausted, RetryPlan
from spoold.relay import RecipientResult
from spoold.smtp_relay import SmtpRelay
from spoold.spool import Spool
from spoold.testing import FakeClock, InMemoryRelay
from spoold.waiting import OutcomeKind
from tests.smtp_server import Reply, SmtpTestServer
from tests.spool_helpers import (
    BODY,
    MINUTE,
    NEXT_HOP,
    NO_SUCH_USER,
    OK,
    SENDER,
    START,
    TRY_LATER,
    attempts_for,
    batch,
    intervals,
    open_spool,
    places,
    read_record,
    status_of,
)
from tests.support import WAIT_TIMEOUT, wait_until

RCPT = "rcpt@example.com"
BOUNCE = OnPermanentFailure.BOUNCE


def parse(wire: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(Body.from_wire(wire).content(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def recipient_fields(report: EmailMessage) -> list[dict[str, str]]:
    _human, status, _headers = report.iter_parts()
    _per_message, *per_recipient = status.get_payload()
    return [dict(block) for block in per_recipient]


def notices_for(relay: InMemoryRelay, sender: str = SENDER) -> list[EmailMessage]:
    """The notifications the relay delivered to ``sender``."""
    return [parse(wire) for _mid, rcpt, wire in relay.delivered if rcpt == sender]


def timed_relay(
    clock: FakeClock, answers: dict[str, RecipientResult]
) -> tuple[InMemoryRelay, list[tuple[str, datetime]]]:
    """A relay answering from ``answers`` (250 otherwise) that notes when,
    on the spool's clock, each message was tried."""
    seen: list[tuple[str, datetime]] = []

    def respond(msg: Message, rcpt: str) -> RecipientResult:
        seen.append((msg.id, clock.now()))
        return answers.get(rcpt, OK)

    return InMemoryRelay(respond=respond), seen


async def tried(seen: list[tuple[str, datetime]], mid: str, count: int) -> None:
    await wait_until(lambda: sum(1 for m, _ in seen if m == mid) >= count, f"attempt {count}")


def waiting_or_done(spool: Spool, clock: FakeClock, mid: str) -> bool:
    """The attempt has ended: ``mid`` waits for a later time, or has left
    ``active``. (A message the scheduler has taken but not yet begun may
    still show its ``send_at``, whose time has come.)"""
    status = status_of(spool, mid)
    if isinstance(status, SendAt):
        return status.at > clock.now()
    return not isinstance(status, SendNow | Sending)


async def follow_retries(spool: Spool, clock: FakeClock, mid: str) -> None:
    """Move the clock to each retry of ``mid`` until it leaves ``active``.
    Reads the spool's memory only (it changes after the disk does)."""
    for _ in range(50):  # bounded: a plan has a handful of attempts
        await wait_until(lambda: waiting_or_done(spool, clock, mid), "the attempt to end")
        status = status_of(spool, mid)
        if not isinstance(status, SendAt):
            return
        clock.advance(status.at - clock.now())
    raise AssertionError("more retries than any plan has")


# ---------------------------------------------------------------- lifetime


async def test_past_the_lifetime_the_recipients_fail_with_4_4_7_and_freeze(
    tmp_path: Path,
) -> None:
    clock = FakeClock(START)
    relay, seen = timed_relay(clock, {RCPT: TRY_LATER})
    policy = DeliveryPolicy(max_queue_lifetime=10 * MINUTE)
    async with open_spool(tmp_path, relay, clock, delivery_policy=policy) as spool:
        (mid,) = await spool.add(batch(RCPT, retry_intervals=intervals(1, 5, 15)))
        await follow_retries(spool, clock, mid)

        # 0, 1m, 6m, then the 15m retry is brought forward to the lifetime's end
        assert [t for m, t in seen if m == mid] == [START + m * MINUTE for m in (0, 1, 6, 10)]
        assert places(tmp_path, mid) == ["frozen"]
        record = read_record(tmp_path, "frozen", mid)
        assert record.remaining_recipients == []
        assert record.failed_recipients == [RCPT]
        assert record.relay_attempts[0].time == START + 10 * MINUTE
        assert record.relay_attempts[0].error.endswith(
            "; 4.4.7 expired: not delivered within the queue lifetime (10m) via memory"
        )
        assert notices_for(relay) == []  # freeze: nobody is told


async def test_a_route_lifetime_overrides_the_spools(tmp_path: Path) -> None:
    clock = FakeClock(START)
    relay, seen = timed_relay(clock, {RCPT: TRY_LATER})
    policy = DeliveryPolicy(max_queue_lifetime=timedelta(days=5))
    routed = RoutedBatch(
        [RoutedEnvelope(SENDER, [RCPT], [NEXT_HOP], intervals(5, 5), route="slow")], BODY
    )
    async with open_spool(
        tmp_path, relay, clock, delivery_policy=policy, route_lifetimes={"slow": 3 * MINUTE}
    ) as spool:
        (mid,) = await spool.add(routed)
        assert spool.retry_plan(mid).expiry == START + 3 * MINUTE
        await follow_retries(spool, clock, mid)
        assert [t for m, t in seen if m == mid] == [START, START + 3 * MINUTE]
        assert places(tmp_path, mid) == ["frozen"]


async def test_by_default_the_last_interval_repeats_and_a_route_may_freeze(
    tmp_path: Path,
) -> None:
    clock = FakeClock(START)
    relay, seen = timed_relay(clock, {RCPT: TRY_LATER})
    policy = DeliveryPolicy(max_queue_lifetime=20 * MINUTE)
    repeating = RoutedEnvelope(SENDER, [RCPT], [NEXT_HOP], intervals(1, 5), route="main")
    freezing = RoutedEnvelope(SENDER, [RCPT], [NEXT_HOP], intervals(1, 5), route="strict")
    async with open_spool(
        tmp_path,
        relay,
        clock,
        delivery_policy=policy,
        route_retries_exhausted={"strict": RetriesExhausted.FREEZE},
    ) as spool:
        (kept,) = await spool.add(RoutedBatch([repeating], BODY))
        await follow_retries(spool, clock, kept)
        # 0, 1m, 6m, then every 5m until the lifetime ends at 20m
        assert [t for m, t in seen if m == kept] == [
            START + m * MINUTE for m in (0, 1, 6, 11, 16, 20)
        ]
        record = read_record(tmp_path, "frozen", kept)
        assert record.failed_recipients == [RCPT]  # expired (4.4.7), not out of intervals
        assert "4.4.7 expired" in record.relay_attempts[0].error

        start = clock.now()
        (frozen,) = await spool.add(RoutedBatch([freezing], BODY))
        await follow_retries(spool, clock, frozen)
        # the route's own rule: frozen when the intervals are used up
        assert [t - start for m, t in seen if m == frozen] == [m * MINUTE for m in (0, 1, 6)]
        record = read_record(tmp_path, "frozen", frozen)
        assert record.remaining_recipients == [RCPT]
        assert record.failed_recipients == []


# ----------------------------------------------------------------- bounces


async def test_a_bounce_is_spooled_to_the_sender_and_the_message_removed(
    tmp_path: Path,
) -> None:
    clock = FakeClock(START)
    relay, _seen = timed_relay(clock, {RCPT: NO_SUCH_USER})
    policy = DeliveryPolicy(on_permanent_failure=BOUNCE)
    async with (
        open_spool(
            tmp_path, relay, clock, delivery_policy=policy, reporting_mta="mta.test"
        ) as spool,
        spool.events() as stream,
    ):
        (mid,) = await spool.add(batch(RCPT))
        await wait_until(lambda: places(tmp_path, mid) == ["removed"], "removed")
        await wait_until(lambda: len(notices_for(relay)) == 1, "the bounce delivered")
        kinds_seen: list[tuple[str, str | None, str | None]] = []
        with anyio.fail_after(WAIT_TIMEOUT):
            while not kinds_seen or kinds_seen[-1][:2] != ("removed", mid):
                event = await anext(stream)
                kinds_seen.append((event.kind.value, event.id, event.detail))

    original = read_record(tmp_path, "removed", mid)
    assert original.failed_recipients == [RCPT]
    (dsn_id,) = original.related_ids
    assert ("spooled", dsn_id, None) in kinds_seen  # before the original is removed
    assert kinds_seen[-1] == ("removed", mid, "bounced")
    (delivered,) = [(m, r) for m, r, _ in relay.delivered]
    assert delivered == (dsn_id, SENDER)
    (report,) = notices_for(relay)
    assert report["To"] == SENDER
    assert recipient_fields(report) == [
        {
            "Final-Recipient": f"rfc822; {RCPT}",
            "Action": "failed",
            "Status": "5.1.1",
            "Remote-MTA": "dns; memory",
            "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
            "Last-Attempt-Date": report["Date"],
        }
    ]
    assert attempts_for(relay, dsn_id) == [(SENDER,)]


async def test_wait_reports_a_bounced_message_as_bounced(tmp_path: Path) -> None:
    clock = FakeClock(START)
    relay, _seen = timed_relay(clock, {RCPT: NO_SUCH_USER})
    policy = DeliveryPolicy(on_permanent_failure=BOUNCE)
    async with open_spool(tmp_path, relay, clock, delivery_policy=policy) as spool:
        (mid,) = await spool.add(batch(RCPT))
        outcome = await spool.wait(mid, timeout=WAIT_TIMEOUT)
    assert outcome.kind is OutcomeKind.BOUNCED
    assert outcome.failed_recipients == (RCPT,)
    # After a restart the history journal says the same.
    async with open_spool(tmp_path, InMemoryRelay(), clock, delivery_policy=policy) as spool:
        again = await spool.wait(mid, timeout=0)
    assert (again.kind, again.failed_recipients) == (OutcomeKind.BOUNCED, (RCPT,))


async def test_a_null_sender_message_is_never_bounced(tmp_path: Path) -> None:
    clock = FakeClock(START)
    relay, seen = timed_relay(clock, {RCPT: NO_SUCH_USER})
    policy = DeliveryPolicy(
        max_queue_lifetime=10 * MINUTE, on_permanent_failure=BOUNCE, delay_warning=MINUTE
    )
    null = RoutedBatch([RoutedEnvelope("", [RCPT], [NEXT_HOP], intervals(1, 5))], BODY)
    async with open_spool(tmp_path, relay, clock, delivery_policy=policy) as spool:
        (mid,) = await spool.add(null)
        await wait_until(lambda: places(tmp_path, mid) == ["frozen"], "frozen")
        assert [m.id for m in spool.status()] == [mid]  # no notification was spooled
    record = read_record(tmp_path, "frozen", mid)
    assert record.failed_recipients == [RCPT]
    assert record.related_ids == []
    assert {m for m, _ in seen} == {mid}


async def test_a_null_sender_message_expires_frozen_without_a_warning(tmp_path: Path) -> None:
    clock = FakeClock(START)
    relay, seen = timed_relay(clock, {RCPT: TRY_LATER})
    policy = DeliveryPolicy(
        max_queue_lifetime=10 * MINUTE, on_permanent_failure=BOUNCE, delay_warning=MINUTE
    )
    null = RoutedBatch([RoutedEnvelope("", [RCPT], [NEXT_HOP], intervals(1, 5, 15))], BODY)
    async with open_spool(tmp_path, relay, clock, delivery_policy=policy) as spool:
        (mid,) = await spool.add(null)
        await follow_retries(spool, clock, mid)
        assert places(tmp_path, mid) == ["frozen"]
        assert [m.id for m in spool.status()] == [mid]
    assert read_record(tmp_path, "frozen", mid).delay_warned_at is None
    assert {m for m, _ in seen} == {mid}


async def test_a_bounce_that_cannot_be_routed_leaves_the_message_frozen(
    tmp_path: Path,
) -> None:
    class NoRoutes:
        def current_hops(self, message: Message) -> None:
            return None

        async def reroute(self, message: Message) -> list[RoutedEnvelope]:
            from spoold.errors import NoRouteError

            raise NoRouteError(f"no route for {message.remaining_recipients[0]}")

    clock = FakeClock(START)
    relay, _seen = timed_relay(clock, {RCPT: NO_SUCH_USER})
    policy = DeliveryPolicy(on_permanent_failure=BOUNCE)
    async with open_spool(
        tmp_path, relay, clock, delivery_policy=policy, routes=NoRoutes()
    ) as spool:
        (mid,) = await spool.add(batch(RCPT))
        await wait_until(lambda: places(tmp_path, mid) == ["frozen"], "frozen")
        assert [m.id for m in spool.status()] == [mid]
    assert read_record(tmp_path, "frozen", mid).failed_recipients == [RCPT]


class FlakyBounceRoutes:
    """Routes for bounces only: the first ``failures`` reports find no route
    (as if none were configured for the sender), the later ones go to
    :data:`NEXT_HOP`. Next hops of queued mail never change."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.asked = 0

    def current_hops(self, message: Message) -> None:
        return None

    async def reroute(self, message: Message) -> list[RoutedEnvelope]:
        from spoold.errors import NoRouteError

        self.asked += 1
        if self.asked <= self.failures:
            raise NoRouteError(f"no route for {message.remaining_recipients[0]}")
        return [RoutedEnvelope("", list(message.remaining_recipients), [NEXT_HOP])]


OTHER = "other@example.com"


async def test_an_unreported_failure_is_tried_again_and_reported_later(tmp_path: Path) -> None:
    """RCPT fails for good while OTHER is to be tried later; the bounce finds
    no route: RCPT goes back among the remaining recipients, fails again at
    the next attempt, and that time the sender is told."""
    clock = FakeClock(START)
    relay, seen = timed_relay(clock, {RCPT: NO_SUCH_USER, OTHER: TRY_LATER})
    policy = DeliveryPolicy(on_permanent_failure=BOUNCE)
    routes = FlakyBounceRoutes(failures=1)
    async with open_spool(tmp_path, relay, clock, delivery_policy=policy, routes=routes) as spool:
        (mid,) = await spool.add(batch(RCPT, OTHER, retry_intervals=intervals(1, 5)))
        await tried(seen, mid, 2)  # both recipients, first attempt
        await wait_until(lambda: waiting_or_done(spool, clock, mid), "the first attempt to end")
        first = read_record(tmp_path, "active", mid)
        assert sorted(first.remaining_recipients) == sorted([RCPT, OTHER])
        assert first.failed_recipients == []
        assert first.related_ids == []
        assert notices_for(relay) == []

        clock.advance(MINUTE)
        await tried(seen, mid, 4)
        await wait_until(lambda: len(notices_for(relay)) == 1, "the bounce delivered")
        await wait_until(lambda: waiting_or_done(spool, clock, mid), "the second attempt to end")
        second = read_record(tmp_path, "active", mid)
    assert (second.remaining_recipients, second.failed_recipients) == ([OTHER], [RCPT])
    (dsn_id,) = second.related_ids
    assert attempts_for(relay, dsn_id) == [(SENDER,)]
    (report,) = notices_for(relay)
    assert [f["Final-Recipient"] for f in recipient_fields(report)] == [f"rfc822; {RCPT}"]
    assert routes.asked == 2


async def test_a_failure_never_reported_ends_frozen_with_the_rest(tmp_path: Path) -> None:
    """No bounce can ever be added: the recipient that failed for good is
    tried at each attempt with the one still to try, and at the lifetime's
    end both fail and the message is frozen for an operator (nothing lost,
    nothing removed)."""
    clock = FakeClock(START)
    relay, seen = timed_relay(clock, {RCPT: NO_SUCH_USER, OTHER: TRY_LATER})
    policy = DeliveryPolicy(max_queue_lifetime=10 * MINUTE, on_permanent_failure=BOUNCE)
    routes = FlakyBounceRoutes(failures=1_000)
    async with open_spool(tmp_path, relay, clock, delivery_policy=policy, routes=routes) as spool:
        (mid,) = await spool.add(batch(RCPT, OTHER, retry_intervals=intervals(1, 5, 15)))
        await follow_retries(spool, clock, mid)
        assert places(tmp_path, mid) == ["frozen"]
    record = read_record(tmp_path, "frozen", mid)
    assert record.remaining_recipients == []
    assert sorted(record.failed_recipients) == sorted([RCPT, OTHER])
    assert record.related_ids == []
    # 0, 1m, 6m and the lifetime's end (10m): RCPT was tried every time
    assert [sorted(a) for a in attempts_for(relay, mid)] == [sorted([RCPT, OTHER])] * 4
    assert len([t for m, t in seen if m == mid]) == 8  # two recipients, four attempts
    assert routes.asked == 4  # a report tried at each attempt
    assert notices_for(relay) == []


async def test_bounce_end_to_end_reaches_a_real_smtp_server(
    tmp_path: Path, smtp_server: SmtpTestServer
) -> None:
    """The hop refuses the recipient with 550; the DSN goes to the sender
    through the same hop, from the null sender, and the original is in
    removed/."""
    smtp_server.behaviour.rcpt[RCPT] = Reply("550 5.1.1 <rcpt@example.com>: no such user")
    clock = FakeClock(START)
    relay = SmtpRelay(RouteSettings(tls="none", connect_timeout=5.0, command_timeout=5.0))
    content = b"From: app@example.org\r\nSubject: invoice 42\r\n\r\nbody\r\n"
    submission = RoutedBatch(
        [RoutedEnvelope(SENDER, [RCPT], [smtp_server.hop], intervals(1))],
        Body.from_content(content),
    )
    policy = DeliveryPolicy(on_permanent_failure=BOUNCE)
    try:
        with anyio.fail_after(30):
            async with open_spool(
                tmp_path, relay, clock, delivery_policy=policy, reporting_mta="mta.test"
            ) as spool:
                (mid,) = await spool.add(submission)
                await wait_until(lambda: smtp_server.transactions == 1, "the DSN to arrive")
                await wait_until(lambda: spool.status() == [], "the DSN to be delivered")
    finally:
        await relay.close_and_flush()

    assert places(tmp_path, mid) == ["removed"]
    (received,) = smtp_server.messages
    assert received.mail_from == "<>"
    assert received.rcpt_tos == (SENDER,)
    report = email.message_from_bytes(received.content, policy=email.policy.default)
    assert isinstance(report, EmailMessage)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["To"] == SENDER
    assert recipient_fields(report) == [
        {
            "Final-Recipient": f"rfc822; {RCPT}",
            "Action": "failed",
            "Status": "5.1.1",
            "Remote-MTA": "dns; 127.0.0.1",
            "Diagnostic-Code": "smtp; 550 5.1.1 <rcpt@example.com>: no such user",
            "Last-Attempt-Date": report["Date"],
        }
    ]
    headers = list(report.iter_parts())[2].get_content()
    assert "Subject: invoice 42" in headers
    original = read_record(tmp_path, "removed", mid)
    assert len(original.related_ids) == 1


# ------------------------------------------------------------ delay warning


async def test_one_delay_warning_per_message_under_the_fake_clock(tmp_path: Path) -> None:
    clock = FakeClock(START)
    relay, seen = timed_relay(clock, {RCPT: TRY_LATER})
    policy = DeliveryPolicy(max_queue_lifetime=timedelta(hours=1), delay_warning=3 * MINUTE)
    async with open_spool(tmp_path, relay, clock, delivery_policy=policy) as spool:
        (mid,) = await spool.add(batch(RCPT, retry_intervals=intervals(1, 5, 15)))
        await follow_retries(spool, clock, mid)
        await wait_until(lambda: len(notices_for(relay)) == 1, "the warning delivered")

    # attempts at 0, 1m, 6m (the first at or after 3m: the warning), 21m,
    # then the last interval repeats until the lifetime ends at 1h
    assert [t for m, t in seen if m == mid] == [
        START + m * MINUTE for m in (0, 1, 6, 21, 36, 51, 60)
    ]
    (warning,) = notices_for(relay)
    assert warning["Subject"] == "Delayed mail (still being retried)"
    (fields,) = recipient_fields(warning)
    assert fields["Action"] == "delayed"
    assert fields["Status"] == TRY_LATER.enhanced_status == "4.3.0"
    assert fields["Will-Retry-Until"] == "Tue, 04 Mar 2031 06:06:07 +0000"
    record = read_record(tmp_path, "frozen", mid)  # expired at 1h
    assert record.delay_warned_at == START + 6 * MINUTE


# --------------------------------------------------------------- retry plan


def attempt_windows(plan: RetryPlan) -> list[tuple[datetime, datetime, bool]]:
    """Every attempt of ``plan`` as (earliest, latest, conditional), the
    repeated ones spelled out."""
    out = [(a.earliest, a.latest, a.conditional) for a in plan.attempts]
    r = plan.repeats
    if r is not None:
        for k in range(r.max_count):
            earliest = min(r.earliest + k * r.shortest, r.until)
            latest = min(r.latest + k * r.longest, r.until)
            out.append((earliest, latest, k >= r.min_count))
    return out


@pytest.mark.parametrize("jitter", [0.0, 0.2])
async def test_the_retry_plan_is_what_then_happens(tmp_path: Path, jitter: float) -> None:
    clock = FakeClock(START)
    relay, seen = timed_relay(clock, {RCPT: TRY_LATER})
    policy = DeliveryPolicy(
        max_queue_lifetime=30 * MINUTE, on_permanent_failure=BOUNCE, delay_warning=4 * MINUTE
    )
    spans = [timedelta(minutes=m) for m in (1, 5, 10, 20)]
    retry = RetryInterval.from_spans(spans, jitter)
    async with open_spool(
        tmp_path, relay, clock, delivery_policy=policy, rng=random.Random(7)
    ) as spool:
        (mid,) = await spool.add(batch(RCPT, retry_intervals=retry))
        # no await in between: the plan is taken before the first attempt starts
        plan = spool.retry_plan(mid)
        assert plan.attempts[0].earliest == START
        await follow_retries(spool, clock, mid)
        ended = clock.now()

    times = [t for m, t in seen if m == mid]
    # How it ended is one of the ends the plan foresaw, within its bounds
    # (with jitter, the retry intervals may run out just before the
    # lifetime: then it is frozen, and the plan says so too).
    action = {"removed": "bounce", "frozen": "freeze"}[places(tmp_path, mid)[0]]
    (end,) = [e for e in plan.ends if e.action == action]
    assert end.earliest <= ended <= end.latest
    windows = attempt_windows(plan)
    certain = [w for w in windows if not w[2]]
    assert len(certain) <= len(times) <= len(windows)
    for (earliest, latest, _), at in zip(windows, times, strict=False):
        assert earliest <= at <= latest, (earliest, latest, at)
    if jitter == 0.0:
        assert [(e.action, e.reason) for e in plan.ends] == [("bounce", "lifetime")]
        assert places(tmp_path, mid) == ["removed"]
        assert times == [w[0] for w in windows]
        # the last interval (20m) repeats: its next attempt is when the lifetime ends
        assert times == [START + m * MINUTE for m in (0, 1, 6, 16, 30)]
    assert plan.delay_warning is not None
    (warning,) = [n for n in notices_for(relay) if n["Subject"].startswith("Delayed")]
    sent_at = warning["Date"].datetime  # whole seconds
    assert plan.delay_warning[0].replace(microsecond=0) <= sent_at <= plan.delay_warning[1]


async def test_retry_plan_of_an_unknown_message_is_not_found(tmp_path: Path) -> None:
    from spoold.errors import NotFoundError

    clock = FakeClock(START)
    async with open_spool(tmp_path, InMemoryRelay(), clock) as spool:
        with pytest.raises(NotFoundError, match="no such message in active or frozen"):
            spool.retry_plan("8DsiUFeJ098b3CijH")


async def test_retry_plan_of_a_frozen_message_plans_nothing(tmp_path: Path) -> None:
    clock = FakeClock(START)
    async with open_spool(tmp_path, InMemoryRelay(), clock) as spool:
        (mid,) = await spool.add(batch(RCPT), frozen=True)
        plan = spool.retry_plan(mid)
    assert plan.attempts == ()
    assert plan.note == "frozen: no attempt is planned"
