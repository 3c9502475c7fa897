"""The package's layers: the library never imports the daemon, and no import runs in a circle.

Read from the source (every ``import`` and ``from ... import`` in every module, at any depth,
except those only for the type checker), so a function-level import that hides a circle from
the interpreter is still seen here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "spoold"


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str], package_dir: Path = PACKAGE) -> set[str]:
    """The package's modules that ``path`` imports at run time: each module
    named, a package whose names are taken (``from spoold import Spool``
    runs ``spoold/__init__.py``), and the packages above a module imported
    (their ``__init__`` runs first), but not the packages ``path`` is in
    (they are running already)."""
    name = _module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    parts = name.split(".")
    own_packages = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join([*base, child.module] if child.module else base)
                else:
                    target = child.module or ""
                for alias in child.names:
                    submodule = f"{target}.{alias.name}"
                    found.add(submodule if submodule in modules else target)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    with_parents = set(found)
    for module in found:
        pieces = module.split(".")
        with_parents.update(".".join(pieces[:i]) for i in range(1, len(pieces)))
    return {m for m in with_parents if m in modules and m not in own_packages}


def _graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


# The library's layers, bottom up (docs/design.md, "The layers"): a module
# may import its own row and those before it, never one after. Within a row
# the cycle check below keeps the order. A new module takes its place here.
LIBRARY_ROWS: list[list[str]] = [
    # plain values
    [
        "errors",
        "numerals",
        "shared_counter",
        "kinds",
        "times",
        "ids",
        "address",
        "hops",
        "hostname",
        "log",
        "timers",
        "clock",
        "credentials",
        "tasks",
    ],
    # the store
    [
        "store",
        "store.store",
        "store.directory",
        "store.pool",
        "store.commit",
        "store.sharing",
        "store.hops",
        "store.batching",
        "store.registry",
        "store.wakeup",
        "store.recovery",
        "store.records",
    ],
    # the record
    ["body", "message"],
    # mail on disk, and the values around a message
    ["ondisk", "relay", "events", "history", "waiting", "idempotency", "limits", "listing"],
    ["suppression"],  # the suppression list (issue 22): plain values and one file
    ["fleet"],  # the state a fleet of nodes shares in Redis (issue 23)
    # issue 23: fleet-wide idempotency keys and the suppression list's mirror
    ["fleet_keys", "fleet_suppression"],
    ["fleet_slots"],  # a node's fleet-wide connection slots (issue 23)
    # rules
    [
        "hooks",
        "outcome",
        "dsn",
        "policy",
        "settings",
        "smtp_client",
        "connection_cache",
        "smtp_relay",
        # issue 22: outbound TLS policy of MX routes
        "mta_sts",
        "dane",
        "tls_policy",
        # issue 22: DKIM signing (the keys, then the signer)
        "dkim_keys",
        "dkim",
    ],
    # the spool's shared state, then its rooms
    ["state"],
    ["scheduler", "submission", "housekeeping"],
    ["loading", "queries", "transitions"],
    ["operations"],
    # the facade
    ["spool", "writer"],
    # for users of the library
    [
        "client",
        "protocol",
        "protocol.operations",
        "protocol.framing",
        "protocol.views",
        "testing",
        "",
    ],
]


def _row_of() -> dict[str, int]:
    return {
        "spoold" + (f".{name}" if name else ""): row
        for row, names in enumerate(LIBRARY_ROWS)
        for name in names
    }


def test_every_library_module_has_a_layer() -> None:
    rows = _row_of()
    outside = [m for m in _graph() if not m.startswith("spoold.daemon") and m != "spoold.__main__"]
    assert sorted(m for m in outside if m not in rows) == []


def test_no_library_module_imports_a_layer_above_its_own() -> None:
    rows = _row_of()
    upward = {
        (module, target)
        for module, deps in _graph().items()
        if module in rows
        for target in deps
        if target in rows and rows[target] > rows[module]
    }
    assert upward == set()


def test_the_library_never_imports_the_daemon() -> None:
    upward = {
        (module, target)
        for module, deps in _graph().items()
        # ``python -m spoold`` is the command line's entry point: above everything.
        if not module.startswith("spoold.daemon") and module != "spoold.__main__"
        for target in deps
        if target.startswith("spoold.daemon")
    }
    assert upward == set()


def test_no_import_runs_in_a_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    circles: list[list[str]] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state and module != "spoold":
            walk(module)
    assert circles == []


def test_the_check_sees_imports_at_any_depth(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import typing\n"
        "if typing.TYPE_CHECKING:\n    from spoold import spool\n"
        "def f():\n    from spoold.daemon import main\n",
        encoding="utf-8",
    )
    modules = {"spoold.spool", "spoold.daemon.main", "spoold.daemon"}
    found = _imports(source, modules, package_dir=tmp_path)
    assert found == {"spoold.daemon", "spoold.daemon.main"}


def test_the_readme_names_every_module() -> None:
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Layout")
    end = readme.find("\n## ", start + 1)
    layout = readme[start : end if end >= 0 else len(readme)]
    paths = sorted(p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*.py"))
    assert [p for p in paths if f"`{p}`" not in layout] == []


def test_taking_a_packages_names_runs_the_package(tmp_path: Path) -> None:
    """``from spoold import Spool`` runs ``spoold/__init__.py`` (which
    imports nearly everything): a library module doing so would be in a
    circle with it; ``from spoold import spool`` is the module itself."""
    source = tmp_path / "m.py"
    source.write_text("from spoold import Spool\nfrom spoold.store import records\n")
    modules = {"spoold", "spoold.spool", "spoold.store", "spoold.store.records"}
    found = _imports(source, modules, package_dir=tmp_path)
    assert found == {"spoold", "spoold.store", "spoold.store.records"}
