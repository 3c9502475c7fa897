"""Idempotency keys claimed fleet-wide: the same key at two nodes queues one message.

A node's own keys (:mod:`spoold.idempotency`) make a retry that reaches the
same node a duplicate; an application's retry may reach another node
behind the load balancer. :class:`FleetKeys` adds one claim in the fleet's
Redis (:class:`~spoold.fleet.SharedState`) to a keyed submission, inside
the local key's lock:

1. the local key file is locked and read, as without a fleet: a key this
   node has seen within the window is a duplicate, whatever Redis says or
   whether it answers;
2. the key is claimed in Redis in one Lua step (``SET NX PX``, or the
   claim already there): a *pending*
   claim (this node, a token of this submission, no ids yet) that lives
   :attr:`FleetKeys.pending` seconds. When another node's claim is there:

   * with its message ids: the submission is a duplicate, answered with
     those ids as a local duplicate is (and remembered in the local key
     file, so a later retry here is one even while Redis is down); with
     another envelope, :class:`~spoold.errors.IdempotencyKeyError`, as
     locally;
   * still pending (the other node is writing its message): asked again,
     a few times a second, until it has ids or is gone (its node died:
     the claim lapses after :attr:`FleetKeys.pending`), then as above;
   * a value this version did not write (read strictly: ``node``,
     ``token``, ``ids`` that are message ids, a 64-hex ``envelope``;
     another version's, or a corrupt or hostile Redis): no claim to go
     by, logged (once a minute at most); the node acts alone at once,
     never answering a duplicate because of it and never waiting on it;

3. the messages are written (durable, as always);
4. the claim is *settled*: compared and set in one Lua step to carry the
   ids, for the whole window (``spool.idempotency_window``); the local key
   file gets the ids too. If the write failed, the claim is *released*
   (compared and deleted in one Lua step: never another submission's).

Redis down or slow (any call returning None from :meth:`SharedState.call
<spoold.fleet.SharedState.call>`, logged once per outage there): the node
goes on with its own keys alone; nothing is refused or held. A retry
reaching two nodes during an outage may then queue two messages. A claim
not settled within :attr:`FleetKeys.pending` lapses, and a retry at another
node after that queues a second copy: a node that dies between writing its
message and settling its claim (as a local crash between the two writes
can, see :mod:`spoold.idempotency`), or a settle that Redis does not answer
in time leave such a pending claim (a local key file that cannot be written
does not: the claim is settled all the same).

Keys in Redis: ``spoold:idem:SHA256`` (the SHA-256 of the key as the node
keeps it: a key scoped by the submitting user's uid,
:func:`~spoold.idempotency.user_key`, is that uid's at every node, so the
nodes must give one user one uid; see ``docs/fleet.md``); the value is JSON: ``node``, ``token``,
``ids`` (empty while pending) and ``envelope`` (the fingerprint of
:func:`~spoold.idempotency.envelope_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated

import anyio
import msgspec

from spoold.errors import IdempotencyKeyError
from spoold.fleet import KEY_PREFIX, SharedState
from spoold.idempotency import KeyFiles, batch_fingerprint, validate_key
from spoold.ids import is_valid_id, new_id
from spoold.log import get_logger
from spoold.message import RoutedBatch

__all__ = ["FleetKeys", "FleetClaim", "DEFAULT_PENDING", "redis_key"]

log = get_logger("spoold.fleet_keys")

DEFAULT_PENDING = 30.0
"""Seconds a claim without ids lives (a node dying while writing)."""

# Claim: KEYS[1] the claim; ARGV: this node's pending value, its life (ms).
# The claim there (another node's) is returned, else ours is set and nil
# returned: SET NX PX with the value found, one step (SET ... NX GET does
# the same but needs Redis 7).
_CLAIM = """
local found = redis.call('GET', KEYS[1])
if found then return found end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# Settle: KEYS[1] the claim; ARGV: the pending value this node set, the
# settled value, the window (ms). Ours (or lapsed meanwhile): set, 1;
# another node's claim took its place: 0.
_SETTLE = """
local now = redis.call('GET', KEYS[1])
if now == ARGV[1] or now == false then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# Release: delete the claim only if it is still the one this node set.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class FleetClaim:
    """A claim in Redis: ``value`` is what this node set (pending) when
    ``mine``; otherwise another node's, with its ``node``, ``ids`` and
    ``envelope``. ``unusable``: a value this version did not write (or
    that does not read as one it writes): no claim to go by."""

    redis_key: str
    value: str
    mine: bool
    node: str = ""
    ids: tuple[str, ...] = ()
    envelope: str = ""
    unusable: bool = False


class _Claim(msgspec.Struct):
    """A claim's value as this version writes it (every field required)."""

    node: Annotated[str, msgspec.Meta(min_length=1)]
    token: Annotated[str, msgspec.Meta(min_length=1)]
    ids: list[str]
    envelope: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


_claim_decoder = msgspec.json.Decoder(_Claim)

UNUSABLE_LOG_INTERVAL = 60.0
"""Seconds between two log lines about claims this version cannot use."""


def redis_key(key: str) -> str:
    """The Redis key of an idempotency key (as the node keeps it)."""
    return f"{KEY_PREFIX}idem:{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"


def _parse(rkey: str, raw: str) -> FleetClaim:
    """Another node's claim, read strictly: anything but a value this
    version writes, with ids that are message ids, is unusable (never
    taken for ids, never waited on)."""
    try:
        value = _claim_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return FleetClaim(rkey, raw, False, unusable=True)
    if not all(is_valid_id(i) for i in value.ids):
        return FleetClaim(rkey, raw, False, unusable=True)
    return FleetClaim(rkey, raw, False, value.node, tuple(value.ids), value.envelope)


