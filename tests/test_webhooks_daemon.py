"""Webhooks through a real daemon (``spoold run`` in a subprocess): mail
goes to an aiosmtpd next hop on 127.0.0.1, and the delivery events go to
an HTTPS receiver on 127.0.0.1 (:mod:`tests.webhook_receiver`) that the
daemon trusts through the webhook's ``ca_file``. Each post is checked with
the verification code that docs/configuration.md gives applications.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from tests.daemon_helpers import CliResult, DaemonFactory, cli, sendmail, write_config
from tests.smtp_server import Reply, SmtpTestServer, TlsCertificate
from tests.webhook_receiver import ReceivedPost, WebhookReceiver

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
SECRET = "a-shared-secret-of-some-length"
MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


def documented_verify() -> Any:
    """The ``verify`` function of the Python block in the webhooks section
    of docs/configuration.md, as an application would paste it."""
    section = DOCS.read_text().split("## `[webhooks.NAME]`", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None, "no python block in the webhooks section"
    scope: dict[str, Any] = {}
    exec(block.group(1), scope)
    return scope["verify"]


def _webhook_config(config: Path, receiver: WebhookReceiver, cert: Path, extra: str = "") -> None:
    secret = config.parent / "hook.secret"
    secret.write_text(SECRET + "\n")
    os.chmod(secret, 0o600)
    config.write_text(
        config.read_text() + "\n[webhooks.app]\n"
        f'url = "{receiver.url}"\n'
        'secret_file = "hook.secret"\n'
        f'ca_file = "{cert}"\n'
        'backoff = "50ms"\n'
        'max_backoff = "200ms"\n'
        'timeout = "5s"\n' + extra
    )


def _events(posts: list[ReceivedPost]) -> list[dict[str, Any]]:
    return [json.loads(p.body) for p in posts]


def _outcomes(posts: list[ReceivedPost]) -> dict[str, str]:
    """Recipient -> the event kind posted for it."""
    out = {}
    for event in _events(posts):
        for rcpt in event["recipients"]:
            out[rcpt] = event["event"]
    return out


async def _receiver(tls_certificate: TlsCertificate) -> WebhookReceiver:
    receiver = WebhookReceiver(tls=tls_certificate.server_context())
    await receiver.start()
    return receiver


@asynccontextmanager
async def _receiving(tls_certificate: TlsCertificate) -> AsyncIterator[WebhookReceiver]:
    """An HTTPS receiver, listening until the block's end."""
    receiver = await _receiver(tls_certificate)
    try:
        yield receiver
    finally:
        await receiver.stop()


def _config(
    tmp_path: Path,
    smtp_server: SmtpTestServer,
    receiver: WebhookReceiver,
    tls_certificate: TlsCertificate,
    extra: str = "",
    *,
    bounce: bool = False,
) -> Path:
    """A daemon's config: mail to ``smtp_server``, events to ``receiver``
    (with the webhook's ``extra`` keys); with ``bounce``, a refused
    recipient bounces (the default freezes it for an operator)."""
    config = write_config(tmp_path, next_hops=[smtp_server.hop])
    if bounce:
        config.write_text(
            config.read_text().replace("[spool]\n", '[spool]\non_permanent_failure = "bounce"\n')
        )
    _webhook_config(config, receiver, tls_certificate.cert, extra)
    return config


async def _send(config: Path, *recipients: str) -> None:
    """``sendmail`` of MESSAGE to ``recipients``, taken."""
    done = await sendmail(config, *recipients, stdin=MESSAGE)
    assert done.code == 0, done.err


async def _reload(config: Path) -> CliResult:
    """``spoold reload`` off the event loop."""
    return await anyio.to_thread.run_sync(lambda: cli("--config", str(config), "reload"))


