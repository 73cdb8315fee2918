"""Anthropic Messages: request parsing, response rendering and error shapes (no server)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mesh.canonical import (
    Choice,
    ImagePart,
    Message,
    ReasoningConfig,
    ReasoningPart,
    ResponseFormat,
    Result,
    TextPart,
    ToolCall,
    ToolCallPart,
    ToolChoice,
    ToolResultPart,
    Usage,
)
from mesh.errors import (
    AuthenticationFailed,
    EngineError,
    EngineOverloaded,
    EngineTimeout,
    EngineUnavailable,
    InsufficientCredits,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
)
from mesh.protocols import anthropic_messages as am
from mesh.protocols.anthropic_errors import render_error, stream_error_event

WEATHER = {"name": "get_weather", "description": "Weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}}}
PNG = "iVBORw0KGgo="


def parse(**fields: Any) -> tuple[Any, am.MessagesOptions]:
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], **fields}
    return am.parse_request(json.dumps(body).encode())


def messages(*items: dict[str, Any], **fields: Any) -> tuple[Message, ...]:
    req, _ = parse(messages=list(items), **fields)
    return tuple(req.messages)


def bad(**fields: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse(**fields)
    return info.value


# ---- parse: fields ---------------------------------------------------------------------------


def test_parse_minimal_request_maps_fields() -> None:
    req, options = parse(
        system="Be brief.", stream=True, stop_sequences=["END"], temperature=0.5, top_p=0.9, top_k=40,
        metadata={"user_id": "u-1"},
    )
    assert req.model == "m" and req.max_tokens == 100 and req.stream is True
    assert req.messages == (Message("system", (TextPart("Be brief."),)), Message("user", (TextPart("hi"),)))
    assert req.stop == ("END",)
    assert (req.sampling.temperature, req.sampling.top_p, req.sampling.top_k) == (0.5, 0.9, 40)
    assert req.user == "u-1"
    assert req.continue_final is False and req.n == 1
    assert options == am.MessagesOptions()


def test_parse_ignores_unknown_and_cache_fields() -> None:
    req, _ = parse(
        context_management={"edits": [{"type": "clear_tool_uses_20250919"}]}, container="c", service_tier="auto",
        mcp_servers=[{"name": "x"}], inference_geo="us",
        system=[{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "B"}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"},
                                                "citations": None}]}],
    )
    assert req.extra == {}
    assert req.messages[0] == Message("system", (TextPart("A\n\nB"),))


def test_parse_tools_drop_server_tools_and_map_choice() -> None:
    req, _ = parse(
        tools=[WEATHER, {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
               {"type": "custom", "name": "noop", "input_schema": {"type": "object"}, "strict": True}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    assert [t.name for t in req.tools] == ["get_weather", "noop"]
    assert req.tools[0].parameters == WEATHER["input_schema"] and req.tools[1].strict is True
    assert req.tool_choice == ToolChoice("required") and req.parallel_tool_calls is False


@pytest.mark.parametrize(
    ("choice", "expected", "parallel"),
    [
        ({"type": "auto"}, ToolChoice("auto"), None),
        ({"type": "auto", "disable_parallel_tool_use": True}, ToolChoice("auto"), False),
        ({"type": "none"}, ToolChoice("none"), None),
        ({"type": "tool", "name": "get_weather"}, ToolChoice("function", "get_weather"), None),
        ({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": False}, ToolChoice("function",
                                                                                                "get_weather"), None),
    ],
)
def test_parse_tool_choice(choice: dict[str, Any], expected: ToolChoice, parallel: bool | None) -> None:
    req, _ = parse(tools=[WEATHER], tool_choice=choice)
    assert req.tool_choice == expected and req.parallel_tool_calls is parallel


@pytest.mark.parametrize(
    ("fields", "reasoning", "omit"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, ReasoningConfig(True, None, 2048), False),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024, "display": "omitted"}},
         ReasoningConfig(True, None, 1024), True),
        ({"thinking": {"type": "disabled"}}, ReasoningConfig(False), False),
        ({"thinking": {"type": "adaptive"}}, None, False),
        ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "medium"}},
         ReasoningConfig(None, "medium"), False),
        ({"output_config": {"effort": "max"}}, ReasoningConfig(None, "max"), False),
        ({}, None, False),
    ],
)
def test_parse_thinking_and_effort(fields: dict[str, Any], reasoning: ReasoningConfig | None, omit: bool) -> None:
    req, options = parse(max_tokens=4096, **fields)
    assert req.reasoning == reasoning and options.omit_thinking is omit


def test_parse_output_format_becomes_json_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    req, _ = parse(output_config={"format": {"type": "json_schema", "schema": schema}})
    assert req.response_format == ResponseFormat("json_schema", "output", schema)


# ---- parse: messages and blocks --------------------------------------------------------------


def test_parse_every_user_block_type() -> None:
    (user,) = messages({"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc body"},
         "title": "Doc"},
        {"type": "search_result", "source": "https://s", "title": "T", "content": [{"type": "text", "text": "R"}]},
        {"type": "text", "text": ""},
    ]})
    assert user.parts == (
        TextPart("look"),
        ImagePart(f"data:image/png;base64,{PNG}"),
        ImagePart("https://example.com/a.jpg"),
        TextPart("Doc\n\ndoc body"),
        TextPart("T\n\nhttps://s\n\nR"),
    )


def test_parse_assistant_blocks_and_tool_results() -> None:
    parsed = messages(
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call", "signature": "sig-1"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}},
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21C"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True, "content": [
                {"type": "text", "text": "boom"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/gif", "data": "R0lG"}}]},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
            {"type": "text", "text": "thanks"},
        ]},
        tools=[WEATHER],
    )
    assert parsed[1].parts == (
        ReasoningPart("I should call", "sig-1"),
        TextPart("Checking."),
        ToolCallPart("toolu_1", "get_weather", '{"city":"Paris"}'),
        ToolCallPart("toolu_2", "get_weather", "{}"),
    )
    assert parsed[2].parts == (
        ToolResultPart("toolu_1", (TextPart("21C"),)),
        ToolResultPart("toolu_2", (TextPart("boom"), ImagePart("data:image/gif;base64,R0lG")), is_error=True),
        TextPart("thanks"),
    )


def test_parse_merges_consecutive_same_role_turns() -> None:
    parsed = messages(
        {"role": "user", "content": "one"},
        {"role": "user", "content": [{"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "three"},
    )
    assert parsed == (
        Message("user", (TextPart("one\n\n"), TextPart("two"))),
        Message("assistant", (TextPart("a\n\n"), TextPart("b"))),
        Message("user", (TextPart("three"),)),
    )


def test_parse_system_message_inside_messages_keeps_its_position() -> None:
    parsed = messages(
        {"role": "user", "content": "do it"},
        {"role": "system", "content": [{"type": "text", "text": "reminder"}]},
        system="top",
    )
    assert [m.role for m in parsed] == ["system", "user", "system"]
    assert parsed[2].text == "reminder"


def test_parse_final_assistant_is_prefill() -> None:
    req, _ = parse(messages=[{"role": "user", "content": "Name a color"},
                             {"role": "assistant", "content": "The color is"}])
    assert req.continue_final is True and req.messages[-1] == Message("assistant", (TextPart("The color is"),))
    req, _ = parse(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])
    assert req.continue_final is False and [m.role for m in req.messages] == ["user"]
    req, _ = parse(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}])
    assert req.continue_final is False and len(req.messages) == 1


def test_parse_count_request_needs_no_max_tokens() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]}
    req = am.parse_count_request(json.dumps(body).encode())
    assert req.max_tokens is None and req.tools[0].name == "get_weather"


# ---- parse: errors -------------------------------------------------------------------------------

USER_OK = {"role": "user", "content": "hi"}
CALL = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}

ERRORS: list[tuple[str, dict[str, Any], str, str]] = [
    # (name, fields, param, message fragment)
    ("missing max_tokens", {"max_tokens": None}, "max_tokens", "Field required"),
    ("max_tokens zero", {"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ("max_tokens string", {"max_tokens": "100"}, "max_tokens", "valid integer"),
    ("empty messages", {"messages": []}, "messages", "at least 1"),
    ("bad role", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'user'"),
    ("content number", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "a valid string or a valid list"),
    ("file image", {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "file", "file_id": "f"}}]}]}, "messages[0].content[0].source.type", "not supported"),
    ("empty user content", {"messages": [{"role": "user", "content": ""}, USER_OK]}, "messages[0]", "non-empty"),
    ("unknown block", {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "messages[0].content[0].type", "'video'"),
    ("block not object", {"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]", "object"),
    ("bad media type", {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/bmp", "data": "x"}}]}]},
     "messages[0].content[0].source.media_type", "image/png"),
    ("image ftp url", {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "url", "url": "ftp://x"}}]}]}, "messages[0].content[0].source.url", "http"),
    ("pdf document", {"messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "base64", "media_type": "application/pdf", "data": "x"}}]}]},
     "messages[0].content[0].source.type", "PDFs"),
    ("tool_use from user", {"messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, "messages[0].content[0].type", "user messages"),
    ("thinking missing text", {"messages": [USER_OK, {"role": "assistant", "content": [{"type": "thinking"}]}]},
     "messages[1].content[0].thinking", "Field required"),
    ("tool_result without tool_use", {"messages": [USER_OK, {"role": "assistant", "content": "ok"}, {
        "role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "r"}]}]},
     "messages[2].content[0]", "unexpected `tool_use_id`"),
    ("tool_use unanswered", {"messages": [USER_OK, CALL, USER_OK]}, "messages[1]", "without `tool_result`"),
    ("tool_use last", {"messages": [USER_OK, CALL]}, "messages[1]", "without `tool_result`"),
    ("tool_use input not object", {"messages": [USER_OK, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": "{}"}]}]}, "messages[1].content[0].input", ""),
    ("system block not text", {"system": [{"type": "image"}]}, "system[0].type", "'text'"),
    ("temperature above 1", {"temperature": 1.5}, "temperature", "less than or equal to 1"),
    ("top_k negative", {"top_k": -1}, "top_k", ""),
    ("stream string", {"stream": "yes"}, "stream", "boolean"),
    ("empty stop sequence", {"stop_sequences": [""]}, "stop_sequences", "empty"),
    ("tool without schema", {"tools": [{"name": "f"}]}, "tools[0].input_schema", "Field required"),
    ("tool bad name", {"tools": [{"name": "bad name", "input_schema": {"type": "object"}}]}, "tools[0].name", ""),
    ("tool schema not object", {"tools": [{"name": "f", "input_schema": {"type": "string"}}]},
     "tools[0].input_schema", "object"),
    ("duplicate tools", {"tools": [WEATHER, WEATHER]}, "tools[1].name", "unique"),
    ("tool_choice unknown tool", {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
     "tool_choice.name", "not in 'tools'"),
    ("tool_choice any without tools", {"tool_choice": {"type": "any"}}, "tool_choice", "at least one tool"),
    ("tool_choice bad type", {"tool_choice": {"type": "sometimes"}}, "tool_choice.type", "'auto'"),
    ("thinking small budget", {"thinking": {"type": "enabled", "budget_tokens": 10}},
     "thinking.budget_tokens", "1024"),
    ("thinking budget over max", {"max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 2000}},
     "thinking.budget_tokens", "greater than thinking.budget_tokens"),
    ("thinking unknown type", {"thinking": {"type": "turbo"}}, "thinking.type", "'enabled'"),
    ("effort unknown", {"output_config": {"effort": "extreme"}}, "output_config.effort", "'low'"),
    ("metadata user_id number", {"metadata": {"user_id": 5}}, "metadata.user_id", "string"),
]


@pytest.mark.parametrize(("name", "fields", "param", "fragment"), ERRORS, ids=[e[0] for e in ERRORS])
def test_parse_errors_name_the_place(name: str, fields: dict[str, Any], param: str, fragment: str) -> None:
    fields = {k: v for k, v in fields.items()}
    if fields.get("max_tokens", 1) is None:
        body = {"model": "m", "messages": [USER_OK]}
        with pytest.raises(InvalidRequest) as info:
            am.parse_request(json.dumps(body).encode())
        err = info.value
    else:
        err = bad(**fields)
    assert err.param == param
    assert err.message.startswith(f"{param}: ")
    assert fragment in err.message
    assert err.status == 400


@pytest.mark.parametrize("raw", [b"", b"{nope", b"[1]"])
def test_parse_rejects_non_objects(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        am.parse_request(raw)


# ---- render ----------------------------------------------------------------------------------------

META = am.StreamMeta(id="msg_1", model="m", signature="c2ln", stop_sequences=("STOP",))


def result(**choice: Any) -> Result:
    fields: dict[str, Any] = {"index": 0, "text": "", "reasoning": "", "tool_calls": (), "finish_reason": "stop"}
    return Result((Choice(**{**fields, **choice}),), Usage(100, 20, 30, 5))


def test_render_response_orders_blocks_and_maps_usage() -> None:
    body = am.render_response(
        result(reasoning="hmm", text="Checking.", finish_reason="tool_calls",
               tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Paris"}'), ToolCall("call_2", "f", "{bad"))),
        META,
    )
    assert body == {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "c2ln"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "f", "input": {}},
        ],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 70, "output_tokens": 20, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 30, "output_tokens_details": {"thinking_tokens": 5}},
    }


@pytest.mark.parametrize(
    ("finish", "matched", "calls", "expected"),
    [
        ("stop", None, False, ("end_turn", None)),
        ("stop", "STOP", False, ("stop_sequence", "STOP")),
        ("stop", "</s>", False, ("end_turn", None)),
        ("stop", None, True, ("tool_use", None)),
        ("length", None, False, ("max_tokens", None)),
        ("content_filter", None, False, ("refusal", None)),
        ("error", None, False, ("end_turn", None)),
    ],
)
def test_stop_reason_mapping(finish: Any, matched: str | None, calls: bool, expected: tuple[str, str | None]) -> None:
    tool_calls = (ToolCall("c", "f", "{}"),) if calls else ()
    body = am.render_response(result(finish_reason=finish, stop_sequence=matched, tool_calls=tool_calls), META)
    assert (body["stop_reason"], body["stop_sequence"]) == expected


def test_render_never_emits_empty_or_blank_text_and_can_omit_thinking() -> None:
    meta = am.StreamMeta(id="msg_1", model="m", signature="s", omit_thinking=True)
    body = am.render_response(result(text="\n\n", reasoning="secret"), meta)
    assert body["content"] == [{"type": "thinking", "thinking": "", "signature": "s"}]
    assert am.render_response(result(), META)["content"] == []


def test_render_usage_extras_are_added() -> None:
    meta = am.StreamMeta(id="msg_1", model="m", signature="s", usage_extras=lambda u: {"cost": "0.000001"})
    assert am.render_response(result(text="x"), meta)["usage"]["cost"] == "0.000001"


def test_new_signature_is_random_base64() -> None:
    a, b = am.new_signature(), am.new_signature()
    assert a != b and len(a) == 64


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "status", "kind"),
    [
        (InvalidRequest("x"), 400, "invalid_request_error"),
        (AuthenticationFailed("x"), 401, "authentication_error"),
        (InsufficientCredits("x"), 402, "billing_error"),
        (PermissionDenied("x"), 403, "permission_error"),
        (ModelNotFound("x"), 404, "not_found_error"),
        (RequestTooLarge("x"), 413, "request_too_large"),
        (RateLimited("x"), 429, "rate_limit_error"),
        (InternalError("x"), 500, "api_error"),
        (EngineError("x"), 500, "api_error"),
        (EngineUnavailable("x"), 529, "overloaded_error"),
        (EngineOverloaded("x"), 529, "overloaded_error"),
        (EngineTimeout("x"), 504, "timeout_error"),
    ],
)
def test_render_error_statuses_and_types(err: Any, status: int, kind: str) -> None:
    assert render_error(err) == (
        status, {"type": "error", "error": {"type": kind, "message": "x"}, "request_id": None}
    )


def test_stream_error_event_is_named_error() -> None:
    assert stream_error_event(EngineOverloaded("Overloaded"), "req_1") == (
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},'
        b'"request_id":"req_1"}\n\n'
    )
