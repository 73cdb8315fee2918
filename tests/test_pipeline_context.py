"""Pipeline.resolve fits max_tokens to the context: by the replica's count, else a low estimate."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from mesh.canonical import CanonicalRequest, Event, Message, TextPart
from mesh.config import ModelConfig, Settings
from mesh.errors import ContextLengthExceeded
from mesh.pipeline import Pipeline, RequestContext, estimate_prompt_tokens, estimate_prompt_tokens_low
from mesh.routing.pool import ModelPool
from mesh.routing.replica import Replica
from mesh.routing.router import Router

CONTEXT = 8192


class CountingEngine:
    """Counts prompts like a tokenizer would (or cannot count: None); never generates."""

    def __init__(self, count: int | None) -> None:
        self.name = "counting"
        self.count = count
        self.asked = 0

    def stream(self, request: CanonicalRequest) -> AsyncIterator[Event]:
        raise NotImplementedError

    async def health(self) -> bool:
        return True

    async def count_tokens(self, messages: Sequence[Message], request: CanonicalRequest) -> int | None:
        self.asked += 1
        return self.count

    async def aclose(self) -> None:
        return None


@dataclass
class Anyone:
    account_id: str = "acct"
    key_id: str = "key"
    limits: tuple[Any, ...] = ()

    def may_use(self, model: str) -> bool:
        return True


def pipeline(engine: CountingEngine) -> Pipeline:
    model = ModelConfig(id="m", context_length=CONTEXT)
    router = Router({"m": ModelPool(model, [Replica(engine)])})
    return Pipeline(Settings(), router, authenticator=None, ledger=None, spawn=lambda c: c.close())  # type: ignore[arg-type]


def request(chars: int, max_tokens: int | None = 32_000) -> CanonicalRequest:
    text = ("word " * (chars // 5 + 1))[:chars]
    return CanonicalRequest(
        model="m",
        messages=(Message("system", (TextPart(text),)), Message("user", (TextPart("go"),))),
        max_tokens=max_tokens,
    )


def context() -> RequestContext:
    ctx = RequestContext(request_id="req_test", protocol="test")
    ctx.principal = Anyone()
    return ctx


async def test_the_engines_own_count_sets_the_room() -> None:
    engine = CountingEngine(4200)
    req = request(17_000)  # Claude Code's preamble: the credit estimate alone exceeds the context
    assert estimate_prompt_tokens(req) > CONTEXT
    out = await pipeline(engine).resolve(context(), req)
    assert out.max_tokens == CONTEXT - 4200 and engine.asked == 1


async def test_without_a_tokenizer_the_room_leans_large() -> None:
    req = request(17_000)
    out = await pipeline(CountingEngine(None)).resolve(context(), req)
    assert out.max_tokens == CONTEXT - estimate_prompt_tokens_low(req)
    assert 17_000 // 5 < estimate_prompt_tokens_low(req) <= 17_000 // 4


async def test_a_cap_that_fits_costs_no_count() -> None:
    engine = CountingEngine(10)
    out = await pipeline(engine).resolve(context(), request(400, max_tokens=1000))
    assert out.max_tokens == 1000 and engine.asked == 0
    out = await pipeline(engine).resolve(context(), request(400, max_tokens=None))
    assert out.max_tokens is None and engine.asked == 0


@pytest.mark.parametrize("count", [CONTEXT, CONTEXT + 1, None])
async def test_a_prompt_that_fills_the_context_is_refused_with_the_numbers(count: int | None) -> None:
    req = request(40_000, max_tokens=None)  # about 10,000 tokens even leaning low
    with pytest.raises(ContextLengthExceeded) as caught:
        await pipeline(CountingEngine(count)).resolve(context(), req)
    assert f"is {CONTEXT} tokens" in caught.value.message
    shown = count if count is not None else f"at least {estimate_prompt_tokens_low(req)}"
    assert f"in {shown} tokens" in caught.value.message


async def test_counting_for_count_tokens_never_refuses() -> None:
    req = request(40_000, max_tokens=None)
    out = await pipeline(CountingEngine(None)).resolve(context(), req, fit_context=False)
    assert out.max_tokens is None
