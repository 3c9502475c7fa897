"""The control protocol as :mod:`spoold.protocol` declares it, against
``docs/control-protocol.md`` and against what the daemon sends.

* the reference's tables (operations and their parameters, error kinds,
  event keys, result keys) name what the declarations hold, no more, no
  less;
* every request encodes to the line the reference describes and decodes
  back to itself; a reply line decodes to its parts;
* every operation asked of a real control server (a real spool, a real
  Unix socket) answers a result of its declared type, key for key; the
  operations the daemon adds are asked of a ``spoold run`` subprocess.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from spoold.daemon.control_client import ControlClient
from spoold.daemon.control_server import ControlServer
from spoold.message import RetryInterval
from spoold.protocol import (
    ERROR_KINDS,
    PROTOCOL_VERSION,
    REQUESTS,
    RESULTS,
    SUBMISSION_OPERATIONS,
    CheckRequest,
    CountRequest,
    Counts,
    DepartedView,
    Encoded,
    EventsRequest,
    EventView,
    FleetNodeView,
    FleetStatus,
    FleetStatusRequest,
    FreezeRequest,
    HistoryRecipientView,
    HistoryRequest,
    HistoryView,
    Info,
    InfoRequest,
    OutcomeView,
    PingRequest,
    RecoverRequest,
    ReloadRequest,
    ReloadResult,
    RemoveRequest,
    Request,
    RerouteRequest,
    RetryPlanRequest,
    RetryPlanView,
    SendRequest,
    ShowRequest,
    StatusEnd,
    StatusRequest,
    SubmitRequest,
    SuppressAddRequest,
    SuppressionCountsView,
    SuppressionListView,
    SuppressionView,
    SuppressListRequest,
    SuppressRemoveRequest,
    WaitRequest,
    WebhooksRequest,
    WebhookStatus,
    decode_params,
    decode_raw_page,
    decode_reply,
    encode_reply,
    encode_request,
    error_reply,
    ok_reply,
    op_of,
    reply_kind,
)
from spoold.relay import AttemptFailed, RecipientResult
from spoold.spool import Spool
from spoold.testing import InMemoryRelay
from tests.daemon_helpers import DaemonFactory, write_config
from tests.spool_helpers import batch
from tests.support import WAIT_TIMEOUT, wait_until

DOC = (Path(__file__).resolve().parent.parent / "docs" / "control-protocol.md").read_text()


def _section(title: str) -> str:
    """The text of the doc's section ``## title``, up to the next one."""
    start = DOC.index(f"\n## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else len(DOC)]


def _table(title: str) -> list[list[str]]:
    """The rows of the first table of a section, as cells (header and rule left out)."""
    rows = [
        [cell.strip() for cell in line.strip()[1:-1].split("|")]
        for line in _section(title).splitlines()
        if line.startswith("| ")
    ]
    return rows[1:]


def _names(text: str) -> set[str]:
    """The parameter names a cell gives: each backticked word (values,
    quoted or ``true``/``false``/``null``, left out)."""
    return set(re.findall(r"`([a-z_]+)`", text)) - {"true", "false", "null"}


def _keys(text: str) -> set[str]:
    """The keys of the JSON objects written in ``text``: ``{"a", "b": ...}``."""
    return set(re.findall(r'"(\w+)"(?=\s*[,:}])', text))


def _fields(kind: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(kind)}


OPERATIONS_TABLE = {row[0].strip("`"): row for row in _table("Operations")}


# ------------------------------------------------- against the reference


def test_the_operations_are_those_of_the_reference() -> None:
    assert set(OPERATIONS_TABLE) == set(REQUESTS) == set(RESULTS)
    assert all(op_of(kind) == op for op, kind in REQUESTS.items())


@pytest.mark.parametrize("op", sorted(REQUESTS))
def test_each_operation_takes_the_parameters_the_reference_names(op: str) -> None:
    _, parameters, _ = OPERATIONS_TABLE[op]
    assert _fields(REQUESTS[op]) == _names(parameters)


def test_the_version_and_the_submission_operations_are_those_of_the_reference() -> None:
    assert f'"v": {PROTOCOL_VERSION}' in _section("Framing")
    intro = DOC[: DOC.index("\n## ")]
    served = re.search(r"serves only (`\w+`(?:, `\w+`)* and `\w+`)", intro)
    assert served is not None
    assert _names(served.group(1)) == set(SUBMISSION_OPERATIONS) == {"submit", "wait", "ping"}


def test_the_error_kinds_are_those_of_the_reference() -> None:
    assert {row[0].strip("`") for row in _table("Errors")} == set(ERROR_KINDS)


def test_the_result_keys_are_those_of_the_reference() -> None:
    def result(op: str) -> str:
        return OPERATIONS_TABLE[op][2]

    assert _keys(result("count")) == _fields(Counts)
    assert _keys(result("retry_plan")) == _fields(RetryPlanView)
    assert _keys(result("info")) == _fields(Info)
    fleet = result("fleet_status")
    assert _keys(fleet[: fleet.index("`nodes`: `null`")]) == _fields(FleetStatus)
    assert _keys(fleet[fleet.index("`nodes`: `null`") :]) == _fields(FleetNodeView)
    assert _keys(result("reload")) == _fields(ReloadResult)
    assert _keys(result("webhooks")) == _fields(WebhookStatus)
    listing = result("suppress_list")
    assert _keys(listing) == (
        _fields(SuppressionListView) | _fields(SuppressionView) | _fields(SuppressionCountsView)
    )
    departed = re.search(r'`(\{"id", "queue": null.*?\})`', result("show"))
    assert departed is not None and _keys(departed.group(1)) == _fields(DepartedView)
    history = result("history")
    rerouted = {"rerouted_to", "rerouted_state"}
    line = history[: history.index("a recipient in state")]
    assert _keys(line) == _fields(HistoryView) | _fields(HistoryRecipientView) - rerouted
    assert _names(history[len(line) :]) >= rerouted
    wait = re.search(r"The result\s+is `(\{.*?\})`", _section("`wait`"), re.DOTALL)
    assert wait is not None and _keys(wait.group(1)) == _fields(OutcomeView)
    end = re.search(r'"result": (\{"listed".*?\})', _section("`status` in pages"), re.DOTALL)
    assert end is not None and _keys(end.group(1)) == _fields(StatusEnd)


def test_the_event_keys_are_those_of_the_reference() -> None:
    assert set().union(*(_names(row[0]) for row in _table("`events`"))) == _fields(EventView)


# ------------------------------------------------------------ the lines

EVERY_FIELD: dict[str, Request] = {
    "ping": PingRequest(),
    "status": StatusRequest(
        queue="quarantine",
        only_ids=True,
        stream=True,
        after="8DsiAAAAAAAAAAAAA",
        limit=10,
        domain="example.com",
        older_than="1h",
        newer_than="2d",
        error="refused",
    ),
    "count": CountRequest(),
    "show": ShowRequest(id="8DsiAAAAAAAAAAAAA", body=True),
    "retry_plan": RetryPlanRequest(id="8DsiAAAAAAAAAAAAA"),
    "history": HistoryRequest(since="2h", recipient="ops@example.com"),
    "freeze": FreezeRequest(ids=["A1", "B2"]),
    "send": SendRequest(which="all", ids=["A1"], retry_intervals=["10m"]),
    "remove": RemoveRequest(ids=["A1"]),
    "recover": RecoverRequest(ids=["A1"], source="quarantine"),
    "reroute": RerouteRequest(which="all", ids=["A1"]),
    "check": CheckRequest(max_age=60.0, quick=True),
    "info": InfoRequest(),
    "fleet_status": FleetStatusRequest(),
    "reload": ReloadRequest(),
    "webhooks": WebhooksRequest(),
    "submit": SubmitRequest(
        sender="app@example.org",
        recipients=["ops@example.com"],
        content_length=22,
        content="aGk=",
        idempotency_key="order-1",
    ),
    "wait": WaitRequest(id="8DsiAAAAAAAAAAAAA", timeout=5.0),
    "events": EventsRequest(),
    "suppress_list": SuppressListRequest(addresses=["gone@example.com"]),
    "suppress_add": SuppressAddRequest(
        addresses=["gone@example.com"], span="30d", reason="asked to stop"
    ),
    "suppress_remove": SuppressRemoveRequest(
        addresses=["gone@example.com"], source="bounce", since="2h"
    ),
}


def test_every_operation_has_an_example_here() -> None:
    assert set(EVERY_FIELD) == set(REQUESTS)
    assert all(type(request) is REQUESTS[op] for op, request in EVERY_FIELD.items())


@pytest.mark.parametrize("op", sorted(EVERY_FIELD))
def test_a_request_is_one_line_that_decodes_back(op: str) -> None:
    request = EVERY_FIELD[op]
    line = encode_request(request)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    sent = json.loads(line)
    assert list(sent)[:2] == ["v", "op"]
    assert sent["v"] == PROTOCOL_VERSION and sent["op"] == op
    assert set(sent) - {"v", "op"} == _fields(REQUESTS[op])  # every field, as given
    assert decode_params(REQUESTS[op], sent) == request


def test_defaults_stay_off_the_line() -> None:
    """A daemon from before a parameter refuses its name: a client sends
    only what differs from the default."""
    assert encode_request(CheckRequest()) == b'{"v":1,"op":"check"}\n'
    assert encode_request(StatusRequest(queue="frozen")) == (
        b'{"v":1,"op":"status","queue":"frozen"}\n'
    )
    assert encode_request(RecoverRequest(ids=["A1"], source="removed")) == (
        b'{"v":1,"op":"recover","ids":["A1"],"from":"removed"}\n'
    )
    assert encode_request(WaitRequest(id="A1", timeout=0.0)) == (
        b'{"v":1,"op":"wait","id":"A1","timeout":0.0}\n'
    )


def test_a_request_line_is_ascii() -> None:
    line = encode_request(HistoryRequest(recipient="jörg@example.com"))
    assert line == b'{"v":1,"op":"history","recipient":"j\\u00f6rg@example.com"}\n'
    assert decode_params(HistoryRequest, json.loads(line)).recipient == "jörg@example.com"


@pytest.mark.parametrize(
    ("kind", "fields", "error"),
    [
        (ShowRequest, {"id": "A1", "bodyy": True}, "Object contains unknown field `bodyy`"),
        (FreezeRequest, {}, "Object missing required field `ids`"),
        (ShowRequest, {"id": 5}, "Expected `str`, got `int` - at `$.id`"),
        (StatusRequest, {"queue": "x"}, "queue must be one of all, active, frozen, quarantine"),
        (RecoverRequest, {"ids": ["A1"], "from": "active"}, "from must be one of removed"),
    ],
)
def test_a_bad_parameter_is_named(kind: type[Request], fields: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        decode_params(kind, {"v": 1, "op": op_of(kind), **fields})


def test_reply_lines_encode_and_decode() -> None:
    ok = encode_reply(ok_reply({"when": datetime(2026, 11, 25, 12, 0, tzinfo=UTC)}))
    assert ok == b'{"ok":true,"result":{"when":"2026-11-25T12:00:00Z"}}\n'
    assert decode_reply(ok).result == {"when": "2026-11-25T12:00:00Z"}
    assert encode_reply(ok_reply(Encoded(b"[1,2]"))) == b'{"ok":true,"result":[1,2]}\n'
    for kind in sorted(ERROR_KINDS):
        line = encode_reply(error_reply(kind, "naïve"))  # type: ignore[arg-type]
        assert line == b'{"ok":false,"kind":"%s","error":"na\\u00efve"}\n' % kind.encode()
        reply = decode_reply(line)
        assert (reply.ok, reply.kind, reply.error, reply_kind(reply)) == (
            False,
            kind,
            "naïve",
            kind,
        )
    newer = decode_reply(b'{"ok":false,"kind":"sideways","error":"?"}')
    assert reply_kind(newer) == "internal"
    assert decode_raw_page(b'{"ok":true,"page":[{"id":"A1"},"B2"]}') == [b'{"id":"A1"}', b'"B2"']
    assert decode_raw_page(b'{"ok":true,"result":null}') is None
    with pytest.raises(ValueError, match="not a reply"):
        decode_reply(b"pong\n")


# ----------------------------------------------- what the server answers


def _conforms(value: Any, types: tuple[Any, ...]) -> bool:
    """Whether ``value`` is one of ``types`` key for key: it decodes, and
    encodes back to itself (an undeclared key would be lost on the way)."""
    for kind in types:
        try:
            decoded = msgspec.convert(value, kind)
        except msgspec.ValidationError:
            continue
        if msgspec.to_builtins(decoded) == value:
            return True
    return False


def _conforms_to_result(op: str, result: Any) -> bool:
    if op == "status":  # a quarantine listing mixes readable and unreadable records
        return isinstance(result, list) and all(
            any(_conforms([item], (kind,)) for kind in RESULTS[op]) for item in result
        )
    return _conforms(result, RESULTS[op])


HELD = "held@example.com"  # answered 451: its message waits for a retry
REFUSED = "refused@example.com"  # answered 550: its message is frozen


def _answer(_msg: Any, rcpt: str) -> RecipientResult | AttemptFailed:
    if rcpt == HELD:
        return RecipientResult(451, "4.7.1 try later")
    if rcpt == REFUSED:
        return RecipientResult(550, "5.1.1 no such user")
    return RecipientResult(250, "ok")


@asynccontextmanager
async def serving(
    tmp_path: Path,
) -> AsyncIterator[tuple[Spool, ControlServer, ControlClient]]:
    path = tmp_path / "c.sock"
    relay = InMemoryRelay(respond=_answer)
    async with Spool.open(tmp_path / "spool", relay=relay, flush_timeout=0.1) as spool:
        server = ControlServer(spool)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, path, 0o600)
            yield spool, server, ControlClient(path, timeout=WAIT_TIMEOUT)
            tg.cancel_scope.cancel()


async def test_every_spool_operation_answers_its_declared_result(tmp_path: Path) -> None:
    hour = [RetryInterval(timedelta(hours=1))]
    with anyio.fail_after(WAIT_TIMEOUT):
        async with serving(tmp_path) as (spool, _, client):
            async with spool.events() as events:
                (delivered,) = await spool.add(batch("ops@example.com"))
                (held,) = await spool.add(batch(HELD, retry_intervals=hour))
                (refused,) = await spool.add(batch(REFUSED))
                (frozen,) = await spool.add(batch("later@example.com"), frozen=True)
                async for event in events:  # held waits for its next attempt
                    if event.id == held and str(event.kind) == "delayed":
                        break
            await spool.wait(delivered, WAIT_TIMEOUT)
            await spool.wait(refused, WAIT_TIMEOUT)

            asked: dict[str, Any] = {
                "ping": PingRequest(),
                "status": StatusRequest(),
                "show": ShowRequest(id=held, body=True),
                "retry_plan": RetryPlanRequest(id=held),
                "history": HistoryRequest(),
                "wait": WaitRequest(id=refused),
                "freeze": FreezeRequest(ids=[held]),
                "send": SendRequest(ids=[frozen], retry_intervals=["10m"]),
                "remove": RemoveRequest(ids=[refused]),
                "recover": RecoverRequest(ids=[refused], source="removed"),
                "suppress_add": SuppressAddRequest(addresses=[HELD], reason="by hand"),
                "suppress_list": SuppressListRequest(),
                "suppress_remove": SuppressRemoveRequest(addresses=[HELD]),
            }
            only_ids = await client.ask(StatusRequest(only_ids=True))
            pages = [p async for p in client.status_pages(request=StatusRequest(limit=1))]
            answered = {op: await client.ask(request) for op, request in asked.items()}
            answered["departed"] = await client.ask(ShowRequest(id=delivered))

    assert answered["ping"] == "pong"
    for op in asked:
        assert _conforms_to_result(op, answered[op]), (op, answered[op])
    assert _conforms(answered["departed"], (DepartedView,))
    assert _conforms(only_ids, RESULTS["status"]) and sorted(only_ids) == only_ids
    assert pages == [answered["status"][:1]]
    assert [v["id"] for v in answered["status"]] == only_ids == sorted([held, refused, frozen])
    assert answered["show"]["body"]  # the message, base64
    assert answered["wait"]["outcome"] == "frozen"
    assert [e["address"] for e in answered["suppress_list"]["entries"]] == [HELD]
    assert answered["suppress_remove"] == [HELD]
    assert [o["id"] for o in answered["history"]] == [delivered]


async def test_events_and_a_quarantine_listing_answer_their_declared_shapes(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(WAIT_TIMEOUT):
        async with serving(tmp_path) as (spool, server, client):
            seen: list[dict[str, Any]] = []

            async def read() -> None:
                async for event in client.events():
                    seen.append(event)
                    if event["event"] == "quarantined":
                        return

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await wait_until(lambda: server.staying == 1, "the subscriber")
                (mid,) = await spool.add(batch("ops@example.com"), frozen=True)
                await spool.quarantine("checked by hand", batch("x@example.com"))
            (spool.ondisk.dir / "quarantine" / "BROKEN1").write_text("not a record")
            listing = await client.ask(StatusRequest(queue="quarantine"))

    assert [e["event"] for e in seen] == ["spooled", "frozen", "quarantined"]
    assert seen[0]["id"] == mid
    assert all(_conforms(event, (EventView,)) for event in seen)
    assert _conforms_to_result("status", listing)
    assert {v.get("unreadable", False) for v in listing} == {True, False}


async def test_the_daemon_operations_answer_their_declared_results(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    config = write_config(tmp_path, next_hops=["127.0.0.1:9"])  # nobody answers: delayed
    await start_daemon(config)
    client = ControlClient(tmp_path / "run" / "ctl.sock", timeout=WAIT_TIMEOUT)
    submitted = await client.submit("app@example.org", ["ops@example.com"], b"Subject: hi\r\n\r\n")
    with anyio.fail_after(WAIT_TIMEOUT):
        while (await client.ask(ShowRequest(id=submitted[0])))["status"] != "send_at":
            await anyio.sleep(0.05)
    answered = {
        "count": await client.ask(CountRequest()),
        "info": await client.ask(InfoRequest()),
        "fleet_status": await client.ask(FleetStatusRequest()),
        "reload": await client.ask(ReloadRequest()),
        "check": await client.ask(CheckRequest(quick=True)),
        "reroute": await client.ask(RerouteRequest(ids=submitted)),
    }
    for op, result in answered.items():
        assert _conforms_to_result(op, result), (op, result)
    assert _conforms_to_result("submit", submitted) and len(submitted) == 1
    assert answered["reload"]["applied"] is True
    config.write_text(config.read_text() + "\n[bogus]\n")
    refused = await client.ask(ReloadRequest())
    assert _conforms_to_result("reload", refused) and refused["applied"] is False
