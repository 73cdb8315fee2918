"""Who is calling: the result of authenticating an API key."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from mesh.billing.money import MicroCredits
from mesh.limits.policy import Scope


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated API key and its account.

    ``allowed_models`` is ``None`` when the key may use every model. ``spend_limit`` (in
    micro-credits, ``None`` for no limit) is informational here: admission enforces it
    against the key's row, not this possibly cached copy. ``limits`` are the effective rate
    limits of the key and of its account (overrides, else the configured defaults), only
    the scopes that have any; empty when the principal is unlimited.
    """

    account_id: str
    key_id: str
    allowed_models: frozenset[str] | None = None
    expires_at: datetime | None = None
    spend_limit: MicroCredits | None = None
    limits: tuple[Scope, ...] = ()
    # Informational like spend_limit: whether admission counts end users (the row decides how much).
    user_budget: MicroCredits | None = None

    def may_use(self, model: str) -> bool:
        """Whether this key may call ``model``."""
        return self.allowed_models is None or model in self.allowed_models
