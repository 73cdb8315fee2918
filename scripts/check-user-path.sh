#!/usr/bin/env bash
# The new user's path, as CI proves it: a copy of this checkout with no .venv and no
# .tools, `make run` there (uv bootstrapped by hash, runtime dependencies only, from the
# lock), every module of `mesh` imported in that runtime-only environment, then one
# streamed chat completion from the embedded model through the openai SDK (run from the
# dev environment: the SDK is not a runtime dependency). Each step is timed and bounded.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dev_python="$here/.venv/bin/python"
[ -x "$dev_python" ] || { echo "check-user-path: run 'make dev' first (the client needs the openai SDK)" >&2; exit 1; }

work="$(mktemp -d /tmp/mesh-user-path.XXXXXX)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM -- "-$server_pid" 2>/dev/null || kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

step_start=0
step() { step_start=$(date +%s%N); echo "user-path: $1"; }
done_step() {
  local ms=$(( ($(date +%s%N) - step_start) / 1000000 ))
  printf 'user-path:   %s took %d.%01d s\n' "$1" $((ms / 1000)) $(((ms % 1000) / 100))
}

step "copy the checkout (tracked and new files; no .venv, .tools or .mesh)"
# (a tracked file deleted in the work tree is left out, as a commit of this tree would)
(cd "$here" && git ls-files -co --exclude-standard -z \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf -) | tar -xf - -C "$work"
done_step "copy"

port="$("$dev_python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

step "make run (installs from uv.lock, runtime dependencies only, then serves on port $port)"
log="$work/make-run.log"
# setsid: the server and make are one process group, stopped together.
( cd "$work" && MESH_SERVER__PORT="$port" exec setsid make run >"$log" 2>&1 ) &
server_pid=$!
deadline=$(( $(date +%s) + ${USER_PATH_INSTALL_TIMEOUT:-1500} ))
until curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "user-path: FAILED: make run exited before serving; its output:" >&2; tail -40 "$log" >&2; exit 1
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "user-path: FAILED: make run did not serve in time; its output:" >&2; tail -40 "$log" >&2; exit 1
  fi
  sleep 0.5
done
done_step "make run until /health answers"
if [ -e "$work/.venv/.dev-installed" ] || "$work/.venv/bin/python" -c 'import pytest' 2>/dev/null; then
  echo "user-path: FAILED: make run installed dev dependencies" >&2; exit 1
fi

step "import every module of mesh in the runtime-only environment"
"$work/.venv/bin/python" - <<'PY'
import importlib, pkgutil, sys
import mesh
# __main__ runs the CLI when imported: everything else must import.
names = [m.name for m in pkgutil.walk_packages(mesh.__path__, "mesh.") if not m.name.endswith(".__main__")]
failed = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - report every module that cannot load
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
if failed:
    print("user-path: FAILED: modules that do not import with runtime dependencies only:", *failed, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"user-path:   {len(names)} modules imported")
PY
done_step "imports"

step "one streamed chat completion from the embedded model through the openai SDK"
key="$(cat "$work/.mesh/quickstart-key")"
MESH_BASE="http://127.0.0.1:$port/v1" MESH_KEY="$key" timeout 300 "$dev_python" - <<'PY'
import os, sys
from openai import OpenAI
client = OpenAI(base_url=os.environ["MESH_BASE"], api_key=os.environ["MESH_KEY"], max_retries=0, timeout=240)
model = client.models.list().data[0].id
chunks, text, finish, usage = 0, "", None, None
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello in French."}], stream=True,
    max_tokens=16, temperature=0, seed=1, stream_options={"include_usage": True},
):
    chunks += 1
    for choice in chunk.choices:
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
    usage = chunk.usage or usage
if chunks < 2 or finish is None or usage is None or usage.completion_tokens < 1:
    print(f"user-path: FAILED: chunks={chunks} finish={finish} usage={usage}", file=sys.stderr)
    sys.exit(1)
print(f"user-path:   {model}: {chunks} chunks, finish={finish}, {usage.completion_tokens} tokens")
PY
done_step "chat"

step "stop the server"
kill -TERM -- "-$server_pid" 2>/dev/null || kill -TERM "$server_pid"
for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.2; done
if kill -0 "$server_pid" 2>/dev/null; then echo "user-path: FAILED: the server did not stop on SIGTERM" >&2; exit 1; fi
server_pid=""
done_step "stop"
echo "user-path: OK"
