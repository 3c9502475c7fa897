"""The relay under an MX route's TLS policy (spoold/smtp_relay.py with
spoold/tls_policy.py), against real SMTP servers on loopback
(tests/smtp_server.py) and a stub MTA-STS publisher: a host the policy
refuses is skipped for the next, one it allows is dialled over verified
TLS, and when every host is refused the attempt says why."""

from __future__ import annotations

from pathlib import Path

import anyio

from spoold.connection_cache import ConnectionCache
from spoold.errors import TlsPolicyError
from spoold.mta_sts import MtaStsPolicies
from spoold.policy import DestinationPolicy
from spoold.relay import AttemptFailed, Delivery
from spoold.smtp_relay import SmtpRelay
from spoold.tls_policy import TlsaAnswer, TlsPolicies
from tests.relay_helpers import ALICE, ManualClock, message_to, route
from tests.smtp_server import Reply, StartServer, TlsCertificate
from tests.support import WAIT_TIMEOUT


def _policies(*mx: str) -> TlsPolicies:
    """example.com publishes an enforce policy naming ``mx``."""
    lines = "".join(f"mx: {m}\n" for m in mx)

    async def txt(name: str) -> list[str]:
        return ["v=STSv1; id=1"] if name == "_mta-sts.example.com" else []

    async def fetch(domain: str) -> str:
        if domain != "example.com":
            raise TlsPolicyError("HTTP 404")
        return f"version: STSv1\nmode: enforce\n{lines}max_age: 600\n"

    return TlsPolicies(MtaStsPolicies(txt, fetch))


async def _attempt(
    relay: SmtpRelay, tmp_path: Path, hops: list[str], tls_policy: str = "mta-sts"
) -> Delivery | AttemptFailed:
    msg, body = message_to(tmp_path, hops, [ALICE])
    policy = DestinationPolicy(tls_policy=tls_policy)  # type: ignore[arg-type]
    try:
        with anyio.fail_after(WAIT_TIMEOUT):
            outcome = await relay.relay_with_policy(policy, msg, body, [ALICE])
    finally:
        await relay.close_and_flush()
    assert isinstance(outcome, Delivery | AttemptFailed)
    return outcome


async def test_a_refused_host_is_skipped_for_an_allowed_one_over_verified_tls(
    tmp_path: Path, start_smtp_server: StartServer, tls_certificate: TlsCertificate
) -> None:
    refused = await start_smtp_server(tls_context=tls_certificate.server_context())
    allowed = await start_smtp_server(tls_context=tls_certificate.server_context())
    # The route checks nothing; the policy's PKIX check still applies.
    settings = route(tls="none", verify_certificates=False, ca_file=str(tls_certificate.cert))
    cache = ConnectionCache(monotonic=ManualClock())
    relay = SmtpRelay(settings, cache, tls_policies=_policies("127.0.0.1"))

    outcome = await _attempt(relay, tmp_path, [f"localhost:{refused.port}", allowed.hop])

    assert isinstance(outcome, Delivery), outcome
    assert outcome.hop == allowed.hop
    assert refused.connections_opened == 0
    assert [m.tls for m in allowed.messages] == [True]


async def test_every_host_refused_is_a_try_later_that_says_why(
    tmp_path: Path, start_smtp_server: StartServer
) -> None:
    server = await start_smtp_server()
    relay = SmtpRelay(route(), ConnectionCache(), tls_policies=_policies("mx.example.com"))

    outcome = await _attempt(relay, tmp_path, [server.hop])

    assert outcome == AttemptFailed(
        f"no hops available: {server.hop}: TLS policy (MTA-STS enforce): "
        "127.0.0.1 is not in the policy of example.com"
    )
    assert server.connections_opened == 0


async def test_without_tls_policies_the_key_is_ignored(
    tmp_path: Path, start_smtp_server: StartServer
) -> None:
    """A library relay made without policies sends as it always did."""
    server = await start_smtp_server()
    relay = SmtpRelay(route(), ConnectionCache())

    outcome = await _attempt(relay, tmp_path, [server.hop])

    assert isinstance(outcome, Delivery), outcome
    assert len(server.messages) == 1


async def test_dns_down_is_asked_once_per_attempt_within_the_lookup_timeout(
    tmp_path: Path, start_smtp_server: StartServer
) -> None:
    """With DNS not answering, an attempt over two hosts asks the domain's
    MX answer once, gives up after ``lookup_timeout``, and both hosts wait
    (DANE is never dropped for a lookup that failed)."""
    first = await start_smtp_server()
    second = await start_smtp_server()
    asked: list[str] = []

    async def mx_secure(domain: str) -> frozenset[str]:
        asked.append(domain)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def tlsa(host: str, port: int) -> TlsaAnswer:
        raise AssertionError("no TLSA lookup without the MX answer")

    base = _policies("127.0.0.1")
    policies = TlsPolicies(base.mta_sts, lookup_tlsa=tlsa, mx_secure=mx_secure, lookup_timeout=0.05)
    relay = SmtpRelay(route(), ConnectionCache(), tls_policies=policies)

    outcome = await _attempt(relay, tmp_path, [first.hop, second.hop], "dane-mta-sts")

    why = "TLS policy (DANE): the MX lookup of example.com failed: no answer within 0.05s"
    assert outcome == AttemptFailed(f"no hops available: {first.hop}: {why}; {second.hop}: {why}")
    assert asked == ["example.com"]
    assert first.connections_opened == second.connections_opened == 0


async def test_starttls_refused_under_a_policy_names_the_policy(
    tmp_path: Path, start_smtp_server: StartServer, tls_certificate: TlsCertificate
) -> None:
    server = await start_smtp_server(tls_context=tls_certificate.server_context())
    server.behaviour.starttls = Reply("454 4.7.0 TLS not available due to temporary reason")
    settings = route(ca_file=str(tls_certificate.cert))
    relay = SmtpRelay(settings, ConnectionCache(), tls_policies=_policies("127.0.0.1"))

    outcome = await _attempt(relay, tmp_path, [server.hop])

    assert isinstance(outcome, AttemptFailed)
    assert outcome.error == (
        f"no hops available: {server.hop}: TLS policy (MTA-STS enforce): STARTTLS refused: "
        "454 4.7.0 TLS not available due to temporary reason"
    )
    assert server.messages == []
