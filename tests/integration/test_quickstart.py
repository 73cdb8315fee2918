"""The newcomer's path: ``mesh serve --quickstart`` (what ``make run`` runs) with no config at
all serves the embedded SmolLM2 model, prints a working key and curl line, and the
official openai SDK gets a real streamed answer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from support.gateway import free_port


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    work = tmp_path_factory.mktemp("quickstart")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    log = work / "out.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", "serve", "--quickstart", "--port", str(port)],
            cwd=work, stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        printed = log.read_text()
        key = re.search(r"API key:\s+(sk-mesh-\S+)", printed)
        assert key, printed
        yield base, key.group(1), work
    finally:
        proc.terminate()
        proc.wait(20)


def test_quickstart_prints_base_url_key_and_curl_line(quickstart: tuple[str, str, Path]) -> None:
    base, key, work = quickstart
    printed = (work / "out.log").read_text()
    assert f"Base URL:   {base}/v1" in printed
    assert f"curl -N {base}/v1/chat/completions -H 'Authorization: Bearer {key}'" in printed
    assert (work / ".mesh" / "quickstart-key").read_text().strip() == key
    assert oct((work / ".mesh" / "quickstart-key").stat().st_mode & 0o777) == "0o600"


def test_quickstart_embedded_model_streams_a_real_answer(quickstart: tuple[str, str, Path]) -> None:
    base, key, _ = quickstart
    with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as client:
        assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct"]
        chunks = list(client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            stream=True, max_tokens=24, temperature=0, stream_options={"include_usage": True},
        ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 24 and usage.prompt_tokens > 10
    assert len(text.split()) >= 2 and any(ch.isalpha() for ch in text), text


def test_quickstart_usage_is_recorded(quickstart: tuple[str, str, Path]) -> None:
    base, key, _ = quickstart
    with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as client:
        client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    deadline = time.monotonic() + 10
    rows: list[dict[str, object]] = []
    while not rows and time.monotonic() < deadline:
        r = httpx.get(base + "/v1/usage", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        rows = r.json()["data"]
        time.sleep(0.1)
    assert rows and rows[0]["model"] == "smollm2-135m-instruct"
