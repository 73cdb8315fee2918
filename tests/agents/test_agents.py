"""Real coding agents against Mesh: Claude Code and Codex, offline, on loopback.

The CLIs come from npm, pinned in ``tests/agents/package-lock.json`` (``make dev`` runs
``npm ci`` here); the tests run each one's native binary with no login: base URL and key
from the environment, telemetry, auto-update and other network features switched off.
Both models have an 8,192-token context, as the embedded default has: the test engine
(deterministic: directives in the prompt choose text or a tool call) and the embedded
model itself (real, so only the plumbing is asserted, never its words).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import conftest_db
from conftest import TEST_PRICING
from support.gateway import Admin, GatewayProcess
from testengine.harness import EngineProcess

HERE = Path(__file__).resolve().parent
CONTEXT = 8192
RUN_TIMEOUT = 120
EMBEDDED_TIMEOUT = 900  # the embedded model prefills a real agent preamble on a shared CPU


def _binary(pattern: str) -> Path | None:
    found = sorted((HERE / "node_modules").glob(pattern))
    return found[0] if found else None


CLAUDE = _binary("@anthropic-ai/claude-code-linux-*/claude")
CODEX = _binary("@openai/codex-linux-*/vendor/*/bin/codex")


def _require(request: pytest.FixtureRequest, binary: Path | None, name: str) -> Path:
    if binary is None or not os.access(binary, os.X_OK):
        conftest_db._unavailable(request, f"{name} is not installed (make dev runs npm ci in tests/agents)")
    assert binary is not None
    return binary


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, EngineProcess, str]]:
    work = tmp_path_factory.mktemp("agents")
    with EngineProcess(name="agents", models="test-model", max_model_len=CONTEXT) as engine:
        model = {"context_length": CONTEXT, "pricing": TEST_PRICING}
        config = {
            "database": f"sqlite:///{work}/mesh.db",
            "logging": {"level": "INFO"},  # request lines: what Mesh did for the embedded model's test
            "models": [
                {"id": "agent-test", **model,
                 "engines": [{"type": "openai", "base_url": engine.base_url, "model": "test-model"}]},
                {"id": "smol", **model, "engines": [{"type": "embedded", "context_length": CONTEXT}]},
            ],
        }
        with GatewayProcess(config, work) as gw:
            admin = Admin(gw.url)
            key = admin.key(admin.account("agents", credits="1000"))["key"]
            admin.close()
            yield gw, engine, key


def _run(
    argv: list[str], env: dict[str, str], cwd: Path, timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert out.returncode == 0, f"{argv[0]} exited {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    return out


def _asked(engine: EngineProcess, words: str) -> dict[str, Any]:
    """The agent's main request carrying ``words`` (agents also send side requests, without tools)."""
    found = [r for r in engine.requests() if r.get("tools") and words in json.dumps(r["messages"])]
    assert found, engine.requests()
    return found[-1]


def _offline(home: Path) -> dict[str, str]:
    """A clean environment: a fresh HOME, nothing of the developer's, no network features."""
    home.mkdir(parents=True, exist_ok=True)
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "TZ") if k in os.environ}
    return {**keep, "HOME": str(home), "NO_COLOR": "1", "TERM": "dumb"}


# -- Claude Code ---------------------------------------------------------------------------------


@pytest.fixture
def claude(request: pytest.FixtureRequest, mesh: tuple[GatewayProcess, EngineProcess, str],
           tmp_path: Path) -> Iterator[tuple[list[str], dict[str, str], Path]]:
    binary = _require(request, CLAUDE, "Claude Code")
    gw, _, key = mesh
    env = {
        **_offline(tmp_path / "home"),
        "ANTHROPIC_BASE_URL": gw.url,
        "ANTHROPIC_API_KEY": key,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }
    for var in ("ANTHROPIC_MODEL", "ANTHROPIC_SMALL_FAST_MODEL", "ANTHROPIC_DEFAULT_HAIKU_MODEL",
                "ANTHROPIC_DEFAULT_SONNET_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL"):
        env[var] = "agent-test"
    project = tmp_path / "project"
    project.mkdir()
    yield [str(binary), "--output-format", "json"], env, project


