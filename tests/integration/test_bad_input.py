"""Bad input of every kind gets a clear 4xx in OpenAI's error shape, never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from support.gateway import GatewayProcess

OK_MESSAGES = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "test-model", "messages": OK_MESSAGES, **fields}


CASES: list[tuple[str, Any, int, str | None]] = [
    # (name, json body or raw bytes, status, expected param)
    ("not json", b"{nope", 400, None),
    ("empty body", b"", 400, None),
    ("json array", b"[1,2]", 400, None),
    ("json string", b'"hello"', 400, None),
    ("missing model", {"messages": OK_MESSAGES}, 400, "model"),
    ("missing messages", {"model": "test-model"}, 400, "messages"),
    ("empty messages", body(messages=[]), 400, "messages"),
    ("model not string", body(model=5), 400, "model"),
    ("messages not list", body(messages="hi"), 400, "messages"),
    ("unknown role", body(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0]"),
    ("message not object", body(messages=["hi"]), 400, "messages[0]"),
    ("user content number", body(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    ("unknown part type", body(messages=[{"role": "user", "content": [{"type": "video", "x": 1}]}]), 400, None),
    ("audio part", body(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]), 400, "messages[0].content[0]"),
    ("image bad url", body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://x"}}]}]), 400, None),
    ("temperature too high", body(temperature=5), 400, "temperature"),
    ("temperature string", body(temperature="hot"), 400, "temperature"),
    ("top_p negative", body(top_p=-1), 400, "top_p"),
    ("n zero", body(n=0), 400, "n"),
    ("max_tokens zero", body(max_tokens=0), 400, "max_tokens"),
    ("max_completion_tokens negative", body(max_completion_tokens=-5), 400, "max_completion_tokens"),
    ("too many stops", body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("top_logprobs without logprobs", body(top_logprobs=3), 400, None),
    ("top_logprobs too big", body(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("presence penalty range", body(presence_penalty=3), 400, "presence_penalty"),
    ("stream not bool", body(stream="yes"), 400, "stream"),
    ("stream_options without stream", body(stream_options={"include_usage": True}), 400, None),
    ("tool without function", body(tools=[{"type": "function"}]), 400, "tools[0].function"),
    ("tool bad name", body(tools=[{"type": "function", "function": {"name": "bad name!"}}]), 400, None),
    ("tool_choice unknown function", body(
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice={"type": "function", "function": {"name": "g"}}), 400, "tool_choice"),
    ("tool_choice required without tools", body(tool_choice="required"), 400, "tool_choice"),
    ("tool_choice bad string", body(tool_choice="sometimes"), 400, "tool_choice"),
    ("tool message without call", body(messages=[
        {"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_9", "content": "r"}]), 400,
        "messages[1].tool_call_id"),
    ("tool call unanswered", body(messages=[
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "user", "content": "y"}]), 400, "messages[2]"),
    ("response_format unknown", body(response_format={"type": "xml"}), 400, "response_format"),
    ("json_schema without name", body(response_format={"type": "json_schema", "json_schema": {}}), 400, None),
    ("reasoning_effort unknown", body(reasoning_effort="extreme"), 400, "reasoning_effort"),
    ("metadata too long", body(metadata={"k": "v" * 600}), 400, "metadata"),
    ("legacy functions", body(functions=[{"name": "f"}]), 400, "functions"),
    ("top_k not int", body(top_k="many"), 400, "top_k"),
    ("unknown model", body(model="no-such-model"), 404, "model"),
]


@pytest.mark.parametrize(("name", "payload", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_bad_chat_request_gets_clear_openai_error(
    gateway: GatewayProcess, api_key: str, name: str, payload: Any, status: int, param: str | None
) -> None:
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    url = gateway.base_url + "/chat/completions"
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
    assert "Traceback" not in r.text
    assert r.headers["x-request-id"].startswith("req_")


def test_body_too_large_is_413(gateway: GatewayProcess, api_key: str) -> None:
    big = b'{"model":"test-model","messages":[{"role":"user","content":"' + b"x" * (33 * 1024 * 1024) + b'"}]}'
    r = httpx.post(
        gateway.base_url + "/chat/completions", content=big,
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}, timeout=60,
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "missing"),
        ({"Authorization": "Bearer sk-mesh-not-a-real-key"}, "unknown"),
        ({"Authorization": "Basic abc"}, "wrong scheme"),
        ({"Authorization": "Bearer"}, "empty"),
    ],
)
def test_bad_credentials_are_401(gateway: GatewayProcess, headers: dict[str, str], why: str) -> None:
    r = httpx.post(gateway.base_url + "/chat/completions", json=body(), headers=headers)
    assert r.status_code == 401, why
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert "sk-mesh-not-a-real-key" not in r.text


def test_unknown_path_and_method(gateway: GatewayProcess, api_key: str) -> None:
    r = httpx.get(gateway.base_url + "/nothing-here", headers={"Authorization": f"Bearer {api_key}"})
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {api_key}"})
    assert r.status_code == 405 and r.json()["error"]["message"]
