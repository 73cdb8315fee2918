"""Mutable engine state: counters, in-flight tracking, request log, faults, prefix cache, metrics."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from . import tokens

REQUEST_LOG_SIZE = 1000
PREFIX_CACHE_SIZE = 50_000
FAULT_MODES = ("drop", "hang", "slow_first_token")


@dataclass
class Tracker:
    """One in-flight chat request."""

    model: str | None
    phase: str = "waiting"  # waiting (before the first token) | running
    tokens: int = 0  # prompt + generated so far, for the KV-cache gauge
    sent: int = 0  # streamed pieces written so far
    cancelled: bool = False


@dataclass
class Fault:
    mode: str
    remaining: int  # < 0: until cleared
    delay: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "count": self.remaining, "delay": self.delay}


def valid_fault(mode: str) -> bool:
    code = mode.removeprefix("error_")  # error_500: an error event mid-stream with that code
    return mode in FAULT_MODES or (code.isdigit() and len(code) == 3 and code[0] in "45")


def _message_key(m: dict[str, Any]) -> bytes:
    return orjson.dumps(
        [
            m.get("role"),
            tokens.content_text(m.get("content")),
            tokens.tool_calls_text(m),
            m.get("tool_call_id") or "",
            m.get("name") or "",
        ]
    )


def prefix_hashes(messages: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    h = hashlib.sha1(usedforsecurity=False)
    for m in messages:
        h.update(_message_key(m))
        h.update(b"\x1e")
        out.append(h.copy().hexdigest())
    return out


@dataclass
class EngineState:
    name: str
    models: list[str]
    max_model_len: int
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    connections: int = 0  # TCP connections clients opened (keep-alive reuses one)
    cut_off: int = 0  # answers generated to the end whose client hung up before the body ended
    peers: set[Any] = field(default_factory=set)
    log: deque[Any] = field(default_factory=lambda: deque(maxlen=REQUEST_LOG_SIZE))
    headers: deque[dict[str, str]] = field(default_factory=lambda: deque(maxlen=REQUEST_LOG_SIZE))
    faults: list[Fault] = field(default_factory=list)
    load: dict[str, dict[str, float]] = field(default_factory=dict)
    inflight: dict[int, Tracker] = field(default_factory=dict)
    prefixes: OrderedDict[str, None] = field(default_factory=OrderedDict)
    prompt_tokens_total: Counter[str] = field(default_factory=Counter)
    generation_tokens_total: Counter[str] = field(default_factory=Counter)
    finished: Counter[tuple[str, str]] = field(default_factory=Counter)
    _ids: Any = field(default_factory=itertools.count)

    def reset(self) -> None:
        self.requests = self.completed = self.cancelled = self.failed = 0
        self.connections = self.cut_off = 0
        for box in (
            self.peers,
            self.log,
            self.headers,
            self.faults,
            self.load,
            self.prefixes,
            self.prompt_tokens_total,
            self.generation_tokens_total,
            self.finished,
        ):
            box.clear()

    # -- in-flight tracking ----------------------------------------------------------------------
    def begin(self, model: str | None) -> tuple[int, Tracker]:
        key = next(self._ids)
        self.inflight[key] = tracker = Tracker(model)
        return key, tracker

    def saw_connection(self, peer: Any) -> None:
        """Count ``peer`` (the client's address and port) once: one TCP connection."""
        if peer not in self.peers:
            self.peers.add(peer)
            self.connections += 1

    def end(self, key: int) -> None:
        self.inflight.pop(key, None)

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": len(self.inflight),
            "streaming": sum(1 for t in self.inflight.values() if t.sent),  # mid-answer: some pieces out
            "name": self.name,
            "cancelled": self.cancelled,
            "completed": self.completed,
            "failed": self.failed,
            "connections": self.connections,
            "cut_off": self.cut_off,
        }

    # -- faults ----------------------------------------------------------------------------------
    def add_fault(self, mode: str, count: int, delay: float) -> None:
        self.faults.append(Fault(mode, count, delay))

    def take_fault(self) -> Fault | None:
        while self.faults:
            fault = self.faults[0]
            if fault.remaining == 0:
                self.faults.pop(0)
                continue
            if fault.remaining > 0:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self.faults.pop(0)
            return Fault(fault.mode, 1, fault.delay)
        return None

    # -- prefix cache imitation ------------------------------------------------------------------
    def cached_tokens(self, messages: list[dict[str, Any]]) -> int:
        hashes = prefix_hashes(messages)
        for j in range(len(messages) - 1, 0, -1):
            if hashes[j - 1] in self.prefixes:
                self.prefixes.move_to_end(hashes[j - 1])
                return sum(tokens.message_tokens(m) for m in messages[:j])
        return 0

    def remember(self, messages: list[dict[str, Any]]) -> None:
        for h in prefix_hashes(messages):
            self.prefixes[h] = None
            self.prefixes.move_to_end(h)
        while len(self.prefixes) > PREFIX_CACHE_SIZE:
            self.prefixes.popitem(last=False)

    # -- metrics ---------------------------------------------------------------------------------
    def gauges(self, model: str) -> dict[str, float]:
        mine = [t for t in self.inflight.values() if t.model == model]
        extra = {**self.load.get("*", {}), **self.load.get(model, {})}
        running = sum(t.phase == "running" for t in mine) + extra.get("running", 0)
        waiting = sum(t.phase == "waiting" for t in mine) + extra.get("waiting", 0)
        kv = min(1.0, sum(t.tokens for t in mine) / (8 * self.max_model_len))
        kv = float(extra.get("kv_cache_usage", kv))
        return {"running": running, "waiting": waiting, "kv": kv}

    def metrics(self) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{{{labels}}} {float(value)}" for labels, value in samples)

        g = {m: self.gauges(m) for m in self.models}
        lab = {m: f'model_name="{m}"' for m in self.models}
        family(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            [(lab[m], g[m]["running"]) for m in self.models],
        )
        family(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            [(lab[m], g[m]["waiting"]) for m in self.models],
        )
        family(
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "GPU KV-cache usage. 1 means 100 percent usage.",
            [(lab[m], g[m]["kv"]) for m in self.models],
        )
        family(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            [(lab[m], g[m]["kv"]) for m in self.models],
        )
        family(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            [(lab[m], self.prompt_tokens_total[m]) for m in self.models],
        )
        family(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            [(lab[m], self.generation_tokens_total[m]) for m in self.models],
        )
        family(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            [(f'finished_reason="{r}",{lab[m]}', n) for (m, r), n in sorted(self.finished.items())],
        )
        return "\n".join(lines) + "\n"


STATE = web.AppKey("testengine_state", EngineState)
