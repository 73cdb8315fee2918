"""deploy/systemd: systemd-analyze verify / security (offline) and what the units run."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from mesh.catalog import Catalog

from .conftest import (
    SYSTEMD,
    parse_mesh_invocation,
    subcommand_flags,
    tool,
    unit_entries,
    unit_environment,
    unit_values,
)

GATEWAY = SYSTEMD / "mesh-gateway.service"
WORKER = SYSTEMD / "mesh-worker.service"
UNITS = (GATEWAY, WORKER)
MAX_EXPOSURE = 2.5  # systemd-analyze security: below 3 is "OK"

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
}


def _expand(word: str, env: dict[str, str]) -> str:
    """systemd's ${VAR} substitution (one word, whitespace kept)."""
    return re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), f"<{m.group(1)}>"), word)


def _exec_argv(unit: Path, env: dict[str, str] | None = None) -> list[str]:
    (exec_start,) = unit_values(unit, "ExecStart")
    env = {**unit_environment(unit), **(env or {})}
    return [_expand(w, env) for w in shlex.split(exec_start)]


def _stubbed_copy(unit: Path, tmp_path: Path, stub: Path) -> Path:
    """The unit with /opt/mesh/bin/mesh pointed at an executable stub (verify checks it exists)."""
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/mesh/bin/mesh", str(stub)))
    return copy


# --- linters ------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path, stub_binary: Path) -> None:
    analyze = tool("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    copy = _stubbed_copy(unit, tmp_path, stub_binary)
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr  # no warnings either


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_security_exposure(unit: Path, tmp_path: Path, stub_binary: Path) -> None:
    analyze = tool("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    copy = _stubbed_copy(unit, tmp_path, stub_binary)
    out = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(copy)], capture_output=True, text=True, timeout=60
    )
    if "--offline" in out.stderr and "unrecognized" in out.stderr:
        pytest.skip("this systemd-analyze has no --offline (needs systemd >= 250)")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, out.stdout


# --- both units ---------------------------------------------------------------------------


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_units_are_hardened(unit: Path) -> None:
    for key, value in HARDENING.items():
        assert unit_values(unit, key) == [value], f"{unit.name}: {key}={value}"
    assert unit_values(unit, "DynamicUser") == ["yes"]
    assert unit_values(unit, "StateDirectory"), unit.name
    assert "@system-service" in unit_values(unit, "SystemCallFilter")
    assert unit_values(unit, "Restart") and unit_values(unit, "Type") == ["exec"]
    assert unit_values(unit, "WantedBy", section="Install") == ["multi-user.target"]
    assert "network-online.target" in " ".join(unit_values(unit, "After", section="Unit"))
    # Secrets come from a root-only EnvironmentFile, never from the unit itself.
    (env_file,) = unit_values(unit, "EnvironmentFile")
    assert env_file.startswith("/etc/mesh/") and env_file.endswith(".env")
    assert not any(k in unit_environment(unit) for k in ("MESH_ADMIN_KEY", "MESH_DATABASE", "MESH_WORKER_TOKEN"))


