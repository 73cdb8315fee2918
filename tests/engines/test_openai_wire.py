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
    from mesh.engines.openai_wire import ChunkDecoder, RelayDecoder

    chunk = b'{"id":"x","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}'
    usage = b'{"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1}}'
    for decoder in (ChunkDecoder(), RelayDecoder()):
        events, done = decoder.decode_batch([chunk, usage, b"{broken"])
        assert not done and decoder.failure is not None
        assert [e for e in events if isinstance(e, _Usage)] == [_Usage(input_tokens=7, output_tokens=1)]
