"""MTA-STS (RFC 8461): a recipient domain's published TLS policy, read,
checked and cached.

A domain that publishes a policy has a TXT record at ``_mta-sts.DOMAIN``
(``v=STSv1; id=...``; the id changes when the policy does) and serves the
policy itself at ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``: lines
of ``key: value`` with ``version: STSv1``, ``mode`` (``enforce``,
``testing`` or ``none``), one ``mx`` line per allowed MX host pattern and
``max_age`` (seconds the policy may be cached, at most a year).

This module owns the parsing (:func:`parse_record`, :func:`parse_policy`),
the MX pattern match (:func:`mx_matches`: an exact name, or ``*.`` for
exactly one leftmost label) and :class:`MtaStsPolicies`, the per-domain
cache. It does no I/O of its own: the TXT lookup and the HTTPS fetch are
functions given to the cache (:data:`FetchTxt`, :data:`FetchPolicy`; the
daemon gives ones built on dnspython and its own HTTPS GET, tests give
plain coroutines), so what fetching means (resolvers, certificates,
timeouts, size limits) is decided by whoever makes the cache.

Cache rules (RFC 8461 §5): a policy is kept until ``max_age`` runs out.
While one is kept, an attempt uses it without asking DNS;
:meth:`MtaStsPolicies.refresh_due` (run in a loop by
:meth:`MtaStsPolicies.run`, in a task group of the caller's) checks the TXT
record of every cached domain and fetches the policy again when the id
changed or the policy is within ``refresh_before`` of expiring. A fetch
that fails leaves the cached policy as it was. A domain without a record
(or whose policy cannot be fetched and has none cached) has no policy: mail
goes as it would without MTA-STS; that answer is kept ``negative_ttl``
seconds when DNS said there is no record, ``error_ttl`` (a minute) when a
lookup or a fetch failed, so that every attempt does not ask again while a
failure does not turn MTA-STS off for long. At most ``max_domains``
policies (and as many "no policy" answers) are kept. Errors of the lookups
are values here, never exceptions out of :meth:`MtaStsPolicies.policy_for`:
a domain whose policy cannot be known has none, as the RFC says.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal, TypeVar, get_args

import anyio

from spoold.errors import TlsPolicyError
from spoold.log import get_logger
from spoold.numerals import ascii_decimal

__all__ = [
    "StsMode",
    "StsRecord",
    "StsPolicy",
    "CachedPolicy",
    "FetchTxt",
    "FetchPolicy",
    "MtaStsPolicies",
    "parse_record",
    "parse_policy",
    "mx_matches",
    "MAX_POLICY_SIZE",
    "MAX_MAX_AGE",
    "MAX_MX",
]

log = get_logger("spoold.mta_sts")

_V = TypeVar("_V")

StsMode = Literal["enforce", "testing", "none"]

MAX_POLICY_SIZE: Final = 64 * 1024
"""The largest policy body read (RFC 8461 §3.3 suggests 64 KiB)."""

MAX_MX: Final = 100
"""The most ``mx`` lines a policy may have (a bigger one is refused)."""

MAX_MAX_AGE: Final = 31_557_600
"""The longest ``max_age`` a policy may ask for (about a year)."""

FetchTxt = Callable[[str], Awaitable[list[str]]]
"""The TXT strings at a name (each record's strings joined); ``[]`` when
the name has none. Raises (anything but a cancellation) when DNS fails."""

FetchPolicy = Callable[[str], Awaitable[str]]
"""The body of ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` for a
domain, fetched with a PKIX-valid certificate for ``mta-sts.DOMAIN``, no
redirect, a size limit and a timeout. Raises when it cannot be had."""


@dataclass(frozen=True, slots=True)
class StsRecord:
    """The ``_mta-sts`` TXT record: its policy id."""

    id: str


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A policy as published."""

    mode: StsMode
    mx: tuple[str, ...]
    max_age: int

    def allows(self, host: str) -> bool:
        """Whether ``host`` matches one of the policy's ``mx`` patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """A policy with the id it was published under and when it expires
    (seconds of the cache's clock)."""

    domain: str
    id: str
    policy: StsPolicy
    expires: float


_VERSION = re.compile(r"v=STSv1[ \t]*(?:;|$)")  # not v=STSv10
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def parse_record(txts: list[str]) -> StsRecord | None:
    """The STS record among the TXT strings of ``_mta-sts.DOMAIN``: those
    starting with ``v=STSv1`` then ``;`` or the end. None when there is none, or more than one
    (RFC 8461 §3.1: then the domain has no policy). A record with a
    missing or malformed ``id`` raises :class:`TlsPolicyError`."""
    found = [t for t in txts if _VERSION.match(t)]
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if key and eq:
            fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1":
        raise TlsPolicyError(f"an MTA-STS record with a bad version: {found[0]!r}")
    policy_id = fields.get("id", "")
    if not policy_id or len(policy_id) > 32 or not set(policy_id) <= _ID_CHARS:
        raise TlsPolicyError(f"an MTA-STS record without a valid id: {found[0]!r}")
    return StsRecord(policy_id)


def parse_policy(text: str) -> StsPolicy:
    """A policy body (``key: value`` lines, CRLF or LF). Raises
    :class:`TlsPolicyError` naming what is wrong: another version, a mode
    or max_age missing or invalid, no ``mx`` in a mode other than
    ``none``. Unknown keys are ignored (RFC 8461 §3.2); of a key given
    twice but ``mx``, the first counts."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    # Lines end with LF or CRLF, nothing else (str.splitlines would also
    # split at \x0b, \x0c, \x85, \u2028...).
    for raw in text.split("\n"):
        line = raw.removesuffix("\r").strip(" \t")
        if not line:
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise TlsPolicyError(f"an MTA-STS policy line without 'key:': {line[:80]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise TlsPolicyError(
            f"an MTA-STS policy of version {fields.get('version', '(none)')!r}, not STSv1"
        )
    mode = fields.get("mode")
    if mode not in get_args(StsMode):
        raise TlsPolicyError(f"an MTA-STS policy with mode {mode!r} (enforce, testing or none)")
    max_age = fields.get("max_age", "")
    seconds = ascii_decimal(max_age, max_digits=10)
    if seconds is None or seconds > MAX_MAX_AGE:
        raise TlsPolicyError(
            f"an MTA-STS policy with max_age {max_age!r} (0 to {MAX_MAX_AGE} seconds)"
        )
    if len(mx) > MAX_MX:
        raise TlsPolicyError(f"an MTA-STS policy with {len(mx)} mx lines (at most {MAX_MX})")
    if mode != "none" and not mx:
        raise TlsPolicyError(f"an MTA-STS policy in mode {mode} without mx lines")
    for pattern in mx:
        if not pattern or "*" in pattern.removeprefix("*."):
            raise TlsPolicyError(f"an MTA-STS policy with a bad mx pattern {pattern!r}")
    return StsPolicy(mode, tuple(mx), seconds)  # type: ignore[arg-type]  # checked above


def mx_matches(pattern: str, host: str) -> bool:
    """Whether an MX host name matches a policy's ``mx`` pattern: equal
    (without case, without a final dot), or ``*.rest`` for a name of one
    more label than ``rest`` ending with it (``*.example.net`` matches
    ``mx1.example.net``, not ``example.net`` nor ``a.b.example.net``)."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


class MtaStsPolicies:
    """The MTA-STS policies of recipient domains, fetched on first need and
    kept for their ``max_age`` (see the module docstring).

    ``fetch_txt`` and ``fetch_policy`` do the I/O; ``clock`` gives seconds
    (tests move it); ``negative_ttl``: how long "no policy" is remembered
    after DNS said so (no record, no such name); ``error_ttl``: how long
    after a failure (a TXT lookup or a policy fetch that failed) the
    domain is sent to without a policy before it is asked again;
    ``max_domains``: the most domains kept, policies and "no policy"
    answers each (recipient domains are chosen by outsiders: past it the
    oldest entry goes); ``refresh_concurrency``: domains refreshed at once
    by :meth:`refresh_due`;
    ``refresh_before``: how long before its expiry a kept policy is fetched
    again (at most half its ``max_age``); ``refresh_every``: the pause of
    :meth:`run` between passes."""

    def __init__(
        self,
        fetch_txt: FetchTxt,
        fetch_policy: FetchPolicy,
        *,
        clock: Callable[[], float] = time.time,
        negative_ttl: float = 600.0,
        error_ttl: float = 60.0,
        refresh_before: float = 86_400.0,
        refresh_every: float = 3_600.0,
        max_domains: int = 10_000,
        refresh_concurrency: int = 8,
    ) -> None:
        self.fetch_txt = fetch_txt
        self.fetch_policy = fetch_policy
        self.clock = clock
        self.negative_ttl = negative_ttl
        self.error_ttl = error_ttl
        self.max_domains = max_domains
        self.refresh_concurrency = refresh_concurrency
        self.refresh_before = refresh_before
        self.refresh_every = refresh_every
        self._policies: dict[str, CachedPolicy] = {}
        self._none_until: dict[str, float] = {}
        self._discovering: dict[str, anyio.Event] = {}  # lookups under way
        self.fetches = 0  # policies fetched over HTTPS (tests, logs)

    def sizes(self) -> tuple[int, int]:
        """How many policies and how many "no policy" answers are kept."""
        return len(self._policies), len(self._none_until)

    def cached(self, domain: str) -> CachedPolicy | None:
        """The kept policy of ``domain``, even an expired one (no I/O)."""
        return self._policies.get(_domain(domain))

    def valid(self, domain: str) -> CachedPolicy | None:
        """The kept policy of ``domain`` while it has not expired (no I/O)."""
        return _valid(self._policies.get(_domain(domain)), self.clock())

    async def policy_for(self, domain: str) -> CachedPolicy | None:
        """The domain's policy: the kept one while it is valid, else looked
        up (TXT, then the policy). None: the domain has no policy we can
        use (mail goes as without MTA-STS). One lookup per domain at a
        time: attempts that need the same domain meanwhile wait for it."""
        domain = _domain(domain)
        while True:
            known, found = self._known(domain)
            if known:
                return found
            busy = self._discovering.get(domain)
            if busy is None:
                break
            await busy.wait()  # then known, unless that lookup was cancelled
        done = self._discovering[domain] = anyio.Event()
        kept = self._policies.get(domain)
        try:
            found = await self._discover(domain, kept)
        except anyio.get_cancelled_exc_class():
            # Given up (the attempt's time ran out): the next attempts do
            # not each wait for it again, for error_ttl.
            self._none(domain, kept, self.error_ttl)
            raise
        finally:
            del self._discovering[domain]
            done.set()
        return found

    def _known(self, domain: str) -> tuple[bool, CachedPolicy | None]:
        """(True, the policy) while a kept policy, or a "none", is valid;
        (False, None) when the domain must be looked up."""
        now = self.clock()
        kept = self._policies.get(domain)
        if kept is not None and kept.expires > now:
            return True, kept
        if self._none_until.get(domain, 0.0) > now:
            return True, None
        return False, None

    async def _discover(self, domain: str, kept: CachedPolicy | None) -> CachedPolicy | None:
        """Ask DNS for the record and, for a new id (or nothing valid
        kept), fetch the policy. A failed lookup, a record gone (a DNS
        attacker may strip it: RFC 8461 §5) or a failed fetch leave the
        kept policy in use while it is valid."""
        now = self.clock()
        try:
            record = parse_record(await self.fetch_txt(f"_mta-sts.{domain}"))
        except Exception as exc:  # noqa: BLE001 (the lookup is the caller's code: any failure is "unknown")
            log.warning("MTA-STS record lookup failed", domain=domain, error=_text(exc))
            return self._none(domain, kept, self.error_ttl)
        if record is None:  # DNS answered: no record (or no such name)
            return self._none(domain, kept, self.negative_ttl)
        if kept is not None and kept.id == record.id and kept.expires > now:
            return kept
        fresh = await self._fetch(domain, record)
        return fresh or self._none(domain, kept, self.error_ttl)

    def _none(self, domain: str, kept: CachedPolicy | None, ttl: float) -> CachedPolicy | None:
        """The kept policy while it is valid; else no policy, remembered
        for ``ttl`` seconds (0: not at all)."""
        now = self.clock()
        valid = _valid(kept, now)
        if valid is None and ttl > 0:
            self._none_until.pop(domain, None)  # re-inserted last: the newest
            self._none_until[domain] = now + ttl
            _bound(self._none_until, self.max_domains)
        return valid

    async def _fetch(self, domain: str, record: StsRecord) -> CachedPolicy | None:
        """Fetch and keep the policy published under ``record``; None (and
        a log line) when it cannot be had."""
        self.fetches += 1
        try:
            policy = parse_policy(await self.fetch_policy(domain))
        except Exception as exc:  # noqa: BLE001 (the fetch is the caller's code: any failure is "none")
            log.warning(
                "MTA-STS policy could not be fetched",
                domain=domain,
                policy_id=record.id,
                error=_text(exc),
                kept=domain in self._policies,
            )
            return None
        fresh = CachedPolicy(domain, record.id, policy, self.clock() + policy.max_age)
        self._policies.pop(domain, None)  # re-inserted last: the newest
        self._policies[domain] = fresh
        self._none_until.pop(domain, None)
        dropped = _bound(self._policies, self.max_domains)
        if dropped:
            log.warning(
                "MTA-STS: too many domains kept; the oldest policies dropped",
                dropped=dropped,
                max_domains=self.max_domains,
            )
        log.info(
            "MTA-STS policy fetched",
            domain=domain,
            policy_id=record.id,
            mode=policy.mode,
            mx=list(policy.mx),
            max_age=policy.max_age,
        )
        return fresh

    async def refresh_due(self) -> None:
        """One pass over the kept policies: each domain's TXT record is
        asked, and the policy fetched again when its id changed or it is
        within ``refresh_before`` of expiring; a failure keeps the old one.
        A policy that expired without a successful refresh is dropped."""
        now = self.clock()
        for domain in [d for d, until in self._none_until.items() if until <= now]:
            del self._none_until[domain]  # "no policy" answers are forgotten once stale
        limiter = anyio.CapacityLimiter(self.refresh_concurrency)
        async with anyio.create_task_group() as tg:
            for domain, kept in list(self._policies.items()):
                tg.start_soon(self._refresh, domain, kept, limiter)

    async def _refresh(
        self, domain: str, kept: CachedPolicy, limiter: anyio.CapacityLimiter
    ) -> None:
        async with limiter:
            try:
                record = parse_record(await self.fetch_txt(f"_mta-sts.{domain}"))
            except Exception as exc:  # noqa: BLE001 (see _discover)
                log.warning("MTA-STS record lookup failed", domain=domain, error=_text(exc))
                record = None
            now = self.clock()
            # Due: a short-lived policy at half its life, others a day ahead.
            window = min(self.refresh_before, kept.policy.max_age / 2)
            if record is not None and (record.id != kept.id or kept.expires - now <= window):
                await self._fetch(domain, record)
            current = self._policies.get(domain)
            if current is not None and current.expires <= self.clock():
                del self._policies[domain]

    async def run(self) -> None:
        """Refresh the kept policies every ``refresh_every`` seconds, until
        cancelled (run it in a task group)."""
        while True:
            await anyio.sleep(self.refresh_every)
            await self.refresh_due()


def _domain(domain: str) -> str:
    return domain.lower().rstrip(".")


def _bound(entries: dict[str, _V], most: int) -> int:
    """Drop the oldest entries (the first inserted) beyond ``most``; how
    many went."""
    extra = max(len(entries) - most, 0)
    for domain in list(itertools.islice(entries, extra)):
        del entries[domain]
    return extra


def _valid(kept: CachedPolicy | None, now: float) -> CachedPolicy | None:
    return kept if kept is not None and kept.expires > now else None


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
