"""The suppression list through a real daemon (``spoold run`` in a subprocess,
two SMTP ingest workers), a real next hop (aiosmtpd on 127.0.0.1 answering
some recipients with injected replies) and the real commands.

A ``550 5.1.1`` from the next hop suppresses its recipient: the next SMTP
submission to it is refused at ``RCPT`` (``550 5.7.1``, naming the end of
the suppression) while the message's other recipients are taken; ``spoold
suppress list --json`` shows it; ``sendmail`` exits 67 and ``Client.submit``
raises; ``spoold suppress remove`` lifts it; ``spoold suppress add`` applies
at once in the ingest workers; a ``550 5.7.1`` and a ``451`` suppress
nobody; the list survives a restart; without the key nothing is suppressed;
``suppressed_recipients = "fail"`` takes the message and fails the recipient.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from spoold import Client, ControlError, RecipientSuppressedError
from tests.daemon_helpers import DaemonFactory, DaemonProcess, cli, sendmail, write_config
from tests.ingest_helpers import raw_smtp
from tests.smtp_server import Reply, SmtpTestServer, StartServer
from tests.support import free_port, wait_until

GONE = "gone@example.com"  # the next hop: 550 5.1.1 (a hard bounce)
POLICY = "policy@example.com"  # 550 5.7.1: a policy refusal, not a bounce
LATER = "later@example.com"  # 451: try again later
OK = "ok@example.com"
MESSAGE = b"Subject: hello\r\n\r\nbody\r\n.\r\n"
POLL = 0.05  # seconds between two looks at what another process changes


def _config(tmp_path: Path, hop: str, port: int, spool_lines: str) -> Path:
    config = write_config(tmp_path, next_hops=[hop])
    text = config.read_text().replace("[spool]\n", "[spool]\n" + spool_lines, 1)
    text += f'\n[smtp]\nlisten = ["127.0.0.1:{port}"]\nworkers = 2\n'
    config.write_text(text)
    return config


def _hop_answers(server: SmtpTestServer) -> None:
    server.behaviour.rcpt = {
        GONE: Reply("550 5.1.1 no such user"),
        POLICY: Reply("550 5.7.1 rejected by policy"),
        LATER: Reply("451 4.3.0 try again later"),
    }


async def _ctl(daemon: DaemonProcess, *args: str) -> Any:
    return await anyio.to_thread.run_sync(lambda: cli("--socket", str(daemon.socket), *args))


async def _listed(daemon: DaemonProcess) -> dict[str, Any]:
    done = await _ctl(daemon, "suppress", "list", "--json")
    assert done.code == 0, done.err
    found: dict[str, Any] = json.loads(done.out)
    return found


async def _addresses(daemon: DaemonProcess) -> list[str]:
    return [e["address"] for e in (await _listed(daemon))["entries"]]


async def _rcpt(port: int, *recipients: str) -> list[tuple[int, str]]:
    """One SMTP transaction: each RCPT's reply, then DATA's final reply
    (when a recipient was taken)."""
    replies = []
    async with raw_smtp(port) as smtp:
        code, text = await smtp.command("MAIL FROM:<app@example.org>")
        assert code == 250, text
        for rcpt in recipients:
            replies.append(await smtp.command(f"RCPT TO:<{rcpt}>"))
        if any(code == 250 for code, _ in replies):
            code, text = await smtp.command("DATA")
            assert code == 354, text
            await smtp.send(MESSAGE)
            replies.append(await smtp.reply())
        await smtp.quit()
    return replies


async def _bounce_gone(daemon: DaemonProcess, port: int, server: SmtpTestServer) -> None:
    """Submit one message to GONE, POLICY, LATER and OK; wait until the
    next hop has answered them and GONE is on the list."""
    replies = await _rcpt(port, GONE, POLICY, LATER, OK)
    assert [code for code, _ in replies] == [250, 250, 250, 250, 250], replies
    await wait_until(lambda: len(server.messages) == 1, lambda: daemon.log_text(), interval=POLL)
    await wait_until(
        lambda: _addresses(daemon), "the hard bounce on the suppression list", interval=POLL
    )


async def test_a_hard_bounce_is_refused_at_rcpt_until_lifted(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer
) -> None:
    server = await start_smtp_server()
    _hop_answers(server)
    port = free_port()
    config = _config(tmp_path, server.hop, port, 'suppress_after_hard_bounce = "30d"\n')
    daemon = await start_daemon(config)

    await _bounce_gone(daemon, port, server)
    listed = await _listed(daemon)
    (entry,) = listed["entries"]  # not POLICY (5.7.1), not LATER (451)
    assert entry["address"] == GONE
    assert entry["reason"] == "550 5.1.1 no such user"
    assert entry["source"] == "bounce"
    assert listed["counts"]["bounced"] == 1

    # A new submission: RCPT to GONE refused (any case), the others taken.
    replies = await _rcpt(port, "Gone@Example.com", OK, POLICY)
    (code, text), *rest = replies
    assert code == 550, text
    # the end of the suppression, not its reason (for the operator only)
    assert text == f"550 5.7.1 Recipient suppressed until {entry['until']}"
    assert [c for c, _ in rest] == [250, 250, 250]  # OK, POLICY, and the message
    await wait_until(lambda: len(server.messages) == 2, daemon.log_text, interval=POLL)
    assert server.messages[1].rcpt_tos == (OK,)
    # POLICY was tried again (a policy refusal suppresses nobody); GONE never was
    tried = [c.arg for c in server.commands if c.verb == "RCPT"]
    assert tried.count(POLICY) == 2 and tried.count(GONE) == 1, tried

    # Counted, though an ingest worker refused it (its report reaches the daemon).
    async def refused() -> int:
        count: int = (await _listed(daemon))["counts"]["refused"]
        return count

    await wait_until(lambda: _is(refused, 1), "one refusal counted", interval=POLL)

    # check: 1 when suppressed, 0 when not
    done = await _ctl(daemon, "suppress", "check", GONE, OK)
    assert done.code == 1, done.err
    assert f"{GONE}: suppressed until {entry['until']}" in done.out
    assert f"{OK}: not suppressed" in done.out
    assert (await _ctl(daemon, "suppress", "check", OK)).code == 0

    # sendmail and Client.submit are refused, nothing spooled
    done = await sendmail(config, "-f", "app@example.org", OK, GONE, stdin=MESSAGE)
    assert done.code == 67, (done.code, done.err)
    assert "suppressed until" in done.err and GONE in done.err
    client = Client(daemon.socket)
    with pytest.raises(RecipientSuppressedError, match="suppressed until"):
        await anyio.to_thread.run_sync(
            lambda: client.submit("app@example.org", [GONE], b"Subject: x\r\n\r\nx\r\n")
        )
    assert client.check_suppressed([GONE, OK]).keys() == {GONE}
    # the list is the operator's: not on the submission socket any local user may use
    submitter = Client(daemon.socket.parent / "submit.sock")
    with pytest.raises(ControlError) as denied:
        await anyio.to_thread.run_sync(lambda: submitter.unsuppress([GONE]))
    assert denied.value.kind == "denied"

    # lifted: the next submission is taken
    done = await _ctl(daemon, "suppress", "remove", GONE)
    assert done.code == 0, done.err
    assert done.out.strip() == f"lifted: {GONE}"
    replies = await _rcpt(port, GONE)
    assert [c for c, _ in replies] == [250, 250], replies

    # added by an operator: the ingest workers apply it from the next RCPT
    done = await _ctl(
        daemon, "suppress", "add", "New@example.net", "--for", "2h", "--reason", "asked"
    )
    assert done.code == 0, done.err
    assert done.out.startswith("suppressed: new@example.net  until ")
    for _ in range(4):  # each connection may land on either worker
        ((code, text),) = await _rcpt(port, "new@example.net")
        assert code == 550 and "suppressed until" in text and "asked" not in text, text
    # ... knowing of the change from the daemon's count of its writes, in
    # memory each of them maps, not from a stat of the list at every RCPT
    assert daemon.proc is not None
    pid = daemon.proc.pid
    workers = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(workers) == 2
    for worker in workers:
        assert "/memfd:spoold-suppressed-changes" in Path(f"/proc/{worker}/maps").read_text()


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value() == expected)


async def test_the_list_survives_a_restart_and_damage(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer
) -> None:
    server = await start_smtp_server()
    _hop_answers(server)
    port = free_port()
    config = _config(tmp_path, server.hop, port, 'suppress_after_hard_bounce = "30d"\n')
    daemon = await start_daemon(config)
    await _bounce_gone(daemon, port, server)
    done = await _ctl(daemon, "suppress", "add", "op@example.org", "--for", "1d")
    assert done.code == 0, done.err
    daemon.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0

    # and a line damaged by hand while it was stopped costs only that line
    listed = daemon.spool_dir / "suppressed"
    listed.write_bytes(listed.read_bytes() + b'{"address": "cut@exa\n')

    daemon = await start_daemon(config)
    assert await _addresses(daemon) == [GONE, "op@example.org"]
    ((code, text),) = await _rcpt(port, GONE)
    assert code == 550, text
    assert "suppression list damaged: these lines were skipped, the rest kept" in (
        daemon.log_text()
    )


async def test_without_the_key_a_hard_bounce_suppresses_nobody(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer
) -> None:
    server = await start_smtp_server()
    _hop_answers(server)
    port = free_port()
    daemon = await start_daemon(_config(tmp_path, server.hop, port, ""))
    replies = await _rcpt(port, GONE, OK)
    assert [c for c, _ in replies] == [250, 250, 250]
    await wait_until(lambda: len(server.messages) == 1, daemon.log_text, interval=POLL)
    await wait_until(lambda: _frozen(daemon), "the message frozen", interval=POLL)
    assert await _addresses(daemon) == []
    assert [c for c, _ in await _rcpt(port, GONE)] == [250, 250]
    assert not (daemon.spool_dir / "suppressed").exists()


async def _frozen(daemon: DaemonProcess) -> list[dict[str, Any]]:
    done = await _ctl(daemon, "status", "--format", "json")
    views = [json.loads(line) for line in done.out.splitlines()]
    return [v for v in views if v["status"] == "frozen"]


async def test_fail_mode_takes_the_message_and_fails_the_recipient(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer
) -> None:
    server = await start_smtp_server()
    port = free_port()
    config = _config(tmp_path, server.hop, port, 'suppressed_recipients = "fail"\n')
    daemon = await start_daemon(config)
    done = await _ctl(daemon, "suppress", "add", GONE, "--reason", "unsubscribed")
    assert done.code == 0, done.err

    replies = await _rcpt(port, GONE, OK)
    assert [c for c, _ in replies] == [250, 250, 250], replies  # taken
    (view,) = await wait_until(lambda: _frozen(daemon), "frozen", interval=POLL)
    assert view["failed_recipients"] == [GONE]
    assert "550 5.7.1 recipient suppressed until" in view["relay_attempts"][0]["error"]
    # not the operator's reason (the sender reads it), not credited to the hop
    assert view["relay_attempts"][0]["error"].endswith("; not sent"), view["relay_attempts"]
    assert "unsubscribed" not in view["relay_attempts"][0]["error"]
    assert [m.rcpt_tos for m in server.messages] == [(OK,)]  # never sent to GONE
    assert (await _listed(daemon))["counts"]["failed"] == 1


async def test_bounces_are_lifted_at_once_and_a_full_list_says_what_it_did_not_keep(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer
) -> None:
    """``suppress remove --source bounce`` lifts what a wave of bounces
    did and leaves an operator's entries; ``suppress add`` whose entry the
    bound drops at once says so and exits 1; a bounce never pushes an
    operator's entry off the list."""
    server = await start_smtp_server()
    _hop_answers(server)
    port = free_port()
    config = _config(
        tmp_path, server.hop, port, 'suppress_after_hard_bounce = "30d"\nmax_suppressed = 2\n'
    )
    daemon = await start_daemon(config)
    await _bounce_gone(daemon, port, server)
    done = await _ctl(daemon, "suppress", "add", "op@example.net", "--for", "20d")
    assert done.code == 0, done.err
    # full (GONE, op): an operator's entry closest to its end is not kept
    done = await _ctl(daemon, "suppress", "add", "short@example.net", "--for", "1h")
    assert done.code == 0, done.err  # GONE (a bounce) made room
    assert sorted(await _addresses(daemon)) == ["op@example.net", "short@example.net"]
    done = await _ctl(daemon, "suppress", "add", "shorter@example.net", "--for", "1m")
    assert done.code == 1, (done.out, done.err)
    assert "not kept: shorter@example.net" in done.err
    assert sorted(await _addresses(daemon)) == ["op@example.net", "short@example.net"]

    # a bounce finds the list full of an operator's entries: it is not kept
    replies = await _rcpt(port, GONE)
    assert [c for c, _ in replies] == [250, 250], replies
    await wait_until(
        lambda: daemon.log_text().count("suppression list full") == 3,
        "the bounce entry's drop logged",
        interval=POLL,
    )
    assert sorted(await _addresses(daemon)) == ["op@example.net", "short@example.net"]

    # lift every bounce entry (none now but one from a moment ago) and no other
    await _ctl(daemon, "suppress", "remove", "short@example.net")
    replies = await _rcpt(port, GONE)
    assert [c for c, _ in replies] == [250, 250], replies
    await wait_until(lambda: _has(daemon, GONE), "GONE suppressed again", interval=POLL)
    done = await _ctl(daemon, "suppress", "remove", "--source", "bounce", "--since", "1h")
    assert done.code == 0, done.err
    assert done.out.splitlines() == [f"lifted: {GONE}", "1 lifted"]
    assert await _addresses(daemon) == ["op@example.net"]
    done = await _ctl(daemon, "suppress", "remove", "--since", "1h")
    assert done.code == 2 and "--since goes with --source" in done.err
    client = Client(daemon.socket)
    assert await anyio.to_thread.run_sync(lambda: client.unsuppress_source("bounce")) == []


async def _has(daemon: DaemonProcess, address: str) -> bool:
    return address in await _addresses(daemon)