def _claude_result(out: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(out.stdout)
    assert result["is_error"] is False and result["subtype"] == "success", result
    return result


def test_claude_code_one_shot_answers_within_an_8k_context(
    claude: tuple[list[str], dict[str, str], Path], mesh: tuple[GatewayProcess, EngineProcess, str]
) -> None:
    argv, env, project = claude
    _, engine, _ = mesh
    engine.clear_requests()
    result = _claude_result(_run([*argv, "-p", "[notool] [tokens:6] say hi"], env, project))
    assert result["result"] == "tok0 tok1 tok2 tok3 tok4 tok5"
    sent = _asked(engine, "say hi")
    assert len(sent["tools"]) >= 5  # Claude Code's own tools went along
    # It asked for 32,000 output tokens of an 8,192 context: the room its prompt leaves.
    prompt = httpx.post(engine.url + "/tokenize", json={"messages": sent["messages"]}).json()["count"]
    assert sent["max_tokens"] == CONTEXT - prompt > 1000


def test_claude_code_tool_round_trip(claude: tuple[list[str], dict[str, str], Path]) -> None:
    argv, env, project = claude
    prompt = '[tool:Bash] [args:{"command": "echo mesh-tool-ok > made-by-claude.txt", "description": "write"}] go'
    result = _claude_result(_run([*argv, "--allowedTools", "Bash", "-p", prompt], env, project))
    assert (project / "made-by-claude.txt").read_text().strip() == "mesh-tool-ok"  # the tool really ran
    assert result["num_turns"] == 2 and result["result"].startswith("Tool result:")  # and its result came back


def test_claude_code_multi_turn_session(
    claude: tuple[list[str], dict[str, str], Path], mesh: tuple[GatewayProcess, EngineProcess, str]
) -> None:
    argv, env, project = claude
    _, engine, _ = mesh
    first = _claude_result(_run([*argv, "-p", "[notool] [tokens:2] remember the word walrus"], env, project))
    engine.clear_requests()
    second = _claude_result(
        _run([*argv, "--resume", first["session_id"], "-p", "[notool] [tokens:3] which word?"], env, project)
    )
    assert second["session_id"] and second["result"] == "tok0 tok1 tok2"
    sent = _asked(engine, "which word?")
    history = json.dumps(sent["messages"])
    assert "remember the word walrus" in history and "tok0 tok1" in history  # the first turn came back
    assert second["usage"]["cache_read_input_tokens"] > 0  # and its prefix was still cached


def _request_lines(gw: GatewayProcess, model: str) -> list[dict[str, Any]]:
    lines = (json.loads(x) for x in gw.log().splitlines() if x.startswith("{"))
    return [x for x in lines if x.get("msg") == "request" and x.get("model") == model]


@pytest.mark.timeout(EMBEDDED_TIMEOUT + 60)
def test_claude_code_answers_through_the_embedded_model(
    claude: tuple[list[str], dict[str, str], Path], mesh: tuple[GatewayProcess, EngineProcess, str]
) -> None:
    # Asserts what Mesh and the engine did, not what a 135M model at the agent's own
    # temperature chose to write: it may answer, or call tools turn after turn until the
    # conversation outgrows the context (Mesh then answers Claude Code's next turn with a
    # 400 context-length error, and Claude Code exits 1 saying "Prompt is too long").
    argv, env, project = claude
    gw = mesh[0]
    env = {**env, **{k: "smol" for k in env if k.startswith("ANTHROPIC_") and k.endswith("MODEL")}}
    seen = len(_request_lines(gw, "smol"))
    out = subprocess.run([*argv, "-p", "Say hello."], env=env, cwd=project, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=EMBEDDED_TIMEOUT, check=False)
    lines = _request_lines(gw, "smol")[seen:]
    served = [x for x in lines if x["status"] == "ok"]
    # Its whole preamble went in, inside 8,192 tokens, with room to answer (not the one token of old).
    assert any(x["input_tokens"] > 2000 and x["output_tokens"] > 1 for x in served), lines
    refused = [x for x in lines if x["status"] != "ok"]
    assert all(x.get("error") == "invalid_request" for x in refused), lines  # only a context overflow
    if out.returncode == 0:
        assert _claude_result(out)["usage"]["input_tokens"] > 2000
    else:
        assert refused and json.loads(out.stdout)["result"] == "Prompt is too long", out.stdout[-3000:]


# -- Codex ---------------------------------------------------------------------------------------


@pytest.fixture
def codex(request: pytest.FixtureRequest, mesh: tuple[GatewayProcess, EngineProcess, str],
          tmp_path: Path) -> Iterator[tuple[list[str], dict[str, str], Path]]:
    binary = _require(request, CODEX, "Codex")
    gw, _, key = mesh
    home = tmp_path / "home"
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True)
    (codex_home / "config.toml").write_text(
        'model = "agent-test"\nmodel_provider = "mesh"\n'
        "check_for_update_on_startup = false\n"
        "[analytics]\nenabled = false\n"
        "[model_providers.mesh]\n"
        f'name = "Mesh"\nbase_url = "{gw.base_url}"\nenv_key = "MESH_API_KEY"\nwire_api = "responses"\n'
    )
    env = {**_offline(home), "CODEX_HOME": str(codex_home), "MESH_API_KEY": key}
    project = tmp_path / "project"
    project.mkdir()
    yield [str(binary), "exec", "--skip-git-repo-check"], env, project


