"""What the queued-stream tests share (``tests/integration/test_queued_stream*.py``): request
bodies, the pool's and the books' state through the admin API, a request that holds a slot,
and a stream's lines with when each came."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx

from support.gateway import Admin, GatewayProcess

PATIENCE = 1.0  # mesh.api.common.QUEUE_PATIENCE


def chat(model: str, content: str, *, stream: bool = True) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]}


def pool(admin: Admin, model: str) -> dict[str, int]:
    data = admin.client.get("/admin/v1/models").json()["data"]
    found = next(m for m in data if m["id"] == model)
    return {"in_flight": found["replicas"][0]["in_flight"], "queued": found["queued"]}


def wait_for(check: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def block(gw: GatewayProcess, key: str, seconds: float) -> threading.Thread:
    """A non-streamed request holding solo's one slot for ``seconds`` (its first token's delay)."""
    thread = threading.Thread(target=lambda: httpx.post(
        gw.base_url + "/chat/completions", json=chat("solo", f"[delay:{seconds}] blocker", stream=False),
        headers={"Authorization": f"Bearer {key}"}, timeout=30))
    thread.start()
    return thread


Lines = list[tuple[float, str]]


def streamed(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[httpx.Headers, float, Lines]:
    """The response's headers, when they came (seconds after sending) and its lines, each
    with when it came."""
    start = time.monotonic()
    with httpx.Client(timeout=30) as client, client.stream("POST", url, json=body, headers=headers) as resp:
        assert resp.status_code == 200, resp.read()
        head_at = time.monotonic() - start
        lines = [(time.monotonic() - start, line) for line in resp.iter_lines() if line]
    return resp.headers, head_at, lines


def settled(admin: Admin, account: str, model: str) -> dict[str, Any]:
    assert wait_for(lambda: pool(admin, model) == {"in_flight": 0, "queued": 0}), pool(admin, model)
    admin.client.post("/admin/v1/flush").raise_for_status()
    return admin.balance(account)


def sse(lines: Lines) -> Lines:
    """(when, event name) of each event of an SSE body."""
    return [(at, line[7:]) for at, line in lines if line.startswith("event: ")]


def events_of(lines: Lines) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event of an SSE body with named events."""
    out: list[tuple[str, dict[str, Any]]] = []
    name: str | None = None
    for _, line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            assert name is not None, lines
            out.append((name, json.loads(line[6:])))
            name = None
    return out


def responses_body(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "stream": True, "input": text, "store": False}
