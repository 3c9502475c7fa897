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

Two more things are decided here for the whole suite:

* **The ``daemon`` marker.** A test that starts a process (``spoold run``,
  the ``spoold`` CLI, Postfix's tools, a child Python) is marked ``daemon``,
  so ``pytest -m "not daemon"`` (``make test-fast``) is the quick inner loop.
  The mark is put on automatically where it can be seen: a test whose code,
  or the code of a fixture it uses, reaches a process start (through the
  helpers of this package: :func:`tests.daemon_helpers.cli`,
  :class:`~tests.daemon_helpers.DaemonProcess`, ``subprocess``,
  ``anyio.run_process``, ...). What that reading cannot see is marked by
  hand (``pytestmark`` or ``@pytest.mark.daemon``), and a test that starts a
  process without the mark fails, saying so: the fast loop stays fast. (What
  a session-scoped fixture starts, once per run, does not count.)
* **Outside make's venv.** ``pytest`` run from a developer's own venv that
  lacks a test dependency (aiosmtpd, hypothesis, Django) or a dependency of
  spoold skips what needs it, with the reason, instead of failing to
  collect; so do the tests that need this checkout's ``.venv`` (marker
  ``make_venv``) or spoold installed in the running Python (marker
  ``installed``: its version comes from the package's metadata).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import inspect
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

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

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------- outside make's venv

MAKE_VENV = "needs `make test`'s venv: pip install -e '.[dev]'"

# What `pip install -e '.[dev]'` brings that the tests import, by import
# name. (mfusepy and uvloop are not here: the tests that use them look for
# them and skip on their own.)
_NEEDED = (
    # spoold's own dependencies
    "anyio",
    "structlog",
    "msgspec",
    "click",
    "rich",
    "prometheus_client",
    "dns",
    # the "dev" extra
    "aiosmtpd",
    "hypothesis",
    "django",
)


class _SkipWhatIsMissing(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: asked only for a module no other finder
    found. For a dependency that make's venv would have, it skips the test
    module (or the test) that imports it, with the reason."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        top = fullname.partition(".")[0]
        # Only the package itself: an installed package may look for
        # optional submodules of its own (dnspython does, for record types).
        if top in _NEEDED and fullname == top:
            pytest.skip(f"{_importer()}{MAKE_VENV} ({top} is missing)", allow_module_level=True)
        return None


def _importer() -> str:
    """The test module being imported (the outermost on the stack), for the
    skip reason: ``tests/test_x.py: ``, or nothing."""
    found = ""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("tests.test_"):
            found = name.replace(".", "/") + ".py: "
        frame = frame.f_back
    return found


sys.meta_path.append(_SkipWhatIsMissing())

try:
    from tests.daemon_helpers import start_daemon
    from tests.raw_smtp_server import start_raw_server
    from tests.redis_server import redis_server
    from tests.relay_helpers import make_relay
    from tests.smtp_sink import start_smtp_sink
except pytest.skip.Exception as missing:  # a dependency of spoold itself: nothing can run
    _spoold_unusable: str | None = str(missing.msg)
else:
    _spoold_unusable = None

try:
    from tests.smtp_server import smtp_server, start_smtp_server, tls_certificate
except pytest.skip.Exception as missing:
    _why = str(missing.msg)

    # The same names, skipping each test that asks for one.
    @pytest.fixture
    def smtp_server() -> None:
        pytest.skip(_why)

    @pytest.fixture
    def start_smtp_server() -> None:
        pytest.skip(_why)

    @pytest.fixture(scope="session")
    def tls_certificate() -> None:
        pytest.skip(_why)


__all__ = [
    "make_relay",
    "redis_server",
    "smtp_server",
    "start_daemon",
    "start_raw_server",
    "start_smtp_server",
    "start_smtp_sink",
    "tls_certificate",
]


def _installed() -> bool:
    try:
        importlib.metadata.distribution("spoold")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.hookimpl(tryfirst=True)  # before the fixtures are set up
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _spoold_unusable is not None:
        pytest.skip(_spoold_unusable)
    if item.get_closest_marker("make_venv") and not (REPO / ".venv" / ".installed").exists():
        pytest.skip(f"{MAKE_VENV}: this test uses {REPO / '.venv'} (`make test` makes it)")
    if item.get_closest_marker("installed") and not _installed():
        pytest.skip(f"{MAKE_VENV}: this test needs spoold installed in this Python")


# -------------------------------------------------------- the daemon marker

# What starts a process, seen in the names a function's code uses: a module
# of the standard library ...
_SPAWNING_MODULES = ("subprocess", "multiprocessing", "pty")
# ... or an attribute by that name (``asyncio.create_subprocess_exec``,
# ``anyio.run_process``, ``os.fork``).
_SPAWNING_ATTRIBUTES = frozenset(
    {
        "run_process",
        "open_process",
        "create_subprocess_exec",
        "create_subprocess_shell",
        "fork",
        "forkpty",
        "posix_spawn",
        "posix_spawnp",
        "execv",
        "execve",
        "execvp",
    }
)


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """A code object and those nested in it (inner functions, lambdas)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _functions_of(obj: object) -> Iterator[Callable[..., Any]]:
    """The functions behind a test-package object: itself, or a class's methods."""
    if inspect.isclass(obj):
        for member in vars(obj).values():
            if isinstance(member, staticmethod | classmethod):
                member = member.__func__
            elif isinstance(member, property):
                yield from (f for f in (member.fget, member.fset) if f is not None)
                continue
            if inspect.isfunction(member):
                yield member
    elif inspect.isfunction(obj):
        yield obj


def _starts_processes(func: Callable[..., Any], seen: dict[object, bool]) -> bool:
    """Whether ``func``, or a function or class of this test package that it
    names (followed through the helper modules), starts a process."""
    func = inspect.unwrap(func)
    if func in seen:
        return seen[func]
    seen[func] = False  # a cycle adds nothing
    code = getattr(func, "__code__", None)
    if code is None:
        return False
    namespace = getattr(func, "__globals__", {})
    found = False
    for inner in _codes(code):
        for name in inner.co_names:
            if name in _SPAWNING_ATTRIBUTES:
                found = True
                break
            value = namespace.get(name)
            kind = type(value)  # not isinstance(): a lazy proxy (Django's settings) would load
            if issubclass(kind, types.ModuleType):
                if value.__name__.partition(".")[0] in _SPAWNING_MODULES:
                    found = True
                    break
            elif (
                (kind is types.FunctionType or issubclass(kind, type))
                and (value.__module__ or "").startswith("tests.")
                and any(_starts_processes(f, seen) for f in _functions_of(value))
            ):
                found = True
                break
        if found:
            break
    seen[func] = found
    return found


def _is_daemon_test(item: pytest.Item, seen: dict[object, bool]) -> bool:
    if not isinstance(item, pytest.Function):
        return False
    if _starts_processes(item.function, seen):
        return True
    for name in item.fixturenames:
        for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
            if fixturedef.scope == "session":
                continue  # started once for the whole run (an openssl certificate)
            func = inspect.unwrap(fixturedef.func)
            if (func.__module__ or "").startswith("tests.") and _starts_processes(func, seen):
                return True
    return False


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    seen: dict[object, bool] = {}
    for item in items:
        if item.get_closest_marker("daemon") is None and _is_daemon_test(item, seen):
            item.add_marker(pytest.mark.daemon)


# The process starts that the audit hook below notices (see the `sys`
# module's audit events table).
_SPAWN_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.exec",
        "os.spawn",
        "os.system",
    }
)
_started: list[str] = []  # what the running test (or its fixtures) started
_reported = 0  # how many of those were checked already
_watching = False


