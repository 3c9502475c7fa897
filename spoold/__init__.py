"""spoold: an asyncio-native mail spool daemon.

The public Python API is re-exported here; see the modules for contracts.
"""

from spoold.body import Body, LineEndingPolicy
from spoold.errors import (
    BareLineEndingError,
    InvalidIdError,
    NotFoundError,
    OperationRefusedError,
    RecordError,
    SpoolClosedError,
    SpooldError,
    SpoolLockedError,
    StoreError,
)
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
    SendAt,
    Sending,
    SendNow,
    Status,
)

__all__ = [
    "Body",
    "LineEndingPolicy",
    "BareLineEndingError",
    "InvalidIdError",
    "NotFoundError",
    "OperationRefusedError",
    "RecordError",
    "SpoolClosedError",
    "SpooldError",
    "SpoolLockedError",
    "StoreError",
    "Delivered",
    "EnvelopeInfo",
    "Frozen",
    "Message",
    "Quarantined",
    "Queue",
    "RelayAttempt",
    "Removed",
    "RetryInterval",
    "SendAt",
    "Sending",
    "SendNow",
    "Status",
]
