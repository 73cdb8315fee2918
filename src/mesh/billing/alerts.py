"""Spend alerts to the operator, once per crossing: an account's balance falling under
``billing.alerts.low_balance``; a key's spend this budget period reaching each of
``billing.alerts.budget_thresholds`` (percent of its budget). Delivered by
:mod:`mesh.billing.notify` (a signed webhook and/or an email), from a background task.

Every ``billing.alerts.interval`` seconds each gateway process checks both, with
conditional updates, so that however many processes run, each crossing sends one alert.

Balance: an account whose balance is at or above the threshold is *armed*; an armed
account whose balance fell under it becomes *sent*, and the process whose update won
sends. An account that never had the threshold's worth is never armed, so a new empty
account does not alert. Held credit is not subtracted: a lease's hold is not spend.

Budgets: a key remembers the highest threshold it was alerted at (``budget_alert``) and the
period that was in (``budget_alert_period``, its ``budget_resets_at`` then). A check that
finds the key's spend (``spent``, this period's) at a higher threshold, or at any in a new
period, moves it there and the process whose update won sends. Spend that falls below the
remembered threshold (a new period began, the budget was raised) re-arms it quietly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from mesh.billing.money import format_credits, parse_credits
from mesh.billing.notify import Notifier, sign
from mesh.config import AlertsConfig
from mesh.store import Database
from mesh.store.tables import accounts, api_keys

log = logging.getLogger("mesh.billing.alerts")

ARMED, SENT = "armed", "sent"
__all__ = ["Alerts", "sign"]


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


class Alerts:
    """One background task per process between :meth:`start` and :meth:`aclose`."""

    def __init__(self, db: Database, config: AlertsConfig, notifier: Notifier | None = None) -> None:
        self.db = db
        self.config = config
        self.notifier = notifier or Notifier(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.config.delivers and (self.config.low_balance is not None or bool(self.config.budget_thresholds))

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            for check in (self.check, self.check_budgets):
                try:
                    await check()
                except Exception:
                    log.exception("%s failed", check.__name__)
            await asyncio.sleep(self.config.interval)

    async def check(self) -> int:
        """Arm accounts above the threshold, alert those that fell under it; returns how
        many alerts this process sent."""
        if self.config.low_balance is None:
            return 0
        threshold = int(parse_credits(str(self.config.low_balance)))
        above = accounts.c.balance >= threshold
        async with self.db.write() as conn:
            await conn.execute(
                update(accounts)
                .where(above, (accounts.c.balance_alert.is_(None)) | (accounts.c.balance_alert != ARMED))
                .values(balance_alert=ARMED)
            )
        async with self.db.read() as conn:
            fallen = (
                await conn.execute(
                    select(accounts.c.id, accounts.c.name).where(~above, accounts.c.balance_alert == ARMED)
                )
            ).all()
        sent = 0
        for account in fallen:
            async with self.db.write() as conn:
                won = await conn.execute(
                    update(accounts)
                    .where(accounts.c.id == account.id, accounts.c.balance_alert == ARMED, ~above)
                    .values(balance_alert=SENT)
                    .returning(accounts.c.balance)
                )
                balance = won.scalar_one_or_none()
            if balance is not None:
                await self._deliver(account.id, account.name, int(balance), threshold)
                sent += 1
        return sent

    async def _deliver(self, account_id: str, name: str, balance: int, threshold: int) -> None:
        await self.notifier.send(
            "account.balance_low",
            {"account_id": account_id, "account_name": name, "balance": format_credits(balance),
             "threshold": format_credits(threshold)},
            f"Mesh: {name} is low on credits",
            f"The balance of account {name} ({account_id}) fell to {format_credits(balance)} credits, "
            f"under the alert threshold of {format_credits(threshold)}.",
        )

    async def check_budgets(self) -> int:
        """Alert keys whose spend reached a higher budget threshold (or any, in a new
        period); re-arm those whose spend fell back. Returns how many alerts this process sent."""
        thresholds = sorted(set(self.config.budget_thresholds))
        if not thresholds:
            return 0
        k = api_keys.c
        q = (
            select(
                k.id, k.name, k.prefix, k.account_id, k.spend_limit, k.spent, k.budget_period, k.budget_resets_at,
                k.budget_alert, k.budget_alert_period, accounts.c.name.label("account_name"),
            )
            .select_from(api_keys.join(accounts, accounts.c.id == k.account_id))
            .where(
                k.revoked_at.is_(None),
                k.budget_alert.is_not(None)
                | (k.spend_limit.is_not(None) & (k.spent * 100 >= k.spend_limit * thresholds[0])),
            )
        )
        async with self.db.read() as conn:
            rows = (await conn.execute(q)).all()
        sent = 0
        for row in rows:
            level = None
            if row.spend_limit:
                level = max((t for t in thresholds if row.spent * 100 >= row.spend_limit * t), default=None)
            alerted = row.budget_alert if row.budget_alert_period == row.budget_resets_at else None
            if level == alerted and row.budget_alert_period == row.budget_resets_at:
                continue
            async with self.db.write() as conn:
                won = await conn.execute(
                    update(api_keys)
                    .where(
                        k.id == row.id,
                        k.budget_alert.is_not_distinct_from(row.budget_alert),
                        k.budget_alert_period.is_not_distinct_from(row.budget_alert_period),
                        k.budget_resets_at.is_not_distinct_from(row.budget_resets_at),
                    )
                    .values(budget_alert=level, budget_alert_period=row.budget_resets_at)
                )
            if won.rowcount != 1 or level is None or (alerted is not None and level <= alerted):
                continue  # another process moved it, or spend fell back: re-armed, nothing to say
            await self._deliver_budget(row, level)
            sent += 1
        return sent

    async def _deliver_budget(self, row: Any, level: int) -> None:
        what = "budget" if row.budget_period in (None, "none") else f"{row.budget_period} budget"
        await self.notifier.send(
            "key.budget_threshold",
            {
                "account_id": row.account_id, "account_name": row.account_name, "key_id": row.id,
                "key_name": row.name, "key_prefix": row.prefix, "threshold_percent": level,
                "spent": format_credits(row.spent), "limit": format_credits(row.spend_limit),
                "period": row.budget_period or "none", "resets_at": _iso(row.budget_resets_at),
            },
            f"Mesh: key {row.name or row.prefix} reached {level}% of its {what}",
            f"The API key {row.name or row.prefix} ({row.id}) of account {row.account_name} has spent "
            f"{format_credits(row.spent)} of its {what} of {format_credits(row.spend_limit)} credits "
            f"({level}% alert threshold)"
            + ("" if row.budget_resets_at is None else f"; it resets at {row.budget_resets_at.isoformat()}") + ".",
        )

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
