"""Chat Completions end to end: the official openai SDK -> gateway process -> test engine."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from conftest import engine_models
from support.gateway import ADMIN_KEY, Admin, GatewayProcess
from testengine.harness import EngineProcess


# Every test here runs against a gateway on the relay path (the default: streamed requests
# relay the engine's chunks) and one on the canonical path (routing.relay: false).
@pytest.fixture(scope="module", params=[True, False], ids=["relay", "canonical"])
def gateway(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    work = tmp_path_factory.mktemp("gateway-chat")
    config = {
        "database": f"sqlite:///{work}/mesh.db",
        "models": engine_models(engine.base_url),
        "routing": {"relay": request.param},
    }
    with GatewayProcess(config, work) as gw:
        yield gw


@pytest.fixture(scope="module")
def admin(gateway: GatewayProcess) -> Iterator[Admin]:
    client = Admin(gateway.url)
    yield client
    client.close()


@pytest.fixture
def client(gateway: GatewayProcess, api_key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.base_url, api_key=api_key, max_retries=0) as c:
        yield c


def engine_requests(engine: EngineProcess) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = httpx.get(engine.url + "/control/requests").json()
    return data


def last_engine_request(engine: EngineProcess, marker: str) -> dict[str, Any]:
    """The newest body the engine received whose messages mention ``marker``."""
    for body in reversed(engine_requests(engine)):
        if marker in json.dumps(body["messages"]):
            return body
    raise AssertionError(f"the engine never saw {marker!r}")


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}},
}


def test_chat_non_streaming_answers_with_public_model_and_cost(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="test-model", messages=[{"role": "user", "content": "hi there"}]
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "test-model"
    assert completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.content == "Hello! You said: hi there"
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens == 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # Cost = prompt * 1.0 + completion * 2.0 credits per million tokens, rounded up.
    expected = Decimal(usage.prompt_tokens * 1 + usage.completion_tokens * 2) / 1_000_000
    assert Decimal(raw.headers["x-mesh-cost"]) == expected.quantize(Decimal("0.000001"))
    assert Decimal(completion.usage.model_extra["cost"]) == Decimal(raw.headers["x-mesh-cost"])
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["request-id"] == raw.headers["x-request-id"]


def test_chat_stream_with_usage_puts_usage_only_in_last_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "stream me"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.model == "test-model" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello! You said: stream me"
    assert [c for c in chunks if c.usage is not None] == [chunks[-1]]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]


def test_chat_stream_without_include_usage_sends_no_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "no usage"}], stream=True
        )
    )
    assert chunks and all(c.usage is None for c in chunks)


def test_chat_streamed_tool_call_accumulates_to_valid_arguments(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model="test-model",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[WEATHER_TOOL],
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert calls[0].id.startswith("call_")


def test_chat_parallel_tool_calls_and_tool_loop(client: openai.OpenAI, engine: EngineProcess) -> None:
    first = client.chat.completions.create(
        model="test-model",
        messages=[{"role": "user", "content": "both please [parallel]"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
    )
    calls = first.choices[0].message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert first.choices[0].message.content is None
    messages: list[Any] = [
        {"role": "user", "content": "both please [parallel]"},
        first.choices[0].message.model_dump(exclude_none=True),
    ]
    for call, result in zip(calls, ["21C", "noon"], strict=True):
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    second = client.chat.completions.create(
        model="test-model", messages=messages, tools=[WEATHER_TOOL, TIME_TOOL]
    )
    assert second.choices[0].message.content == "Tool result: 21C | noon"
    sent = last_engine_request(engine, "noon")
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool", "tool"]
    assert sent["messages"][2]["tool_call_id"] == calls[0].id


@pytest.mark.parametrize("model", ["test-reasoner", "test-reasoner-vllm"])
def test_chat_reasoning_comes_back_as_reasoning_content(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "think"}])
    message = completion.choices[0].message
    assert message.model_extra is not None
    assert message.model_extra["reasoning_content"].startswith("Let me think")
    assert message.content == "Hello! You said: think"
    assert completion.usage is not None and completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens > 0
    chunks = list(
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "think"}], stream=True)
    )
    deltas = [(c.choices[0].delta.model_extra or {}) for c in chunks if c.choices]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    assert reasoning == message.model_extra["reasoning_content"]


def test_chat_reasoning_sent_back_reaches_the_engine(client: openai.OpenAI, engine: EngineProcess) -> None:
    client.chat.completions.create(
        model="test-reasoner",
        messages=[
            {"role": "user", "content": "marker-r1"},
            {"role": "assistant", "content": None, "reasoning_content": "prior thought",
             "tool_calls": [
                 {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
             ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        tools=[WEATHER_TOOL],
    )
    sent = last_engine_request(engine, "marker-r1")
    assert sent["messages"][1]["reasoning_content"] == "prior thought"


def test_chat_unknown_fields_pass_through_to_engine(client: openai.OpenAI, engine: EngineProcess) -> None:
    client.chat.completions.create(
        model="test-model",
        messages=[{"role": "user", "content": "marker-extra"}],
        extra_body={"top_k": 7, "repetition_penalty": 1.1, "chat_template_kwargs": {"enable_thinking": False}},
        seed=3,
        presence_penalty=0.5,
        user="end-user-1",
    )
    sent = last_engine_request(engine, "marker-extra")
    assert sent["top_k"] == 7
    assert sent["repetition_penalty"] == 1.1
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}
    assert sent["seed"] == 3 and sent["presence_penalty"] == 0.5
    assert sent["model"] == "test-model"
    assert sent["stream"] is True and sent["stream_options"]["include_usage"] is True


def test_chat_max_tokens_and_stop(client: openai.OpenAI) -> None:
    cut = client.chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "a b c d e f"}], max_completion_tokens=3
    )
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 3
    stopped = client.chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "one two three"}], stop=["two"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == "Hello! You said: one "


def test_chat_n_and_logprobs(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "two ways"}], n=2, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in completion.choices] == [0, 1]
    for c in completion.choices:
        assert c.message.content == "Hello! You said: two ways"
        assert c.logprobs is not None and c.logprobs.content is not None
        assert "".join(t.token for t in c.logprobs.content) == c.message.content
        assert len(c.logprobs.content[0].top_logprobs) == 2
    chunks = list(
        client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "two ways"}], n=2, stream=True
        )
    )
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
        assert text == "Hello! You said: two ways"


def test_chat_json_schema_response_format(client: openai.OpenAI, engine: EngineProcess) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    completion = client.chat.completions.create(
        model="test-model",
        messages=[{"role": "user", "content": "marker-json"}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
    )
    assert json.loads(completion.choices[0].message.content or "")["answer"]
    sent = last_engine_request(engine, "marker-json")
    assert sent["response_format"]["json_schema"]["schema"] == schema


def test_chat_image_parts_reach_the_engine(client: openai.OpenAI, engine: EngineProcess) -> None:
    client.chat.completions.create(
        model="test-model",
        messages=[{"role": "system", "content": "sys"}, {"role": "developer", "content": "dev"}, {
            "role": "user",
            "content": [
                {"type": "text", "text": "marker-image"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
            ],
        }],
    )
    sent = last_engine_request(engine, "marker-image")
    assert [m["role"] for m in sent["messages"]] == ["system", "system", "user"]
    assert sent["messages"][2]["content"][1] == {
        "type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}
    }


def test_chat_engine_failure_before_first_byte_is_openai_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "[fault:500]"}])
    assert info.value.status_code == 502
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "server_error" and body["message"]


def test_chat_stream_failure_after_first_byte_ends_with_error_event(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "[fault:drop] [tokens:20]"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)
    assert received, "some chunks arrive before the failure"


def cancelled_within(engine: EngineProcess, seconds: float, before: int) -> int:
    """The engine's count of cancelled requests, polled for up to ``seconds`` until it is
    above ``before``."""
    deadline = time.monotonic() + seconds
    count = httpx.get(engine.url + "/control/stats").json()["cancelled"]
    while count <= before and time.monotonic() < deadline:
        time.sleep(0.05)
        count = httpx.get(engine.url + "/control/stats").json()["cancelled"]
    return count


def test_chat_client_disconnect_cancels_upstream(gateway: GatewayProcess, api_key: str, engine: EngineProcess) -> None:
    before = httpx.get(engine.url + "/control/stats").json()["cancelled"]
    body = {
        "model": "test-model",
        "stream": True,
        "messages": [{"role": "user", "content": "[tokens:200] [chunk_delay:0.05]"}],
    }
    with httpx.stream(
        "POST", gateway.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key}"}
    ) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(3):
            next(lines)
    assert cancelled_within(engine, 5, before) > before


def test_a_client_gone_before_the_stream_starts_cancels_the_engine(
    gateway: GatewayProcess, api_key: str, engine: EngineProcess
) -> None:
    """A client that hangs up while its request is being routed (here: waiting for the
    engine's first token, within the queue patience, so no keep-alive has been sent) is gone
    before its response starts: the stream must not then run to its end for nobody."""
    before = httpx.get(engine.url + "/control/stats").json()["cancelled"]
    body = json.dumps({
        "model": "test-model", "stream": True,
        "messages": [{"role": "user", "content": "[delay:0.4] [tokens:200] [chunk_delay:0.05]"}],
    }).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(head + body)
        time.sleep(0.1)  # routed, waiting for the first token: the client leaves
    assert cancelled_within(engine, 5, before) > before  # the whole answer would take 10 s


def test_a_pipelined_client_that_leaves_cancels_the_stream_it_was_reading(
    gateway: GatewayProcess, api_key: str, engine: EngineProcess
) -> None:
    """Two streamed requests pipelined on one connection: when the client leaves while the
    first one's response waits for its first token, that engine request is cancelled (the
    second request's arrival must not hide the first from the hang-up)."""
    before = httpx.get(engine.url + "/control/stats").json()["cancelled"]

    def raw(content: str) -> bytes:
        body = json.dumps({"model": "test-model", "stream": True,
                           "messages": [{"role": "user", "content": content}]}).encode()
        return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        # The first waits 4 s for its first token: past the queue patience its response starts
        # and sends keep-alives, and nothing else would end it before the engine answers.
        sock.sendall(raw("[delay:4] [tokens:3] first") + raw("[tokens:3] second"))
        got = b""
        while b"\r\n\r\n" not in got:  # the first response has started
            got += sock.recv(65536)
    assert cancelled_within(engine, 2.5, before) > before  # before the engine's first token


def test_chat_models_list_and_get(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["test-model", "test-reasoner", "test-reasoner-vllm"]
    model = client.models.retrieve("test-model")
    assert model.id == "test-model" and model.object == "model"
    extra = model.model_extra or {}
    assert extra["context_length"] == 4096 and extra["pricing"]["output"] == "2.0"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_metrics_count_requests_and_need_the_admin_key(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "metric me"}])
    assert httpx.get(gateway.url + "/metrics").status_code == 401
    time.sleep(0.2)
    text = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert 'mesh_requests_total{model="test-model",protocol="openai.chat",status="ok"}' in text
    assert "mesh_time_to_first_token_seconds_bucket" in text
    assert 'mesh_replica_healthy{model="test-model"' in text
    assert 'mesh_tokens_total{kind="output",model="test-model"}' in text


