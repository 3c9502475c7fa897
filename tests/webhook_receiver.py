"""A webhook endpoint for tests: HTTPS (or plain HTTP) on 127.0.0.1 that
records every POST and answers ``status`` (change it freely), or what
``answer(body)`` says when set, after ``delay`` seconds (a slow endpoint,
or the round trip to a far one). It counts the posts it holds at once
(``max_in_flight``; each post records how many were in flight when it
came). A 3xx answer names ``/elsewhere`` in a ``Location`` header. Just
enough HTTP/1.1 for httpx: a request line, headers, a Content-Length body,
keep-alive connections. ``stop()`` closes the port (a refused connection);
``start(port)`` opens it again on the same port."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["ReceivedPost", "WebhookReceiver"]

HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ReceivedPost:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int  # what the receiver answered
    in_flight: int = 1  # posts the receiver held when this one came, itself included


@dataclass
class WebhookReceiver:
    tls: ssl.SSLContext | None = None
    status: int = 200
    answer: Callable[[bytes], int] | None = None  # the status for a body, instead of status
    delay: float = 0.0  # seconds before each answer
    posts: list[ReceivedPost] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{HOST}:{self.port}/hook"

    @property
    def accepted(self) -> list[ReceivedPost]:
        return [p for p in self.posts if 200 <= p.status < 300]

    async def start(self, port: int | None = None) -> None:
        self._server = await asyncio.start_server(
            self._serve, HOST, self.port if port is None else port, ssl=self.tls
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def wait_for(self, condition: object, timeout: float = 30.0) -> None:
        """Wait until ``condition()`` is true, woken by each post."""
        assert callable(condition)
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            bodies = [p.body.decode(errors="replace") for p in self.posts]
            raise AssertionError(f"not reached in {timeout}s; posts: {bodies}") from None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                path = line.decode("latin-1").split()[1]
                headers: dict[str, str] = {}
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = self.status if self.answer is None else self.answer(body)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    self.posts.append(ReceivedPost(path, headers, body, status, self.in_flight))
                    self._changed.set()
                    if self.delay:
                        await asyncio.sleep(self.delay)
                finally:
                    self.in_flight -= 1
                where = "Location: /elsewhere\r\n" if 300 <= status < 400 else ""
                writer.write(
                    f"HTTP/1.1 {status} X\r\n{where}Content-Length: 0\r\n\r\n".encode("ascii")
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()