async def test_every_delivery_and_bounce_is_posted_signed(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    smtp_server: SmtpTestServer,
    tls_certificate: TlsCertificate,
) -> None:
    async with _receiving(tls_certificate) as receiver:
        # A refused recipient bounces (the default freezes it for an operator).
        config = _config(tmp_path, smtp_server, receiver, tls_certificate, bounce=True)
        smtp_server.behaviour.rcpt["gone@example.com"] = Reply("550 5.1.1 no such user")
        await start_daemon(config)
        for n in range(3):
            await _send(config, f"ok{n}@example.com")
        await _send(config, "gone@example.com")

        wanted = {"ok0@example.com", "ok1@example.com", "ok2@example.com", "gone@example.com"}
        await receiver.wait_for(lambda: wanted <= set(_outcomes(receiver.accepted)))
        outcomes = _outcomes(receiver.accepted)
        assert {r: outcomes[r] for r in wanted} == {
            "ok0@example.com": "delivered",
            "ok1@example.com": "delivered",
            "ok2@example.com": "delivered",
            "gone@example.com": "bounced",
        }
        verify = documented_verify()
        for post in receiver.accepted:
            assert post.path == "/hook"
            assert post.headers["content-type"] == "application/json"
            assert verify(SECRET.encode(), post.headers, post.body), post.headers
            # A body changed on the way, or another key, does not verify.
            assert not verify(SECRET.encode(), post.headers, post.body + b" ")
            assert not verify(b"another-secret-of-some-length", post.headers, post.body)
        bounce = next(e for e in _events(receiver.accepted) if e["event"] == "bounced")
        assert bounce["version"] == 1
        assert bounce["webhook"] == "app"
        assert bounce["routes"] == ["smarthost"]
        assert bounce["message_id"]
        assert bounce["time"].endswith("Z")
        ids = [e["event_id"] for e in _events(receiver.accepted)]
        assert len(ids) == len(set(ids))


async def test_a_partial_bounce_names_the_refused_recipient_with_its_reply(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    smtp_server: SmtpTestServer,
    tls_certificate: TlsCertificate,
) -> None:
    """One message to two recipients: the hop takes one (250) and refuses
    the other (550): the bounce names only the refused one, with the
    hop's reply, and lists the other as delivered in its results."""
    async with _receiving(tls_certificate) as receiver:
        config = _config(tmp_path, smtp_server, receiver, tls_certificate, bounce=True)
        smtp_server.behaviour.rcpt["gone@example.com"] = Reply("550 5.1.1 no such user")
        await start_daemon(config)
        await _send(config, "ok@example.com", "gone@example.com")

        def bounces() -> list[dict[str, Any]]:
            return [e for e in _events(receiver.accepted) if e["event"] == "bounced"]

        await receiver.wait_for(lambda: len(bounces()) >= 1)
        (bounce,) = bounces()  # (the notice to the sender is another message)
        assert bounce["recipients"] == ["gone@example.com"]
        results = {r["recipient"]: r for r in bounce["results"]}
        assert results["gone@example.com"] == {
            "recipient": "gone@example.com",
            "outcome": "failed",
            "code": 550,
            "reply": "550 5.1.1 no such user",
        }
        delivered = results["ok@example.com"]
        assert (delivered["outcome"], delivered["code"]) == ("delivered", 250)
        assert delivered["reply"].startswith("250")
        assert set(results) == {"ok@example.com", "gone@example.com"}


async def test_endpoint_down_then_up_loses_nothing_across_a_restart(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    smtp_server: SmtpTestServer,
    tls_certificate: TlsCertificate,
) -> None:
    async with _receiving(tls_certificate) as receiver:
        receiver.status = 500  # up, but failing
        config = _config(tmp_path, smtp_server, receiver, tls_certificate)
        daemon = await start_daemon(config)
        outbox = tmp_path / "spool" / "webhooks" / "app"
        for n in range(3):
            await _send(config, f"first{n}@example.com")
        # Every post is answered 500: the events stay in the outbox, retried.
        await receiver.wait_for(lambda: len(receiver.posts) >= 4)
        assert receiver.accepted == []
        shown = await _cli(config, "--format", "json")
        assert shown.code == 1, shown.err  # a webhook DOWN: a monitoring check fails
        hook = json.loads(shown.out)
        assert (hook["name"], hook["url"], hook["up"]) == ("app", receiver.url, False)
        assert hook["last_error"] == "HTTP 500" and hook["next_retry"] is not None
        assert hook["last_success"] is None and hook["failures"] >= 1
        assert hook["outbox"] + hook["posted"] >= 1
        table = await _cli(config)
        assert table.code == 1
        assert "app  " in table.out and "DOWN" in table.out and "HTTP 500" in table.out

        # The endpoint goes away entirely (connections refused), and the
        # daemon is stopped and started again meanwhile.
        await receiver.stop()
        await _wait_files(outbox, 3)
        await daemon.kill()
        daemon = await start_daemon(config)
        for n in range(2):
            await _send(config, f"second{n}@example.com")
        await _wait_files(outbox, 5)

        receiver.status = 200
        await receiver.start(receiver.port)
        wanted = {f"first{n}@example.com" for n in range(3)} | {
            f"second{n}@example.com" for n in range(2)
        }
        await receiver.wait_for(lambda: wanted <= set(_outcomes(receiver.accepted)))
        assert set(_outcomes(receiver.accepted).values()) == {"delivered"}
        await _wait_files(outbox, 0)
        shown = await _cli(config, "--format", "json")
        hook = json.loads(shown.out)
        assert hook["up"] is True and hook["outbox"] == 0 and hook["last_success"]


