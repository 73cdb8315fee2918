"""One parser for the Authorization header: every route answers a malformed one alike
(401, the same message), and a well-formed one the same way everywhere."""

from __future__ import annotations

import httpx
import pytest

from mesh.http.credentials import MALFORMED
from support.gateway import ADMIN_KEY, GatewayProcess

ROUTES = [
    ("POST", "/v1/chat/completions", {"model": "test-model", "messages": [{"role": "user", "content": "x"}]}),
    ("POST", "/v1/messages", {"model": "test-model", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
    ("POST", "/v1/responses", {"model": "test-model", "input": "x"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/usage", None),
    ("GET", "/admin/v1/accounts", None),
    ("POST", "/workers/v1/replicas", {"model": "test-model", "engine_url": "http://127.0.0.1:9/v1"}),
    ("GET", "/metrics", None),
]
MALFORMED_HEADERS = ["Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "Token abc", "bearer", "Bearer\tx y"]


def _message(r: httpx.Response) -> str:
    body = r.json()
    return str(body["error"]["message"])


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[p for _, p, _ in ROUTES])
@pytest.mark.parametrize("header", MALFORMED_HEADERS)
def test_malformed_authorization_is_one_401_everywhere(
    gateway: GatewayProcess, method: str, path: str, body: object, header: str
) -> None:
    r = httpx.request(method, gateway.url + path, json=body, headers={"Authorization": header, "x-api-key": "sk-x"})
    assert r.status_code == 401, r.text
    assert _message(r) == MALFORMED


def test_scheme_is_case_insensitive_and_authorization_wins(gateway: GatewayProcess, api_key: str) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = httpx.get(gateway.base_url + "/models", headers={"Authorization": f"{scheme} {api_key}"})
        assert r.status_code == 200
        admin = httpx.get(gateway.url + "/admin/v1/accounts", headers={"Authorization": f"{scheme} {ADMIN_KEY}"})
        assert admin.status_code == 200
    # x-api-key alone works; a wrong Bearer is not rescued by a right x-api-key.
    assert httpx.get(gateway.base_url + "/models", headers={"x-api-key": api_key}).status_code == 200
    r = httpx.get(gateway.base_url + "/models", headers={"Authorization": "Bearer sk-wrong", "x-api-key": api_key})
    assert r.status_code == 401
