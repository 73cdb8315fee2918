"""OpenAI Responses: parsing into canonical requests, rendering, and the typed event stream.

Golden transcripts live in ``golden/``; regenerate them with ``MESH_UPDATE_GOLDEN=1`` and
review the diff by eye. Every event and response object is also validated against
openai-python's own (pydantic) types, and streams are replayed through the SDK's
``responses.stream()`` accumulator.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from mesh.canonical import (
    Aggregator,
    Event,
    Finish,
    ImagePart,
    ReasoningDelta,
    ReasoningPart,
    TextDelta,
    TextPart,
    TokenLogprob,
    ToolArgsDelta,
    ToolCallPart,
    ToolCallStart,
    ToolResultPart,
    Usage,
)
from mesh.errors import EngineError, InvalidRequest, RateLimited
from mesh.http.streaming import LastChunk
from mesh.protocols import openai_responses as r
from mesh.protocols.openai_responses_items import decode_reasoning, encode_reasoning

GOLDEN = Path(__file__).parent / "golden"
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
RESPONSE = TypeAdapter(Response)
WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
TIME = {"type": "function", "name": "get_time", "description": "Now", "parameters": None, "strict": False}


def parse(**body: Any) -> r.ResponsesCall:
    return r.parse_request(orjson.dumps({"model": "test-model", **body}))


def build(history: Iterable[dict[str, Any]] = (), referenced: dict[str, Any] | None = None, **body: Any) -> Any:
    return r.build_request(parse(**body), list(history), referenced)


def bad(**body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        build(**body)
    return info.value


def counter() -> Callable[[str], str]:
    n = itertools.count(1)
    return lambda prefix: f"{prefix}{next(n)}"


def meta(call: r.ResponsesCall | None = None, **fields: Any) -> r.ResponseMeta:
    base = r.response_meta(call or parse(input="hi"), id="resp_test", created_at=1735689600, model="test-model",
                           store=True, usage_extras=lambda u: {"cost": "0.000001"})
    return r.ResponseMeta(**{**{f: getattr(base, f) for f in base.__dataclass_fields__},
                             "new_id": counter(), "clock": lambda: 1735689601.0, **fields})


# ---- parse: input items -------------------------------------------------------------------------


def test_parse_string_input_is_one_user_message_and_instructions_lead() -> None:
    creq, stored = build(input="hello", instructions="Be brief.")
    assert [(m.role, m.text) for m in creq.messages] == [("system", "Be brief."), ("user", "hello")]
    assert len(stored) == 1 and stored[0]["role"] == "user"
    assert stored[0]["content"] == [{"type": "input_text", "text": "hello"}]
    assert stored[0]["id"].startswith("msg_") and stored[0]["status"] == "completed"


def test_parse_easy_and_typed_messages_with_images() -> None:
    creq, stored = build(input=[
        {"role": "developer", "content": "dev"},
        {"role": "system", "content": [{"type": "input_text", "text": "sys"}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "look"},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "a cat", "annotations": []}]},
        {"role": "user", "content": "and?"},
    ])
    assert [m.role for m in creq.messages] == ["system", "system", "user", "assistant", "user"]
    assert creq.messages[2].parts == (TextPart("look"), ImagePart("data:image/png;base64,iVBORw0KGgo=", "low"))
    assert creq.messages[3].parts == (TextPart("a cat"),)
    assert stored[3]["id"] == "msg_1"


def test_parse_tool_loop_items_become_assistant_calls_and_tool_results() -> None:
    creq, _ = build(tools=[WEATHER, TIME], input=[
        {"role": "user", "content": "both"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "21C"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "noon"}]},
    ])
    assert [m.role for m in creq.messages] == ["user", "assistant", "tool", "tool"]
    assert creq.messages[1].parts == (
        ToolCallPart("call_1", "get_weather", "{}"), ToolCallPart("call_2", "get_time", "{}")
    )
    assert creq.messages[3].parts == (ToolResultPart("call_2", (TextPart("noon"),)),)


@pytest.mark.parametrize(
    ("reasoning", "expected"),
    [
        ({"summary": [], "content": [{"type": "reasoning_text", "text": "raw"}]}, "raw"),
        ({"summary": [], "encrypted_content": encode_reasoning("from blob")}, "from blob"),
        ({"summary": [{"type": "summary_text", "text": "short"}], "encrypted_content": "gAAAA-foreign"}, "short"),
        ({"summary": [], "encrypted_content": None}, None),
    ],
)
def test_parse_reasoning_items_go_to_the_next_assistant_turn(reasoning: dict[str, Any], expected: str | None) -> None:
    creq, stored = build(tools=[WEATHER], input=[
        {"role": "user", "content": "q"},
        {"type": "reasoning", **reasoning},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ])
    parts = creq.messages[1].parts
    assert parts[-1] == ToolCallPart("c1", "get_weather", "{}")
    assert (parts[0] == ReasoningPart(expected)) if expected else len(parts) == 1
    assert stored[1]["type"] == "reasoning" and stored[1]["id"].startswith("rs_")


def test_encrypted_reasoning_round_trips_and_ignores_foreign_blobs() -> None:
    assert decode_reasoning(encode_reasoning("ünïcode ✓")) == "ünïcode ✓"
    assert decode_reasoning("gAAAAABfake") is None
    assert decode_reasoning("mesh.r1.***") is None


def test_parse_hosted_items_are_kept_for_storage_but_not_sent() -> None:
    creq, stored = build(input=[
        {"role": "user", "content": "search"},
        {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search"}},
        {"type": "local_shell_call", "call_id": "ls_1", "status": "completed", "action": {"type": "exec"}},
        {"role": "user", "content": "thanks"},
    ])
    assert [m.role for m in creq.messages] == ["user", "user"]
    assert stored[1] == {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search"}}


def test_parse_history_comes_first_and_references_resolve() -> None:
    history = [
        {"type": "message", "id": "u1", "role": "user", "content": [{"type": "input_text", "text": "before"}]},
        {"type": "message", "id": "m1", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
    ]
    referenced = {"u0": {"type": "message", "id": "u0", "role": "user",
                         "content": [{"type": "input_text", "text": "quoted"}]}}
    creq, stored = build(history, referenced, input=[{"type": "item_reference", "id": "u0"}], instructions="sys")
    assert [(m.role, m.text) for m in creq.messages] == [
        ("system", "sys"), ("user", "before"), ("assistant", "ok"), ("user", "quoted")
    ]
    assert stored == [referenced["u0"] | {"status": "completed"}]


# ---- parse: everything else ---------------------------------------------------------------------


def test_parse_hosted_tools_are_dropped_and_not_echoed() -> None:
    call = parse(input="x", tools=[
        WEATHER, {"type": "web_search"}, {"type": "local_shell"},
        {"type": "namespace", "name": "mcp__fs", "description": "files", "tools": [WEATHER]},
        {"type": "custom", "name": "apply_patch", "format": {"type": "grammar"}},
    ])
    creq, _ = r.build_request(call)
    assert [t.name for t in creq.tools] == ["get_weather"]
    assert creq.tool_choice is not None and creq.tool_choice.mode == "auto"
    assert [t["name"] for t in meta(call).echo["tools"]] == ["get_weather"]


@pytest.mark.parametrize(
    ("choice", "mode", "name", "tools"),
    [
        ("none", "none", None, ["get_weather", "get_time"]),
        ("required", "required", None, ["get_weather", "get_time"]),
        ({"type": "function", "name": "get_time"}, "function", "get_time", ["get_weather", "get_time"]),
        ({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]},
         "required", None, ["get_time"]),
    ],
)
def test_parse_tool_choice(choice: Any, mode: str, name: str | None, tools: list[str]) -> None:
    creq, _ = build(input="x", tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False)
    assert creq.tool_choice is not None and (creq.tool_choice.mode, creq.tool_choice.name) == (mode, name)
    assert [t.name for t in creq.tools] == tools
    assert creq.parallel_tool_calls is False


def test_parse_settings_reach_the_canonical_request() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    creq, _ = build(
        input="x", max_output_tokens=50, temperature=0.3, top_p=0.9, reasoning={"effort": "low", "summary": "auto"},
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
        metadata={"k": "v"}, user="u", safety_identifier="s", include=["message.output_text.logprobs"],
        top_logprobs=2, top_k=5, chat_template_kwargs={"enable_thinking": False}, unknown_field=1, store=False,
        truncation="auto", prompt_cache_key="p", service_tier="auto",
    )
    assert creq.max_tokens == 50 and creq.sampling.temperature == 0.3 and creq.sampling.top_p == 0.9
    assert creq.sampling.top_k == 5 and creq.sampling.logprobs and creq.sampling.top_logprobs == 2
    assert creq.reasoning is not None and (creq.reasoning.enabled, creq.reasoning.effort) == (True, "low")
    assert creq.response_format is not None and creq.response_format.schema == schema
    assert creq.metadata == {"k": "v"} and creq.user == "s"
    assert creq.extra == {"chat_template_kwargs": {"enable_thinking": False}}


def test_response_meta_echoes_the_request() -> None:
    call = parse(input="x", instructions="i", tools=[WEATHER], tool_choice="required", temperature=0.5,
                 max_output_tokens=9, previous_response_id="resp_prev", metadata={"a": "b"},
                 text={"format": {"type": "json_object"}}, reasoning={"effort": "high"}, truncation="auto")
    echo = meta(call).echo
    assert echo["instructions"] == "i" and echo["tool_choice"] == "required" and echo["temperature"] == 0.5
    assert echo["max_output_tokens"] == 9 and echo["previous_response_id"] == "resp_prev"
    assert echo["metadata"] == {"a": "b"} and echo["text"] == {"format": {"type": "json_object"}}
    assert echo["reasoning"] == {"effort": "high", "summary": None} and echo["truncation"] == "auto"
    assert echo["parallel_tool_calls"] is True and echo["store"] is True and echo["top_p"] is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": 5}, "input"),
        ({"input": [5]}, "input[0]"),
        ({"input": [{"content": "no role"}]}, "input[0].type"),
        ({"input": [{"type": "telepathy"}]}, "input[0].type"),
        ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x"}]}]},
         "input[0].content[0].image_url"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]},
         "input[0].content[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
        ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"role": "user", "content": "x"},
                    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                    {"role": "user", "content": "y"}]}, "input[2]"),
        ({"input": [{"type": "item_reference", "id": "msg_missing"}]}, "input[0]"),
        ({"input": []}, "input"),
        ({"instructions": "only"}, "input"),
        ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"input": "x", "tools": [{"name": "f"}]}, "tools[0].type"),
        ({"input": "x", "tools": [WEATHER, WEATHER]}, "tools[1].name"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice"),
        ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "temperature": "hot"}, "temperature"),
        ({"input": "x", "top_k": "many"}, "top_k"),
    ],
)
def test_parse_rejects_bad_input_with_param(body: dict[str, Any], param: str) -> None:
    assert bad(**body).param == param


# ---- render -------------------------------------------------------------------------------------


def aggregate(events: Iterable[Event]) -> Any:
    agg = Aggregator()
    for ev in events:
        agg.add(ev)
    return agg.result()


TEXT: list[Event] = [TextDelta("Hello"), TextDelta(" world"), Finish("stop"), Usage(25, 2)]
REASONING_TEXT: list[Event] = [ReasoningDelta("Let me"), ReasoningDelta(" think."), TextDelta("Hi!"), Finish("stop"),
                  Usage(30, 5, 10, 3)]
PARALLEL_TOOLS: list[Event] = [
    ToolCallStart(0, "call_1", "get_weather"), ToolArgsDelta(0, '{"city":'), ToolArgsDelta(0, '"Paris"}'),
    ToolCallStart(1, "call_2", "get_time"), ToolArgsDelta(1, "{}"), Finish("tool_calls"), Usage(40, 12),
]


def test_render_response_shapes_items_usage_and_status() -> None:
    body = r.render_response(aggregate(REASONING_TEXT), meta())
    RESPONSE.validate_python(body)
    assert body["status"] == "completed" and body["incomplete_details"] is None
    assert [i["type"] for i in body["output"]] == ["reasoning", "message"]
    assert body["output"][0] == {
        "type": "reasoning", "id": "rs_1", "summary": [],
        "content": [{"type": "reasoning_text", "text": "Let me think."}], "status": "completed",
    }
    assert body["output"][1]["content"] == [{"type": "output_text", "text": "Hi!", "annotations": [], "logprobs": []}]
    assert body["usage"] == {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 0},
                             "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 3},
                             "total_tokens": 35, "cost": "0.000001"}


def test_render_response_cut_by_length_is_incomplete() -> None:
    body = r.render_response(aggregate([TextDelta("tok0 tok1"), Finish("length"), Usage(5, 2)]), meta())
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][-1]["status"] == "incomplete"


def test_render_response_tool_calls_and_encrypted_reasoning() -> None:
    call = parse(input="x", include=["reasoning.encrypted_content"])
    body = r.render_response(aggregate([ReasoningDelta("plan"), *PARALLEL_TOOLS]), meta(call))
    RESPONSE.validate_python(body)
    assert decode_reasoning(body["output"][0]["encrypted_content"]) == "plan"
    calls = [i for i in body["output"] if i["type"] == "function_call"]
    assert [(c["call_id"], c["name"], c["arguments"]) for c in calls] == [
        ("call_1", "get_weather", '{"city":"Paris"}'), ("call_2", "get_time", "{}")
    ]


# ---- stream -------------------------------------------------------------------------------------


async def _events(items: Iterable[Event], fail: BaseException | None = None) -> AsyncIterator[Event]:
    for ev in items:
        yield ev
    if fail is not None:
        raise fail


async def encode(items: Iterable[Event], m: r.ResponseMeta | None = None, fail: BaseException | None = None,
                 on_final: Any = None) -> bytes:
    return b"".join([c async for c in r.encode_stream(_events(items, fail), m or meta(), on_final)])


def sse(raw: bytes) -> list[dict[str, Any]]:
    """Event payloads; each has an ``event:`` line naming its type and validates as the SDK's type."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[6:])
        assert data["type"] == name_line[7:]
        typed = EVENTS.validate_python(data)
        assert type(typed).__module__.startswith("openai.types.responses"), type(typed)
        out.append(data)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def sdk_final(raw: bytes) -> Any:
    """What openai-python's ``responses.stream().get_final_response()`` builds from the stream."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for data in sse(raw):
        state.handle_event(EVENTS.validate_python(data))
    return state._completed_response


def unparsed(value: Any) -> Any:
    """Without the ``parsed``/``parsed_arguments`` fields the SDK adds to its final response."""
    if isinstance(value, dict):
        return {k: unparsed(v) for k, v in value.items() if k not in ("parsed", "parsed_arguments")}
    if isinstance(value, list):
        return [unparsed(v) for v in value]
    return value


def check_golden(name: str, raw: bytes) -> None:
    path = GOLDEN / name
    if os.environ.get("MESH_UPDATE_GOLDEN"):
        path.write_bytes(raw)
    assert raw == path.read_bytes()


@pytest.mark.parametrize(
    ("name", "events"),
    [("responses_text.sse", TEXT), ("responses_reasoning_text.sse", REASONING_TEXT),
     ("responses_parallel_tools.sse", PARALLEL_TOOLS)],
)
async def test_stream_matches_golden_and_the_sdk_accumulates_it(name: str, events: list[Event]) -> None:
    raw = await encode(events)
    check_golden(name, raw)
    final = sdk_final(raw)
    assert final is not None
    expected = r.render_response(aggregate(events), meta())
    assert unparsed(final.to_dict()) == RESPONSE.validate_python(expected).to_dict()


async def test_stream_event_order_for_reasoning_then_text() -> None:
    kinds = [e["type"] for e in sse(await encode(REASONING_TEXT))]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]


async def test_stream_cut_by_length_ends_incomplete() -> None:
    events = sse(await encode([TextDelta("tok0"), Finish("length"), Usage(5, 1)]))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"


@pytest.mark.parametrize(
    ("error", "code"),
    [(EngineError("engine went away"), "server_error"), (RateLimited("slow down"), "rate_limit_exceeded"),
     (RuntimeError("bug"), "server_error")],
)
async def test_stream_failure_after_start_ends_with_response_failed(error: Exception, code: str) -> None:
    events = sse(await encode([TextDelta("partial")], fail=error))
    assert events[0]["type"] == "response.created"
    last = events[-1]
    assert last["type"] == "response.failed"
    assert last["response"]["status"] == "failed" and last["response"]["error"]["code"] == code
    assert last["response"]["output"][0]["content"][0]["text"] == "partial"
    assert "bug" not in json.dumps(last)


async def test_stream_calls_on_final_before_the_terminal_event() -> None:
    seen: list[dict[str, Any]] = []

    async def on_final(response: dict[str, Any]) -> None:
        seen.append(response)

    events = sse(await encode(TEXT, on_final=on_final))
    assert seen == [events[-1]["response"]]
    assert seen[0]["output"][0]["content"][0]["text"] == "Hello world"


async def test_stream_carries_logprobs_and_encrypted_reasoning() -> None:
    call = parse(input="x", include=["reasoning.encrypted_content", "message.output_text.logprobs"])
    lp = (TokenLogprob("Hi", -0.1, (72, 105)),)
    events = sse(await encode([ReasoningDelta("hmm"), TextDelta("Hi", logprobs=lp), Finish("stop"), Usage(1, 2)],
                              meta(call)))
    delta = next(e for e in events if e["type"] == "response.output_text.delta")
    assert delta["logprobs"] == [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert decode_reasoning(done[0]["encrypted_content"]) == "hmm"


@pytest.mark.parametrize("fail", [None, EngineError("engine fell over")])
async def test_the_terminal_event_alone_is_the_last_chunk(fail: Exception | None) -> None:
    # response.completed (or response.failed) goes out with the response's end.
    chunks = [c async for c in r.encode_stream(_events([TextDelta("Hi"), Finish("stop"), Usage(3, 1)], fail), meta())]
    assert [type(c) for c in chunks[:-1]] == [bytes] * (len(chunks) - 1)
    last = chunks[-1]
    assert type(last) is LastChunk
    events = [e["type"] for e in sse(b"".join(chunks))]
    assert [line for line in last.decode().splitlines() if line.startswith("event:")] == [f"event: {events[-1]}"]
    assert events[-1] == ("response.failed" if fail is not None else "response.completed")
