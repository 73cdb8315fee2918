"""Every generation traceable to its cost, and spend broken down by who it was for, through
a real gateway on SQLite and PostgreSQL: ``GET /v1/generations/{id}`` with the ids each
protocol's response carried, and ``GET /v1/usage?group_by=user|tag|key|model`` summing to
what the ledger charged."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from support.postgres import temporary_database
from testengine.harness import EngineProcess

from .test_billing_e2e import settled


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gw_admin(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Admin]]:
    work = tmp_path_factory.mktemp(f"attribution-{request.param}")
    with temporary_database(request, request.param, work) as url:
        config = {"database": url, "models": engine_models(engine.base_url), "billing": {"usage_flush_interval": 0.05}}
        with GatewayProcess(config, work) as gw, Admin(gw.url) as admin:
            yield gw, admin


def _get(gw: GatewayProcess, key: str, path: str, **params: Any) -> httpx.Response:
    return httpx.get(gw.base_url + path, headers={"Authorization": f"Bearer {key}"}, params=params)


def _generation(gw: GatewayProcess, key: str, gen_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:  # usage rows are written in batches
        r = _get(gw, key, f"/generations/{gen_id}")
        if r.status_code == 200 or time.monotonic() > deadline:
            assert r.status_code == 200, r.text
            out: dict[str, Any] = r.json()
            return out
        time.sleep(0.05)


def test_generations_and_breakdowns_match_the_ledger(gw_admin: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = gw_admin
    start = Decimal("1")
    account = admin.account("attributed", credits=str(start))
    key_a, key_b = admin.key(account, name="a"), admin.key(account, name="b")
    other_key = admin.key(admin.account("other", credits="1"))["key"]
    msg = [{"role": "user", "content": "attribute me"}]

    with openai.OpenAI(base_url=gw.base_url, api_key=key_a["key"], max_retries=0) as client:
        alice = client.chat.completions.create(
            model="test-model", messages=msg, user="alice", extra_headers={"x-mesh-tags": "search"}  # type: ignore[arg-type]
        )
        bob = client.chat.completions.create(
            model="test-reasoner", messages=msg, user="bob", extra_headers={"x-mesh-tags": "chat"}  # type: ignore[arg-type]
        )
        resp = client.responses.create(
            model="test-model", input="attribute me too", user="alice", metadata={"team": "red"},
            extra_headers={"x-mesh-tags": "search"},
        )
    with anthropic.Anthropic(base_url=gw.url, api_key=key_b["key"], max_retries=0) as claude:
        carol = claude.messages.create(
            model="test-model", max_tokens=20, messages=[{"role": "user", "content": "attribute me"}],
            metadata={"user_id": "carol"},
        )

    g = _generation(gw, key_a["key"], alice.id)
    assert alice.usage is not None
    assert (g["model"], g["status"], g["user"], g["tags"], g["key_id"]) == (
        "test-model", "ok", "alice", ["search"], key_a["id"],
    )
    assert g["usage"]["input_tokens"] == alice.usage.prompt_tokens
    assert g["usage"]["output_tokens"] == alice.usage.completion_tokens
    assert Decimal(g["cost"]) == Decimal((alice.usage.model_extra or {})["cost"])
    assert g["replica"] and g["duration_ms"] is not None and g["ttft_ms"] is not None
    by_request_id = _generation(gw, key_a["key"], g["id"])
    assert by_request_id == g
    assert _generation(gw, key_a["key"], resp.id)["metadata"] == {"team": "red"}
    c = _generation(gw, key_b["key"], carol.id)
    assert (c["user"], c["key_id"], c["protocol"]) == ("carol", key_b["id"], "anthropic.messages")
    assert _generation(gw, key_a["key"], bob.id)["user"] == "bob"

    # Another account's generation is as unknown as one that never was.
    for gen_id in (alice.id, carol.id, "chatcmpl-0000", "nonsense"):
        r = _get(gw, other_key, f"/generations/{gen_id}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "generation_not_found", r.text

    acct = settled(admin, account)
    total = start - Decimal(acct["balance"])
    assert total > 0
    for group_by, expected in [
        ("user", {"alice": 2, "bob": 1, "carol": 1}),
        ("tag", {"search": 2, "chat": 1, None: 1}),
        ("key", {key_a["id"]: 3, key_b["id"]: 1}),
        ("model", {"test-model": 3, "test-reasoner": 1}),
    ]:
        r = _get(gw, key_a["key"], "/usage", group_by=group_by)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert {d["value"]: d["requests"] for d in data} == expected, group_by
        assert sum(Decimal(d["cost"]) for d in data) == total, group_by
    # Nothing of the other account leaks into its breakdowns.
    theirs = _get(gw, other_key, "/usage", group_by="user").json()["data"]
    assert theirs == []


def test_bad_tags_and_group_by_are_4xx(gw_admin: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = gw_admin
    key = admin.key(admin.account("bad-attr", credits="1"))["key"]
    msg = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
        for tags in ("a" * 65, ",".join(f"t{i}" for i in range(11)), "has space"):
            with pytest.raises(openai.BadRequestError) as exc:
                client.chat.completions.create(
                    model="test-model", messages=msg, extra_headers={"x-mesh-tags": tags}  # type: ignore[arg-type]
                )
            assert exc.value.status_code == 400 and "x-mesh-tags" in exc.value.message
    r = _get(gw, key, "/usage", group_by="planet")
    assert r.status_code == 400 and r.json()["error"]["param"] == "group_by"
    assert httpx.get(gw.base_url + "/generations/req_abc").status_code == 401


def test_generation_carries_the_finish_reason(gw_admin: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = gw_admin
    key = admin.key(admin.account("finishing", credits="1"))["key"]
    with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
        done = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "[tokens:3]"}])
        cut = client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "[tokens:20] cut"}], max_tokens=2
        )
        streamed = list(client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "[tokens:20] cut"}], max_tokens=2, stream=True
        ))
    with anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0) as claude:
        msg = claude.messages.create(model="test-model", max_tokens=2,
                                     messages=[{"role": "user", "content": "[tokens:20] cut"}])
    assert (done.choices[0].finish_reason, cut.choices[0].finish_reason) == ("stop", "length")
    assert _generation(gw, key, done.id)["finish_reason"] == "stop"
    assert _generation(gw, key, cut.id)["finish_reason"] == "length"
    assert [c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason] == ["length"]
    assert _generation(gw, key, streamed[0].id)["finish_reason"] == "length"
    # Anthropic's client saw max_tokens; the record keeps the canonical reason.
    assert msg.stop_reason == "max_tokens"
    assert _generation(gw, key, msg.id)["finish_reason"] == "length"


def test_key_status_shows_current_rate_limit_usage(gw_admin: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = gw_admin
    account = admin.account("limited-status", credits="1")
    # Buckets drain continuously (rpm 3: one request per 20 s), so the two requests below
    # are still in the request bucket when the key asks, on any machine.
    key = admin.key(account, rate_limits={"rpm": 3, "tpm": 100_000, "concurrent": 2})["key"]
    other = admin.key(account)["key"]

    def status(k: str) -> dict[str, Any]:
        r = _get(gw, k, "/key")
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    fresh = {s["scope"]: s for s in status(key)["rate_limits"]}
    assert fresh["key"]["usage"] == {"requests": 0, "tokens": 0, "concurrent": 0}
    with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
        for _ in range(2):
            client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "[tokens:3]"}])
    deadline = time.monotonic() + 10
    while True:  # the concurrency slot is given back as the request settles, just after the reply
        used = {s["scope"]: s for s in status(key)["rate_limits"]}["key"]["usage"]
        if used["concurrent"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert used["requests"] == 2 and used["concurrent"] == 0
    assert 0 <= used["tokens"] <= 100_000
    # A request in flight holds a concurrency slot, and shows.
    slow = threading.Thread(target=lambda: httpx.post(
        gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
        json={"model": "test-model", "messages": [{"role": "user", "content": "[delay:3] slow"}]},
    ))
    slow.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            used = {s["scope"]: s for s in status(key)["rate_limits"]}["key"]["usage"]
            if used["concurrent"] == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert used["concurrent"] == 1 and used["requests"] == 3, used
    finally:
        slow.join()
    # Another key of the same account has its own buckets (and no limits here).
    assert [s.get("usage") for s in status(other)["rate_limits"] if s["scope"] == "key"] == []
