"""The request lifecycle on in-process fakes: every way a request ends gives back its
credit hold, rate-limit slot, replica slot and queue place, exactly once."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from fakes import FakeEngine, FakeLedger, FakePrincipal, limited, request
from mesh.canonical import CanonicalRequest, Event, TextDelta, Usage
from mesh.config import ModelConfig, Settings
from mesh.errors import EngineError, EngineTimeout, MeshError, RateLimited
from mesh.http.streaming import StreamResponse
from mesh.limits.memory import MemoryLimiter
from mesh.observability.logging import AccessLog
from mesh.pipeline import Pipeline, RequestContext, billed_prompt_tokens
from mesh.routing.pending import PendingStream
from mesh.routing.pool import ModelPool
from mesh.routing.replica import Replica
from mesh.routing.router import RoutedStream, Router

_ids = itertools.count()


@dataclass
class Rig:
    pipeline: Pipeline
    engine: FakeEngine
    ledger: FakeLedger
    limiter: MemoryLimiter
    pool: ModelPool
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def replica(self) -> Replica:
        return self.pool.replicas[0]

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks))

    async def start(
        self, principal: FakePrincipal | None = None, *, stream: bool = True, patience: float | None = None
    ) -> tuple[RequestContext, RoutedStream | PendingStream]:
        ctx = RequestContext(request_id=f"req_{next(_ids)}", protocol="test")
        ctx.principal = principal or FakePrincipal()
        _, routed = await self.pipeline.start(ctx, request(stream=stream), patience=patience)
        return ctx, routed

    async def free(self, principal: FakePrincipal) -> bool:
        """Whether the principal's limits have room for one more request now."""
        try:
            lease = await self.limiter.acquire(principal.limits, 0)
        except RateLimited:
            return False
        await self.limiter.release(lease)
        return True


def rig(*, capacity: int | None = None, request_timeout: float | None = None, queue_timeout: float = 5) -> Rig:
    engine = FakeEngine()
    ledger = FakeLedger()
    limiter = MemoryLimiter()
    model = ModelConfig(id="m", context_length=4096)
    pool = ModelPool(model, [Replica(engine, capacity=capacity)], queue_timeout=queue_timeout)
    settings = Settings(catalog=False, routing={"request_timeout": request_timeout})
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    pipeline = Pipeline(settings, Router({"m": pool}), authenticator=None, ledger=ledger,  # type: ignore[arg-type]
                        spawn=spawn, limiter=limiter)
    return Rig(pipeline, engine, ledger, limiter, pool, tasks)


async def consume(events: Any) -> list[Event]:
    return [ev async for ev in events]


def assert_all_given_back(r: Rig, principal: FakePrincipal | None = None) -> None:
    assert r.ledger.holds == {}, "a credit hold was left"
    assert r.replica.in_flight == 0 and len(r.pool.queue) == 0 and r.pool.reserved == 0
    assert r.engine.open == 0, "an engine stream was left open"


async def test_a_request_that_succeeds_settles_once_and_gives_everything_back() -> None:
    r = rig()
    principal = limited(concurrent=1)
    ctx, routed = await r.start(principal)
    assert not await r.free(principal)  # its one concurrency slot is taken
    events = await consume(r.pipeline.metered(ctx, routed))
    await r.pipeline.finish(ctx)
    assert sum(isinstance(e, TextDelta) for e in events) == 3
    assert [s["status"] for s in r.ledger.settled] == ["ok"]
    assert r.ledger.settled[0]["usage"] == Usage(input_tokens=10, output_tokens=3)
    assert await r.free(principal)
    assert_all_given_back(r)


