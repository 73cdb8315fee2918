#!/usr/bin/env bash
# Installs the real coding agents the test suite drives against Mesh (Claude Code and
# Codex, pinned in tests/agents/package-lock.json) with `npm ci`, once per lock change.
# Their postinstall scripts are not needed: the tests run each platform's native binary.
set -euo pipefail
dir="$(cd "$(dirname "$0")/.." && pwd)/tests/agents"
stamp="$dir/node_modules/.mesh-installed"
if ! command -v npm >/dev/null; then
  echo "note: npm is missing; install Node.js 20+ and npm for the coding-agent tests" >&2
  exit 0
fi
if [ -f "$stamp" ] && [ "$stamp" -nt "$dir/package-lock.json" ]; then
  exit 0
fi
echo "installing the coding agents for the tests (npm ci in tests/agents)"
if (cd "$dir" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error); then
  touch "$stamp"
else
  # Not fatal for the rest of make dev: the agent tests report what is missing (and fail
  # under MESH_TEST_REQUIRE_SERVICES=1, as CI runs them).
  echo "warning: npm ci in tests/agents failed; the coding-agent tests will not run" >&2
fi
