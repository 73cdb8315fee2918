"""JSON views of accounts, keys, ledger rows and usage: the admin API's and the CLI's
``--json`` output. Money is always a string with 6 decimals; times are ISO 8601 UTC."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from mesh.billing.money import format_credits
from mesh.limits.policy import FIELDS

if TYPE_CHECKING:  # annotations only: the CLI (``mesh serve`` too) imports this without the store
    from mesh.accounts.service import Account, ApiKeyInfo
    from mesh.billing.entries import LedgerEntry
    from mesh.billing.usage import DailyUsage, UsageRecord


def iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat()


def money(micro: int | None) -> str | None:
    return None if micro is None else format_credits(micro)


def balance_json(balance: int, held: int) -> dict[str, str]:
    return {
        "balance": format_credits(balance),
        "held": format_credits(held),
        "available": format_credits(balance - held),
    }


def limits_json(overrides: dict[str, int] | None) -> dict[str, int | None]:
    """Rate-limit overrides: a number (0: no limit) or null for "the configured default"."""
    given = overrides or {}
    return {name: given.get(name) for name in FIELDS}


def account_json(a: Account) -> dict[str, Any]:
    return {
        "id": a.id,
        "object": "account",
        "name": a.name,
        **balance_json(a.balance, a.held),
        "rate_limits": limits_json(a.rate_limits),
        "created_at": iso(a.created_at),
    }


def key_json(k: ApiKeyInfo) -> dict[str, Any]:
    return {
        "id": k.id,
        "object": "api_key",
        "account_id": k.account_id,
        "name": k.name,
        "prefix": k.prefix,
        "allowed_models": None if k.allowed_models is None else list(k.allowed_models),
        "expires_at": iso(k.expires_at),
        "spend_limit": money(k.spend_limit),
        "spent": format_credits(k.spent),
        "held": format_credits(k.held),
        "budget_period": k.budget_period,
        "budget_reset_day": k.budget_reset_day,
        "budget_resets_at": iso(k.budget_resets_at),
        "budget_remaining": money(k.remaining),
        "user_budget": money(k.user_budget),
        "revoked": k.revoked_at is not None,
        "revoked_at": iso(k.revoked_at),
        "last_used_at": iso(k.last_used_at),
        "rate_limits": limits_json(k.rate_limits),
        "created_at": iso(k.created_at),
    }


def entry_json(e: LedgerEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "object": "ledger_entry",
        "account_id": e.account_id,
        "kind": e.kind,
        "amount": format_credits(e.amount),
        "balance_after": format_credits(e.balance_after),
        "idempotency_key": e.idempotency_key,
        "request_id": e.request_id,
        "key_id": e.key_id,
        "memo": e.memo,
        "created_at": iso(e.created_at),
    }


def daily_json(d: DailyUsage, *, with_account: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"account_id": d.account_id} if with_account else {}
    out.update(
        day=d.day.isoformat(),
        model=d.model,
        requests=d.requests,
        input_tokens=d.input_tokens,
        cached_tokens=d.cached_tokens,
        output_tokens=d.output_tokens,
        reasoning_tokens=d.reasoning_tokens,
        cost=format_credits(d.cost),
    )
    return out


def record_json(r: UsageRecord) -> dict[str, Any]:
    return {
        "request_id": r.request_id,
        "key_id": r.key_id,
        "model": r.model,
        "replica": r.replica,
        "protocol": r.protocol,
        "status": r.status,
        "input_tokens": r.input_tokens,
        "cached_tokens": r.cached_tokens,
        "output_tokens": r.output_tokens,
        "reasoning_tokens": r.reasoning_tokens,
        "cost": format_credits(r.cost),
        "ttft_ms": r.ttft_ms,
        "duration_ms": r.duration_ms,
        "created_at": iso(r.created_at),
    }
