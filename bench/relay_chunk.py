"""Per-chunk cost of the two Chat Completions stream paths, in process (no sockets):

* canonical: ``orjson.loads`` -> ``ChunkDecoder`` events -> ``encode_stream`` dumps each event;
* relay: ``orjson.loads`` -> ``RelayDecoder`` (one ``Relayed``) -> rewrite in place -> ``orjson.dumps``.

Both run through the real async encoder and the decoders' ``decode_batch``, as the gateway
does, with one chunk per socket read (the worst case) and eight (a fast engine under load:
the relay then writes them in one piece). ``python -m bench.relay_chunk`` prints
microseconds per chunk (best of 5 runs); the JSON parse is in both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson

from mesh.canonical import Event
from mesh.engines.openai_relay import RelayDecoder
from mesh.engines.openai_wire import ChunkDecoder
from mesh.protocols.openai_chat import StreamMeta, encode_stream

CHUNKS = 64
ROUNDS = 400


def engine_lines(n: int = CHUNKS) -> list[bytes]:
    """A vLLM-shaped stream: role chunk, n text deltas, finish, usage alone."""
    head = {"id": "chatcmpl-engine", "object": "chat.completion.chunk", "created": 1, "model": "org/model"}

    def line(choices: list[dict[str, object]], usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, object] = {**head, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return b"data: " + orjson.dumps(body)

    delta = {"index": 0, "logprobs": None, "finish_reason": None}
    out = [line([{**delta, "delta": {"role": "assistant", "content": ""}}])]
    out += [line([{**delta, "delta": {"content": f" word{i}"}}]) for i in range(n)]
    out.append(line([{**delta, "delta": {}, "finish_reason": "stop"}]))
    out.append(line([], {"prompt_tokens": 20, "completion_tokens": n, "total_tokens": 20 + n}))
    return out


async def _events(reads: list[list[bytes]], relay: bool) -> AsyncIterator[Event]:
    decoder = RelayDecoder() if relay else ChunkDecoder()
    for payloads in reads:
        events, _ = decoder.decode_batch(payloads)
        for ev in events:
            yield ev
    yield decoder.final_usage()


async def one_stream(reads: list[list[bytes]], relay: bool, meta: StreamMeta) -> int:
    size = 0
    async for out in encode_stream(_events(reads, relay), meta):
        size += len(out)
    return size


async def per_chunk_us(relay: bool, per_read: int) -> float:
    """Microseconds per engine chunk when the socket delivers ``per_read`` chunks at a time."""
    payloads = [line[5:].strip() for line in engine_lines()]
    reads = [payloads[i:i + per_read] for i in range(0, len(payloads), per_read)]
    meta = StreamMeta(id="chatcmpl-x", created=1, model="public", usage_extras=lambda u: {"cost": "0.1"})
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(ROUNDS):
            await one_stream(reads, relay, meta)
        best = min(best, (time.perf_counter() - start) / ROUNDS / len(payloads) * 1e6)
    return best


def main() -> None:
    for per_read in (1, 8):
        canonical = asyncio.run(per_chunk_us(False, per_read))
        relay = asyncio.run(per_chunk_us(True, per_read))
        print(f"{per_read} chunk(s) per read: canonical {canonical:.2f} us/chunk, relay {relay:.2f} us/chunk "
              f"({(1 - relay / canonical) * 100:.0f}% less)")


if __name__ == "__main__":
    main()
