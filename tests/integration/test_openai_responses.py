"""Responses API end to end: the official openai SDK (and Codex-shaped raw requests) ->
gateway process -> test engine. Includes stored responses, ownership and a bad-input sweep."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from testengine.harness import EngineProcess

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {
    "type": "function",
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
}


@pytest.fixture
def client(gateway: GatewayProcess, api_key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.base_url, api_key=api_key, max_retries=0) as c:
        yield c


@pytest.fixture
def other_client(gateway: GatewayProcess, admin: Admin) -> Iterator[openai.OpenAI]:
    key = admin.key(admin.account("other", credits="10"), name="other")["key"]
    with openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0) as c:
        yield c


def last_engine_request(engine: EngineProcess, marker: str) -> dict[str, Any]:
    for body in reversed(httpx.get(engine.url + "/control/requests").json()):
        if marker in json.dumps(body["messages"]):
            return dict(body)
    raise AssertionError(f"the engine never saw {marker!r}")


def stored_flag(response: Any) -> Any:
    """``store`` as echoed (openai-python's Response model keeps it as an extra field)."""
    return (response.model_extra or {})["store"]


def first_text(item: Any) -> str:
    text: str = item.model_dump()["content"][0]["text"]
    return text


def sse_events(resp: httpx.Response) -> list[dict[str, Any]]:
    events = []
    for block in resp.text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ")
        data = json.loads(lines[1][6:])
        assert data["type"] == lines[0][7:]
        events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


# ---- create --------------------------------------------------------------------------------------


def test_responses_non_streaming_text_with_public_model_and_cost(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="test-model", input="hi there", instructions="Be nice.")
    response = raw.parse()
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.model == "test-model"
    assert response.output_text == "Hello! You said: hi there"
    assert response.instructions == "Be nice." and stored_flag(response) is True
    message = response.output[0]
    assert isinstance(message, ResponseOutputMessage) and message.id.startswith("msg_")
    usage = response.usage
    assert usage is not None and usage.output_tokens == 5 and usage.input_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    expected = Decimal(usage.input_tokens * 1 + usage.output_tokens * 2) / 1_000_000
    assert Decimal(raw.headers["x-mesh-cost"]) == expected.quantize(Decimal("0.000001"))
    assert Decimal((usage.model_extra or {})["cost"]) == Decimal(raw.headers["x-mesh-cost"])
    assert raw.headers["x-request-id"].startswith("req_")


def test_responses_stream_helper_yields_typed_events_and_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model="test-model", input="stream me") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == "Hello! You said: stream me"
    assert final.status == "completed" and final.usage is not None and final.usage.output_tokens == 5
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["ResponseCreatedEvent", "ResponseInProgressEvent"]
    assert kinds[-1] == "ResponseCompletedEvent"
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and "".join(d.delta for d in deltas) == final.output_text
    assert all(type(e).__module__.startswith("openai.") for e in events)


def test_responses_create_stream_iterates_only_sdk_typed_events(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="test-reasoner", input="think", stream=True))
    typed = (
        ResponseCreatedEvent, ResponseInProgressEvent, ResponseOutputItemAddedEvent, ResponseContentPartAddedEvent,
        ResponseReasoningTextDeltaEvent, ResponseReasoningTextDoneEvent, ResponseContentPartDoneEvent,
        ResponseOutputItemDoneEvent, ResponseTextDeltaEvent, ResponseTextDoneEvent, ResponseCompletedEvent,
    )
    assert all(isinstance(e, typed) for e in events), {type(e) for e in events}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1]
    assert isinstance(final, ResponseCompletedEvent)
    reasoning, message = final.response.output
    assert isinstance(reasoning, ResponseReasoningItem) and reasoning.id.startswith("rs_")
    assert reasoning.summary == [] and reasoning.content is not None
    assert reasoning.content[0].type == "reasoning_text" and reasoning.content[0].text.startswith("Let me think")
    assert isinstance(message, ResponseOutputMessage) and final.response.output_text == "Hello! You said: think"
    assert final.response.usage is not None and final.response.usage.output_tokens_details.reasoning_tokens > 0
    streamed = "".join(e.delta for e in events if isinstance(e, ResponseReasoningTextDeltaEvent))
    assert streamed == reasoning.content[0].text


