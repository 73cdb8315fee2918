"""What reaches the engine: documented fields plus the extensions the model enables, for all
three protocols. The test engine records every body it receives."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from testengine.harness import EngineProcess

DANGEROUS = {
    "logits_processors": ["evil.module:Processor"],
    "chat_template": "{{ raise_exception('pwned') }}",
    "priority": -1000,
    "vllm_xargs": {"x": 1},
    "kv_transfer_params": {"remote": "x"},
    "guided_regex": "(a+)+$",
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def gw(engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    work = tmp_path_factory.mktemp("extensions")
    models = engine_models(engine.base_url)
    models[1] = {**models[1], "engine_extensions": ["guided_json", "min_p"]}  # test-reasoner
    with GatewayProcess({"database": f"sqlite:///{work}/mesh.db", "models": models}, work) as gateway:
        admin = Admin(gateway.url)
        key = admin.key(admin.account("ext", credits="100"))["key"]
        admin.close()
        yield gateway, key


def _sent(engine: EngineProcess, marker: str) -> dict[str, Any] | None:
    for body in reversed(httpx.get(engine.url + "/control/requests").json()):
        if marker in json.dumps(body["messages"]):
            return dict(body)
    return None


def _call(
    gateway: GatewayProcess, key: str, protocol: str, model: str, marker: str, extra: dict[str, Any]
) -> httpx.Response:
    msgs = [{"role": "user", "content": marker}]
    if protocol == "chat":
        return httpx.post(gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": model, "messages": msgs, "max_tokens": 5, **extra}, timeout=30)
    if protocol == "responses":
        return httpx.post(gateway.base_url + "/responses", headers={"Authorization": f"Bearer {key}"},
                          json={"model": model, "input": marker, "max_output_tokens": 16, "store": False, **extra},
                          timeout=30)
    return httpx.post(gateway.base_url + "/messages", headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                      json={"model": model, "messages": msgs, "max_tokens": 5, **extra}, timeout=30)


@pytest.mark.parametrize("protocol", ["chat", "responses", "messages"])
@pytest.mark.parametrize("field", sorted(DANGEROUS))
def test_dangerous_engine_fields_are_refused_and_never_reach_the_engine(
    gw: tuple[GatewayProcess, str], engine: EngineProcess, protocol: str, field: str
) -> None:
    gateway, key = gw
    marker = f"marker-danger-{protocol}-{field}"
    r = _call(gateway, key, protocol, "test-model", marker, {field: DANGEROUS[field]})
    assert r.status_code == 400, r.text
    body = r.json()
    message = body["error"]["message"]
    assert field in message
    if protocol != "messages":
        assert body["error"]["param"] == field and body["error"]["code"] == "unsupported_parameter"
    else:
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert _sent(engine, marker) is None


@pytest.mark.parametrize("protocol", ["chat", "responses", "messages"])
def test_unknown_fields_are_dropped_and_enabled_extensions_forwarded(
    gw: tuple[GatewayProcess, str], engine: EngineProcess, protocol: str
) -> None:
    gateway, key = gw
    marker = f"marker-allowed-{protocol}"
    extra = {"not_a_field": {"chat_template": "x"}, "min_p": 0.1, "guided_json": {"type": "object"}}
    r = _call(gateway, key, protocol, "test-reasoner", marker, extra)
    assert r.status_code == 200, r.text
    sent = _sent(engine, marker)
    assert sent is not None
    assert "not_a_field" not in sent
    assert sent["min_p"] == 0.1 and sent["guided_json"] == {"type": "object"}
    # The same guided_json is refused for a model that does not enable it.
    r = _call(gateway, key, protocol, "test-model", marker + "-closed", {"guided_json": {"type": "object"}})
    assert r.status_code == 400 and _sent(engine, marker + "-closed") is None


def test_chat_template_kwargs_cannot_carry_a_template(gw: tuple[GatewayProcess, str], engine: EngineProcess) -> None:
    gateway, key = gw
    r = _call(gateway, key, "chat", "test-model", "marker-tk",
              {"chat_template_kwargs": {"chat_template": "{{ 7*7 }}"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs.chat_template"
    assert _sent(engine, "marker-tk") is None
    r = _call(gateway, key, "chat", "test-model", "marker-tk-ok", {"chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200
    sent = _sent(engine, "marker-tk-ok")
    assert sent is not None and sent["chat_template_kwargs"] == {"enable_thinking": False}


@pytest.mark.parametrize("protocol", ["chat", "responses", "messages"])
def test_deeply_nested_json_is_a_400_at_parse_time(gw: tuple[GatewayProcess, str], protocol: str) -> None:
    gateway, key = gw
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(450):  # 900 levels: within orjson's parser, past its serialiser
        schema = {"type": "object", "properties": {"x": schema}}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    extra = {"tools": [tool]} if protocol == "chat" else {"tools_probe": schema}
    r = _call(gateway, key, protocol, "test-model", "marker-deep", extra)
    assert r.status_code == 400, r.text
    assert "nests deeper" in r.text


@pytest.mark.parametrize("smuggled", [
    {"continue_final_message": True, "add_generation_prompt": False},
    {"mm_processor_kwargs": "x"}, {"documents": "x"}, {"tokenize": True},
], ids=["continue_final_message", "mm_processor_kwargs", "documents", "tokenize"])
def test_chat_template_kwargs_cannot_carry_an_extension_the_model_does_not_enable(
    gw: tuple[GatewayProcess, str], engine: EngineProcess, smuggled: dict[str, Any]
) -> None:
    # vLLM merges chat_template_kwargs over its own template arguments: a known extension
    # named inside acts as if sent at the top level, where it would be a 400 (red team).
    gateway, key = gw
    marker = "marker-smuggle-" + next(iter(smuggled))
    r = _call(gateway, key, "chat", "test-model", marker, {"chat_template_kwargs": smuggled})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("chat_template_kwargs.")
    assert _sent(engine, marker) is None
