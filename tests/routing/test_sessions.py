"""Session keys (prefix blocks, hints) and the session maps: in process and in Redis."""

from __future__ import annotations

import asyncio
import itertools
import secrets

from mesh.canonical import CanonicalRequest, Message, TextPart, Tool, ToolCallPart, ToolResultPart
from mesh.routing.sessions import MemorySessionMap, RedisSessionMap, session_keys

PREAMBLE = "You are a coding agent. Follow the rules. " * 100  # about 4,000 characters
TOOLS = (Tool("Bash", "Run a command.", {"type": "object", "properties": {"command": {"type": "string"}}}),)


def turns(session: str, n: int) -> list[CanonicalRequest]:
    """An agent session's first ``n`` requests: each one's history is the last one's plus a
    tool call, its result and a new user message."""
    history: list[Message] = [Message("system", (TextPart(PREAMBLE),)), Message("user", (TextPart(f"{session}: go"),))]
    out = []
    for i in range(n):
        out.append(CanonicalRequest(model="m", messages=tuple(history), tools=TOOLS))
        history += [
            Message("assistant", (ToolCallPart(f"call_{i}", "Bash", '{"command": "ls"}'),)),
            Message("user", (ToolResultPart(f"call_{i}", (TextPart(f"file{i}.py"),)),)),
        ]
    return out


def test_every_turn_finds_the_key_the_turn_before_left() -> None:
    requests = turns("a", 20)
    for before, after in itertools.pairwise(requests):
        left = session_keys(before, 256).remember
        assert left and left[0] in session_keys(after, 256).lookup


def test_sessions_that_share_only_the_preamble_share_no_key() -> None:
    a, b = turns("a", 2), turns("b", 2)
    keys_a = {k for r in a for k in session_keys(r, 256).lookup}
    keys_b = {k for r in b for k in session_keys(r, 256).lookup}
    assert keys_a and keys_b and not keys_a & keys_b


def test_hints_come_first_and_models_do_not_mix() -> None:
    req = turns("a", 1)[0]
    hinted = session_keys(CanonicalRequest(model="m", messages=req.messages, cache_key="sess-1"), 256)
    by_user = session_keys(CanonicalRequest(model="m", messages=req.messages, user="sess-1"), 256)
    assert hinted.lookup[0] == by_user.lookup[0] and hinted.remember[0] == hinted.lookup[0]
    assert len(hinted.lookup) == len(session_keys(req, 256).lookup) + 1
    other_model = session_keys(req, 256, "other")
    assert not set(other_model.lookup) & set(session_keys(req, 256).lookup)


def test_a_short_conversation_is_not_worth_a_key() -> None:
    req = CanonicalRequest(model="m", messages=(Message("user", (TextPart("hi"),)),))
    assert session_keys(req, 256).lookup == ()
    assert session_keys(req, 1).lookup != ()


async def test_the_memory_map_is_bounded_and_forgets_after_its_ttl() -> None:
    m = MemorySessionMap(ttl=60, max_entries=3)
    for i in range(5):
        await m.remember("m", [f"k{i}"], f"r{i}")
    assert len(m) == 3
    assert await m.find("m", ["k0", "k1"]) is None
    assert await m.find("m", ["k9", "k4", "k3"]) == "r4"  # the first known key wins
    short = MemorySessionMap(ttl=0.05)
    await short.remember("m", ["k"], "r")
    await asyncio.sleep(0.1)
    assert await short.find("m", ["k"]) is None


async def test_two_processes_share_the_map_through_redis(redis_url: str) -> None:


    prefix = f"mesh-test-{secrets.token_hex(6)}:"
    a, b = RedisSessionMap(redis_url, prefix, ttl=5), RedisSessionMap(redis_url, prefix, ttl=5)
    try:
        await a.remember("m", ["s1", "p1"], "replica-2")
        assert await b.find("m", ["nope", "p1"]) == "replica-2"
        await b.remember("m", ["s1"], "replica-0")  # the session moved: everyone sees it
        assert await a.find("m", ["s1"]) == "replica-0"
    finally:
        await a.aclose()
        await b.aclose()


async def test_without_redis_the_map_falls_back_to_this_process() -> None:
    down = RedisSessionMap("redis://127.0.0.1:1/0", "x:", ttl=5)
    try:
        await down.remember("m", ["k"], "r1")
        assert await down.find("m", ["k"]) == "r1"
    finally:
        await down.aclose()
