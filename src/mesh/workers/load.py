"""An engine's load, read from its Prometheus metrics (vLLM and SGLang names)."""

from __future__ import annotations

from dataclasses import dataclass

_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")


@dataclass(frozen=True, slots=True)
class EngineLoad:
    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None  # fraction in [0, 1]


def _sums(text: str) -> dict[str, float]:
    """Metric name -> sum of its samples over all label sets (engines may run several)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0].strip()
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def _first(sums: dict[str, float], names: tuple[str, ...]) -> float | None:
    for n in names:
        if n in sums:
            return sums[n]
    return None


def parse_load(text: str) -> EngineLoad:
    sums = _sums(text)
    running, waiting, kv = _first(sums, _RUNNING), _first(sums, _WAITING), _first(sums, _KV)
    return EngineLoad(
        running=None if running is None else int(running),
        waiting=None if waiting is None else int(waiting),
        kv_cache_usage=None if kv is None else max(0.0, min(1.0, kv)),
    )