def test_codex_one_shot(codex: tuple[list[str], dict[str, str], Path],
                        mesh: tuple[GatewayProcess, EngineProcess, str]) -> None:
    argv, env, project = codex
    _, engine, _ = mesh
    engine.clear_requests()
    out = _run([*argv, "[notool] [tokens:4] say hi"], env, project)
    assert out.stdout.strip() == "tok0 tok1 tok2 tok3"
    sent = _asked(engine, "say hi")
    assert any(t["function"]["name"] == "exec_command" for t in sent["tools"])


def test_codex_tool_round_trip(codex: tuple[list[str], dict[str, str], Path]) -> None:
    argv, env, project = codex
    prompt = '[tool:exec_command] [args:{"cmd": "echo mesh-tool-ok > made-by-codex.txt"}] go'
    out = _run([*argv, "--dangerously-bypass-approvals-and-sandbox", prompt], env, project)
    assert (project / "made-by-codex.txt").read_text().strip() == "mesh-tool-ok"
    assert out.stdout.startswith("Tool result:") and "exited with code 0" in out.stdout


def test_codex_multi_turn_session(codex: tuple[list[str], dict[str, str], Path],
                                  mesh: tuple[GatewayProcess, EngineProcess, str]) -> None:
    argv, env, project = codex
    _, engine, _ = mesh
    _run([*argv, "[notool] [tokens:2] remember the word walrus"], env, project)
    engine.clear_requests()
    out = _run([*argv, "resume", "--last", "[notool] [tokens:3] which word?"], env, project)
    assert out.stdout.strip() == "tok0 tok1 tok2"
    sent = _asked(engine, "which word?")
    history = json.dumps(sent["messages"])
    assert "remember the word walrus" in history and "tok0 tok1" in history


@pytest.mark.timeout(EMBEDDED_TIMEOUT + 60)
def test_codex_answers_through_the_embedded_model(codex: tuple[list[str], dict[str, str], Path]) -> None:
    argv, env, project = codex
    out = subprocess.run([*argv, "-c", 'model="smol"', "Say hello."], env=env, cwd=project,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=EMBEDDED_TIMEOUT,
                         check=False)
    if out.returncode != 0:
        # A 135M model may ramble until its output cap: Mesh then answers the Responses API's
        # `incomplete` status with reason max_output_tokens, and Codex exits 1 saying so. The
        # turn went through Mesh either way; what the model wrote is not the test's business.
        assert "Incomplete response returned, reason: max_output_tokens" in out.stderr, out.stderr[-3000:]
    else:
        assert out.stdout.strip()
    assert "tokens used" in out.stderr, out.stderr[-3000:]
