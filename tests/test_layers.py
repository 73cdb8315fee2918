"""The import rules that keep the layers apart (docs/architecture.md, "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "mesh"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name == "mesh" or name.startswith("mesh.")}


def modules(folder: str) -> list[Path]:
    return sorted((SRC / folder).glob("*.py"))


@pytest.mark.parametrize("path", modules("protocols"), ids=lambda p: p.name)
def test_protocols_never_import_engines_routing_or_storage(path: Path) -> None:
    bad = {m for m in imports_of(path) if m.startswith(("mesh.engines", "mesh.routing", "mesh.store", "mesh.billing"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("engines"), ids=lambda p: p.name)
def test_engines_never_import_protocols_or_routing(path: Path) -> None:
    bad = {m for m in imports_of(path) if m.startswith(("mesh.protocols", "mesh.routing", "mesh.api"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_canonical_imports_nothing_of_mesh() -> None:
    assert imports_of(SRC / "canonical.py") == set()


@pytest.mark.parametrize("path", modules("routing"), ids=lambda p: p.name)
def test_routing_sees_engines_only_through_their_interface(path: Path) -> None:
    bad = {m for m in imports_of(path) if m.startswith(("mesh.protocols", "mesh.api", "mesh.billing"))}
    bad |= {m for m in imports_of(path) if m.startswith("mesh.engines") and m != "mesh.engines.base"}
    assert not bad, f"{path.name} imports {sorted(bad)}"
