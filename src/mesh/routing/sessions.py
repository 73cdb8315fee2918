"""Session affinity: which replica holds a conversation's prefix in its KV cache.

A conversation is hashed in blocks, the way SGLang's router (approximate radix tree) and
vLLM production-stack's prefix-aware router see prompts: first the preamble (tools and
system prompt), then one block per message, each digest chained on the one before. A
request's digests are the keys of all its prefixes; the longest one a replica served
before names the replica that has the most of it cached. Turn N+1 of an agent session
starts with the whole of turn N, so it finds turn N's key however long the history grows.

Explicit hints come first: ``x-session-id``, OpenAI ``prompt_cache_key`` (both carried as
``CanonicalRequest.cache_key``), then ``user`` (Anthropic ``metadata.user_id``, which
Claude Code sets per session).

The map lives in Redis when one is configured (keys ``{prefix}aff:{digest}`` holding the
replica name, with a TTL), so every gateway process sees where a session went, and in
process otherwise (bounded, least recently used out first). Redis trouble falls back to
the in-process map: routing never fails over a cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import orjson

from mesh.canonical import (
    CanonicalRequest,
    ImagePart,
    Message,
    Part,
    ReasoningPart,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)
from mesh.redis_client import redis_client, redis_errors

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger("mesh.routing")

DEFAULT_TTL = 1800.0  # longer than an engine keeps an idle prefix in a busy KV cache
DEFAULT_MAX_ENTRIES = 100_000
# The deepest prefixes looked up per request: a turn adds a few messages, rarely dozens.
MAX_LOOKUP = 64
_REDIS_TIMEOUT = 0.25
_WARN_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The digests one request is known by: ``lookup`` in priority order (hint, then its
    prefixes deepest first, each past the preamble and long enough), ``remember`` what a
    later turn will look for (the hint and the whole prompt)."""

    lookup: tuple[str, ...]
    remember: tuple[str, ...]


def _part_bytes(p: Part) -> bytes:
    match p:
        case TextPart(text=t):
            return b"t" + t.encode()
        case ReasoningPart(text=t):
            return b"r" + t.encode()
        case ImagePart(url=u):
            return b"i" + u.encode()
        case ToolCallPart(id=i, name=n, arguments=a):
            return b"c" + orjson.dumps([i, n, a])
        case ToolResultPart():
            return b"o" + orjson.dumps([p.call_id, p.is_error, [_part_bytes(c).decode() for c in p.content]])
    return b""


def _message_bytes(m: Message) -> bytes:
    return orjson.dumps([m.role, m.name]) + b"\x1e".join(_part_bytes(p) for p in m.parts)


def session_keys(request: CanonicalRequest, min_prefix_chars: int, model_id: str | None = None) -> SessionKeys:
    """The request's affinity keys for ``model_id`` (default: the model it names), see the
    module docstring. Pure and cheap: one pass of blake2b over the prompt."""
    model = (model_id or request.model).encode()
    hint = request.cache_key or request.user
    hint_key = None
    if hint:
        hint_key = hashlib.blake2b(b"hint\x1f" + model + b"\x1f" + hint.encode(), digest_size=16).hexdigest()
    if _shorter_than(request, min_prefix_chars):  # no prefix is long enough: nothing to hash
        return SessionKeys((hint_key,), (hint_key,)) if hint_key else _NO_KEYS
    h = hashlib.blake2b(b"prefix\x1f" + model, digest_size=16)
    size = 0
    for t in request.tools:
        block = orjson.dumps([t.name, t.description, t.parameters], option=orjson.OPT_SORT_KEYS)
        h.update(block)
        size += len(block)
    rest: list[Message] = []
    for m in request.messages:
        if m.role == "system" and not rest:
            block = _message_bytes(m)
            h.update(block)
            size += len(block)
        else:
            rest.append(m)
    prefixes: list[str] = []
    for m in rest:
        block = _message_bytes(m)
        h.update(len(block).to_bytes(8, "little"))
        h.update(block)
        size += len(block)
        if size >= min_prefix_chars:
            prefixes.append(h.hexdigest())
    deepest_first = prefixes[::-1][:MAX_LOOKUP]
    lookup = ([hint_key] if hint_key else []) + deepest_first
    remember = ([hint_key] if hint_key else []) + deepest_first[:1]
    return SessionKeys(tuple(lookup), tuple(remember))


