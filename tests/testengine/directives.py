"""Per-request directives embedded in the last user message, e.g. ``[tokens:20] [delay:1.5]``.

==================  ==========================================================================
``[tokens:N]``      the reply content is ``tok0 tok1 ... tok{N-1}`` (N tokens)
``[delay:S]``       sleep S seconds before the first chunk (time to first token)
``[chunk_delay:S]`` sleep S seconds between chunks (overrides ``--chunk-delay-ms``)
``[fault:500]``     answer HTTP 500 (any 4xx/5xx code works, e.g. ``[fault:429]``, ``[fault:503]``)
``[fault:error_500]`` streams: 3 chunks then an error event with that code (vLLM's shape), then [DONE]
``[fault:drop]``    streams: 3 chunks then the TCP connection is aborted; non-stream: no response
                    (faults by directive spare continuations: a resumed stream goes on)
``[fault:hang]``    never answer
``[stall:N]``       streams: N content chunks, then silence with the connection held open (not
                    in a continuation)
``[parallel]``      with tools: make two tool calls
``[tool:NAME]``     with tools: call the tool NAME (not the first one offered)
``[notool]``        with tools: answer with text anyway (an agent's one-shot reply)
``[args:{...}]``    with tools: use this JSON object as the call arguments
==================  ==========================================================================
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_SIMPLE_RE = re.compile(
    r"\s*\[(?:(tokens):(\d+)|(delay|chunk_delay):(\d+(?:\.\d*)?|\.\d+)|(fault):([A-Za-z_0-9]+)|(parallel)"
    r"|(tool):([A-Za-z0-9_.-]+)|(notool)|(stall):(\d+))\]"
)
_ARGS_RE = re.compile(r"\s*\[args:")
_DECODER = json.JSONDecoder()


@dataclass
class Directives:
    tokens: int | None = None
    delay: float = 0.0
    chunk_delay: float | None = None
    fault: str | None = None
    parallel: bool = False
    tool: str | None = None
    no_tool: bool = False
    stall: int | None = None  # content chunks sent before the stream goes silent
    args: dict[str, Any] | None = None
    text: str = ""  # the user text with every directive removed


def _strip_args(text: str, found: Directives) -> str:
    out: list[str] = []
    pos = 0
    while True:
        m = _ARGS_RE.search(text, pos)
        if m is None:
            out.append(text[pos:])
            return "".join(out)
        start = m.end()
        while start < len(text) and text[start] in " \t":
            start += 1
        try:
            value, end = _DECODER.raw_decode(text, start)
        except ValueError:
            value, end = None, -1
        close = text.find("]", end) if end >= 0 else -1
        if close < 0 or text[end:close].strip():
            out.append(text[pos : m.end()])  # not a well-formed directive: keep it verbatim
            pos = m.end()
            continue
        if isinstance(value, dict) and found.args is None:
            found.args = value
        out.append(text[pos : m.start()])
        pos = close + 1


def parse(text: str) -> Directives:
    found = Directives()
    stripped = _strip_args(text, found)

    def take(m: re.Match[str]) -> str:
        if m.group(1):
            found.tokens = int(m.group(2))
        elif m.group(3) == "delay":
            found.delay = float(m.group(4))
        elif m.group(3) == "chunk_delay":
            found.chunk_delay = float(m.group(4))
        elif m.group(5):
            found.fault = m.group(6).lower()
        elif m.group(7):
            found.parallel = True
        elif m.group(8):
            found.tool = m.group(9)
        elif m.group(10):
            found.no_tool = True
        elif m.group(11):
            found.stall = int(m.group(12))
        return ""

    found.text = _SIMPLE_RE.sub(take, stripped).strip()
    return found