class FleetKeys:
    """One node's fleet-wide idempotency claims (see the module's docstring).
    ``pending``: how long a claim without ids lives; ``poll``: the first
    pause before asking again about another node's pending claim (it
    doubles, up to half a second)."""

    def __init__(
        self, shared: SharedState, *, pending: float = DEFAULT_PENDING, poll: float = 0.02
    ) -> None:
        self.shared = shared
        self.pending = pending
        self.poll = poll
        self._claim = shared.client.register_script(_CLAIM)
        self._settle = shared.client.register_script(_SETTLE)
        self._release = shared.client.register_script(_RELEASE)
        self._quiet_until = -math.inf  # monotonic: no "unusable claim" line before

    @property
    def node(self) -> str:
        return self.shared.settings.node

    # -- the three steps, each one call (None: Redis did not answer)

    async def claim(self, key: str, envelope: str, window: timedelta) -> FleetClaim | None:
        """Claim ``key`` for this node (pending), or the claim another node
        holds; None when Redis did not answer."""
        rkey = redis_key(key)
        value = json.dumps(
            {"node": self.node, "token": new_id(), "ids": [], "envelope": envelope},
            separators=(",", ":"),
        )
        ttl = max(1, min(round(self.pending * 1000), _ms(window)))

        async def step() -> tuple[object]:
            # nil when it set the claim: boxed, to tell it from no answer.
            return (await self._claim(keys=[rkey], args=[value, ttl]),)

        answer = await self.shared.call(step)
        if answer is None:
            return None
        found = answer[0]
        if found is None:
            return FleetClaim(rkey, value, True)
        return _parse(rkey, str(found))

    async def settle(self, claim: FleetClaim, ids: list[str], window: timedelta) -> bool | None:
        """Put ``ids`` in this node's claim for the window: True; False when
        another node's claim had replaced it (both queued: logged)."""
        value = json.loads(claim.value)
        value["ids"] = ids
        settled = json.dumps(value, separators=(",", ":"))
        done = await self.shared.call(
            lambda: self._settle(keys=[claim.redis_key], args=[claim.value, settled, _ms(window)])
        )
        if done is None:
            return None
        if not int(done):
            log.warning(
                "idempotency key taken at another node meanwhile: both queued",
                ids=ids,
                node=self.node,
            )
        return bool(int(done))

    async def release(self, claim: FleetClaim) -> bool | None:
        """Give this node's claim back (the write failed)."""
        with anyio.CancelScope(shield=True):
            gone = await self.shared.call(
                lambda: self._release(keys=[claim.redis_key], args=[claim.value])
            )
        return None if gone is None else bool(int(gone))

    async def settled_claim(self, key: str, envelope: str, window: timedelta) -> FleetClaim | None:
        """:meth:`claim`, asked again while another node's claim is pending
        (it has ids at once, as a rule, or lapses within :attr:`pending`).
        None: Redis did not answer, the other claim stayed pending past
        that, or it is unusable (not a value this version writes: logged,
        at most once a minute); the node then acts alone, at once."""
        deadline = anyio.current_time() + self.pending + 1
        pause = self.poll
        while True:
            found = await self.claim(key, envelope, window)
            if found is not None and found.unusable:
                if time.monotonic() >= self._quiet_until:
                    self._quiet_until = time.monotonic() + UNUSABLE_LOG_INTERVAL
                    log.warning(
                        "idempotency key: a claim in redis this version did not write; "
                        "taken here without a fleet-wide claim",
                        redis_key=found.redis_key,
                    )
                return None
            if found is None or found.mine or found.ids:
                return found
            if anyio.current_time() + pause > deadline:
                log.warning(
                    "idempotency key pending at another node too long; taken here",
                    node=found.node or None,
                )
                return None
            await anyio.sleep(pause)
            pause = min(pause * 2, 0.5)

    # -- a keyed submission

    async def add_once(
        self,
        files: KeyFiles,
        key: str,
        batch: RoutedBatch,
        now: datetime,
        window: timedelta,
        add: Callable[[], Awaitable[list[str]]],
    ) -> tuple[list[str], bool]:
        """:meth:`KeyFiles.add_once <spoold.idempotency.KeyFiles.add_once>`
        with the fleet's claim (the module's steps 1-4). Returns the ids
        and whether they are an earlier submission's (this node's or
        another's)."""
        envelope = batch_fingerprint(batch)
        async with files.claim(validate_key(key)) as local:
            earlier = local.ids(now, window, envelope)
            if earlier is not None:
                return earlier, True
            claim = await self.settled_claim(key, envelope, window)
            if claim is not None and not claim.mine:
                if envelope != claim.envelope:
                    raise IdempotencyKeyError(
                        f"idempotency key {key!r} was given to another submission "
                        "at another node with a different envelope; a new message "
                        "needs a new key"
                    )
                ids = list(claim.ids)
                await files.record(local, ids, now, envelope)
                log.info(
                    "duplicate submission: idempotency key seen at another node",
                    ids=ids,
                    node=claim.node,
                )
                return ids, True
            try:
                ids = await add()
            except BaseException:
                if claim is not None:
                    await self.release(claim)
                raise
            try:
                await files.record(local, ids, now, envelope)
            finally:  # the message is queued: its claim carries its ids, whatever else fails
                if claim is not None:
                    with anyio.CancelScope(shield=True):
                        await self.settle(claim, ids, window)
            return ids, False


def _ms(span: timedelta) -> int:
    return max(1, math.ceil(span.total_seconds() * 1000))
