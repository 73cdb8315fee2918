"""The HTTP edge against the session's real gateway: request
ids on every error path of the three protocols (streamed and not), odd and duplicate request
headers, limits headers and retry-after, and /metrics after mixed statuses."""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest

from support.gateway import ADMIN_KEY, Admin, GatewayProcess

RID = re.compile(r"^req_[0-9a-f]{8}[0-9a-f]+$")

PROTOCOLS = {
    "chat": ("/v1/chat/completions", lambda model, stream, **kw: {
        "model": model, "stream": stream, "messages": [{"role": "user", "content": kw.get("text", "hi")}],
        **({"max_tokens": kw["max_tokens"]} if "max_tokens" in kw else {})}),
    "messages": ("/v1/messages", lambda model, stream, **kw: {
        "model": model, "stream": stream, "max_tokens": kw.get("max_tokens", 16),
        "messages": [{"role": "user", "content": kw.get("text", "hi")}]}),
    "responses": ("/v1/responses", lambda model, stream, **kw: {
        "model": model, "stream": stream, "input": kw.get("text", "hi"),
        **({"max_output_tokens": kw["max_tokens"]} if "max_tokens" in kw else {})}),
}


def ids_ok(r: httpx.Response) -> None:
    xs = r.headers.get_list("x-request-id")
    rs = r.headers.get_list("request-id")
    assert len(xs) == 1 and len(rs) == 1 and xs == rs and RID.match(xs[0]), (r.status_code, r.headers)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("proto", sorted(PROTOCOLS))
def test_request_ids_on_every_error_path(gateway: GatewayProcess, admin: Admin, api_key: str,
                                         proto: str, stream: bool) -> None:
    path, body = PROTOCOLS[proto]
    url = gateway.url + path
    auth = {"Authorization": f"Bearer {api_key}"}
    broke = admin.key(admin.account("broke", credits=None))["key"]
    cases = {
        401: httpx.post(url, json=body("test-model", stream), headers={"Authorization": "Bearer sk-mesh-" + "x" * 43}),
        "401dup": httpx.post(url, json=body("test-model", stream),
                             headers=[("Authorization", f"Bearer {api_key}"), ("authorization", f"Bearer {api_key}")]),
        402: httpx.post(url, json=body("test-model", stream), headers={"Authorization": f"Bearer {broke}"}),
        404: httpx.post(url, json=body("no-such-model", stream), headers=auth),
        400: httpx.post(url, content=b"{not json", headers={**auth, "content-type": "application/json"}),
        413: httpx.post(url, content=b"{" + b" " * (64 * 1024 * 1024) + b"}",
                        headers={**auth, "content-type": "application/json"}),
    }
    for what, r in cases.items():
        assert r.status_code >= 400, (what, r.status_code)
        ids_ok(r)


@pytest.mark.parametrize("proto", sorted(PROTOCOLS))
def test_duplicate_and_latin1_tags_headers(gateway: GatewayProcess, api_key: str, proto: str) -> None:
    path, body = PROTOCOLS[proto]
    raw = httpx.post(gateway.url + path, json=body("test-model", False),
                     headers=[("Authorization", f"Bearer {api_key}"), ("X-Mesh-Tags", "a,b"),
                              ("x-mesh-tags", "c"), (b"X-Session-Id", "s\xe9".encode("latin-1")),
                              (b"X-Mesh-Tags", "\xe9t\xe9".encode("latin-1"))])
    assert raw.status_code in (200, 400), raw.text
    ids_ok(raw)


def test_metrics_after_mixed_statuses(gateway: GatewayProcess, admin: Admin, api_key: str) -> None:
    def sample(text: str, name: str, **labels: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    before = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    auth = {"Authorization": f"Bearer {api_key}"}
    url = gateway.base_url + "/chat/completions"
    ok = [httpx.post(url, json={"model": "test-model", "messages": [{"role": "user", "content": "hi"}]},
                     headers=auth, timeout=30) for _ in range(3)]
    assert all(r.status_code == 200 for r in ok)
    mid = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    # a client that goes away mid-stream: a cancelled request
    with httpx.Client(timeout=30) as c, c.stream(
        "POST", url, headers=auth,
        json={"model": "test-model", "stream": True, "max_tokens": 2000,
              "messages": [{"role": "user", "content": "write a long story"}]},
    ) as s:
        for _ in s.iter_raw():
            break
    err = httpx.post(url, json={"model": "test-model", "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 10 ** 9}, headers=auth, timeout=30)
    deadline = time.monotonic() + 10
    while True:
        after = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        n_after = sum(sample(after, "mesh_requests_total", model="test-model", protocol=p)
                      for p in ("openai.chat",))
        n_before = sum(sample(before, "mesh_requests_total", model="test-model", protocol=p)
                       for p in ("openai.chat",))
        if n_after - n_before >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ok_delta = (sample(mid, "mesh_requests_total", model="test-model", protocol="openai.chat", status="ok")
                - sample(before, "mesh_requests_total", model="test-model", protocol="openai.chat", status="ok"))
    assert ok_delta == 3
    count = (sample(after, "mesh_request_duration_seconds_count", model="test-model", protocol="openai.chat")
             - sample(before, "mesh_request_duration_seconds_count", model="test-model", protocol="openai.chat"))
    inf = (sample(after, "mesh_request_duration_seconds_bucket", model="test-model", protocol="openai.chat", le="+Inf")
           - sample(before, "mesh_request_duration_seconds_bucket", model="test-model", protocol="openai.chat",
                    le="+Inf"))
    reqs = n_after - n_before
    assert count == inf == reqs, (count, inf, reqs, err.status_code)


def test_head_and_pipelined_requests(gateway: GatewayProcess, api_key: str) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        req = (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
               b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + api_key.encode() + b"\r\n"
               b"Connection: close\r\n\r\n")
        s.sendall(req)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    heads = data.count(b"HTTP/1.1 200")
    assert heads == 3, data[:2000]
