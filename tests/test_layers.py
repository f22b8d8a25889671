"""The package layers (README "Layout"): lake/ knows nothing above it, query/ nothing of the API or
front ends. Every module's imports are parsed (ast), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "nirslake"

# What each layer must not import (as nirslake.<name>, by absolute or relative import).
FORBIDDEN = {
    "lake": {"query", "api", "store", "cli", "spark", "integrations"},
    "query": {"api", "store", "cli", "integrations"},
    # integrations/ sit above the store (they may import api, store, lake); nothing of nirslake
    # itself depends on them, and they use no front end.
    "integrations": {"cli", "web"},
}
for _layer in ("api", "cli", "web", "store.py", "predictions.py", "protocol.py", "plots.py", "spark.py", "__init__.py"):
    FORBIDDEN.setdefault(_layer, set()).add("integrations")


def imported_modules(path: Path) -> set[str]:
    """The nirslake modules ``path`` imports, as dotted names below ``nirslake`` (``lake.tables``, ``store``)."""
    package = path.relative_to(SRC).with_suffix("").parts[:-1]
    if path.name == "__init__.py":
        package = path.relative_to(SRC).parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("nirslake.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "nirslake":
                parts = node.module.split(".")[1:]
            else:
                continue
            if node.module is None or not parts:  # from . import x, y: each name may be a module
                found |= {".".join([*parts, a.name]) for a in node.names}
            else:
                found.add(".".join(parts))
                found |= {".".join([*parts, a.name]) for a in node.names}
    return found


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(SRC)) for p in MODULES])
def test_no_layer_imports_one_above_it(path):
    layer = path.relative_to(SRC).parts[0]
    banned = FORBIDDEN.get(layer, set())
    wrong = sorted(m for m in imported_modules(path) if m.split(".")[0] in banned)
    assert not wrong, f"{path.relative_to(SRC)} (layer {layer}/) imports {wrong}"


def test_the_integrations_layer_is_checked():
    """integrations/ import the store; no other layer imports them (else this could not fail)."""
    assert "store" in imported_modules(SRC / "integrations" / "nirs4all.py")
    assert all("integrations" in banned for layer, banned in FORBIDDEN.items() if layer != "integrations")


def test_the_check_sees_imports():
    """The parser finds relative, absolute and lazy imports (else the test above could not fail)."""
    assert {"lake.tables", "api.validation", "query.catalog"} <= imported_modules(SRC / "store.py")
    assert "store" in imported_modules(SRC / "api" / "sync.py")  # a lazy import inside a function
    assert "lake.rules" in imported_modules(SRC / "query" / "spark.py")


def test_the_readme_layout_names_every_module():
    """README's "Layout" section lists each module of the tree, in its package, and nothing else."""
    readme = (SRC.parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed, folder = set(), None
    for line in block.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith("src/nirslake/"):
            folder = name if name.endswith("/") else None
            if name.endswith(".py"):
                listed.add(name.removeprefix("src/nirslake/"))
        elif line.startswith("  ") and name.endswith(".py") and folder:
            listed.add(folder.removeprefix("src/nirslake/") + name)
    assert listed == {str(p.relative_to(SRC)) for p in MODULES}
