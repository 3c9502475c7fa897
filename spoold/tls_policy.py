"""Outbound TLS policy of MX routes: which MX hosts a message may go to and
how the TLS of each connection is checked, from DANE (RFC 7672) and
MTA-STS (RFC 8461).

A route's ``tls_policy`` (:data:`TlsPolicyMode`) is one of:

* ``none``: no policy; the route's own ``tls`` and ``verify_certificates``
  say how to talk to every hop (spoold's behaviour before policies);
* ``mta-sts``: the recipient domain's MTA-STS policy
  (:mod:`spoold.mta_sts`). In ``enforce`` mode, an MX host the policy does
  not name is refused for this attempt, and one it names is talked to over
  TLS (STARTTLS required) with a certificate valid (PKIX) for the MX
  host's name. In ``testing`` mode a host the policy does not name is
  reported (log line, and the ``on_report`` callback: the daemon's
  metric) and used as if there were no policy; so is a connection without
  TLS to a host it names (:meth:`DomainPolicy.connected`). Mode ``none``, no policy,
  or one that cannot be fetched: no policy;
* ``dane-mta-sts``: DANE first. When the domain's MX answer is
  DNSSEC-validated (the resolver's AD bit) and names the host, and the
  host's TLSA records (``_PORT._tcp.HOST``) are validated too, TLS is
  required and the server's certificate must match a usable TLSA record
  (:mod:`spoold.dane`; no name check for DANE-EE); validated records
  that are all unusable still require TLS, without authentication
  (RFC 7672 §2.2). A TLSA lookup that fails for a
  validated MX answer refuses the host for this attempt (RFC 7672 §2.2: it
  could be an attacker hiding the records); so does an MX lookup (or the
  address lookup of a domain without MX) that fails rather than answers
  "not validated" or "no such domain": a validating resolver answers
  SERVFAIL for forged data, and falling back to MTA-STS then would let an
  attacker strip DANE (RFC 7672 §2.1.1), so every MX host of the domain is
  refused for this attempt (``TLS policy (DANE): the MX lookup of
  example.org failed: ...``) and the mail waits. No validated TLSA records:
  MTA-STS as above (RFC 8461 §2: DANE wins where both are published).

:meth:`TlsPolicies.for_domain` is asked once per attempt, before its
first hop: it does the domain's own lookups (its validated MX answer)
once, bounded by ``lookup_timeout``, and its
:meth:`DomainPolicy.decide` answers per MX host, at the start of each hop
(the MTA-STS policy is asked at most once per attempt too): None (no policy: the route's settings),
a :class:`TlsRequirement` (what the connection must satisfy; the relay
puts it in the connection's :class:`~spoold.connection_cache.RouteSettings`,
which is also the connection cache's key, so a connection checked one way
is never lent to a message that needs another) or a :class:`HopRefusal`
(the host may not be used now: a temporary failure whose ``reason`` goes
into the attempt's error text, as ``TLS policy (MTA-STS enforce):
mx.example.net is not in the policy of example.org``).

The DNS lookups are functions given to :class:`TlsPolicies` (the daemon
gives ones on its resolver, tests give coroutines); they must bound their
own time. This module does no I/O of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import anyio

from spoold.dane import TlsaRecord, usable
from spoold.log import get_logger
from spoold.mta_sts import CachedPolicy, MtaStsPolicies

__all__ = [
    "TlsPolicyMode",
    "TlsRequirement",
    "HopRefusal",
    "TlsaAnswer",
    "LookupTlsa",
    "MxSecure",
    "OnReport",
    "TlsPolicies",
    "DomainPolicy",
]

log = get_logger("spoold.tls_policy")

TlsPolicyMode = Literal["dane-mta-sts", "mta-sts", "none"]


@dataclass(frozen=True, slots=True)
class TlsRequirement:
    """What one connection to an MX host must satisfy. ``source`` names the
    policy in error texts (``MTA-STS enforce``, ``DANE``). ``tlsa``: None
    for a PKIX check (a certificate valid for the host's name, from a
    trusted CA); a tuple for DANE: the usable TLSA records, one of which
    the server's certificate must match, or empty when none was usable
    (TLS without authentication). Either way STARTTLS is required.
    Hashable: it is part of the connection cache's key."""

    source: str
    tlsa: tuple[TlsaRecord, ...] | None = None

    @property
    def dane(self) -> bool:
        return self.tlsa is not None


@dataclass(frozen=True, slots=True)
class HopRefusal:
    """An MX host the policy does not let this attempt use; ``reason`` is
    fit for an operator (it is the hop's error in the attempt)."""

    reason: str


