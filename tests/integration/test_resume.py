"""Streams that survive their replica (issue 20): real gateway, three test-engine replicas.

A replica that dies after the first byte (SIGKILL under load, or a dropped connection)
hands the answer to another replica as a continuation; the client sees one uninterrupted
answer, equal to the one it would have got, billed once for its prompt and its output.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import openai
import pytest

from conftest import TEST_PRICING
from support.gateway import ADMIN_KEY, Admin, GatewayProcess
from support.postgres import temporary_database
from testengine import tokens
from testengine.harness import EngineProcess

TOKENS = 24
ANSWER = " ".join(f"tok{i}" for i in range(TOKENS))
PROTOCOLS = ("chat", "responses", "messages")


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two gateways on one PostgreSQL database in front of three replicas (as measured in issue 20)."""
    replicas = [EngineProcess(models="test-model,test-reasoner", name=f"resume-{i}").start() for i in range(3)]
    work = tmp_path_factory.mktemp("resume")
    engines = [
        {"type": "openai", "base_url": r.base_url, "model": "test-model", "name": r.name, "connect_timeout": 1}
        for r in replicas
    ]
    try:
        with temporary_database(request, "postgresql", work) as url:
            config = {
                "database": url,
                "logging": {"level": "INFO"},  # the request lines (JSON)
                # Every test here breaks one stream on purpose: a breaker that opened on those
                # drops (two on one replica within a second, under load) would leave a later
                # test no replica to resume on. A dead replica leaves by its health checks.
                "routing": {"health_interval": 0.3, "breaker_cooldown": 1.0, "failure_threshold": 1000,
                            "policy": "least_outstanding"},
                "models": [
                    {"id": "pooled", "context_length": 4096, "pricing": TEST_PRICING, "engines": engines},
                    {"id": "pooled-reasoner", "context_length": 4096, "pricing": TEST_PRICING, "reasoning": True,
                     "engines": [{**e, "model": "test-reasoner", "name": e["name"] + "-r"} for e in engines]},
                ],
            }
            # One after the other: the first one migrates the new database.
            with GatewayProcess(config, work) as gw, GatewayProcess(config, work) as peer:
                admin = Admin(gw.url)
                account = admin.account("resume", credits="100")
                try:
                    yield {"gw": gw, "peer": peer, "admin": admin, "replicas": replicas,
                           "key": admin.key(account)["key"]}
                finally:
                    admin.close()
    finally:
        for r in replicas:
            r.stop()


@dataclass
class Answer:
    """What a client saw of one streamed answer."""

    protocol: str
    id: str = ""
    text: str = ""
    starts: int = 0  # role / message_start / response.created events: exactly one each
    error: str | None = None
    ids: set[str] = field(default_factory=set)
    via: GatewayProcess | None = None  # the gateway that answered (its usage writer has the record)


def ask(gw: GatewayProcess, key: str, protocol: str, prompt: str, **extra: Any) -> Answer:
    out = Answer(protocol, via=gw)
    try:
        if protocol == "chat":
            with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30) as client:
                for chunk in client.chat.completions.create(
                    model="pooled", messages=[{"role": "user", "content": prompt}], stream=True, **extra
                ):
                    out.ids.add(chunk.id)
                    for c in chunk.choices:
                        out.starts += c.delta.role == "assistant"
                        out.text += c.delta.content or ""
            out.id = next(iter(out.ids))
        elif protocol == "responses":
            with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30) as client:
                for ev in client.responses.create(model="pooled", input=prompt, stream=True):
                    if ev.type == "response.created":
                        out.starts += 1
                        out.id = ev.response.id
                    elif ev.type == "response.output_text.delta":
                        out.text += ev.delta
                    elif ev.type == "response.failed":
                        out.error = "response.failed"
        else:
            with anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=30) as client:
                with client.messages.stream(
                    model="pooled", max_tokens=200, messages=[{"role": "user", "content": prompt}]
                ) as stream:
                    for ev in stream:
                        if ev.type == "message_start":
                            out.starts += 1
                            out.id = ev.message.id
                        elif ev.type == "content_block_delta" and ev.delta.type == "text_delta":
                            out.text += ev.delta.text
    except (openai.APIError, anthropic.APIError) as exc:
        out.error = type(exc).__name__
    return out


