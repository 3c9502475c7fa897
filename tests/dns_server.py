"""A DNS server and an HTTPS server for tests, in the test's own event loop.

:class:`DnsTestServer` answers UDP and TCP queries on 127.0.0.1 and a free
port from a zone the test fills (:meth:`DnsTestServer.add`: a name, a
type, the records in zone-file text). A name marked ``signed`` is answered
with the AD bit set, as a validating resolver does for data it validated;
every other answer has AD clear. A name listed in ``servfail`` gets
SERVFAIL (:meth:`DnsTestServer.fail`: or only questions of one type, after
some answers); a name with no records at all gets NXDOMAIN; a name with
records of other types, an empty answer. What was asked is kept (``queries``).

:class:`HttpsTestServer` serves one path over TLS (a certificate the test
gives) with a status, a content type and a body the test sets, and counts
requests. Enough for ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``.

:func:`loopback_address` picks a random address of 127.0.0.0/8 so that a
test may bind the ports mail and the web use (25, 443) without colliding
with another test; binding them needs root or a like permission (:func:`need_low_ports`).
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

__all__ = [
    "DnsTestServer",
    "HttpsTestServer",
    "loopback_address",
    "need_low_ports",
    "dns_server",
]


def loopback_address() -> str:
    """A random address of 127.0.0.0/8 other than 127.0.0.1."""
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


def need_low_ports() -> None:
    """Skip the test, saying why, unless this process may bind ports below
    1024 (25, 443): root, CAP_NET_BIND_SERVICE, or a low
    ``net.ipv4.ip_unprivileged_port_start``; found by trying."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((loopback_address(), 25))
        except PermissionError:
            start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            first = start.read_text().strip() if start.exists() else "unknown"
            pytest.skip(
                "binds ports 25 and 443 of a loopback address: not allowed here "
                f"(not root, no CAP_NET_BIND_SERVICE, ip_unprivileged_port_start is {first})"
            )
        except OSError:
            pass  # taken, or no such address: the test says so when it binds


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


@dataclass
class DnsTestServer:
    """See the module docstring."""

    records: dict[tuple[dns.name.Name, int], list[str]] = field(default_factory=dict)
    signed: set[dns.name.Name] = field(default_factory=set)
    servfail: set[dns.name.Name] = field(default_factory=set)
    # (name, type): answers still given before SERVFAIL (fail(..., after=N))
    fail_after: dict[tuple[dns.name.Name, int], int] = field(default_factory=dict)
    ttl: int = 300  # of every answer (0: resolvers keep nothing)
    queries: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Server | None = None

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, name: str, rdtype: str, *values: str, signed: bool = False) -> None:
        """Records of ``name`` (``"A"``, ``"10 mx.example.org."``...)."""
        key = (_name(name), dns.rdatatype.from_text(rdtype))
        self.records.setdefault(key, []).extend(values)
        if signed:
            self.signed.add(key[0])

    def sign(self, name: str) -> None:
        """Answers about ``name`` carry the AD bit from now on."""
        self.signed.add(_name(name))

    def fail(self, name: str, rdtype: str | None = None, *, after: int = 0) -> None:
        """Questions about ``name`` get SERVFAIL from now on; with
        ``rdtype``, only questions of that type, once ``after`` of them
        were answered."""
        if rdtype is None:
            self.servfail.add(_name(name))
        else:
            self.fail_after[(_name(name), dns.rdatatype.from_text(rdtype))] = after

    def remove(self, name: str, rdtype: str) -> None:
        self.records.pop((_name(name), dns.rdatatype.from_text(rdtype)), None)

    def answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags &= ~dns.flags.AD
        response.flags |= dns.flags.RA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name, rdtype = question.name, question.rdtype
        self.queries.append((name.to_text(), dns.rdatatype.to_text(rdtype)))
        left = self.fail_after.get((name, rdtype))
        if left is not None:
            self.fail_after[(name, rdtype)] = left - 1
        if name in self.servfail or (left is not None and left <= 0):
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        values = self.records.get((name, rdtype))
        if values:
            response.answer.append(
                dns.rrset.from_text_list(name, self.ttl, dns.rdataclass.IN, rdtype, values)
            )
        elif not any(n == name for n, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        if name in self.signed:
            response.flags |= dns.flags.AD
        return response.to_wire(max_size=65535)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                reply = server.answer(data)
                if reply is not None:
                    self.transport.sendto(reply, addr)  # type: ignore[attr-defined]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    reply = server.answer(await reader.readexactly(size))
                    if reply is None:
                        break
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self._tcp = await asyncio.start_server(tcp, "127.0.0.1", 0)
        self.port = self._tcp.sockets[0].getsockname()[1]
        transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", self.port))
        self._udp = transport

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsTestServer]:
    server = DnsTestServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@dataclass
class HttpsTestServer:
    """See the module docstring."""

    context: ssl.SSLContext
    path: str = "/.well-known/mta-sts.txt"
    status: str = "200 OK"
    content_type: str = "text/plain"
    body: str = ""
    extra_headers: str = ""
    raw: bytes | None = None  # the whole response as sent, instead of the above
    abrupt: bool = False  # end with a TCP close, without TLS close_notify (a cut)
    requests: int = 0
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self, host: str, port: int = 443) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            path = head.split(b" ")[1].decode()
            status, body = (self.status, self.body) if path == self.path else ("404 No", "")
            data = body.encode()
            response = self.raw
            if response is None:
                response = (
                    f"HTTP/1.0 {status}\r\nContent-Type: {self.content_type}\r\n"
                    f"Content-Length: {len(data)}\r\n{self.extra_headers}\r\n".encode()
                    + data
                )
            writer.write(response)
            await writer.drain()
            if self.abrupt:
                sock = writer.get_extra_info("socket")
                sock.shutdown(socket.SHUT_RDWR)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except ssl.SSLError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
