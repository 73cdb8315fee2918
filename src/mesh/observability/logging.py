"""Structured logs: one JSON object per line, with the request id where there is one.

Prompts, completions and keys are never passed to a logger by Mesh's own code, and no
setting turns content logging on (``logging.log_content`` accepts only false).

The per-request line (:class:`AccessLog`) does not go through the logging module: a
``LogRecord``, the handler's lock and a flush per line were a twentieth of a request's CPU
(bench/). It is the same JSON object the logging module would write, built from the
fields with orjson and written with the other lines of the same event-loop turn in one
``write``. At high rates it can be sampled (``logging.request_sample``): errors and
requests slower than ``logging.slow_request_ms`` are always logged.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import random
import sys
import time
from typing import IO, Any

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


class _Stream:
    """The JSON handler's stream, written directly: lines queued in one event-loop turn go
    out in one write at the end of it (or at once, off the loop)."""

    def __init__(self, handler: logging.StreamHandler[IO[str]]) -> None:
        self.handler = handler
        self._pending: list[bytes] = []
        self._second = -1
        self._prefix = ""

    def ts(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"

    def put(self, line: bytes) -> None:
        self._pending.append(line)
        if len(self._pending) > 1:
            return  # a flush is already scheduled
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop: write now
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        stream = self.handler.stream
        try:
            with self.handler.lock or _NO_LOCK:  # the logging module's lines never interleave with ours
                stream.write(data.decode())
                stream.flush()
        except Exception:  # as a logging handler would: a broken stream never fails a request
            pass


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


_NO_LOCK = _NoLock()
_direct: _Stream | None = None  # set by configure() when lines are JSON


class AccessLog:
    """The one line per request, at INFO on ``logger``'s name, with the same fields (in
    the same order) as ``logger.info(msg, extra=fields)`` would write through
    :class:`JSONFormatter`; through the logging module itself when :func:`configure` did not
    set up JSON lines or other handlers were added (tests' capture, an operator's own)."""

    def __init__(self, logger: logging.Logger, sample: float = 1.0, slow_ms: int | None = None) -> None:
        self.logger = logger
        self.sample = sample
        self.slow_ms = slow_ms

    def wanted(self, *, error: bool, duration_ms: int) -> bool:
        """Whether this request's line is written: always for an error or a slow request,
        else for a ``sample`` share of requests."""
        if not self.logger.isEnabledFor(logging.INFO):
            return False
        if error or self.sample >= 1.0 or (self.slow_ms is not None and duration_ms >= self.slow_ms):
            return True
        return random.random() < self.sample

    def request(self, fields: dict[str, Any], *, always: bool | None = None) -> None:
        """The ``request`` line of a finished request (``fields`` has its ``status`` and
        ``duration_ms``), if :meth:`wanted`: ``always`` (default: its status is not ``ok``)
        says whether it is written whatever the sample."""
        error = fields["status"] != "ok" if always is None else always
        if self.wanted(error=error, duration_ms=fields["duration_ms"]):
            self.write("request", fields)

    def write(self, msg: str, fields: dict[str, Any]) -> None:
        direct = _direct
        handlers = logging.root.handlers
        if direct is None or len(handlers) != 1 or handlers[0] is not direct.handler or self.logger.handlers:
            self.logger.info(msg, extra=fields)
            return
        out: dict[str, Any] = {"ts": direct.ts(), "level": "info", "logger": self.logger.name, "msg": msg, **fields}
        direct.put(orjson.dumps(out, default=str, option=orjson.OPT_APPEND_NEWLINE))


def _flush_at_exit() -> None:
    if _direct is not None:
        _direct.flush()


atexit.register(_flush_at_exit)


def configure(config: LoggingConfig) -> None:
    global _direct
    if _direct is not None:
        _direct.flush()
    handler = logging.StreamHandler(sys.stderr)
    if config.json_logs:
        handler.setFormatter(JSONFormatter())
        _direct = _Stream(handler)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        _direct = None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # Migrations narrate every step at INFO; operators need to hear only about problems.
    logging.getLogger("alembic").setLevel(logging.WARNING)