def test_responses_function_call_streamed_and_not(client: openai.OpenAI) -> None:
    response = client.responses.create(model="test-model", input="weather in Paris?", tools=[WEATHER])  # type: ignore[list-item]
    call = response.output[0]
    assert isinstance(call, ResponseFunctionToolCall) and call.id is not None and call.id.startswith("fc_")
    assert call.call_id.startswith("call_") and call.name == "get_weather" and call.status == "completed"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert response.tools[0].type == "function" and response.tool_choice == "auto"
    with client.responses.stream(model="test-model", input="weather?", tools=[WEATHER]) as stream:  # type: ignore[list-item]
        events = list(stream)
        final = stream.get_final_response()
    assert any(isinstance(e, ResponseFunctionCallArgumentsDeltaEvent) for e in events)
    done = [e for e in events if isinstance(e, ResponseFunctionCallArgumentsDoneEvent)]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Paris"}
    assert final.output[0].type == "function_call"


def test_responses_tool_loop_with_previous_response_id(client: openai.OpenAI, engine: EngineProcess) -> None:
    first = client.responses.create(
        model="test-model", input="both please [parallel] marker-loop1", tools=[WEATHER, TIME],  # type: ignore[list-item]
        instructions="first instructions",
    )
    calls = [o for o in first.output if isinstance(o, ResponseFunctionToolCall)]
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    second = client.responses.create(
        model="test-model", previous_response_id=first.id, tools=[WEATHER, TIME],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": c.call_id, "output": out}
               for c, out in zip(calls, ["21C", "noon"], strict=True)],
    )
    assert second.output_text == "Tool result: 21C | noon"
    assert second.previous_response_id == first.id and second.instructions is None
    sent = last_engine_request(engine, "marker-loop1")
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in sent["messages"][1]["tool_calls"]] == [c.call_id for c in calls]


def test_responses_tool_loop_by_resending_items(client: openai.OpenAI, engine: EngineProcess) -> None:
    first = client.responses.create(
        model="test-reasoner", input="weather? marker-resend", tools=[WEATHER], store=False,  # type: ignore[list-item]
    )
    assert stored_flag(first) is False
    call = next(o for o in first.output if isinstance(o, ResponseFunctionToolCall))
    items: list[Any] = [{"role": "user", "content": "weather? marker-resend"}]
    items += [o.model_dump(exclude_none=True) for o in first.output]
    items.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny"})
    second = client.responses.create(model="test-reasoner", input=items, tools=[WEATHER], store=False)  # type: ignore[list-item]
    assert second.output_text == "Tool result: sunny"
    sent = last_engine_request(engine, "marker-resend")
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][1]["reasoning_content"].startswith("Let me think")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_responses_chain_of_three_turns(client: openai.OpenAI, engine: EngineProcess) -> None:
    one = client.responses.create(model="test-model", input="turn one marker-chain", instructions="old rules")
    with client.responses.stream(model="test-model", input="turn two", previous_response_id=one.id) as stream:
        two = stream.get_final_response()
    three = client.responses.create(
        model="test-model", input="turn three", previous_response_id=two.id, instructions="new rules"
    )
    assert three.output_text == "Hello! You said: turn three"
    sent = last_engine_request(engine, "turn three")
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("system", "new rules"),
        ("user", "turn one marker-chain"), ("assistant", "Hello! You said: turn one marker-chain"),
        ("user", "turn two"), ("assistant", "Hello! You said: turn two"),
        ("user", "turn three"),
    ]


