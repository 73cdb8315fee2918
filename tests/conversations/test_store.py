"""The stored-responses repository on SQLite and PostgreSQL: ownership, chains, references, purge."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from mesh.conversations import ResponseStore, purge
from mesh.conversations.tables import response_items, responses
from mesh.errors import NotFound
from mesh.store import Database
from mesh.store.tables import metadata

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def response(rid: str, *, previous: str | None = None, created: datetime = NOW, text: str = "hi") -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": int(created.timestamp()),
        "status": "completed",
        "model": "test-model",
        "previous_response_id": previous,
        "output": [
            {"type": "message", "id": f"msg_{rid}", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}
        ],
        "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
    }


def user(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "role": "user", "status": "completed",
            "content": [{"type": "input_text", "text": text}]}


async def test_save_and_get_round_trips_the_response(db: Database) -> None:
    store = ResponseStore(db)
    r = response("resp_a")
    await store.save("acct_a", r, [user("msg_in", "hello")])
    assert await store.get("acct_a", "resp_a") == r
    assert await store.input_items("acct_a", "resp_a") == [user("msg_in", "hello")]


async def test_other_accounts_get_not_found(db: Database) -> None:
    store = ResponseStore(db)
    await store.save("acct_a", response("resp_a"), [user("msg_in", "hello")])
    with pytest.raises(NotFound):
        await store.get("acct_b", "resp_a")
    with pytest.raises(NotFound):
        await store.input_items("acct_b", "resp_a")
    with pytest.raises(NotFound):
        await store.history("acct_b", "resp_a")
    with pytest.raises(NotFound):
        await store.delete("acct_b", "resp_a")
    assert await store.find_items("acct_b", ["msg_in"]) == {}
    assert (await store.get("acct_a", "resp_a"))["id"] == "resp_a"  # untouched by B's delete


async def test_delete_removes_the_response_and_its_items(db: Database) -> None:
    store = ResponseStore(db)
    await store.save("acct_a", response("resp_a"), [user("msg_in", "hello")])
    await store.delete("acct_a", "resp_a")
    with pytest.raises(NotFound):
        await store.get("acct_a", "resp_a")
    with pytest.raises(NotFound):
        await store.delete("acct_a", "resp_a")
    async with db.read() as conn:
        assert (await conn.execute(select(func.count()).select_from(response_items))).scalar_one() == 0


async def test_history_walks_the_chain_oldest_first(db: Database) -> None:
    store = ResponseStore(db)
    await store.save("acct_a", response("resp_1", text="one"), [user("u1", "first")])
    await store.save("acct_a", response("resp_2", previous="resp_1", text="two"), [user("u2", "second")])
    await store.save("acct_a", response("resp_3", previous="resp_2", text="three"), [user("u3", "third")])
    history = await store.history("acct_a", "resp_3")
    assert [i["id"] for i in history] == ["u1", "msg_resp_1", "u2", "msg_resp_2", "u3", "msg_resp_3"]
    assert [i["id"] for i in await store.history("acct_a", "resp_2")] == ["u1", "msg_resp_1", "u2", "msg_resp_2"]


async def test_history_stops_at_a_deleted_link(db: Database) -> None:
    store = ResponseStore(db)
    await store.save("acct_a", response("resp_1"), [user("u1", "first")])
    await store.save("acct_a", response("resp_2", previous="resp_1"), [user("u2", "second")])
    await store.delete("acct_a", "resp_1")
    assert [i["id"] for i in await store.history("acct_a", "resp_2")] == ["u2", "msg_resp_2"]


async def test_history_of_unknown_response_names_the_param(db: Database) -> None:
    with pytest.raises(NotFound) as info:
        await ResponseStore(db).history("acct_a", "resp_missing")
    assert info.value.param == "previous_response_id"


async def test_find_items_returns_the_newest_copy(db: Database) -> None:
    store = ResponseStore(db)
    await store.save("acct_a", response("resp_1", created=NOW - timedelta(minutes=1)), [user("u1", "old")])
    await store.save("acct_a", response("resp_2"), [user("u1", "new")])
    found = await store.find_items("acct_a", ["u1", "msg_resp_1", "nope"])
    assert found["u1"]["content"][0]["text"] == "new"
    assert found["msg_resp_1"]["type"] == "message"
    assert "nope" not in found


async def test_purge_deletes_only_old_rows(db: Database) -> None:
    store = ResponseStore(db, retention_days=30)
    await store.save("acct_a", response("resp_old", created=NOW - timedelta(days=31)), [user("u_old", "x")])
    await store.save("acct_a", response("resp_new", created=NOW - timedelta(days=29)), [user("u_new", "y")])
    assert await purge(db, 30, now=NOW, batch=1) == 1
    with pytest.raises(NotFound):
        await store.get("acct_a", "resp_old")
    assert (await store.get("acct_a", "resp_new"))["id"] == "resp_new"
    async with db.read() as conn:
        left = (await conn.execute(select(response_items.c.item_id).order_by(response_items.c.item_id))).scalars()
        assert list(left) == ["msg_resp_new", "u_new"]
    assert await purge(db, 30, now=NOW) == 0


async def test_purge_task_starts_and_stops(db: Database) -> None:
    store = ResponseStore(db, retention_days=1, purge_interval=0.01)
    await store.save("acct_a", response("resp_old", created=datetime.now(UTC) - timedelta(days=2)), [])
    store.start()
    try:
        for _ in range(200):
            async with db.read() as conn:
                if (await conn.execute(select(func.count()).select_from(responses))).scalar_one() == 0:
                    break
            await asyncio.sleep(0.01)
    finally:
        await store.aclose()
    with pytest.raises(NotFound):
        await store.get("acct_a", "resp_old")


def _diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return [d for d in compare_metadata(ctx, metadata) if "respons" in repr(d)]


async def test_migration_matches_the_tables(db: Database) -> None:
    async with db.read() as conn:
        assert await conn.run_sync(_diff) == []
