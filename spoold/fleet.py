"""The state a fleet of spoold nodes shares in Redis: fleet-wide rates,
fleet-wide connection slots, and the nodes' heartbeats.

Each node keeps its own spool on its own disk; what it shares is policy
state, and only through :class:`SharedState`, one object per node over
redis-py's asyncio client. Its contract:

* **Every call is bounded.** Each Redis call runs under
  :attr:`FleetSettings.timeout` (and the client's socket timeouts are the
  same), so a Redis that is down, unreachable or stopped costs a caller at
  most that long.
* **Redis failing is not mail failing.** A call that fails or times out
  returns None (and :meth:`SharedState.gcra` / :meth:`SharedState.acquire`
  callers then use their local limits); the node is marked *down*, which is
  logged once per outage (``fleet redis down``) and counted in
  :attr:`Health.outages`. The first call that succeeds again marks it *up*
  (``fleet redis up``). Nothing here touches a message: a caller never
  holds or drops mail because of Redis, it only loses the fleet-wide view.
* **Atomic steps are Lua scripts** run by Redis (``EVALSHA``, loaded on
  first use): a throttle check and update, or a slot taken, is one step;
  never a read then a write across two round trips.

The keys (all under ``spoold:``):

* ``spoold:gcra:DEST``: the *theoretical arrival time* of a destination's
  rate (GCRA), in microseconds, expiring when idle;
* ``spoold:slots:DEST``: a sorted set of the holders of a destination's
  connection slots, each scored by the time its lease ends;
* ``spoold:node:NAME``: a node's heartbeat (JSON), expiring after
  :attr:`FleetSettings.heartbeat_ttl`; ``spoold:nodes``: the names of the
  nodes seen, scored by their last heartbeat, each dropped a day
  (:data:`NODES_KEPT`) after its last one (by the next heartbeat of any
  node).

Times are Redis's own clock (``TIME``) unless a caller gives one (the
tests do: ``now_ms``, ``at``), so nodes whose clocks differ still share one
schedule, and a node whose clock is wrong is not listed as dead or from the
future.

The fleet-wide rate is a GCRA (generic cell rate algorithm) with a
*tolerance*, whose tokens are *booked*: a token due at ``TAT`` (the
theoretical arrival time) may be used from ``TAT - tolerance`` on, and
each question books the next one for the asker and moves ``TAT`` one
interval on from ``max(TAT, now)``; the answer says when the booked token
may be used (now, or later: the asker holds the message until then and
sends it without asking again). Booking goes at most the tolerance and
:data:`BOOKED_INTERVALS` intervals ahead; beyond, nothing is booked and
the answer says when to ask again. Booking, not a race for each token,
gives every node its turn: first come, first served, the node nearest
Redis wins every tie. A node that comes for a token up to the tolerance
late loses nothing of the fleet's rate; the long-run rate is exactly the
configured one, and in any span ``W`` the fleet's tokens are at most
``rate * (W + tolerance) + 1``. The tolerance is one interval, but 50 ms
(:data:`TOLERANCE_LATE`) if that is more and within
:data:`TOLERANCE_INTERVALS` intervals, and at most
:data:`TOLERANCE_MAX` (see :func:`gcra_tolerance`): a burst of at most
five tokens at any rate.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio

from spoold.limits import Rate, SharedToken
from spoold.log import get_logger

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = [
    "FleetSettings",
    "Health",
    "NodeBeat",
    "SharedState",
    "gcra_tolerance",
    "redacted_url",
    "KEY_PREFIX",
    "NODES_KEPT",
    "TOLERANCE_LATE",
    "TOLERANCE_INTERVALS",
    "TOLERANCE_MAX",
    "BOOKED_INTERVALS",
]

KEY_PREFIX = "spoold:"

# A node's name stays in ``spoold:nodes`` this long (seconds) after its
# last heartbeat, then the heartbeats of the others drop it.
NODES_KEPT = 86_400.0

# The fleet-wide rate's tolerance: how late a node may come for a token
# without the fleet losing it (see gcra_tolerance). Seconds, but
# TOLERANCE_INTERVALS in intervals of the rate.
TOLERANCE_LATE = 0.05
TOLERANCE_INTERVALS = 4
TOLERANCE_MAX = 1.0

# How far ahead the fleet-wide rate books a token for a node: the tolerance
# and this many intervals. Each node books at most one token per route at a
# time (only the head of its line asks), so as many nodes as this share a
# route's rate in turn, whoever is nearer Redis.
BOOKED_INTERVALS = 8

log = get_logger("spoold.fleet")

_T = TypeVar("_T")


def _refused_login(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing this client's password (or asking
    for one)."""
    text = str(exc)
    return type(exc).__name__ in (
        "AuthenticationError",
        "AuthenticationWrongNumberOfArgsError",
    ) or (text.startswith(("NOAUTH", "WRONGPASS")))