async def test_a_hang_up_while_waiting_for_the_first_token_cancels_the_route_and_settles() -> None:
    r = rig()
    r.engine.gate = asyncio.Event()  # the first token never comes
    principal = limited(concurrent=1)
    ctx, routed = await r.start(principal, patience=0.01)
    assert isinstance(routed, PendingStream) and r.replica.in_flight == 1
    # The response's body never started (the client left during keep-alives): it only
    # calls finish(), as StreamResponse's on_close does.
    await r.pipeline.finish(ctx)
    assert r.engine.cancelled == 1
    assert [(s["status"], s["charged"]) for s in r.ledger.settled] == [("cancelled", 0)]
    assert await r.free(principal)
    assert_all_given_back(r)


async def test_a_hang_up_while_iterating_a_pending_stream_costs_nothing() -> None:
    r = rig()
    r.engine.gate = asyncio.Event()
    ctx, routed = await r.start(patience=0.01)
    events = r.pipeline.metered(ctx, routed)  # Anthropic streams iterate at once, with pings
    waiting = asyncio.create_task(anext(events))
    await asyncio.sleep(0.01)
    waiting.cancel()  # the client went away: the response cancels its body...
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await events.aclose()  # ...and closes it
    await r.pipeline.finish(ctx)
    await r.drain()
    assert [(s["status"], s["charged"]) for s in r.ledger.settled] == [("cancelled", 0)]
    assert r.engine.cancelled == 1
    assert_all_given_back(r)


async def test_a_hang_up_while_queued_leaves_the_queue_and_settles() -> None:
    r = rig(capacity=1)
    r.engine.gate = asyncio.Event()
    first_ctx, first = await r.start(patience=0.01)
    ctx, queued = await r.start(patience=0.01)
    assert isinstance(queued, PendingStream) and len(r.pool.queue) == 1
    await r.pipeline.finish(ctx)
    assert len(r.pool.queue) == 0
    assert r.engine.started == 1  # the queued request never reached the engine
    r.engine.gate.set()
    await consume(r.pipeline.metered(first_ctx, first))
    await r.pipeline.finish(first_ctx)
    assert sorted(s["status"] for s in r.ledger.settled) == ["cancelled", "ok"]
    assert_all_given_back(r)


async def _admitted(r: Rig) -> tuple[RequestContext, CanonicalRequest]:
    ctx = RequestContext(request_id=f"req_{next(_ids)}", protocol="test")
    ctx.principal = FakePrincipal()
    req = await r.pipeline.resolve(ctx, request(stream=True))
    return ctx, await r.pipeline.admit(ctx, req)


async def test_an_inline_route_past_its_patience_calls_impatient_once_and_routes_on() -> None:
    r = rig()
    r.engine.gate = asyncio.Event()
    ctx, req = await _admitted(r)
    calls: list[bool] = []
    asyncio.get_running_loop().call_later(0.05, r.engine.gate.set)
    routed = await r.pipeline.route(ctx, req, patience=0.01, impatient=lambda: calls.append(r.replica.in_flight == 1))
    assert isinstance(routed, RoutedStream) and ctx.stream is routed
    assert calls == [True]  # once, while the route was still under way (and in the request's task)
    events = await consume(r.pipeline.metered(ctx, routed))
    await r.pipeline.finish(ctx)
    assert sum(isinstance(e, TextDelta) for e in events) == 3
    assert [s["status"] for s in r.ledger.settled] == ["ok"]
    assert_all_given_back(r)


async def test_an_inline_route_within_its_patience_never_calls_impatient() -> None:
    r = rig()
    ctx, req = await _admitted(r)
    calls: list[int] = []
    routed = await r.pipeline.route(ctx, req, patience=0.05, impatient=lambda: calls.append(1))
    await asyncio.sleep(0.1)
    assert calls == []  # its timer was cancelled
    await consume(r.pipeline.metered(ctx, routed))
    await r.pipeline.finish(ctx)
    assert_all_given_back(r)


