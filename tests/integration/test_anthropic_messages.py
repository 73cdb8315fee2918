"""Anthropic Messages end to end: the official anthropic SDK (and raw Claude Code / TypeScript
SDK request shapes) -> gateway process -> test engine."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import ROUND_CEILING, Decimal
from typing import Any

import anthropic
import httpx
import pytest

from support.gateway import Admin, GatewayProcess
from testengine.harness import EngineProcess


@pytest.fixture
def client(gateway: GatewayProcess, api_key: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gateway.url, api_key=api_key, max_retries=0) as c:
        yield c  # closed after the test: a pooled socket left to the GC is a ResourceWarning


def last_engine_request(engine: EngineProcess, marker: str) -> dict[str, Any]:
    """The newest body the engine received whose messages mention ``marker``."""
    for body in reversed(engine.requests()):
        if marker in json.dumps(body["messages"]):
            return dict(body)
    raise AssertionError(f"the engine never saw {marker!r}")


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line]
        if not lines:
            continue
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        out.append((lines[0][7:], json.loads(lines[1][6:])))
    return out


WEATHER: Any = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME: Any = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}


def expected_cost(usage: Any) -> Decimal:
    """Test pricing: input 1.0, cached input 0.5, output 2.0 credits per million tokens."""
    micro = Decimal(usage.input_tokens) + Decimal(usage.cache_read_input_tokens) / 2 + 2 * usage.output_tokens
    return Decimal(micro / 1_000_000).quantize(Decimal("0.000001"), rounding=ROUND_CEILING)


# ---- plain text ------------------------------------------------------------------------------


def test_messages_non_streaming_text_usage_cost_and_ids(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(
        model="test-model", max_tokens=100, messages=[{"role": "user", "content": "hi there"}]
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant" and message.model == "test-model"
    assert message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Hello! You said: hi there"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 5
    assert message.usage.cache_creation_input_tokens == 0
    assert Decimal(raw.headers["x-mesh-cost"]) == expected_cost(message.usage)
    assert (message.usage.model_extra or {})["cost"] == raw.headers["x-mesh-cost"]
    assert raw.headers["request-id"].startswith("req_") and raw.request_id == raw.headers["request-id"]


def test_messages_stream_typed_events_and_final_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="test-model", max_tokens=100, system="Be brief.", messages=[{"role": "user", "content": "stream me"}]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "message_delta" in kinds
    assert final.content[0].text == "Hello! You said: stream me"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 5 and final.usage.input_tokens > 0


def test_messages_raw_stream_has_event_lines_ping_and_real_usage_in_delta(
    gateway: GatewayProcess, api_key: str
) -> None:
    body = {"model": "test-model", "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(gateway.url + "/v1/messages", json=body, headers={"x-api-key": api_key})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert all(d["type"] == n for n, d in events)
    start_usage = events[0][1]["message"]["usage"]
    final_usage = events[-2][1]["usage"]
    assert start_usage["input_tokens"] > 0 and final_usage["input_tokens"] > 0
    assert final_usage["output_tokens"] == 4  # "Hello! You said: x"
    assert final_usage["cache_creation_input_tokens"] == 0 and "cache_read_input_tokens" in final_usage


def test_messages_stop_sequences_report_the_match(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="test-model", max_tokens=100, stop_sequences=["two"],
        messages=[{"role": "user", "content": "one two three"}],
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "two"
    assert message.content[0].text == "Hello! You said: one "  # type: ignore[union-attr]
    cut = client.messages.create(model="test-model", max_tokens=3, messages=[{"role": "user", "content": "a b c d"}])
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3


def test_messages_prefill_continues_without_repeating(client: anthropic.Anthropic, engine: EngineProcess) -> None:
    message = client.messages.create(
        model="test-model", max_tokens=50,
        messages=[{"role": "user", "content": "marker-prefill"}, {"role": "assistant", "content": "The answer is"}],
    )
    assert message.content[0].text == " and so it continues."  # type: ignore[union-attr]
    sent = last_engine_request(engine, "marker-prefill")
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["messages"][-1] == {"role": "assistant", "content": "The answer is"}


def test_messages_fields_reach_the_engine(client: anthropic.Anthropic, engine: EngineProcess) -> None:
    client.messages.create(
        model="test-model", max_tokens=64, metadata={"user_id": "end-user-7"},
        # This SDK version dropped the sampling parameters from its signature; older ones send them.
        extra_body={"temperature": 0.3, "top_p": 0.8, "top_k": 20},
        messages=[
            {"role": "user", "content": "first"},
            {"role": "user", "content": [
                {"type": "text", "text": "marker-fields"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ]},
        ],
    )
    sent = last_engine_request(engine, "marker-fields")
    assert (sent["temperature"], sent["top_p"], sent["top_k"], sent["max_tokens"]) == (0.3, 0.8, 20, 64)
    assert sent["user"] == "end-user-7"
    assert [m["role"] for m in sent["messages"]] == ["user"]  # the two user turns merged
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "first\n\n"},
        {"type": "text", "text": "marker-fields"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]


# ---- tools -----------------------------------------------------------------------------------


def test_messages_streamed_tool_call_parses_to_input(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="test-model", max_tokens=200, tools=[WEATHER],
        messages=[{"role": "user", "content": "weather in Paris?"}],
    ) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert set(deltas) == {"input_json_delta"}
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["tool_use"]
    block = final.content[0]
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}


@pytest.mark.parametrize("streaming", [False, True])
def test_messages_parallel_tool_loop(client: anthropic.Anthropic, engine: EngineProcess, streaming: bool) -> None:
    prompt = f"both please [parallel] marker-loop-{streaming}"
    first_kwargs: dict[str, Any] = {
        "model": "test-model", "max_tokens": 300, "tools": [WEATHER, TIME],
        "messages": [{"role": "user", "content": prompt}],
    }
    if streaming:
        with client.messages.stream(**first_kwargs) as stream:
            first = stream.get_final_message()
    else:
        first = client.messages.create(**first_kwargs)
    assert first.stop_reason == "tool_use"
    calls = [b for b in first.content if b.type == "tool_use"]
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert not [b for b in first.content if b.type == "text"]
    results = [
        {"type": "tool_result", "tool_use_id": c.id, "content": text} for c, text in zip(calls, ["21C", "noon"],
                                                                                         strict=True)
    ]
    second_kwargs: dict[str, Any] = {
        "model": "test-model", "max_tokens": 300, "tools": [WEATHER, TIME],
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
            {"role": "user", "content": results},
        ],
    }
    if streaming:
        with client.messages.stream(**second_kwargs) as stream:
            second = stream.get_final_message()
    else:
        second = client.messages.create(**second_kwargs)
    assert second.content[0].text == "Tool result: 21C | noon"  # type: ignore[union-attr]
    assert second.stop_reason == "end_turn"
    assert second.usage.cache_read_input_tokens and second.usage.cache_read_input_tokens > 0  # the engine's cache
    sent = last_engine_request(engine, "noon")
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool", "tool"]
    assert [t["id"] for t in sent["messages"][1]["tool_calls"]] == [c.id for c in calls]
    assert sent["messages"][2]["tool_call_id"] == calls[0].id


def test_messages_tool_choice_and_disable_parallel(client: anthropic.Anthropic, engine: EngineProcess) -> None:
    web_search: Any = {"type": "web_search_20250305", "name": "web_search"}
    message = client.messages.create(
        model="test-model", max_tokens=300, tools=[WEATHER, TIME, web_search],
        tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "marker-choice [parallel]"}],
    )
    assert [b.name for b in message.content if b.type == "tool_use"] == ["get_time"]
    sent = last_engine_request(engine, "marker-choice")
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert sent["parallel_tool_calls"] is False
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "get_time"]  # server tool dropped


def test_messages_tool_result_error_and_blocks(client: anthropic.Anthropic, engine: EngineProcess) -> None:
    client.messages.create(
        model="test-model", max_tokens=100, tools=[WEATHER],
        messages=[
            {"role": "user", "content": "marker-is-error"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                          "content": [{"type": "text", "text": "no network"}]}]},
        ],
    )
    sent = last_engine_request(engine, "marker-is-error")
    assert sent["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: no network"}


# ---- thinking ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["test-reasoner", "test-reasoner-vllm"])
def test_messages_thinking_blocks_streamed_and_not(client: anthropic.Anthropic, model: str) -> None:
    kwargs: dict[str, Any] = {
        "model": model, "max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "think"}],
    }
    message = client.messages.create(**kwargs)
    assert [b.type for b in message.content] == ["thinking", "text"]
    thinking = message.content[0]
    assert thinking.type == "thinking" and thinking.thinking.startswith("Let me think") and thinking.signature
    assert message.content[1].type == "text" and message.content[1].text == "Hello! You said: think"
    details = message.usage.output_tokens_details
    assert details is not None and 0 < details.thinking_tokens < message.usage.output_tokens
    with client.messages.stream(**kwargs) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert deltas.count("signature_delta") == 1
    assert deltas.index("signature_delta") == deltas.count("thinking_delta")  # right after the thinking deltas
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == thinking.thinking  # type: ignore[union-attr]
    assert all(b.text for b in final.content if b.type == "text")


def test_messages_thinking_disabled_reaches_engine(client: anthropic.Anthropic, engine: EngineProcess) -> None:
    message = client.messages.create(
        model="test-reasoner", max_tokens=100, thinking={"type": "disabled"},
        messages=[{"role": "user", "content": "marker-nothink"}],
    )
    assert [b.type for b in message.content] == ["text"]
    sent = last_engine_request(engine, "marker-nothink")
    assert sent["chat_template_kwargs"] == {"enable_thinking": False, "thinking": False}


def test_messages_thinking_sent_back_reaches_engine_as_reasoning_content(
    client: anthropic.Anthropic, engine: EngineProcess
) -> None:
    first = client.messages.create(
        model="test-reasoner", max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024},
        tools=[WEATHER], messages=[{"role": "user", "content": "marker-think-loop weather?"}],
    )
    assert [b.type for b in first.content] == ["thinking", "tool_use"]  # no empty text block between
    call = first.content[1]
    assert call.type == "tool_use"
    history: list[Any] = [b.model_dump(exclude_none=True) for b in first.content]
    history.insert(1, {"type": "redacted_thinking", "data": "opaque"})
    messages: Any = [
        {"role": "user", "content": "marker-think-loop weather?"},
        {"role": "assistant", "content": history},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]},
    ]
    second = client.messages.create(
        model="test-reasoner", max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024},
        tools=[WEATHER], messages=messages,
    )
    assert any(b.type == "text" and b.text == "Tool result: sunny" for b in second.content)
    sent = last_engine_request(engine, "sunny")
    assistant = sent["messages"][1]
    assert assistant["role"] == "assistant"
    assert assistant["reasoning_content"] == first.content[0].thinking  # type: ignore[union-attr]
    assert "opaque" not in json.dumps(sent)


# ---- client shapes -----------------------------------------------------------------------------


def claude_code_tools() -> list[dict[str, Any]]:
    names = ["Task", "Bash", "Glob", "Grep", "LS", "Read", "Edit", "MultiEdit", "Write", "WebFetch", "TodoWrite",
             "mcp__ide__getDiagnostics"]
    tools: list[dict[str, Any]] = [
        {"name": n, "description": f"{n} tool", "input_schema": {
            "type": "object", "properties": {"arg": {"type": "string", "description": "x"}}, "required": ["arg"],
            "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}}
        for n in names
    ]
    tools[-1]["cache_control"] = {"type": "ephemeral"}
    return tools


def test_claude_code_request_shape_is_accepted(gateway: GatewayProcess, api_key: str, engine: EngineProcess) -> None:
    body = {
        "model": "test-reasoner",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "You are an interactive CLI tool.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                {"type": "text", "text": "marker-claude-code list files", "cache_control": {"type": "ephemeral"}},
            ]},
            {"role": "system", "content": "marker-midconv-system: stay in the repo"},
        ],
        "tools": claude_code_tools(),
        "tool_choice": {"type": "auto"},
        "thinking": {"type": "adaptive"},
        "output_config": {"effort": "medium"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "metadata": {"user_id": "user_abc_account_def_session_123"},
        "temperature": 1,
    }
    headers = {
        "x-api-key": api_key,
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
                          "fine-grained-tool-streaming-2025-05-14,context-management-2025-06-27",
        "anthropic-dangerous-direct-browser-access": "true",
        "x-app": "cli",
        "user-agent": "claude-cli/2.0.0 (external, cli)",
    }
    r = httpx.post(gateway.url + "/v1/messages?beta=true", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    assert not [e for e in events if e[0] == "error"]
    sent = last_engine_request(engine, "marker-claude-code")
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "system"]
    assert sent["messages"][2]["content"] == "marker-midconv-system: stay in the repo"
    assert 0 < sent["max_tokens"] < 4096  # clamped to what the context leaves, not refused
    assert sent["reasoning_effort"] == "medium"
    assert len(sent["tools"]) == 12
    assert "context_management" not in sent and "metadata" not in sent


def test_typescript_sdk_shape_bearer_only(gateway: GatewayProcess, api_key: str) -> None:
    r = httpx.post(
        gateway.url + "/v1/messages",
        json={"model": "test-model", "max_tokens": 20, "messages": [{"role": "user", "content": "ts"}]},
        headers={"Authorization": f"Bearer {api_key}", "anthropic-version": "2025-10-01",
                 "x-stainless-lang": "js", "anthropic-beta": "token-efficient-tools-2025-02-19"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["content"] == [{"type": "text", "text": "Hello! You said: ts"}]
    assert r.headers["request-id"].startswith("req_")


def test_count_tokens_uses_the_engine_tokenizer(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(
        model="test-model", system="Be brief.", messages=[{"role": "user", "content": "count these words please"}],
        tools=[WEATHER],
    )
    # The test engine's tokenizer: 4 per message + 1 per word, + 2 for the prompt.
    assert counted.input_tokens == (4 + 2) + (4 + 4) + 2
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=[{"role": "user", "content": "x"}])


# ---- failures ----------------------------------------------------------------------------------


def test_engine_failure_before_first_byte_is_an_anthropic_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.InternalServerError) as info:
        client.messages.create(model="test-model", max_tokens=10, messages=[{"role": "user", "content": "[fault:500]"}])
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "api_error"
    assert body["request_id"] == info.value.response.headers["request-id"]


def test_engine_overload_is_529_overloaded(client: anthropic.Anthropic, engine: EngineProcess) -> None:
    engine.fault("429", count=10)
    try:
        with pytest.raises(anthropic.APIStatusError) as info:
            client.messages.create(model="test-model", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    finally:
        engine.clear_faults()
    assert info.value.status_code == 529
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "overloaded_error"


def test_stream_failure_after_start_is_an_error_event(client: anthropic.Anthropic) -> None:
    received = []
    with pytest.raises(anthropic.APIStatusError) as info:
        with client.messages.stream(
            model="test-model", max_tokens=100, messages=[{"role": "user", "content": "[fault:drop] [tokens:20]"}]
        ) as stream:
            for event in stream:
                received.append(event.type)
    assert received[0] == "message_start" and "content_block_delta" in received
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "api_error"


# ---- slow streams and disconnects ----------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_ping_gateway(engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway whose keep-alive interval is short enough to watch pings arrive."""
    from conftest import engine_models

    work = tmp_path_factory.mktemp("gateway-pings")
    config = {
        "database": f"sqlite:///{work}/mesh.db",
        "models": engine_models(engine.base_url),
        "routing": {"keepalive_interval": 0.2},
    }
    with GatewayProcess(config, work) as gw:
        yield gw


