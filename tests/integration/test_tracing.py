"""OpenTelemetry traces from a real gateway to a real OTLP/HTTP endpoint of the test's own,
decoded with opentelemetry-proto: the span tree and its attributes in all three protocols,
a failover and a queued request, the traceparent the engines received, the request log line's
trace ids, and that no prompt or completion text is ever exported."""

from __future__ import annotations

import gzip
import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from conftest import TEST_PRICING
from support.gateway import Admin, GatewayProcess, free_port
from testengine.harness import EngineProcess

MARKER = "PROMPT-MARKER-7f3a9c"  # in every prompt: must never reach a span
CHILDREN = {"authenticate", "admit", "queue wait", "route attempt", "first token", "stream", "settle"}
SERVER = 2  # Span.SpanKind.SPAN_KIND_SERVER


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent: str
    name: str
    kind: int
    start: int
    end: int
    error: bool
    attrs: dict[str, Any]


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Receiver:
    """An OTLP/HTTP traces endpoint: keeps every raw body and every decoded span."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bodies: list[bytes] = []
        self.spans: list[Span] = []
        self.services: set[str] = set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.take(self.path, self.headers.get("content-type", ""), body)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def take(self, path: str, content_type: str, body: bytes) -> None:
        assert path == "/v1/traces" and content_type == "application/x-protobuf"
        req = ExportTraceServiceRequest.FromString(body)
        with self._lock:
            self.bodies.append(body)
            for rs in req.resource_spans:
                self.services |= {_value(a.value) for a in rs.resource.attributes if a.key == "service.name"}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(Span(
                            s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, s.kind,
                            s.start_time_unix_nano, s.end_time_unix_nano, s.status.code == 2,
                            {a.key: _value(a.value) for a in s.attributes},
                        ))

    def tree(self, request_id: str, timeout: float = 30) -> Tree:
        """The request's spans, once its root and all of its children have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                roots = [s for s in self.spans if s.attrs.get("mesh.request_id") == request_id
                         and s.kind == SERVER]
                if roots:
                    kids = [s for s in self.spans if s.trace_id == roots[0].trace_id and s.parent == roots[0].span_id]
                    if CHILDREN <= {k.name for k in kids}:
                        return Tree(roots[0], kids)
            assert time.monotonic() < deadline, f"no complete trace for {request_id}"
            time.sleep(0.1)


@dataclass
class Tree:
    root: Span
    children: list[Span] = field(default_factory=list)

    def named(self, name: str) -> list[Span]:
        return sorted((c for c in self.children if c.name == name), key=lambda c: c.start)


