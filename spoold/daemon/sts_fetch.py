"""The HTTPS fetch of an MTA-STS policy (RFC 8461 §3.3), for
:class:`~spoold.mta_sts.MtaStsPolicies`.

``GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` over HTTP/1.0 (so
the body is the bytes up to the end of the connection; a chunked answer is
refused):

* the certificate must be valid for ``mta-sts.DOMAIN`` from a CA of the
  default trust store (``ssl.create_default_context``: the system's, or
  the file named by ``SSL_CERT_FILE``);
* only a ``200`` with a ``text/plain`` body is taken; a redirect is an
  error (the RFC forbids following it), as is any other status;
* the body must be whole: exactly its Content-Length, or, without one,
  ending with a line ending (a TCP close without TLS close_notify looks
  like the end: see :func:`_body`); a malformed status or header line, or
  two Content-Type or Content-Length headers, are refused;
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
import re
import ssl

import anyio

from spoold.errors import TlsPolicyError
from spoold.hops import ResolveHost
from spoold.mta_sts import MAX_POLICY_SIZE
from spoold.numerals import ascii_decimal

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


_STATUS = re.compile(rb"HTTP/[0-9]\.[0-9] ([0-9]{3})(?: [\t\x20-\x7e]*)?")
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _body(host: str, response: bytes) -> str:
    """The policy text of an HTTP response, or :class:`TlsPolicyError`.

    A body must be known whole: TLS ended by a plain TCP close (no
    close_notify) reads here like a clean end, so an attacker on the path
    could cut a policy short, and ``mx: *.example.co`` cut from
    ``mx: *.example.com`` is another registrable name. With a
    Content-Length, exactly that many bytes are taken; without one, the
    body must end with a line ending (every policy line ends with one as
    written by the servers seen; a cut at a line's end leaves a shorter
    but well-formed list of whole names). A chunked answer (not expected to
    an HTTP/1.0 request) is refused."""
    where = f"https://{host}{_PATH}"
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep or len(head) > _MAX_HEADER:
        raise TlsPolicyError(f"{where}: not an HTTP response")
    status_line, *header_lines = head.split(b"\r\n")
    status = _STATUS.fullmatch(status_line)
    if status is None:
        shown = status_line[:80].decode("ascii", "replace")
        raise TlsPolicyError(f"{where}: not an HTTP response: {shown!r}")
    code = int(status.group(1))
    if 300 <= code < 400:
        raise TlsPolicyError(f"{where}: a redirect (HTTP {code}), which MTA-STS does not follow")
    if code != 200:
        raise TlsPolicyError(f"{where}: HTTP {code}")
    headers: dict[str, list[str]] = {}
    for raw in header_lines:
        line = raw.decode("iso-8859-1")
        name, colon, value = line.partition(":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise TlsPolicyError(f"{where}: a malformed header line: {line[:80]!r}")
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))
    for name in ("content-type", "content-length"):
        if len(headers.get(name, ())) > 1:
            raise TlsPolicyError(f"{where}: {len(headers[name])} {name} headers")
    if "transfer-encoding" in headers:
        raise TlsPolicyError(
            f"{where}: a Transfer-Encoding ({', '.join(headers['transfer-encoding'])}) "
            "answer to an HTTP/1.0 request"
        )
    kind = headers.get("content-type", [""])[0].split(";")[0].strip().lower()
    if kind != "text/plain":
        raise TlsPolicyError(f"{where}: content type {kind or '(none)'!r}, not text/plain")
    if len(body) > MAX_POLICY_SIZE:
        raise TlsPolicyError(f"{where}: a policy larger than {MAX_POLICY_SIZE} bytes")
    length = headers.get("content-length")
    if length is not None:
        text = length[0]
        declared = ascii_decimal(text, max_digits=12)
        if declared is None:
            raise TlsPolicyError(f"{where}: a bad Content-Length {text[:40]!r}")
        if len(body) < declared:
            raise TlsPolicyError(
                f"{where}: the policy was cut short ({len(body)} of {declared} bytes)"
            )
        if len(body) > declared:
            raise TlsPolicyError(
                f"{where}: {len(body)} bytes of policy, more than its Content-Length {int(text)}"
            )
    elif body and not body.endswith(b"\n"):
        raise TlsPolicyError(
            f"{where}: the policy ends inside a line and has no Content-Length "
            "(it may have been cut short)"
        )
    return body.decode("utf-8", "replace")


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__