def redacted_url(url: str) -> str:
    """``url`` fit for a log line: any password in it replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """How a node reaches the fleet's Redis. ``url``: ``redis://`` or
    ``rediss://`` (TLS); ``password``: read from the config's
    ``password_file`` (never written in the URL of a log line); ``timeout``:
    the bound of every call, seconds; ``lease``: how long a connection slot
    is held without renewal (a node that dies gives its slots back within
    it); ``heartbeat_ttl``: how long a node's heartbeat lives."""

    url: str
    node: str
    timeout: float = 0.2
    lease: float = 30.0
    heartbeat_ttl: float = 30.0
    password: str | None = field(default=None, repr=False)
    # While Redis is down, the calls of the send path (gcra, acquire, renew,
    # release, beat) are not tried again before this many seconds, so a
    # stopped Redis costs one timeout a second at most, not one per attempt.
    retry_after: float = 1.0


@dataclass(slots=True)
class Health:
    """Whether this node's Redis answers: None until the first call was
    answered or failed (not known yet: never said to be up before Redis
    said anything). ``outages``: how many times it went down (a counter
    for the metrics); ``last_error``: why, the last time."""

    up: bool | None = None
    outages: int = 0
    last_error: str = ""
    since: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class NodeBeat:
    """One node's last heartbeat: its name, when (POSIX time) and its queue
    counts (queue name → messages)."""

    node: str
    at: float
    queues: Mapping[str, int]


def gcra_tolerance(interval: float) -> float:
    """The tolerance (seconds) of a fleet-wide rate whose tokens are
    ``interval`` seconds apart: one interval; or :data:`TOLERANCE_LATE` if
    that is longer (a node's lateness is milliseconds of event loop and
    round trip, whatever the rate) but no more than
    :data:`TOLERANCE_INTERVALS` intervals (a fast rate: the fleet never
    takes more than five tokens at once, not 51 at 1000/s); at most
    :data:`TOLERANCE_MAX` (a slow rate, say 10/h, never lets a second token
    go much before its interval)."""
    late = min(TOLERANCE_LATE, TOLERANCE_INTERVALS * interval)
    return min(max(interval, late), TOLERANCE_MAX)


# GCRA with a tolerance and bookings (see the module docstring). KEYS[1]:
# the TAT key; ARGV: interval, tolerance and the booking bound
# (microseconds, so that rates above 1000/s stay exact), now
# (microseconds, "" for Redis's clock). Returns {1, wait}: a token booked
# for the caller, to be used wait microseconds on (0: at once; the TAT
# moved one interval on), or {0, wait}: none booked (the schedule is full
# as far as the bound), ask again wait microseconds on.
_GCRA = """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local ahead = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]))
-- Not a time (damaged, or "inf"/"nan"): as if there were none.
if tat ~= nil and (tat ~= tat or tat == math.huge or tat == -math.huge) then tat = nil end
if tat == nil or tat < now then tat = now end
-- A booking leaves the TAT at most tolerance + bound + interval ahead; one
-- further on is from a slower rate (a reload) or a clock that went back:
-- the schedule starts afresh (and is written so below).
if tat > now + tolerance + ahead + interval then tat = now end
local due = math.max(tat - tolerance, now)
if due - now > ahead then return {0, due - now - ahead} end
-- The key outlives the TAT, and lives at least a minute: a TAT in a
-- caller's clock (a test's) must not vanish in a pause of real time.
redis.call('SET', KEYS[1], string.format('%d', tat + interval), 'PX',
           math.max(math.floor((tat + interval - now + tolerance) / 1000) + 1, 60000))
return {1, due - now}
"""

