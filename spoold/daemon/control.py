"""The daemon's side of the control protocol, by its old name.

The protocol itself is declared in :mod:`spoold.protocol` (``docs/control-
protocol.md`` for users); the daemon's side lives in modules named for
their concern:

* :mod:`spoold.daemon.control_server`: :class:`ControlServer`, one socket's
  server (framing, limits, ``submit``, ``wait``, ``events``, paged
  ``status``, the submission socket's rules);
* :mod:`spoold.daemon.control_handlers`: each operation bound to what the
  spool or the daemon does for it, and the error kind of each exception;
* :mod:`spoold.daemon.control_socket`: the socket file (mode, group, a
  stale one replaced) and the peer's credentials;
* :mod:`spoold.daemon.control_client`: :class:`ControlClient`, the asyncio
  client the ``spoold`` commands use.

This module only names them again, for the code that imports them from here.
"""

from __future__ import annotations

from spoold.daemon.control_client import ControlClient
from spoold.daemon.control_handlers import OPERATIONS, DaemonOperations
from spoold.daemon.control_server import (
    MAX_CLIENTS,
    MAX_REQUEST,
    REQUEST_TIMEOUT,
    SUBMISSION_CONTENT_BUDGET,
    ControlServer,
)
from spoold.daemon.control_socket import PeerCredentials, peer_credentials
from spoold.protocol import (
    PROTOCOL_VERSION,
    SUBMISSION_OPERATIONS,
    departed_view,
    describe_view,
    history_view,
    message_view,
    outcome_view,
    retry_plan_view,
    unreadable_view,
)

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_REQUEST",
    "REQUEST_TIMEOUT",
    "MAX_CLIENTS",
    "SUBMISSION_CONTENT_BUDGET",
    "ControlServer",
    "DaemonOperations",
    "OPERATIONS",
    "SUBMISSION_OPERATIONS",
    "PeerCredentials",
    "peer_credentials",
    "ControlClient",
    "message_view",
    "unreadable_view",
    "describe_view",
    "retry_plan_view",
    "outcome_view",
    "history_view",
    "departed_view",
]
