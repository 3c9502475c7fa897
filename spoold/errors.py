"""The errors of spoold.

Every error raised on purpose is a :class:`SpooldError`. A caller branches on
the few subclasses below; ``str(error)`` is written for an operator and names
the message id or path concerned. Subclasses mix in the builtin they refine,
so ``except ValueError`` still catches a bad id.
"""

from __future__ import annotations

import errno
from typing import Literal

__all__ = [
    "SpooldError",
    "InvalidIdError",
    "SpoolLockedError",
    "StoreError",
    "InsufficientStorageError",
    "NotFoundError",
    "RecordError",
    "BodyDamagedError",
    "BareLineEndingError",
    "OperationRefusedError",
    "SpoolClosedError",
    "SpoolFailedError",
    "WaitTimeoutError",
    "AddressError",
    "AddressProblem",
    "HopUnavailableError",
    "SmtpError",
    "SmtpConnectionError",
    "SmtpTimeoutError",
    "SmtpProtocolError",
    "SmtpTlsError",
    "SmtpReplyError",
    "SmtpServiceClosingError",
    "NoRouteError",
    "MxError",
    "ConfigError",
    "ControlError",
    "ControlErrorKind",
    "IdempotencyKeyError",
    "TlsPolicyError",
    "DkimKeyError",
    "RecipientSuppressedError",
]


class SpooldError(Exception):
    """Root of every error spoold raises on purpose."""


class InvalidIdError(SpooldError, ValueError):
    """A string that is not a message id was given where an id is needed."""


class SpoolLockedError(SpooldError):
    """Another process owns the spool (holds its lock)."""

    def __init__(self, spool_dir: str, holder_pid: int | None) -> None:
        self.spool_dir = spool_dir
        self.holder_pid = holder_pid
        holder = f"pid {holder_pid}" if holder_pid is not None else "another process"
        super().__init__(f"spool {spool_dir} is already owned by {holder}")


class StoreError(SpooldError, OSError):
    """A filesystem operation of the spool store failed. Temporary by
    nature: the caller may try again later (SMTP answers 4xx)."""

    @property
    def disk_full(self) -> bool:
        """The disk (or the quota, or the spool's free-space floor) is full."""
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


class InsufficientStorageError(StoreError):
    """Free space in the spool is below its floor (``spool.min_free_space``):
    new messages are refused before the disk is actually full, so the
    messages already queued can still be updated and delivered."""


class NotFoundError(SpooldError, KeyError):
    """No message with that id in the queue(s) looked at."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text
        return str(self.args[0]) if self.args else "not found"


class RecordError(SpooldError, ValueError):
    """A metadata record cannot be read: corrupt, or of an unknown version."""


class BodyDamagedError(SpooldError, ValueError):
    """A message's body file is not what was spooled: its size or SHA-256
    differs from the record's. Never sent on (a relay stops before the end
    of DATA); the spool sets the message aside in quarantine with this
    text as the reason."""


class BareLineEndingError(SpooldError, ValueError):
    """Submitted content holds a bare CR or LF and the policy is to refuse it."""


class OperationRefusedError(SpooldError):
    """An operator operation is not allowed for the message's current status."""


class SpoolClosedError(SpooldError):
    """The spool is closed, or closing, and takes no new work."""


class SpoolFailedError(SpooldError):
    """One of the tasks a spool (or a spool writer) runs for itself failed,
    so it stopped. Raised on leaving its ``async with`` block; the failure
    is the ``__cause__`` (one exception, or an ExceptionGroup when several
    failed at once). An exception raised in the block itself is never
    wrapped in this: it comes out as it was raised."""


class WaitTimeoutError(SpooldError, TimeoutError):
    """:meth:`spoold.Spool.wait` gave up: the message reached no outcome
    within the time allowed (it is still in the queue)."""

    def __init__(self, message_id: str, timeout: float) -> None:
        self.message_id = message_id
        self.timeout = timeout
        super().__init__(f"{message_id}: no outcome within {timeout:g} s; still in the queue")


AddressProblem = Literal["syntax", "null", "control", "non_ascii", "too_long"]


class AddressError(SpooldError, ValueError):
    """An address that may not be used where it was given. ``kind`` says
    what is wrong (SMTP answers each with its own code); ``address`` is the
    address as given."""

    def __init__(self, message: str, address: str, *, kind: AddressProblem = "syntax") -> None:
        self.address = address
        self.kind: AddressProblem = kind
        super().__init__(message)


class HopUnavailableError(SpooldError):
    """A next hop could not be used for a relay attempt (the relay tries the
    next one). ``str(error)`` starts with the hop."""


