"""Content parts reach an OpenAI-compatible engine unchanged, and count the same as direct."""

from __future__ import annotations

from typing import Any

import httpx

from support.gateway import GatewayProcess
from testengine.harness import EngineProcess

PARTS: list[dict[str, Any]] = [
    {"type": "text", "text": "Describe the picture."},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
    {"type": "text", "text": "[tokens:3] Briefly, please."},
]


def test_parts_reach_the_engine_as_sent(gateway: GatewayProcess, engine: EngineProcess, api_key: str) -> None:
    system = [{"type": "text", "text": "Be kind."}, {"type": "text", "text": "Be brief."}]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": PARTS}]
    engine.clear_requests()
    through = httpx.post(gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                         json={"model": "test-model", "messages": messages}, timeout=30)
    assert through.status_code == 200, through.text
    [sent] = engine.requests()
    assert sent["messages"] == messages
    direct = httpx.post(engine.base_url + "/chat/completions", json={"model": "test-model", "messages": messages},
                        timeout=30)
    assert through.json()["usage"]["prompt_tokens"] == direct.json()["usage"]["prompt_tokens"]
