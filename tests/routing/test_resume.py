"""Resuming a stream on another replica (routing/resume.py) on in-process fakes: what may
resume, the continuation request, the spliced events, and what the pipeline bills."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from typing import Any, Literal

import pytest

from fakes import FakeEngine, FakeLedger, FakePrincipal, request
from mesh.canonical import (
    CanonicalRequest,
    Event,
    Finish,
    Message,
    ReasoningDelta,
    ReasoningPart,
    ResponseFormat,
    TextDelta,
    TextPart,
    ToolArgsDelta,
    ToolCallStart,
    Usage,
)
from mesh.config import ModelConfig, RoutingConfig, Settings
from mesh.errors import EngineError, EngineRejected, EngineTimeout, MeshError
from mesh.observability.metrics import Metrics
from mesh.pipeline import Pipeline, RequestContext
from mesh.routing.pool import ModelPool
from mesh.routing.replica import Replica
from mesh.routing.resume import (
    FAILED,
    FINISHED,
    REFUSED,
    RESUMED,
    Delivered,
    Splice,
    continuation,
    refusal,
)
from mesh.routing.router import RoutedStream, Router

DROPPED = EngineError("Engine a failed: ClientPayloadError.")


def delivered(*events: Event) -> Delivered:
    d = Delivered()
    for ev in events:
        d.observe(ev)
    return d


# -- the pure parts ----------------------------------------------------------------------------


def test_the_continuation_holds_exactly_what_was_delivered_and_the_output_left() -> None:
    d = delivered(ReasoningDelta("Hmm."), TextDelta("Hello"), TextDelta(" wor"), Usage(12, 3))
    follow = continuation(request(), d)
    assert follow is not None and follow.continue_final and follow.max_tokens == 16 - 3
    assert follow.messages[:-1] == request().messages
    assert follow.messages[-1] == Message("assistant", (ReasoningPart("Hmm."), TextPart("Hello wor")))
    # A prefill of the client's own goes on in the same assistant message.
    prefill = CanonicalRequest(model="m", messages=(Message("user", (TextPart("q"),)),
                                                    Message("assistant", (TextPart("The answer:"),))),
                               continue_final=True, max_tokens=5)
    follow = continuation(prefill, delivered(TextDelta(" forty")))
    assert follow is not None and follow.messages[-1] == Message("assistant", (TextPart("The answer: forty"),))
    assert len(follow.messages) == 2 and follow.max_tokens == 4
    # vLLM's extensions: the echo is not sent twice, and min_tokens counts what was delivered.
    extended = replace(request(), extra={"echo": True, "min_tokens": 5, "top_k": 3})
    follow = continuation(extended, delivered(TextDelta("a"), TextDelta("b")))
    assert follow is not None and follow.extra == {"min_tokens": 3, "top_k": 3}
    # Nothing left to generate: no continuation.
    assert continuation(prefill, delivered(*(TextDelta("x") for _ in range(5)))) is None


def test_deltas_count_when_the_engine_reported_less_output() -> None:
    d = delivered(TextDelta("a"), TextDelta("b"), Usage(9, 1), TextDelta("c"))
    assert d.output_tokens == 3 and d.input_tokens == 9 and d.text == "abc"


def test_what_refuses_to_resume() -> None:
    plain = delivered(TextDelta("a"))
    assert refusal(DROPPED, plain, resumes_left=1, can_continue=True) is None
    assert refusal(EngineTimeout("stalled"), plain, resumes_left=1, can_continue=True) is None
    assert refusal(EngineRejected("bad"), plain, resumes_left=1, can_continue=True) == "not_replica_fault"
    answered = EngineError("The engine failed mid-stream: guided decoding failed")
    answered.replica_fault = answered.retryable = False  # a 4xx error chunk mid-stream
    assert refusal(answered, plain, resumes_left=1, can_continue=True) == "not_replica_fault"
    assert refusal(DROPPED, plain, resumes_left=0, can_continue=True) == "limit"
    assert refusal(DROPPED, plain, resumes_left=1, can_continue=False) == "engine_cannot_continue"
    assert refusal(DROPPED, plain, resumes_left=1, can_continue=True, structured=True) == "structured_output"
    tool = delivered(ToolCallStart(0, "call_1", "get"), ToolArgsDelta(0, '{"ci'))
    assert refusal(DROPPED, tool, resumes_left=1, can_continue=True) == "tool_call"
    untracked = delivered(TextDelta("a"))
    untracked.observe(object())  # type: ignore[arg-type]  # e.g. a relayed chunk nobody tracked
    assert refusal(DROPPED, untracked, resumes_left=1, can_continue=True) == "untracked"
    several = delivered(TextDelta("a", choice=0), TextDelta("b", choice=1))
    assert refusal(DROPPED, several, resumes_left=1, can_continue=True) == "several_choices"


def test_the_splice_bills_the_prompt_once_and_each_token_once() -> None:
    before = delivered(TextDelta("a"), TextDelta("b"), Usage(20, 2, cached_tokens=8))
    splice = Splice.after(before)
    # The continuation read the prompt and the 2 delivered tokens again, then wrote 3.
    assert splice.event(Usage(23, 3, cached_tokens=0)) == Usage(20, 5, cached_tokens=8)
    assert splice.reprocessed_tokens == 23
    assert splice.event(TextDelta("c")) == TextDelta("c")
    # Without a first count, the prompt is the continuation's input less the delivered prefix.
    blind = Splice.after(delivered(TextDelta("a"), TextDelta("b")))
    assert blind.event(Usage(23, 3)) == Usage(21, 5)
    tools = Splice.after(delivered(TextDelta("a"), ToolCallStart(0, "c0", "f")))
    assert tools.event(ToolCallStart(0, "c1", "g")) == ToolCallStart(1, "c1", "g")
    assert tools.event(ToolArgsDelta(0, "{}")) == ToolArgsDelta(1, "{}")


# -- the router ----------------------------------------------------------------------------------


def fleet(*engines: FakeEngine, max_resumes: int = 1) -> tuple[Router, list[Replica]]:
    """A router over ``engines`` that always picks the first candidate (r0 first)."""
    replicas = [Replica(e) for e in engines]
    router = Router({"m": ModelPool(ModelConfig(id="m"), replicas)}, max_resumes=max_resumes)
    router.policy.pick = lambda candidates, req, owner: (candidates[0], "test")  # type: ignore[method-assign]
    return router, replicas


def engines(n: int, tokens: int = 6) -> list[FakeEngine]:
    out = []
    for i in range(n):
        e = FakeEngine(f"r{i}", tokens=tokens)
        e.continues_final = True
        out.append(e)
    return out


async def run(router: Router, req: CanonicalRequest | None = None) -> tuple[RoutedStream, list[Event]]:
    stream = await router.open(req or request(), "acct")
    return stream, [ev async for ev in stream]


def text(events: list[Event]) -> str:
    return "".join(ev.text for ev in events if isinstance(ev, TextDelta))


async def test_a_stream_whose_replica_drops_goes_on_elsewhere_with_no_gap() -> None:
    es = engines(2)
    router, replicas = fleet(*es)
    _, whole = await run(router)
    es[0].fail_after = (2, DROPPED)  # r0 drops at t2
    stream, events = await run(router)
    assert text(events) == text(whole) == "t0 t1 t2 t3 t4 t5 "
    assert [type(ev).__name__ for ev in events].count("Finish") == 1
    assert events[-1] == Usage(input_tokens=10, output_tokens=6)  # prompt once, each token once
    [record] = stream.resumes
    assert record.outcome == RESUMED and record.delivered_tokens == 2 and record.from_replica != record.to_replica
    assert stream.reprocessed_tokens == 12  # the continuation read 10 + the 2 delivered again
    served = next(e for e in es if e.name == record.to_replica)
    follow = served.requests[-1]
    assert follow.continue_final and follow.max_tokens == 14
    assert follow.messages[-1] == Message("assistant", (TextPart("t0 t1 "),))
    failed = next(r for r in replicas if r.name == record.from_replica)
    assert failed.failures == 1  # counted against the replica that broke, like any broken stream
    assert all(r.in_flight == 0 for r in replicas) and router.pools["m"].reserved == 0
    assert all(e.open == 0 for e in es)


async def test_a_resume_never_lands_on_the_replica_that_failed() -> None:
    es = engines(2)
    router, replicas = fleet(*es, max_resumes=3)
    es[1].healthy = False
    replicas[1].up = False  # only the failing one is left
    es[0].fail_after = (2, DROPPED)
    with pytest.raises(EngineError):
        stream = await router.open(request(), "acct")
        async for _ in stream:
            pass
    [record] = stream.resumes
    assert record.outcome == FAILED and record.reason == "unavailable"
    assert es[0].started == 1 and replicas[0].in_flight == 0


async def test_resumes_are_bounded_per_request() -> None:
    es = engines(3)
    for e in es:
        e.fail_after = (2, DROPPED)
    router, replicas = fleet(*es, max_resumes=1)
    stream = await router.open(request(), "acct")
    got: list[Event] = []
    with pytest.raises(EngineError):
        async for ev in stream:
            got.append(ev)
    assert text(got) == "t0 t1 t2 t3 "  # two from each of the two replicas it reached
    assert [r.outcome for r in stream.resumes] == [RESUMED, REFUSED]
    assert stream.resumes[1].reason == "limit" and stream.resumes[1].delivered_tokens == 4
    assert all(r.in_flight == 0 for r in replicas) and sum(e.started for e in es) == 2


async def test_no_resume_for_engines_that_cannot_continue_nor_for_answered_errors() -> None:
    es = engines(2)
    es[1].continues_final = False
    router, _ = fleet(*es)
    for e in es:
        e.fail_after = (2, DROPPED)
    stream = await router.open(request(), "acct")
    with pytest.raises(EngineError):
        async for _ in stream:
            pass
    assert [(r.outcome, r.reason) for r in stream.resumes] == [(REFUSED, "engine_cannot_continue")]
    answered = EngineError("The engine answered HTTP 500.")
    answered.replica_fault = False
    es = engines(2)
    es[0].fail_after = (2, answered)
    router, _ = fleet(*es)
    stream = await router.open(request(), "acct")
    with pytest.raises(EngineError):
        async for _ in stream:
            pass
    assert [(r.outcome, r.reason) for r in stream.resumes] == [(REFUSED, "not_replica_fault")]
    assert es[1].started == 0


class ToolThenDrop(FakeEngine):
    async def stream(self, request: CanonicalRequest) -> AsyncIterator[Event]:
        self.started += 1
        yield ToolCallStart(0, "call_1", "get_weather")
        yield ToolArgsDelta(0, '{"ci')
        raise DROPPED


class FinishThenDrop(FakeEngine):
    async def stream(self, request: CanonicalRequest) -> AsyncIterator[Event]:
        self.started += 1
        yield TextDelta("done")
        yield Usage(7, 1)
        yield Finish("stop")
        raise DROPPED


async def test_a_drop_mid_tool_call_ends_the_stream_and_one_after_the_finish_ends_it_whole() -> None:
    spare = engines(1)[0]
    tool = ToolThenDrop("tool")
    tool.continues_final = True
    router, _ = fleet(tool, spare)
    stream = await router.open(request(), "acct")
    with pytest.raises(EngineError):
        async for _ in stream:
            pass
    assert [(r.outcome, r.reason) for r in stream.resumes] == [(REFUSED, "tool_call")] and spare.started == 0
    ended = FinishThenDrop("fin")
    router, _ = fleet(ended, spare)
    stream, events = await run(router)
    assert events == [TextDelta("done"), Usage(7, 1), Finish("stop"), Usage(7, 1)]
    assert [r.outcome for r in stream.resumes] == [FINISHED] and spare.started == 0


async def test_a_resume_that_finds_no_replica_in_time_fails() -> None:
    es = engines(2)
    es[0].fail_after = (2, DROPPED)
    es[1].gate = asyncio.Event()  # never answers
    router, replicas = fleet(*es)
    router.resume_timeout = 0.05
    stream = await router.open(request(), "acct")
    with pytest.raises(EngineError):
        async for _ in stream:
            pass
    assert [(r.outcome, r.reason) for r in stream.resumes] == [(FAILED, "timeout")]
    assert all(r.in_flight == 0 for r in replicas) and es[1].open == 0


# -- the pipeline: billing, metric and log line ----------------------------------------------------


async def test_the_pipeline_bills_a_resumed_answer_once_and_counts_the_resume(
    caplog: pytest.LogCaptureFixture,
) -> None:
    es = engines(2)
    es[0].fail_after = (2, DROPPED)
    router, replicas = fleet(*es)
    ledger = FakeLedger()
    metrics = Metrics()
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    pipeline = Pipeline(Settings(catalog=False), router, authenticator=None, ledger=ledger,  # type: ignore[arg-type]
                        spawn=spawn, metrics=metrics)
    for stream in (True, False):
        ctx = RequestContext(request_id=f"req_resume_{stream}", protocol="test")
        ctx.principal = FakePrincipal()
        _, routed = await pipeline.start(ctx, request(stream=stream))
        with caplog.at_level("INFO", logger="mesh.pipeline"):
            events = [ev async for ev in pipeline.metered(ctx, routed)]
        await pipeline.finish(ctx)
        assert text(events) == "t0 t1 t2 t3 t4 t5 "
        settled = ledger.settled[-1]
        assert settled["status"] == "ok" and settled["usage"] == Usage(input_tokens=10, output_tokens=6)
    while tasks:
        await asyncio.gather(*list(tasks))
    assert ledger.holds == {} and all(r.in_flight == 0 for r in replicas)
    assert metrics.stream_resumes.labels("m", RESUMED)._value.get() == 2
    assert metrics.resume_reprocessed.labels("m")._value.get() == 24
    lines = [r for r in caplog.records if r.getMessage() == "request"]
    assert lines[-1].resume_outcome == RESUMED and lines[-1].reprocessed_tokens == 12  # type: ignore[attr-defined]
    assert "resumed r" in lines[-1].resume  # type: ignore[attr-defined]


async def test_structured_output_does_not_resume() -> None:
    es = engines(2)
    es[0].fail_after = (2, DROPPED)
    router, _ = fleet(*es)
    req = CanonicalRequest(model="m", messages=request().messages, stream=True, max_tokens=16,
                           response_format=ResponseFormat("json_object"))
    stream = await router.open(req, "acct")
    with pytest.raises(EngineError):
        async for _ in stream:
            pass
    assert [(r.outcome, r.reason) for r in stream.resumes] == [(REFUSED, "structured_output")]
    assert es[1].started == 0


class Watched(asyncio.Event):
    """An event that tells when someone starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()

    async def wait(self) -> Literal[True]:
        self.waiting.set()
        return await super().wait()


