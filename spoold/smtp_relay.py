"""Relay over SMTP to next hops, with a connection cache of our own.

:class:`SmtpRelay` implements :class:`spoold.relay.Relay` on
:class:`spoold.smtp_client.SmtpClient` (one client per connection), and
:class:`ConnectionCache` keeps connections per next hop (and per set of
route settings) for reuse across messages.

Before any connection, the sender and every recipient are checked with
:func:`spoold.address.validate_address` (SMTPUTF8 allowed): an invalid
recipient gets a permanent ``553 5.1.3`` result of its own and is not sent;
an invalid sender fails every recipient with ``553 5.1.7`` and no hop is
contacted. The others of the message go on: whatever is wrong with one
recipient becomes that recipient's result, never an exception.

An attempt tries ``next_hop_choices`` in order. A hop that cannot be reached
(connect, greeting, EHLO, STARTTLS or AUTH fails, or no free connection
within the give-up time) is skipped for the next; when every hop fails, the
attempt is :class:`~spoold.relay.AttemptFailed` with every hop's error. Once
a hop has greeted us, the attempt ends there:

* MAIL, every RCPT and DATA go in one write when the hop offers PIPELINING,
  one by one otherwise;
* a refusal at MAIL FROM or at DATA applies to every recipient sent;
* each RCPT reply is that recipient's result;
* recipients count as delivered only after a 2xx reply to the end of DATA;
* a 421 at MAIL, RCPT, DATA or the end of DATA ends the attempt on that
  hop: it is the result of every recipient that has no refusal of its own
  (so ``on_error`` sees it, and may answer rate-limited), and the
  connection is dropped;
* a disconnect, a protocol error or a timeout at any point before the
  final ``.`` is sent ends the attempt as try-later (:class:`AttemptFailed`)
  and the connection is dropped; the hop cannot have taken the message;
* once the final ``.`` is sent, the reply is waited for up to
  ``final_reply_timeout`` (10 minutes by default, as RFC 5321 §4.5.3.2.6
  says), beyond ``message_timeout``; a timeout or a lost connection then
  leaves every recipient the hop had accepted *in doubt* (a result with
  :attr:`~spoold.relay.RecipientResult.in_doubt`): the hop may have the
  message, so the spool handles them as after a crash, never as a plain
  try-later;
* a hop that greets us (or answers EHLO) with a throttling reply (421, or
  an enhanced status 4.7.x) is skipped like any unavailable hop, and named
  in :attr:`AttemptFailed.throttled_hops` when no hop could be used;
* a missing extension the message needs (8BITMIME, or SMTPUTF8 for a
  non-ASCII sender or an SMTPUTF8 submission) or a message over the hop's
  SIZE limit is a permanent refusal of every recipient (554 / 552) with a
  text saying why; a non-ASCII recipient of an otherwise ASCII message on a
  hop without SMTPUTF8 fails alone (553 5.6.7).

TLS per route: ``none``, ``opportunistic`` (STARTTLS when offered) or
``required`` (a hop without it is unavailable); credentials are never sent
without TLS. An SSL context is built once per kind of check, CA file and
client certificate (:class:`~spoold.connection_cache.TlsContexts`).

Cache rules: at most ``max_per_hop`` connections per hop and ``max_total``
overall; a released connection or a freed slot goes to the oldest waiter; an
idle connection is closed after ``idle_timeout``; a connection idle for more
than ``check_after`` seconds is checked with NOOP before reuse; a connection
that saw 421, a protocol error or a timeout is never reused; after a
transaction that did not complete, RSET is sent before reuse.
:meth:`ConnectionCache.close_and_flush` says QUIT to every idle connection at
shutdown.

The body is streamed from its file as it is on disk (already CRLF and
dot-stuffed) in chunks read in worker threads
(:meth:`spoold.relay.BodyHandle.open`); it is never held whole in memory,
and never rewritten. Its SIZE (without the stuffing dots) and whether it
needs 8BITMIME are found by one scan in chunks, off the event loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from spoold.address import validate_address
from spoold.connection_cache import Connection, ConnectionCache, RouteSettings
from spoold.errors import (
    AddressError,
    HopUnavailableError,
    SmtpError,
    SmtpReplyError,
    SmtpServiceClosingError,
    StoreError,
)
from spoold.hops import parse_hop
from spoold.log import get_logger
from spoold.message import Message
from spoold.policy import DestinationPolicy
from spoold.relay import (
    AttemptFailed,
    BodyHandle,
    BodyReader,
    Delivery,
    RecipientResult,
    RelayOutcome,
    ReplyPhase,
)
from spoold.smtp_client import SmtpClient, SmtpReply
from spoold.tls_policy import HopRefusal, TlsPolicies, TlsPolicyMode

__all__ = ["SmtpRelay"]

log = get_logger("spoold.relay")


def _result(reply: SmtpReply, phase: ReplyPhase = "rcpt") -> RecipientResult:
    return RecipientResult(reply.code, reply.text, reply.enhanced_status, phase=phase)


# ----------------------------------------------------------------- relay


def _throttling_refusal(cause: BaseException | None) -> bool:
    """Whether a hop was unavailable because it said to slow down (a
    ``421``, or an enhanced status ``4.7.x``, at the greeting or EHLO)."""
    if not isinstance(cause, SmtpReplyError):
        return False
    return RecipientResult(cause.code, cause.text, cause.enhanced_status).throttling


@functools.lru_cache(maxsize=64)  # one text per configured timeout, not one per message
def _timeout_text(message_timeout: float) -> str:
    return f"timeout: no answer within the message timeout of {message_timeout:g}s"


def _timed_out(hop: str, settings: RouteSettings) -> AttemptFailed:
    return AttemptFailed(f"{hop}: {_timeout_text(settings.message_timeout)}")


class _TryLater(Exception):
    """The attempt ends on this hop as try-later; the connection is dropped."""


@dataclass(frozen=True, slots=True)
class _Checked:
    """The recipients of an attempt after validation: those to send, and
    the results of those that will not be sent."""

    sendable: list[str]
    refused: dict[str, RecipientResult]


def _check_recipients(recipients: Sequence[str]) -> _Checked:
    sendable: list[str] = []
    refused: dict[str, RecipientResult] = {}
    for rcpt in dict.fromkeys(recipients):  # a recipient listed twice gets one RCPT
        try:
            validate_address(rcpt, role="recipient", smtputf8=True)
        except AddressError as exc:
            refused[rcpt] = RecipientResult(
                553, f"recipient cannot be relayed: {exc}", "5.1.3", phase="local"
            )
        else:
            sendable.append(rcpt)
    return _Checked(sendable, refused)


class SmtpRelay:
    """Relays messages over SMTP through a :class:`ConnectionCache`.

    The settings of each next hop (TLS, credentials, timeouts, EHLO name)
    are the attempt's destination policy's
    (:meth:`relay_with_policy`, which the spool calls: the daemon's policies
    follow its current routes, so a reload applies); for a hop the policy
    does not name, or an attempt without one (:meth:`relay`),
    ``settings_for(hop, message)`` gives them (one fixed
    :class:`RouteSettings` for every hop when given one; the defaults when
    given none).

    An attempt whose policy has a ``tls_policy`` other than ``none`` (an
    MX route's) is checked against ``tls_policies``
    (:class:`~spoold.tls_policy.TlsPolicies`) for the recipient domain and
    each MX host before the host is dialled: a host the policy refuses is
    skipped like an unavailable hop, with the policy's reason as its error
    (every hop refused: a try-later attempt that says why); a host it
    requires TLS of gets settings carrying the requirement. Without
    ``tls_policies`` the key is ignored (a library relay made without
    them).
    """

    def __init__(
        self,
        settings_for: Callable[[str, Message], RouteSettings] | RouteSettings | None = None,
        cache: ConnectionCache | None = None,
        tls_policies: TlsPolicies | None = None,
    ) -> None:
        if settings_for is None:
            settings_for = RouteSettings()
        if isinstance(settings_for, RouteSettings):
            fixed = settings_for
            self.settings_for: Callable[[str, Message], RouteSettings] = lambda _h, _m: fixed
        else:
            self.settings_for = settings_for
        self.cache = cache or ConnectionCache()
        self.tls_policies = tls_policies

    async def relay(
        self, message: Message, body: BodyHandle, recipients: Sequence[str]
    ) -> RelayOutcome:
        return await self._relay(message, body, recipients, self.settings_for)

    async def relay_with_policy(
        self,
        policy: DestinationPolicy,
        message: Message,
        body: BodyHandle,
        recipients: Sequence[str],
    ) -> RelayOutcome:
        """One attempt with the session settings of ``policy``
        (:class:`~spoold.policy.PolicyRelay`)."""
        tls = policy.tls_policy if self.tls_policies is not None else "none"
        if not policy.sessions and policy.reuse_connections:
            return await self._relay(message, body, recipients, self.settings_for, tls)
        fallback = self.settings_for

        def settings_for(hop: str, message: Message) -> RouteSettings:
            settings = policy.session_for(hop) or fallback(hop, message)
            # A connection counted fleet-wide lives one attempt.
            return settings if policy.reuse_connections else replace(settings, reuse=False)

        return await self._relay(message, body, recipients, settings_for, tls)

    async def _relay(
        self,
        message: Message,
        body: BodyHandle,
        recipients: Sequence[str],
        settings_for: Callable[[str, Message], RouteSettings],
        tls: TlsPolicyMode = "none",
    ) -> RelayOutcome:
        sender = message.envelope_info.sender
        try:
            validate_address(sender, role="sender", smtputf8=True)  # memoized there
        except AddressError as exc:
            bad_sender = RecipientResult(
                553, f"sender cannot be relayed: {exc}", "5.1.7", phase="local"
            )
            return Delivery(dict.fromkeys(recipients, bad_sender))
        checked = _check_recipients(recipients)
        if not checked.sendable:
            return Delivery(checked.refused)
        try:
            async with body.open() as content:
                outcome = await self._to_next_hops(
                    message, content, checked.sendable, settings_for, tls
                )
        except StoreError as exc:
            return AttemptFailed(str(exc))
        if isinstance(outcome, Delivery) and checked.refused:
            results = {**checked.refused, **outcome.recipients}
            return Delivery({r: results[r] for r in dict.fromkeys(recipients)}, outcome.hop)
        return outcome

    async def _to_next_hops(
        self,
        message: Message,
        content: BodyReader,
        recipients: list[str],
        settings_for: Callable[[str, Message], RouteSettings],
        tls: TlsPolicyMode = "none",
    ) -> RelayOutcome:
        """One attempt: the hops in turn until one takes the transaction.

        On each hop the message timeout runs from the acquire of a
        connection to the final ``.`` sent (the final reply has its own
        timeout). It bounds the transaction only: giving the connection
        back comes after it. So a transaction the hop refused before DATA
        (by its replies; the RSET after it is still inside) on a route
        that does not reuse connections (``RouteSettings.reuse`` false: a
        route's ``max_connections`` with ``[fleet]``) ends with a QUIT
        outside the message timeout, bounded by its own 5 s (at most
        ``command_timeout``), as after a delivery. A failed attempt
        (timeout, lost connection) drops the connection without QUIT.
        """
        loop = asyncio.get_running_loop()
        hop_errors: list[str] = []
        throttled: list[str] = []
        # An MX route's message has one recipient domain (one envelope each).
        domain = recipients[0].rpartition("@")[2] if recipients else ""
        # The domain's own policy lookups, once for all its hops (bounded).
        domain_policy = (
            await self.tls_policies.for_domain(tls, domain)
            if tls != "none" and self.tls_policies is not None
            else None
        )
        for hop in message.next_hop_choices:
            settings = settings_for(hop, message)
            host, port = parse_hop(hop)
            if domain_policy is not None:
                decision = await domain_policy.decide(host, port)
                if isinstance(decision, HopRefusal):
                    hop_errors.append(f"{hop}: {decision.reason}")
                    log.warning(
                        "next hop refused by the TLS policy",
                        id=message.id,
                        flows=message.flows,
                        hop=hop,
                        error=decision.reason,
                    )
                    continue
                if decision is not None:
                    settings = replace(settings, tls_policy=decision)
            # The message timeout: the acquire gives up at it, then one timer
            # on the client (lifted once the final "." is sent).
            deadline = loop.time() + settings.message_timeout
            try:
                conn = await self.cache.acquire(hop, settings, deadline)
            except HopUnavailableError as exc:
                hop_errors.append(str(exc))
                if _throttling_refusal(exc.__cause__):
                    throttled.append(hop)
                log.warning(
                    "next hop unavailable",
                    id=message.id,
                    flows=message.flows,
                    hop=hop,
                    error=str(exc),
                )
                continue
            except TimeoutError:
                return _timed_out(hop, settings)
            client = conn.client
            healthy = False
            try:
                if domain_policy is not None:
                    domain_policy.connected(host, conn.client.tls_active)
                client.set_deadline(deadline, _timeout_text(settings.message_timeout))
                try:
                    outcome: RelayOutcome = await self._transaction(
                        conn, hop, settings, message, content, recipients
                    )
                except _TryLater as exc:
                    outcome = AttemptFailed(f"{hop}: {exc}")
                client.set_deadline(None)
                if client.deadline_passed:
                    return _timed_out(hop, settings)
                healthy = isinstance(outcome, Delivery)
                return outcome
            finally:
                client.set_deadline(None)
                await self.cache.give_back(conn, healthy=healthy)
        return AttemptFailed("no hops available: " + "; ".join(hop_errors), tuple(throttled))

    async def _transaction(
        self,
        conn: Connection,
        hop: str,
        settings: RouteSettings,
        message: Message,
        content: BodyReader,
        recipients: list[str],
    ) -> Delivery:
        client = conn.client
        env = message.envelope_info
        params = {p.upper() for p in env.mail_params}
        facts = await content.facts()

        def everyone(code: int, enhanced: str, text: str) -> Delivery:
            refusal = RecipientResult(code, text, enhanced, phase="local")
            return Delivery(dict.fromkeys(recipients, refusal), hop)

        options: list[str] = []
        limit = client.size_limit
        if limit is not None:
            size = facts.content_size  # (counted only for a hop that offers SIZE)
            if 0 < limit < size:
                return everyone(
                    552, "5.3.4", f"message of {size} bytes exceeds {hop}'s limit of {limit}"
                )
            options.append(f"SIZE={size}")
        if facts.eight_bit or "BODY=8BITMIME" in params:
            if not client.supports("8BITMIME"):
                return everyone(
                    554, "5.6.3", f"{hop} does not offer 8BITMIME, which this message needs"
                )
            options.append("BODY=8BITMIME")
        hop_utf8 = client.supports("SMTPUTF8")
        message_needs_utf8 = "SMTPUTF8" in params or not env.sender.isascii()
        if message_needs_utf8 and not hop_utf8:
            return everyone(
                554, "5.6.7", f"{hop} does not offer SMTPUTF8, which this message needs"
            )
        results: dict[str, RecipientResult] = {}
        to_send = recipients
        if not hop_utf8:
            to_send = []
            for rcpt in recipients:
                if rcpt.isascii():
                    to_send.append(rcpt)
                else:
                    results[rcpt] = RecipientResult(
                        553,
                        f"{hop} does not offer SMTPUTF8, which this non-ASCII recipient needs",
                        "5.6.7",
                        phase="local",
                    )
        use_utf8 = hop_utf8 and (message_needs_utf8 or not all(r.isascii() for r in to_send))
        if use_utf8:
            options.append("SMTPUTF8")
        encoding = "utf-8" if use_utf8 else "ascii"
        sent: list[str] = []
        rcpt_lines: list[bytes] = []
        for rcpt in to_send:
            try:
                rcpt_lines.append(f"RCPT TO:<{rcpt}>\r\n".encode(encoding))
            except ValueError as exc:  # cannot happen after validation; never fail the others
                results[rcpt] = RecipientResult(
                    553, f"recipient cannot be relayed: {exc}", "5.1.3", phase="local"
                )
            else:
                sent.append(rcpt)
        if not sent:
            return Delivery(results, hop)
        mail_line = " ".join([f"MAIL FROM:<{env.sender}>", *options]) + "\r\n"
        try:
            replies = await client.send_envelope(mail_line.encode(encoding), rcpt_lines)
            if not replies.mail.positive:
                await self._reset(client, replies.data)
                results.update(dict.fromkeys(sent, _result(replies.mail, "mail")))
                return Delivery(results, hop)
            accepted: list[str] = []
            for rcpt, reply in zip(sent, replies.rcpts, strict=True):
                assert reply is not None  # MAIL was accepted: every RCPT was sent
                results[rcpt] = _result(reply)
                if reply.positive:
                    accepted.append(rcpt)
            data = replies.data
            if not accepted or data is None or data.code != 354:
                if accepted and data is not None:
                    results.update(dict.fromkeys(accepted, _result(data, "data")))
                await self._reset(client, data)
                return Delivery(results, hop)
            dot_sent = False
            wait = settings.final_reply_wait(content.size)

            def final_dot_sent() -> None:
                # The hop may have the message from now on: the message
                # timeout no longer applies (a cut now could not say "in
                # doubt"); the client's own timeouts bound what is left (the
                # drain of the last write, then the final reply's wait).
                nonlocal dot_sent
                dot_sent = True
                client.set_deadline(None)

            try:
                final = await client.send_content(
                    content.chunks(),
                    timeout=wait,
                    on_final_dot=final_dot_sent,
                )
            except SmtpError as exc:
                if not dot_sent or isinstance(exc, SmtpReplyError):
                    raise
                doubt = RecipientResult(
                    451,
                    f"in doubt: no reply to the end of the message ({exc}); "
                    "the next hop may have it",
                    "4.4.2",
                    in_doubt=True,
                    phase="data",
                )
                results.update(dict.fromkeys(accepted, doubt))
                log.warning(
                    "no reply to the end of the message: in doubt",
                    id=message.id,
                    flows=message.flows,
                    hop=hop,
                    error=str(exc),
                )
                return Delivery(results, hop)
            results.update(dict.fromkeys(accepted, _result(final, "data")))
            if final.positive:
                conn.transactions += 1
            else:
                await self._reset(client, None)
            return Delivery(results, hop)
        except SmtpServiceClosingError as exc:
            # The hop is closing on us (often: too much, too fast). Its 421
            # is the answer for everyone it had not refused already.
            closing = RecipientResult(exc.code, exc.text, exc.enhanced_status, phase="data")
            for rcpt in sent:
                if rcpt not in results or results[rcpt].accepted:
                    results[rcpt] = closing
            return Delivery(results, hop)
        except SmtpError as exc:
            raise _TryLater(str(exc)) from None

    @staticmethod
    async def _reset(client: SmtpClient, data: SmtpReply | None) -> None:
        """After an incomplete transaction: end a DATA the server accepted
        (with PIPELINING, DATA may get 354 although no recipient was
        accepted: RFC 2920 says to send the lone "."), then RSET. If that
        fails the client is closed (the cache then drops it); the replies
        already received still stand."""
        try:
            if data is not None and data.code == 354:
                await client.send_content(None, timeout=client.command_timeout)
            reply = await client.rset()
        except SmtpError:
            client.close()
            return
        if reply.code != 250:
            client.close()

    async def close_and_flush(self) -> None:
        await self.cache.close_and_flush()
