"""The library's public surface: one import, nothing of the daemon."""

from __future__ import annotations

import subprocess
import sys

import spoold
import spoold.testing


def test_every_public_name_is_exported_and_importable() -> None:
    assert len(spoold.__all__) == len(set(spoold.__all__))
    for name in spoold.__all__:
        assert getattr(spoold, name) is not None, name
    for name in spoold.testing.__all__:
        assert getattr(spoold.testing, name) is not None, name


def test_the_names_a_library_user_needs_are_at_the_top() -> None:
    from spoold.body import Body
    from spoold.connection_cache import RouteSettings
    from spoold.errors import SpooldError
    from spoold.message import RoutedBatch, RoutedEnvelope
    from spoold.smtp_relay import SmtpRelay
    from spoold.spool import Spool

    needed = [Body, RoutedBatch, RoutedEnvelope, RouteSettings, SmtpRelay, Spool, SpooldError]
    for value in needed:  # the very objects, exported by their own names
        assert value.__name__ in spoold.__all__, value.__name__
        assert getattr(spoold, value.__name__) is value


def test_importing_the_library_loads_nothing_of_the_daemon() -> None:
    code = (
        "import sys, spoold, spoold.testing\n"
        "daemon = sorted(m for m in sys.modules if m.startswith('spoold.daemon'))\n"
        "tools = sorted(m for m in ('click', 'prometheus_client', 'dns') if m in sys.modules)\n"
        "print(daemon, tools)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=True, text=True
    )
    assert done.stdout.strip() == "[] []"


def test_every_error_is_a_spoold_error() -> None:
    for name in spoold.__all__:
        value = getattr(spoold, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, spoold.SpooldError), name
