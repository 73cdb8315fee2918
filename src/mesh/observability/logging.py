"""Structured logs: one JSON object per line, with the request id where there is one.

Prompts, completions and keys are never passed to a logger by Mesh's own code, and no
setting turns content logging on (``logging.log_content`` accepts only false).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from mesh.config import LoggingConfig

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure(config: LoggingConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.json_logs:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # Migrations narrate every step at INFO; operators need to hear only about problems.
    logging.getLogger("alembic").setLevel(logging.WARNING)