class SmtpError(SpooldError):
    """The SMTP client's dialogue with a server cannot go on. The client
    that raised it is closed. ``str(error)`` says what happened, without the
    server's name (the relay prefixes the hop)."""


class SmtpConnectionError(SmtpError, ConnectionError):
    """The connection could not be made, or was lost (reset, closed by the
    server) before the reply the client was waiting for."""


class SmtpTimeoutError(SmtpError, TimeoutError):
    """No connection, reply or write progress within the time allowed."""


class SmtpProtocolError(SmtpError):
    """The server broke the protocol: a malformed or overlong reply, a reply
    code that makes no sense for the command, or data sent ahead of a TLS
    handshake."""


class SmtpTlsError(SmtpError):
    """STARTTLS was accepted but the TLS handshake failed (e.g. the
    certificate could not be verified)."""


class SmtpReplyError(SmtpError):
    """A reply refusing something the session needs (the greeting, EHLO and
    HELO, STARTTLS, AUTH). ``str(error)`` is the reply on one line, starting
    with its code."""

    def __init__(self, code: int, text: str, enhanced_status: str | None = None) -> None:
        self.code = code
        self.text = text
        self.enhanced_status = enhanced_status
        words = [str(code), *([enhanced_status] if enhanced_status else []), *text.split()]
        super().__init__(" ".join(words))


class SmtpServiceClosingError(SmtpReplyError):
    """The server answered 421: it is closing the connection. Whatever was
    under way is to be tried again later, on a new connection."""


class NoRouteError(SpooldError, ValueError):
    """No route takes this recipient (and there is no default route)."""


class MxError(SpooldError):
    """An MX lookup failed. ``permanent``: the domain does not exist or
    takes no mail (SMTP answers 5xx); otherwise DNS failed for now (4xx)."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        self.permanent = permanent
        super().__init__(message)


class ConfigError(SpooldError, ValueError):
    """The configuration is not valid; ``problems`` lists every finding,
    each naming its key."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))


ControlErrorKind = Literal[
    "invalid",  # a bad request, id or address
    "not_found",  # no such message
    "refused",  # not allowed for the message's status
    "closed",  # the daemon is stopping
    "temporary",  # try again later: a disk error, a DNS timeout, a full disk
    "busy",  # too many control clients at once
    "internal",  # a bug: the daemon's log says more
    "unavailable",  # (client side) no daemon answers on the socket
    "timeout",  # ``wait``: the message had no outcome within the time given
    "denied",  # not for this client: an admin operation on the submission socket,
    #            or (client side) a socket whose permissions keep this user out
    "suppressed",  # submit: a recipient is on the suppression list; nothing spooled
]


class ControlError(SpooldError):
    """An error reply from the daemon over its control socket, or no daemon
    to talk to; ``kind`` says which (the CLI's exit code follows it)."""

    def __init__(self, message: str, kind: ControlErrorKind = "internal") -> None:
        self.kind: ControlErrorKind = kind
        super().__init__(message)


class IdempotencyKeyError(SpooldError, ValueError):
    """An idempotency key that cannot be used (empty, too long, or holding
    control characters)."""


class TlsPolicyError(SpooldError, ValueError):
    """An MTA-STS record or policy, or a DANE TLSA answer, that cannot be
    used (malformed, wrong version, a field missing), or a fetch of one
    that failed; ``str()`` says which and why."""


class DkimKeyError(SpooldError, ValueError):
    """A DKIM signing key that cannot be used: its file cannot be read,
    holds no private key, a key of another type than the algorithm says, or
    an RSA key under 1024 bits. ``str(error)`` names the file."""


class RecipientSuppressedError(SpooldError, ValueError):
    """A submission named recipients on the suppression list (and
    ``suppressed_recipients`` is ``"refuse"``): nothing was spooled.
    ``recipients`` maps each such recipient (as given) to a line saying
    until when and why (``suppressed until 2027-01-05T10:00:00Z (550 5.1.1
    no such user)``); from :class:`spoold.Client` (the daemon's error
    reply of kind ``suppressed``) only the text names them, ``recipients``
    is empty. Lift it with ``spoold suppress remove``."""

    def __init__(self, recipients: dict[str, str], text: str | None = None) -> None:
        self.recipients = dict(recipients)
        if text is None:
            listed = "; ".join(f"{rcpt}: {why}" for rcpt, why in self.recipients.items())
            text = f"recipient suppressed, nothing spooled: {listed}"
        super().__init__(text)
