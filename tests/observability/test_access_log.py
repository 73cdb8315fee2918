"""The per-request log line written without the logging module: the same JSON object the
logging module writes, batched per event-loop turn, sampled only when asked, and every error
and slow request kept."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from mesh.config import LoggingConfig
from mesh.observability import logging as mesh_logging
from mesh.observability.logging import AccessLog, configure

FIELDS = {
    "request_id": "req_1", "account_id": "acct_1", "model": "m", "protocol": "openai.chat", "status": "ok",
    "replica": None, "route": "least_loaded", "input_tokens": 3, "output_tokens": 4, "cached_tokens": 0,
    "charged_micro": 21, "ttft_ms": 5, "duration_ms": 6,
}


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """configure() on a captured stderr; the root logger's handlers and level put back after."""
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure(LoggingConfig())
    yield out
    mesh_logging._direct = None
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def alone(stderr: io.StringIO) -> Iterator[io.StringIO]:
    """Only configure()'s handler on the root logger, as in `mesh serve` (pytest adds its own
    capturing handlers around each test, which send lines through the logging module)."""
    root = logging.getLogger()
    ours = root.handlers[:]
    yield stderr
    root.handlers[:] = ours


def only_ours() -> None:
    assert mesh_logging._direct is not None
    logging.getLogger().handlers[:] = [mesh_logging._direct.handler]


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(x) for x in out.getvalue().splitlines()]


def test_direct_line_has_the_fields_and_order_of_the_logging_module(alone: io.StringIO) -> None:
    stderr = alone
    only_ours()
    log = logging.getLogger("mesh.pipeline")
    log.info("request", extra=FIELDS)  # through the logging module and JSONFormatter
    AccessLog(log).request(dict(FIELDS))  # direct, off the loop: written at once
    via_logging, direct = lines(stderr)
    assert list(direct) == list(via_logging)
    assert {k: v for k, v in direct.items() if k != "ts"} == {k: v for k, v in via_logging.items() if k != "ts"}
    assert str(direct["ts"]).endswith("Z") and len(str(direct["ts"])) == len(str(via_logging["ts"]))


def test_lines_of_one_loop_turn_are_written_together_and_in_order(alone: io.StringIO) -> None:
    stderr = alone
    only_ours()
    access = AccessLog(logging.getLogger("mesh.pipeline"))

    async def main() -> int:
        for n in range(3):
            access.request({**FIELDS, "request_id": f"req_{n}"})
        written = len(stderr.getvalue())
        await asyncio.sleep(0)  # the end of the turn
        return written

    assert asyncio.run(main()) == 0  # nothing written before the turn ended
    assert [x["request_id"] for x in lines(stderr)] == ["req_0", "req_1", "req_2"]


def test_sampling_keeps_every_error_and_every_slow_request(alone: io.StringIO) -> None:
    stderr = alone
    only_ours()
    access = AccessLog(logging.getLogger("mesh.pipeline"), sample=0.0, slow_ms=1000)
    access.request({**FIELDS, "request_id": "fast-ok"})
    access.request({**FIELDS, "request_id": "failed", "status": "error"})
    access.request({**FIELDS, "request_id": "slow-ok", "duration_ms": 1000})
    assert [x["request_id"] for x in lines(stderr)] == ["failed", "slow-ok"]


def test_a_share_of_fast_successes_is_logged(alone: io.StringIO) -> None:
    stderr = alone
    only_ours()
    access = AccessLog(logging.getLogger("mesh.pipeline"), sample=0.5, slow_ms=None)
    for n in range(400):
        access.request({**FIELDS, "request_id": f"req_{n}"})
    assert 100 < len(lines(stderr)) < 300


def test_level_above_info_writes_no_request_line(alone: io.StringIO) -> None:
    stderr = alone
    only_ours()
    logging.getLogger().setLevel(logging.WARNING)
    AccessLog(logging.getLogger("mesh.pipeline")).request({**FIELDS, "status": "error"})
    assert stderr.getvalue() == ""


def test_other_handlers_get_the_line_through_the_logging_module(
    stderr: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mesh.pipeline")  # adds a capturing handler to the root logger
    AccessLog(logging.getLogger("mesh.pipeline")).request(dict(FIELDS))
    [record] = [r for r in caplog.records if r.getMessage() == "request"]
    assert record.request_id == "req_1" and record.charged_micro == 21  # type: ignore[attr-defined]
