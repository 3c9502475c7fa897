"""spoold: an asyncio-native mail spool.

This package is the library: everything a program needs to spool mail
durably and relay it is importable from here (``from spoold import Spool,
SmtpRelay, RouteSettings, RoutedBatch, RoutedEnvelope, Body``), and so is
:class:`~spoold.client.Client`, the synchronous client of a running daemon.
Test doubles are in :mod:`spoold.testing`. The daemon, its CLI and its configuration
(``spoold run``) live in :mod:`spoold.daemon` and are not library API.

The layers, bottom up: :mod:`spoold.store` (durable files, no mail) →
:mod:`spoold.message` and :mod:`spoold.body` (the record and the wire form)
→ :mod:`spoold.ondisk` (mail on the store) → :mod:`spoold.spool` (index,
scheduler, operations, events) with its rules in :mod:`spoold.outcome` and
each destination's policy (:mod:`spoold.policy`: asked once per attempt) →
:mod:`spoold.smtp_relay` (over :mod:`spoold.connection_cache` and
:mod:`spoold.smtp_client`).

The names are loaded when first used (a module ``__getattr__``): ``import
spoold`` alone imports none of the library, so a program that needs one
part of it (the ``spoold`` command asking a daemon for its status) pays
for that part only; ``spoold.Spool`` and ``from spoold import Spool``
work as ever.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spoold.address import validate_address
    from spoold.body import Body, LineEndingPolicy
    from spoold.client import Client
    from spoold.clock import Clock, SystemClock
    from spoold.connection_cache import ConnectionCache, RouteSettings, TlsMode
    from spoold.errors import (
        AddressError,
        BareLineEndingError,
        ConfigError,
        ControlError,
        HopUnavailableError,
        IdempotencyKeyError,
        InsufficientStorageError,
        InvalidIdError,
        MxError,
        NoRouteError,
        NotFoundError,
        OperationRefusedError,
        RecipientSuppressedError,
        RecordError,
        SmtpConnectionError,
        SmtpError,
        SmtpProtocolError,
        SmtpReplyError,
        SmtpServiceClosingError,
        SmtpTimeoutError,
        SmtpTlsError,
        SpoolClosedError,
        SpooldError,
        SpoolFailedError,
        SpoolLockedError,
        StoreError,
        WaitTimeoutError,
    )
    from spoold.events import EventKind, SpoolEvent, Subscription
    from spoold.history import FinalOutcome, Outcome, RecipientReply, RecipientState
    from spoold.hooks import ErrorAction, OnErrorHook, PresendDecision, PresendHook
    from spoold.ids import new_id, validate_id
    from spoold.message import (
        Delivered,
        EnvelopeInfo,
        Frozen,
        Message,
        Quarantined,
        Queue,
        RelayAttempt,
        Removed,
        RetryInterval,
        RoutedBatch,
        RoutedEnvelope,
        SendAt,
        Sending,
        SendNow,
        Status,
    )
    from spoold.ondisk import Unreadable
    from spoold.outcome import (
        DeliveryPolicy,
        OnPermanentFailure,
        PlannedAttempt,
        PlannedEnd,
        PlannedRepeats,
        RetriesExhausted,
        RetryPlan,
    )
    from spoold.policy import DestinationPolicy, PolicySource
    from spoold.relay import (
        AttemptFailed,
        BodyHandle,
        Delivery,
        RecipientResult,
        Relay,
        RelayOutcome,
    )
    from spoold.settings import SpoolSettings, WriterSettings
    from spoold.smtp_relay import SmtpRelay
    from spoold.spool import (
        DEFAULT_MIN_FREE_SPACE,
        DEFAULT_RETRY_INTERVALS,
        AfterCrash,
        Routes,
        Spool,
    )
    from spoold.waiting import MessageOutcome, OutcomeKind
    from spoold.writer import SpoolWriter

__all__ = [
    # the spool
    "Spool",
    "SpoolWriter",
    "SpoolSettings",
    "WriterSettings",
    "Routes",
    "DEFAULT_RETRY_INTERVALS",
    "DEFAULT_MIN_FREE_SPACE",
    "MessageOutcome",
    "OutcomeKind",
    # delivery policy (issue 13)
    "DeliveryPolicy",
    "OnPermanentFailure",
    "RetriesExhausted",
    "AfterCrash",
    "RetryPlan",
    "PlannedAttempt",
    "PlannedEnd",
    "PlannedRepeats",
    # one destination's policy per attempt
    "DestinationPolicy",
    "PolicySource",
    # submissions and records
    "RoutedBatch",
    "RoutedEnvelope",
    "Body",
    "LineEndingPolicy",
    "Message",
    "EnvelopeInfo",
    "RetryInterval",
    "RelayAttempt",
    "Queue",
    "Status",
    "SendNow",
    "SendAt",
    "Sending",
    "Frozen",
    "Removed",
    "Quarantined",
    "Delivered",
    "Unreadable",
    "Outcome",
    "FinalOutcome",
    "RecipientReply",
    "RecipientState",
    "validate_address",
    "new_id",
    "validate_id",
    # a running daemon, from synchronous code
    "Client",
    # relaying
    "Relay",
    "RelayOutcome",
    "Delivery",
    "AttemptFailed",
    "RecipientResult",
    "BodyHandle",
    "SmtpRelay",
    "RouteSettings",
    "TlsMode",
    "ConnectionCache",
    # hooks, events, time
    "PresendHook",
    "PresendDecision",
    "OnErrorHook",
    "ErrorAction",
    "SpoolEvent",
    "EventKind",
    "Subscription",
    "Clock",
    "SystemClock",
    # errors
    "SpooldError",
    "AddressError",
    "BareLineEndingError",
    "ConfigError",
    "ControlError",
    "HopUnavailableError",
    "IdempotencyKeyError",
    "RecipientSuppressedError",
    "InsufficientStorageError",
    "InvalidIdError",
    "MxError",
    "NoRouteError",
    "NotFoundError",
    "OperationRefusedError",
    "RecordError",
    "SmtpError",
    "SmtpConnectionError",
    "SmtpProtocolError",
    "SmtpReplyError",
    "SmtpServiceClosingError",
    "SmtpTimeoutError",
    "SmtpTlsError",
    "SpoolClosedError",
    "SpoolFailedError",
    "SpoolLockedError",
    "StoreError",
    "WaitTimeoutError",
]

# Where each public name is defined (the imports above, for the type checker).
_MODULES: dict[str, tuple[str, ...]] = {
    "spoold.address": ("validate_address",),
    "spoold.body": (
        "Body",
        "LineEndingPolicy",
    ),
    "spoold.client": ("Client",),
    "spoold.clock": (
        "Clock",
        "SystemClock",
    ),
    "spoold.connection_cache": (
        "ConnectionCache",
        "RouteSettings",
        "TlsMode",
    ),
    "spoold.errors": (
        "AddressError",
        "BareLineEndingError",
        "ConfigError",
        "ControlError",
        "HopUnavailableError",
        "IdempotencyKeyError",
        "InsufficientStorageError",
        "InvalidIdError",
        "MxError",
        "NoRouteError",
        "NotFoundError",
        "OperationRefusedError",
        "RecipientSuppressedError",
        "RecordError",
        "SmtpConnectionError",
        "SmtpError",
        "SmtpProtocolError",
        "SmtpReplyError",
        "SmtpServiceClosingError",
        "SmtpTimeoutError",
        "SmtpTlsError",
        "SpoolClosedError",
        "SpooldError",
        "SpoolFailedError",
        "SpoolLockedError",
        "StoreError",
        "WaitTimeoutError",
    ),
    "spoold.events": (
        "EventKind",
        "SpoolEvent",
        "Subscription",
    ),
    "spoold.history": (
        "FinalOutcome",
        "Outcome",
        "RecipientReply",
        "RecipientState",
    ),
    "spoold.hooks": (
        "ErrorAction",
        "OnErrorHook",
        "PresendDecision",
        "PresendHook",
    ),
    "spoold.ids": (
        "new_id",
        "validate_id",
    ),
    "spoold.message": (
        "Delivered",
        "EnvelopeInfo",
        "Frozen",
        "Message",
        "Quarantined",
        "Queue",
        "RelayAttempt",
        "Removed",
        "RetryInterval",
        "RoutedBatch",
        "RoutedEnvelope",
        "SendAt",
        "Sending",
        "SendNow",
        "Status",
    ),
    "spoold.ondisk": ("Unreadable",),
    "spoold.outcome": (
        "DeliveryPolicy",
        "OnPermanentFailure",
        "PlannedAttempt",
        "PlannedEnd",
        "PlannedRepeats",
        "RetriesExhausted",
        "RetryPlan",
    ),
    "spoold.policy": (
        "DestinationPolicy",
        "PolicySource",
    ),
    "spoold.relay": (
        "AttemptFailed",
        "BodyHandle",
        "Delivery",
        "RecipientResult",
        "Relay",
        "RelayOutcome",
    ),
    "spoold.settings": (
        "SpoolSettings",
        "WriterSettings",
    ),
    "spoold.smtp_relay": ("SmtpRelay",),
    "spoold.spool": (
        "DEFAULT_MIN_FREE_SPACE",
        "DEFAULT_RETRY_INTERVALS",
        "AfterCrash",
        "Routes",
        "Spool",
    ),
    "spoold.waiting": (
        "MessageOutcome",
        "OutcomeKind",
    ),
    "spoold.writer": ("SpoolWriter",),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}


# The type checker sees only the imports above: a module ``__getattr__``
# would tell it that every name exists (a misspelt one too).
if not TYPE_CHECKING:
    # One lazy load at a time: the library's modules import each other (in
    # cycles), and two threads importing two of them at once can make CPython's
    # import locks raise _DeadlockError out of a plain ``spoold.Client``.
    # Re-entrant, in case a module imported under it asks for a public name.
    # Only the names of ``_HOME`` take it (a submodule's name does not).
    _LOADING = threading.RLock()

    def __getattr__(name: str) -> object:
        """A public name, imported from its module the first time it is used
        (then kept here, so the next use is a plain attribute)."""
        module = _HOME.get(name)
        if module is None:
            # ``import spoold`` then ``spoold.errors.X``: a submodule, which
            # the package used to import whole at once.
            if name.isidentifier() and importlib.util.find_spec(f"{__name__}.{name}"):
                with _LOADING:
                    return importlib.import_module(f"{__name__}.{name}")
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        with _LOADING:
            value = getattr(importlib.import_module(module), name)
            globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
