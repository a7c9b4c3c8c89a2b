"""The import rules of docs/architecture.md, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "src" / "gluon_optim"

# module -> the package modules it may import (docs/architecture.md, "Layers").
_MATH = {"polar", "lowrank", "norms", "settings"}
_TABLES = _MATH | {"estimators", "radius"}
ALLOWED: dict[str, set[str]] = {
    "polar": set(),
    "lowrank": set(),
    "settings": set(),
    "norms": {"polar"},
    "estimators": {"lowrank", "settings"},
    "radius": {"norms", "settings"},
    "groups": _TABLES,
    "two_point": {"estimators"},
    "directions": {"norms"},
    "distributed": {"directions", "norms"},
    "optimizer": _TABLES | {"groups", "two_point", "directions", "distributed"},
    "roles": set(),
    "presets": {"estimators", "groups", "norms", "optimizer", "roles"},
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
