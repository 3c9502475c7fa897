"""History after a reroute split, through a running daemon.

A message to A and B waits on a dead smarthost; a new route takes B's
domain (to a hop that is dead too); ``spoold reroute`` splits B off into
a new message; the smarthost is fixed and A is delivered. The journal
line of the original message must not say B was delivered: B is
``rerouted`` to the new message, which ``history --recipient B`` shows as
still queued, and later as delivered once its own next hop took it.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from spoold.daemon.control import ControlClient
from tests.daemon_helpers import CliResult, DaemonFactory, cli, set_config_value, write_config
from tests.smtp_server import StartServer
from tests.support import free_port, wait_until
from tests.test_operator_recipes import submit

A, B = "a@one.example", "b@partner.example"


async def run(config: Path, *args: str) -> CliResult:
    done: CliResult = await anyio.to_thread.run_sync(partial(cli, "--config", str(config), *args))
    assert done.code == 0, done.err
    return done


async def history_of(config: Path, recipient: str) -> list[dict[str, Any]]:
    done = await run(config, "history", "--recipient", recipient, "--format", "json")
    return [json.loads(line) for line in done.out.splitlines()]


def partners_route(hop: str) -> str:
    return (
        f'\n[routes.partners]\ndomains = ["partner.example"]\nnext_hops = ["{hop}"]\ntls = "none"\n'
    )


async def test_history_never_says_delivered_for_a_recipient_split_off_by_reroute(
    tmp_path: Path, start_daemon: DaemonFactory, start_smtp_server: StartServer
) -> None:
    smart = await start_smtp_server()
    partner = await start_smtp_server()
    dead = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, next_hops=[dead])
    await start_daemon(config)
    client = ControlClient(tmp_path / "run" / "ctl.sock")
    (mid,) = await submit(client, A, B)

    async def attempts(message_id: str) -> int:
        view = await client.request("show", id=message_id)
        return len(view.get("relay_attempts") or [])

    await wait_until(lambda: attempts(mid), "the first attempt", interval=0.05)

    # B's domain gets a route of its own, to a hop that is dead too.
    set_config_value(config, "next_hops", f'["{smart.hop}"]')
    dead_partner = f"127.0.0.1:{free_port()}"
    with config.open("a") as f:
        f.write(partners_route(dead_partner))
    await run(config, "reload")
    rerouted = await run(config, "reroute", mid)
    assert rerouted.out.startswith("rerouted: 2 message(s)")
    listing = {v["id"]: v for v in await client.request("status", queue="all")}
    (other,) = [i for i in listing if i != mid]
    assert listing[mid]["rerouted_to"] == {B: other}
    assert listing[other]["envelope_info"]["recipients"] == [B]  # its own only
    assert "rerouted_to" not in listing[other]
    await run(config, "send", "--all")
    await wait_until(lambda: smart.transactions == 1, "A delivered", interval=0.05)
    await wait_until(lambda: attempts(other), "B's part tried its dead hop", interval=0.05)
    assert smart.messages[0].rcpt_tos == (A,)

    async def original_journalled() -> list[dict[str, Any]]:
        return await history_of(config, B)

    (line,) = await wait_until(original_journalled, "the original's outcome", interval=0.05)
    assert (line["id"], line["outcome"]) == (mid, "delivered")
    states = {r["recipient"]: r for r in line["recipients"]}
    assert states[A]["state"] == "delivered"
    assert states[B]["state"] == "rerouted"
    assert states[B]["rerouted_to"] == other
    # Still queued: its last retry interval repeats until the queue lifetime
    # ends (spool.retries_exhausted), so it waits for its next attempt.
    assert states[B]["rerouted_state"] == "send_at"
    table = (await run(config, "history", "--recipient", B)).out
    assert f"    {B} rerouted to {other} (now send_at)" in table.splitlines()
    assert f"{B} delivered" not in table
    assert [o["id"] for o in await history_of(config, A)] == [mid]  # only the original had A

    # B's route is fixed: its own message is delivered, and says so.
    config.write_text(config.read_text().replace(dead_partner, partner.hop))
    await run(config, "reload")
    await run(config, "send", other)
    await wait_until(lambda: partner.transactions == 1, "B delivered", interval=0.05)
    assert partner.messages[0].rcpt_tos == (B,)

    async def both_journalled() -> list[dict[str, Any]]:
        found = await history_of(config, B)
        return found if len(found) == 2 else []

    first, second = await wait_until(both_journalled, "B's own outcome", interval=0.05)
    assert first["id"] == mid
    (moved,) = [r for r in first["recipients"] if r["recipient"] == B]
    assert (moved["state"], moved["rerouted_state"]) == ("rerouted", "delivered")
    assert (second["id"], second["outcome"]) == (other, "delivered")
    assert [(r["recipient"], r["state"]) for r in second["recipients"]] == [(B, "delivered")]