@pytest.mark.parametrize(
    ("unit", "example"),
    [(GATEWAY, "gateway.env.example"), (WORKER, "worker.env.example")],
    ids=lambda v: getattr(v, "name", v),
)
def test_environment_file_examples_cover_what_the_unit_uses(unit: Path, example: str) -> None:
    text = (SYSTEMD / example).read_text()
    keys = {line.split("=", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}
    used = set(re.findall(r"\$\{(\w+)\}", " ".join(unit_values(unit, "ExecStart"))))
    assert used - set(unit_environment(unit)) <= keys
    assert keys  # not empty


# --- the gateway --------------------------------------------------------------------------


def test_gateway_runs_mesh_serve_with_the_etc_config() -> None:
    argv = _exec_argv(GATEWAY)
    assert argv[0] == "/opt/mesh/bin/mesh"
    name, params = parse_mesh_invocation(argv[1:])
    assert name == "serve"
    assert params["__root__"]["config"] == "/etc/mesh/mesh.yaml"
    assert params["host"] == "0.0.0.0"
    assert params["port"] == 8080
    assert unit_values(GATEWAY, "WorkingDirectory") == ["/var/lib/mesh"]
    assert unit_values(GATEWAY, "ConfigurationDirectory") == ["mesh"]
    assert unit_values(GATEWAY, "PrivateDevices") == ["yes"]
    assert unit_values(GATEWAY, "RestrictAddressFamilies") == ["AF_UNIX AF_INET AF_INET6"]


# --- the worker ---------------------------------------------------------------------------


def test_worker_uses_flags_the_cli_has() -> None:
    argv = _exec_argv(WORKER)
    assert argv[0] == "/opt/mesh/bin/mesh"
    assert argv[1] == "worker"
    given = {w for w in argv[2:] if w.startswith("--")}
    assert {"--gateway", "--engine-url", "--model", "--launch"} <= given
    assert "--token" not in given  # the token is MESH_WORKER_TOKEN from the EnvironmentFile
    flags = subcommand_flags("worker")
    assert flags is not None, "`mesh worker` exists"
    assert given <= flags, f"unknown to `mesh worker`: {sorted(given - flags)}"
    name, params = parse_mesh_invocation(argv[1:])
    assert name == "worker"
    assert params["engine_url"] == "http://127.0.0.1:8000/v1"
    assert params["token"] is None  # read from the environment at run time


def test_worker_token_env_var_is_the_one_the_cli_reads() -> None:
    import typer

    from mesh.cli import app

    sub = typer.main.get_command(app).commands.get("worker")  # type: ignore[attr-defined]
    assert sub is not None, "`mesh worker` exists"
    (token,) = [p for p in sub.params if p.name == "token"]
    assert token.envvar == "MESH_WORKER_TOKEN"
    assert "MESH_WORKER_TOKEN=" in (SYSTEMD / "worker.env.example").read_text()


def test_worker_launches_the_catalog_recipe(catalog: Catalog) -> None:
    argv = _exec_argv(WORKER)
    opts = dict(zip(argv[2::2], argv[3::2], strict=True))
    entry = catalog[opts["--model"]]
    recipe = entry.recipe("vllm")
    launch = shlex.split(opts["--launch"])
    assert launch == recipe.argv, "MESH_LAUNCH must be the catalog's vllm recipe, word for word"
    port = recipe.flag("--port")
    assert opts["--engine-url"] == f"http://127.0.0.1:{port}/v1"
    assert opts["--advertise-url"] == f"http://<NODE_IP>:{port}/v1"
    # `vllm` resolves through the unit's PATH (the worker execs it without a shell).
    assert unit_environment(WORKER)["PATH"].split(":")[0] == "/opt/vllm/bin"


def test_worker_can_reach_the_gpus() -> None:
    assert unit_values(WORKER, "PrivateDevices") == []  # would hide /dev/nvidia*
    assert unit_values(WORKER, "DevicePolicy") == ["closed"]
    allowed = " ".join(unit_values(WORKER, "DeviceAllow"))
    for device in ("/dev/nvidiactl", "/dev/nvidia-uvm", "char-nvidia-frontend"):
        assert device in allowed
    assert unit_values(WORKER, "MemoryDenyWriteExecute") == []  # Triton JIT needs W+X pages
    env = unit_environment(WORKER)
    assert env["HF_HOME"].startswith("/var/cache/mesh-worker")
    assert unit_values(WORKER, "CacheDirectory") == ["mesh-worker"]


def test_unit_parser_keeps_repeated_keys() -> None:
    keys = [k for s, k, _ in unit_entries(WORKER) if s == "Service"]
    assert keys.count("DeviceAllow") >= 3 and keys.count("SystemCallFilter") == 2
