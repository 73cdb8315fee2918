"""The stored-responses tables, on the shared :data:`mesh.store.tables.metadata`.

``responses`` holds one row per stored response: its own input items (``instructions``
excluded), its output items, and the response object without ``output``.
``response_items`` indexes every item id of a response (inputs and outputs) for
``item_reference`` look-ups; its rows go with their response.

Import this module wherever the metadata must be complete: the Alembic environment
(``store/migrations/env.py``) and the schema test import it. Migration ``0002`` creates
both tables.
"""

from __future__ import annotations

from sqlalchemy import JSON, Column, ForeignKey, Index, String, Table

from mesh.store.tables import metadata
from mesh.store.types import UTCDateTime

RESPONSE_ID_LENGTH = 64
ITEM_ID_LENGTH = 200

responses = Table(
    "responses",
    metadata,
    Column("id", String(RESPONSE_ID_LENGTH), primary_key=True),
    Column("account_id", String(40), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("model", String(200), nullable=False),
    Column("status", String(16), nullable=False),
    Column("previous_response_id", String(RESPONSE_ID_LENGTH), nullable=True),
    Column("input_items", JSON, nullable=False),
    Column("output_items", JSON, nullable=False),
    Column("response", JSON, nullable=False),
    Index("ix_responses_account_id_created_at", "account_id", "created_at"),
    Index("ix_responses_created_at", "created_at"),
)

response_items = Table(
    "response_items",
    metadata,
    Column(
        "response_id",
        String(RESPONSE_ID_LENGTH),
        ForeignKey("responses.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("item_id", String(ITEM_ID_LENGTH), primary_key=True),
    Column("account_id", String(40), nullable=False),
    Index("ix_response_items_account_id_item_id", "account_id", "item_id"),
)
