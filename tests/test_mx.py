"""MX routes: lookup order, TTL cache, failures; routing with MX."""

from __future__ import annotations

from pathlib import Path

import pytest

from spoold.daemon.config import parse_config
from spoold.daemon.mx import MxResolver
from spoold.daemon.routing import Router
from spoold.errors import MxError, NoRouteError
from tests.factories import make_message


class FakeDns:
    def __init__(self, answers: dict[str, tuple[list[tuple[int, str]], float] | MxError]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, domain: str) -> tuple[list[tuple[int, str]], float]:
        self.asked.append(domain)
        answer = self.answers[domain]
        if isinstance(answer, MxError):
            raise answer
        return answer


async def test_exchangers_by_preference_then_dns_order() -> None:
    dns = FakeDns({"example.com": ([(20, "c.mx"), (10, "b.mx"), (10, "a.mx")], 300)})
    resolver = MxResolver(dns)
    assert await resolver.next_hops("Example.COM.") == ["b.mx:25", "a.mx:25", "c.mx:25"]


async def test_answers_are_cached_for_their_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("spoold.daemon.mx.time.monotonic", lambda: now[0])
    dns = FakeDns({"example.com": ([(10, "mx1")], 60)})
    resolver = MxResolver(dns)
    await resolver.next_hops("example.com")
    now[0] += 59
    await resolver.next_hops("example.com")
    assert dns.asked == ["example.com"]
    now[0] += 2
    await resolver.next_hops("example.com")
    assert dns.asked == ["example.com", "example.com"]


async def test_failures_are_cached_and_keep_their_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr("spoold.daemon.mx.time.monotonic", lambda: now[0])
    dns = FakeDns(
        {
            "gone.example": MxError("domain gone.example does not exist", permanent=True),
            "slow.example": MxError("MX lookup of slow.example failed: timeout", permanent=False),
        }
    )
    resolver = MxResolver(dns, negative_ttl=60)
    for _ in range(2):
        with pytest.raises(MxError) as info:
            await resolver.next_hops("gone.example")
        assert info.value.permanent
    assert dns.asked == ["gone.example"]
    with pytest.raises(MxError) as info:
        await resolver.next_hops("slow.example")
    assert not info.value.permanent


async def test_null_mx_refuses_mail() -> None:
    resolver = MxResolver(FakeDns({"nomail.example": ([(0, ".")], 300)}))
    with pytest.raises(MxError, match="accepts no mail") as info:
        await resolver.next_hops("nomail.example")
    assert info.value.permanent


def router(tmp_path: Path, dns: FakeDns) -> Router:
    config = parse_config(
        {
            "spool": {"dir": "spool"},
            "relay": {"default_route": "internet"},
            "routes": {
                "internet": {"mx": True, "tls": "required"},
                "local": {"domains": ["corp.example"], "next_hops": ["10.0.0.1:25"]},
            },
        },
        tmp_path / "spoold.toml",
    )
    return Router(config, MxResolver(dns))


async def test_mx_route_makes_one_envelope_per_domain(tmp_path: Path) -> None:
    dns = FakeDns(
        {"a.example": ([(10, "mx.a.example")], 300), "b.example": ([(5, "mx.b.example")], 300)}
    )
    r = router(tmp_path, dns)
    envelopes = await r.route_with_mx(
        "s@corp.example", ["x@a.example", "y@b.example", "z@a.example", "w@corp.example"]
    )
    assert [(list(e.recipients), list(e.next_hop_choices)) for e in envelopes] == [
        (["x@a.example", "z@a.example"], ["mx.a.example:25"]),
        (["y@b.example"], ["mx.b.example:25"]),
        (["w@corp.example"], ["10.0.0.1:25"]),
    ]
    # An exchanger is talked to with the settings of the MX route the
    # message takes, also from a new Router (after a restart or reload).
    message = make_message("m1", recipients=["x@a.example"], next_hops=["mx.a.example:25"])
    assert r.settings_for("mx.a.example:25", message).tls == "required"
    assert router(tmp_path, dns).settings_for("mx.a.example:25", message).tls == "required"
    assert r.settings_for("mx.a.example:25").tls == "opportunistic"  # no message: defaults
    local = make_message("m2", recipients=["w@corp.example"], next_hops=["10.0.0.1:25"])
    assert r.settings_for("10.0.0.1:25", local).tls == "opportunistic"
    with pytest.raises(NoRouteError, match="MX routes need a lookup"):
        r.route("s@corp.example", ["x@a.example"])
