"""Console settings (``console:``): sign-in and sign-up, payments and credit packs,
automatic top-ups, mail and single sign-on."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from mesh.config.base import Frozen as _Frozen


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
