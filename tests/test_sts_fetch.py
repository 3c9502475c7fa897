"""The HTTPS fetch of MTA-STS policies (spoold/daemon/sts_fetch.py) against
an HTTPS server of the test's own on 127.0.0.1 (tests/dns_server.py), with
a trustme CA in ``SSL_CERT_FILE``: what it takes, and every way it refuses
(a redirect, another content type, too large, an untrusted or misnamed
certificate, no answer)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import trustme

from spoold.daemon.sts_fetch import PolicyFetcher
from spoold.errors import TlsPolicyError
from spoold.mta_sts import MAX_POLICY_SIZE
from tests.dns_server import HttpsTestServer

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx.example.org\r\nmax_age: 86400\r\n"
TIMEOUT = 20


@pytest.fixture
def ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A CA the fetcher trusts (its default context reads SSL_CERT_FILE)."""
    authority = trustme.CA()
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    return authority


def _context(ca: trustme.CA, name: str = "mta-sts.example.org") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


@pytest.fixture
async def web(ca: trustme.CA) -> AsyncIterator[HttpsTestServer]:
    server = HttpsTestServer(_context(ca), body=POLICY)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()


def _fetcher(server: HttpsTestServer, timeout: float = 10.0) -> PolicyFetcher:
    async def resolve(host: str) -> list[str]:
        assert host == "mta-sts.example.org"
        return ["127.0.0.1"]

    assert server.port
    return PolicyFetcher(resolve, timeout=timeout, port=server.port)


async def test_a_policy_is_fetched(web: HttpsTestServer) -> None:
    with anyio.fail_after(TIMEOUT):
        assert await _fetcher(web)("example.org") == POLICY
    assert web.requests == 1


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"status": "301 Moved", "extra_headers": "Location: https://x/\r\n"}, "a redirect"),
        ({"status": "404 Not Found"}, "HTTP 404"),
        ({"content_type": "text/html"}, "content type 'text/html', not text/plain"),
        ({"body": "x" * (MAX_POLICY_SIZE + 1)}, "larger than"),
    ],
    ids=["redirect", "not found", "html", "too large"],
)
async def test_what_is_refused(web: HttpsTestServer, change: dict[str, str], says: str) -> None:
    for key, value in change.items():
        setattr(web, key, value)
    with anyio.fail_after(TIMEOUT), pytest.raises(TlsPolicyError, match=says):
        await _fetcher(web)("example.org")


async def test_a_certificate_of_an_unknown_ca_is_refused(ca: trustme.CA) -> None:
    server = HttpsTestServer(_context(trustme.CA()), body=POLICY)
    await server.start("127.0.0.1", 0)
    try:
        with anyio.fail_after(TIMEOUT), pytest.raises(TlsPolicyError, match="TLS: "):
            await _fetcher(server)("example.org")
        assert server.requests == 0
    finally:
        await server.stop()


async def test_a_certificate_for_another_name_is_refused(ca: trustme.CA) -> None:
    server = HttpsTestServer(_context(ca, "www.example.org"), body=POLICY)
    await server.start("127.0.0.1", 0)
    try:
        with anyio.fail_after(TIMEOUT), pytest.raises(TlsPolicyError, match="TLS: "):
            await _fetcher(server)("example.org")
    finally:
        await server.stop()


async def test_a_server_that_never_answers_is_given_up(ca: trustme.CA) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the request, answers nothing
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0, ssl=_context(ca))
    port = server.sockets[0].getsockname()[1]

    async def resolve(host: str) -> list[str]:
        return ["127.0.0.1"]

    try:
        with anyio.fail_after(TIMEOUT), pytest.raises(TlsPolicyError, match="no answer within"):
            await PolicyFetcher(resolve, timeout=0.5, port=port)("example.org")
    finally:
        server.close()


CUT = b"version: STSv1\r\nmode: enforce\r\nmax_age: 86400\r\nmx: *.example.co"
OK_HEAD = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (OK_HEAD + b"Content-Length: 200\r\n\r\n" + CUT, r"cut short \(63 of 200 bytes\)"),
        (OK_HEAD + b"\r\n" + CUT, "ends inside a line and has no Content-Length"),
        (OK_HEAD + b"Content-Length: 3\r\n\r\n" + POLICY.encode(), "more than its Content-Length"),
        (OK_HEAD + b"Content-Length: 1e3\r\n\r\n" + POLICY.encode(), "a bad Content-Length"),
        (
            OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + POLICY.encode(),
            r"a Transfer-Encoding \(chunked\) answer",
        ),
        (b"HTTP/1.0 2OO OK\r\nContent-Type: text/plain\r\n\r\n" + POLICY.encode(), "not an HTTP"),
        (b"HTTP/1.0 \xd9\xa2\xd9\xa0\xd9\xa0 OK\r\n\r\n" + POLICY.encode(), "not an HTTP"),
        (b"ICY 200 OK\r\nContent-Type: text/plain\r\n\r\n" + POLICY.encode(), "not an HTTP"),
        (OK_HEAD + b"no colon here\r\n\r\n" + POLICY.encode(), "a malformed header line"),
        (OK_HEAD + b"Content-Type: text/html\r\n\r\n" + POLICY.encode(), "2 content-type"),
    ],
    ids=[
        "cut short",
        "cut without length",
        "longer than length",
        "bad length",
        "chunked",
        "bad status",
        "non-ascii status digits",
        "not http",
        "header without colon",
        "two content types",
    ],
)
async def test_a_malformed_or_cut_answer_is_refused(
    web: HttpsTestServer, raw: bytes, says: str
) -> None:
    """A policy cut by a TCP close without TLS close_notify (asyncio reads
    that as the end) must never be taken: ``*.example.co`` is not
    ``*.example.com``."""
    web.raw = raw
    web.abrupt = True
    with anyio.fail_after(TIMEOUT), pytest.raises(TlsPolicyError, match=says):
        await _fetcher(web)("example.org")


async def test_a_whole_policy_without_content_length_is_taken(web: HttpsTestServer) -> None:
    web.raw = OK_HEAD + b"\r\n" + POLICY.encode()
    with anyio.fail_after(TIMEOUT):
        assert await _fetcher(web)("example.org") == POLICY
