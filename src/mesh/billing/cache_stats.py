"""Prefix-cache savings: how much of the prompts an account sent the engines had cached.

Engines report cached prompt tokens in their usage (vLLM and SGLang:
``prompt_tokens_details.cached_tokens``); they are billed at the cached price already, and
these roll-ups show what session affinity earns, per model (from the daily roll-up) and
per API key and model (from the raw usage rows, so within ``usage_retention_days``). An
engine that reports no cached tokens (llama.cpp's server) shows a rate of 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from mesh.store import Database, utcnow
from mesh.store.tables import usage_daily, usage_records


@dataclass(frozen=True, slots=True)
class CacheStat:
    """Prompt tokens and the cached part of them, for one model (and one key, or None)."""

    model: str
    key_id: str | None
    requests: int
    input_tokens: int
    cached_tokens: int

    @property
    def hit_rate(self) -> float:
        """Cached prompt tokens over all prompt tokens, in [0, 1]."""
        return min(1.0, self.cached_tokens / self.input_tokens) if self.input_tokens else 0.0

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key_id": self.key_id} if self.key_id is not None else {}
        out.update(
            model=self.model,
            requests=self.requests,
            input_tokens=self.input_tokens,
            cached_tokens=self.cached_tokens,
            cache_hit_rate=round(self.hit_rate, 4),
        )
        return out


async def cache_by_model(
    db: Database, account_id: str, *, days: int = 30, now: datetime | None = None
) -> list[CacheStat]:
    """Per model over the last ``days`` UTC days (today included), by model name."""
    since = (now or utcnow()).date() - timedelta(days=max(1, days) - 1)
    d = usage_daily.c
    q = (
        select(d.model, func.sum(d.requests), func.sum(d.input_tokens), func.sum(d.cached_tokens))
        .where(d.account_id == account_id, d.day >= since)
        .group_by(d.model)
        .order_by(d.model)
    )
    async with db.read() as conn:
        rows = (await conn.execute(q)).all()
    return [CacheStat(r[0], None, int(r[1] or 0), int(r[2] or 0), int(r[3] or 0)) for r in rows]


async def cache_by_key(
    db: Database, account_id: str, *, days: int = 30, now: datetime | None = None
) -> list[CacheStat]:
    """Per API key and model over the last ``days`` days of raw usage rows."""
    since = (now or utcnow()) - timedelta(days=max(1, days))
    u = usage_records.c
    q = (
        select(u.key_id, u.model, func.count(), func.sum(u.input_tokens), func.sum(u.cached_tokens))
        .where(u.account_id == account_id, u.created_at >= since, u.key_id.is_not(None))
        .group_by(u.key_id, u.model)
        .order_by(u.key_id, u.model)
    )
    async with db.read() as conn:
        rows = (await conn.execute(q)).all()
    return [CacheStat(r[1], r[0], int(r[2] or 0), int(r[3] or 0), int(r[4] or 0)) for r in rows]
