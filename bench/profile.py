"""py-spy profiles of a gateway under load, and where its CPU goes.

``record(pid, out_stem, seconds)`` samples every thread of the process with py-spy, native
frames included, into raw collapsed stacks; drops the samples that are waits, not work (py-spy
counts a thread parked in ``epoll_pwait``, a ``SimpleQueue.get`` or a GIL wait as active:
the native leaf tells); renders ``<stem>.svg`` from what is left and ranks it with
:func:`analyze`. A sample's *Python self* frame is its innermost Python frame, so time in C
code (orjson, sqlite3, asyncpg's protocol, socket writes) lands on the Python line that
called it; the innermost native frame is ranked separately (syscalls such as ``fdatasync``
or ``write``). Samples with no Python frame at all are uvloop/libuv/httptools C code.

    python -m bench.profile bench/results/profile-mesh-chat.txt   # re-read a recorded profile
"""

from __future__ import annotations

import linecache
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

from bench.flamegraph import render
from bench.procs import CLK_TCK

# Native leaves (or their callers) that mean "this thread is waiting", not working.
_WAIT_NATIVE = re.compile(
    r"^(epoll_pwait|epoll_wait|take_gil|PyThread_acquire_lock_timed|pthread_cond_timedwait|pthread_cond_wait|"
    r"pthread_cond_clockwait|sem_clockwait|sem_timedwait|sem_wait|__futex\w*|futex\w*|nanosleep|clock_nanosleep|"
    r"poll|select|pselect|ppoll|accept4?) "
)
_PY_FRAME = re.compile(r"\((?:[^()]*\.py|<[^>]*>)(?::\d+)?\)$")
_IDLE_SOURCE = re.compile(r"\.get\(|\.wait\(|\.acquire\(|\bselect\(|\bsleep\(|\.poll\(")
_THREAD = re.compile(r"^thread \(\d+\): (?P<name>.*)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Inclusive stages of a request, matched on (function, file fragment) anywhere in a stack.
STAGES: tuple[tuple[str, str, str], ...] = (
    ("authenticate (key -> principal)", "Pipeline.authenticate", "mesh/pipeline.py"),
    ("parse (wire -> canonical)", "parse_request", "mesh/protocols/"),
    ("resolve model", "Pipeline.resolve", "mesh/pipeline.py"),
    ("rate limits", "", "mesh/limits/"),
    ("admit (credit hold)", "Pipeline.admit", "mesh/pipeline.py"),
    ("route + open upstream", "Pipeline._route", "mesh/pipeline.py"),
    ("engine adapter (openai_compat)", "OpenAIEngine.stream", "mesh/engines/openai_compat.py"),
    ("metered relay", "Pipeline.metered", "mesh/pipeline.py"),
    ("settle (ledger + usage)", "Pipeline._settle_now", "mesh/pipeline.py"),
    ("ledger (any)", "", "mesh/billing/ledger.py"),
    ("usage writer (background batches)", "", "mesh/billing/usage.py"),
    ("metrics (prometheus)", "", "prometheus_client/"),
    ("logging", "", "logging/__init__.py"),
    ("SQLAlchemy (any)", "", "sqlalchemy/"),
    ("encode response (SSE / JSON)", "encode_stream", "mesh/protocols/"),
    ("render response", "render_response", "mesh/protocols/"),
    ("pydantic", "", "pydantic"),
)

# Self time by component: the first rule whose fragment is in the leaf frame's file wins.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("sqlalchemy/", "SQLAlchemy"),
    ("aiosqlite/", "aiosqlite (driver thread)"),
    ("sqlite3/", "sqlite3"),
    ("asyncpg/", "asyncpg"),
    ("logging/", "logging"),
    ("prometheus_client/", "prometheus_client"),
    ("pydantic", "pydantic"),
    ("aiohttp/", "aiohttp (upstream client)"),
    ("uvicorn/", "uvicorn + httptools"),
    ("starlette/", "starlette"),
    ("asyncio/", "asyncio"),
    ("mesh/", "mesh (own code)"),
    ("orjson", "orjson"),
)


def _parse(frame: str) -> tuple[str, str, str]:
    m = _FRAME.match(frame)
    if m is None:
        return frame, "", ""
    return m.group("func"), m.group("file"), m.group("line") or ""


@cache
def _source(file: str, line: str) -> str:
    """The source text of a frame's line, looked up in this interpreter's library paths."""
    if not line:
        return ""
    for root in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], sysconfig.get_paths()["stdlib"]}:
        text = linecache.getline(str(Path(root, file)), int(line))
        if text:
            return text
    return ""


def is_python(frame: str) -> bool:
    return bool(_PY_FRAME.search(frame))


def is_idle(frames: list[str]) -> bool:
    """A thread parked in a poll, on a queue, a lock, the GIL or a sleep. With native frames the
    last few native frames say so; without, the source line of the innermost Python frame."""
    tail = frames[-6:]
    if any(_WAIT_NATIVE.match(f) for f in tail if not is_python(f)):
        return True
    if any(not is_python(f) for f in tail):
        return False
    _, file, line = _parse(frames[-1])
    return bool(_IDLE_SOURCE.search(_source(file, line))) and not file.startswith("asyncio/")


