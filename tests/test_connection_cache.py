"""The connection cache's rules under contention, against real SMTP servers
on 127.0.0.1 (tests/smtp_server.py): a waiter gives up after
``acquire_timeout`` and leaves no trace; freed connections and slots go to
the oldest waiter, whatever hop it waits for; and under ``max_total`` the
least recently used idle connection of another hop is closed to make room;
a connection logged in as one user is never lent to settings with another.

Connections are held by tasks inside ``cache.connection(...)`` until the
test sets their event; :func:`anyio.wait_all_tasks_blocked` says when every
task has got as far as it can (queued as a waiter, or holding), so the
order of arrival is the order the test chose, without sleeping.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field, replace
from hashlib import sha256

import anyio
import anyio.abc
import pytest
import trustme

from spoold.connection_cache import Connection, ConnectionCache, RouteSettings
from spoold.dane import TlsaRecord
from spoold.errors import HopUnavailableError
from spoold.tls_policy import TlsRequirement
from tests.smtp_server import HANG, SmtpTestServer, StartServer, TlsCertificate

SETTINGS = RouteSettings(tls="none", connect_timeout=5.0, command_timeout=5.0)
TIMEOUT = 20.0


class FakeMonotonic:
    """The clock idle times are measured by; moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Holder:
    """A task that takes a connection to ``hop`` and keeps it until
    :attr:`done` is set."""

    hop: str
    done: anyio.Event = field(default_factory=anyio.Event)
    conn: Connection | None = None
    error: Exception | None = None
    got: anyio.Event = field(default_factory=anyio.Event)

    async def run(self, cache: ConnectionCache, order: list[str], name: str) -> None:
        try:
            async with cache.connection(self.hop, SETTINGS) as conn:
                self.conn = conn
                order.append(name)
                self.got.set()
                await self.done.wait()
        except HopUnavailableError as exc:
            self.error = exc
            self.got.set()


async def until_closed(server: SmtpTestServer, count: int) -> None:
    """Wait until the server has seen ``count`` connections end."""
    with anyio.fail_after(5):
        while server.connections_closed < count:
            await anyio.sleep(0.01)


async def test_a_waiter_gives_up_after_acquire_timeout_and_leaves_no_trace(
    start_smtp_server: StartServer,
) -> None:
    server = await start_smtp_server()
    cache = ConnectionCache(max_per_hop=1, acquire_timeout=0.2, idle_timeout=3600)
    order: list[str] = []
    holder, waiter = Holder(server.hop), Holder(server.hop)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder.run, cache, order, "holder")
            await holder.got.wait()
            tg.start_soon(waiter.run, cache, order, "waiter")
            await waiter.got.wait()  # it gave up: the holder still holds

            assert isinstance(waiter.error, HopUnavailableError)
            assert str(waiter.error) == f"{server.hop}: no free connection within 0.2s"
            assert order == ["holder"]

            holder.done.set()
        # The released connection went idle, not to the waiter that left.
        assert cache.idle_connections == 1
        assert cache.open_connections == 1
        async with cache.connection(server.hop, SETTINGS) as again:
            assert again is holder.conn
    assert cache.connections_made == 1
    assert server.connections_opened == 1


async def test_a_released_connection_goes_to_the_oldest_waiter(
    start_smtp_server: StartServer,
) -> None:
    server = await start_smtp_server()
    cache = ConnectionCache(max_per_hop=1, idle_timeout=3600)
    order: list[str] = []
    holders = {name: Holder(server.hop) for name in ("first", "w1", "w2", "w3", "late")}
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holders["first"].run, cache, order, "first")
            await holders["first"].got.wait()
            for name in ("w1", "w2", "w3"):
                tg.start_soon(holders[name].run, cache, order, name)
                await anyio.wait_all_tasks_blocked()  # queued, in this order
            assert order == ["first"]

            holders["first"].done.set()
            # One arriving while others wait queues behind them, even with
            # the connection between two users.
            tg.start_soon(holders["late"].run, cache, order, "late")
            for name in ("w1", "w2", "w3"):
                await holders[name].got.wait()
                assert order[-1] == name
                holders[name].done.set()
            await holders["late"].got.wait()
            holders["late"].done.set()
    assert order == ["first", "w1", "w2", "w3", "late"]
    assert {id(h.conn) for h in holders.values()} == {id(holders["first"].conn)}
    assert server.connections_opened == 1


