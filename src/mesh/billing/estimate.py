"""An upper estimate of a prompt's tokens, for the credit hold, without a tokenizer.

Byte-level BPE tokenizers (Llama, Qwen, SmolLM, GPT) never use more than one token per
UTF-8 byte, and reach that bound on digits (each its own token), punctuation runs, the
space between digits, and non-Latin scripts (measured with the embedded model's
tokenizer: Korean 1.13 bytes a token, CJK 1.55, emoji 1.33, digits and hex 1.0). Only
runs of ASCII letters compress much (English averages 4.5 bytes a token; random
mixed-case letters about 1.4). So the estimate counts one token per byte for everything
except ASCII letters, which count 0.6 each plus one per run of letters (a lone letter
between digits, as in hex, is a token of its own), and a space that opens a word, which
is free. English comes out about 3 times its real count, every other script tested 1-2.5
times, none under it (tests/billing/test_estimate.py). SentencePiece vocabularies (Llama 2,
Mistral v0.x, Phi-3) merge letters less: random letter runs count up to about 1.3 times
this estimate there (measured with llama.cpp's bundled vocabularies), so a hold on such a
model may fall short on text like that. What a worker's engine may report is bounded
separately, by bytes (``workers/bounds.py``), which no vocabulary exceeds.
"""

from __future__ import annotations

import orjson

from mesh.canonical import CanonicalRequest, ImagePart, ReasoningPart, TextPart, ToolCallPart, ToolResultPart

_LETTERS = bytes(range(ord("a"), ord("z") + 1)) + bytes(range(ord("A"), ord("Z") + 1))
# Every byte to "." except ASCII letters to "a" and the space to " ": letter runs, and
# spaces that open a word (one token with it: " word"), become countable with bytes.count.
_SHAPE = bytes(ord("a") if bytes([b]) in _LETTERS else b if b == ord(" ") else ord(".") for b in range(256))
_TOKENS_PER_MESSAGE = 16  # role markers and separators of a chat template
TOKENS_PER_IMAGE = 1600
_OVERHEAD = 16


def estimate_text_tokens(text: str) -> int:
    """At least the tokens ``text`` takes in a byte-level BPE vocabulary (see the module
    docstring for how far above)."""
    raw = text.encode()
    shape = raw.translate(_SHAPE)  # C-speed passes, no Python loop
    letters = shape.count(b"a")
    word_spaces = shape.count(b" a")
    runs = shape.count(b".a") + word_spaces + shape.startswith(b"a")
    # A run of L letters: 0.6 L + 1 tokens covers random letters (3.8 tokens for 5) and
    # single letters between digits (hex, base64) alike; the space before a word is free.
    return len(raw) - letters - word_spaces + (letters * 3 + 4) // 5 + runs


def typical_prompt_tokens(request: CanonicalRequest) -> int:
    """A middle-of-the-road estimate (two bytes a token) where leaning high has a cost of
    its own: the room a prompt leaves in the context for ``max_tokens``."""
    size = 0
    for m in request.messages:
        size += _TOKENS_PER_MESSAGE
        for p in m.parts:
            if isinstance(p, ImagePart):
                size += 2 * TOKENS_PER_IMAGE
            elif isinstance(p, TextPart):
                size += len(p.text.encode())
            elif isinstance(p, ToolResultPart):  # a screenshot in a tool result is an image too
                size += sum(2 * TOKENS_PER_IMAGE if isinstance(c, ImagePart) else len(c.text.encode())
                            for c in p.content) + len(p.call_id)
            else:
                size += len(repr(p).encode())
    for t in request.tools:
        size += len(t.name) + len(t.description or "") + len(repr(t.parameters or {}))
    return size // 2 + _OVERHEAD


def estimate_prompt_tokens(request: CanonicalRequest) -> int:
    """An upper estimate of the request's prompt tokens: messages, images and tools."""
    tokens = _OVERHEAD
    for m in request.messages:
        tokens += _TOKENS_PER_MESSAGE
        for p in m.parts:
            if isinstance(p, TextPart):  # the common part first
                tokens += estimate_text_tokens(p.text)
            elif isinstance(p, ImagePart):
                tokens += TOKENS_PER_IMAGE
            elif isinstance(p, ToolResultPart):
                tokens += _TOKENS_PER_MESSAGE + estimate_text_tokens(p.call_id) + sum(
                    TOKENS_PER_IMAGE if isinstance(c, ImagePart) else estimate_text_tokens(c.text) for c in p.content)
            else:
                tokens += estimate_text_tokens(repr(p))
    for t in request.tools:
        tokens += estimate_text_tokens(f"{t.name} {t.description or ''} {t.parameters or {}!r}")
    return tokens


# A rough lower bound, for lowering max_tokens when no tokenizer answers: few tokenizers
# average more than 4 bytes per token on any text.
BYTES_PER_TOKEN_LOW = 4


def estimate_prompt_tokens_low(request: CanonicalRequest) -> int:
    """Prompt tokens from text size, leaning low (tokens are rarely longer than 4 bytes)."""
    size = 0
    for m in request.messages:
        for p in m.parts:
            if isinstance(p, TextPart | ReasoningPart):
                size += len(p.text.encode())
            elif isinstance(p, ToolCallPart):
                size += len(p.arguments.encode()) + len(p.name)
            elif isinstance(p, ToolResultPart):
                size += sum(len(c.text.encode()) for c in p.content if isinstance(c, TextPart))
    for t in request.tools:
        size += len(t.name) + len(t.description or "") + (len(orjson.dumps(t.parameters)) if t.parameters else 0)
    return size // BYTES_PER_TOKEN_LOW