def generation(gw: GatewayProcess, key: str, answer_id: str) -> dict[str, Any]:
    httpx.post(gw.url + "/admin/v1/flush", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    r = httpx.get(f"{gw.base_url}/generations/{answer_id}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    r.raise_for_status()
    found: dict[str, Any] = r.json()
    return found


def tokens_of(record: dict[str, Any]) -> tuple[int, int]:
    return record["usage"]["input_tokens"], record["usage"]["output_tokens"]


def resumes(gw: GatewayProcess, outcome: str) -> float:
    text = httpx.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).text
    for line in text.splitlines():
        if line.startswith("mesh_stream_resumes_total{") and f'outcome="{outcome}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def first_prompt(replicas: list[EngineProcess], marker: str) -> int:
    """Prompt tokens of the first engine request carrying ``marker``, as the engine counts them."""
    for r in replicas:
        if not r.running:
            continue
        for body in r.requests():
            if marker in str(body["messages"][0]) and not body.get("continue_final_message"):
                return tokens.prompt_tokens(body["messages"])
    raise AssertionError(f"no engine saw {marker}")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_dropped_stream_resumes_on_another_replica_and_bills_once(fleet: dict[str, Any], protocol: str) -> None:
    gw, key, replicas = fleet["gw"], fleet["key"], fleet["replicas"]
    before = resumes(gw, "resumed")
    marker = f"drop-{protocol}"
    got = ask(gw, key, protocol, f"[tokens:{TOKENS}] [fault:drop] {marker}")  # its first replica drops at 3 chunks
    assert got.error is None and got.text == ANSWER and got.starts == 1
    assert resumes(gw, "resumed") == before + 1
    record = generation(gw, key, got.id)
    assert record["status"] == "ok"
    assert record["usage"]["output_tokens"] == TOKENS  # each delivered token once
    assert record["usage"]["input_tokens"] == first_prompt(replicas, marker)  # the prompt once
    sent = [b for r in replicas for b in r.requests() if marker in str(b["messages"][0])]
    [first] = [b for b in sent if "continue_final_message" not in b]
    [follow] = [b for b in sent if b.get("continue_final_message") is True]
    assert follow["add_generation_prompt"] is False
    assert follow["messages"] == [*first["messages"], {"role": "assistant", "content": "tok0 tok1 tok2"}]
    if protocol == "messages":  # the one protocol here that always sends max_tokens
        assert follow["max_tokens"] == first["max_tokens"] - 3
    else:
        assert "max_tokens" not in first and "max_tokens" not in follow
    rid = "req_" + got.id.removeprefix("chatcmpl-").removeprefix("msg_").removeprefix("resp_")
    [line] = [json.loads(ln) for ln in gw.log().splitlines() if rid in ln and '"msg":"request"' in ln]
    assert line["resume_outcome"] == "resumed" and line["reprocessed_tokens"] > 0
    assert line["resume"].startswith("resumed resume-") and "at 3 (engine)" in line["resume"]


def test_an_engine_error_mid_stream_resumes_unless_it_is_the_requests_own(fleet: dict[str, Any]) -> None:
    gw, key = fleet["gw"], fleet["key"]
    before = resumes(gw, "resumed"), resumes(gw, "refused")
    failed = ask(gw, key, "chat", f"[tokens:{TOKENS}] [fault:error_500] engine-died")  # vLLM's error event
    assert failed.error is None and failed.text == ANSWER
    assert resumes(gw, "resumed") == before[0] + 1
    refused = ask(gw, key, "chat", f"[tokens:{TOKENS}] [fault:error_400] content-error")
    assert refused.error == "APIError" and refused.text == "tok0 tok1 tok2"  # another replica would fail it too
    assert (resumes(gw, "resumed"), resumes(gw, "refused")) == (before[0] + 1, before[1] + 1)


NON_STREAMED = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "{prompt}"}]}),
    "responses": ("/v1/responses", {"input": "{prompt}"}),
    "messages": ("/v1/messages", {"max_tokens": 200, "messages": [{"role": "user", "content": "{prompt}"}]}),
}


