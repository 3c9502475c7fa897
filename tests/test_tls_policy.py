"""The TLS policy of (recipient domain, MX host) pairs
(spoold/tls_policy.py), with stub DNS and policy fetches: which hosts are
refused, what a connection must satisfy, and when DANE is trusted."""

from __future__ import annotations

import hashlib

import anyio
import dns.resolver

from spoold.dane import TlsaRecord
from spoold.errors import TlsPolicyError
from spoold.mta_sts import MtaStsPolicies
from spoold.tls_policy import HopRefusal, TlsaAnswer, TlsPolicies, TlsRequirement

EE = TlsaRecord(3, 1, 1, hashlib.sha256(b"key").digest())
TA = TlsaRecord(2, 0, 1, hashlib.sha256(b"ca").digest())


class World:
    """What DNS and the web say, set per test."""

    def __init__(self) -> None:
        self.txt: dict[str, list[str]] = {}
        self.policy: dict[str, str] = {}
        self.tlsa: dict[str, TlsaAnswer] = {}
        self.secure_mx: dict[str, frozenset[str]] = {}  # domain: its validated MX hosts
        self.tlsa_fails = False
        self.mx_fails: BaseException | None = None  # raised by mx_secure
        self.mx_hangs = False
        self.asked: list[str] = []  # mx_secure and TXT lookups, in order
        self.reports: list[tuple[str, str, str]] = []

    async def fetch_txt(self, name: str) -> list[str]:
        self.asked.append(f"TXT {name}")
        return self.txt.get(name, [])

    async def fetch_policy(self, domain: str) -> str:
        if domain not in self.policy:
            raise TlsPolicyError("HTTP 404")
        return self.policy[domain]

    async def lookup_tlsa(self, host: str, port: int) -> TlsaAnswer:
        if self.tlsa_fails:
            raise OSError("SERVFAIL")
        return self.tlsa.get(f"_{port}._tcp.{host}", TlsaAnswer((), False))

    async def mx_secure(self, domain: str) -> frozenset[str]:
        self.asked.append(f"MX {domain}")
        if self.mx_hangs:
            await anyio.sleep_forever()
        if self.mx_fails is not None:
            raise self.mx_fails
        return self.secure_mx.get(domain, frozenset())

    def policies(self, lookup_timeout: float = 15.0) -> TlsPolicies:
        return TlsPolicies(
            MtaStsPolicies(self.fetch_txt, self.fetch_policy),
            lookup_tlsa=self.lookup_tlsa,
            mx_secure=self.mx_secure,
            on_report=lambda *finding: self.reports.append(finding),
            lookup_timeout=lookup_timeout,
        )

    def publish_sts(self, domain: str, mode: str, *mx: str) -> None:
        self.txt[f"_mta-sts.{domain}"] = ["v=STSv1; id=1"]
        lines = "".join(f"mx: {m}\n" for m in mx)
        self.policy[domain] = f"version: STSv1\nmode: {mode}\n{lines}max_age: 86400\n"


async def test_none_asks_nothing() -> None:
    world = World()
    world.publish_sts("example.org", "enforce", "mx.example.org")
    assert await world.policies().decide("none", "example.org", "evil.example") is None


async def test_no_policy_published_is_no_requirement() -> None:
    world = World()
    assert await world.policies().decide("mta-sts", "example.org", "mx.example.org") is None


async def test_enforce_allows_a_named_host_with_a_pkix_check() -> None:
    world = World()
    world.publish_sts("example.org", "enforce", "*.example.org")
    decision = await world.policies().decide("mta-sts", "example.org", "mx1.example.org")
    assert decision == TlsRequirement("MTA-STS enforce")
    assert decision.tlsa is None and not decision.dane


async def test_enforce_refuses_a_host_it_does_not_name() -> None:
    world = World()
    world.publish_sts("example.org", "enforce", "mx.example.org")
    decision = await world.policies().decide("mta-sts", "example.org", "mx.example.net")
    assert decision == HopRefusal(
        "TLS policy (MTA-STS enforce): mx.example.net is not in the policy of example.org"
    )
    assert world.reports == [("mta-sts-enforce", "example.org", "mx.example.net")]


async def test_testing_reports_and_lets_the_host_be_used() -> None:
    world = World()
    world.publish_sts("example.org", "testing", "mx.example.org")
    assert await world.policies().decide("mta-sts", "example.org", "mx.example.net") is None
    assert world.reports == [("mta-sts-testing", "example.org", "mx.example.net")]


async def test_dane_with_validated_records_wins_over_mta_sts() -> None:
    world = World()
    world.publish_sts("example.org", "enforce", "other.example.org")
    world.secure_mx["example.org"] = frozenset({"mx.example.org"})
    world.tlsa["_25._tcp.mx.example.org"] = TlsaAnswer((EE, TA), secure=True)
    decision = await world.policies().decide("dane-mta-sts", "example.org", "mx.example.org")
    assert decision == TlsRequirement("DANE", (EE,))  # DANE-TA left out: unusable here


async def test_tlsa_without_the_ad_bit_is_not_trusted() -> None:
    world = World()
    world.publish_sts("example.org", "enforce", "mx.example.org")
    world.secure_mx["example.org"] = frozenset({"mx.example.org"})
    world.tlsa["_25._tcp.mx.example.org"] = TlsaAnswer((EE,), secure=False)
    decision = await world.policies().decide("dane-mta-sts", "example.org", "mx.example.org")
    assert decision == TlsRequirement("MTA-STS enforce")


