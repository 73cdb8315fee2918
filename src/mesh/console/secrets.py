"""The console secret and what is derived from it.

The secret signs the CSRF tokens of signed-out forms, the flash-message cookie and (unless
its own secret is configured) the test payment provider's webhook. It is never kept in
the database, so that read access to the database yields nothing that signs: it is the
configured ``console.secret`` (also ``MESH_CONSOLE__SECRET``), or the contents of
``console.secret_file``, which is generated (32 random bytes, hex, mode 0600) when it
does not exist yet, as the quick start needs. Several gateway hosts must share one
secret: production configs set it (deploy/ reads it from a file or the environment).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from mesh.config import ConsoleConfig

log = logging.getLogger("mesh.console")

MIN_SECRET_CHARS = 32


class SecretError(Exception):
    """The console secret cannot be read; the message says where it was looked for."""


def load_secret(config: ConsoleConfig) -> bytes:
    """The configured secret, else the secret file's (created if missing). Raises :class:`SecretError`."""
    if config.secret is not None:
        return config.secret.get_secret_value().encode()
    path = Path(config.secret_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another gateway process created it first: read theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            log.warning("generated a console secret in %s; set console.secret or secret_file for production", path)
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise SecretError(f"cannot read the console secret file {path}: {exc.strerror or exc}") from None
    if len(value) < MIN_SECRET_CHARS:
        raise SecretError(f"the console secret in {path} must be at least {MIN_SECRET_CHARS} characters")
    return value.encode()


def derive(secret: bytes, purpose: str, data: str = "") -> bytes:
    """A 32-byte value bound to ``purpose`` and ``data``; distinct purposes never collide."""
    return hmac.new(secret, f"{purpose}\x00{data}".encode(), hashlib.sha256).digest()


def sign(secret: bytes, purpose: str, data: str) -> str:
    return derive(secret, purpose, data).hex()


def verify(secret: bytes, purpose: str, data: str, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, purpose, data), signature)
