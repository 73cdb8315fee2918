"""An OpenAI-compatible engine server (vLLM, SGLang, llama.cpp server, TGI, Ollama) over HTTP.

Chat requests, health checks and the tokenizer go through one pool of keep-alive
connections per replica (``engines/http1.py``, leaner than aiohttp's general client, which
the gateway then never imports). A response read to its end returns its connection to the pool.
Upstream is always a stream with usage, whatever the client asked; closing the event
iterator before the end closes the connection, which makes vLLM and SGLang abort the
request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson
from opentelemetry.trace import INVALID_SPAN, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh.canonical import CanonicalRequest, Event, Message, Relayed, Usage
from mesh.config import OpenAIEngineConfig
from mesh.engines.http1 import ConnectFailed, Http1Client, Response, UpstreamClosed
from mesh.engines.openai_relay import RelayDecoder
from mesh.engines.openai_wire import ChunkDecoder, encode_messages, encode_tools, request_body
from mesh.errors import (
    EngineError,
    EngineOverloaded,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    MeshError,
)

# Sends the current span's traceparent, so an engine that traces (vLLM with
# --otlp-traces-endpoint) joins the request's trace; adds nothing when Mesh is not tracing.
_TRACE_CONTEXT = TraceContextTextMapPropagator()
_DATA = b"data:"
# What follows ``data:`` on each line (ended by a newline) that starts with it.
_DATA_LINE = re.compile(rb"^data:(.*)$", re.MULTILINE)
# After [DONE] only the end of the body is left; an engine that does not send it by then
# loses the connection instead of holding the request up.
_DRAIN_TIMEOUT = 1.0
# A streamed answer's first read can hold much of the answer (a fast engine, a short answer).
# When it holds more than this many payloads, its first output goes to the client before the
# rest of the read is decoded: the time to first token does not grow with what came with it,
# for one more write.
_SPLIT_FIRST_READ = 4


def _upstream_error(status: int, payload: bytes, name: str) -> MeshError:
    message = ""
    code: Any = None
    with contextlib.suppress(Exception):
        data = orjson.loads(payload)
        err = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message") or "")
            code = err.get("code")
        elif isinstance(err, str):
            message = err
    if status == 429:
        return EngineOverloaded(f"Engine {name} is overloaded.", retry_after=1)
    if status in (400, 413, 422):
        text = message or "The engine rejected the request."
        lowered = text.lower()
        err_code = code if isinstance(code, str) else None
        if "context" in lowered and ("length" in lowered or "window" in lowered):
            err_code = "context_length_exceeded"
        return EngineRejected(text, code=err_code)
    if status == 503:
        return EngineUnavailable(f"Engine {name} is unavailable (503).")
    err = EngineError(f"Engine {name} answered HTTP {status}.")
    err.replica_fault = status in (502, 504)  # a gateway in front of it failed; a 500 is per request
    return err


async def _drain_then_release(resp: Response) -> None:
    """The end of an answer whose caller has moved on: its connection back to the pool once
    the end came, dropped if it does not come soon (or the engine is closed meanwhile)."""
    drained = False
    try:
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(_DRAIN_TIMEOUT):
                while await resp.readany():
                    pass
                drained = True
    finally:
        if drained:
            resp.release()
        else:
            resp.close()


class _SSEReader:
    """The engine's SSE ``data:`` payloads, taken in whatever pieces the socket delivers
    (several events per read when the engine is fast) instead of one ``readline`` per line,
    blank separators included."""

    __slots__ = ("_content", "_tail")

    def __init__(self, content: Response) -> None:
        self._content = content
        self._tail = b""  # a line not yet ended by its newline

    async def batch(self) -> list[bytes] | None:
        """The payloads of the next read (at least one), or None at the end of the body."""
        while True:
            data = await self._content.readany()
            if not data:
                tail, self._tail = self._tail, b""
                return [tail[5:].strip()] if tail.startswith(_DATA) else None
            if self._tail:
                data = self._tail + data
            end = data.rfind(b"\n") + 1  # the lines ended so far; the rest waits for its newline
            self._tail = data[end:]
            batch = [payload.strip() for payload in _DATA_LINE.findall(data, 0, end)]
            if batch:
                return batch


def _target(url: str) -> str:
    """A request line's target: ``url``'s path and query."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _answers(ev: Event) -> bool:
    """Output the first-token deadline waits for: not usage alone, nor a relayed chunk that
    carries none (the role-only chunk engines send first)."""
    if isinstance(ev, Relayed):
        return ev.answers
    return not isinstance(ev, Usage)