def load(path: Path) -> list[tuple[list[str], int]]:
    """Collapsed stacks (outermost first, the thread as first frame when recorded with
    ``--threads``) with their sample counts, idle samples dropped."""
    out: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = stack.split(";")
            if not is_idle(frames):
                out.append((frames, int(count)))
    return out


def _thread(frames: list[str]) -> tuple[str, list[str]]:
    m = _THREAD.match(frames[0])
    if m is None:
        return "", frames
    name = re.sub(r"-\d+ ", " ", m.group("name"))  # Thread-2 (_worker) and Thread-3 (_worker) are one kind
    return name, frames[1:] or frames


def _component(file: str) -> str:
    for fragment, name in COMPONENTS:
        if fragment in file:
            return name
    return "other: " + (file.split("/")[0] if "/" in file else file or "?")


def analyze(path: Path, top: int = 25) -> dict[str, Any]:
    """Rank self time by function and by line, inclusive time by request stage, self time
    by component; every figure is a percentage of all samples."""
    stacks = load(path)
    total = sum(n for _, n in stacks) or 1
    by_func: Counter[str] = Counter()
    by_line: Counter[str] = Counter()
    by_component: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    by_native: Counter[str] = Counter()
    for tagged, n in stacks:
        thread, frames = _thread(tagged)
        by_thread[thread or "?"] += n
        python = [f for f in frames if is_python(f)]
        if not is_python(frames[-1]):
            by_native[frames[-1]] += n
        if not python:
            by_func["(no Python frame: uvloop / libuv / httptools C code)"] += n
            by_line["(no Python frame: uvloop / libuv / httptools C code)"] += n
            by_component["uvloop/libuv C (no Python frame)"] += n
            continue
        func, file, line = _parse(python[-1])
        by_func[f"{func} ({file})"] += n
        by_line[f"{func} ({file}:{line})"] += n
        by_component[_component(file)] += n
        parsed = [_parse(f) for f in python]
        for stage, fname, fragment in STAGES:
            if any((not fname or f == fname or f.endswith("." + fname)) and fragment in fl for f, fl, _ in parsed):
                by_stage[stage] += n

    def pct(c: Counter[str], limit: int | None = None) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(limit)]

    return {
        "samples": total,
        "by_thread": pct(by_thread),
        "self_by_function": pct(by_func, top),
        "self_by_line": pct(by_line, top),
        "self_by_component": pct(by_component),
        "native_leaves": pct(by_native, top),
        "inclusive_by_stage": [(s, round(100 * by_stage[s] / total, 1)) for s, _, _ in STAGES],
    }


def py_spy() -> str | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return exe if Path(exe).exists() else None


def record(pid: int, stem: Path, seconds: float, title: str) -> dict[str, Any] | None:
    """Sample ``pid`` for ``seconds`` into ``<stem>.txt`` (raw stacks) and ``<stem>.svg``.
    Returns :func:`analyze` of the stacks, or None (with the reason printed) if py-spy can't."""
    exe = py_spy()
    if exe is None:
        print("  py-spy not found: pip install py-spy", flush=True)
        return None
    raw = stem.with_suffix(".txt")
    argv = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--threads", "--native",
            "--format", "raw", "-o", str(raw)]
    before, t0 = thread_cpu(pid), time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    after, elapsed = thread_cpu(pid), time.monotonic() - t0
    if done.returncode != 0 or not raw.exists():
        print(f"  py-spy record failed: {done.stdout[-500:]}{done.stderr[-500:]}", flush=True)
        return None
    stem.with_suffix(".svg").write_text(render(load(raw), title))
    result = analyze(raw)
    main = after.get(pid, 0.0) - before.get(pid, 0.0)
    others = sum(v - before.get(t, 0.0) for t, v in after.items() if t != pid)
    result["proc_cores"] = {"main thread": round(main / elapsed, 2), "other threads": round(others / elapsed, 2)}
    return result


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (utime + stime) of each thread of ``pid``, from /proc: the ground truth
    that py-spy's per-thread shares can be checked against."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def describe(result: dict[str, Any], top: int = 15) -> str:
    lines = [f"  samples: {result['samples']} (idle dropped)"]
    if "proc_cores" in result:
        lines.append("  CPU from /proc while sampling (cores): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in result["proc_cores"].items()))
    lines.append("  busy samples by thread:")
    lines += [f"    {p:5.1f}%  {name}" for name, p in result["by_thread"]]
    lines.append("  self time by component:")
    lines += [f"    {p:5.1f}%  {name}" for name, p in result["self_by_component"][:12]]
    lines.append("  inclusive time by request stage (overlapping):")
    lines += [f"    {p:5.1f}%  {name}" for name, p in result["inclusive_by_stage"]]
    lines.append(f"  top {top} functions by self time:")
    lines += [f"    {p:5.1f}%  {name}" for name, p in result["self_by_function"][:top]]
    lines.append(f"  top {top} lines by self time:")
    lines += [f"    {p:5.1f}%  {name}" for name, p in result["self_by_line"][:top]]
    if result.get("native_leaves"):
        lines.append(f"  top {min(top, 10)} native leaves (C code below the Python line):")
        lines += [f"    {p:5.1f}%  {name}" for name, p in result["native_leaves"][: min(top, 10)]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    for arg in argv if argv is not None else sys.argv[1:]:
        print(arg)
        print(describe(analyze(Path(arg)), top=30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
