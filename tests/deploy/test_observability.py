"""deploy/observability: the Grafana dashboard and Prometheus rules, checked offline and
against the metric names a live gateway really exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from support.gateway import ADMIN_KEY, GatewayProcess

from .conftest import DEPLOY, tool

OBS = DEPLOY / "observability"
RULES = OBS / "mesh-alerts.yaml"
DASHBOARD = OBS / "grafana-dashboard.json"
# Not Mesh's: Prometheus' own scrape-health series.
FOREIGN = {"up"}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "increase", "histogram_quantile", "and", "or",
    "unless", "le", "label_values", "on", "ignoring", "bool", "offset",
}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def exprs() -> list[str]:
    out = [t["expr"] for p in panels() for t in p["targets"]]
    out += [r["expr"] for r in rules()]
    out += [v["definition"] for v in dashboard()["templating"]["list"] if "definition" in v]
    return out


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
    expr = re.sub(r"\{[^}]*\}", "", expr)  # nor label names
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # nor ranges
    expr = re.sub(r"\bby \([^)]*\)", "", expr)  # nor grouping labels
    expr = re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", expr)  # nor the label a variable lists
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr))
    return {n for n in names if n not in PROMQL_WORDS and not n.startswith("$") and not re.fullmatch(r"e\d*", n)}


def test_metric_name_extraction_sees_names_not_labels() -> None:
    expr = 'sum by (model, le) (rate(mesh_a_bucket{model=~"$model",kind="x"}[5m])) / max(mesh_b) > 1e6 and up'
    assert metric_names(expr) == {"mesh_a_bucket", "mesh_b", "up"}
    assert metric_names("label_values(mesh_c, model)") == {"mesh_c"}


def test_alert_rules_are_complete() -> None:
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert rule["expr"].strip() and rule["labels"]["severity"] in ("page", "warn", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    wanted = {"MeshHighErrorRate", "MeshSlowFirstToken", "MeshNoHealthyReplica", "MeshQueueSaturated",
              "MeshLeaseFlushFailing", "MeshSettlementFailures", "MeshDatabaseUnreachable", "MeshRedisUnreachable"}
    assert wanted <= set(names)


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package: prometheus; scripts/ensure-test-deps.sh)")
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(OBS / "mesh-alerts.test.yaml")]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=OBS)
        assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_accepts_the_example_prometheus_config(tmp_path: Path) -> None:
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package: prometheus; scripts/ensure-test-deps.sh)")
    config = yaml.safe_load((OBS / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES.name]
    (mesh,) = config["scrape_configs"]
    key = tmp_path / "mesh-admin-key"
    key.write_text("secret\n")
    mesh["authorization"]["credentials_file"] = str(key)
    shutil.copy(RULES, tmp_path / RULES.name)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_structure() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "model"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not (cells & mine), f"panel {p['title']!r} overlaps another"
        cells |= mine
    for p in panels():
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval"}
            assert used <= variables, (p["title"], used)
    titles = " ".join(p["title"].lower() for p in panels())
    for topic in ("requests", "errors", "first token", "duration", "tokens per minute", "credits per minute",
                  "queue", "healthy replicas", "breaker", "cache-hit", "worker"):
        assert topic in titles, topic


def exposed(text: str) -> set[str]:
    """Sample names a scrape can show: those present, and those of declared families whose
    labelled children have not been touched yet (a counter that has not counted)."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names |= {s.name for s in fam.samples}
        if fam.type == "counter":
            names |= {fam.name + "_total"}
        elif fam.type == "histogram":
            names |= {fam.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(fam.name)
    return names


def test_every_metric_the_files_use_exists_on_a_live_gateway(gateway: GatewayProcess, api_key: str) -> None:
    auth = {"Authorization": f"Bearer {api_key}"}
    ok = httpx.post(gateway.base_url + "/chat/completions", headers=auth, timeout=30,
                    json={"model": "test-model", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200
    bad = httpx.post(gateway.base_url + "/chat/completions", headers={"Authorization": "Bearer nope"}, timeout=30,
                     json={"model": "test-model", "messages": [{"role": "user", "content": "hi"}]})
    assert bad.status_code == 401
    text = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    names = exposed(text)
    used = set().union(*(metric_names(e) for e in exprs())) - FOREIGN
    assert used, "no metric names found in the files"
    assert used <= names, f"not exposed by the gateway: {sorted(used - names)}"
    # Those with samples now are really recorded, not just declared.
    for name in ("mesh_requests_total", "mesh_errors_total", "mesh_time_to_first_token_seconds_bucket",
                 "mesh_tokens_total", "mesh_ready_check", "mesh_queue_limit", "mesh_worker_replicas"):
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
