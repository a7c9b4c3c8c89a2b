"""The import rules of docs/architecture.md, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "src" / "gluon_optim"

# module -> the package modules it may import (docs/architecture.md, "Layers").
_MATH = {"polar", "lowrank", "blocks", "norms", "settings", "storage"}
_TABLES = _MATH | {"estimators", "radius"}
ALLOWED: dict[str, set[str]] = {
    "polar": set(),
    "lowrank": set(),
    "settings": set(),
    "storage": set(),
    "blocks": {"settings"},
    "norms": {"polar", "blocks"},
    "estimators": {"lowrank", "settings"},
    "radius": {"norms", "settings"},
    "groups": _TABLES,
    "two_point": {"estimators"},
    "directions": {"norms"},
    "distributed.tensors": set(),
    "distributed.plan": {"norms"},
    "distributed.wire": {"directions", "distributed.tensors"},
    "distributed.replicated": {
        "directions",
        "norms",
        "distributed.plan",
        "distributed.tensors",
        "distributed.wire",
    },
    "distributed.sharded": {
        "blocks",
        "directions",
        "distributed.replicated",
        "distributed.tensors",
        "distributed.wire",
    },
    "distributed.layouts": {
        "blocks",
        "directions",
        "norms",
        "distributed.plan",
        "distributed.replicated",
        "distributed.sharded",
        "distributed.tensors",
    },
    "loading": {"distributed", "estimators", "groups"},
    "optimizer": _TABLES | {"groups", "two_point", "directions", "distributed", "loading"},
    "roles": {"blocks"},
    "presets": {"blocks", "estimators", "groups", "norms", "optimizer", "roles"},
    "integrations.hf": {"presets", "integrations", "optimizer"},
    "integrations.lightning": {"integrations", "optimizer"},
    "smoothness.fit": set(),
    "smoothness.io": {"smoothness.fit"},
    "smoothness.probe": {"norms", "optimizer", "distributed"},
    "smoothness.displacement": {"optimizer", "smoothness.probe"},
    "smoothness.radii": {"optimizer", "smoothness.fit", "smoothness.probe"},
}


def _imports(path: Path) -> set[str]:
    """The ``gluon_optim`` modules imported by ``path``, without the package prefix."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "gluon_optim":
                out |= {alias.name for alias in node.names}
            elif node.module.startswith("gluon_optim."):
                out.add(node.module.removeprefix("gluon_optim."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gluon_optim."):
                    out.add(alias.name.removeprefix("gluon_optim."))
    return out


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def test_every_core_module_has_a_rule() -> None:
    core = {
        _module(p)
        for p in PACKAGE.rglob("*.py")
        if "lab" not in p.relative_to(PACKAGE).parts and p.name != "__init__.py"
    }
    assert core == set(ALLOWED)


def test_core_modules_import_only_what_their_layer_allows() -> None:
    for name, allowed in ALLOWED.items():
        path = PACKAGE.joinpath(*name.split(".")).with_suffix(".py")
        extra = _imports(path) - allowed
        assert not extra, f"gluon_optim.{name} imports {sorted(extra)}, not allowed by its layer"


def test_nothing_outside_the_lab_imports_the_lab() -> None:
    for path in PACKAGE.rglob("*.py"):
        if "lab" in path.relative_to(PACKAGE).parts:
            continue
        assert not any(m == "lab" or m.startswith("lab.") for m in _imports(path)), path


def _lab_graph() -> dict[str, set[str]]:
    """The lab's modules and the lab modules each imports, lazy (in-function) imports included."""
    modules = {_module(p).removesuffix(".__init__") for p in (PACKAGE / "lab").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in (PACKAGE / "lab").rglob("*.py"):
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module.removeprefix("gluon_optim.")
                # `from gluon_optim.lab import bench` names a module, not a symbol
                named = {f"{base}.{alias.name}" for alias in node.names}
                edges |= {m for m in named if m in modules} or ({base} & modules)
            elif isinstance(node, ast.Import):
                edges |= {a.name.removeprefix("gluon_optim.") for a in node.names} & modules
        name = _module(path).removesuffix(".__init__")
        graph[name] = edges - {name}
    return graph


def test_the_lab_has_no_import_cycle() -> None:
    # A cycle (cli and bench.command once imported each other) makes the import order decide
    # what works; the shared option parsing lives in lab.options instead.
    graph = _lab_graph()
    assert "lab.options" in graph["lab.bench.command"]
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, "import cycle: " + " -> ".join([*path[path.index(node) :], node])
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
