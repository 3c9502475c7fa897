"""Issue 19, point 3, end to end: a smarthost that is down for longer than
the retry intervals last gets the mail once it is back. With the defaults
(``retries_exhausted = "repeat_last"``, a queue lifetime of 5 days) the last
interval repeats; the message is never frozen on the way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spoold.daemon.control import ControlClient
from tests.daemon_helpers import DaemonFactory, set_config_value, write_config
from tests.smtp_server import SmtpTestServer
from tests.support import free_port, wait_until

SENDER = "app@example.org"
RCPT = "ops@example.com"
CONTENT = b"Subject: overnight\r\n\r\nstill here in the morning\r\n"
DOWN_ATTEMPTS = 5  # the seed's rule froze the message at attempt 3 (two intervals)


async def test_a_dead_smarthost_then_up_gets_the_mail_never_frozen(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    port = free_port()  # nothing listens: every connection is refused
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{port}"])
    set_config_value(config, "retry_intervals", '["1s", "1s"]')
    daemon = await start_daemon(config)
    control = ControlClient(daemon.socket, timeout=10)
    (mid,) = await control.submit(SENDER, [RCPT], CONTENT)

    seen_status: set[str] = set()

    async def attempts_while_down() -> bool:
        view: dict[str, Any] = await control.request("show", id=mid)
        seen_status.add(view["status"])
        assert view["queue"] == "active", view  # never frozen
        return len(view["relay_attempts"]) >= DOWN_ATTEMPTS

    await wait_until(
        attempts_while_down,
        lambda: f"{DOWN_ATTEMPTS} failed attempts:\n{daemon.log_text()}",
        interval=0.05,
    )
    view = await control.request("show", id=mid)
    assert "cannot connect" in view["relay_attempts"][0]["error"]
    assert [r["span"] for r in view["retry_intervals"]] == [1.0]  # the last one, kept
    plan = await control.request("retry_plan", id=mid)
    assert plan["retries_exhausted"] == "repeat_last"
    assert plan["repeats"] is not None
    assert [(e["action"], e["reason"]) for e in plan["ends"]] == [("freeze", "lifetime")]

    server = SmtpTestServer()
    await server.start(port)  # the smarthost is back
    try:
        await wait_until(
            lambda: server.messages,
            lambda: f"the message delivered:\n{daemon.log_text()}",
            interval=0.05,
        )
        (received,) = server.messages
        assert (received.mail_from, received.rcpt_tos) == (SENDER, (RCPT,))
        departed = await wait_until(
            lambda: _departed(control, mid), "the delivery recorded", interval=0.05
        )
        assert departed["status"] == "delivered"
    finally:
        await server.stop()

    outcomes = [
        line["outcome"]
        for line in daemon.log_lines()
        if line.get("event") == "attempt done" and line.get("id") == mid
    ]
    assert len(outcomes) > DOWN_ATTEMPTS
    assert outcomes[-1] == "delivered"
    assert set(outcomes[:-1]) == {"delayed"}, outcomes  # never frozen, never expired
    assert "frozen" not in seen_status


async def _departed(control: ControlClient, mid: str) -> dict[str, Any] | None:
    view: dict[str, Any] = await control.request("show", id=mid)
    return view if view["queue"] is None else None