async def test_a_client_that_leaves_while_the_resume_waits_gives_everything_back() -> None:
    es = engines(2)
    es[0].fail_after = (2, DROPPED)
    es[1].gate = gate = Watched()  # the continuation's first token never comes
    router, replicas = fleet(*es)
    stream = await router.open(request(), "acct")
    got: list[Event] = []

    async def read() -> None:
        async for ev in stream:
            got.append(ev)

    task = asyncio.create_task(read())
    await gate.waiting.wait()  # the continuation was sent to r1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert text(got) == "t0 t1 "
    assert [(r.outcome, r.reason) for r in stream.resumes] == [(FAILED, "cancelled")]
    assert all(r.in_flight == 0 for r in replicas) and router.pools["m"].reserved == 0
    assert es[0].open == 0 and es[1].open == 0


async def test_several_choices_never_resume_even_when_only_the_first_had_output() -> None:
    # Engines interleave choices, and a drop can come before the second choice's first delta:
    # a continuation would then hand every choice the first one's prefix.
    es = engines(2)
    router, replicas = fleet(*es)
    es[0].fail_after = (2, DROPPED)  # the fake streams only choice 0: nothing of choice 1 yet
    stream = await router.open(replace(request(), n=2), "acct")
    with pytest.raises(EngineError):
        async for _ in stream:
            pass
    [record] = stream.resumes
    assert (record.outcome, record.reason) == (REFUSED, "several_choices")
    assert es[1].started == 0 and all(r.in_flight == 0 for r in replicas)