async def test_a_freed_slot_goes_to_the_oldest_waiter_of_any_hop(
    start_smtp_server: StartServer,
) -> None:
    """max_total = 1: one waiter for hop B, then one for hop A. When A's
    connection is released, B waited longer: A's idle connection is closed
    to make room and B gets the slot, before the second A waiter."""
    a, b = await start_smtp_server(), await start_smtp_server()
    cache = ConnectionCache(max_per_hop=1, max_total=1, idle_timeout=3600)
    order: list[str] = []
    holder, for_b, for_a = Holder(a.hop), Holder(b.hop), Holder(a.hop)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder.run, cache, order, "holder A")
            await holder.got.wait()
            tg.start_soon(for_b.run, cache, order, "waiter B")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(for_a.run, cache, order, "waiter A")
            await anyio.wait_all_tasks_blocked()

            holder.done.set()
            await for_b.got.wait()
            assert order == ["holder A", "waiter B"]
            await until_closed(a, 1)  # A's connection made room
            for_b.done.set()
            await for_a.got.wait()
            for_a.done.set()
    assert order == ["holder A", "waiter B", "waiter A"]
    assert cache.open_connections == 1


@pytest.mark.parametrize("older", ["A", "C"])
async def test_max_total_closes_the_least_recently_used_idle_connection_of_another_hop(
    start_smtp_server: StartServer, older: str
) -> None:
    servers = {name: await start_smtp_server() for name in "ABC"}
    clock = FakeMonotonic()
    cache = ConnectionCache(max_per_hop=2, max_total=2, idle_timeout=3600, monotonic=clock)
    with anyio.fail_after(TIMEOUT):
        first, second = (older, "C" if older == "A" else "A")
        for name in (first, second):  # each released (idle) at its own time
            async with cache.connection(servers[name].hop, SETTINGS):
                pass
            clock.now += 1.0
        assert cache.idle_connections == 2

        async with cache.connection(servers["B"].hop, SETTINGS):
            await until_closed(servers[first], 1)
            assert servers[second].connections_closed == 0
            assert cache.open_connections == 2
            assert cache.idle_connections == 1
    assert servers["B"].connections_opened == 1


async def test_no_idle_connection_to_close_means_waiting_not_exceeding_max_total(
    start_smtp_server: StartServer,
) -> None:
    a, b = await start_smtp_server(), await start_smtp_server()
    cache = ConnectionCache(max_per_hop=5, max_total=1, acquire_timeout=0.2, idle_timeout=3600)
    order: list[str] = []
    holder, waiter = Holder(a.hop), Holder(b.hop)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder.run, cache, order, "holder A")
            await holder.got.wait()
            tg.start_soon(waiter.run, cache, order, "waiter B")
            await waiter.got.wait()
            assert isinstance(waiter.error, HopUnavailableError)
            assert a.connections_closed == 0  # a busy connection is never closed
            holder.done.set()
    assert b.connections_opened == 0
    assert order == ["holder A"]


async def test_a_connection_logged_in_as_one_user_is_never_lent_for_another(
    start_smtp_server: StartServer, tls_certificate: TlsCertificate
) -> None:
    # Two routes through one hop, their settings differing only in the login.
    server = await start_smtp_server(
        tls_context=tls_certificate.server_context(),
        accounts={"billing": "b-pw", "support": "s-pw"},
        auth_require_tls=True,
    )
    secure = RouteSettings(tls="required", verify_certificates=False, command_timeout=5.0)
    billing = replace(secure, auth=("billing", "b-pw"))
    support = replace(secure, auth=("support", "s-pw"))
    cache = ConnectionCache(idle_timeout=3600)
    with anyio.fail_after(TIMEOUT):
        async with cache.connection(server.hop, billing) as first:
            pass
        async with cache.connection(server.hop, support) as second:
            assert second is not first  # the idle billing connection is not lent
        async with cache.connection(server.hop, billing) as again:
            assert again is first
        await cache.close_and_flush()

    assert server.auth_attempts == [("billing", True), ("support", True)]
    assert server.connections_opened == 2


