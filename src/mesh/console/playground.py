"""The playground: chat with any model from the browser, paid from the user's own credits.

Design: the browser never holds an API key. It posts the conversation to
``POST /console/playground/chat`` (session cookie + ``X-CSRF-Token``), and the console
hands it to the real ``/v1/chat/completions`` endpoint in-process, authenticated by the
user's dedicated *playground key*, with ``stream`` and ``stream_options.include_usage``
on. So the playground takes exactly the public API's path (key cache, rate limits, credit
hold, routing, settlement) and its requests show up in usage like any other.

The playground key is an ordinary random API key named "Playground" in the organization
(it shows in the key list, its spend is visible, revoking it is allowed: the next turn
mints a new one). Only its hash is in ``api_keys``, as for every key; its raw value stays
in the memory of the gateway process that minted it, never in the database or the browser.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message

from mesh.api.chat import chat_completions
from mesh.console.users import ConsoleUser
from mesh.console.web import AnyResponse, Bound, Console, HeldKey, Page
from mesh.errors import NotFound
from mesh.store import utcnow

PLAYGROUND_KEY_NAME = "Playground"
PLAYGROUND_KEY_TTL = timedelta(hours=24)
PLAYGROUND_KEY_RENEW = timedelta(hours=1)  # mint a new key when the held one has less left
PLAYGROUND_KEYS_HELD = 10_000  # users whose keys one process remembers (least recent dropped)
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


async def playground_key(bound: Bound, user: ConsoleUser, account_id: str) -> str:
    """The user's playground key for the organization in this process, minted (through
    ``Accounts.create_key``, like every key) when there is none that still works.

    A random key like any other, stored only as its hash; its raw value lives in this
    process's memory alone, so nothing in the database (or a dump of it) yields it. Each
    gateway process mints its own, expiring after :data:`PLAYGROUND_KEY_TTL`.
    """
    accounts = bound.services.accounts
    now = utcnow()
    slot = f"{user.id}:{account_id}"
    held = bound.playground_keys.get(slot)
    if held is not None and held.expires_at - now > PLAYGROUND_KEY_RENEW:
        try:
            info = await accounts.get_key(held.key_id)
        except NotFound:
            info = None
        if info is not None and info.account_id == account_id and info.revoked_at is None:
            bound.playground_keys.move_to_end(slot)
            return held.raw
    created = await accounts.create_key(account_id, name=PLAYGROUND_KEY_NAME, expires_at=now + PLAYGROUND_KEY_TTL,
                                        created_by=user.id)
    await bound.users.set_playground_key(user.id, created.info.id)
    bound.playground_keys[slot] = HeldKey(created.info.id, created.key, now + PLAYGROUND_KEY_TTL)
    while len(bound.playground_keys) > PLAYGROUND_KEYS_HELD:
        bound.playground_keys.popitem(last=False)
    return created.key


async def playground_page(page: Page) -> Response:
    gateway = page.gateway
    models = [(m, gateway.is_available(m.id)) for m in page.console.settings.models]
    chosen = page.request.query_params.get("model") or next((m.id for m, up in models if up), "")
    balance, held = await page.services.ledger.balance(page.account_id)
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
    key = await playground_key(page.bound, page.user, page.account_id)
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

    # The connection's own send: a stream queued past its patience starts its response
    # from a task of its own (``api/inference.py``), before this handler returns it.
    return Request(scope, receive, request._send)


def playground_routes(console: Console) -> list[Route]:
    r = console.route
    return [
        r("/playground", playground_page, need="playground"),
        r("/playground/chat", chat, methods=("POST",), need="playground"),
    ]
