"""LiteLLM's proxy in its own virtual environment, bench/.venv-litellm (gitignored).

The version is pinned: litellm 1.82.7 and 1.82.8 on PyPI were a credential-stealing supply
chain attack (March 2026), so the bench never installs an unpinned LiteLLM, and refuses an
environment that holds the ``litellm_init.pth`` file those releases dropped. Its dependencies
are pinned too, with their hashes (``bench/litellm-requirements.txt``, compiled from
``litellm-requirements.in`` by ``make lock``), and installed with ``--require-hashes``.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from bench.targets import ROOT

VENV = ROOT / "bench" / ".venv-litellm"
SPEC = "litellm[proxy]==1.82.6"
REQUIREMENTS = ROOT / "bench" / "litellm-requirements.txt"
MARKER = VENV / ".installed"


def python() -> Path:
    return VENV / "bin" / "python"


def _check_clean() -> None:
    bad = list(VENV.glob("lib/python*/site-packages/litellm_init.pth"))
    if bad:
        raise RuntimeError(f"{bad[0]} exists: a compromised LiteLLM was installed here; delete {VENV}")


def ensure() -> Path:
    """The environment's python, creating it and installing :data:`SPEC` on first use."""
    stamp = f"{SPEC} {hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()}"
    if MARKER.exists() and MARKER.read_text().strip() == stamp and python().exists():
        _check_clean()
        return python()
    base = getattr(sys, "_base_executable", None) or shutil.which("python3.11") or "python3"
    print(f"  installing {SPEC} into {VENV.relative_to(ROOT)} (first run only, about a minute)", flush=True)
    if not python().exists():
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python()), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--require-hashes", "-r", str(REQUIREMENTS)], check=True, stdout=subprocess.DEVNULL)
    _check_clean()
    MARKER.write_text(stamp + "\n")
    return python()


def version() -> str:
    out = subprocess.run([str(python()), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True)
    return out.stdout.strip()
