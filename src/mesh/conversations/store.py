"""The stored-responses repository: save, read, delete, chain and purge.

Every read and delete is scoped to the owning account: another account's response is
"not found" (404), never "forbidden", so response ids reveal nothing. A response is stored
with its own input items and its output items; ``previous_response_id`` chains are walked
in one recursive query, oldest first. If a link of the chain was deleted or purged the
walk stops there: what remains of the conversation is used.

:meth:`ResponseStore.start` runs :func:`purge` hourly in a task the store owns
(:meth:`ResponseStore.aclose` stops it); purging keeps running even when the operator
turned storage off, so rows written earlier still expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import delete, insert, literal, select

from mesh.conversations.tables import ITEM_ID_LENGTH, response_items, responses
from mesh.errors import NotFound
from mesh.store import Database, utcnow

DEFAULT_RETENTION_DAYS = 30
PURGE_INTERVAL = 3600.0
PURGE_BATCH = 500
MAX_CHAIN = 10_000  # previous_response_id links followed at most

log = logging.getLogger(__name__)

Item = dict[str, Any]


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.")


def _item_ids(items: Iterable[Mapping[str, Any]]) -> list[str]:
    ids = (item.get("id") for item in items)
    return list(dict.fromkeys(i for i in ids if isinstance(i, str) and 0 < len(i) <= ITEM_ID_LENGTH))


class ResponseStore:
    """Stored responses in the database. ``enabled`` False (the operator's privacy switch)
    means nothing new is stored; reads still work on what exists until it expires."""

    def __init__(
        self,
        db: Database,
        *,
        enabled: bool = True,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        purge_interval: float = PURGE_INTERVAL,
    ) -> None:
        self.db = db
        self.enabled = enabled
        self.retention_days = retention_days
        self.purge_interval = purge_interval
        self._task: asyncio.Task[None] | None = None

    # ---- writing ----------------------------------------------------------------------------------

    async def save(
        self, account_id: str, response: Mapping[str, Any], input_items: Sequence[Mapping[str, Any]]
    ) -> None:
        """Store a finished ``response`` object of ``account_id`` and the input items it answered."""
        output = list(response.get("output") or ())
        body = {**response, "output": []}  # output lives in its own column; the key keeps its place
        created = response.get("created_at")
        created_at = datetime.fromtimestamp(created, UTC) if isinstance(created, int) else utcnow()
        response_id = str(response["id"])
        async with self.db.write() as conn:
            await conn.execute(
                insert(responses).values(
                    id=response_id,
                    account_id=account_id,
                    created_at=created_at,
                    model=str(response.get("model") or ""),
                    status=str(response.get("status") or "completed"),
                    previous_response_id=response.get("previous_response_id"),
                    input_items=list(input_items),
                    output_items=output,
                    response=body,
                )
            )
            ids = _item_ids([*input_items, *output])
            if ids:
                await conn.execute(
                    insert(response_items),
                    [{"response_id": response_id, "item_id": i, "account_id": account_id} for i in ids],
                )

    async def delete(self, account_id: str, response_id: str) -> None:
        """Delete one response of ``account_id``; raises NotFound (404) if there is none."""
        async with self.db.write() as conn:
            await conn.execute(
                delete(response_items).where(
                    response_items.c.response_id == response_id, response_items.c.account_id == account_id
                )
            )
            result = await conn.execute(
                delete(responses).where(responses.c.id == response_id, responses.c.account_id == account_id)
            )
        if result.rowcount == 0:
            raise _not_found(response_id)

    # ---- reading ----------------------------------------------------------------------------------

    async def get(self, account_id: str, response_id: str) -> dict[str, Any]:
        """The stored response object; raises NotFound (404)."""
        q = select(responses.c.response, responses.c.output_items).where(
            responses.c.id == response_id, responses.c.account_id == account_id
        )
        async with self.db.read() as conn:
            row = (await conn.execute(q)).one_or_none()
        if row is None:
            raise _not_found(response_id)
        return {**cast(dict[str, Any], row.response), "output": row.output_items}

    async def input_items(self, account_id: str, response_id: str) -> list[Item]:
        """The input items of one response, in the order they were sent; raises NotFound."""
        q = select(responses.c.input_items).where(responses.c.id == response_id, responses.c.account_id == account_id)
        async with self.db.read() as conn:
            row = (await conn.execute(q)).one_or_none()
        if row is None:
            raise _not_found(response_id)
        return list(row.input_items)

    async def history(self, account_id: str, response_id: str) -> list[Item]:
        """The conversation up to and including ``response_id``: for each response of its
        ``previous_response_id`` chain, oldest first, its input items then its output items.

        Raises NotFound (404, ``param`` previous_response_id) if ``response_id`` is not one of
        the account's responses.
        """
        chain = (
            select(responses.c.id, responses.c.previous_response_id, literal(0).label("depth"))
            .where(responses.c.id == response_id, responses.c.account_id == account_id)
            .cte("chain", recursive=True)
        )
        parent = responses.alias("parent")
        chain = chain.union_all(
            select(parent.c.id, parent.c.previous_response_id, chain.c.depth + 1).where(
                parent.c.id == chain.c.previous_response_id,
                parent.c.account_id == account_id,
                chain.c.depth < MAX_CHAIN,
            )
        )
        q = (
            select(responses.c.input_items, responses.c.output_items)
            .join(chain, chain.c.id == responses.c.id)
            .order_by(chain.c.depth.desc())
        )
        async with self.db.read() as conn:
            rows = (await conn.execute(q)).all()
        if not rows:
            raise NotFound(
                f"Previous response with id '{response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        items: list[Item] = []
        for row in rows:
            items.extend(row.input_items)
            items.extend(row.output_items)
        return items

    async def find_items(self, account_id: str, item_ids: Iterable[str]) -> dict[str, Item]:
        """The newest stored item of the account for each id that exists (for ``item_reference``)."""
        found: dict[str, Item] = {}
        async with self.db.read() as conn:
            for item_id in dict.fromkeys(item_ids):
                q = (
                    select(responses.c.input_items, responses.c.output_items)
                    .join(response_items, response_items.c.response_id == responses.c.id)
                    .where(response_items.c.account_id == account_id, response_items.c.item_id == item_id)
                    .order_by(responses.c.created_at.desc())
                    .limit(1)
                )
                row = (await conn.execute(q)).one_or_none()
                if row is None:
                    continue
                for item in [*row.input_items, *row.output_items]:
                    if isinstance(item, dict) and item.get("id") == item_id:
                        found[item_id] = item
                        break
        return found

    # ---- retention --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the hourly purge (idempotent; needs a running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._purge_forever(), name="mesh-responses-purge")

    async def aclose(self) -> None:
        """Stop the purge task."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _purge_forever(self) -> None:
        while True:
            try:
                purged = await purge(self.db, self.retention_days)
                if purged:
                    log.info("purged %d stored responses older than %d days", purged, self.retention_days)
            except Exception:
                log.exception("purging stored responses failed; will retry")
            await asyncio.sleep(self.purge_interval)


async def purge(db: Database, retention_days: int, *, now: datetime | None = None, batch: int = PURGE_BATCH) -> int:
    """Delete responses older than ``retention_days``, ``batch`` per transaction. Returns the count."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    total = 0
    while True:
        async with db.write() as conn:
            q = select(responses.c.id).where(responses.c.created_at < cutoff).limit(batch)
            ids = list((await conn.execute(q)).scalars())
            if ids:
                await conn.execute(delete(response_items).where(response_items.c.response_id.in_(ids)))
                await conn.execute(delete(responses).where(responses.c.id.in_(ids)))
        total += len(ids)
        if len(ids) < batch:
            return total
