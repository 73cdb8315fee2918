"""``mesh keys create --rpm/--tpm/--concurrent``, ``mesh accounts limits`` and ``mesh keys limits``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mesh.cli import app

CLEAN_ENV: dict[str, str | None] = {"MESH_CONFIG": None, "MESH_DATABASE": None, "MESH_REDIS": None}


@pytest.fixture
def config(database_url: str, tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({"database": database_url, "limits": {"account": {"rpm": 600}}}))
    return path


def mesh(config: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, ["--config", str(config), *args], env=CLEAN_ENV)
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def mesh_json(config: Path, *args: str) -> Any:
    return json.loads(mesh(config, *args, "--json"))


def test_limits_from_the_cli(config: Path) -> None:
    acct = mesh_json(config, "accounts", "create", "Acme")["id"]
    key = mesh_json(config, "keys", "create", acct, "--rpm", "5", "--tpm", "1000", "--concurrent", "2")
    assert key["rate_limits"] == {"rpm": 5, "tpm": 1000, "concurrent": 2}

    shown = mesh_json(config, "accounts", "limits", acct)
    assert shown["rate_limits"] == {"rpm": None, "tpm": None, "concurrent": None}
    assert shown["effective_rate_limits"] == {"rpm": 600, "tpm": None, "concurrent": None}
    changed = mesh_json(config, "accounts", "limits", acct, "--rpm", "0", "--concurrent", "8")
    assert changed["rate_limits"] == {"rpm": 0, "tpm": None, "concurrent": 8}
    assert changed["effective_rate_limits"] == {"rpm": None, "tpm": None, "concurrent": 8}
    back = mesh_json(config, "accounts", "limits", acct, "--rpm", "default")
    assert back["effective_rate_limits"]["rpm"] == 600
    assert mesh_json(config, "accounts", "limits", acct, "--clear")["rate_limits"]["concurrent"] is None

    updated = mesh_json(config, "keys", "limits", key["id"], "--tpm", "default")
    assert updated["rate_limits"] == {"rpm": 5, "tpm": None, "concurrent": 2}
    text = mesh(config, "keys", "limits", key["id"])
    assert "rpm  5  (override)" in text and "tpm  none  (default)" in text

    assert "whole number" in mesh(config, "accounts", "limits", acct, "--rpm", "-3", code=2)
    assert "not found" in mesh(config, "keys", "limits", "key_nope", "--rpm", "1", code=1)
