"""The one Authorization parser, attacked with odd headers (red team of issue 14).

Found: with two Authorization headers (or two x-api-key) the first won, silently; a proxy
in front that checks or logs the other copy would disagree with Mesh about the caller.
Now a repeated credential header is the same 401 as a malformed one, on every route.
Held: the scheme is case-insensitive, tabs separate like spaces, Authorization wins over
x-api-key, and neither rescues the other.
"""

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


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[p for _, p, _ in ROUTES])
def test_two_authorization_headers_are_refused_everywhere(
    gateway: GatewayProcess, api_key: str, method: str, path: str, body: object
) -> None:
    right = api_key if not path.startswith(("/admin", "/metrics")) else ADMIN_KEY
    for pair in ([right, "sk-mesh-other"], ["sk-mesh-other", right], [right, right]):
        headers = [("Authorization", f"Bearer {token}") for token in pair]
        r = httpx.request(method, gateway.url + path, json=body, headers=headers)
        assert r.status_code == 401, (pair, r.text)
        assert r.json()["error"]["message"] == MALFORMED


def test_two_x_api_key_headers_are_refused(gateway: GatewayProcess, api_key: str) -> None:
    for pair in ([api_key, "sk-mesh-other"], ["sk-mesh-other", api_key]):
        r = httpx.get(gateway.base_url + "/models", headers=[("x-api-key", k) for k in pair])
        assert r.status_code == 401, (pair, r.text)
        assert "twice" in r.json()["error"]["message"]


def test_odd_but_single_headers_still_parse(gateway: GatewayProcess, api_key: str) -> None:
    for header in (f"Bearer\t{api_key}", f"bearer {api_key}", f"Bearer   {api_key}"):
        assert httpx.get(gateway.base_url + "/models", headers={"Authorization": header}).status_code == 200
    # Authorization wins over x-api-key either way round.
    both = {"Authorization": f"Bearer {api_key}", "x-api-key": "sk-mesh-wrong"}
    assert httpx.get(gateway.base_url + "/models", headers=both).status_code == 200
    both = {"Authorization": "Bearer sk-mesh-wrong", "x-api-key": api_key}
    assert httpx.get(gateway.base_url + "/models", headers=both).status_code == 401
