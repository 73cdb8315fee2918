"""A non-streamed answer on the relay path: the engine's chunks folded as they are into the
same :class:`Result` the canonical path builds from decoded events, whatever the protocol
renders from it (every protocol's non-streamed answer aggregates, so every one relays)."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from tests.protocols.test_openai_chat_stream import TRANSCRIPTS, chunk, delta

from mesh.canonical import Aggregator, Event, Relayed, Result
from mesh.engines.openai_relay import RelayDecoder
from mesh.engines.openai_wire import ChunkDecoder
from mesh.errors import EngineError
from mesh.routing.resume import Delivered


def _logprob(token: str, value: float) -> dict[str, Any]:
    return {"token": token, "logprob": value, "bytes": list(token.encode()),
            "top_logprobs": [{"token": token, "logprob": value, "bytes": None}, {"token": "x", "logprob": -9.5}]}


EXTRA: dict[str, list[dict[str, Any]]] = {
    # logprobs on text (and on an empty delta, which both paths drop), a stop string (vLLM's
    # stop_reason), a finish reason outside OpenAI's set.
    "logprobs_stop": [
        chunk(delta(role="assistant", content="")),
        chunk({"index": 0, "delta": {"content": "Hi"}, "logprobs": {"content": [_logprob("Hi", -0.25)]},
               "finish_reason": None}),
        chunk({"index": 0, "delta": {"content": ""}, "logprobs": {"content": [_logprob("?", -1.0)]},
               "finish_reason": None}),
        chunk({"index": 0, "delta": {"content": " there"}, "logprobs": {"content": [_logprob(" there", -0.5)]},
               "finish_reason": "stop", "stop_reason": "END"}),
        chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}),
    ],
    # SGLang's matched_stop; an engine finish reason OpenAI does not know ("eos").
    "matched_stop": [
        chunk(delta(content="ok")),
        chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "eos", "matched_stop": "\n\n"}),
    ],
    # one chunk naming the first choice twice, with two finish reasons: the last one wins,
    # whichever way the chunks are folded.
    "same_choice_twice": [
        chunk(delta(content="ok")),
        chunk(delta(0, finish="length"), delta(0, finish="stop")),
    ],
    # tool calls the engine left without index or id, interleaved over two choices, with
    # reasoning under the older field name.
    "bare_tools_two_choices": [
        chunk(delta(0, reasoning_content="plan"), delta(1, content="text")),
        chunk(delta(0, tool_calls=[{"function": {"name": "a", "arguments": "{\"x\""}}]),
              delta(1, tool_calls=[{"index": 3, "function": {"name": "b"}}])),
        chunk(delta(0, tool_calls=[{"index": 0, "function": {"arguments": ": 1}"}}]),
              delta(1, tool_calls=[{"index": 3, "function": {"arguments": "{}"}}])),
        chunk(delta(0, finish="function_call"), delta(1, finish="tool_calls")),
    ],
}
ALL = {**TRANSCRIPTS, **EXTRA}


def _fold(events: list[Event]) -> Result:
    agg = Aggregator()
    for ev in events:
        agg.add(ev)
    return agg.result()


def _canonical(chunks: list[dict[str, Any]]) -> Result:
    decoder = ChunkDecoder()
    return _fold([*(ev for c in copy.deepcopy(chunks) for ev in decoder.decode(c)), decoder.final_usage()])


def _relayed_one_by_one(chunks: list[dict[str, Any]]) -> Result:
    decoder = RelayDecoder()
    return _fold([*(ev for c in copy.deepcopy(chunks) for ev in decoder.decode(c)), decoder.final_usage()])


def _relayed_in_one_read(chunks: list[dict[str, Any]]) -> Result:
    decoder = RelayDecoder()
    events, done = decoder.decode_batch([orjson.dumps(c) for c in chunks] + [b"[DONE]"])
    assert done and any(isinstance(ev, Relayed) for ev in events)
    return _fold([*events, decoder.final_usage()])


@pytest.mark.parametrize("name", sorted(ALL))
def test_relayed_chunks_aggregate_to_the_canonical_result(name: str) -> None:
    canonical = _canonical(ALL[name])
    assert canonical.choices and any(c.text or c.tool_calls or c.reasoning for c in canonical.choices)
    assert _relayed_one_by_one(ALL[name]) == canonical
    assert _relayed_in_one_read(ALL[name]) == canonical


def test_the_fold_keeps_what_the_canonical_path_keeps() -> None:
    """The equality above is not vacuous: logprobs, stop strings, mapped finish reasons and
    tool-call ids and names survive the fold."""
    logprobs = _relayed_in_one_read(EXTRA["logprobs_stop"]).choices[0]
    assert logprobs.text == "Hi there" and logprobs.stop_sequence == "END" and logprobs.finish_reason == "stop"
    assert logprobs.logprobs is not None and [t.token for t in logprobs.logprobs] == ["Hi", " there"]
    assert logprobs.logprobs[0].top[1].logprob == -9.5 and logprobs.logprobs[0].bytes == tuple(b"Hi")
    matched = _relayed_in_one_read(EXTRA["matched_stop"]).choices[0]
    assert matched.stop_sequence == "\n\n" and matched.finish_reason == "stop"
    first, second = _relayed_in_one_read(EXTRA["bare_tools_two_choices"]).choices
    assert first.reasoning == "plan" and first.finish_reason == "tool_calls"
    assert [(t.id, t.name, t.arguments) for t in first.tool_calls] == [("call_0_0", "a", '{"x": 1}')]
    assert second.text == "text" and [(t.name, t.arguments) for t in second.tool_calls] == [("b", "{}")]
    tools = _relayed_in_one_read(TRANSCRIPTS["tools"])
    assert [(t.id, t.name) for t in tools.choices[0].tool_calls] == [("call_a", "get_weather"), ("call_b", "get_time")]
    assert tools.usage.input_tokens == 30 and tools.usage.output_tokens == 9


# A worker's engine may send anything: chunks of the wrong shape are the engine's error (a
# 502 that fails over, or the stream's error event), never the gateway's 500.
MALFORMED = [
    {"choices": [1]},
    {"choices": "x"},
    {"choices": {"a": 1}},
    {"choices": [{"index": "a", "delta": {"content": "x"}}]},
    {"choices": [{"index": 0, "delta": "x"}]},
    {"choices": [{"index": 0, "delta": {"content": 5}}]},
    {"choices": [{"index": 0, "delta": {"reasoning": ["x"]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": "x"}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": 7}}]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": 7}}]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "z"}]}}]},
    [1, 2],
    None,  # JSON null
    {"choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": {"content": [{"token": "x", "logprob": None}]}}]},
    {"choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": {"content": [5]}}]},
]


@pytest.mark.parametrize("relay", [True, False], ids=["relay", "canonical"])
@pytest.mark.parametrize("bad", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_chunk_is_the_engine_s_error(relay: bool, bad: Any) -> None:
    decoder = RelayDecoder() if relay else ChunkDecoder()
    try:
        decoder.decode_batch([orjson.dumps(bad)])
    except EngineError as err:
        assert "malformed" in str(err)
    else:  # what the chunk held before its bad part goes out first, then the error
        assert decoder.failure is not None and "malformed" in str(decoder.failure)
    decoder = RelayDecoder() if relay else ChunkDecoder()  # after output in the same read: that output first
    events, _ = decoder.decode_batch([orjson.dumps(chunk(delta(content="ok"))), orjson.dumps(bad)])
    assert events and isinstance(decoder.failure, EngineError)


def test_message_shaped_chunks_fold_as_the_canonical_path_reads_them() -> None:
    """Some engines put a stream chunk's content under ``message``: both paths read it, tool
    calls included (numbered and named by the relay decoder as by the canonical one)."""
    chunks = [
        chunk({"index": 0, "message": {"content": "hi"}, "finish_reason": None}),
        chunk({"index": 0, "message": {"tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
               "finish_reason": "tool_calls"}),
    ]
    canonical = _canonical(chunks)
    assert canonical.choices[0].text == "hi" and canonical.choices[0].tool_calls[0].name == "f"
    assert _relayed_in_one_read(chunks) == canonical
    # The relay decoder moves such content under "delta", where the resume tracker reads what
    # was delivered (a continuation must start from it, not from nothing) and clients read it.
    relay, plain = RelayDecoder(), ChunkDecoder()
    relayed_events, _ = relay.decode_batch([orjson.dumps(c) for c in chunks])
    events, _ = plain.decode_batch([orjson.dumps(c) for c in chunks])
    tracked, expected = Delivered(), Delivered()
    for ev in relayed_events:
        tracked.observe(ev)
    for ev in events:
        expected.observe(ev)
    assert not tracked.opaque and tracked.deltas == expected.deltas == 2
    assert tracked.text == expected.text == "hi"
    relayed = [ev for ev in relayed_events if isinstance(ev, Relayed)]
    assert all("message" not in ch and "delta" in ch for ev in relayed for c in ev.chunks for ch in c["choices"])


# -- what the relay decoder notes on its one walk over the chunks ---------------------------------
# The resume tracker and the aggregator read the relay decoder's notes (``Relayed.texts`` and
# the rest) instead of walking the chunks again: the notes must say what the chunks say.


def _tracked(events: list[Event]) -> tuple[object, ...]:
    d = Delivered()
    for ev in events:
        d.observe(ev)
    assert not d.opaque
    return d.text, d.reasoning, sorted(d.choices), d.tool_calls, d.deltas, d.finished


@pytest.mark.parametrize("name", sorted(ALL))
def test_the_resume_tracker_reads_from_the_notes_what_the_canonical_events_say(name: str) -> None:
    chunks = ALL[name]
    plain = ChunkDecoder()
    expected = _tracked([ev for c in copy.deepcopy(chunks) for ev in plain.decode(c)])
    for split in (1, 2, len(chunks)):  # reads of one chunk, two, and all of them
        relay = RelayDecoder()
        payloads = [orjson.dumps(c) for c in chunks]
        events = [ev for i in range(0, len(payloads), split) for ev in relay.decode_batch(payloads[i : i + split])[0]]
        assert _tracked(events) == expected, split


@pytest.mark.parametrize("name", sorted(ALL))
def test_folding_the_notes_gives_what_folding_the_chunks_gives(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    noted = _relayed_in_one_read(ALL[name])
    monkeypatch.setattr(Aggregator, "_fold_noted", lambda self, ev: False)
    assert _relayed_in_one_read(ALL[name]) == noted


def test_the_notes_of_a_read_are_those_of_the_chunks_it_keeps() -> None:
    """A chunk refused after output in the same read is not delivered: nothing it held before
    its bad part (text of its first choice, a second choice, a finish) stays in the notes."""
    good = chunk(delta(content="ok"))
    bad = chunk(delta(0, content="lost"), delta(1, reasoning_content="also lost", finish="stop"))
    bad["choices"].append({"index": 2, "delta": {"content": 5}})  # the bad part, after the rest
    relay = RelayDecoder()
    events, _ = relay.decode_batch([orjson.dumps(good), orjson.dumps(bad)])
    assert isinstance(relay.failure, EngineError)
    (relayed,) = [ev for ev in events if isinstance(ev, Relayed)]
    assert relayed.texts == ["ok"] and relayed.reasoning == [] and not relayed.finished
    assert relayed.indexes == relayed.active == {0} and len(relayed.chunks) == 1
    assert _tracked(events) == ("ok", "", [0], 0, 1, False)


@pytest.mark.parametrize("name", sorted(ALL))
def test_notes_made_again_after_a_refused_chunk_are_those_of_the_read_without_it(name: str) -> None:
    """Every transcript's chunks in one read, then a chunk refused after its first part: the
    notes are those of the same read without it, field by field."""
    payloads = [orjson.dumps(c) for c in ALL[name]]
    bad = chunk(delta(0, reasoning_content="lost", finish="stop"), delta(4, tool_calls=[{"function": {"name": "x"}}]))
    bad["choices"].append({"index": 5, "delta": {"content": 5}})
    refused, clean = RelayDecoder(), RelayDecoder()
    events, _ = refused.decode_batch([*payloads, orjson.dumps(bad)])
    expected, _ = clean.decode_batch(payloads)
    assert isinstance(refused.failure, EngineError)
    (got,) = [ev for ev in events if isinstance(ev, Relayed)]
    (want,) = [ev for ev in expected if isinstance(ev, Relayed)]
    assert got == want