async def test_tlsa_of_an_unsigned_mx_answer_is_not_used() -> None:
    world = World()
    world.tlsa["_25._tcp.mx.example.org"] = TlsaAnswer((EE,), secure=True)
    assert await world.policies().decide("dane-mta-sts", "example.org", "mx.example.org") is None


async def test_only_unusable_records_require_tls_without_authentication() -> None:
    world = World()
    world.secure_mx["example.org"] = frozenset({"mx.example.org"})
    world.tlsa["_25._tcp.mx.example.org"] = TlsaAnswer((TA,), secure=True)
    decision = await world.policies().decide("dane-mta-sts", "example.org", "mx.example.org")
    assert decision == TlsRequirement("DANE", ())
    assert decision.dane


async def test_a_failed_tlsa_lookup_of_a_signed_domain_refuses_the_host() -> None:
    world = World()
    world.secure_mx["example.org"] = frozenset({"mx.example.org"})
    world.tlsa_fails = True
    decision = await world.policies().decide("dane-mta-sts", "example.org", "mx.example.org")
    assert isinstance(decision, HopRefusal)
    assert decision.reason.startswith(
        "TLS policy (DANE): the TLSA lookup of _25._tcp.mx.example.org failed: SERVFAIL"
    )


async def test_mta_sts_mode_does_not_look_at_tlsa() -> None:
    world = World()
    world.secure_mx["example.org"] = frozenset({"mx.example.org"})
    world.tlsa["_25._tcp.mx.example.org"] = TlsaAnswer((EE,), secure=True)
    assert await world.policies().decide("mta-sts", "example.org", "mx.example.org") is None


async def test_tlsa_of_a_host_the_validated_mx_answer_does_not_name_is_not_used() -> None:
    """A message routed to a host that is not (or no longer) in the domain's
    validated MX answer is not authenticated by that host's own TLSA: an
    attacker's MX name in the attacker's signed zone proves nothing."""
    world = World()
    world.secure_mx["example.org"] = frozenset({"mx.example.org"})
    world.tlsa["_25._tcp.mx.evil.example"] = TlsaAnswer((EE,), secure=True)
    world.publish_sts("example.org", "enforce", "mx.example.org")
    decision = await world.policies().decide("dane-mta-sts", "example.org", "mx.evil.example")
    assert decision == HopRefusal(
        "TLS policy (MTA-STS enforce): mx.evil.example is not in the policy of example.org"
    )


async def test_a_failed_mx_lookup_refuses_rather_than_fall_back_to_mta_sts() -> None:
    """RFC 7672 §2.1.1: SERVFAIL (what a validating resolver answers for a
    forged MX answer) is not "insecure": the host is refused, never left to
    MTA-STS or to opportunistic TLS."""
    world = World()
    world.publish_sts("example.org", "testing", "mx.example.org")
    world.mx_fails = dns.resolver.NoNameservers()
    decision = await world.policies().decide("dane-mta-sts", "example.org", "mx.example.org")
    assert isinstance(decision, HopRefusal)
    assert decision.reason.startswith("TLS policy (DANE): the MX lookup of example.org failed: "), (
        decision.reason
    )
    assert world.reports == [("dane", "example.org", "mx.example.org")]


async def test_an_mx_lookup_without_an_answer_in_time_refuses() -> None:
    world = World()
    world.mx_hangs = True
    decision = await world.policies(lookup_timeout=0.05).decide(
        "dane-mta-sts", "example.org", "mx.example.org"
    )
    assert decision == HopRefusal(
        "TLS policy (DANE): the MX lookup of example.org failed: no answer within 0.05s"
    )


async def test_an_insecure_or_missing_mx_answer_still_falls_back_to_mta_sts() -> None:
    world = World()  # mx_secure answers an empty set: not validated, or no such domain
    world.publish_sts("example.org", "enforce", "mx.example.org")
    decision = await world.policies().decide("dane-mta-sts", "example.org", "mx.example.org")
    assert decision == TlsRequirement("MTA-STS enforce")


async def test_one_attempt_asks_the_domain_once_for_all_its_hosts() -> None:
    world = World()
    world.publish_sts("example.org", "enforce", "mx1.example.org", "mx2.example.org")
    domain = await world.policies().for_domain("dane-mta-sts", "example.org")
    for host in ("mx1.example.org", "mx2.example.org", "mx3.example.org"):
        await domain.decide(host)
    assert world.asked == ["MX example.org", "TXT _mta-sts.example.org"]


async def test_an_mta_sts_policy_not_had_in_time_is_none_and_not_asked_again_at_once() -> None:
    world = World()
    world.txt["_mta-sts.example.org"] = ["v=STSv1; id=1"]
    fetches = 0

    async def hanging(domain: str) -> str:
        nonlocal fetches
        fetches += 1
        await anyio.sleep_forever()
        raise AssertionError

    policies = TlsPolicies(MtaStsPolicies(world.fetch_txt, hanging), sts_timeout=0.05)
    with anyio.fail_after(5):
        assert await policies.decide("mta-sts", "example.org", "mx.example.org") is None
        assert await policies.decide("mta-sts", "example.org", "mx.example.org") is None
    assert fetches == 1
