"""Bad input to /v1/messages gets a clear 4xx in Anthropic's error shape, never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from support.gateway import GatewayProcess

OK = [{"role": "user", "content": "hi"}]
CALL = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}


def body(**fields: Any) -> dict[str, Any]:
    out = {"model": "test-model", "max_tokens": 50, "messages": OK, **fields}
    return {k: v for k, v in out.items() if v is not None}


CASES: list[tuple[str, Any, int, str, str]] = [
    # (name, json body or raw bytes, status, error type, fragment of the message)
    ("not json", b"{nope", 400, "invalid_request_error", "not valid JSON"),
    ("empty body", b"", 400, "invalid_request_error", "empty"),
    ("json array", b"[1]", 400, "invalid_request_error", "JSON object"),
    ("missing max_tokens", body(max_tokens=None), 400, "invalid_request_error", "max_tokens: Field required"),
    ("max_tokens zero", body(max_tokens=0), 400, "invalid_request_error", "max_tokens:"),
    ("max_tokens float", body(max_tokens=1.5), 400, "invalid_request_error", "max_tokens:"),
    ("missing model", body(model=None), 400, "invalid_request_error", "model: Field required"),
    ("missing messages", body(messages=None), 400, "invalid_request_error", "messages: Field required"),
    ("empty messages", body(messages=[]), 400, "invalid_request_error", "messages:"),
    ("role tool", body(messages=[{"role": "tool", "content": "x"}]), 400, "invalid_request_error",
     "messages[0].role:"),
    ("role missing", body(messages=[{"content": "x"}]), 400, "invalid_request_error", "messages[0].role:"),
    ("content missing", body(messages=[{"role": "user"}]), 400, "invalid_request_error", "messages[0].content:"),
    ("content null", body(messages=[{"role": "user", "content": None}]), 400, "invalid_request_error",
     "messages[0].content:"),
    ("empty user turn", body(messages=[{"role": "user", "content": []}, *OK]), 400, "invalid_request_error",
     "non-empty"),
    ("block without type", body(messages=[{"role": "user", "content": [{"text": "x"}]}]), 400,
     "invalid_request_error", "messages[0].content[0].type:"),
    ("text block without text", body(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400,
     "invalid_request_error", "messages[0].content[0].text: Field required"),
    ("image media type", body(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/tiff", "data": "x"}}]}]), 400,
     "invalid_request_error", "messages[0].content[0].source.media_type:"),
    ("image no data", body(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png"}}]}]), 400,
     "invalid_request_error", "source.data: Field required"),
    ("image bad url", body(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "file:///etc/passwd"}}]}]), 400,
     "invalid_request_error", "source.url"),
    ("image in assistant", body(messages=[*OK, {"role": "assistant", "content": [IMAGE]}]), 400,
     "invalid_request_error", "not allowed in assistant messages"),
    ("pdf document", body(messages=[{"role": "user", "content": [{"type": "document", "source": {
        "type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}]}]), 400,
     "invalid_request_error", "PDFs"),
    ("tool_result without tool_use", body(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_x", "content": "r"}]}]), 400, "invalid_request_error",
     "unexpected `tool_use_id`"),
    ("tool_result wrong id", body(messages=[*OK, CALL, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "r"}]}]), 400, "invalid_request_error",
     "messages[2].content[0]: unexpected"),
    ("tool_use unanswered", body(messages=[*OK, CALL, *OK]), 400, "invalid_request_error",
     "messages[1]: `tool_use` ids were found without `tool_result`"),
    ("tool_result in assistant", body(messages=[*OK, {"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": "r"}]}]), 400, "invalid_request_error",
     "not allowed in assistant messages"),
    ("tool_use input string", body(messages=[*OK, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": "{}"}]}]), 400, "invalid_request_error", ".input:"),
    ("system number", body(system=5), 400, "invalid_request_error", "system:"),
    ("system image block", body(system=[IMAGE]), 400, "invalid_request_error", "system[0].type:"),
    ("temperature 2", body(temperature=2), 400, "invalid_request_error", "temperature:"),
    ("top_p string", body(top_p="high"), 400, "invalid_request_error", "top_p:"),
    ("stop_sequences string", body(stop_sequences="END"), 400, "invalid_request_error", "stop_sequences:"),
    ("stream string", body(stream="yes"), 400, "invalid_request_error", "stream:"),
    ("tools not list", body(tools={"name": "f"}), 400, "invalid_request_error", "tools:"),
    ("tool missing schema", body(tools=[{"name": "f"}]), 400, "invalid_request_error",
     "tools[0].input_schema: Field required"),
    ("tool bad name", body(tools=[{"name": "no spaces", "input_schema": {"type": "object"}}]), 400,
     "invalid_request_error", "tools[0].name:"),
    ("tool_choice unknown", body(tool_choice={"type": "required"}), 400, "invalid_request_error",
     "tool_choice.type:"),
    ("tool_choice tool missing", body(tools=[{"name": "f", "input_schema": {"type": "object"}}],
                                      tool_choice={"type": "tool", "name": "g"}), 400, "invalid_request_error",
     "tool_choice.name:"),
    ("thinking budget small", body(thinking={"type": "enabled", "budget_tokens": 100}), 400,
     "invalid_request_error", "thinking.budget_tokens:"),
    ("thinking budget over max", body(max_tokens=2000, thinking={"type": "enabled", "budget_tokens": 4000}), 400,
     "invalid_request_error", "greater than thinking.budget_tokens"),
    ("thinking no type", body(thinking={"budget_tokens": 2000}), 400, "invalid_request_error", "thinking.type:"),
    ("effort unknown", body(output_config={"effort": "ludicrous"}), 400, "invalid_request_error",
     "output_config.effort:"),
    ("output format unknown", body(output_config={"format": {"type": "xml"}}), 400, "invalid_request_error",
     "output_config.format.type:"),
    ("metadata not object", body(metadata="u1"), 400, "invalid_request_error", "metadata:"),
    ("unknown model", body(model="no-such-model"), 404, "not_found_error", "no-such-model"),
]


@pytest.mark.parametrize(("name", "payload", "status", "kind", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_messages_request_gets_anthropic_error(
    gateway: GatewayProcess, api_key: str, name: str, payload: Any, status: int, kind: str, fragment: str
) -> None:
    headers = {"x-api-key": api_key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    url = gateway.url + "/v1/messages"
    r = httpx.post(url, content=payload, headers=headers) if isinstance(payload, bytes) else httpx.post(
        url, json=payload, headers=headers
    )
    assert r.status_code == status, r.text
    data = r.json()
    assert set(data) == {"type", "error", "request_id"} and data["type"] == "error"
    assert data["error"]["type"] == kind
    assert fragment in data["error"]["message"]
    assert data["request_id"] == r.headers["request-id"] and data["request_id"].startswith("req_")
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "missing"),
        ({"x-api-key": "sk-mesh-not-a-real-key"}, "unknown x-api-key"),
        ({"Authorization": "Bearer sk-mesh-not-a-real-key"}, "unknown bearer"),
        ({"Authorization": "Basic abc"}, "wrong scheme"),
    ],
)
def test_bad_credentials_are_401_authentication_error(
    gateway: GatewayProcess, headers: dict[str, str], why: str
) -> None:
    r = httpx.post(gateway.url + "/v1/messages", json=body(), headers={**headers, "anthropic-version": "2023-06-01"})
    assert r.status_code == 401, why
    assert r.json()["error"]["type"] == "authentication_error"
    assert "sk-mesh-not-a-real-key" not in r.text


def test_count_tokens_bad_input(gateway: GatewayProcess, api_key: str) -> None:
    r = httpx.post(
        gateway.url + "/v1/messages/count_tokens",
        json={"model": "test-model", "messages": [{"role": "wizard", "content": "x"}]},
        headers={"x-api-key": api_key},
    )
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("messages[0].role:")


def test_body_too_large_is_413(gateway: GatewayProcess, api_key: str) -> None:
    big = b'{"model":"test-model","max_tokens":5,"messages":[{"role":"user","content":"' + b"x" * (33 << 20) + b'"}]}'
    r = httpx.post(
        gateway.url + "/v1/messages", content=big, headers={"x-api-key": api_key, "content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_out_of_credit_is_402_billing_error(gateway: GatewayProcess, admin: Any) -> None:
    account = admin.account("broke", credits=None)
    key = admin.key(account, name="broke")["key"]
    r = httpx.post(gateway.url + "/v1/messages", json=body(), headers={"x-api-key": key})
    assert r.status_code == 402, r.text
    assert r.json()["error"]["type"] == "billing_error"
