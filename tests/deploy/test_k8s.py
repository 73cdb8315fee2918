"""deploy/k8s: schema validation (offline), kustomize build, and structural checks."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.catalog import Catalog
from mesh.config import Settings

from .conftest import (
    K8S,
    docs_of_kind,
    k8s_docs,
    k8s_files,
    parse_mesh_invocation,
    pod_spec,
    subcommand_flags,
    tool,
)

KUBERNETES_VERSION = "1.34.0"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


def _workloads() -> list[dict[str, Any]]:
    return [d for _, d in k8s_docs() if d["kind"] in WORKLOADS]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def _daemonset() -> dict[str, Any]:
    (ds,) = docs_of_kind("DaemonSet")
    return ds


def _container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec(doc)["containers"] if c["name"] == name)


def _config_map_yaml() -> dict[str, Any]:
    (cm,) = [d for d in docs_of_kind("ConfigMap") if d["metadata"]["name"] == "mesh-config"]
    data: dict[str, Any] = yaml.safe_load(cm["data"]["mesh.yaml"])
    return data


# --- every document -----------------------------------------------------------------------


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: p.name)
def test_every_document_is_a_named_resource_in_the_mesh_namespace(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], path.name
        assert isinstance(doc.get("kind"), str) and doc["kind"], path.name
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} has no metadata.name"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "mesh", f"{path.name}: {doc['kind']} not in namespace mesh"
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "mesh", path.name


def test_names_are_unique_per_kind() -> None:
    seen: set[tuple[str, str]] = set()
    for _, doc in k8s_docs():
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{key} defined twice"
        seen.add(key)


def test_kustomization_lists_exactly_the_manifests() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    assert kust["namespace"] == "mesh"
    listed = kust["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.name for p in k8s_files())


# --- schema validation --------------------------------------------------------------------


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: p.name)
def test_manifests_match_the_kubernetes_schemas(path: Path) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is None:
            continue
        try:
            kv.validate(doc, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_kustomize_build_renders_every_resource() -> None:
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (kustomize build needs no cluster, just the binary)")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    assert len(built) == len(k8s_docs())
    images = {c["image"] for d in built if d["kind"] in WORKLOADS for c in d["spec"]["template"]["spec"]["containers"]}
    assert "mesh:0.1.0" in images  # the kustomize images: entry applies
    for d in built:
        assert d["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kustomize"


# --- workloads ----------------------------------------------------------------------------


@pytest.mark.parametrize("doc", _workloads(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_workloads_have_resources_pinned_images_and_matching_selectors(doc: dict[str, Any]) -> None:
    selector = doc["spec"]["selector"]["matchLabels"]
    labels = doc["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items(), "the selector must match the pod template's labels"
    assert pod_spec(doc).get("automountServiceAccountToken") is False
    for c in _containers(doc):
        image = c["image"]
        assert ":" in image and not image.endswith(":latest"), f"{c['name']}: pin the image tag ({image})"
        res = c.get("resources", {})
        assert res.get("requests", {}).get("memory") and res.get("requests", {}).get("cpu"), c["name"]
        assert res.get("limits", {}).get("memory"), f"{c['name']}: set a memory limit"
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]


def test_deployments_have_readiness_and_liveness_probes() -> None:
    deployments = docs_of_kind("Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"mesh-gateway", "mesh-redis"}
    for doc in deployments:
        for c in pod_spec(doc)["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, f"{doc['metadata']['name']}/{c['name']}"


def test_gateway_deployment() -> None:
    (gw,) = [d for d in docs_of_kind("Deployment") if d["metadata"]["name"] == "mesh-gateway"]
    assert gw["spec"]["replicas"] == 2
    spec = pod_spec(gw)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (c,) = spec["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # Traffic only while the database (and Redis) answer, billing writes succeed and a replica
    # is healthy; alive while the process serves HTTP. Both paths are the gateway's own routes.
    from mesh.app import routes

    paths = {getattr(r, "path", None) for r in routes()}
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] in paths & {"/health/live", "/health/ready"}
        assert c[probe]["httpGet"]["port"] == "http"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
    # `mesh --config FILE serve …` with the real CLI; the file comes from the ConfigMap.
    name, params = parse_mesh_invocation(c["args"])
    assert name == "serve"
    assert params["__root__"]["config"] == "/etc/mesh/mesh.yaml"
    assert params["host"] == "0.0.0.0" and params["port"] == 8080
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/etc/mesh"] == "config"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "mesh-config"
    # The admin key and database URL come from the Secret, never from the ConfigMap.
    assert c["envFrom"] == [{"secretRef": {"name": "mesh-gateway"}}]
    (secret,) = [d for d in docs_of_kind("Secret") if d["metadata"]["name"] == "mesh-gateway"]
    assert set(secret["stringData"]) == {"MESH_ADMIN_KEY", "MESH_DATABASE", "MESH_CONSOLE__SECRET"}
    assert secret["stringData"]["MESH_DATABASE"].startswith("postgresql+asyncpg://")
    config = _config_map_yaml()
    assert "admin_key" not in config and "database" not in config


def test_gateway_has_a_disruption_budget_and_service() -> None:
    (pdb,) = docs_of_kind("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    (svc,) = [d for d in docs_of_kind("Service") if d["metadata"]["name"] == "mesh-gateway"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_postgres_statefulset_keeps_its_data() -> None:
    (pg,) = docs_of_kind("StatefulSet")
    assert pg["spec"]["serviceName"] == "mesh-postgres"
    assert pg["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    (c,) = pod_spec(pg)["containers"]
    assert c["image"].startswith("postgres:")
    assert "readinessProbe" in c and "livenessProbe" in c
    assert {"secretRef": {"name": "mesh-postgres"}} in c["envFrom"]
    (svc,) = [d for d in docs_of_kind("Service") if d["metadata"]["name"] == "mesh-postgres"]
    assert svc["spec"]["clusterIP"] == "None"
    # The gateway's database URL points at this Service with the Secret's user and database.
    (gw_secret,) = [d for d in docs_of_kind("Secret") if d["metadata"]["name"] == "mesh-gateway"]
    (pg_secret,) = [d for d in docs_of_kind("Secret") if d["metadata"]["name"] == "mesh-postgres"]
    url = gw_secret["stringData"]["MESH_DATABASE"]
    creds = pg_secret["stringData"]
    expected = f"postgresql+asyncpg://{creds['POSTGRES_USER']}:{creds['POSTGRES_PASSWORD']}@mesh-postgres:5432/"
    assert url == expected + creds["POSTGRES_DB"]


def test_redis_is_reachable_at_the_configured_url() -> None:
    (svc,) = [d for d in docs_of_kind("Service") if d["metadata"]["name"] == "mesh-redis"]
    port = svc["spec"]["ports"][0]["port"]
    assert _config_map_yaml()["redis"] == f"redis://mesh-redis:{port}/0"


def test_services_select_pods_that_exist_and_name_their_ports() -> None:
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in _workloads()]
    port_names = {p["name"] for d in _workloads() for c in _containers(d) for p in c.get("ports", [])}
    for svc in docs_of_kind("Service"):
        sel = svc["spec"]["selector"]
        assert any(sel.items() <= labels.items() for labels in pod_labels), svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{svc['metadata']['name']}: unknown port {port['targetPort']}"


def test_referenced_secrets_and_config_maps_exist() -> None:
    secrets = {d["metadata"]["name"]: d for d in docs_of_kind("Secret")}
    maps = {d["metadata"]["name"] for d in docs_of_kind("ConfigMap")}
    for doc in _workloads():
        for c in _containers(doc):
            for ref in c.get("envFrom", []):
                if "secretRef" in ref:
                    assert ref["secretRef"]["name"] in secrets
            for env in c.get("env", []):
                key_ref = env.get("valueFrom", {}).get("secretKeyRef")
                if key_ref:
                    assert key_ref["key"] in secrets[key_ref["name"]]["stringData"], key_ref
        for vol in pod_spec(doc).get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in maps


# --- GPU nodes: vLLM + worker sidecar ------------------------------------------------------


def test_gpu_daemonset_schedules_on_gpu_nodes_only() -> None:
    ds = _daemonset()
    spec = pod_spec(ds)
    assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    vllm = _container(ds, "vllm")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == vllm["resources"]["requests"]["nvidia.com/gpu"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    shm = {m["mountPath"]: m["name"] for m in vllm["volumeMounts"]}["/dev/shm"]
    assert volumes[shm]["emptyDir"]["medium"] == "Memory"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm[probe]["httpGet"]["path"] == "/health"


def test_vllm_container_runs_the_catalog_recipe(catalog: Catalog) -> None:
    ds = _daemonset()
    model = ds["metadata"]["labels"]["mesh.dev/model"]
    entry = catalog[model]
    recipe = entry.recipe("vllm")
    vllm = _container(ds, "vllm")
    assert vllm["command"] + vllm["args"] == recipe.argv
    assert int(vllm["resources"]["limits"]["nvidia.com/gpu"]) == recipe.gpus.count
    assert pod_spec(ds)["nodeSelector"]["mesh.dev/model"] == model


def test_worker_sidecar_uses_flags_the_cli_has(catalog: Catalog) -> None:
    ds = _daemonset()
    worker = _container(ds, "worker")
    args = worker["args"]
    assert args[0] == "worker"
    given = {a for a in args[1:] if a.startswith("--")}
    # The contract every worker build has.
    assert {"--gateway", "--engine-url", "--model"} <= given
    values = dict(zip(args[1::2], args[2::2], strict=True))
    assert values["--engine-url"] == "http://127.0.0.1:8000/v1"  # vLLM in the same pod
    assert values["--model"] == ds["metadata"]["labels"]["mesh.dev/model"]
    assert values["--gateway"].startswith("http://mesh-gateway.mesh.svc")
    env = {e["name"] for e in worker["env"]}
    assert "MESH_WORKER_TOKEN" in env  # the token comes from the Secret, not the command line
    assert "--token" not in given
    flags = subcommand_flags("worker")
    assert flags is not None, "`mesh worker` exists"
    assert given <= flags, f"unknown to `mesh worker`: {sorted(given - flags)}"
    name, params = parse_mesh_invocation(args)
    assert name == "worker" and params["model"] == values["--model"]


def test_gateway_config_map_is_a_valid_config_that_agrees_with_the_catalog(catalog: Catalog) -> None:
    data = _config_map_yaml()
    settings = Settings.model_validate(data)
    for model in settings.models:
        entry = catalog[model.id]
        expected = entry.to_model_config(model.engines)
        for field in ("family", "license", "context_length", "reasoning", "tools", "pricing"):
            assert getattr(model, field) == getattr(expected, field), f"{model.id}.{field}"
    ds_model = _daemonset()["metadata"]["labels"]["mesh.dev/model"]
    assert settings.model(ds_model) is not None
    (token,) = data["workers"]["tokens"]
    assert ds_model in token["models"]
    assert settings.catalog  # catalog models may join through workers
    assert settings.model(ds_model).engines == ()  # type: ignore[union-attr]  # replicas come from the sidecars