_NO_KEYS = SessionKeys((), ())


def _shorter_than(request: CanonicalRequest, size: int) -> bool:
    """Whether the blocks :func:`session_keys` hashes surely add up to less than ``size``
    bytes, by an upper bound that encodes nothing: a short prompt (most chat turns) then
    skips building and hashing them. False (work it out) for tools and for any part
    other than text."""
    if request.tools:
        return False
    bound = 0
    for m in request.messages:
        # orjson.dumps([role, name]): ``["user",null]``, a character of the name at most 6 bytes
        bound += len(m.role) + 9 + 6 * len(m.name or "")
        for p in m.parts:
            if not isinstance(p, TextPart | ReasoningPart):
                return False
            t = p.text
            # its tag and separator, then its UTF-8 (isascii is O(1): one byte a character)
            bound += 2 + (len(t) if t.isascii() else 4 * len(t))
        if bound >= size:
            return False
    return True


class SessionMap(Protocol):
    """Digest -> replica name. ``find`` returns the first of ``keys`` that is known."""

    async def find(self, model: str, keys: Sequence[str]) -> str | None: ...

    async def remember(self, model: str, keys: Sequence[str], replica: str) -> None: ...

    async def aclose(self) -> None: ...


class MemorySessionMap:
    """In-process, bounded to ``max_entries`` (least recently used out first), with a TTL."""

    def __init__(self, ttl: float = DEFAULT_TTL, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._owner: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    async def find(self, model: str, keys: Sequence[str]) -> str | None:
        now = time.monotonic()
        for k in keys:
            hit = self._owner.get(k)
            if hit is None:
                continue
            if hit[1] < now:
                del self._owner[k]
                continue
            self._owner.move_to_end(k)
            return hit[0]
        return None

    async def remember(self, model: str, keys: Sequence[str], replica: str) -> None:
        until = time.monotonic() + self.ttl
        for k in keys:
            self._owner[k] = (replica, until)
            self._owner.move_to_end(k)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    async def aclose(self) -> None:
        self._owner.clear()


class RedisSessionMap:
    """Shared by every gateway process on one Redis; the in-process map stands in (and
    keeps learning) while Redis is unreachable."""

    def __init__(
        self, url: str, prefix: str = "mesh:", ttl: float = DEFAULT_TTL, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        self._redis: aioredis.Redis = redis_client(url)
        self._prefix = f"{prefix}aff:"
        self._ttl_ms = max(1, int(ttl * 1000))
        self._local = MemorySessionMap(ttl, max_entries)
        self._warned = 0.0

    def _trouble(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned > _WARN_EVERY:
            self._warned = now
            log.warning("session affinity map: Redis unavailable (%s); using this process's map", exc)

    async def find(self, model: str, keys: Sequence[str]) -> str | None:
        if not keys:
            return None
        try:
            async with asyncio.timeout(_REDIS_TIMEOUT):
                found = await self._redis.mget([self._prefix + k for k in keys])
        except redis_errors() as exc:
            self._trouble(exc)
            return await self._local.find(model, keys)
        for raw in found:
            if raw is not None:
                return raw.decode() if isinstance(raw, bytes) else str(raw)
        return None

    async def remember(self, model: str, keys: Sequence[str], replica: str) -> None:
        await self._local.remember(model, keys, replica)
        if not keys:
            return
        try:
            async with asyncio.timeout(_REDIS_TIMEOUT):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for k in keys:
                        pipe.set(self._prefix + k, replica, px=self._ttl_ms)
                    await pipe.execute()
        except redis_errors() as exc:
            self._trouble(exc)

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._local.aclose()
