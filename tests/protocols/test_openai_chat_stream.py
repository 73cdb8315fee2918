"""Chat Completions streaming on both paths: the relay (engine chunks rewritten) and the
canonical (chunks decoded into events and encoded again), from the same engine transcripts.

Golden files live in ``golden/``; regenerate them with ``MESH_UPDATE_GOLDEN=1`` and review
the diff by eye. Both paths must give a client the same answer.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest

from mesh.canonical import Event, Finish, Relayed, TextDelta, Usage
from mesh.engines.openai_relay import RelayDecoder
from mesh.engines.openai_wire import ChunkDecoder
from mesh.errors import EngineError
from mesh.http.streaming import LastChunk
from mesh.protocols.openai_chat import StreamMeta, encode_stream
from mesh.routing.resume import Delivered

GOLDEN = Path(__file__).parent / "golden"
ENGINE_MODEL = "org/engine-internal-name"
ENGINE_ID = "chatcmpl-engine-0001"


def meta(include_usage: bool = False, fields: tuple[str, ...] = ("reasoning_content",)) -> StreamMeta:
    return StreamMeta(id="chatcmpl-test", created=1700000000, model="test-model", include_usage=include_usage,
                      usage_extras=lambda u: {"cost": str(u.total_tokens)}, reasoning_fields=fields)


def chunk(*choices: dict[str, Any], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": ENGINE_ID, "object": "chat.completion.chunk", "created": 1, "model": ENGINE_MODEL,
                            "choices": list(choices)}
    if usage is not None:
        body["usage"] = usage
    return body


def delta(index: int = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "logprobs": None, "finish_reason": finish}


USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
# What vLLM sends: a role chunk, reasoning under its newer field name, text, a finish, then usage alone.
REASONING_TEXT = [
    chunk(delta(role="assistant", content="")),
    chunk(delta(reasoning="Let me think.")),
    chunk(delta(reasoning=" Done.")),
    chunk(delta(content="Hello")),
    chunk(delta(content=" world")),
    chunk(delta(finish="stop", content="")),
    chunk(usage=USAGE),
]
# Two tool calls, the second's arguments in pieces; the engine numbers them 0 and 1.
TOOLS = [
    chunk(delta(role="assistant", content=None)),
    chunk(delta(tool_calls=[{"index": 0, "id": "call_a", "type": "function",
                             "function": {"name": "get_weather", "arguments": ""}}])),
    chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}])),
    chunk(delta(tool_calls=[{"index": 1, "id": "call_b", "type": "function",
                             "function": {"name": "get_time", "arguments": '{"zone"'}}])),
    chunk(delta(tool_calls=[{"index": 1, "function": {"arguments": ': "CET"}'}}])),
    chunk(delta(finish="tool_calls")),
    chunk(usage={"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39}),
]
# n=2 with usage on every chunk (vLLM's continuous_usage_stats) and a finish reason to map.
TWO_CHOICES = [
    chunk(delta(0, role="assistant", content=""), delta(1, role="assistant", content="")),
    chunk(delta(0, content="A"), usage={"prompt_tokens": 4, "completion_tokens": 1}),
    chunk(delta(1, content="B"), usage={"prompt_tokens": 4, "completion_tokens": 2}),
    chunk(delta(0, finish="eos"), delta(1, finish="length"), usage={"prompt_tokens": 4, "completion_tokens": 2}),
]
TRANSCRIPTS = {"reasoning_text": REASONING_TEXT, "tools": TOOLS, "two_choices": TWO_CHOICES}


def decoded(chunks: Iterable[dict[str, Any]], relay: bool) -> list[Event]:
    decoder = RelayDecoder() if relay else ChunkDecoder()
    events = [ev for c in copy.deepcopy(list(chunks)) for ev in decoder.decode(c)]
    return [*events, decoder.final_usage()]


async def _feed(items: Iterable[Event], fail: Exception | None) -> AsyncIterator[Event]:
    for ev in items:
        yield ev
    if fail is not None:
        raise fail


def encode(events: Iterable[Event], m: StreamMeta, fail: Exception | None = None) -> bytes:
    async def run() -> bytes:
        return b"".join([c async for c in encode_stream(_feed(events, fail), m)])

    return asyncio.run(run())


def data_lines(raw: bytes) -> list[str]:
    blocks = [b for b in raw.decode().split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    return [b[6:] for b in blocks]


def accumulate(raw: bytes) -> dict[str, Any]:
    """What a client builds from the stream: per choice text, reasoning, tool calls, finish."""
    out: dict[int, dict[str, Any]] = {}
    usage = None
    for line in data_lines(raw)[:-1]:
        body = json.loads(line)
        usage = body.get("usage") or usage
        for c in body["choices"]:
            acc = out.setdefault(c["index"], {"text": "", "reasoning": "", "calls": {}, "finish": None})
            d = c["delta"]
            acc["text"] += d.get("content") or ""
            acc["reasoning"] += d.get("reasoning_content") or ""
            for call in d.get("tool_calls") or ():
                slot = acc["calls"].setdefault(call["index"], {"id": None, "name": "", "args": ""})
                slot["id"] = call.get("id") or slot["id"]
                slot["name"] += call.get("function", {}).get("name") or ""
                slot["args"] += call.get("function", {}).get("arguments") or ""
            acc["finish"] = c["finish_reason"] or acc["finish"]
    return {"choices": out, "usage": usage}


def check_golden(name: str, raw: bytes) -> None:
    path = GOLDEN / name
    if os.environ.get("MESH_UPDATE_GOLDEN"):
        path.write_bytes(raw)
    assert raw == path.read_bytes()


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
@pytest.mark.parametrize("relay", [True, False], ids=["relay", "canonical"])
def test_golden_transcripts(relay: bool, name: str, include_usage: bool) -> None:
    raw = encode(decoded(TRANSCRIPTS[name], relay), meta(include_usage))
    path = "relay" if relay else "canonical"
    check_golden(f"openai_chat_{name}_{path}{'_usage' if include_usage else ''}.sse", raw)


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_relay_and_canonical_give_the_client_the_same_answer(name: str, include_usage: bool) -> None:
    relay = accumulate(encode(decoded(TRANSCRIPTS[name], True), meta(include_usage)))
    canonical = accumulate(encode(decoded(TRANSCRIPTS[name], False), meta(include_usage)))
    assert relay == canonical
    assert relay["choices"]


def batched(chunks: Iterable[dict[str, Any]]) -> list[Event]:
    """The relay path as the engine runs it: every chunk read in one piece, then [DONE]."""
    decoder = RelayDecoder()
    events, done = decoder.decode_batch([orjson.dumps(c) for c in chunks] + [b"[DONE]", b"{not json"])
    assert done
    return [*events, decoder.final_usage()]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_chunks_read_together_are_written_together_and_say_the_same(name: str, include_usage: bool) -> None:
    events = batched(TRANSCRIPTS[name])
    relayed = [ev for ev in events if isinstance(ev, Relayed)]
    assert len(relayed) == 1 and relayed[0].answers
    assert relayed[0].deltas == sum(ev.deltas for ev in decoded(TRANSCRIPTS[name], True) if isinstance(ev, Relayed))
    raw = encode(events, meta(include_usage))
    assert raw == encode(decoded(TRANSCRIPTS[name], True), meta(include_usage))  # byte for byte
    assert accumulate(raw) == accumulate(encode(decoded(TRANSCRIPTS[name], False), meta(include_usage)))


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_relay_rewrites_ids_model_and_hides_the_engine(name: str) -> None:
    raw = encode(decoded(TRANSCRIPTS[name], True), meta())
    assert ENGINE_MODEL.encode() not in raw and ENGINE_ID.encode() not in raw
    lines = data_lines(raw)
    assert lines[-1] == "[DONE]"
    for line in lines[:-1]:
        body = json.loads(line)
        assert (body["id"], body["model"], body["created"], body["object"]) == (
            "chatcmpl-test", "test-model", 1700000000, "chat.completion.chunk")
        assert "usage" not in body  # the client did not ask for usage


def test_relay_sends_none_of_the_engine_s_own_envelope_fields() -> None:
    chunks = [{**chunk(delta(content="hi")), "kv_transfer_params": {"remote": "10.0.0.7"}, "service_tier": "x"},
              chunk(delta(finish="stop"))]
    raw = encode(decoded(chunks, True), meta())
    assert b"kv_transfer_params" not in raw and b"service_tier" not in raw and b"10.0.0.7" not in raw
    assert json.loads(data_lines(raw)[0])["choices"][0]["delta"] == {"content": "hi"}


def test_relay_usage_only_when_asked_and_then_mesh_s_own_in_the_last_chunk() -> None:
    lines = data_lines(encode(decoded(REASONING_TEXT, True), meta(include_usage=True)))
    bodies = [json.loads(line) for line in lines[:-1]]
    assert all(b["usage"] is None for b in bodies[:-1])
    assert bodies[-1]["choices"] == []
    assert bodies[-1]["usage"]["prompt_tokens"] == 12 and bodies[-1]["usage"]["completion_tokens"] == 5
    assert bodies[-1]["usage"]["cost"] == "17"  # Mesh's extras: the engine's usage chunk never reaches the client
    assert bodies[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}


@pytest.mark.parametrize("fields", [("reasoning_content",), ("reasoning",), ("reasoning_content", "reasoning")])
@pytest.mark.parametrize("engine_field", ["reasoning", "reasoning_content"])
def test_relay_puts_reasoning_under_the_fields_the_client_reads(fields: tuple[str, ...], engine_field: str) -> None:
    chunks = [chunk(delta(**{engine_field: "hmm"})), chunk(delta(finish="stop"))]
    body = json.loads(data_lines(encode(decoded(chunks, True), meta(fields=fields)))[0])
    assert body["choices"][0]["delta"] == dict.fromkeys(fields, "hmm")


def test_relay_engine_error_mid_stream_ends_with_the_error_event() -> None:
    events = decoded(REASONING_TEXT[:4], True)[:-1]
    lines = data_lines(encode(events, meta(), fail=EngineError("The engine failed mid-stream: boom")))
    assert lines[-1] != "[DONE]"
    error = json.loads(lines[-1])["error"]
    assert error["type"] == "server_error" and "boom" in error["message"]


def test_relay_decoder_counts_deltas_as_the_canonical_decoder_does() -> None:
    for chunks in TRANSCRIPTS.values():
        relay, canonical = RelayDecoder(), ChunkDecoder()
        relayed = [ev for c in copy.deepcopy(chunks) for ev in relay.decode(c)]
        events = [ev for c in copy.deepcopy(chunks) for ev in canonical.decode(c)]
        assert relay.output_deltas == canonical.output_deltas
        assert sum(ev.deltas for ev in relayed if isinstance(ev, Relayed)) == canonical.output_deltas
        assert relay.final_usage() == canonical.final_usage()
        assert [ev for ev in relayed if isinstance(ev, Usage)] == [ev for ev in events if isinstance(ev, Usage)]


def test_relay_decoder_marks_what_answers() -> None:
    decoder = RelayDecoder()
    role, first = (list(decoder.decode(copy.deepcopy(c))) for c in REASONING_TEXT[:2])
    assert isinstance(role[0], Relayed) and not role[0].answers
    assert isinstance(first[0], Relayed) and first[0].answers and first[0].deltas == 1


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_a_resume_tracker_reads_relayed_chunks_as_it_reads_events(name: str) -> None:
    relayed, canonical = Delivered(), Delivered()
    for ev in decoded(TRANSCRIPTS[name], True):
        relayed.observe(ev)
    for ev in decoded(TRANSCRIPTS[name], False):
        canonical.observe(ev)
    assert not relayed.opaque
    fields = ("text", "reasoning", "choices", "tool_calls", "finished", "deltas", "output_tokens", "input_tokens")
    assert [getattr(relayed, f) for f in fields] == [getattr(canonical, f) for f in fields]


def test_a_tool_call_repeating_its_id_is_still_one_call() -> None:
    call = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}
    again = {"index": 0, "id": "call_a", "type": "function", "function": {"arguments": "{}"}}
    tracker = Delivered()
    for ev in decoded([chunk(delta(tool_calls=[call])), chunk(delta(tool_calls=[again]))], True):
        tracker.observe(ev)
    assert tracker.tool_calls == 1 and tracker.deltas == 1


def test_relay_decoder_names_and_numbers_tool_calls_the_engine_left_bare() -> None:
    decoder = RelayDecoder()
    c = chunk(delta(tool_calls=[{"function": {"name": "f", "arguments": "{}"}},
                                {"index": 7, "function": {"name": "g", "arguments": "{}"}}]))
    (ev,) = decoder.decode(c)
    assert isinstance(ev, Relayed) and ev.deltas == 2
    calls = ev.chunks[0]["choices"][0]["delta"]["tool_calls"]
    assert [(x["index"], x["id"], x["type"]) for x in calls] == [
        (0, "call_0_0", "function"), (1, "call_0_1", "function")]


@pytest.mark.parametrize("bad", [
    chunk(delta(finish="abort")),
    {"error": {"message": "out of memory"}},
])
def test_relay_decoder_raises_engine_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(EngineError):
        list(RelayDecoder().decode(bad))


@pytest.mark.parametrize(("code", "resumable"), [(500, True), (400, False)])
def test_an_engine_error_event_is_judged_the_same_on_both_paths(code: int, resumable: bool) -> None:
    bad = {"error": {"message": "boom", "code": code}}
    for decoder in (RelayDecoder(), ChunkDecoder()):
        with pytest.raises(EngineError) as err:
            decoder.decode_batch([orjson.dumps(bad)])
        assert (err.value.replica_fault, err.value.retryable) == (resumable, resumable)


@pytest.mark.parametrize("relay", [True, False], ids=["relay", "canonical"])
def test_an_error_read_together_with_output_comes_after_that_output(relay: bool) -> None:
    decoder = RelayDecoder() if relay else ChunkDecoder()
    payloads = [orjson.dumps(chunk(delta(content="tok0"))), orjson.dumps({"error": {"message": "boom", "code": 500}}),
                orjson.dumps(chunk(delta(content="never")))]
    events, done = decoder.decode_batch(payloads)
    assert not done and events and decoder.failure is not None and "boom" in decoder.failure.message
    assert b"never" not in encode(events, meta())


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("fail", [None, EngineError("engine fell over")])
async def test_the_closing_event_alone_is_the_last_chunk(include_usage: bool, fail: Exception | None) -> None:
    # [DONE] (with the usage chunk before it) or the in-band error goes out with the
    # response's end (http/streaming.py); nothing before it is marked.
    async def events() -> AsyncIterator[Event]:
        yield TextDelta("Hi")
        yield Finish("stop")
        yield Usage(input_tokens=3, output_tokens=1)
        if fail is not None:
            raise fail

    chunks = [c async for c in encode_stream(events(), meta(include_usage))]
    assert [type(c) for c in chunks[:-1]] == [bytes] * (len(chunks) - 1)
    last = chunks[-1]
    assert type(last) is LastChunk
    if fail is not None:
        assert b"engine fell over" in last and b"[DONE]" not in last
    else:
        assert last.endswith(b"data: [DONE]\n\n") and (b'"usage":{' in last) == include_usage
