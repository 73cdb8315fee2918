"""Shared helpers for the deploy/ checks: paths, YAML documents, the `mesh` CLI's flags."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from mesh.catalog import Catalog, load_catalog

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    out: list[tuple[Path, dict[str, Any]]] = []
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def docs_of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in k8s_docs() if d.get("kind") == kind]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def tool(name: str) -> str | None:
    """An executable from the project's venv (pip-installed linters) or PATH."""
    local = Path(sys.executable).parent / name
    if local.exists() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in a systemd unit, in order.

    systemd allows repeated keys and backslash continuations, which configparser does not.
    """
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not an assignment: {line!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(path: Path, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_entries(path) if s == section and k == key]


def unit_environment(path: Path) -> dict[str, str]:
    """The Environment= assignments (systemd quoting rules, enough for our units)."""
    env: dict[str, str] = {}
    for value in unit_values(path, "Environment"):
        for word in shlex.split(value):
            k, _, v = word.partition("=")
            env[k] = v
    return env


def mesh_command() -> Any:
    """The `mesh` command group as Typer builds it (Typer may vendor its own Click)."""
    from mesh.cli import app

    cmd = typer.main.get_command(app)
    assert hasattr(cmd, "commands") and hasattr(cmd, "resolve_command")
    return cmd


def parse_mesh_invocation(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse `mesh …` argv with the real CLI's option definitions (nothing runs).

    Returns (subcommand, its params plus "__root__": the group's options). Fails on
    options the CLI does not have.
    """
    group = mesh_command()
    root_opts = {o: p for p in group.params for o in (*p.opts, *p.secondary_opts)}
    root: dict[str, Any] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        flag, eq, value = argv[i].partition("=")
        assert flag in root_opts, f"`mesh` has no option {flag}"
        param = root_opts[flag]
        if getattr(param, "is_flag", False):
            root[param.name] = True
        else:
            if not eq:
                i += 1
                value = argv[i]
            root[param.name] = value
        i += 1
    assert i < len(argv), "no subcommand"
    name = argv[i]
    sub = group.commands.get(name)
    assert sub is not None, f"`mesh` has no subcommand {name}"
    ctx = sub.make_context(name, list(argv[i + 1 :]), resilient_parsing=False)
    return name, dict(ctx.params) | {"__root__": root}


def subcommand_flags(name: str) -> set[str] | None:
    """Every option string of `mesh <name>`, or None when that subcommand does not exist (yet)."""
    sub = mesh_command().commands.get(name)
    if sub is None:
        return None
    return {opt for p in sub.params for opt in (*p.opts, *p.secondary_opts)}


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture
def stub_binary(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mesh"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    yield path
