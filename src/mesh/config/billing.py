"""Billing settings (``billing:``): holds and leases, usage retention, spend alerts and the
settlement webhook stream."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from mesh.config.base import Frozen as _Frozen


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
