"""A hostile OpenAI-compatible engine, as a worker's node could run one: it answers health
checks and chat requests the way a test tells it to (redirects, made-up usage) and records
every request it receives. Threaded stdlib server on a loopback port.
"""

from __future__ import annotations

import http.server
import json
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Behaviour:
    redirect_to: str | None = None  # answer requests of redirect_methods with this redirect
    redirect_methods: tuple[str, ...] = ("GET", "POST")
    redirect_status: int = 307
    usage: dict[str, Any] = field(default_factory=lambda: {"prompt_tokens": 10, "completion_tokens": 1})
    break_after_usage: bool = False  # then send a broken chunk: the stream fails after reporting usage
    on_answer: Any = None  # called (no arguments) just before the usage is sent
    continuations_only: bool = False  # 503 to a request that is not a continuation (a resume target)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)


class RogueEngine:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.behaviour = Behaviour()
        behaviour = self.behaviour

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _redirect(self) -> bool:
                if behaviour.redirect_to is None or self.command not in behaviour.redirect_methods:
                    return False
                self.send_response(behaviour.redirect_status)
                self.send_header("Location", behaviour.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True

            def do_GET(self) -> None:
                behaviour.requests.append(("GET", self.path))
                if self._redirect():
                    return
                body = b'{"object": "list", "data": [{"id": "test-model", "object": "model"}]}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                behaviour.requests.append(("POST", self.path))
                sent = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self._redirect():
                    return
                if behaviour.continuations_only and not json.loads(sent or b"{}").get("continue_final_message"):
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "test-model",
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                                      "finish_reason": None}]}
                end = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                last = {**chunk, "choices": [], "usage": behaviour.usage}
                payload = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in (chunk, end, last))
                payload += b"data: {broken\n\n" if behaviour.break_after_usage else b"data: [DONE]\n\n"
                if behaviour.on_answer is not None:
                    behaviour.on_answer()
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> RogueEngine:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