# A heartbeat, on Redis's clock. KEYS[1]: the node's key, KEYS[2] the
# sorted set of nodes; ARGV: the node's name, its queue counts (JSON), the
# heartbeat's life (ms), now (microseconds, "" for Redis's clock), how long
# a silent node stays in the set (microseconds). Returns the time written
# (seconds, as text).
_BEAT = """
local now = tonumber(ARGV[4])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local at = string.format('%d.%06d', math.floor(now / 1000000), now % 1000000)
local body = '{"node":' .. cjson.encode(ARGV[1]) .. ',"at":' .. at ..
             ',"queues":' .. ARGV[2] .. '}'
redis.call('SET', KEYS[1], body, 'PX', tonumber(ARGV[3]))
redis.call('ZADD', KEYS[2], at, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf',
           string.format('(%.6f', (now - tonumber(ARGV[5])) / 1000000))
return at
"""

# Connection slots. A destination's slots are a sorted set of holders
# (a node's name and a number of its own), each scored by the time (ms) its
# lease ends. Both scripts first drop the leases that ended (a dead node's),
# and both keep the set alive as long as its furthest lease, whoever wrote
# it (nodes may have different leases), never by the caller's lease alone.
_KEEP_ALIVE = """
local function keep_alive(key, now)
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if top[2] then
    redis.call('PEXPIRE', key, math.max(1, math.floor(tonumber(top[2]) - now) + 1))
  end
end
local function clock(arg)
  local now = tonumber(arg)
  if now == nil then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end
"""

# Take a slot: KEYS[1] the destination's sorted set; ARGV: limit, lease
# (ms), holder, now (ms, "" for Redis's clock). A holder that has a slot
# renews it. Returns 1 (taken) or 0 (the fleet holds the limit).
_ACQUIRE = (
    _KEEP_ALIVE
    + """
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local now = clock(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[3]) == false
   and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
keep_alive(KEYS[1], now)
return 1
"""
)

# Renew every slot a node holds, in one step. KEYS: the destinations'
# sorted sets; ARGV: lease (ms), now (ms or ""), then per holder three
# values: the number of its key in KEYS, the holder, the limit. A holder
# still there gets a new lease; one not there (its lease ran out, Redis
# lost it, or the node took it while Redis was away) is taken again if
# the limit leaves room. Returns, per holder, 1 (held) or 0 (not held).
_RENEW = (
    _KEEP_ALIVE
    + """
local lease = tonumber(ARGV[1])
local now = clock(ARGV[2])
local swept = {}
local out = {}
for i = 3, #ARGV, 3 do
  local key = KEYS[tonumber(ARGV[i])]
  local holder = ARGV[i + 1]
  if not swept[key] then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    swept[key] = true
  end
  local held = 0
  if redis.call('ZSCORE', key, holder) ~= false
     or redis.call('ZCARD', key) < tonumber(ARGV[i + 2]) then
    redis.call('ZADD', key, now + lease, holder)
    held = 1
  end
  out[#out + 1] = held
end
for key, _ in pairs(swept) do keep_alive(key, now) end
return out
"""
)


# Error replies that say the whole server cannot serve (out of memory,
# a read-only replica, a failed save, a script or a load that holds it, a
# user without the rights): Redis down for this node, as a timeout is.
_NODE_WIDE_REPLIES = frozenset(
    {"OOM", "READONLY", "MISCONF", "BUSY", "LOADING", "NOPERM", "MASTERDOWN", "NOAUTH"}
)


def _node_wide(exc: Exception) -> bool:
    """Whether an error reply is about the whole server (by its code: the
    client keeps it apart from the text for the codes it knows)."""
    code = getattr(exc, "status_code", None) or str(exc).partition(" ")[0]
    return code in _NODE_WIDE_REPLIES


def _ms(now_ms: int | None) -> str:
    return "" if now_ms is None else str(now_ms)


