"""Low-balance alerts: a signed webhook to the operator, once per crossing.

Every ``billing.alerts.interval`` seconds each gateway process moves accounts through two
states with conditional updates, so that however many processes run, each crossing sends
one alert: an account whose balance is at or above the threshold is *armed*; an armed
account whose balance fell under it becomes *sent*, and the process whose update won posts
the webhook. An account that never had the threshold's worth is never armed, so a new empty
account does not alert. Held credit is not subtracted: a lease's hold is not spend.

The webhook is ``POST`` JSON with ``mesh-signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<body>" under billing.alerts.webhook_secret>`` (Stripe's scheme: check the time too).
A delivery that fails is retried a few times and then logged; it is not sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time

from sqlalchemy import select, update

from mesh.billing.money import format_credits, parse_credits
from mesh.config import AlertsConfig
from mesh.store import Database
from mesh.store.tables import accounts

log = logging.getLogger("mesh.billing.alerts")

ARMED, SENT = "armed", "sent"
ATTEMPTS = 3


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The ``mesh-signature`` header of ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


class BalanceAlerts:
    """One background task per process between :meth:`start` and :meth:`aclose`."""

    def __init__(self, db: Database, config: AlertsConfig) -> None:
        self.db = db
        self.config = config
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.config.webhook_url is not None and self.config.low_balance is not None

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("low-balance check failed")
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
        event = {
            "id": "evt_" + secrets.token_hex(12),
            "type": "account.balance_low",
            "created": int(time.time()),
            "data": {
                "account_id": account_id, "account_name": name, "balance": format_credits(balance),
                "threshold": format_credits(threshold),
            },
        }
        body = json.dumps(event).encode()
        secret = "" if self.config.webhook_secret is None else self.config.webhook_secret.get_secret_value()
        url = self.config.webhook_url or ""
        import httpx  # only when an alert is sent: a gateway starts without it

        async with httpx.AsyncClient(timeout=10) as client:
            for attempt in range(ATTEMPTS):
                headers = {"content-type": "application/json", "mesh-signature": sign(body, secret)}
                try:
                    r = await client.post(url, content=body, headers=headers)
                    if r.status_code < 300:
                        return
                    log.warning("low-balance webhook answered %d (attempt %d)", r.status_code, attempt + 1)
                except httpx.HTTPError as exc:
                    log.warning("low-balance webhook failed (attempt %d): %s", attempt + 1, exc)
                await asyncio.sleep(0.5 * 2**attempt)
        log.error("low-balance alert for %s not delivered", account_id)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