async def _cli(config: Path, *args: str) -> CliResult:
    """``spoold status --webhooks ARGS`` off the event loop (the receiver
    runs on it)."""
    return await anyio.to_thread.run_sync(
        lambda: cli("--config", str(config), "status", "--webhooks", *args)
    )


async def _wait_files(directory: Path, count: int) -> None:
    """Wait until the outbox holds ``count`` events (another process writes it)."""
    from tests.support import wait_until

    def files() -> int:
        return len([p for p in directory.iterdir() if p.suffix == ".json"])

    await wait_until(
        lambda: directory.is_dir() and files() == count,
        lambda: f"{count} events in {directory} (have {files() if directory.is_dir() else 0})",
        interval=0.05,
    )


def test_documented_verify_refuses_a_stale_timestamp() -> None:
    import hmac
    import time
    from hashlib import sha256

    verify = documented_verify()
    body = b'{"version":1}'
    old = str(int(time.time()) - 3600)
    mac = hmac.new(SECRET.encode(), old.encode() + b"." + body, sha256).hexdigest()
    headers = {"spoold-timestamp": old, "spoold-signature": "sha256=" + mac}
    assert not verify(SECRET.encode(), headers, body)
    now = str(int(time.time()))
    mac = hmac.new(SECRET.encode(), now.encode() + b"." + body, sha256).hexdigest()
    headers = {"spoold-timestamp": now, "spoold-signature": "sha256=" + mac}
    assert verify(SECRET.encode(), headers, body)


async def test_a_bad_secret_file_stops_the_start_and_refuses_a_reload(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    smtp_server: SmtpTestServer,
    tls_certificate: TlsCertificate,
) -> None:
    receiver = WebhookReceiver(tls=tls_certificate.server_context())  # never started
    config = _config(tmp_path, smtp_server, receiver, tls_certificate)
    secret = tmp_path / "hook.secret"
    os.chmod(secret, 0o644)
    daemon = await start_daemon(config, wait_ready=False)
    assert await daemon.wait_exit() == 2
    assert "webhooks.app.secret_file" in daemon.log_text()
    assert "make it 0600" in daemon.log_text()

    os.chmod(secret, 0o600)
    daemon = await start_daemon(config)
    os.chmod(secret, 0o644)
    refused = await _reload(config)
    assert refused.code == 1
    assert "webhooks.app.secret_file" in refused.err


async def test_a_stop_with_the_endpoint_down_keeps_the_events(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    smtp_server: SmtpTestServer,
    tls_certificate: TlsCertificate,
) -> None:
    async with _receiving(tls_certificate) as receiver:
        receiver.status = 503
        config = _config(tmp_path, smtp_server, receiver, tls_certificate)
        daemon = await start_daemon(config)
        await _send(config, "kept@example.com")
        await receiver.wait_for(lambda: len(receiver.posts) >= 2)  # tried, and again
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
        (kept,) = (tmp_path / "spool" / "webhooks" / "app").glob("*.json")
        event = json.loads(kept.read_bytes())
        assert (event["event"], event["recipients"]) == ("delivered", ["kept@example.com"])
        assert kept.read_bytes() == receiver.posts[0].body  # the same bytes, every try


