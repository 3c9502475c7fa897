"""Fixtures shared by several test modules are registered here once, so a
test module only names them as parameters:

* ``smtp_server``, ``start_smtp_server``, ``tls_certificate`` -- aiosmtpd
  next hops in the test's loop (:mod:`tests.smtp_server`);
* ``start_raw_server`` -- a bare scripted SMTP server (:mod:`tests.raw_smtp_server`);
* ``start_smtp_sink`` -- Postfix's smtp-sink as a subprocess (:mod:`tests.smtp_sink`);
* ``make_relay`` -- relays whose connections are closed at teardown
  (:mod:`tests.relay_helpers`);
* ``start_daemon`` -- ``spoold run`` as a subprocess (:mod:`tests.daemon_helpers`).

Plain helpers (a free port, waiting for a condition, a spool's files) are in
:mod:`tests.support`.
"""

import pytest

pytest.register_assert_rewrite(
    "tests.smtp_server",
    "tests.raw_smtp_server",
    "tests.smtp_sink",
    "tests.relay_helpers",
    "tests.daemon_helpers",
    "tests.ingest_helpers",
    "tests.spool_helpers",
    "tests.support",
)

from tests.daemon_helpers import start_daemon  # noqa: E402
from tests.raw_smtp_server import start_raw_server  # noqa: E402
from tests.relay_helpers import make_relay  # noqa: E402
from tests.smtp_server import smtp_server, start_smtp_server, tls_certificate  # noqa: E402
from tests.smtp_sink import start_smtp_sink  # noqa: E402

__all__ = [
    "make_relay",
    "smtp_server",
    "start_daemon",
    "start_raw_server",
    "start_smtp_server",
    "start_smtp_sink",
    "tls_certificate",
]