def _joined(events: list[Event]) -> list[Event]:
    """The relayed chunks of one read decoded a payload at a time, as one read's events:
    one :class:`Relayed` (one write to the client), then the newest usage."""
    if not any(isinstance(ev, Relayed) for ev in events):
        return events
    joined = Relayed([])
    usage: Usage | None = None
    for ev in events:
        if isinstance(ev, Relayed):
            joined.extend(ev)
        elif isinstance(ev, Usage):
            usage = ev
    return [joined] if usage is None else [joined, usage]


class OpenAIEngine:
    """A replica reached over HTTP. See :class:`mesh.engines.base.Engine`."""

    def __init__(self, config: OpenAIEngineConfig, public_model: str) -> None:
        self.config = config
        self.model = config.model or public_model
        self.name = config.name or config.base_url
        self.continues_final = config.continuation  # a dropped stream may resume here
        self.base_url = config.base_url
        root = config.base_url.removesuffix("/v1")
        self._chat_url = f"{config.base_url}/chat/completions"
        self._health_url = f"{root}/health"
        self._models_url = f"{config.base_url}/models"
        self._tokenize_url = f"{root}/tokenize"
        self._headers = {"Content-Type": "application/json"}
        if config.api_key:
            self._headers["Authorization"] = f"Bearer {config.api_key}"
        self._chat: Http1Client | None = None  # chat requests, health checks and the tokenizer
        self._chat_head = b""
        self._health_head = self._models_head = self._tokenize_head = b""
        self._draining: set[asyncio.Task[None]] = set()  # answers whose end is still being read
        self._closed = False  # probes after aclose() (a replica just removed) open nothing again

    def _chat_client(self) -> Http1Client:
        if self._chat is None:
            client = Http1Client(self._chat_url, connect_timeout=self.config.connect_timeout,
                                 read_timeout=self.config.read_timeout)
            self._chat_head = client.request_head(_target(self._chat_url), self._headers)
            # The health check asks without the key (a liveness probe), as it always did.
            self._health_head = client.request_head(_target(self._health_url), {}, "GET")
            self._models_head = client.request_head(_target(self._models_url), self._headers, "GET")
            self._tokenize_head = client.request_head(_target(self._tokenize_url), self._headers)
            self._chat = client
        return self._chat

    async def _ask(self, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
        """A short request on the pool (a health check, a token count): its status and body
        (at most 1 MiB), by ``connect_timeout`` at the latest (TimeoutError)."""
        if self._chat is None:  # closed (a reload) while the probe ran: its first request ended
            raise UpstreamClosed("the engine's client was closed")
        deadline = asyncio.get_running_loop().time() + self.config.connect_timeout
        resp = await self._chat.post(head, body, None, deadline)
        try:
            payload = await resp.read()
        except BaseException:
            resp.close()  # cut short (timed out, cancelled): the rest of it must not meet the next request
            raise
        if resp.ended:
            resp.release()
        else:
            resp.close()  # longer than read() takes
        return resp.status, payload

    def stream(self, request: CanonicalRequest) -> AsyncIterator[Event]:
        return self._generate(request, ChunkDecoder())

    def relay(self, request: CanonicalRequest) -> AsyncIterator[Event]:
        """The relay path: the engine's chunks as :class:`Relayed` (parsed, not decoded),
        with :class:`Usage` events for metering; otherwise exactly :meth:`stream` (same
        upstream body, timeouts, errors, connection handling)."""
        return self._generate(request, RelayDecoder())

    async def _generate(self, request: CanonicalRequest, decoder: ChunkDecoder) -> AsyncIterator[Event]:
        config = self.config
        try:
            body = orjson.dumps(request_body(request, self.model, config.reasoning_field, config.continuous_usage))
        except orjson.JSONEncodeError:
            # The client's own input (a schema nested past orjson's 254 levels): a 400, not
            # the engine's fault, and nothing was sent.
            raise InvalidRequest("The request is nested too deeply to be sent to the engine.") from None
        resp: Response | None = None
        drained = False  # the whole response was read: the connection may serve the next request
        try:
            # The engine client's failures and timeouts, translated into the EngineError tree
            # at the adapter edge (inline: a context manager per request costs more).
            try:
                # The first-token deadline: every wait until the first output (connecting, the
                # answer's headers, its first reads) ends by then, as under an asyncio.timeout
                # (TimeoutError), on the engine client's one read timer instead of a timer of its own.
                deadline = asyncio.get_running_loop().time() + config.first_token_timeout
                trace: dict[str, str] | None = None
                if get_current_span() is not INVALID_SPAN:  # a span is current: its traceparent goes out
                    trace = {}
                    _TRACE_CONTEXT.inject(trace)
                client = self._chat or self._chat_client()
                resp = await client.post(self._chat_head, body, trace, deadline)
                if resp.status != 200:
                    payload = await resp.read()
                    drained = True
                    raise _upstream_error(resp.status, payload, self.name)
                reader = _SSEReader(resp)
                first, done, rest = await self._first_events(reader, decoder, request.stream)
                resp.clear_deadline()
                for ev in first:
                    yield ev
                if rest and not done and decoder.failure is None:
                    events, done = decoder.decode_batch(rest)
                    for ev in events:
                        yield ev
                while decoder.failure is None and not done and (batch := await reader.batch()) is not None:
                    events, done = decoder.decode_batch(batch)
                    for ev in events:
                        yield ev
                if decoder.failure is not None:
                    raise decoder.failure  # after the output that came before it
                # After [DONE] only the end of the body is left (the chunked terminator). It is
                # read so that the connection goes back to the pool instead of being torn down;
                # when it has not come yet, in the background: waiting for it would hold the
                # answer up by the engine's gap between the two.
                if config.keep_alive:
                    if resp.ended:
                        drained = True
                    else:
                        self._drain_later(resp)
                        resp = None
            except MeshError:
                raise
            except TimeoutError:
                raise EngineTimeout(f"Engine {self.name} timed out.") from None
            except ConnectFailed:
                raise EngineUnavailable(f"Engine {self.name} is unreachable.") from None
            except ConnectionError as exc:
                raise EngineError(f"Engine {self.name} failed: {type(exc).__name__}.") from None
            yield decoder.final_usage()
        except orjson.JSONDecodeError:
            raise EngineError(f"Engine {self.name} sent malformed JSON.") from None
        finally:
            if resp is not None:
                if drained:
                    resp.release()
                else:
                    # The client went away or the stream failed: drop the connection so the
                    # engine aborts the generation nobody will read.
                    resp.close()

    def _drain_later(self, resp: Response) -> None:
        task = asyncio.get_running_loop().create_task(_drain_then_release(resp))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    @staticmethod
    async def _first_events(
        reader: _SSEReader, decoder: ChunkDecoder, split: bool
    ) -> tuple[list[Event], bool, list[bytes]]:
        """Read until the engine produced its first output (the first-token deadline covers
        this): the events of the reads so far, whether the stream is done, and (``split``: a
        streamed answer) the payloads of the last read that came after its first output,
        still to be decoded."""
        events: list[Event] = []
        while (batch := await reader.batch()) is not None:
            if split and len(batch) > _SPLIT_FIRST_READ:
                for k in range(len(batch)):
                    more, done = decoder.decode_batch(batch[k : k + 1])
                    events.extend(more)
                    if done or any(_answers(ev) for ev in more):
                        # Nothing after the first output is decoded here: what fails there
                        # fails after it (the client has its text, the engine its bill).
                        return _joined(events), done, batch[k + 1 :]
                    if decoder.failure is not None:
                        raise decoder.failure
                continue
            more, done = decoder.decode_batch(batch)
            events.extend(more)
            if done or any(_answers(ev) for ev in more):
                return events, done, []
            if decoder.failure is not None:
                raise decoder.failure  # before any output: the router fails over
        raise EngineError("The engine closed the stream before answering.")

    async def health(self) -> bool:
        if self._closed:
            return False
        if self._chat is None:
            self._chat_client()  # the requests' heads
        try:
            if (await self._ask(self._health_head))[0] == 200:
                return True
            return (await self._ask(self._models_head))[0] == 200
        except (TimeoutError, OSError):  # ConnectFailed and UpstreamClosed are OSErrors
            return False

    async def count_tokens(self, messages: Sequence[Message], request: CanonicalRequest) -> int | None:
        body: dict[str, Any] = {
            "model": self.model, "messages": encode_messages(tuple(messages), self.config.reasoning_field)
        }
        if request.tools:
            body["tools"] = encode_tools(request.tools)  # vLLM's chat template renders them too
        if self._closed:
            return None
        if self._chat is None:
            self._chat_client()
        try:
            status, payload = await self._ask(self._tokenize_head, orjson.dumps(body))
            if status != 200:
                return None
            data = orjson.loads(payload)
            count = data.get("count") if isinstance(data, dict) else None
            return count if isinstance(count, int) and not isinstance(count, bool) else None
        except (TimeoutError, OSError, orjson.JSONDecodeError, orjson.JSONEncodeError):
            return None

    async def aclose(self) -> None:
        self._closed = True
        draining = list(self._draining)
        for task in draining:
            task.cancel()
        await asyncio.gather(*draining, return_exceptions=True)
        if self._chat is not None:
            await self._chat.aclose()
            self._chat = None