async def test_a_full_outbox_drops_the_oldest_and_says_so(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    smtp_server: SmtpTestServer,
    tls_certificate: TlsCertificate,
) -> None:
    from tests.support import free_port
    from tests.test_metrics import key, scrape_samples

    receiver = await _receiver(tls_certificate)
    await receiver.stop()  # nothing listens: every post is refused
    config = _config(tmp_path, smtp_server, receiver, tls_certificate, "max_outbox = 2\n")
    port = free_port()
    config.write_text(config.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    daemon = await start_daemon(config)
    outbox = tmp_path / "spool" / "webhooks" / "app"
    for n in range(4):
        await _send(config, f"m{n}@example.com")
        await _wait_for_event(outbox, f"m{n}@example.com")  # in order, one by one
    await _wait_files(outbox, 2)
    kept = sorted(json.loads(p.read_bytes())["recipients"][0] for p in outbox.glob("*.json"))
    assert kept == ["m2@example.com", "m3@example.com"]
    assert "webhook events dropped: the outbox is full" in daemon.log_text()
    samples = await scrape_samples(port)
    assert samples[key("spoold_webhook_dropped_events_total", webhook="app")] == 2.0
    assert samples[key("spoold_webhook_outbox_events", webhook="app")] == 2.0
    assert samples[key("spoold_webhook_up", webhook="app")] == 0.0
    assert samples[key("spoold_webhook_posts_total", webhook="app")] == 0.0
    assert samples[key("spoold_webhook_failures_total", webhook="app")] >= 1.0


async def _wait_for_event(directory: Path, recipient: str) -> None:
    """Wait until the outbox holds an event for ``recipient``."""
    from tests.support import wait_until

    def there() -> bool:
        for path in directory.glob("*.json"):
            try:
                if recipient in json.loads(path.read_bytes())["recipients"]:
                    return True
            except FileNotFoundError:
                continue  # dropped meanwhile
        return False

    await wait_until(there, f"an event for {recipient} in {directory}", interval=0.05)


async def test_a_damaged_outbox_file_is_set_aside_and_the_rest_posted(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    smtp_server: SmtpTestServer,
    tls_certificate: TlsCertificate,
) -> None:
    async with _receiving(tls_certificate) as receiver:
        config = _config(tmp_path, smtp_server, receiver, tls_certificate)
        outbox = tmp_path / "spool" / "webhooks" / "app"
        first = await start_daemon(config)  # makes the spool and the outbox
        first.send_signal(signal.SIGTERM)
        assert await first.wait_exit() == 0
        (outbox / "0000000000000000.json").write_bytes(b"\x00not json")
        (outbox / "0000000000000001.json").write_bytes(b"[1, 2]")
        daemon = await start_daemon(config)
        await _send(config, "after@example.com")
        await receiver.wait_for(lambda: "after@example.com" in _outcomes(receiver.accepted))
        assert len(receiver.posts) == 1
        assert daemon.log_text().count("webhook event set aside in rejected/") == 2
        await _wait_files(outbox, 0)
        assert len(list((outbox / "rejected").iterdir())) == 2


async def test_a_reload_signs_with_a_rotated_secret_and_keeps_saying_restart(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    smtp_server: SmtpTestServer,
    tls_certificate: TlsCertificate,
) -> None:
    async with _receiving(tls_certificate) as receiver:
        config = _config(tmp_path, smtp_server, receiver, tls_certificate)
        daemon = await start_daemon(config)
        verify = documented_verify()
        new_secret = "a-rotated-secret-of-some-length"

        await _send(config, "before@example.com")
        await receiver.wait_for(lambda: "before@example.com" in _outcomes(receiver.accepted))
        (tmp_path / "hook.secret").write_text(new_secret + "\n")
        reloaded = await _reload(config)
        assert reloaded.code == 0, reloaded.err
        assert "webhooks" not in reloaded.out + reloaded.err
        assert "webhook secret changed" in daemon.log_text()
        await _send(config, "after@example.com")
        await receiver.wait_for(lambda: "after@example.com" in _outcomes(receiver.accepted))
        after = next(p for p in receiver.accepted if b"after@example.com" in p.body)
        assert verify(new_secret.encode(), after.headers, after.body)
        assert not verify(SECRET.encode(), after.headers, after.body)

        # Another URL needs a restart: said at every reload until then.
        config.write_text(config.read_text().replace("/hook", "/other"))
        for _ in range(2):
            reloaded = await _reload(config)
            assert reloaded.code == 0, reloaded.err
            assert "webhooks" in reloaded.out + reloaded.err, reloaded