class SharedState:
    """One node's view of the fleet's Redis (see the module docstring).
    Open it with ``async with``; every method returns None when Redis did
    not answer in time (the caller then acts alone)."""

    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self.health = Health()
        # Imported here: the sendmail command reads the config (and so
        # this module) and never talks to Redis.
        import redis.asyncio as aioredis
        import redis.exceptions

        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            settings.url,
            password=settings.password,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            retry_on_timeout=False,
            decode_responses=True,
        )
        self._gcra = self._redis.register_script(_GCRA)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._beat = self._redis.register_script(_BEAT)
        self._tried = -math.inf  # when Redis was last asked (monotonic)
        # An error reply about one call (not the node's Redis down).
        self._reply_error: type[Exception] = redis.exceptions.ResponseError
        self._reply_quiet_until = -math.inf  # monotonic: no "refused" line before

    async def __aenter__(self) -> SharedState:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.timeout):
            await self._redis.aclose()

    # -- the bound around every call

    async def _call(self, step: Callable[[], Awaitable[_T]], *, probe: bool = False) -> _T | None:
        """``step`` under the timeout; None when it failed (any error: Redis
        refused, timed out, or answered what cannot be read). An error
        reply about the call itself (``WRONGTYPE``, a script's error) is
        logged, once a minute at most, and leaves the health as it is; one
        about the whole server (``OOM``, ``READONLY``, ...) marks it down. While Redis is
        down only a ``probe`` (an operator's question) or the first call
        :attr:`FleetSettings.retry_after` after the last try asks it."""
        recently = time.monotonic() - self._tried < self.settings.retry_after
        if self.health.up is False and not probe and recently:
            return None
        self._tried = time.monotonic()
        try:
            with anyio.fail_after(self.settings.timeout):
                result = await step()
        except self._reply_error as exc:
            if _node_wide(exc):
                self._down(exc)
                return None
            # Redis answered, with an error about this call (a key of
            # another type, a script's error): that key's problem, not the
            # node's Redis being down. The caller acts alone all the same.
            now = time.monotonic()
            if now >= self._reply_quiet_until:
                self._reply_quiet_until = now + 60.0
                log.warning("fleet redis refused a call", reason=f"{type(exc).__name__}: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the node acts alone
            self._down(exc)
            return None
        self._up()
        return result

    # Public for the modules beside this one (fleet-wide keys, the
    # suppression mirror): their calls go through the same bound and health.
    call = _call

    @property
    def client(self) -> aioredis.Redis:
        """The redis-py client, for a module beside this one to register its
        scripts; every call on it goes through :meth:`call`."""
        return self._redis

    def _down(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if _refused_login(exc):
            # Redis answered, and refused the login: say what to change.
            given = "the one in" if self.settings.password else "none set: put it in"
            reason = f"Redis refused the password ({given} fleet.password_file): {reason}"
        self.health.last_error = reason
        if self.health.up is not False:  # up, or not known yet
            self.health.up = False
            self.health.outages += 1
            self.health.since = time.time()
            log.warning(
                "fleet redis down",
                redis=redacted_url(self.settings.url),
                reason=reason,
                fallback="local limits",
            )

    def _up(self) -> None:
        if self.health.up is not True:  # down, or not known yet
            self.health.up = True
            self.health.since = time.time()
            log.info("fleet redis up", redis=redacted_url(self.settings.url))

    async def ping(self) -> bool:
        """Whether Redis answers now (and the health follows)."""
        return bool(await self._call(self._redis.ping, probe=True))

    # -- fleet-wide rate

    async def gcra(
        self, destination: str, rate: Rate, *, now_ms: int | None = None
    ) -> SharedToken | None:
        """Book the next fleet-wide token of ``destination`` at ``rate``
        (see :class:`~spoold.limits.SharedToken`: booked, to be used
        ``wait`` seconds on, 0.0 for at once; or none booked, ask again
        after ``wait``); the wait is counted from when Redis ran the script
        (a caller that waits that long from the moment it sent the call is
        on time). None when Redis did not answer (use the local limit)."""
        interval = max(1, round(rate.spacing * 1_000_000))
        tolerance = round(gcra_tolerance(rate.spacing) * 1_000_000)
        ahead = tolerance + BOOKED_INTERVALS * interval
        key = f"{KEY_PREFIX}gcra:{destination}"
        now = "" if now_ms is None else str(now_ms * 1000)
        got = await self._call(
            lambda: self._gcra(keys=[key], args=[interval, tolerance, ahead, now])
        )
        if got is None:
            return None
        booked, wait = got
        return SharedToken(int(wait) / 1_000_000, booked=bool(int(booked)))

    # -- fleet-wide connection slots

    def slots_key(self, destination: str) -> str:
        """The sorted set of ``destination``'s slot holders."""
        return f"{KEY_PREFIX}slots:{destination}"

    async def acquire(
        self, destination: str, limit: int, holder: str, *, now_ms: int | None = None
    ) -> bool | None:
        """Take (or renew) ``holder``'s slot of ``destination``, of ``limit``
        at once fleet-wide, for the lease time. None: Redis did not answer."""
        lease = round(self.settings.lease * 1000)
        key = self.slots_key(destination)

        async def step() -> bool:  # the answer read in the bound: odd is None
            return bool(
                int(await self._acquire(keys=[key], args=[limit, lease, holder, _ms(now_ms)]))
            )

        return await self._call(step)

    async def renew_all(
        self, held: Sequence[tuple[str, str, int]], *, now_ms: int | None = None
    ) -> list[bool] | None:
        """Renew, in one call, the slots ``held`` as (destination, holder,
        limit): per holder, True when it holds its slot for a new lease
        (kept, or taken again when its lease had run out and the limit has
        room), False when not. None: Redis did not answer."""
        if not held:
            return []
        keys: dict[str, int] = {}
        args: list[str | int] = [round(self.settings.lease * 1000), _ms(now_ms)]
        for destination, holder, limit in held:
            number = keys.setdefault(self.slots_key(destination), len(keys) + 1)
            args += [number, holder, limit]

        async def step() -> list[bool]:  # the answer read in the bound: odd is None
            got = [bool(int(g)) for g in await self._renew(keys=list(keys), args=args)]
            if len(got) != len(held):
                raise ValueError(f"{len(got)} answers to {len(held)} renewals")
            return got

        return await self._call(step)

    async def renew(
        self, destination: str, holder: str, *, limit: int = 0, now_ms: int | None = None
    ) -> bool | None:
        """Extend ``holder``'s lease: False when it had run out (and, with
        a ``limit``, the fleet holds that many). One holder's
        :meth:`renew_all`, kept for tests and callers of one slot; with
        ``limit=0`` a slot whose lease ran out is never taken again."""
        got = await self.renew_all([(destination, holder, limit)], now_ms=now_ms)
        return None if got is None else got[0]

    async def release(self, destination: str, holder: str) -> bool | None:
        """Give ``holder``'s slot back (a slot never given back expires)."""
        key = self.slots_key(destination)

        async def step() -> bool:
            return bool(int(await self._redis.zrem(key, holder)))

        return await self._call(step)

    # -- heartbeats

    async def beat(self, queues: Mapping[str, int], *, at: float | None = None) -> bool:
        """Publish this node's heartbeat with its queue counts, timed by
        Redis's clock (``at``: a POSIX time instead, for tests), and drop
        the nodes silent for :data:`NODES_KEPT` from the set of nodes.
        Returns whether Redis took it."""
        node = self.settings.node
        counts = json.dumps({str(q): int(n) for q, n in queues.items()})
        ttl = max(1, round(self.settings.heartbeat_ttl * 1000))
        now = "" if at is None else str(round(at * 1_000_000))
        keys = [f"{KEY_PREFIX}node:{node}", f"{KEY_PREFIX}nodes"]
        kept = round(NODES_KEPT * 1_000_000)
        args: list[str | int] = [node, counts, ttl, now, kept]
        return await self._call(lambda: self._beat(keys=keys, args=args)) is not None

    async def leave(self) -> bool:
        """Take this node's heartbeat and name out (a clean stop: the node
        is not listed as alive for the heartbeat's lifetime). Returns
        whether Redis took it."""
        node = self.settings.node

        async def step() -> object:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(f"{KEY_PREFIX}node:{node}")
                pipe.zrem(f"{KEY_PREFIX}nodes", node)
                return await pipe.execute()

        return await self._call(step) is not None

    async def nodes(self) -> list[NodeBeat] | None:
        """The nodes whose heartbeat is still alive, by name; None when
        Redis did not answer."""

        async def step() -> list[NodeBeat]:
            names = [str(n) for n in await self._redis.zrange(f"{KEY_PREFIX}nodes", 0, -1)]
            if not names:
                return []
            bodies = await self._redis.mget([f"{KEY_PREFIX}node:{n}" for n in names])
            beats = []
            for body in bodies:
                if body is None:
                    continue  # its heartbeat expired: the node is gone or cut off
                try:
                    raw = json.loads(body)
                    queues = {str(k): int(v) for k, v in dict(raw.get("queues", {})).items()}
                    beats.append(NodeBeat(str(raw["node"]), float(raw["at"]), queues))
                except (ValueError, TypeError, KeyError, AttributeError):
                    continue  # not a heartbeat this version wrote: skipped, not fatal
            return sorted(beats, key=lambda b: b.node)

        return await self._call(step, probe=True)
