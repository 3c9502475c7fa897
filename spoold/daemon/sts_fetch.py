"""The HTTPS fetch of an MTA-STS policy (RFC 8461 §3.3), for
:class:`~spoold.mta_sts.MtaStsPolicies`.

``GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` over HTTP/1.0 (so
the body is the bytes up to the end of the connection, never chunked):

* the certificate must be valid for ``mta-sts.DOMAIN`` from a CA of the
  default trust store (``ssl.create_default_context``: the system's, or
  the file named by ``SSL_CERT_FILE``);
* only a ``200`` with a ``text/plain`` body is taken; a redirect is an
  error (the RFC forbids following it), as is any other status;
* the response may be at most :data:`~spoold.mta_sts.MAX_POLICY_SIZE`
  bytes of body (and 16 KiB of header); the whole fetch, connection
  included, within ``timeout`` seconds;
* the name is resolved by ``resolve_host`` when given (the daemon's
  ``[dns] nameservers``), else by the system; each address is tried in
  turn.

Every failure raises :class:`~spoold.errors.TlsPolicyError` saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import anyio

from spoold.connection_cache import ResolveHost
from spoold.errors import TlsPolicyError
from spoold.mta_sts import MAX_POLICY_SIZE

__all__ = ["PolicyFetcher"]

_MAX_HEADER = 16 * 1024
_PATH = "/.well-known/mta-sts.txt"


class PolicyFetcher:
    """Fetches policies; ``await fetcher(domain)`` gives the body text."""

    def __init__(
        self, resolve_host: ResolveHost | None = None, *, timeout: float = 30.0, port: int = 443
    ) -> None:
        self.resolve_host = resolve_host
        self.timeout = timeout
        self.port = port
        self._context: ssl.SSLContext | None = None

    async def _tls(self) -> ssl.SSLContext:
        if self._context is None:  # reading the trust store blocks: once, in a thread
            self._context = await anyio.to_thread.run_sync(ssl.create_default_context)
        return self._context

    async def __call__(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        try:
            with anyio.fail_after(self.timeout):
                return await self._fetch(host)
        except TimeoutError:
            raise TlsPolicyError(
                f"https://{host}{_PATH}: no answer within {self.timeout:g}s"
            ) from None

    async def _fetch(self, host: str) -> str:
        context = await self._tls()
        addresses = [host]
        if self.resolve_host is not None:
            try:
                addresses = await self.resolve_host(host)
            except Exception as exc:  # the resolver is the caller's code
                raise TlsPolicyError(f"https://{host}{_PATH}: cannot resolve: {exc}") from exc
        errors = []
        for address in addresses:
            try:
                reader, writer = await asyncio.open_connection(
                    address, self.port, ssl=context, server_hostname=host
                )
            except (OSError, ssl.SSLError) as exc:
                errors.append(f"{address}: {_why(exc)}")
                continue
            try:
                request = (
                    f"GET {_PATH} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: spoold\r\n"
                    "Accept: text/plain\r\nConnection: close\r\n\r\n"
                )
                writer.write(request.encode("ascii"))
                await writer.drain()
                response = await _read_all(reader, _MAX_HEADER + MAX_POLICY_SIZE)
            except (OSError, ssl.SSLError) as exc:
                raise TlsPolicyError(f"https://{host}{_PATH}: {_why(exc)}") from exc
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
            return _body(host, response)
        raise TlsPolicyError(f"https://{host}{_PATH}: cannot connect: {'; '.join(errors)}")


async def _read_all(reader: asyncio.StreamReader, limit: int) -> bytes:
    data = bytearray()
    while chunk := await reader.read(65536):
        data += chunk
        if len(data) > limit:
            raise TlsPolicyError(f"a response larger than {limit} bytes")
    return bytes(data)


def _body(host: str, response: bytes) -> str:
    where = f"https://{host}{_PATH}"
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep or len(head) > _MAX_HEADER:
        raise TlsPolicyError(f"{where}: not an HTTP response")
    lines = head.decode("iso-8859-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/") or not status[1].isdigit():
        raise TlsPolicyError(f"{where}: not an HTTP response: {lines[0][:80]!r}")
    code = int(status[1])
    if 300 <= code < 400:
        raise TlsPolicyError(f"{where}: a redirect (HTTP {code}), which MTA-STS does not follow")
    if code != 200:
        raise TlsPolicyError(f"{where}: HTTP {code}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise TlsPolicyError(f"{where}: a chunked answer to an HTTP/1.0 request")
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "text/plain":
        raise TlsPolicyError(f"{where}: content type {kind or '(none)'!r}, not text/plain")
    if len(body) > MAX_POLICY_SIZE:
        raise TlsPolicyError(f"{where}: a policy larger than {MAX_POLICY_SIZE} bytes")
    return body.decode("utf-8", "replace")


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__
