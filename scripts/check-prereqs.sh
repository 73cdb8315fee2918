#!/usr/bin/env bash
# Says clearly what a fresh machine lacks before uv starts building, instead of failing
# deep inside llama.cpp's build.
set -euo pipefail
py="${1:-python3}"
missing=()
if ! command -v "$py" >/dev/null 2>&1; then
  echo "error: no Python found (need Python 3.11 or newer as python3.11 or python3)" >&2
  exit 1
fi
if ! "$py" -c 'import sys' >/dev/null 2>&1; then
  echo "error: $py is there but does not run (a pyenv shim of a version not installed?); make PYTHON=... picks another" >&2
  exit 1
fi
if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "error: $("$py" --version 2>&1) is too old; Mesh needs Python 3.11 or newer" >&2
  exit 1
fi
if ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  missing+=("Python's venv and ensurepip modules (Debian/Ubuntu: apt-get install python3-venv)")
fi
# llama-cpp-python compiles llama.cpp on the first install (uv caches the wheel after).
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || command -v clang >/dev/null 2>&1 \
  || missing+=("a C compiler (Debian/Ubuntu: apt-get install build-essential)")
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 \
  || missing+=("a C++ compiler (Debian/Ubuntu: apt-get install build-essential)")
# CMake is not required: scikit-build-core fetches it from PyPI when the system has none.
if [ "${#missing[@]}" -gt 0 ]; then
  echo "error: this machine is missing what Mesh's first install needs:" >&2
  for m in "${missing[@]}"; do echo "  - $m" >&2; done
  exit 1
fi
