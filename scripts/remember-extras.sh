#!/usr/bin/env bash
# scripts/remember-extras.sh FILE PYTHON [EXTRA...]: check each extra against pyproject.toml's
# [project.optional-dependencies], then write them to FILE only when they changed (so that
# make, which re-reads FILE's time after this recipe, installs again only then).
set -euo pipefail
file=$1 python=$2
shift 2
"${python:-python3}" - "$@" <<'PY'
import sys

try:
    import tomllib
except ImportError:  # an older Python: uv sync names an unknown extra itself
    sys.exit(0)
with open("pyproject.toml", "rb") as f:
    known = tomllib.load(f)["project"].get("optional-dependencies", {})
unknown = [name for name in sys.argv[1:] if name not in known]
if unknown:
    sys.exit(f"make: no extra named {', '.join(unknown)} in pyproject.toml (there are: {', '.join(known) or 'none'}); "
             "nothing was remembered")
PY
wanted="$*"
if [ ! -f "$file" ] || [ "$(cat "$file")" != "$wanted" ]; then
  printf '%s\n' "$wanted" > "$file"
fi