async def test_a_connection_checked_less_strictly_is_never_lent_to_a_tls_policy(
    start_smtp_server: StartServer, tls_certificate: TlsCertificate
) -> None:
    """Issue 22: a message whose MX route's TLS policy needs a PKIX or DANE
    check never gets a connection opened without it, and the check is the
    policy's whatever the route's verify_certificates says."""
    server = await start_smtp_server(tls_context=tls_certificate.server_context())
    der = ssl.PEM_cert_to_DER_cert(tls_certificate.cert.read_text())
    weak = RouteSettings(tls="opportunistic", verify_certificates=False, command_timeout=5.0)
    pkix = replace(
        weak, ca_file=str(tls_certificate.cert), tls_policy=TlsRequirement("MTA-STS enforce")
    )
    dane = replace(
        weak, tls_policy=TlsRequirement("DANE", (TlsaRecord(3, 0, 1, sha256(der).digest()),))
    )
    cache = ConnectionCache(idle_timeout=3600)
    with anyio.fail_after(TIMEOUT):
        async with cache.connection(server.hop, weak) as first:
            assert first.client.tls_active  # encrypted, but the certificate unchecked
        async with cache.connection(server.hop, pkix) as second:
            assert second is not first
        async with cache.connection(server.hop, dane) as third:
            assert third is not first and third is not second
        async with cache.connection(server.hop, pkix) as again:
            assert again is second

        # The policy's check holds even where the route checks nothing.
        unverifiable = replace(weak, tls_policy=TlsRequirement("MTA-STS enforce"))
        with pytest.raises(HopUnavailableError, match=r"TLS policy \(MTA-STS enforce\): TLS "):
            async with cache.connection(server.hop, unverifiable):
                pass
        other_key = TlsaRecord(3, 0, 1, sha256(b"another certificate").digest())
        mismatch = replace(weak, tls_policy=TlsRequirement("DANE", (other_key,)))
        with pytest.raises(HopUnavailableError, match="matches none of its 1 usable TLSA"):
            async with cache.connection(server.hop, mismatch):
                pass
        await cache.close_and_flush()

    assert server.connections_opened == 5


async def test_tls_contexts_are_kept_by_what_shapes_them_and_built_off_the_loop(
    monkeypatch: pytest.MonkeyPatch, tls_certificate: TlsCertificate
) -> None:
    """DANE hosts, each with its own TLSA records, share one context that
    loads no CA; a PKIX context reads its CA file once, in a worker
    thread, never on the event loop."""
    import threading

    import spoold.connection_cache as cc

    built_in: list[str] = []
    build = cc._build_context

    def counting(key: cc.ContextKey) -> ssl.SSLContext:
        built_in.append(threading.current_thread().name)
        return build(key)

    monkeypatch.setattr(cc, "_build_context", counting)
    contexts = cc.TlsContexts()
    dane = [
        RouteSettings(tls_policy=TlsRequirement("DANE", (TlsaRecord(3, 1, 1, bytes([i]) * 32),)))
        for i in range(100)
    ]
    first = await contexts.get(dane[0])
    for settings in dane[1:]:
        assert await contexts.get(settings) is first
    assert first.verify_mode == ssl.CERT_NONE and not first.check_hostname
    assert first.cert_store_stats()["x509_ca"] == 0  # no CA bundle read for DANE
    assert await contexts.get(RouteSettings(verify_certificates=False)) is first

    pkix = RouteSettings(ca_file=str(tls_certificate.cert))
    checked = await contexts.get(pkix)
    assert checked.verify_mode == ssl.CERT_REQUIRED and checked.check_hostname
    assert await contexts.get(replace(pkix, command_timeout=5)) is checked
    policy = RouteSettings(verify_certificates=False, ca_file=str(tls_certificate.cert))
    assert await contexts.get(replace(policy, tls_policy=TlsRequirement("MTA-STS"))) is checked

    assert len(built_in) == 2
    assert threading.main_thread().name not in built_in


