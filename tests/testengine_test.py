"""The test engine (tests/testengine) speaks vLLM's OpenAI wire format well enough for the official SDK."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from testengine.harness import EngineProcess

WEATHER_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
        },
    },
]


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineProcess]:
    with EngineProcess(name="replica-a") as proc:
        yield proc


@pytest.fixture
def client(engine: EngineProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=engine.base_url, api_key="x", max_retries=0, timeout=20) as c:
        yield c


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_plain_completion(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="test-model", messages=user("What is the capital of France?"))
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == "test-model"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello! You said: What is the capital of France?"
    assert choice.finish_reason == "stop"
    assert choice.model_extra is not None and choice.model_extra["stop_reason"] is None
    assert resp.usage is not None
    # 4 + 6 tokens for the message, + 2 for the prompt; 9 tokens of reply.
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (12, 9)
    assert resp.usage.total_tokens == 21
    assert resp.usage.prompt_tokens_details is not None
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    assert "reasoning_content" not in (choice.message.model_extra or {})


def test_stream_usage_only_in_last_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="test-model",
            messages=user("one two three"),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *body, last = chunks
    assert all(c.usage is None for c in body)
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 6
    assert body[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == "Hello! You said: one two three"
    finals = [c for c in body if c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert len({c.id for c in chunks}) == 1


def test_stream_without_usage_and_continuous_usage(engine: EngineProcess, client: openai.OpenAI) -> None:
    plain = list(client.chat.completions.create(model="test-model", messages=user("hi"), stream=True))
    assert all(c.usage is None and c.choices for c in plain)
    raw = httpx.post(
        engine.base_url + "/chat/completions",
        json={
            "model": "test-model",
            "messages": user("hi"),
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: {")]
    assert raw.text.endswith("data: [DONE]\n\n")
    assert [e["usage"]["completion_tokens"] for e in events[:-1]] == [0, 1, 2, 3, 4, 4]


def test_tool_call_stream_accumulates_valid_json(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="test-model", messages=user("Weather in Paris?"), tools=WEATHER_TOOLS, stream=True
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    fragments = 0
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                if tc.id:
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
                    fragments += 1
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    assert calls[0]["id"].startswith("call_") and len(calls[0]["id"]) == 29
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": 1, "metric": True}
    assert fragments >= 3


def test_tool_call_helper_and_args_directive(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model="test-model",
        messages=user('go [args:{"city": "Oslo", "days": 3}]'),
        tools=WEATHER_TOOLS,
    ) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls
    assert call is not None and call[0].type == "function"
    assert json.loads(call[0].function.arguments) == {"city": "Oslo", "days": 3}


def test_parallel_and_named_tool_calls(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="test-model", messages=user("both [parallel]"), tools=WEATHER_TOOLS)
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls"
    assert msg.content is None
    assert msg.tool_calls is not None
    assert [c.function.name for c in msg.tool_calls] == ["get_weather", "get_time"]  # type: ignore[union-attr]
    assert len({c.id for c in msg.tool_calls}) == 2
    named = client.chat.completions.create(
        model="test-model",
        messages=user("time?"),
        tools=WEATHER_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert named.choices[0].message.tool_calls is not None
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"  # type: ignore[union-attr]
    none = client.chat.completions.create(
        model="test-model", messages=user("no tools"), tools=WEATHER_TOOLS, tool_choice="none"
    )
    assert none.choices[0].message.content == "Hello! You said: no tools"


def test_tool_result_turn(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        *user("Weather?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
    ]
    resp = client.chat.completions.create(model="test-model", messages=messages, tools=WEATHER_TOOLS)
    assert resp.choices[0].message.content == "Tool result: sunny | noon"
    assert resp.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("model", "field"), [("test-reasoner", "reasoning_content"), ("test-reasoner-vllm", "reasoning")]
)
def test_reasoning_fields(client: openai.OpenAI, model: str, field: str) -> None:
    resp = client.chat.completions.create(model=model, messages=user("think hard"))
    extra = resp.choices[0].message.model_extra or {}
    assert extra[field] == "Let me think about this. The user wrote 2 words."
    assert resp.choices[0].message.content == "Hello! You said: think hard"
    assert resp.usage is not None and resp.usage.completion_tokens_details is not None
    assert resp.usage.completion_tokens_details.reasoning_tokens == 10
    assert resp.usage.completion_tokens == 15

    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model=model, messages=user("think hard"), stream=True):
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get(field) or ""
        assert content == "" or not (delta.model_extra or {}).get(field), "reasoning must come before content"
        content += delta.content or ""
    assert reasoning == extra[field]
    assert content == "Hello! You said: think hard"

    off = client.chat.completions.create(
        model=model, messages=user("quick"), extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert (off.choices[0].message.model_extra or {}).get(field) is None
    assert off.usage is not None and off.usage.completion_tokens == 4


def test_reasoner_still_reasons_before_tool_calls(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="test-reasoner", messages=user("weather"), tools=WEATHER_TOOLS)
    msg = resp.choices[0].message
    assert (msg.model_extra or {})["reasoning_content"]
    assert msg.tool_calls and resp.choices[0].finish_reason == "tool_calls"


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="test-model", messages=user("[tokens:50]"), max_tokens=5)
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    chunks = list(
        client.chat.completions.create(
            model="test-reasoner", messages=user("a b c"), max_completion_tokens=3, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""


def test_stop_gives_stop_reason(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="test-model", messages=user("[tokens:10]"), stop=["tok3", "tok7"])
    choice = resp.choices[0]
    assert choice.message.content == "tok0 tok1 tok2 "
    assert choice.finish_reason == "stop"
    assert (choice.model_extra or {})["stop_reason"] == "tok3"
    chunks = list(client.chat.completions.create(model="test-model", messages=user("abc xyz"), stop="xyz", stream=True))
    final = chunks[-1].choices[0]
    assert final.finish_reason == "stop" and (final.model_extra or {})["stop_reason"] == "xyz"


def test_n_choices_and_logprobs(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="test-model", messages=user("hi"), n=2, logprobs=True, top_logprobs=2)
    assert [c.index for c in resp.choices] == [0, 1]
    lp = resp.choices[1].logprobs
    assert lp is not None and lp.content is not None
    assert [t.token for t in lp.content] == ["Hello!", " You", " said:", " hi"]
    assert lp.content[0].bytes == list(b"Hello!") and len(lp.content[0].top_logprobs) == 2
    chunks = list(client.chat.completions.create(model="test-model", messages=user("hi"), n=2, stream=True))
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) for i in (0, 1)]
    assert texts == ["Hello! You said: hi"] * 2
    assert chunks[0].choices[0].index == 0 and chunks[1].choices[0].index == 1  # interleaved


def test_json_mode_and_continue_final_message(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="test-model", messages=user('say "hi" [delay:0.01]'), response_format={"type": "json_object"}
    )
    assert json.loads(resp.choices[0].message.content or "") == {"answer": 'say "hi"'}
    cont = client.chat.completions.create(
        model="test-model",
        messages=[*user("story"), {"role": "assistant", "content": "Once upon a time"}],
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert cont.choices[0].message.content == " and so it continues."


def test_injected_http_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="test-model", messages=user("boom [fault:500]"))
    assert err.value.status_code == 500
    assert err.value.body == {
        "message": "injected failure",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="test-model", messages=user("slow down [fault:429]"))
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=user("hi"))
    assert missing.value.body == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="test-model", messages=[])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="test-model", messages=user("hi"), max_tokens=100_000)


def test_drop_breaks_the_stream(client: openai.OpenAI) -> None:
    received = []
    with pytest.raises(openai.APIConnectionError):
        stream = client.chat.completions.create(
            model="test-model", messages=user("a long answer please [fault:drop]"), stream=True
        )
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 4  # the role chunk and three content chunks, then nothing
    assert all(c.choices[0].finish_reason is None for c in received)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="test-model", messages=user("x [fault:drop]"))


def test_control_faults(engine: EngineProcess, client: openai.OpenAI) -> None:
    engine.fault("500", count=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="test-model", messages=user("hi"))
    assert client.chat.completions.create(model="test-model", messages=user("hi")).choices[0].message.content
    engine.fault("slow_first_token", delay=0.5)
    started = time.monotonic()
    client.chat.completions.create(model="test-model", messages=user("hi"))
    assert time.monotonic() - started >= 0.5
    engine.fault("hang")
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).chat.completions.create(model="test-model", messages=user("hi"))
    wait_for(lambda: engine.stats()["in_flight"] == 0)


def test_control_requests_records_bodies(engine: EngineProcess, client: openai.OpenAI) -> None:
    engine.clear_requests()
    client.chat.completions.create(model="test-model", messages=user("first"), temperature=0.3)
    client.chat.completions.create(model="test-model", messages=user("second"), extra_body={"top_k": 5})
    bodies = engine.requests()
    assert [b["messages"][0]["content"] for b in bodies] == ["first", "second"]
    assert bodies[0]["temperature"] == 0.3 and bodies[1]["top_k"] == 5
    engine.clear_requests()
    assert engine.requests() == []


def test_disconnect_cancels_and_metrics_count_in_flight(engine: EngineProcess) -> None:
    before = engine.stats()["cancelled"]
    body = {"model": "test-model", "messages": user("[tokens:100] [chunk_delay:0.1]"), "stream": True}
    with httpx.Client(timeout=10) as http, http.stream("POST", engine.base_url + "/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        metrics = engine.metrics()
        assert 'vllm:num_requests_running{model_name="test-model"} 1.0' in metrics
        assert engine.stats()["in_flight"] == 1
    wait_for(lambda: engine.stats()["cancelled"] == before + 1)
    assert engine.stats()["in_flight"] == 0
    assert 'vllm:num_requests_running{model_name="test-model"} 0.0' in engine.metrics()


def test_prefix_cache_imitation(client: openai.OpenAI) -> None:
    system: Any = {"role": "system", "content": "You are a very helpful assistant for caching tests."}
    first = client.chat.completions.create(model="test-model", messages=[system, *user("hello")])
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    reply = first.choices[0].message.content
    second = client.chat.completions.create(
        model="test-model",
        messages=[system, *user("hello"), {"role": "assistant", "content": reply}, *user("again")],
    )
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    # system (4+9) + user (4+1) + assistant (4+4)
    assert second.usage.prompt_tokens_details.cached_tokens == 26


def test_tokenize_models_health(engine: EngineProcess) -> None:
    assert httpx.get(engine.url + "/health").status_code == 200
    models = httpx.get(engine.base_url + "/models").json()
    assert [m["id"] for m in models["data"]] == ["test-model", "test-reasoner", "test-reasoner-vllm"]
    assert models["data"][0]["max_model_len"] == 4096
    tok = httpx.post(engine.url + "/tokenize", json={"model": "test-model", "prompt": "a b  c"}).json()
    assert tok["count"] == 3 and len(tok["tokens"]) == 3 and tok["max_model_len"] == 4096
    chat = httpx.post(engine.url + "/tokenize", json={"model": "test-model", "messages": user("a b")}).json()
    assert chat["count"] == 8


def test_kill_and_restart_on_same_port() -> None:
    with EngineProcess(models="only-model", name="replica-b") as proc:
        url = proc.url
        assert proc.stats()["name"] == "replica-b"
        proc.kill()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
        proc.restart()
        assert proc.url == url
        resp = httpx.get(url + "/v1/models")
        assert resp.headers["x-testengine-replica"] == "replica-b"
        assert [m["id"] for m in resp.json()["data"]] == ["only-model"]


def test_continuation_goes_on_from_a_prefix_of_its_own_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="test-model", messages=user("[tokens:9] go"), max_tokens=7)
    assert whole.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6"
    rest = client.chat.completions.create(
        model="test-model", max_tokens=4,
        messages=[*user("[tokens:9] go"), {"role": "assistant", "content": "tok0 tok1 tok2"}],
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert rest.choices[0].message.content == " tok3 tok4 tok5 tok6"
    assert rest.choices[0].finish_reason == "length" and rest.usage is not None and rest.usage.completion_tokens == 4
    # A reasoning model thinks on from partial thinking, then answers.
    thinking = client.chat.completions.create(model="test-reasoner", messages=user("a b"))
    thought = thinking.choices[0].message.reasoning_content  # type: ignore[attr-defined]
    on = client.chat.completions.create(
        model="test-reasoner",
        messages=[*user("a b"), {"role": "assistant", "content": "", "reasoning_content": thought[:9]}],
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert thought[:9] + on.choices[0].message.reasoning_content == thought  # type: ignore[attr-defined]
    assert on.choices[0].message.content == thinking.choices[0].message.content


def test_directive_faults_spare_a_continuation(client: openai.OpenAI) -> None:
    rest = client.chat.completions.create(
        model="test-model",
        messages=[*user("[tokens:5] [fault:drop] [stall:1]"), {"role": "assistant", "content": "tok0 tok1"}],
        extra_body={"continue_final_message": True, "add_generation_prompt": False}, stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in rest if c.choices) == " tok2 tok3 tok4"
