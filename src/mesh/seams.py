"""What the request path (``pipeline.py``) needs of the parts behind it, as protocols:
authentication (``accounts/auth.py``), the credit ledger (``billing/leases.py``; its
in-process fake is ``tests/fakes.py``'s ``FakeLedger``) and the usage guard
(``workers/sync.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from mesh.accounts.principal import Principal
from mesh.billing.attribution import Attribution
from mesh.billing.ledger import Admission
from mesh.canonical import CanonicalRequest, Usage
from mesh.config import Pricing


class Authenticator(Protocol):
    async def authenticate(self, raw_key: str | None) -> Principal: ...


class Ledger(Protocol):
    """Credit for requests (``mesh.billing.leases.LeasedLedger``): hold before dispatch,
    re-hold when a dearer fallback serves, checkpoint long streams, settle once."""

    async def admit(
        self,
        principal: Principal,
        pricing: Pricing,
        request_id: str,
        prompt_tokens_estimate: int,
        max_output_tokens: int,
        *,
        choices: int = 1,
        end_user: str | None = None,
    ) -> Admission: ...

    async def rehold(self, admission: Admission, pricing: Pricing) -> Admission: ...

    def checkpoint(self, admission: Admission, usage: Usage) -> None: ...

    async def settle(
        self,
        admission: Admission,
        usage: Usage | None,
        *,
        status: str,
        model: str,
        pricing: Pricing,
        replica: str | None = None,
        protocol: str | None = None,
        ttft_ms: int | None = None,
        duration_ms: int | None = None,
        attribution: Attribution | None = None,
        finish_reason: str | None = None,
    ) -> int: ...


# (model, replica name, request as sent, prompt estimate, reported usage, context length,
# whether the answer was resumed on another replica). Judges the usage an engine reported;
# returns what to bill (clamped when it cannot be true).
UsageGuard = Callable[[str, str | None, CanonicalRequest, int, Usage, int | None, bool], Usage]