def _notice_spawn(event: str, args: tuple[Any, ...]) -> None:
    if _watching and event in _SPAWN_EVENTS:
        what = args[1] if event == "subprocess.Popen" else args[:1]
        _started.append(f"{event} {what!r}")


sys.addaudithook(_notice_spawn)


def _unmarked_spawns(item: pytest.Item) -> None:
    global _reported
    new, _reported = _started[_reported:], len(_started)
    if new and item.get_closest_marker("daemon") is None:
        started = "; ".join(dict.fromkeys(new))
        pytest.fail(
            f"this test starts a process ({started}) but is not marked `daemon`: mark it "
            "(@pytest.mark.daemon, or pytestmark) so `pytest -m 'not daemon'` stays fast",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    global _watching, _reported
    _started.clear()
    _reported = 0
    _watching = True
    try:
        return (yield)
    finally:
        _watching = False


class _OncePerRun:
    """What a session-scoped fixture starts is paid once per run: it does not
    make the test that happens to set it up a daemon test. (A plugin of its
    own: a session fixture is set up through the session's hooks, which do
    not include this conftest's.)"""

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[Any]) -> Iterator[Any]:
        global _watching
        if fixturedef.scope != "session":
            return (yield)
        was, _watching = _watching, False
        try:
            return (yield)
        finally:
            _watching = was


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_OncePerRun(), "spoold-tests-once-per-run")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    result = yield
    _unmarked_spawns(item)  # what the fixtures and the test started
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    result = yield
    _unmarked_spawns(item)  # what the teardown started
    return result