@pytest.mark.parametrize("capacity", [None, 1])  # waiting for the first token; queued for a slot
async def test_an_inline_route_cancelled_in_its_task_gives_everything_back(capacity: int | None) -> None:
    r = rig(capacity=capacity)
    r.engine.gate = asyncio.Event()
    first_ctx = None
    if capacity:
        first_ctx, first = await r.start(patience=0.01)  # holds the one slot, waiting for its first token
    principal = limited(concurrent=1)
    ctx = RequestContext(request_id=f"req_{next(_ids)}", protocol="test")
    ctx.principal = principal
    req = await r.pipeline.admit(ctx, await r.pipeline.resolve(ctx, request(stream=True)))
    task = asyncio.ensure_future(r.pipeline.route(ctx, req, patience=0.01, impatient=lambda: None))
    await asyncio.sleep(0.03)
    assert len(r.pool.queue) == (1 if capacity else 0)
    task.cancel()  # a hang-up heard past the patience cancels the request's task
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ctx.settled and ctx.status == "cancelled" and len(r.pool.queue) == 0
    await r.pipeline.finish(ctx)
    assert await r.free(principal)
    if first_ctx is not None:
        r.engine.gate.set()
        await consume(r.pipeline.metered(first_ctx, first))
        await r.pipeline.finish(first_ctx)
    else:
        assert r.engine.cancelled == 1
    assert ("cancelled", 0) in [(s["status"], s["charged"]) for s in r.ledger.settled]
    assert_all_given_back(r)


async def test_a_hang_up_after_routing_but_before_the_body_started_closes_the_stream() -> None:
    r = rig()
    ctx, routed = await r.start(patience=1.0)
    assert isinstance(routed, RoutedStream) and r.replica.in_flight == 1
    await r.pipeline.finish(ctx)
    assert r.engine.cancelled == 1
    [settled] = r.ledger.settled
    assert settled["status"] == "cancelled"
    assert settled["usage"] == Usage(input_tokens=billed_prompt_tokens(ctx), output_tokens=0)  # the prompt was read
    assert_all_given_back(r)


async def test_a_hang_up_after_the_first_token_pays_for_what_was_generated_once() -> None:
    r = rig()
    r.engine.tokens = 50
    principal = limited(concurrent=1)
    ctx, routed = await r.start(principal)
    events = r.pipeline.metered(ctx, routed)
    assert isinstance(await anext(events), TextDelta)
    assert isinstance(await anext(events), TextDelta)
    await events.aclose()  # what the streaming response does when the client goes
    await r.pipeline.finish(ctx)
    await r.drain()
    [settled] = r.ledger.settled
    assert settled["status"] == "cancelled" and settled["usage"].output_tokens == 2
    assert await r.free(principal)
    assert_all_given_back(r)


async def test_an_encoder_closed_while_it_waits_on_the_client_still_pays_for_what_was_generated() -> None:
    """A protocol's encoder closed at its own ``yield`` (the response cancelled inside
    ``send``) leaves the metered stream suspended, not closed; finish() closes it, so the
    settlement carries the usage rather than waiting for the garbage collector."""
    r = rig()
    r.engine.tokens = 50
    ctx, routed = await r.start()

    async def encoder() -> Any:
        async for ev in r.pipeline.metered(ctx, routed):
            yield ev  # a chunk for the socket

    body = encoder()
    for _ in range(3):
        assert isinstance(await anext(body), TextDelta)
    await body.aclose()
    await r.pipeline.finish(ctx)
    await r.drain()
    [settled] = r.ledger.settled
    assert settled["status"] == "cancelled"
    assert settled["usage"] == Usage(input_tokens=billed_prompt_tokens(ctx), output_tokens=3)
    assert_all_given_back(r)


class _Client:
    """An ASGI peer that takes ``reads`` body messages, then stops reading (``send`` blocks,
    as on a full socket) and hangs up."""

    def __init__(self, reads: int) -> None:
        self.reads = reads
        self.bodies = 0
        self.gone = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            self.bodies += 1
            if self.bodies > self.reads:
                self.gone.set()
                await asyncio.Event().wait()  # cancelled by the response when it sees the hang-up

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