def answer_text(protocol: str, body: dict[str, Any]) -> str:
    if protocol == "chat":
        return str(body["choices"][0]["message"]["content"])
    if protocol == "responses":
        return "".join(c["text"] for item in body["output"] if item["type"] == "message" for c in item["content"])
    return "".join(b["text"] for b in body["content"] if b["type"] == "text")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_non_streamed_answer_resumes_before_it_is_answered(fleet: dict[str, Any], protocol: str) -> None:
    gw, key, replicas = fleet["gw"], fleet["key"], fleet["replicas"]
    before = resumes(gw, "resumed")
    marker = f"whole-{protocol}"
    path, body = NON_STREAMED[protocol]
    body = json.loads(json.dumps(body).replace("{prompt}", f"[tokens:{TOKENS}] [fault:drop] {marker}"))
    r = httpx.post(gw.url + path, json={"model": "pooled", **body}, timeout=30,
                   headers={"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text
    assert answer_text(protocol, r.json()) == ANSWER
    assert resumes(gw, "resumed") == before + 1
    record = generation(gw, key, r.headers["x-request-id"])
    assert record["status"] == "ok"
    assert tokens_of(record) == (first_prompt(replicas, marker), TOKENS)


def test_reasoning_delivered_so_far_is_part_of_the_continuation(fleet: dict[str, Any]) -> None:
    gw, key, replicas = fleet["gw"], fleet["key"], fleet["replicas"]

    def chat(prompt: str) -> tuple[str, str]:
        thought, said = "", ""
        body = {"model": "pooled-reasoner", "stream": True, "messages": [{"role": "user", "content": prompt}]}
        with httpx.stream("POST", gw.base_url + "/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    for c in chunk["choices"]:
                        thought += c["delta"].get("reasoning_content") or ""
                        said += c["delta"].get("content") or ""
        return thought, said

    whole = chat("think it over marker-reasoning")
    resumed = chat("think it over [fault:drop] marker-reasoning")  # drops after 3 pieces of thinking
    assert resumed == whole and whole[0] and whole[1]
    [follow] = [b for r in replicas for b in r.requests()
                if "marker-reasoning" in str(b["messages"][0]) and b.get("continue_final_message")]
    assert follow["messages"][-1] == {"role": "assistant", "content": "", "reasoning_content": "Let me think"}


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"},
                                            "days": {"type": "integer"}, "detail": {"type": "string"}}}
TOOL_CALLS = {  # path, body, and how the protocol's stream ends in error
    "chat": ("/v1/chat/completions", {
        "stream": True, "messages": [{"role": "user", "content": "[fault:drop] weather?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]},
        'data: {"error"'),
    "responses": ("/v1/responses", {
        "stream": True, "input": "[fault:drop] weather?",
        "tools": [{"type": "function", "name": "get_weather", "parameters": WEATHER}]}, "event: response.failed"),
    "messages": ("/v1/messages", {
        "stream": True, "max_tokens": 200, "messages": [{"role": "user", "content": "[fault:drop] weather?"}],
        "tools": [{"name": "get_weather", "input_schema": WEATHER}]}, "event: error"),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_drop_mid_tool_call_ends_with_the_error_event_and_bills_what_was_delivered(
    fleet: dict[str, Any], protocol: str,
) -> None:
    gw, key = fleet["gw"], fleet["key"]
    before = resumes(gw, "refused"), resumes(gw, "resumed")
    path, body, error_event = TOOL_CALLS[protocol]
    with httpx.stream("POST", gw.url + path, json={"model": "pooled", **body}, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        text = r.read().decode()
    assert "get_weather" in text  # the call had started when the replica dropped
    assert error_event in text  # and the stream ended with the protocol's error event
    assert (resumes(gw, "refused"), resumes(gw, "resumed")) == (before[0] + 1, before[1])
    record = generation(gw, key, rid)
    full = tokens.count('get_weather{"city": "Paris", "unit": "test", "days": 1, "detail": "test"}')
    assert record["status"] == "error"
    assert 0 < record["usage"]["output_tokens"] <= full  # what the engine counted when it broke, no more


def _load(gateways: list[GatewayProcess], key: str, stop: threading.Event, answers: list[Answer]) -> None:
    def worker(gw: GatewayProcess, protocol: str) -> None:
        while not stop.is_set():
            answers.append(ask(gw, key, protocol, f"[tokens:{TOKENS}] [chunk_delay:0.03] load {protocol}"))

    threads = [threading.Thread(target=worker, args=(gw, p)) for p in PROTOCOLS for gw in gateways]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_sigkill_of_a_replica_under_streaming_load_costs_no_answer(fleet: dict[str, Any]) -> None:
    gw, key, replicas = fleet["gw"], fleet["key"], fleet["replicas"]
    baseline = {p: ask(gw, key, p, f"[tokens:{TOKENS}] [chunk_delay:0.03] load {p}") for p in PROTOCOLS}
    billed = {p: tokens_of(generation(gw, key, a.id)) for p, a in baseline.items()}
    assert all(a.text == ANSWER and a.error is None for a in baseline.values())
    before = resumes(gw, "resumed") + resumes(fleet["peer"], "resumed")
    victim = replicas[2]
    stop, answers = threading.Event(), []
    load = threading.Thread(target=_load, args=([gw, fleet["peer"]], key, stop, answers))
    load.start()
    try:
        deadline = time.monotonic() + 10
        while victim.stats()["streaming"] < 2:  # it is in the middle of answers right now
            assert time.monotonic() < deadline, "the victim got no traffic"
            time.sleep(0.01)
        victim.kill()
        time.sleep(1.5)
    finally:
        stop.set()
        load.join()
        victim.restart()
    assert len(answers) >= 6  # every worker finished at least one answer
    assert [a for a in answers if a.error is not None] == []  # no client saw an error
    assert [a for a in answers if a.text != ANSWER or a.starts != 1] == []  # each answer as if uninterrupted
    resumed = resumes(gw, "resumed") + resumes(fleet["peer"], "resumed") - before
    assert resumed >= 1
    for a in answers:
        assert a.via is not None
        assert tokens_of(generation(a.via, key, a.id)) == billed[a.protocol], a  # billed exactly once
    print(f"{len(answers)} answers, {resumed:g} resumed after the SIGKILL")
