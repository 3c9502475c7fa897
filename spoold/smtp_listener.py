"""The SMTP ingest listener (aiosmtpd), run inside the daemon's task group.

Replies:

* 250 after DATA only once every resulting message is durable on disk;
* 451 (or 452 when the disk is full) when the spool cannot write: nothing
  half-written remains, the client retries later;
* 550 for content with a bare CR or LF under ``bare_line_endings =
  "reject"`` (with ``"normalize"`` they become CRLF); the sequences used for
  SMTP smuggling therefore never split one message into two;
* 552 past ``max_message_size`` (SIZE is advertised), 452 past
  ``max_recipients``, 500 for a line over ``max_line_length``;
* 421 to a connection over ``max_connections``; 554 to a client outside
  ``relay_networks`` (when AUTH is on, such a client may connect and must
  authenticate: 530 to MAIL before that).

With ``tls_cert``/``tls_key`` STARTTLS is offered (``require_tls``: 530 to
MAIL before it); with ``auth_file`` AUTH PLAIN and LOGIN are offered, only
over TLS when TLS is configured. :func:`listener_settings` reads the
certificate and the users file off the event loop, at start and on reload.

Limits are read from the live config on each connection and command, so a
reload applies them to new sessions; the listen addresses need a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import AuthResult, LoginPassword

from spoold.body import LineEndingPolicy
from spoold.config import SmtpConfig
from spoold.errors import BareLineEndingError, SpoolClosedError, SpooldError, StoreError
from spoold.ingest import Origin, Submitter
from spoold.mx import MxError
from spoold.routing import NoRouteError
from spoold.smtp_relay import read_private_file
from spoold.store import Store

__all__ = ["SmtpListener", "ListenerSettings", "listener_settings"]

log = structlog.get_logger("spoold.smtp")


@dataclass(frozen=True)
class ListenerSettings:
    """The listener's config plus what was read from files for it."""

    config: SmtpConfig
    tls_context: ssl.SSLContext | None = None
    users: Mapping[str, str] = field(default_factory=dict, repr=False)  # login -> password