@pytest.mark.parametrize("ping", [None, b"event: ping\ndata: {}\n\n"], ids=["plain", "idle-ping"])
async def test_a_client_gone_while_the_response_waits_in_send_pays_for_what_was_generated(ping: bytes | None) -> None:
    r = rig()
    r.engine.tokens = 50
    ctx, routed = await r.start()

    async def encoder() -> Any:
        async for ev in r.pipeline.metered(ctx, routed):
            yield repr(ev).encode()

    async def finish() -> None:
        await r.pipeline.finish(ctx)

    client = _Client(reads=4)
    response = StreamResponse(encoder(), {}, on_close=finish, idle_ping=ping)
    await response({"type": "http"}, client.receive, client.send)  # type: ignore[arg-type]
    await r.drain()
    [settled] = r.ledger.settled
    assert settled["status"] == "cancelled"
    assert 4 <= settled["usage"].output_tokens < 50
    assert_all_given_back(r)


async def test_a_response_whose_body_fails_unexpectedly_still_gives_back_what_the_request_held() -> None:
    r = rig()
    ctx, routed = await r.start()

    async def broken() -> Any:
        async for _ in r.pipeline.metered(ctx, routed):
            raise RuntimeError("a bug in an encoder")
            yield b""

    async def finish() -> None:
        await r.pipeline.finish(ctx)

    client = _Client(reads=100)
    with pytest.raises(RuntimeError, match="a bug in an encoder"):
        await StreamResponse(broken(), {}, on_close=finish)({"type": "http"}, client.receive, client.send)  # type: ignore[arg-type]
    await r.drain()
    assert [s["status"] for s in r.ledger.settled] == ["cancelled"]
    assert_all_given_back(r)


@pytest.mark.parametrize("stream", [True, False])
async def test_an_engine_error_after_the_first_token_bills_only_what_was_delivered(stream: bool) -> None:
    r = rig()
    r.engine.tokens = 10
    r.engine.fail_after = (4, EngineError("the engine broke"))
    ctx, routed = await r.start(stream=stream)
    with pytest.raises(EngineError):
        await consume(r.pipeline.metered(ctx, routed))
    await r.pipeline.finish(ctx)
    await r.drain()
    [settled] = r.ledger.settled
    assert settled["status"] == "error"
    if stream:  # four tokens reached the client
        assert settled["usage"] == Usage(input_tokens=billed_prompt_tokens(ctx), output_tokens=4)
    else:  # the client got only the error
        assert settled["usage"] is None and settled["charged"] == 0
    assert_all_given_back(r)


async def test_a_request_past_its_deadline_while_streaming_ends_with_a_504() -> None:
    r = rig(request_timeout=0.2)
    r.engine.tokens = 5
    r.engine.stall_after = 2
    ctx, routed = await r.start(stream=True)
    with pytest.raises(EngineTimeout) as err:
        await consume(r.pipeline.metered(ctx, routed))
    assert err.value.status == 504 and "deadline" in err.value.message
    await r.pipeline.finish(ctx)
    await r.drain()
    [settled] = r.ledger.settled
    assert settled["status"] == "error" and settled["usage"].output_tokens == 2
    assert_all_given_back(r)


async def test_a_deadline_passing_while_the_client_reads_slowly_ends_the_stream_before_its_next_event() -> None:
    r = rig(request_timeout=0.2)
    r.engine.tokens = 5
    ctx, routed = await r.start(stream=True)
    events = r.pipeline.metered(ctx, routed)
    first = await anext(events)
    await asyncio.sleep(0.3)  # the client is busy elsewhere (not waiting on the engine) past the deadline
    with pytest.raises(EngineTimeout):
        await anext(events)
    assert not isinstance(first, Usage)
    await r.pipeline.finish(ctx)
    await r.drain()
    [settled] = r.ledger.settled
    assert settled["status"] == "error"
    assert_all_given_back(r)


