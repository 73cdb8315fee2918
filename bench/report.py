"""The results table (absolute figures, ratios against the engine and the minimal proxy),
the issue's target verdicts, and the JSON written to bench/results/."""

from __future__ import annotations

from typing import Any

MESH_TARGETS = ("mesh-sqlite", "mesh-pg")


def _f(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def table(results: dict[str, Any]) -> str:
    labels: dict[str, str] = results["labels"]
    points: dict[str, dict[str, Any]] = results["points"]
    out: list[str] = []
    for point, by_target in points.items():
        stream = point.startswith("stream")
        engine, proxy = by_target.get("engine", {}), by_target.get("proxy", {})
        out.append("")
        if stream:
            out.append(f"== {point}: streaming, 64 chunks per stream (chunks = SSE events received) ==")
            head = (f"{'target':<22}{'streams/s':>10}{'chunks/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}"
                    f"{'CPU us/chk':>11}{'RSS MB':>8}{'err':>5}{'chunks/s vs eng':>17}{'vs proxy':>10}"
                    f"{'TTFT-eng p50':>14}{'CPU vs proxy':>14}{'other':>7}")
        else:
            out.append(f"== {point}: non-streaming, 16 tokens ==")
            head = (f"{'target':<22}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/req':>11}{'RSS MB':>8}"
                    f"{'err':>5}{'req/s vs eng':>14}{'vs proxy':>10}{'p50-eng ms':>12}{'CPU vs proxy':>14}"
                    f"{'other':>7}")
        out.append(head)
        out.append("-" * len(head))
        for name, r in by_target.items():
            label = labels.get(name, name)
            other = _f(r.get("foreign_cores"), 2)
            if stream:
                ttft_over = (None if r.get("ttft_p50_ms") is None or engine.get("ttft_p50_ms") is None
                             else r["ttft_p50_ms"] - engine["ttft_p50_ms"])
                out.append(
                    f"{label:<22}{_f(r['rate']):>10}{_f(r.get('chunks_per_s'), 0):>11}{_f(r.get('ttft_p50_ms'), 2):>10}"
                    f"{_f(r.get('ttft_p99_ms'), 2):>10}{_f(r.get('cpu_us_per_chunk'), 1):>11}"
                    f"{_f(r.get('rss_load_mb'), 0):>8}{r['errors']:>5}"
                    f"{_ratio(r.get('chunks_per_s'), engine.get('chunks_per_s')):>17}"
                    f"{_ratio(r.get('chunks_per_s'), proxy.get('chunks_per_s')):>10}{_f(ttft_over, 2):>14}"
                    f"{_ratio(r.get('cpu_us_per_chunk'), proxy.get('cpu_us_per_chunk')):>14}{other:>7}"
                )
            else:
                p50_over = (None if r.get("p50_ms") is None or engine.get("p50_ms") is None
                            else r["p50_ms"] - engine["p50_ms"])
                out.append(
                    f"{label:<22}{_f(r['rate']):>10}{_f(r.get('p50_ms'), 2):>9}{_f(r.get('p99_ms'), 2):>9}"
                    f"{_f(r.get('cpu_ms_per_req'), 3):>11}{_f(r.get('rss_load_mb'), 0):>8}{r['errors']:>5}"
                    f"{_ratio(r['rate'], engine.get('rate')):>14}{_ratio(r['rate'], proxy.get('rate')):>10}"
                    f"{_f(p50_over, 2):>12}{_ratio(r.get('cpu_ms_per_req'), proxy.get('cpu_ms_per_req')):>14}"
                    f"{other:>7}"
                )
    idle = results.get("rss_idle_mb", {})
    if idle:
        out.append("")
        sizes = ", ".join(f"{labels.get(k, k)} {v:.0f}" for k, v in idle.items())
        out.append("RSS at idle (MB, process tree): " + sizes)
    out.append("'other' = cores used by processes outside the bench during the window (other work on the machine).")
    return "\n".join(out)


def _verdict(name: str, met: bool | None, detail: str) -> dict[str, Any]:
    return {"target": name, "met": met, "detail": detail}


# Issue 16's "Done when", exactly: with every feature on, on SQLite and on PostgreSQL.
CPU_PER_REQUEST_MAX = 3.0  # x the minimal proxy's CPU per non-streamed request (chat c16)
CPU_PER_STREAM_MAX = 2.0  # x the minimal proxy's CPU per 64-chunk stream (stream c16)
TTFT_ADDED_MAX_MS = 0.5  # Mesh's p50 TTFT minus the engine's, at concurrency 1
START_MAX_S = 1.5  # exec of `mesh serve` to its first answered request


def _cpu_verdict(pts: dict[str, Any], mesh: str, point: str, field: str, limit: float, what: str) -> dict[str, Any]:
    by = pts.get(point, {})
    mine, proxy = by.get(mesh, {}).get(field), by.get("proxy", {}).get(field)
    name = f"{mesh}: CPU per {what} <= {limit:g}x minimal proxy ({point})"
    if mine is None or not proxy:
        return _verdict(name, None, "not measured")
    # Per chunk is per stream over 64 + 3 or 4 events, the same framing for every target.
    unit = "us/chunk" if field == "cpu_us_per_chunk" else "ms/request"
    return _verdict(name, mine <= limit * proxy, f"{mine:.3f} {unit} vs proxy {proxy:.3f} = {mine / proxy:.2f}x")


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each met / not met (None: not measured) with its numbers."""
    pts = results["points"]
    out: list[dict[str, Any]] = []
    for mesh in MESH_TARGETS:
        out.append(_cpu_verdict(pts, mesh, "chat-c16", "cpu_ms_per_req", CPU_PER_REQUEST_MAX, "non-streamed request"))
        out.append(_cpu_verdict(pts, mesh, "stream-c16", "cpu_us_per_chunk", CPU_PER_STREAM_MAX, "64-chunk stream"))
    by = pts.get("stream-c1", {})
    eng, proxy = by.get("engine", {}).get("ttft_p50_ms"), by.get("proxy", {}).get("ttft_p50_ms")
    for mesh in MESH_TARGETS:
        t = by.get(mesh, {}).get("ttft_p50_ms")
        name = f"{mesh}: TTFT added by Mesh <= {TTFT_ADDED_MAX_MS:g} ms (p50, stream c1)"
        if t is None or eng is None:
            out.append(_verdict(name, None, "not measured"))
        else:
            vs_proxy = "" if proxy is None else f" (the minimal proxy adds {proxy - eng:.2f} ms)"
            out.append(_verdict(name, t - eng <= TTFT_ADDED_MAX_MS,
                                f"{t:.2f} ms - engine {eng:.2f} ms = {t - eng:.2f} ms{vs_proxy}"))
    starts = results.get("startup", {})
    for mesh in MESH_TARGETS:
        st = starts.get(mesh)
        name = f"{mesh}: start to first answer <= {START_MAX_S:g} s"
        if st is None:
            out.append(_verdict(name, None, "not measured"))
        else:
            out.append(_verdict(name, st["best_s"] <= START_MAX_S,
                                f"{st['best_s']:.2f} s (best of {len(st['tries'])}; median {st['median_s']:.2f} s; "
                                f"the gateway's CPU until then {st.get('cpu_s', float('nan')):.2f} s)"))
    emb = results.get("embedded")
    if emb and "ratio" in emb:
        out.append(_verdict("embedded engine through Mesh >= 95% of llama-cpp-python tokens/s", emb["ratio"] >= 0.95,
                            f"{emb['mesh_tokens_per_s']:.1f} vs {emb['direct_tokens_per_s']:.1f} tokens/s = "
                            f"{100 * emb['ratio']:.0f}%"))
    else:
        out.append(_verdict("embedded engine through Mesh >= 95% of llama-cpp-python tokens/s", None,
                            (emb or {}).get("error", "not measured")))
    idle = results.get("idle_streams", {}).get("mesh")
    if idle and "rss_mb" in idle:
        out.append(_verdict(f"{idle['streams']} idle streams < 200 MB RSS in one gateway process", idle["rss_mb"] < 200,
                            f"{idle['rss_mb']:.0f} MB with {idle['open']} open (idle {idle['idle_rss_mb']:.0f} MB, "
                            f"+{idle['rss_mb'] - idle['idle_rss_mb']:.0f} MB)"))
    else:
        out.append(_verdict("1000 idle streams < 200 MB RSS in one gateway process", None,
                            (idle or {}).get("error", "not measured")))
    return out


def describe_verdicts(vs: list[dict[str, Any]]) -> str:
    mark = {True: "MET    ", False: "NOT MET", None: "n/a    "}
    return "\n".join(f"  [{mark[v['met']]}] {v['target']}: {v['detail']}" for v in vs)