@dataclass(frozen=True, slots=True)
class TlsaAnswer:
    """The TLSA records at a name (empty: none) and whether the answer was
    DNSSEC-validated (the resolver set the AD bit)."""

    records: tuple[TlsaRecord, ...]
    secure: bool


LookupTlsa = Callable[[str, int], Awaitable[TlsaAnswer]]
"""The TLSA answer of ``_PORT._tcp.HOST``, given HOST and PORT; raises when
DNS fails."""

MxSecure = Callable[[str], Awaitable[frozenset[str]]]
"""The MX host names of a domain when its MX answer is DNSSEC-validated
(AD; the domain itself when it has no MX but a validated address), else
an empty set; raises when DNS fails."""

OnReport = Callable[[str, str, str], None]
"""Told of each policy finding (``source``, domain, host): a refusal in
enforce mode (``mta-sts-enforce``), a host a testing policy would refuse
(``mta-sts-testing``), a DANE lookup failure (``dane``)."""


class TlsPolicies:
    """Decides the TLS policy of (domain, MX host) pairs; see the module
    docstring. ``mta_sts``: the MTA-STS cache; ``lookup_tlsa`` and
    ``mx_secure``: the DNSSEC-aware lookups DANE needs (without them,
    ``dane-mta-sts`` is MTA-STS alone); ``on_report``: told of findings;
    ``lookup_timeout``: the longest each DNS lookup DANE needs may take
    (one that does not answer in time has failed); ``sts_timeout``: the
    longest an attempt waits for the domain's MTA-STS policy (its TXT
    record, then the HTTPS fetch, which bounds itself too; one that cannot
    be had in time is none, unless one is kept)."""

    def __init__(
        self,
        mta_sts: MtaStsPolicies,
        *,
        lookup_tlsa: LookupTlsa | None = None,
        mx_secure: MxSecure | None = None,
        on_report: OnReport | None = None,
        lookup_timeout: float = 15.0,
        sts_timeout: float = 45.0,
    ) -> None:
        self.mta_sts = mta_sts
        self.lookup_tlsa = lookup_tlsa
        self.mx_secure = mx_secure
        self.on_report = on_report
        self.lookup_timeout = lookup_timeout
        self.sts_timeout = sts_timeout

    def report(self, source: str, domain: str, host: str) -> None:
        """Tell ``on_report`` of a finding (see :data:`OnReport`)."""
        if self.on_report is not None:
            self.on_report(source, domain, host)

    async def for_domain(self, mode: TlsPolicyMode, domain: str) -> DomainPolicy:
        """The policy of one attempt's recipient domain: the domain's own
        lookups (its validated MX hosts, for DANE) are done here, once,
        bounded by ``lookup_timeout``; :meth:`DomainPolicy.decide` then
        answers for each of its MX hosts."""
        domain = domain.lower().rstrip(".")
        found = DomainPolicy(self, mode if domain else "none", domain)
        if found.mode == "dane-mta-sts" and self.lookup_tlsa is not None:
            await found.look_up_mx()
        return found

    async def decide(
        self, mode: TlsPolicyMode, domain: str, host: str, port: int = 25
    ) -> TlsRequirement | HopRefusal | None:
        """The policy of delivering mail for ``domain`` to MX ``host`` (one
        :meth:`for_domain` and its :meth:`~DomainPolicy.decide`)."""
        return await (await self.for_domain(mode, domain)).decide(host, port)