async def test_a_hang_up_at_the_moment_of_the_deadline_stays_a_cancellation() -> None:
    r = rig(request_timeout=0.2)
    r.engine.tokens = 5
    r.engine.stall_after = 1  # routed, then waiting on the engine when the deadline comes
    ctx, routed = await r.start(stream=True)
    task = asyncio.ensure_future(consume(r.pipeline.metered(ctx, routed)))
    loop = asyncio.get_running_loop()
    assert ctx.deadline is not None
    loop.call_at(ctx.deadline, task.cancel)  # the client's cancellation lands with the deadline's
    with pytest.raises(asyncio.CancelledError):
        await task
    await r.pipeline.finish(ctx)
    await r.drain()
    assert_all_given_back(r)


async def test_a_request_past_its_deadline_before_its_first_token_is_a_504_that_costs_nothing() -> None:
    r = rig(request_timeout=0.1)
    r.engine.gate = asyncio.Event()
    with pytest.raises(EngineTimeout):
        await r.start(stream=False)
    assert r.engine.cancelled == 1
    assert [(s["status"], s["charged"]) for s in r.ledger.settled] == [("error", 0)]
    assert_all_given_back(r)


async def test_count_tokens_takes_a_request_of_the_rate_limit_and_gives_its_slot_back() -> None:
    r = rig()
    principal = limited(concurrent=1, rpm=2)
    ctx = RequestContext(request_id="req_c", protocol="test", principal=principal)
    creq: CanonicalRequest = await r.pipeline.resolve(ctx, request(stream=False))
    assert await r.pipeline.count_tokens(ctx, creq) == 7
    assert await r.free(principal)  # the concurrency slot came back (and took the 2nd request)
    with pytest.raises(RateLimited):
        await r.pipeline.count_tokens(RequestContext(request_id="req_d", protocol="test", principal=principal), creq)


class _Lines(AccessLog):
    """The access log, keeping its lines instead of writing them."""

    def __init__(self, sample: float) -> None:
        logger = logging.getLogger("test.access")
        logger.setLevel(logging.INFO)
        super().__init__(logger, sample=sample)
        self.lines: list[dict[str, Any]] = []

    def write(self, msg: str, fields: dict[str, Any]) -> None:
        self.lines.append(fields)


@pytest.mark.parametrize(("protocol", "status", "logged"), [
    ("openai.chat", 503, True),  # the server's failure: always a line
    ("anthropic.messages", 500, True),
    ("openai.chat", 401, False),  # a client's (bad key, rate limit): sampled like a success
    ("openai.chat", 429, False),
    ("workers", 503, False),  # not an inference request
])
async def test_a_request_refused_before_anything_was_held_gets_a_line_unless_sampled_out(
    protocol: str, status: int, logged: bool
) -> None:
    r = rig()
    r.pipeline.access_log = lines = _Lines(sample=0.0)
    ctx = RequestContext(request_id="req_refused", protocol=protocol)
    error = MeshError("refused")
    error.kind, error.status = "some_kind", status
    ctx.status, ctx.error = "error", error
    await r.pipeline.finish(ctx)
    await r.pipeline.finish(ctx)  # finished twice: still one line at most
    assert [(x["request_id"], x["error"]) for x in lines.lines] == ([("req_refused", "some_kind")] if logged else [])
    assert_all_given_back(r)


async def test_a_non_streamed_answer_that_fails_in_the_gateway_costs_nothing() -> None:
    """The endpoint's own failure while folding a non-streamed answer (a 500: the client gets
    no answer) must not be billed as a hang-up that was delivered what was generated."""
    r = rig()
    r.engine.tokens = 10
    ctx, routed = await r.start(stream=False)
    events = r.pipeline.metered(ctx, routed)
    assert isinstance(await anext(events), TextDelta)  # the fold fails on what came next:
    ctx.status = "error"  # what the endpoint records for its 500 (api/endpoint.py)
    await r.pipeline.finish(ctx)  # the response is done: finish closes the metered stream
    await r.drain()
    [settled] = r.ledger.settled
    assert settled["status"] == "error" and settled["usage"] is None and settled["charged"] == 0
    assert_all_given_back(r)