async def test_a_replica_that_drops_every_stream_is_taken_out_by_its_breaker() -> None:
    # Each drop makes another replica read the prompt again (the operator's cost): a replica
    # that drops on purpose after its first token must not get a fresh stream every time.
    es = engines(2)
    router, replicas = fleet(*es)  # always tries r0 first
    es[0].fail_after = (1, DROPPED)
    answers = [text((await run(router))[1]) for _ in range(10)]
    assert answers == ["t0 t1 t2 t3 t4 t5 "] * 10  # every client got its whole answer
    assert es[0].started == replicas[0].breaker.failure_threshold  # then its breaker took it out
    assert all(r.in_flight == 0 for r in replicas) and router.pools["m"].reserved == 0


async def test_a_resume_goes_on_when_every_other_replica_is_at_its_capacity() -> None:
    # A replica dying under full load is when resuming matters most. The answer keeps its
    # pool slot, so continuing on a full replica moves load rather than adding to the pool's.
    es = engines(2)
    router, replicas = fleet(*es)
    for r in replicas:
        r.capacity = 1
    es[0].fail_after = (2, DROPPED)
    es[1].stall_after = 4  # the other replica's own stream stays open
    mine = await router.open(request(), "acct")  # r0
    other = await router.open(request(), "acct")  # r1: r0 is full
    assert (mine.replica, other.replica) == (replicas[0], replicas[1])
    es[1].stall_after = None
    assert text([ev async for ev in mine]) == "t0 t1 t2 t3 t4 t5 "
    assert [r.outcome for r in mine.resumes] == [RESUMED]
    await other.aclose()
    assert all(r.in_flight == 0 for r in replicas) and router.pools["m"].reserved == 0


