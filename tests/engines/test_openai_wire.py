"""Canonical messages on the OpenAI wire: content parts reach the engine as the client sent them."""

from __future__ import annotations

from mesh.canonical import ImagePart, Message, TextPart, ToolCallPart, ToolResultPart
from mesh.engines.openai_wire import encode_messages


def test_text_parts_stay_parts_and_a_single_part_is_a_string() -> None:
    out = encode_messages(
        (
            Message("system", (TextPart("rules"), TextPart("more rules"))),
            Message("user", (TextPart("one"),)),
            Message("user", (TextPart("a"), TextPart("b"))),
        ),
        "reasoning_content",
    )
    parts = [{"type": "text", "text": "rules"}, {"type": "text", "text": "more rules"}]
    assert out[0] == {"role": "system", "content": parts}
    assert out[1] == {"role": "user", "content": "one"}
    assert out[2]["content"] == [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]


def test_images_keep_their_place_among_the_parts() -> None:
    [msg] = encode_messages(
        (Message("user", (TextPart("look:"), ImagePart("data:image/png;base64,AAAA", "low"), TextPart("ok?"))),),
        "reasoning_content",
    )
    assert msg["content"] == [
        {"type": "text", "text": "look:"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
        {"type": "text", "text": "ok?"},
    ]


def test_assistant_and_tool_parts_pass_through() -> None:
    out = encode_messages(
        (
            Message("assistant", (TextPart("x"), TextPart("y"), ToolCallPart("call_1", "f", "{}"))),
            Message("user", (ToolResultPart("call_1", (TextPart("r1"), TextPart("r2"))),)),
            Message("user", (ToolResultPart("call_1", (TextPart("bad"),), is_error=True),)),
        ),
        "reasoning_content",
    )
    assert out[0]["content"] == [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]
    assert out[0]["tool_calls"][0]["id"] == "call_1"
    assert out[1] == {"role": "tool", "tool_call_id": "call_1",
                      "content": [{"type": "text", "text": "r1"}, {"type": "text", "text": "r2"}]}
    assert out[2]["content"] == "Error: bad"


def test_a_malformed_chunk_after_usage_in_the_same_read_fails_after_the_usage() -> None:
    # The worker usage guard must see a liar's usage even when the engine breaks right after
    # it in the same socket read (tests/integration/test_worker_redteam.py).
    from mesh.canonical import Usage as _Usage
    from mesh.engines.openai_relay import RelayDecoder
    from mesh.engines.openai_wire import ChunkDecoder

    chunk = b'{"id":"x","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}'
    usage = b'{"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1}}'
    for decoder in (ChunkDecoder(), RelayDecoder()):
        events, done = decoder.decode_batch([chunk, usage, b"{broken"])
        assert not done and decoder.failure is not None
        assert [e for e in events if isinstance(e, _Usage)] == [_Usage(input_tokens=7, output_tokens=1)]


def _chunk_shapes() -> list[object]:
    """Chunks of the common shape and of every shape next to it (which the fast path must
    leave to the general walk), malformed ones included."""
    plain: dict[str, object] = {"index": 0, "logprobs": None, "finish_reason": None}
    deltas: list[object] = [
        {"content": "hi"}, {"content": ""}, {"role": "assistant", "content": ""}, {"role": "assistant", "content": "x"},
        {"role": "assistant"}, {}, None, {"content": None}, {"content": 5}, {"content": ["x"]},
        {"content": "x", "reasoning_content": None}, {"reasoning_content": "think"}, {"reasoning": "r", "content": "x"},
        {"content": "x", "tool_calls": None}, {"role": "assistant", "tool_calls": [{"index": 0, "id": "c", "function":
                                               {"name": "f", "arguments": "{}"}}]},
        {"content": "x", "extra": 1}, "text",
    ]
    choices: list[object] = []
    for delta in deltas:
        choices.append({**plain, "delta": delta})
        for key, value in (("index", 1), ("index", None), ("index", False), ("index", "0"), ("finish_reason", "stop"),
                           ("finish_reason", "eos"), ("logprobs", {"content": []}), ("logprobs", [])):
            choices.append({**plain, "delta": delta, key: value})
        choices.append({"delta": delta})
        choices.append({"message": delta, "index": 0})
    shapes: list[object] = [{"choices": [c]} for c in choices]
    shapes += [{"choices": [choices[0], choices[0]]}, {"choices": []}, {"choices": None}, {"choices": "ab"},
               {"choices": ["x"]}, {"choices": [None]}]
    return shapes


def test_the_relay_decoders_fast_look_at_a_chunk_notes_what_the_general_walk_notes() -> None:
    """``RelayDecoder._inspect`` takes a short way for the common chunk (one choice, a text
    delta); for every chunk, of that shape or next to it, it returns, notes, counts and
    raises exactly what the general walk does."""
    import copy

    from mesh.canonical import Relayed
    from mesh.engines.openai_relay import RelayDecoder

    def outcome(look: str, chunk: object) -> tuple[object, ...]:
        decoder, into, chunk = RelayDecoder(), Relayed([]), copy.deepcopy(chunk)
        try:
            if look == "fast":
                result: object = decoder._inspect(chunk, into)  # type: ignore[arg-type]
            else:
                choices = chunk.get("choices")  # type: ignore[attr-defined]
                result = decoder._walk(choices, into) if choices else (False, 0, False)
        except Exception as exc:
            result = type(exc).__name__
        notes = (into.texts, into.reasoning, into.indexes, into.active, into.calls, into.finished,
                 into.reasoning_fields, into.tools, into.logprobs)
        return result, notes, chunk, decoder.output_deltas, decoder.reasoning_deltas, decoder.first_finish

    shapes = _chunk_shapes()
    assert len(shapes) > 150
    fast_ones = 0
    for chunk in shapes:
        assert outcome("fast", chunk) == outcome("walk", chunk), chunk
        fast_ones += outcome("fast", chunk)[0] == (True, 1, True)
    assert fast_ones >= 4  # the common shape is among them
