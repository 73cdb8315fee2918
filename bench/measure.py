"""One measurement: run the load generator against a target and read the target's CPU and
RSS while the measured window is open."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.procs import cpu_seconds, machine_busy_seconds, rss_bytes, tree
from bench.targets import ROOT, Target

RSS_EVERY = 0.25


@dataclass(frozen=True)
class Point:
    """A load shape: ``chat`` (non-streaming, 16 tokens) or ``stream`` (64 chunks), at a concurrency."""

    mode: str
    concurrency: int

    @property
    def tokens(self) -> int:
        return 64 if self.mode == "stream" else 16

    @property
    def name(self) -> str:
        return f"{self.mode}-c{self.concurrency}"


@dataclass
class Sample:
    """What one window measured; samples of the same target and point add up across rounds."""

    completed: int = 0
    chunks: int = 0
    errors: int = 0
    window_s: float = 0.0
    cpu_s: float = 0.0
    rss_max: int = 0
    loadgen_cpu_s: float = 0.0
    foreign_cpu_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    ttfts_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def add(self, other: Sample) -> None:
        self.completed += other.completed
        self.chunks += other.chunks
        self.errors += other.errors
        self.window_s += other.window_s
        self.cpu_s += other.cpu_s
        self.rss_max = max(self.rss_max, other.rss_max)
        self.loadgen_cpu_s += other.loadgen_cpu_s
        self.foreign_cpu_s += other.foreign_cpu_s
        self.latencies_ms += other.latencies_ms
        self.ttfts_ms += other.ttfts_ms
        self.error_samples = (self.error_samples + other.error_samples)[:3]


def _lines(proc: subprocess.Popen[bytes], on_tick: Any, timeout: float) -> list[str]:
    """Read stdout lines until EOF, calling ``on_tick(lines_so_far)`` at least every RSS_EVERY."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], RSS_EVERY)
        if ready:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                lines.append(line.decode())
                on_tick(lines)
        on_tick(lines)
    else:
        proc.send_signal(signal.SIGKILL)
        raise TimeoutError("load generator did not finish in time")
    if buf.strip():
        lines.append(buf.decode())
    return lines


def run_load(target: Target, point: Point, duration: float, warmup: float, extra: list[str] | None = None,
             ours: Callable[[], list[int]] = list) -> Sample:
    """One window of ``point`` against ``target``: CPU is the target tree's utime+stime between
    the load generator's GO and END, RSS the largest tree VmRSS seen in between. ``ours``
    lists every process the bench runs, so that CPU used by anything else on the machine in
    the window (``foreign``) can be told apart."""
    argv = [sys.executable, "-m", "bench.load", "--url", target.url, "--key", target.key, "--mode", point.mode,
            "--concurrency", str(point.concurrency), "--tokens", str(point.tokens), "--duration", str(duration),
            "--warmup", str(warmup), "--drain", "4", *(extra or [])]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    state: dict[str, Any] = {"cpu0": None, "cpu1": None, "rss": 0}

    def tick(lines: list[str]) -> None:
        if state["cpu0"] is None and "GO" in lines:
            state["pids"] = target.server.pids()
            state["ours"] = sorted({*ours(), *tree(proc.pid)})
            state["cpu0"] = cpu_seconds(state["pids"])
            state["ours0"] = cpu_seconds(state["ours"])
            state["busy0"] = machine_busy_seconds()
        if state["cpu0"] is not None and state["cpu1"] is None:
            if "END" in lines:
                state["cpu1"] = cpu_seconds(state["pids"])
                state["ours1"] = cpu_seconds(state["ours"])
                state["busy1"] = machine_busy_seconds()
            else:
                state["rss"] = max(state["rss"], rss_bytes(state["pids"]))

    lines = _lines(proc, tick, timeout=warmup + duration + 60)
    proc.wait(10)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0 or state["cpu1"] is None:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {stderr[-1500:]}")
    result = json.loads(lines[-1])
    return Sample(
        completed=result["completed"],
        chunks=result["chunks"],
        errors=result["errors"],
        window_s=result["window_s"],
        cpu_s=state["cpu1"] - state["cpu0"],
        rss_max=state["rss"],
        loadgen_cpu_s=result["loadgen_cpu_s"],
        foreign_cpu_s=max(0.0, (state["busy1"] - state["busy0"]) - (state["ours1"] - state["ours0"])),
        latencies_ms=result["latencies_ms"],
        ttfts_ms=result["ttfts_ms"],
        error_samples=result["error_samples"],
    )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summarize(sample: Sample, point: Point) -> dict[str, Any]:
    rate = sample.completed / sample.window_s if sample.window_s else 0.0
    out: dict[str, Any] = {
        "completed": sample.completed,
        "errors": sample.errors,
        "rate": rate,
        "p50_ms": percentile(sample.latencies_ms, 50),
        "p99_ms": percentile(sample.latencies_ms, 99),
        "cpu_ms_per_req": 1000 * sample.cpu_s / sample.completed if sample.completed else None,
        "cpu_util": sample.cpu_s / sample.window_s if sample.window_s else None,
        "rss_load_mb": sample.rss_max / 2**20,
        "foreign_cores": sample.foreign_cpu_s / sample.window_s if sample.window_s else None,
        "error_samples": sample.error_samples,
    }
    if point.mode == "stream":
        # Every target frames 64 tokens in 67-68 SSE events (role, finish, usage, [DONE]).
        out["chunks_per_s"] = sample.chunks / sample.window_s if sample.window_s else 0.0
        out["cpu_us_per_chunk"] = 1e6 * sample.cpu_s / sample.chunks if sample.chunks else None
        out["ttft_p50_ms"] = percentile(sample.ttfts_ms, 50)
        out["ttft_p99_ms"] = percentile(sample.ttfts_ms, 99)
    return out
