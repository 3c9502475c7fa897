"""The library's public surface: one import, nothing of the daemon."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import spoold
import spoold.testing


def _fresh_python(code: str) -> str:
    """What ``code`` prints in a new interpreter (nothing of spoold loaded yet)."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=True, text=True
    )
    return done.stdout


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
    assert _fresh_python(code).strip() == "[] []"


def test_every_error_is_a_spoold_error() -> None:
    for name in spoold.__all__:
        value = getattr(spoold, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, spoold.SpooldError), name


def test_importing_the_package_loads_its_names_only_when_used() -> None:
    code = (
        "import sys, spoold\n"
        "print(sorted(m for m in sys.modules if m.startswith('spoold')))\n"
        "spoold.Spool\n"
        "print('spoold.spool' in sys.modules, 'Spool' in vars(spoold))\n"
    )
    assert _fresh_python(code).split("\n")[:2] == ["['spoold']", "True True"]


def test_a_submodule_is_reached_from_the_package_as_before() -> None:
    # The package once imported its modules whole: ``import spoold`` then
    # ``spoold.errors.StoreError`` keeps working; a name that is neither a
    # public name nor a submodule is still an AttributeError.
    code = (
        "import spoold\n"
        "print(spoold.errors.StoreError.__name__, spoold.message.Queue.ACTIVE.value)\n"
        "try:\n"
        "    spoold.no_such_thing\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    assert _fresh_python(code).splitlines() == [
        "StoreError active",
        "module 'spoold' has no attribute 'no_such_thing'",
    ]


def test_the_type_checkers_imports_are_the_names_loaded() -> None:
    """``spoold/__init__.py`` names each public name twice: imported for
    the type checker, and in the table its ``__getattr__`` loads from."""
    tree = ast.parse(Path(spoold.__file__).read_text(encoding="utf-8"))
    (block,) = [
        n
        for n in tree.body
        if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"
    ]
    typed = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == spoold._HOME
    assert sorted(typed) == sorted(spoold.__all__)


_OVERLAP_PROBE = """
import importlib.machinery, sys, threading
import spoold

inside: set[int] = set()
guard = threading.Lock()
met = threading.Event()
overlap = []
first: set[int] = set()


class Probe:
    # The first module each thread imports runs its code through this:
    # it waits a moment there for another thread to be running one too.
    def find_spec(self, name, path=None, target=None):
        me = threading.get_ident()
        if not name.startswith("spoold.") or me in first:
            return None
        first.add(me)
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        run = spec.loader.exec_module

        def exec_module(module):
            with guard:
                inside.add(me)
                if len(inside) > 1:
                    overlap.append(name)
                    met.set()
            met.wait(0.5)
            with guard:
                inside.discard(me)
            run(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Probe())
barrier = threading.Barrier(2)


def use(name):
    barrier.wait()
    getattr(spoold, name)


threads = [threading.Thread(target=use, args=(n,)) for n in ("Client", "SpoolWriter")]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(overlap)
"""


def test_threads_first_using_names_at_once_import_one_at_a_time() -> None:
    """The library's modules import each other in cycles: two threads
    importing two of them at once can make CPython's import locks raise
    ``_DeadlockError`` out of a plain ``spoold.Client``. The lazy loads are
    one at a time (no two threads are ever importing under them at once)."""
    assert _fresh_python(_OVERLAP_PROBE).strip() == "[]"


def test_the_type_checker_sees_no_module_getattr() -> None:
    """A module ``__getattr__`` tells a type checker (mypy, an IDE) that
    every name exists: ``from spoold import Spoool`` would pass unnoticed.
    It is defined only when not type checking, where the checker sees the
    explicit imports alone."""
    tree = ast.parse(Path(spoold.__file__).read_text(encoding="utf-8"))
    seen = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert not seen & {"__getattr__", "__dir__"}
    (hidden,) = [
        n
        for n in tree.body
        if isinstance(n, ast.If)
        and isinstance(n.test, ast.UnaryOp)
        and isinstance(n.test.op, ast.Not)
        and isinstance(n.test.operand, ast.Name)
        and n.test.operand.id == "TYPE_CHECKING"
    ]
    defined = {n.name for n in hidden.body if isinstance(n, ast.FunctionDef)}
    assert defined == {"__getattr__", "__dir__"}
    assert spoold.__dir__() == dir(spoold)