def listener_settings(config: SmtpConfig) -> ListenerSettings:
    """Load the certificate and users file of ``config`` (blocking: run it
    in a worker thread). Raises SpooldError or OSError with the path."""
    context = None
    if config.tls_cert is not None and config.tls_key is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise SpooldError(f"smtp.tls_cert {config.tls_cert}: {exc}") from None
    users: dict[str, str] = {}
    if config.auth_file is not None:
        for number, line in enumerate(read_private_file(config.auth_file).splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            login, sep, password = line.partition(":")
            if not sep or not login:
                raise SpooldError(f"{config.auth_file}:{number}: expected 'user:password'")
            users[login] = password
    return ListenerSettings(config, context, users)


class _Handler:
    def __init__(self, listener: SmtpListener) -> None:
        self.listener = listener

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        settings = self.listener.settings()
        if settings.config.require_tls and session.ssl is None:
            return "530 5.7.0 Must issue a STARTTLS command first"
        peer = session.peer
        if not session.authenticated and not _allowed(peer, settings.config.relay_networks):
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        limit = self.listener.settings().config.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            return f"452 4.5.3 Too many recipients (at most {limit} per message)"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        cfg = self.listener.settings().config
        sender = envelope.mail_from or ""
        if sender == "<>":
            sender = ""
        peer = session.peer[0] if isinstance(session.peer, tuple) else ""
        origin = Origin("ESMTP" if session.extended_smtp else "SMTP", session.host_name or "", peer)
        try:
            ids = await self.listener.submitter.submit(
                sender,
                list(envelope.rcpt_tos),
                envelope.original_content or b"",
                origin=origin,
                policy=LineEndingPolicy(cfg.bare_line_endings),
                mail_params=[o for o in envelope.mail_options if not o.upper().startswith("SIZE=")],
            )
        except BareLineEndingError as exc:
            return f"550 5.6.0 {exc}"
        except NoRouteError as exc:
            return f"550 5.1.2 {exc}"
        except MxError as exc:
            return f"550 5.1.2 {exc}" if exc.permanent else f"451 4.4.3 {exc}"
        except SpoolClosedError:
            return "421 4.3.2 Service shutting down, try again later"
        except StoreError as exc:
            log.error("could not spool a message", error=str(exc), peer=peer)
            if Store.is_disk_full(exc):
                return "452 4.3.1 Insufficient system storage, try again later"
            return "451 4.3.0 Could not write the message, try again later"
        except Exception:  # never a permanent 5xx for our own trouble
            log.exception("unexpected error taking a message", peer=peer)
            return "451 4.3.0 Local error, try again later"
        log.info("accepted", ids=ids, peer=peer, recipients=len(envelope.rcpt_tos))
        return f"250 2.0.0 OK queued as {' '.join(ids)}"


class SmtpListener:
    """Listens on ``config().listen`` and spools what it accepts."""

    def __init__(
        self, submitter: Submitter, settings: Callable[[], ListenerSettings | SmtpConfig]
    ) -> None:
        self.submitter = submitter
        self._settings = settings
        self.handler = _Handler(self)
        self.connections = 0

    def settings(self) -> ListenerSettings:
        value = self._settings()
        return value if isinstance(value, ListenerSettings) else ListenerSettings(value)

    def config(self) -> SmtpConfig:
        return self.settings().config

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        users = self.settings().users
        if isinstance(auth_data, LoginPassword):
            login = auth_data.login.decode("utf-8", "replace")
            expected = users.get(login)
            if expected is not None and hmac.compare_digest(
                expected.encode("utf-8"), auth_data.password
            ):
                log.info("authenticated", login=login, mechanism=mechanism)
                return AuthResult(success=True)
            log.warning("authentication failed", login=login, mechanism=mechanism)
        return AuthResult(success=False, handled=False)

    def _factory(self) -> asyncio.Protocol:
        settings = self.settings()
        cfg = settings.config
        return _Session(
            self,
            cfg.max_line_length + 2,  # with its CRLF
            self.handler,
            data_size_limit=cfg.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            ident="spoold",
            hostname=self.submitter.hostname,
            tls_context=settings.tls_context,
            require_starttls=False,  # checked at MAIL, with a clearer reply
            authenticator=self._authenticate if settings.users else None,
            auth_require_tls=settings.tls_context is not None,
        )

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until cancelled; reports started once every address listens."""
        loop = asyncio.get_running_loop()
        servers: list[asyncio.Server] = []
        try:
            for address in self.config().listen:
                host, _, port = address.rpartition(":")
                server = await loop.create_server(self._factory, host.strip("[]"), int(port))
                servers.append(server)
                log.info("smtp listening", address=address)
            task_status.started()
            await anyio.sleep_forever()
        finally:
            for server in servers:
                server.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                for server in servers:
                    await server.wait_closed()


class _Session(SMTPProtocol):
    """One SMTP session: refuses clients outside relay_networks (unless
    AUTH is on) and past max_connections before greeting them."""

    def __init__(
        self, listener: SmtpListener, line_length_limit: int, *args: Any, **kwargs: Any
    ) -> None:
        self._listener = listener
        self._counted = False
        self.line_length_limit = line_length_limit  # read by SMTP.__init__
        super().__init__(*args, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self._listener
        peer = transport.get_extra_info("peername")
        live = listener.settings()
        if not live.users and not _allowed(peer, live.config.relay_networks):
            _refuse(transport, b"554 5.7.1 Your address may not send mail here\r\n")
            return
        if listener.connections >= live.config.max_connections:
            _refuse(transport, b"421 4.7.0 Too many connections, try again later\r\n")
            return
        listener.connections += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._listener.connections -= 1
            self._counted = False
            super().connection_lost(exc)


def _allowed(peer: object, networks: tuple[str, ...]) -> bool:
    if not isinstance(peer, tuple) or not peer:
        return True  # not an IP peer (e.g. a test transport)
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in networks)


def _refuse(transport: asyncio.BaseTransport, reply: bytes) -> None:
    with contextlib.suppress(Exception):
        transport.write(reply)  # type: ignore[attr-defined]
    transport.close()
