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
  metric) and used as if there were no policy. Mode ``none``, no policy,
  or one that cannot be fetched: no policy;
* ``dane-mta-sts``: DANE first. When the domain's MX answer is
  DNSSEC-validated (the resolver's AD bit) and names the host, and the
  host's TLSA records (``_PORT._tcp.HOST``) are validated too, TLS is
  required and the server's certificate must match a usable TLSA record
  (:mod:`spoold.dane`; no name check for DANE-EE); validated records
  that are all unusable still require TLS, without authentication
  (RFC 7672 §2.2). A TLSA lookup that fails for a
  validated MX answer refuses the host for this attempt (RFC 7672 §2.2: it
  could be an attacker hiding the records). No validated TLSA records:
  MTA-STS as above (RFC 8461 §2: DANE wins where both are published).

:meth:`TlsPolicies.decide` answers per (recipient domain, MX host), at the
start of each hop of an attempt: None (no policy: the route's settings),
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

from spoold.dane import TlsaRecord, usable
from spoold.log import get_logger
from spoold.mta_sts import MtaStsPolicies

__all__ = [
    "TlsPolicyMode",
    "TlsRequirement",
    "HopRefusal",
    "TlsaAnswer",
    "LookupTlsa",
    "MxSecure",
    "OnReport",
    "TlsPolicies",
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
    ``dane-mta-sts`` is MTA-STS alone); ``on_report``: told of findings."""

    def __init__(
        self,
        mta_sts: MtaStsPolicies,
        *,
        lookup_tlsa: LookupTlsa | None = None,
        mx_secure: MxSecure | None = None,
        on_report: OnReport | None = None,
    ) -> None:
        self.mta_sts = mta_sts
        self.lookup_tlsa = lookup_tlsa
        self.mx_secure = mx_secure
        self.on_report = on_report

    def _report(self, source: str, domain: str, host: str) -> None:
        if self.on_report is not None:
            self.on_report(source, domain, host)

    async def decide(
        self, mode: TlsPolicyMode, domain: str, host: str, port: int = 25
    ) -> TlsRequirement | HopRefusal | None:
        """The policy of delivering mail for ``domain`` to MX ``host``."""
        if mode == "none" or not domain:
            return None
        domain = domain.lower().rstrip(".")
        host = host.lower().rstrip(".")
        if mode == "dane-mta-sts":
            dane = await self._dane(domain, host, port)
            if dane is not None:
                return dane
        return await self._mta_sts(domain, host)

    async def _dane(self, domain: str, host: str, port: int) -> TlsRequirement | HopRefusal | None:
        if self.lookup_tlsa is None or self.mx_secure is None:
            return None
        try:
            secure_mx = await self.mx_secure(domain)
        except Exception as exc:  # noqa: BLE001 (the lookup is the caller's code: unknown is "not secure")
            log.info("DANE: MX lookup failed; using MTA-STS", domain=domain, error=_text(exc))
            return None
        if host not in secure_mx:
            # RFC 7672 §2.2.1: only a host named by a validated MX answer
            # (the one asked now, not the one the message was routed by)
            # is authenticated by its TLSA records.
            return None
        name = f"_{port}._tcp.{host}"
        try:
            answer = await self.lookup_tlsa(host, port)
        except Exception as exc:  # noqa: BLE001 (as above, but a validated MX makes it a refusal)
            self._report("dane", domain, host)
            return HopRefusal(f"TLS policy (DANE): the TLSA lookup of {name} failed: {_text(exc)}")
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

    async def _mta_sts(self, domain: str, host: str) -> TlsRequirement | HopRefusal | None:
        cached = await self.mta_sts.policy_for(domain)
        if cached is None:
            return None
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
                self._report("mta-sts-testing", domain, host)
            return None
        if not policy.allows(host):
            self._report("mta-sts-enforce", domain, host)
            return HopRefusal(
                f"TLS policy (MTA-STS enforce): {host} is not in the policy of {domain}"
            )
        return TlsRequirement("MTA-STS enforce")


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
