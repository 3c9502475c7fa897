"""Set-up for the tests of a spool with the fleet's shared state held by a
stand-in (tests/test_fleet_spool.py, tests/test_fleet_slots_spool.py): the
next hops and their routes, and a spool that asks the stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from spoold.daemon.routing import Router
from spoold.limits import SharedRates, SharedSlots
from spoold.spool import Spool
from spoold.testing import FakeClock
from tests.relay_helpers import MakeRelay, route
from tests.smtp_server import SmtpTestServer, StartServer
from tests.spool_helpers import START
from tests.test_limits import router_for, spool_with


async def one_hop(
    tmp_path: Path, start_smtp_server: StartServer, **keys: Any
) -> tuple[SmtpTestServer, Router]:
    """A next hop and the one route ``free`` to it, with the route's ``keys``."""
    hop = await start_smtp_server()
    return hop, router_for(tmp_path, {"free": {"next_hops": [hop.hop], **keys}})


async def two_hops(
    tmp_path: Path,
    start_smtp_server: StartServer,
    free: dict[str, Any] | None = None,
    **keys: Any,
) -> tuple[SmtpTestServer, SmtpTestServer, Router]:
    """Two next hops: the route ``limited`` (``@limited.example``, with
    ``keys``) to the first, the default route ``free`` (with ``free``) to
    the second."""
    limited, other = await start_smtp_server(), await start_smtp_server()
    router = router_for(
        tmp_path,
        {
            "limited": {"domains": ["limited.example"], "next_hops": [limited.hop], **keys},
            "free": {"next_hops": [other.hop], **(free or {})},
        },
    )
    return limited, other, router


@asynccontextmanager
async def fleet_spool(
    tmp_path: Path,
    make_relay: MakeRelay,
    router: Router,
    clock: FakeClock | None = None,
    *,
    rates: SharedRates | None = None,
    slots: SharedSlots | None = None,
    **options: Any,
) -> AsyncIterator[Spool]:
    """A running spool on ``router`` (at START unless ``clock``) that asks
    ``rates`` and ``slots`` where given."""
    clock = FakeClock(START) if clock is None else clock
    async with spool_with(tmp_path, make_relay(route()), router, clock, **options) as (spool, _):
        if slots is not None:
            spool.shared_slots = slots
        if rates is not None:
            spool.shared_rates = rates
        yield spool