async def test_dane_ta_checks_the_chain_and_the_name_against_the_anchor_alone(
    start_smtp_server: StartServer,
) -> None:
    """A host with only DANE-TA ``2 0 0`` records: its chain must lead to
    the anchor (a root or an intermediate) and its certificate name the
    host; no other CA counts."""
    root = trustme.CA()
    middle = root.create_child_ca()

    def der(ca: trustme.CA) -> bytes:
        return ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode())

    def context(ca: trustme.CA, name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(ctx)
        return ctx

    def anchored(*anchors: bytes) -> RouteSettings:
        records = tuple(TlsaRecord(2, 0, 0, a) for a in anchors)
        return RouteSettings(command_timeout=5.0, tls_policy=TlsRequirement("DANE", records))

    good = await start_smtp_server(tls_context=context(middle, "127.0.0.1"))
    misnamed = await start_smtp_server(tls_context=context(root, "mx.example.net"))
    cache = ConnectionCache()
    with anyio.fail_after(TIMEOUT):
        for anchor in (der(root), der(middle)):
            async with cache.connection(good.hop, anchored(anchor)) as conn:
                assert conn.client.tls_active
        with pytest.raises(HopUnavailableError, match=r"TLS policy \(DANE\): TLS handshake"):
            async with cache.connection(good.hop, anchored(der(trustme.CA()))):
                pass
        with pytest.raises(HopUnavailableError, match=r"TLS policy \(DANE\): TLS handshake"):
            async with cache.connection(misnamed.hop, anchored(der(root))):
                pass
        await cache.close_and_flush()


async def test_a_connection_not_for_reuse_says_quit_and_frees_its_slot(
    start_smtp_server: StartServer,
) -> None:
    # reuse = False (a fleet-wide slot is one attempt): QUIT after use, the
    # hop has closed its side when the body is done, never kept idle.
    server = await start_smtp_server()
    cache = ConnectionCache(max_per_hop=1, idle_timeout=3600)
    once = replace(SETTINGS, reuse=False)
    with anyio.fail_after(TIMEOUT):
        for n in (1, 2):
            async with cache.connection(server.hop, once):
                assert server.open_connections == 1
            assert cache.open_connections == 0 and cache.idle_connections == 0
            assert server.connections_opened == n and server.count("QUIT") == n
        await anyio.wait_all_tasks_blocked()
        assert server.open_connections == 0
        # the same hop with reusable settings is another key, kept as before
        async with cache.connection(server.hop, SETTINGS):
            pass
        assert cache.idle_connections == 1
        await cache.close_and_flush()


async def test_a_cancelled_waiter_handed_a_connection_passes_it_on(
    start_smtp_server: StartServer,
) -> None:
    """A waiter cancelled (a stop) just as a connection is released to it
    does not keep it: the next waiter, or the idle list, gets it."""
    server = await start_smtp_server()
    cache = ConnectionCache(max_per_hop=1, idle_timeout=3600)
    order: list[str] = []
    holder, leaving, staying = Holder(server.hop), Holder(server.hop), Holder(server.hop)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder.run, cache, order, "holder")
            await holder.got.wait()
            async with anyio.create_task_group() as inner:
                inner.start_soon(leaving.run, cache, order, "leaving")
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(staying.run, cache, order, "staying")
                await anyio.wait_all_tasks_blocked()
                holder.done.set()  # released to "leaving", which is cancelled at once
                inner.cancel_scope.cancel()
            await staying.got.wait()
            assert order == ["holder", "staying"]
            assert staying.conn is holder.conn
            staying.done.set()
    assert (cache.open_connections, cache.idle_connections) == (1, 1)
    assert cache.connections_made == 1


async def test_a_stop_during_the_noop_check_frees_the_slot(
    start_smtp_server: StartServer,
) -> None:
    """An idle connection is checked with NOOP before reuse; cancelled while
    the NOOP waits (a daemon stopping), it is dropped and its slot freed."""
    server = await start_smtp_server()
    clock = FakeMonotonic()
    cache = ConnectionCache(max_per_hop=1, idle_timeout=3600, check_after=2.0, monotonic=clock)
    with anyio.fail_after(TIMEOUT):
        async with cache.connection(server.hop, SETTINGS):
            pass
        clock.now += 10  # idle long enough to be checked
        server.behaviour.noop = HANG
        with anyio.move_on_after(0.2):
            async with cache.connection(server.hop, SETTINGS):
                raise AssertionError("a connection whose NOOP got no reply was lent")
        assert (cache.open_connections, cache.idle_connections) == (0, 0)
        await until_closed(server, 1)
        server.behaviour.noop = None
        async with cache.connection(server.hop, SETTINGS):
            pass
    assert cache.connections_made == 2


async def test_a_waiter_with_an_earlier_deadline_gives_up_first(
    start_smtp_server: StartServer,
) -> None:
    """Waiters give up each at its own time: one whose message deadline
    comes first leaves (TimeoutError) while an older one, with a later
    time, keeps its place and gets the connection when it is released."""
    server = await start_smtp_server()
    cache = ConnectionCache(max_per_hop=1, acquire_timeout=TIMEOUT, idle_timeout=3600)
    loop = asyncio.get_running_loop()
    order: list[str] = []
    holder, patient = Holder(server.hop), Holder(server.hop)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder.run, cache, order, "holder")
            await holder.got.wait()
            tg.start_soon(patient.run, cache, order, "patient")
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(TimeoutError):
                await cache.acquire(server.hop, SETTINGS, deadline=loop.time() + 0.2)
            assert order == ["holder"]
            holder.done.set()
            await patient.got.wait()
            assert patient.conn is holder.conn
            patient.done.set()
    assert order == ["holder", "patient"]
    assert (cache.open_connections, cache.idle_connections) == (1, 1)