async def test_a_deadline_that_passes_mid_resume_bills_what_was_delivered_and_gives_back_the_rest() -> None:
    es = engines(2)
    es[0].fail_after = (2, DROPPED)
    es[1].gate = gate = Watched()  # the continuation's first token never comes
    router, replicas = fleet(*es)
    ledger = FakeLedger()
    spawned: list[asyncio.Task[Any]] = []
    pipeline = Pipeline(Settings(catalog=False, routing=RoutingConfig(request_timeout=0.5)), router,
                        authenticator=None, ledger=ledger,  # type: ignore[arg-type]
                        spawn=lambda c: spawned.append(asyncio.get_running_loop().create_task(c)))
    ctx = RequestContext(request_id="req_deadline", protocol="test")
    ctx.principal = FakePrincipal()
    _, routed = await pipeline.start(ctx, request())
    got: list[Event] = []
    with pytest.raises(MeshError) as caught:
        async for ev in pipeline.metered(ctx, routed):
            got.append(ev)
    await pipeline.finish(ctx)
    await asyncio.gather(*spawned)
    assert caught.value.status == 504 and gate.waiting.is_set()  # it was waiting on the continuation
    assert text(got) == "t0 t1 "
    [settled] = ledger.settled
    assert settled["status"] == "error" and settled["usage"].output_tokens == 2  # what was delivered
    assert ledger.holds == {}
    assert ctx.routed is not None and [r.outcome for r in ctx.routed.resumes] == [FAILED]
    assert all(r.in_flight == 0 for r in replicas) and router.pools["m"].reserved == 0
    assert es[0].open == 0 and es[1].open == 0
