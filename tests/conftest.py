"""Fixtures shared by several test modules are registered here once, so a
test module only names them as parameters."""

import pytest

pytest.register_assert_rewrite(
    "tests.smtp_server", "tests.raw_smtp_server", "tests.relay_helpers", "tests.daemon_helpers"
)

from tests.daemon_helpers import start_daemon  # noqa: E402
from tests.raw_smtp_server import start_raw_server  # noqa: E402
from tests.relay_helpers import make_relay  # noqa: E402
from tests.smtp_server import smtp_server, start_smtp_server, tls_certificate  # noqa: E402

__all__ = [
    "make_relay",
    "smtp_server",
    "start_daemon",
    "start_raw_server",
    "start_smtp_server",
    "tls_certificate",
]
