"""Fixtures shared by several test modules are registered here once, so a
test module only names them as parameters."""

import pytest

pytest.register_assert_rewrite("tests.smtp_server", "tests.daemon_helpers")

from tests.daemon_helpers import start_daemon  # noqa: E402
from tests.smtp_server import smtp_server, start_smtp_server, tls_certificate  # noqa: E402

__all__ = ["smtp_server", "start_daemon", "start_smtp_server", "tls_certificate"]
