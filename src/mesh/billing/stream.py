"""The settlement webhook stream: every settled request, batched and signed, to an operator
who bills elsewhere (``billing.settlement_stream``).

Delivery is at least once, and survives restarts. Each usage record goes into
``settlement_outbox`` in the same transaction that writes it (:func:`mesh.billing.usage.write_batch`),
so a settled request is either in the outbox or not written at all. A background task in
each gateway process sends a batch every ``interval`` seconds, or as soon as ``batch_size``
records wait: it *claims* up to ``batch_size`` rows (a conditional update setting
``claimed_until``, so two processes never send the same rows at once), posts them, and
deletes them once the receiver answered 2xx. A failed post leaves them claimed until the
claim lapses and backs off (doubling, up to ``max_backoff``); a process that dies mid-batch
leaves its claim to lapse too (``claim_seconds``), and any process then sends those rows
again. So a receiver may see a record twice, never zero times: each record carries its
idempotency id (``id``, the request id) to deduplicate on.

    POST <url>
    mesh-signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the secret>

    {"id": "whb_…", "type": "settlement.batch", "created": 1765000000,
     "data": [{"id": "req_…", "account_id": …, "key_id": …, "model": …, "cost": "0.000644", …}]}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update

from mesh.billing.money import format_credits
from mesh.billing.notify import sign
from mesh.config import SettlementStreamConfig
from mesh.store import Database, utcnow
from mesh.store.tables import settlement_outbox

log = logging.getLogger("mesh.billing.stream")

if TYPE_CHECKING:  # usage imports this module
    from mesh.billing.usage import UsageRecord


def outbox_row(r: UsageRecord) -> dict[str, Any]:
    """The outbox row of a settled request: what the stream will send for it."""
    payload = {
        "id": r.request_id, "account_id": r.account_id, "key_id": r.key_id, "model": r.model,
        "replica": r.replica, "protocol": r.protocol, "status": r.status, "finish_reason": r.finish_reason,
        "input_tokens": r.input_tokens, "cached_tokens": r.cached_tokens, "output_tokens": r.output_tokens,
        "reasoning_tokens": r.reasoning_tokens, "cost": format_credits(r.cost), "user": r.end_user,
        "tags": list(r.tags), "created_at": r.created_at.isoformat(),
    }
    return {"request_id": r.request_id, "payload": payload, "created_at": r.created_at, "claimed_until": None,
            "attempts": 0}


class SettlementStream:
    """One background task per process between :meth:`start` and :meth:`aclose`."""

    def __init__(self, db: Database, config: SettlementStreamConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.config = config
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._backoff = 0.0
        self.delivered = 0  # records (metric, tests)

    @property
    def enabled(self) -> bool:
        return self.config.url is not None

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mesh-settlement-stream")

    async def _run(self) -> None:
        last = self._clock()
        poll = min(self.config.interval, 0.5)
        while True:
            await asyncio.sleep(max(poll, self._backoff))
            try:
                due = self._clock() - last >= self.config.interval
                if not due and await self.waiting() < self.config.batch_size:
                    continue
                last = self._clock()
                while await self.send_batch() == self.config.batch_size:
                    pass  # a full batch: more may wait
                self._backoff = 0.0
            except Exception as exc:
                self._backoff = min(self.config.max_backoff, max(1.0, self._backoff * 2))
                log.warning("settlement stream: %s; retrying in %.0f s", exc, self._backoff)

    async def waiting(self) -> int:
        """Records not claimed by anyone."""
        now = utcnow()
        o = settlement_outbox.c
        async with self.db.read() as conn:
            q = select(func.count()).select_from(settlement_outbox).where(
                o.claimed_until.is_(None) | (o.claimed_until < now)
            )
            return int((await conn.execute(q)).scalar_one())

    async def send_batch(self) -> int:
        """Claim, post and delete one batch; returns how many records it delivered. Raises
        when the post fails (the claim then lapses and the rows are sent again)."""
        o = settlement_outbox.c
        now = utcnow()
        until = now + timedelta(seconds=self.config.claim_seconds)
        async with self.db.write() as conn:
            ids = (
                await conn.execute(
                    select(o.id).where(o.claimed_until.is_(None) | (o.claimed_until < now))
                    .order_by(o.id).limit(self.config.batch_size)
                )
            ).scalars().all()
            if not ids:
                return 0
            # Only rows still unclaimed: a process racing for the same ones gets the rest.
            claimed = (
                await conn.execute(
                    update(settlement_outbox)
                    .where(o.id.in_(ids), o.claimed_until.is_(None) | (o.claimed_until < now))
                    .values(claimed_until=until, attempts=o.attempts + 1)
                    .returning(o.id, o.payload)
                )
            ).all()
        if not claimed:
            return 0
        batch = sorted(claimed, key=lambda r: r.id)
        await self._post([r.payload for r in batch])
        async with self.db.write() as conn:
            await conn.execute(delete(settlement_outbox).where(o.id.in_([r.id for r in batch])))
        self.delivered += len(batch)
        return len(batch)

    async def _post(self, records: list[dict[str, Any]]) -> None:
        event = {"id": "whb_" + secrets.token_hex(12), "type": "settlement.batch", "created": int(time.time()),
                 "data": records}
        body = json.dumps(event).encode()
        secret = "" if self.config.secret is None else self.config.secret.get_secret_value()
        headers = {"content-type": "application/json", "mesh-signature": sign(body, secret)}
        import httpx  # only when a batch is sent: a gateway starts without it

        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(self.config.url or "", content=body, headers=headers)
        if r.status_code >= 300:
            raise RuntimeError(f"the receiver answered {r.status_code} to {len(records)} records")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