@pytest.mark.parametrize("relay", [True, False], ids=["relay", "canonical"])
@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
def test_a_stream_shows_the_public_model_and_mesh_s_id_never_the_engine_s(
    engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory, relay: bool, include_usage: bool
) -> None:
    work = tmp_path_factory.mktemp("alias")
    alias = {**engine_models(engine.base_url)[0], "id": "public-alias"}  # the engine serves it as test-model
    with GatewayProcess({"database": f"sqlite:///{work}/mesh.db", "models": [alias],
                         "routing": {"relay": relay}}, work) as gw:
        admin = Admin(gw.url)
        try:
            key = admin.key(admin.account("alias", credits="1"))["key"]
            body: dict[str, Any] = {"model": "public-alias", "stream": True,
                                    "messages": [{"role": "user", "content": "marker-alias"}]}
            if include_usage:
                body["stream_options"] = {"include_usage": True}
            with httpx.stream("POST", gw.base_url + "/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status_code == 200
                raw = resp.read()
                request_id = resp.headers["x-request-id"]
        finally:
            admin.close()
    assert b"test-model" not in raw  # the engine's model name never reaches the client
    lines = [line[6:] for line in raw.decode().split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert {(c["id"], c["model"], c["object"]) for c in chunks} == {
        ("chatcmpl-" + request_id.removeprefix("req_"), "public-alias", "chat.completion.chunk")}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == (
        "Hello! You said: marker-alias")
    with_usage = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert with_usage == [chunks[-1]] and chunks[-1]["choices"] == []
        deltas = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
        assert chunks[-1]["usage"]["completion_tokens"] == deltas and "cost" in chunks[-1]["usage"]
        assert all("usage" in c for c in chunks)  # null on all but the last, as OpenAI does
    else:
        assert with_usage == [] and all("usage" not in c for c in chunks)
