"""The playground: chat with any model from the browser, paid from the user's own credits.

Design: the browser never holds an API key. It posts the conversation to
``POST /console/playground/chat`` (session cookie + ``X-CSRF-Token``), and the console
hands it to the real ``/v1/chat/completions`` endpoint in-process, authenticated by the
user's dedicated *playground key*, with ``stream`` and ``stream_options.include_usage``
on. So the playground takes exactly the public API's path (key cache, rate limits, credit
hold, routing, settlement) and its requests show up in usage like any other.

The playground key is an ordinary API key named "Playground" in the user's account (it
shows in the key list, its spend is visible, revoking it is allowed: the next turn mints
a new one). Its secret is never stored or sent anywhere: it is derived on demand as
HMAC(console secret, key id), and only its hash is in ``api_keys`` as for every key.
"""

from __future__ import annotations

import base64
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import insert, select, update
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message

from mesh.accounts.keys import KEY_SCHEME, hash_key, key_prefix, new_id
from mesh.api.chat import chat_completions
from mesh.console.secrets import derive
from mesh.console.tables import console_users
from mesh.console.users import ConsoleUser
from mesh.console.web import AnyResponse, Bound, Console, Page
from mesh.store import utcnow
from mesh.store.tables import api_keys

PLAYGROUND_KEY_NAME = "Playground"
MAX_CHAT_BYTES = 512 * 1024


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class ChatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200)
    messages: list[_Message] = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)


def playground_secret(secret: bytes, key_id: str) -> str:
    """The playground key for ``key_id``: a well-formed Mesh key derived from the secret."""
    body = base64.urlsafe_b64encode(derive(secret, "playground-key", key_id)).rstrip(b"=").decode()
    return KEY_SCHEME + body


async def playground_key(bound: Bound, user: ConsoleUser) -> str:
    """The user's playground key, minted when there is none that still works."""
    db = bound.services.database
    now = utcnow()
    async with db.write() as conn:
        key_id = (
            await conn.execute(
                select(console_users.c.playground_key_id).where(console_users.c.id == user.id).with_for_update()
            )
        ).scalar_one_or_none()
        if key_id:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
            raw = playground_secret(bound.secret, key_id)
            if (
                row is not None
                and row.account_id == user.account_id
                and row.revoked_at is None
                and (row.expires_at is None or row.expires_at > now)
                and row.key_hash == hash_key(raw)
            ):
                return raw
        key_id = new_id("key")
        raw = playground_secret(bound.secret, key_id)
        await conn.execute(
            insert(api_keys).values(
                id=key_id, account_id=user.account_id, name=PLAYGROUND_KEY_NAME, prefix=key_prefix(raw),
                key_hash=hash_key(raw), allowed_models=None, expires_at=None, spend_limit=None, spent=0, held=0,
                revoked_at=None, last_used_at=None, created_at=now,
            )
        )
        await conn.execute(
            update(console_users).where(console_users.c.id == user.id).values(playground_key_id=key_id)
        )
    return raw


async def playground_page(page: Page) -> Response:
    gateway = page.gateway
    models = [(m, gateway.is_available(m.id)) for m in page.console.settings.models]
    chosen = page.request.query_params.get("model") or next((m.id for m, up in models if up), "")
    balance, held = await page.services.ledger.balance(page.user.account_id)
    return page.render("playground.html", title="Playground", nav="playground", models=models, chosen=chosen,
                       available=balance - held)


def _problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


async def chat(page: Page) -> AnyResponse:
    request = page.request
    raw = await _read_capped(request, MAX_CHAT_BYTES)
    if raw is None:
        return _problem(413, "The conversation is too long for the playground; clear it and start again.")
    try:
        body = ChatIn.model_validate_json(raw)
    except ValidationError:
        return _problem(400, "The playground sent a malformed conversation.")
    upstream: dict[str, object] = {
        "model": body.model,
        "messages": [m.model_dump() for m in body.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if body.max_tokens is not None:
        upstream["max_tokens"] = body.max_tokens
    if body.temperature is not None:
        upstream["temperature"] = body.temperature
    key = await playground_key(page.bound, page.user)
    return await chat_completions(_as_api_request(request, orjson.dumps(upstream), key))


async def _read_capped(request: Request, limit: int) -> bytes | None:
    """The body, or ``None`` as soon as it passes ``limit`` bytes (never buffering more)."""
    if int(request.headers.get("content-length") or 0) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _as_api_request(request: Request, payload: bytes, key: str) -> Request:
    """The same connection, seen as an API call: new path, headers and body, no cookies."""
    scope = dict(request.scope)
    scope["path"] = "/v1/chat/completions"
    scope["raw_path"] = b"/v1/chat/completions"
    scope["query_string"] = b""
    scope["headers"] = [
        (b"authorization", f"Bearer {key}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"user-agent", b"mesh-console-playground"),
    ]
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        return await request.receive()

    return Request(scope, receive)


def playground_routes(console: Console) -> list[Route]:
    r = console.route
    return [
        r("/playground", playground_page),
        r("/playground/chat", chat, methods=("POST",)),
    ]
