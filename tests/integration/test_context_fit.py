"""max_tokens near the context: lowered from the replica's own token count, never to 1.

A real gateway in front of a test engine with an 8,192-token context, as the embedded
default has. Claude Code asks ``max_tokens: 32000`` of every model, with a preamble of
about 17,000 characters: the answer must still have room.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from conftest import TEST_PRICING
from support.gateway import Admin, GatewayProcess
from testengine.harness import EngineProcess

CONTEXT = 8192
# About 17,000 characters in about 2,900 of the test engine's tokens: the credit-hold
# estimate (2 bytes a token) makes it 8,500, more than the whole context.
PREAMBLE = " ".join(f"rule{i:04d}: keep it." for i in range(1000))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, EngineProcess, str]]:
    work: Path = tmp_path_factory.mktemp("context-fit")
    with EngineProcess(name="small", models="test-model", max_model_len=CONTEXT) as engine:
        config = {
            "database": f"sqlite:///{work}/mesh.db",
            "models": [
                {
                    "id": "small",
                    "context_length": CONTEXT,
                    "pricing": TEST_PRICING,
                    "engines": [{"type": "openai", "base_url": engine.base_url, "model": "test-model"}],
                }
            ],
        }
        with GatewayProcess(config, work) as gw:
            admin = Admin(gw.url)
            key = admin.key(admin.account("context", credits="1000"))["key"]
            admin.close()
            yield gw, engine, key


def test_a_cap_beyond_the_context_becomes_the_room_the_prompt_leaves(
    small: tuple[GatewayProcess, EngineProcess, str],
) -> None:
    gw, engine, key = small
    assert len(PREAMBLE) > 17_000
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    with client.messages.stream(  # as Claude Code asks
        model="small",
        max_tokens=32_000,
        system=PREAMBLE,
        messages=[{"role": "user", "content": "[tokens:40] go"}],
    ) as stream:
        msg = stream.get_final_message()
    assert msg.stop_reason == "end_turn"
    assert msg.usage.output_tokens == 40
    sent = engine.requests()[-1]
    prompt = httpx.post(engine.url + "/tokenize", json={"messages": sent["messages"]}).json()["count"]
    assert sent["max_tokens"] == CONTEXT - prompt  # exactly the room the engine's tokenizer leaves


def test_a_cap_that_fits_is_left_alone(small: tuple[GatewayProcess, EngineProcess, str]) -> None:
    gw, engine, key = small
    client = openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)
    out = client.chat.completions.create(
        model="small", max_tokens=100, messages=[{"role": "user", "content": "[tokens:5] hi"}]
    )
    assert out.choices[0].finish_reason == "stop"
    assert engine.requests()[-1]["max_tokens"] == 100


def _too_long() -> str:
    return " ".join(f"w{i}" for i in range(CONTEXT + 100))


def test_a_prompt_over_the_context_is_openais_context_length_error(
    small: tuple[GatewayProcess, EngineProcess, str],
) -> None:
    gw, engine, key = small
    engine.clear_requests()
    counted = httpx.post(engine.url + "/tokenize", json={"messages": [{"role": "user", "content": _too_long()}]})
    prompt = counted.json()["count"]
    for stream in (False, True):
        r = httpx.post(
            gw.base_url + "/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "small", "max_tokens": 32_000, "stream": stream,
                  "messages": [{"role": "user", "content": _too_long()}]},
            timeout=30,
        )
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error"
        assert f"is {CONTEXT} tokens" in err["message"] and f"in {prompt} tokens" in err["message"]
    r = httpx.post(
        gw.base_url + "/responses",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "small", "input": _too_long()},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert engine.requests() == []  # refused before any generation


def test_a_prompt_over_the_context_is_anthropics_invalid_request_error(
    small: tuple[GatewayProcess, EngineProcess, str],
) -> None:
    gw, _, key = small
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="small", max_tokens=4000, messages=[{"role": "user", "content": _too_long()}])
    body = caught.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    assert str(CONTEXT) in body["error"]["message"]
    # Counting tokens of the same prompt still answers: it is not a generation.
    count = client.messages.count_tokens(model="small", messages=[{"role": "user", "content": _too_long()}])
    assert count.input_tokens > CONTEXT