def test_responses_max_output_tokens_makes_incomplete(client: openai.OpenAI) -> None:
    cut = client.responses.create(model="test-model", input="a b c d e f", max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens" and cut.max_output_tokens == 3
    events = list(client.responses.create(model="test-model", input="a b c d e f", max_output_tokens=3, stream=True))
    assert isinstance(events[-1], ResponseIncompleteEvent)
    assert events[-1].response.usage is not None and events[-1].response.usage.output_tokens == 3


def test_responses_settings_reach_the_engine(client: openai.OpenAI, engine: EngineProcess) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    settings: dict[str, Any] = dict(
        temperature=0.2, top_p=0.5, max_output_tokens=200, reasoning={"effort": "low", "summary": "auto"},
        metadata={"k": "v"}, safety_identifier="user-1", extra_body={"top_k": 7, "not_a_field": True},
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
    )
    response = client.responses.create(model="test-reasoner", input="marker-settings", **settings)
    assert json.loads(response.output_text)["answer"]
    assert response.temperature == 0.2 and response.metadata == {"k": "v"}
    assert response.reasoning is not None and response.reasoning.effort == "low"
    sent = last_engine_request(engine, "marker-settings")
    assert sent["temperature"] == 0.2 and sent["top_p"] == 0.5 and sent["max_tokens"] == 200
    assert sent["reasoning_effort"] == "low" and sent["top_k"] == 7 and sent["user"] == "user-1"
    assert sent["response_format"]["json_schema"]["schema"] == schema
    assert "not_a_field" not in sent and sent["model"] == "test-reasoner"


# ---- Codex ---------------------------------------------------------------------------------------

CODEX_TOOLS: list[dict[str, Any]] = [
    {"type": "function", "name": "shell_command", "description": "Runs a shell command.", "strict": False,
     "parameters": {"type": "object", "properties": {"command": {"type": "string"}, "workdir": {"type": "string"}},
                    "required": ["command"], "additionalProperties": False}},
    {"type": "function", "name": "update_plan", "description": "Updates the plan.", "strict": False,
     "parameters": {"type": "object", "properties": {"plan": {"type": "array", "items": {"type": "object"}}},
                    "required": ["plan"], "additionalProperties": False}},
    {"type": "function", "name": "view_image", "description": "Attach a local image.", "strict": False,
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
    {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch.",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch hunk+ end_patch"}},
    {"type": "web_search"},
    {"type": "local_shell"},
    {"type": "namespace", "name": "mcp__docs__", "description": "Docs server",
     "tools": [{"type": "function", "name": "search", "description": "Search docs",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]},
    {"type": "function", "name": "list_mcp_resources", "description": "Lists resources.", "strict": False,
     "parameters": {"type": "object", "properties": {"server": {"type": "string"}}}},
    {"type": "function", "name": "read_mcp_resource", "description": "Reads a resource.", "strict": False,
     "parameters": {"type": "object", "properties": {"server": {"type": "string"}, "uri": {"type": "string"}},
                    "required": ["server", "uri"]}},
]
CODEX_FUNCTIONS = ["shell_command", "update_plan", "view_image", "list_mcp_resources", "read_mcp_resource"]


def codex_post(gateway: GatewayProcess, api_key: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    body = {
        "model": "test-reasoner",
        "instructions": "You are a coding agent running in the Codex CLI.",
        "input": items,
        "tools": CODEX_TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0b5e7f9c-1d2e-4f3a-9b8c-7d6e5f4a3b2c",
        "text": {"verbosity": "low"},
        "client_metadata": {"x": "y"},
    }
    headers = {"Authorization": f"Bearer {api_key}", "OpenAI-Beta": "responses=experimental",
               "originator": "codex_cli_rs", "session_id": "s-1", "Accept": "text/event-stream"}
    r = httpx.post(gateway.base_url + "/responses", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return sse_events(r)


def test_codex_shaped_conversation_with_store_false(
    gateway: GatewayProcess, api_key: str, engine: EngineProcess, client: openai.OpenAI
) -> None:
    items: list[dict[str, Any]] = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions/>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context/>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files marker-codex"}]},
    ]
    events = codex_post(gateway, api_key, items)
    done = events[-1]
    assert done["type"] == "response.completed" and done["response"]["store"] is False
    assert [t["name"] for t in done["response"]["tools"]] == CODEX_FUNCTIONS
    sent = last_engine_request(engine, "marker-codex")
    assert [t["function"]["name"] for t in sent["tools"]] == CODEX_FUNCTIONS
    assert sent["reasoning_effort"] == "medium" and sent["parallel_tool_calls"] is False
    assert [m["role"] for m in sent["messages"]] == ["system", "system", "user", "user"]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(done["response"]["id"])

    # Codex keeps each finished item and resends it without ids and without raw reasoning text.
    output = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    reasoning, call = output
    assert reasoning["type"] == "reasoning" and reasoning["encrypted_content"]
    assert call["type"] == "function_call" and call["name"] == "shell_command"
    items += [
        {"type": "reasoning", "summary": [], "encrypted_content": reasoning["encrypted_content"]},
        {"type": "function_call", "name": call["name"], "arguments": call["arguments"], "call_id": call["call_id"]},
        {"type": "function_call_output", "call_id": call["call_id"], "output": "README.md\nsrc"},
    ]
    events = codex_post(gateway, api_key, items)
    final = events[-1]["response"]
    assert final["status"] == "completed"
    assert next(o for o in final["output"] if o["type"] == "message")["content"][0]["text"] == (
        "Tool result: README.md\nsrc"
    )
    sent = last_engine_request(engine, "README.md")
    assistant = sent["messages"][4]
    assert assistant["role"] == "assistant" and assistant["reasoning_content"] == reasoning["content"][0]["text"]
    assert assistant["tool_calls"][0]["id"] == call["call_id"]
    assert sent["messages"][5] == {"role": "tool", "tool_call_id": call["call_id"], "content": "README.md\nsrc"}

    # A reasoning item from elsewhere (foreign blob, no text) is accepted and adds nothing.
    items[3] = {"type": "reasoning", "id": "rs_x", "summary": [], "encrypted_content": "gAAAAABforeign"}
    assert codex_post(gateway, api_key, items)[-1]["type"] == "response.completed"
    assert "reasoning_content" not in last_engine_request(engine, "README.md")["messages"][4]


# ---- stored responses ----------------------------------------------------------------------------


def test_retrieve_list_input_items_and_delete(client: openai.OpenAI) -> None:
    created = client.responses.create(
        model="test-model",
        input=[{"role": "developer", "content": "rules"}, {"role": "user", "content": "one"},
               {"role": "user", "content": [{"type": "input_text", "text": "two"}]}],
    )
    fetched = client.responses.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()
    items = client.responses.input_items.list(created.id, order="asc")
    assert [i.type for i in items.data] == ["message"] * 3
    assert [first_text(i) for i in items.data] == ["rules", "one", "two"]
    assert (items.model_extra or {})["first_id"] == items.data[0].id and items.has_more is False
    page = client.responses.input_items.list(created.id, limit=1)  # default order: newest first
    assert len(page.data) == 1 and page.has_more is True and first_text(page.data[0]) == "two"
    every = client.responses.input_items.list(created.id, limit=1)  # pages through with ``after``
    assert [first_text(i) for i in every] == ["two", "one", "rules"]
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def test_item_reference_resolves_a_stored_item(client: openai.OpenAI, engine: EngineProcess) -> None:
    first = client.responses.create(model="test-model", input="remember marker-ref")
    items: list[Any] = [
        {"type": "item_reference", "id": first.output[0].id}, {"role": "user", "content": "and now marker-ref2"}
    ]
    second = client.responses.create(model="test-model", input=items)
    assert second.status == "completed"
    sent = last_engine_request(engine, "marker-ref2")
    assert sent["messages"][0] == {"role": "assistant", "content": "Hello! You said: remember marker-ref"}
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="test-model", input=[{"type": "item_reference", "id": "msg_unknown"}])


def test_other_accounts_cannot_read_delete_or_continue(client: openai.OpenAI, other_client: openai.OpenAI) -> None:
    mine = client.responses.create(model="test-model", input="private")
    with pytest.raises(openai.NotFoundError):
        other_client.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other_client.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        other_client.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError) as info:
        other_client.responses.create(model="test-model", input="steal", previous_response_id=mine.id)
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert client.responses.retrieve(mine.id).id == mine.id


@pytest.fixture(scope="module")
def storage_off(engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    work: Path = tmp_path_factory.mktemp("storage-off")
    config = {"database": f"sqlite:///{work}/mesh.db", "models": engine_models(engine.base_url),
              "responses": {"store": False}}
    with GatewayProcess(config, work) as gw:
        admin = Admin(gw.url)
        key = admin.key(admin.account("private"), name="k")["key"]
        admin.close()
        yield gw.base_url, key


def test_operator_can_turn_storage_off(storage_off: tuple[str, str]) -> None:
    base_url, key = storage_off
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as c:
        response = c.responses.create(model="test-model", input="keep nothing")
        assert response.output_text == "Hello! You said: keep nothing" and stored_flag(response) is False
        with pytest.raises(openai.NotFoundError) as missing:
            c.responses.retrieve(response.id)
        assert "turned off" in missing.value.message
        with pytest.raises(openai.BadRequestError) as refused:
            c.responses.create(model="test-model", input="more", previous_response_id=response.id)
        assert "turned off" in refused.value.message


# ---- failures ------------------------------------------------------------------------------------


def test_engine_failure_before_first_byte_is_an_http_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.responses.create(model="test-model", input="[fault:500]", stream=True)
    assert info.value.status_code == 502


def test_stream_failure_after_first_byte_ends_with_response_failed(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="test-model", input="[fault:drop] [tokens:20]", stream=True))
    assert isinstance(events[0], ResponseCreatedEvent)
    failed = events[-1]
    assert isinstance(failed, ResponseFailedEvent)
    assert failed.response.status == "failed" and failed.response.error is not None
    assert failed.response.error.code == "server_error" and failed.response.error.message
    with client.responses.stream(model="test-model", input="[fault:drop] [tokens:20]") as stream:
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            stream.get_final_response()


# ---- bad input -----------------------------------------------------------------------------------


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "test-model", "input": "hi", **fields}