def test_slow_stream_gets_pings_and_starts_before_the_first_token(quick_ping_gateway: GatewayProcess) -> None:
    admin = Admin(quick_ping_gateway.url)
    try:
        key = admin.key(admin.account("pings", credits="10"), name="pings")["key"]
    finally:
        admin.close()
    body = {"model": "test-model", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "[delay:2] [chunk_delay:0.5] [tokens:3]"}]}
    r = httpx.post(quick_ping_gateway.url + "/v1/messages", json=body, headers={"x-api-key": key}, timeout=30)
    assert r.status_code == 200
    names = [n for n, _ in sse_events(r.text)]
    first_block = names.index("content_block_start")
    assert names[0] == "message_start"
    assert names[1:first_block].count("ping") >= 2  # queued/thinking: message_start went out, then pings
    deltas = [i for i, n in enumerate(names) if n == "content_block_delta"]
    assert "ping" in names[deltas[0]:deltas[-1]]  # and between slow deltas
    assert names[-2:] == ["message_delta", "message_stop"]


def test_client_disconnect_cancels_upstream(gateway: GatewayProcess, api_key: str, engine: EngineProcess) -> None:
    before = engine.stats()["cancelled"]
    body = {"model": "test-model", "max_tokens": 500, "stream": True,
            "messages": [{"role": "user", "content": "[tokens:200] [chunk_delay:0.05]"}]}
    with httpx.stream("POST", gateway.url + "/v1/messages", json=body, headers={"x-api-key": api_key}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(8):
            next(lines)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and engine.stats()["cancelled"] <= before:
        time.sleep(0.05)
    assert engine.stats()["cancelled"] > before