@dataclass
class Setup:
    gw: GatewayProcess
    receiver: Receiver
    engines: tuple[EngineProcess, EngineProcess]
    key: str
    key_id: str
    account: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work: Path = tmp_path_factory.mktemp("tracing")
    receiver = Receiver()
    receiver.thread.start()
    with EngineProcess(name="replica-a") as a, EngineProcess(name="replica-b") as b:
        def engine(e: EngineProcess, **extra: Any) -> dict[str, Any]:
            return {"type": "openai", "base_url": e.base_url, "model": "test-model", "name": e.name, **extra}

        config = {
            "database": f"sqlite:///{work}/mesh.db",
            "catalog": False,
            "logging": {"level": "INFO"},  # the request log line
            "routing": {"policy": "least_outstanding", "max_attempts": 3, "failure_threshold": 10},
            "observability": {"otlp_endpoint": f"http://127.0.0.1:{receiver.port}/v1/traces",
                              "service_name": "mesh-under-test"},
            "models": [
                {"id": "test-model", "context_length": 4096, "pricing": TEST_PRICING,
                 "engines": [engine(a), engine(b)]},
                {"id": "one-slot", "context_length": 4096, "pricing": TEST_PRICING,
                 "engines": [engine(a, capacity=1, name="one-slot-a")]},
            ],
        }
        # The SDK's batch exporter sends every 100 ms instead of every 5 s.
        with GatewayProcess(config, work, env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as gw:
            admin = Admin(gw.url)
            account = admin.account("traced", credits="100")
            made = admin.key(account)
            admin.close()
            try:
                yield Setup(gw, receiver, (a, b), made["key"], made["id"], account)
            finally:
                gw.stop()
                receiver.server.shutdown()
                receiver.server.server_close()


def post(s: Setup, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[str, str]:
    """Send a request (streams are read to the end); returns its request id and all text received."""
    h = {"Authorization": f"Bearer {s.key}", **(headers or {})}
    with httpx.stream("POST", s.gw.url + path, json=body, headers=h, timeout=60) as r:
        text = r.read().decode()
        assert r.status_code == 200, text
        return r.headers["x-request-id"], text


def check_tree(s: Setup, tree: Tree, protocol: str) -> None:
    root = tree.root
    assert root.name == "chat test-model" and not root.error
    a = root.attrs
    assert a["mesh.protocol"] == protocol and a["mesh.status"] == "ok"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "test-model"
    assert a["gen_ai.response.model"] == "test-model"
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["mesh.account_id"] == s.account and a["mesh.key_id"] == s.key_id
    assert a["mesh.cost_micro"] > 0 and "mesh.usage.cached_tokens" in a
    assert a["mesh.replica"] in ("replica-a", "replica-b") and a["mesh.route.reason"]
    for c in tree.children:  # every child lies within the request span
        assert root.start <= c.start <= c.end <= root.end, c.name
    (first,) = tree.named("first token")
    (stream,) = tree.named("stream")
    assert first.start == root.start and first.end == stream.start
    attempts = tree.named("route attempt")
    assert attempts[-1].attrs["mesh.replica"] == a["mesh.replica"] and not attempts[-1].error
    assert all(x.attrs["mesh.route.reason"] == "least_loaded" for x in attempts)


def engine_parents(s: Setup, trace_id: str) -> list[str]:
    """The parent span ids of every traceparent the engines received in this trace."""
    out = []
    for e in s.engines:
        for h in e.headers():
            tp = {k.lower(): v for k, v in h.items()}.get("traceparent")
            if tp:
                version, tid, parent, flags = tp.split("-")
                if tid == trace_id:
                    assert version == "00" and int(flags, 16) & 1  # sampled (and maybe "random")
                    out.append(parent)
    return out


def test_three_protocols_export_the_span_tree_and_propagate_traceparent(setup: Setup) -> None:
    s = setup
    incoming_trace, incoming_parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    chat_id, chat_text = post(s, "/v1/chat/completions", {
        "model": "test-model", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 8,
        "messages": [{"role": "user", "content": f"hello {MARKER}"}]},
        {"traceparent": f"00-{incoming_trace}-{incoming_parent}-01"})
    resp_id, resp_text = post(s, "/v1/responses",
                              {"model": "test-model", "input": f"hi {MARKER}", "max_output_tokens": 8})
    msg_id, msg_text = post(s, "/v1/messages", {
        "model": "test-model", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": MARKER}]},
        {"anthropic-version": "2023-06-01"})

    trees = {p: s.receiver.tree(rid) for p, rid in
             (("openai.chat", chat_id), ("openai.responses", resp_id), ("anthropic.messages", msg_id))}
    for protocol, tree in trees.items():
        check_tree(s, tree, protocol)
        attempt_ids = {x.span_id for x in tree.named("route attempt")}
        parents = engine_parents(s, tree.root.trace_id)
        assert parents and set(parents) <= attempt_ids, (protocol, parents, attempt_ids)
    # The caller's trace is continued: same trace id, its span the request span's parent.
    chat = trees["openai.chat"].root
    assert chat.trace_id == incoming_trace and chat.parent == incoming_parent
    assert trees["openai.responses"].root.parent == "" and trees["openai.responses"].root.trace_id != incoming_trace
    assert s.receiver.services == {"mesh-under-test"}

    # Each request's log line names its trace and request span.
    lines = [json.loads(x) for x in s.gw.log().splitlines() if x.startswith("{")]
    logged = {x["request_id"]: x for x in lines if x.get("msg") == "request"}
    for tree in trees.values():
        line = logged[tree.root.attrs["mesh.request_id"]]
        assert (line["trace_id"], line["span_id"]) == (tree.root.trace_id, tree.root.span_id)

    # No content: neither the prompts nor anything the engine wrote reaches the exporter.
    exported = b"".join(s.receiver.bodies)
    assert MARKER.encode() not in exported
    for text in (chat_text, resp_text, msg_text):
        words = {w for w in text.replace('"', " ").split() if len(w) > 8 and w.isalpha()}
        assert not any(w.encode() in exported for w in words - {"completion", "reasoning", "assistant"})


def test_a_failover_shows_each_attempt_with_its_replica_and_failure(setup: Setup) -> None:
    s = setup
    for e in s.engines:
        e.fault("502", count=1)  # whichever replica goes first fails, then the other does
    rid, _ = post(s, "/v1/chat/completions", {"model": "test-model", "max_tokens": 5,
                                              "messages": [{"role": "user", "content": MARKER}]})
    tree = s.receiver.tree(rid)
    check_tree(s, tree, "openai.chat")
    attempts = tree.named("route attempt")
    assert len(attempts) == 3
    assert [x.error for x in attempts] == [True, True, False]
    assert all(x.attrs["error.type"] == "EngineError" and x.attrs["mesh.error.kind"] == "engine"
               for x in attempts[:2])
    assert {x.attrs["mesh.replica"] for x in attempts[:2]} == {"replica-a", "replica-b"}
    assert [x.attrs["mesh.route.attempt"] for x in attempts] == [1, 2, 3]
    # Each attempt sent its own traceparent: the engines saw one per attempt.
    assert sorted(engine_parents(s, tree.root.trace_id)) == sorted(x.span_id for x in attempts)


def test_a_queued_request_shows_its_wait(setup: Setup) -> None:
    s = setup
    first: dict[str, str] = {}
    started = threading.Event()

    def hold_the_slot() -> None:
        body = {"model": "one-slot", "stream": True, "max_tokens": 12,
                "messages": [{"role": "user", "content": "[tokens:12] [chunk_delay:0.1]"}]}
        with httpx.stream("POST", s.gw.url + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {s.key}"}) as r:
            first["id"] = r.headers["x-request-id"]
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    started.set()

    holder = threading.Thread(target=hold_the_slot)
    holder.start()
    assert started.wait(30)
    rid, _ = post(s, "/v1/chat/completions", {"model": "one-slot", "max_tokens": 5,
                                              "messages": [{"role": "user", "content": MARKER}]})
    holder.join(60)
    waited = s.receiver.tree(rid)
    holding = s.receiver.tree(first["id"])
    (wait,) = waited.named("queue wait")
    (held_stream,) = holding.named("stream")
    # The slot was free only once the first request's stream ended: the wait spans that.
    assert wait.end >= held_stream.start
    assert wait.attrs["gen_ai.request.model"] == "one-slot"
    assert waited.root.attrs["gen_ai.request.model"] == "one-slot"
    assert waited.named("route attempt")[0].start >= wait.end


def test_a_resumed_stream_shows_its_resume(setup: Setup) -> None:
    s = setup
    rid, text = post(s, "/v1/chat/completions", {
        "model": "test-model", "stream": True, "max_tokens": 10,
        "messages": [{"role": "user", "content": f"[tokens:10] [fault:drop] {MARKER}"}]})
    assert "tok9" in text and '"error"' not in text  # its first replica dropped; the answer went on
    tree = s.receiver.tree(rid)
    check_tree(s, tree, "openai.chat")
    (resume,) = tree.named("resume")
    assert resume.attrs["mesh.resume.outcome"] == "resumed" and resume.attrs["mesh.resume.reason"] == "engine"
    assert {resume.attrs["mesh.resume.from"], resume.attrs["mesh.resume.to"]} == {"replica-a", "replica-b"}
    assert resume.attrs["mesh.resume.delivered_tokens"] == 3 and not resume.error
    assert tree.root.attrs["mesh.resume_outcome"] == "resumed" and tree.root.attrs["mesh.reprocessed_tokens"] > 0
    (attempt,) = [x for x in s.receiver.spans if x.parent == resume.span_id]  # the continuation's own attempt
    assert attempt.name == "route attempt" and attempt.attrs["mesh.replica"] == resume.attrs["mesh.resume.to"]
