"""The issue's demonstration of webhooks: a daemon posts every delivery
and bounce to an HTTPS receiver on 127.0.0.1 whose certificate a trustme
CA issued (the webhook's ``ca_file``); the receiver goes away for a while
and comes back; every message's final event arrives, signed, and the only
repeats are posts of the same event under the same ``event_id``.

The outage lasts ``SPOOLD_TEST_WEBHOOK_OUTAGE`` seconds (default 3, so the
suite stays quick; the issue asks for a minute)::

    SPOOLD_TEST_WEBHOOK_OUTAGE=60 python -m pytest -q -p no:randomly \\
        tests/test_webhooks_outage_daemon.py
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections import Counter, defaultdict
from pathlib import Path

import anyio
import trustme

from tests.daemon_helpers import DaemonFactory, cli, sendmail, write_config
from tests.smtp_server import Reply, SmtpTestServer
from tests.test_webhooks_daemon import MESSAGE, SECRET, documented_verify
from tests.webhook_receiver import WebhookReceiver

OUTAGE = float(os.environ.get("SPOOLD_TEST_WEBHOOK_OUTAGE", "3"))


def _https_receiver(tmp_path: Path) -> tuple[WebhookReceiver, Path]:
    """A receiver with a certificate for 127.0.0.1 from a new trustme CA,
    and the CA's certificate file (the webhook's ``ca_file``)."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "webhook-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return WebhookReceiver(tls=context), ca_file


async def test_an_https_receiver_down_for_the_outage_then_up_gets_every_event(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    receiver, ca_file = _https_receiver(tmp_path)
    await receiver.start()
    config = write_config(tmp_path, next_hops=[smtp_server.hop])
    config.write_text(
        config.read_text().replace("[spool]\n", '[spool]\non_permanent_failure = "bounce"\n')
    )
    secret = tmp_path / "hook.secret"
    secret.write_text(SECRET + "\n")
    os.chmod(secret, 0o600)
    config.write_text(
        config.read_text() + "\n[webhooks.app]\n"
        f'url = "{receiver.url}"\n'
        'secret_file = "hook.secret"\n'
        f'ca_file = "{ca_file}"\n'
        'backoff = "100ms"\n'
        'max_backoff = "1s"\n'
        'timeout = "5s"\n'
    )
    # Every third message goes to a recipient the hop refuses: a bounce.
    wanted: dict[str, str] = {}
    for n in range(15):
        refused = n % 3 == 2
        recipient = f"{'gone' if refused else 'ok'}{n}@example.com"
        wanted[recipient] = "bounced" if refused else "delivered"
        if refused:
            smtp_server.behaviour.rcpt[recipient] = Reply("550 5.1.1 no such user")
    recipients = list(wanted)
    daemon = await start_daemon(config)

    async def send(batch: list[str]) -> None:
        for recipient in batch:
            done = await sendmail(config, recipient, stdin=MESSAGE)
            assert done.code == 0, done.err

    def arrived() -> set[str]:
        return {
            r for p in receiver.accepted for r in json.loads(p.body)["recipients"] if r in wanted
        }

    try:
        # The receiver is up, slow to answer: it goes down with posts in
        # flight that it has acted on, and the daemon never saw their 2xx.
        receiver.delay = 0.2
        await send(recipients[:4])
        await receiver.wait_for(lambda: len(arrived()) >= 1)

        # Down: connections refused. Mail goes on, sent across the outage.
        await receiver.stop()
        receiver.delay = 0.0
        during = recipients[4:12]
        started = time.monotonic()
        for n, recipient in enumerate(during):
            await send([recipient])
            await anyio.sleep_until(started + OUTAGE * (n + 1) / len(during))
        status = await anyio.to_thread.run_sync(
            lambda: cli("--config", str(config), "status", "--webhooks", "--format", "json")
        )
        hook = json.loads(status.out)
        assert hook["up"] is False and hook["outbox"] >= 1, hook

        # Up again: everything waiting arrives, and what is sent after too.
        await receiver.start(receiver.port)
        await send(recipients[12:])
        await receiver.wait_for(lambda: set(wanted) <= arrived(), timeout=60 + OUTAGE)
    finally:
        await receiver.stop()

    verify = documented_verify()
    for post in receiver.accepted:
        assert verify(SECRET.encode(), post.headers, post.body), post.headers
    events = [json.loads(p.body) for p in receiver.accepted]
    final = {r: e["event"] for e in events for r in e["recipients"] if r in wanted}
    assert final == wanted
    for event in events:
        if event["event"] == "bounced":
            (result,) = [r for r in event["results"] if r["outcome"] == "failed"]
            assert result["reply"] == "550 5.1.1 no such user"
    # Repeats (a post whose 2xx was not seen) carry the same event_id and
    # the same body; no event is posted under two ids.
    bodies: dict[str, set[bytes]] = defaultdict(set)
    for post in receiver.accepted:
        bodies[post.headers["spoold-event-id"]].add(post.body)
    assert all(len(b) == 1 for b in bodies.values())
    unique = {p.headers["spoold-event-id"]: json.loads(p.body) for p in receiver.accepted}
    assert set(Counter((e["message_id"], e["event"]) for e in unique.values()).values()) == {1}
    duplicates = len(receiver.accepted) - len(bodies)
    print(
        f"outage {OUTAGE:g} s: {len(bodies)} events, {len(receiver.accepted)} accepted posts, "
        f"{duplicates} duplicates, {len(receiver.posts)} posts in all; "
        f"daemon log lines: {daemon.log_text().count(chr(10))}"
    )
