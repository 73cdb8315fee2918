"""Mesh's own floor: its HTTP server and engine client with nothing of Mesh between them.

    python -m bench.floor --upstream http://127.0.0.1:PORT [--port 0] [--stream-upstream]

The same process stack ``mesh serve`` runs (uvicorn with httptools and uvloop, Mesh's edge
protocol ``mesh.http.server``, its engine client ``mesh.engines.http1``) around an ASGI app
that passes ``POST /v1/chat/completions`` through byte for byte, as ``bench.proxy`` does
with aiohttp. Set beside the proxy and Mesh (``bench.ab --floor``), it splits what Mesh
costs into what its HTTP layers cost and what its own work costs.

``--stream-upstream``: a non-streamed request is sent to the engine streamed (as Mesh does,
for its first-token deadline, hang-up billing and resumes) and its chunks folded with the
least a fold can do (one ``orjson.loads`` per chunk, the text joined): the price of a
streamed upstream alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from mesh.engines.http1 import Http1Client, Response
from mesh.http.server import EdgeLimits, run

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_JSON = b"application/json"
_SSE = b"text/event-stream"


async def _body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _read(resp: Response) -> bytes:
    parts = []
    while data := await resp.readany():
        parts.append(data)
    resp.release()
    return b"".join(parts)


async def _folded(resp: Response) -> bytes:
    """A streamed answer folded into a non-streamed one, doing as little as a fold can."""
    tail, texts, usage, finish = b"", [], None, None
    while data := await resp.readany():
        lines = (tail + data).split(b"\n")
        tail = lines.pop()
        for line in lines:
            if not line.startswith(b"data:") or (payload := line[5:].strip()) == b"[DONE]":
                continue
            chunk = orjson.loads(payload)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    texts.append(text)
                finish = choice.get("finish_reason") or finish
    resp.release()
    message = {"role": "assistant", "content": "".join(texts)}
    return orjson.dumps({"id": "chatcmpl-floor", "object": "chat.completion", "usage": usage,
                         "choices": [{"index": 0, "message": message, "finish_reason": finish}]})


def factory() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI app (uvicorn's factory): upstream from ``FLOOR_UPSTREAM``."""
    url = os.environ["FLOOR_UPSTREAM"].rstrip("/") + "/v1/chat/completions"
    stream_upstream = os.environ.get("FLOOR_STREAM_UPSTREAM") == "1"
    state: dict[str, Any] = {}

    def client() -> tuple[Http1Client, bytes]:
        if "client" not in state:
            c = Http1Client(url, connect_timeout=5.0, read_timeout=60.0)
            state["client"] = c
            state["head"] = c.request_head("/v1/chat/completions", {"Content-Type": "application/json"})
        return state["client"], state["head"]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = await _body(receive)
        streamed = orjson.loads(body).get("stream") is True
        http, head = client()
        if not streamed and stream_upstream:
            up = orjson.loads(body)
            up["stream"], up["stream_options"] = True, {"include_usage": True}
            answer = await _folded(await http.post(head, orjson.dumps(up)))
        elif not streamed:
            answer = await _read(await http.post(head, body))
        if not streamed:
            headers = [(b"content-type", _JSON), (b"content-length", str(len(answer)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": answer})
            return
        resp = await http.post(head, body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", _SSE)]})
        while data := await resp.readany():
            await send({"type": "http.response.body", "body": data, "more_body": True})
        resp.release()
        await send({"type": "http.response.body", "body": b""})

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--stream-upstream", action="store_true")
    args = p.parse_args(argv)
    os.environ["FLOOR_UPSTREAM"] = args.upstream
    os.environ["FLOOR_STREAM_UPSTREAM"] = "1" if args.stream_upstream else ""
    run("bench.floor:factory", host=args.host, port=args.port, workers=1, edge=EdgeLimits(),
        forwarded_allow_ips="127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