BAD: list[tuple[str, Any, int, str | None]] = [
    ("not json", b"{nope", 400, None),
    ("empty body", b"", 400, None),
    ("json array", b"[1,2]", 400, None),
    ("missing model", {"input": "hi"}, 400, "model"),
    ("model not string", body(model=5), 400, "model"),
    ("no input", {"model": "test-model"}, 400, "input"),
    ("empty input", body(input=[]), 400, "input"),
    ("input number", body(input=5), 400, "input"),
    ("item not object", body(input=["hi"]), 400, "input[0]"),
    ("unknown item type", body(input=[{"type": "hologram"}]), 400, "input[0].type"),
    ("unknown role", body(input=[{"role": "wizard", "content": "x"}]), 400, "input[0].role"),
    ("content number", body(input=[{"role": "user", "content": 5}]), 400, "input[0].content"),
    ("unknown part", body(input=[{"role": "user", "content": [{"type": "video"}]}]), 400, None),
    ("image bad url", body(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x"}]}]),
     400, "input[0].content[0].image_url"),
    ("image by file id", body(input=[{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]),
     400, "input[0].content[0]"),
    ("input_file", body(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]),
     400, "input[0].content[0]"),
    ("function_call without name", body(input=[{"type": "function_call", "call_id": "c", "arguments": "{}"}]),
     400, "input[0].name"),
    ("output without call", body(input=[{"type": "function_call_output", "call_id": "c9", "output": "x"}]),
     400, "input[0].call_id"),
    ("call unanswered", body(input=[
        {"role": "user", "content": "x"}, {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"role": "user", "content": "y"}]), 400, "input[2]"),
    ("reasoning bad summary", body(input=[{"type": "reasoning", "summary": "text"}]), 400, "input[0].summary"),
    ("unknown reference", body(input=[{"type": "item_reference", "id": "msg_nope"}]), 400, "input[0]"),
    ("temperature too high", body(temperature=5), 400, "temperature"),
    ("top_p string", body(top_p="x"), 400, "top_p"),
    ("max_output_tokens zero", body(max_output_tokens=0), 400, "max_output_tokens"),
    ("stream not bool", body(stream="yes"), 400, "stream"),
    ("store not bool", body(store="no"), 400, "store"),
    ("tool not object", body(tools=["f"]), 400, "tools[0]"),
    ("tool without type", body(tools=[{"name": "f"}]), 400, "tools[0].type"),
    ("function tool bad name", body(tools=[{"type": "function", "name": "bad name!"}]), 400, "tools[0].name"),
    ("function tool bad params", body(tools=[{"type": "function", "name": "f", "parameters": "x"}]),
     400, "tools[0].parameters"),
    ("tool_choice bad string", body(tool_choice="sometimes"), 400, "tool_choice"),
    ("tool_choice required no tools", body(tool_choice="required"), 400, "tool_choice"),
    ("tool_choice unknown function", body(tools=[WEATHER], tool_choice={"type": "function", "name": "g"}),
     400, "tool_choice"),
    ("tool_choice hosted", body(tools=[{"type": "web_search"}], tool_choice={"type": "web_search_preview"}),
     400, "tool_choice"),
    ("text format unknown", body(text={"format": {"type": "xml"}}), 400, "text.format"),
    ("json_schema without name", body(text={"format": {"type": "json_schema", "schema": {}}}), 400,
     "text.format.name"),
    ("reasoning effort unknown", body(reasoning={"effort": "extreme"}), 400, "reasoning.effort"),
    ("metadata too long", body(metadata={"k": "v" * 600}), 400, "metadata"),
    ("truncation unknown", body(truncation="sometimes"), 400, "truncation"),
    ("include not list", body(include="x"), 400, "include"),
    ("background", body(background=True), 400, "background"),
    ("conversation", body(conversation="conv_1"), 400, "conversation"),
    ("top_k not int", body(top_k="many"), 400, "top_k"),
    ("unknown previous response", body(previous_response_id="resp_nope"), 404, "previous_response_id"),
    ("unknown model", body(model="no-such-model"), 404, "model"),
]


@pytest.mark.parametrize(("name", "payload", "status", "param"), BAD, ids=[c[0] for c in BAD])
def test_bad_responses_request_gets_clear_openai_error(
    gateway: GatewayProcess, api_key: str, name: str, payload: Any, status: int, param: str | None
) -> None:
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    url = gateway.base_url + "/responses"
    if isinstance(payload, bytes):
        r = httpx.post(url, content=payload, headers=headers)
    else:
        r = httpx.post(url, json=payload, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in r.text and r.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/responses/resp_nope", 404),
        ("DELETE", "/responses/resp_nope", 404),
        ("GET", "/responses/resp_nope/input_items", 404),
        ("GET", "/responses/resp_nope/input_items?limit=0", 400),
        ("GET", "/responses/resp_nope/input_items?order=up", 400),
        ("GET", "/responses/resp_nope?stream=true", 400),
        ("PUT", "/responses/resp_nope", 405),
        ("GET", "/responses", 405),
    ],
)
def test_bad_stored_response_requests(
    gateway: GatewayProcess, api_key: str, method: str, path: str, status: int
) -> None:
    r = httpx.request(method, gateway.base_url + path, headers={"Authorization": f"Bearer {api_key}"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_responses_need_credentials(gateway: GatewayProcess) -> None:
    for method, path in (("POST", "/responses"), ("GET", "/responses/resp_x"), ("DELETE", "/responses/resp_x")):
        r = httpx.request(method, gateway.base_url + path, json=body())
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
