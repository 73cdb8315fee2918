"""``/v1/responses``: the OpenAI Responses API over the pipeline, plus stored responses.

``POST /v1/responses`` runs the same steps as Chat Completions (authenticate, parse,
resolve, admit, route, metered) with two more around them: the stored conversation of
``previous_response_id`` and ``item_reference`` items is loaded before the canonical
request is built, and the finished response is stored before the client sees its end
(a storage failure is logged; the client still gets its answer). ``GET``, ``DELETE`` and
``GET …/input_items`` read the store, scoped to the caller's account.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from mesh.api.endpoint import AnyResponse, endpoint
from mesh.api.inference import inference
from mesh.api.responses import JSON
from mesh.canonical import CanonicalRequest, Event, Result
from mesh.conversations import ResponseStore
from mesh.errors import InvalidRequest, NotFound
from mesh.gateway import Gateway
from mesh.http.credentials import single
from mesh.protocols import openai_responses
from mesh.request_context import RequestContext

log = logging.getLogger("mesh.api.responses")

PROTOCOL = "openai.responses"
DEFAULT_PAGE = 20
MAX_PAGE = 100
STORAGE_OFF = (
    "Stored responses are turned off on this server, so 'previous_response_id' cannot be used: "
    "send the whole conversation in 'input' instead."
)


async def _account(request: Request, ctx: RequestContext) -> str:
    gw: Gateway = request.app.state.gateway
    principal = await gw.pipeline.authenticate(
        ctx, single(request.headers, "authorization"), single(request.headers, "x-api-key")
    )
    return str(principal.account_id)


def _saver(
    store: ResponseStore, account_id: str, input_items: Sequence[dict[str, Any]]
) -> Callable[[dict[str, Any]], Awaitable[None]]:
    async def save(response: dict[str, Any]) -> None:
        try:
            await store.save(account_id, response, input_items)
        except Exception:
            log.exception("storing response %s failed", response.get("id"))

    return save


@dataclass(frozen=True, slots=True)
class _Output:
    meta: openai_responses.ResponseMeta
    save: Callable[[dict[str, Any]], Awaitable[None]] | None

    def encode(self, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        return openai_responses.encode_stream(events, self.meta, self.save)

    async def render(self, result: Result) -> dict[str, Any]:
        response = openai_responses.render_response(result, self.meta)
        if self.save is not None:
            await self.save(response)
        return response


@dataclass(frozen=True, slots=True)
class _Call:
    request: CanonicalRequest
    call: openai_responses.ResponsesCall
    input_items: Sequence[dict[str, Any]]

    def output(self, gw: Gateway, ctx: RequestContext, request: CanonicalRequest) -> _Output:
        assert ctx.model is not None
        keep = gw.responses.enabled and self.call.store
        meta = openai_responses.response_meta(
            self.call,
            id="resp_" + ctx.request_id.removeprefix("req_"),
            created_at=int(time.time()),
            model=ctx.model.id,
            store=keep,
            usage_extras=gw.usage_extras(ctx.model),
        )
        return _Output(meta, _saver(gw.responses, str(ctx.who.account_id), self.input_items) if keep else None)


class Responses:
    name = PROTOCOL
    render_error = staticmethod(openai_responses.render_error)
    idle_ping = None

    async def parse(self, gw: Gateway, request: Request, ctx: RequestContext, body: bytes) -> _Call:
        store, account_id = gw.responses, str(ctx.who.account_id)
        call = openai_responses.parse_request(body)
        history: list[dict[str, Any]] = []
        if call.previous_response_id is not None:
            if not store.enabled:
                raise InvalidRequest(STORAGE_OFF, param="previous_response_id", code="storage_disabled")
            history = await store.history(account_id, call.previous_response_id)
        found = await store.find_items(account_id, call.references) if call.references and store.enabled else {}
        creq, input_items = openai_responses.build_request(call, history, found)
        return _Call(creq, call, input_items)

    def relays(self, gw: Gateway, request: CanonicalRequest) -> bool:
        return False  # Responses from a Chat Completions engine: always the canonical path


create_response = inference(Responses())


def _stored_lookup(gw: Gateway, err: NotFound) -> NotFound:
    if not gw.responses.enabled:
        err.message += " Stored responses are turned off on this server."
        err.args = (err.message,)
    return err


@endpoint(PROTOCOL, openai_responses.render_error)
async def get_response(request: Request, ctx: RequestContext) -> AnyResponse:
    gw: Gateway = request.app.state.gateway
    account_id = await _account(request, ctx)
    if request.query_params.get("stream", "false").lower() not in ("false", "0", ""):
        raise InvalidRequest(
            "Replaying a stored response as a stream is not supported; omit 'stream'.",
            param="stream",
            code="unsupported_parameter",
        )
    try:
        response = await gw.responses.get(account_id, request.path_params["response_id"])
    except NotFound as err:
        raise _stored_lookup(gw, err) from None
    return JSON(response)


@endpoint(PROTOCOL, openai_responses.render_error)
async def delete_response(request: Request, ctx: RequestContext) -> AnyResponse:
    gw: Gateway = request.app.state.gateway
    account_id = await _account(request, ctx)
    response_id = request.path_params["response_id"]
    try:
        await gw.responses.delete(account_id, response_id)
    except NotFound as err:
        raise _stored_lookup(gw, err) from None
    return JSON({"id": response_id, "object": "response.deleted", "deleted": True})


def _page_size(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise InvalidRequest(f"Invalid value for 'limit': expected an integer from 1 to {MAX_PAGE}.", param="limit")
    return int(raw)


@endpoint(PROTOCOL, openai_responses.render_error)
async def list_input_items(request: Request, ctx: RequestContext) -> AnyResponse:
    """``{"object": "list", "data", "first_id", "last_id", "has_more"}``; ``order`` defaults
    to ``desc`` (newest first) as OpenAI's does, ``after`` is an item id."""
    gw: Gateway = request.app.state.gateway
    account_id = await _account(request, ctx)
    q = request.query_params
    limit = _page_size(q.get("limit"))
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("Invalid value for 'order': expected 'asc' or 'desc'.", param="order")
    try:
        items = await gw.responses.input_items(account_id, request.path_params["response_id"])
    except NotFound as err:
        raise _stored_lookup(gw, err) from None
    if order == "desc":
        items.reverse()
    after = q.get("after")
    if after is not None:
        ids = [i.get("id") for i in items]
        if after not in ids:
            raise InvalidRequest(f"Invalid value for 'after': no input item has id {after!r}.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return JSON(
        {
            "object": "list",
            "data": page,
            "first_id": page[0].get("id") if page else None,
            "last_id": page[-1].get("id") if page else None,
            "has_more": len(items) > limit,
        }
    )


def responses_routes() -> list[BaseRoute]:
    return [
        Route("/v1/responses", create_response, methods=["POST"]),
        Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
        Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
    ]