class DomainPolicy:
    """The TLS policy of one recipient domain for one attempt (made by
    :meth:`TlsPolicies.for_domain`): what was learnt of the domain is asked
    once and kept for the attempt's hops."""

    def __init__(self, policies: TlsPolicies, mode: TlsPolicyMode, domain: str) -> None:
        self.policies = policies
        self.mode = mode
        self.domain = domain
        self.secure_mx: frozenset[str] = frozenset()
        self.mx_failure: str | None = None  # why the MX lookup failed
        self._sts: CachedPolicy | None = None
        self._sts_known = False

    async def look_up_mx(self) -> None:
        """Ask for the domain's validated MX hosts (DANE); a failure (not
        "insecure", not "no such domain": those are empty answers) is kept
        in :attr:`mx_failure`."""
        mx_secure = self.policies.mx_secure
        if mx_secure is None:
            return
        try:
            with anyio.fail_after(self.policies.lookup_timeout):
                self.secure_mx = await mx_secure(self.domain)
        except TimeoutError:
            self.mx_failure = f"no answer within {self.policies.lookup_timeout:g}s"
        except Exception as exc:  # noqa: BLE001 (the lookup is the caller's code)
            self.mx_failure = _text(exc)

    async def decide(self, host: str, port: int = 25) -> TlsRequirement | HopRefusal | None:
        """The policy of delivering this domain's mail to MX ``host``."""
        if self.mode == "none":
            return None
        host = host.lower().rstrip(".")
        if self.mode == "dane-mta-sts":
            dane = await self._dane(host, port)
            if dane is not None:
                return dane
        return await self._mta_sts(host)

    async def _dane(self, host: str, port: int) -> TlsRequirement | HopRefusal | None:
        lookup_tlsa = self.policies.lookup_tlsa
        if lookup_tlsa is None or self.policies.mx_secure is None:
            return None
        domain = self.domain
        if self.mx_failure is not None:
            # RFC 7672 §2.1.1: a failed lookup (a validating resolver's
            # SERVFAIL for forged data, or no answer) is not "insecure":
            # falling back to MTA-STS or plain TLS would let an attacker
            # strip DANE. The mail waits.
            self.policies.report("dane", domain, host)
            return HopRefusal(
                f"TLS policy (DANE): the MX lookup of {domain} failed: {self.mx_failure}"
            )
        if host not in self.secure_mx:
            # RFC 7672 §2.2.1: only a host named by a validated MX answer
            # (the one asked now, not the one the message was routed by)
            # is authenticated by its TLSA records.
            return None
        name = f"_{port}._tcp.{host}"
        try:
            with anyio.fail_after(self.policies.lookup_timeout):
                answer = await lookup_tlsa(host, port)
        except Exception as exc:  # noqa: BLE001 (as above: a validated MX makes it a refusal)
            why = (
                f"no answer within {self.policies.lookup_timeout:g}s"
                if isinstance(exc, TimeoutError)
                else _text(exc)
            )
            self.policies.report("dane", domain, host)
            return HopRefusal(f"TLS policy (DANE): the TLSA lookup of {name} failed: {why}")
        if not answer.secure or not answer.records:
            if answer.records:
                log.info("DANE: TLSA records not validated (no AD); using MTA-STS", name=name)
            return None
        records = usable(answer.records)
        if not records:
            log.info(
                "DANE: no usable TLSA record; TLS required without authentication",
                name=name,
                records=[str(r) for r in answer.records],
            )
        return TlsRequirement("DANE", records)

    async def _policy(self) -> CachedPolicy | None:
        """The domain's MTA-STS policy, asked once per attempt, within
        ``sts_timeout`` (past it: none, unless a valid one is kept)."""
        if not self._sts_known:
            sts = self.policies.mta_sts
            found = None
            with anyio.move_on_after(self.policies.sts_timeout) as scope:
                found = await sts.policy_for(self.domain)
            if scope.cancelled_caught:
                found = sts.valid(self.domain)
                log.warning(
                    "MTA-STS policy not known in time",
                    domain=self.domain,
                    seconds=self.policies.sts_timeout,
                    kept=found is not None,
                )
            self._sts, self._sts_known = found, True
        return self._sts

    def connected(self, host: str, tls_active: bool) -> None:
        """Told of the connection a hop's mail is about to go over: under an
        MTA-STS ``testing`` policy, one without TLS to a host the policy
        names is reported (log line and ``mta-sts-testing`` finding) and the
        mail goes anyway. A certificate the route does not check is not
        looked at (testing never changes how mail goes: with the route's
        ``verify_certificates = true``, the default, a bad certificate
        already fails the hop)."""
        cached = self._sts
        host = host.lower().rstrip(".")
        if tls_active or cached is None or cached.policy.mode != "testing":
            return
        if not cached.policy.allows(host):
            return  # reported already, as a host the policy does not name
        log.warning(
            "TLS policy (MTA-STS testing): no TLS to this MX; delivering",
            domain=self.domain,
            host=host,
            policy_id=cached.id,
        )
        self.policies.report("mta-sts-testing", self.domain, host)

    async def _mta_sts(self, host: str) -> TlsRequirement | HopRefusal | None:
        cached = await self._policy()
        if cached is None:
            return None
        domain = self.domain
        policy = cached.policy
        if policy.mode == "none":
            return None
        if policy.mode == "testing":
            if not policy.allows(host):
                log.warning(
                    "TLS policy (MTA-STS testing): this MX is not in the policy; delivering",
                    domain=domain,
                    host=host,
                    policy_id=cached.id,
                )
                self.policies.report("mta-sts-testing", domain, host)
            return None
        if not policy.allows(host):
            self.policies.report("mta-sts-enforce", domain, host)
            return HopRefusal(
                f"TLS policy (MTA-STS enforce): {host} is not in the policy of {domain}"
            )
        return TlsRequirement("MTA-STS enforce")


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
