"""The moments an operator reaches for the tool, end to end through a real
daemon (``spoold run`` in a subprocess) and the ``spoold`` CLI, with
in-process SMTP servers as next hops.

* The smarthost was wrong: fix the route, reload, send, and the queue drains
  to the new hop.
* A new route takes some recipients: reroute splits the queued messages.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from spoold.daemon.control import ControlClient
from spoold.message import Frozen
from tests.daemon_helpers import (
    DaemonFactory,
    cli,
    prefill,
    set_config_value,
    spooled,
    write_config,
)
from tests.smtp_server import SmtpTestServer, StartServer
from tests.support import free_port, wait_until

CONTENT = b"Subject: recipe\r\n\r\nhello\r\n"


async def submit(client: ControlClient, *recipients: str) -> list[str]:
    ids: list[str] = await client.request(
        "submit",
        sender="app@example.org",
        recipients=list(recipients),
        content=base64.b64encode(CONTENT).decode(),
    )
    return ids


async def views(client: ControlClient) -> dict[str, dict[str, Any]]:
    return {v["id"]: v for v in await client.request("status")}


async def test_fix_the_smarthost_reload_send_and_the_queue_drains(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    config = write_config(tmp_path, next_hops=[f"127.0.0.1:{free_port()}"])
    await start_daemon(config)
    client = ControlClient(tmp_path / "run" / "ctl.sock")
    ids = [mid for _ in range(14) for mid in await submit(client, "rcpt@example.com")]

    async def all_deferred() -> bool:
        current = await views(client)
        return all(current[i]["relay_attempts"] for i in ids)

    await wait_until(all_deferred, "every message to fail once", interval=0.05)
    assert {v["route"] for v in (await views(client)).values()} == {"smarthost"}

    set_config_value(config, "next_hops", f'["{smtp_server.hop}"]')
    reloaded = cli("--config", str(config), "reload")
    assert reloaded.code == 0, reloaded.err
    sent = cli("--config", str(config), "send", "--all")
    assert sent.code == 0, sent.err
    assert sent.out.strip() == "sending 14 message(s)"

    async def drained() -> bool:
        return smtp_server.transactions == 14 and not await views(client)

    await wait_until(drained, "the queue to drain to the new hop", interval=0.05)
    assert all(m.rcpt_tos == ("rcpt@example.com",) for m in smtp_server.messages)


async def test_a_new_route_and_reroute_split_queued_messages(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer
) -> None:
    smart = await start_smtp_server()
    partner = await start_smtp_server()
    dead = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, next_hops=[dead])
    await start_daemon(config)
    client = ControlClient(tmp_path / "run" / "ctl.sock")
    (mid,) = await submit(client, "a@one.example", "b@partner.example")

    async def deferred() -> bool:
        return bool((await views(client))[mid]["relay_attempts"])

    await wait_until(deferred, "the first attempt", interval=0.05)

    set_config_value(config, "next_hops", f'["{smart.hop}"]')
    with config.open("a") as f:
        f.write(
            f'\n[routes.partners]\ndomains = ["partner.example"]\nnext_hops = ["{partner.hop}"]\n'
            'tls = "none"\n'
        )
    assert cli("--config", str(config), "reload").code == 0
    done = cli("--config", str(config), "reroute", mid)
    assert done.code == 0, done.err
    assert done.out.startswith("rerouted: 2 message(s)")
    current = await views(client)
    assert len(current) == 2
    other = next(i for i in current if i != mid)
    assert current[mid]["remaining_recipients"] == ["a@one.example"]
    assert current[mid]["next_hop_choices"] == [smart.hop]
    assert current[other]["remaining_recipients"] == ["b@partner.example"]
    assert current[other]["next_hop_choices"] == [partner.hop]
    assert current[other]["route"] == "partners"
    assert current[other]["parent_id"] == current[mid]["parent_id"]
    assert other in current[mid]["related_ids"]

    assert cli("--config", str(config), "send", "--all").code == 0

    async def delivered() -> bool:
        return smart.transactions == 1 and partner.transactions == 1

    await wait_until(delivered, "both parts to be delivered", interval=0.05)
    assert smart.messages[0].rcpt_tos == ("a@one.example",)
    assert partner.messages[0].rcpt_tos == ("b@partner.example",)


def test_reroute_usage_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path, next_hops=["127.0.0.1:25"])
    for args in ([], ["--all", "8DsdYFTK43e1xdIEW"]):
        done = cli("--config", str(config), "reroute", *args)
        assert done.code == 2
        assert "give message ids or --all" in done.err


# ------------------------------------------------------ a broken config


async def test_the_cli_reaches_the_daemon_when_the_config_is_broken(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    config = write_config(tmp_path, next_hops=["127.0.0.1:25"])
    daemon = await start_daemon(config)
    good = config.read_text()
    for broken in (
        good.replace('dir = "spool"', 'dir = "spool"\nmax_concurrent_send_jobs = = 3'),  # TOML
        good + "\n[spool2]\ntypo = 1\n",  # valid TOML, invalid config
    ):
        config.write_text(broken)
        for args in (["status"], ["count"], ["info"]):
            done = cli("--config", str(config), *args)
            assert done.code == 0, (args, done.err)
            assert "is not valid" in done.err  # said once, then served
        assert json.loads(cli("--config", str(config), "info").out)["pid"] == daemon.pid
        done = cli("--config", str(config), "reload")
        assert done.code == 1
        assert "reload refused; the running config stays" in done.err
    assert daemon.running
    config.write_text(good)
    assert cli("--config", str(config), "reload").code == 0


async def test_socket_alone_needs_no_config(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    config = write_config(tmp_path, next_hops=["127.0.0.1:25"])
    await start_daemon(config)
    config.unlink()
    socket = str(tmp_path / "run" / "ctl.sock")
    for args in (["status"], ["count"], ["info"]):
        done = cli("--socket", socket, *args)
        assert done.code == 0, (args, done.err)
        assert done.err == ""


# ---------------------------------------------------- damaged records


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: b"\x00\xff not a record \xfe",
}


async def test_check_finds_damaged_records_and_they_stay_visible(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    config = write_config(tmp_path, next_hops=["127.0.0.1:25"])
    spool_dir = tmp_path / "spool"
    ids = await prefill(spool_dir, [spooled("127.0.0.1:25", status=Frozen()) for _ in DAMAGE])
    for mid, damage in zip(ids, DAMAGE.values(), strict=True):
        path = spool_dir / "frozen" / mid
        path.write_bytes(damage(path.read_bytes()))

    done = cli("--config", str(config), "check")  # no daemon: read from disk
    assert done.code == 1
    found = [line for line in done.out.splitlines() if line.startswith("unreadable: ")]
    assert sorted(line.split()[1].rstrip(":") for line in found) == sorted(ids)
    assert "spool is consistent" not in done.out

    await start_daemon(config)  # sets them aside in quarantine
    listed = cli("--config", str(config), "status", "--quarantined", "--format", "json")
    assert listed.code == 0, listed.err
    views = {v["id"]: v for v in map(json.loads, listed.out.splitlines())}
    assert sorted(views) == sorted(ids)
    for view in views.values():
        assert view["queue"] == "quarantine"
        assert view["unreadable"] is True
        assert view["quarantine_reason"].startswith("unreadable record:")
    shown = cli("--config", str(config), "show", ids[0])
    assert shown.code == 0, shown.err
    assert json.loads(shown.out)["quarantine_reason"] == views[ids[0]]["quarantine_reason"]
    table = cli("--config", str(config), "status", "--quarantined", "--wide")
    assert table.code == 0
    assert all(mid in table.out for mid in ids)
    assert "unreadable record" in table.out
    assert cli("--config", str(config), "check").code == 0  # set aside: nothing left to report
