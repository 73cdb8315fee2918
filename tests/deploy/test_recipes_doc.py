"""deploy/recipes/README.md and deploy/mesh.example.yaml agree with the catalog."""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest
import yaml

from mesh.catalog import Catalog
from mesh.config import Settings, load_settings

from .conftest import DEPLOY

README = DEPLOY / "recipes" / "README.md"
EXAMPLE = DEPLOY / "mesh.example.yaml"


def _code_blocks() -> list[list[str]]:
    """Every ```sh block of the README as argv lists (exports dropped, continuations joined)."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    out: list[list[str]] = []
    for block in blocks:
        lines = [ln for ln in block.splitlines() if not ln.startswith("export ")]
        out.append(shlex.split(" ".join(lines).replace("\\ ", " ")))
    return out


def test_every_catalog_model_has_a_section(catalog: Catalog) -> None:
    text = README.read_text()
    for entry in catalog.models:
        assert f"\n## {entry.id}\n" in text, entry.id


def test_every_recipe_command_is_in_the_readme_word_for_word(catalog: Catalog) -> None:
    blocks = _code_blocks()
    for entry in catalog.models:
        for recipe in entry.recipes:
            assert recipe.argv in blocks, f"{entry.id} {recipe.engine}: command missing or different in README"


def test_every_recipe_source_and_uncertainty_is_in_the_readme(catalog: Catalog) -> None:
    text = " ".join(README.read_text().split())
    for entry in catalog.models:
        for recipe in entry.recipes:
            for url in recipe.sources:
                assert url in text, f"{entry.id}: source {url} not cited"
            if recipe.uncertain:
                assert recipe.uncertainty is not None
                assert " ".join(recipe.uncertainty.split()) in text, f"{entry.id}: uncertainty not written down"
        if entry.uncertain:
            assert entry.uncertainty is not None
            assert " ".join(entry.uncertainty.split()) in text


def test_readme_summary_table_matches(catalog: Catalog) -> None:
    rows = [ln for ln in README.read_text().splitlines() if ln.startswith("| `")]
    for entry in catalog.models:
        for recipe in entry.recipes:
            cells = f"| `{entry.id}` | {recipe.engine} | {recipe.gpus} | `{recipe.weights}` |"
            assert any(r.startswith(cells) for r in rows), cells


def _example() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return data


def test_example_config_loads(tmp_path: Any) -> None:
    data = _example()
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(data))
    settings = load_settings(path, environ={})
    assert settings.database.startswith("postgresql+asyncpg://")
    assert settings.redis is not None
    assert settings.admin_key is None  # secrets come from the EnvironmentFile, not the file
    # ... and the environment does override them.
    env = {"MESH_ADMIN_KEY": "k" * 32, "MESH_DATABASE": "postgresql+asyncpg://u:p@db/mesh"}
    overridden = load_settings(path, environ=env)
    assert overridden.admin_key == "k" * 32 and overridden.database == env["MESH_DATABASE"]


def test_example_models_agree_with_the_catalog(catalog: Catalog) -> None:
    settings = Settings.model_validate(_example())
    assert settings.models
    for model in settings.models:
        entry = catalog[model.id]
        expected = entry.to_model_config(model.engines)
        for field in ("family", "license", "context_length", "reasoning", "tools", "pricing"):
            assert getattr(model, field) == getattr(expected, field), f"{model.id}.{field}"


def test_example_worker_tokens_cover_the_worker_unit() -> None:
    data = _example()
    from .conftest import SYSTEMD, unit_values

    (exec_start,) = unit_values(SYSTEMD / "mesh-worker.service", "ExecStart")
    words = shlex.split(exec_start)
    model = words[words.index("--model") + 1]
    assert any(model in t["models"] for t in data["workers"]["tokens"])
    assert model in {m["id"] for m in data["models"]}
    for t in data["workers"]["tokens"]:
        assert "token" not in t, "keep only token_sha256 in the example"
        assert re.fullmatch(r"[0-9a-f]{64}", t["token_sha256"])


@pytest.mark.parametrize("field", ["admin_key", "database"])
def test_example_has_no_real_secrets(field: str) -> None:
    data = _example()
    value = data.get(field)
    assert value is None or ":" not in value.split("@")[0].split("//")[-1], f"{field} carries a password"
