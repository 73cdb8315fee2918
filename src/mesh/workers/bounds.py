"""What usage an engine may report for a request, judged from what Mesh asked of it.

A worker's engine is not the operator's: it may report more tokens than it could have
produced, to be paid more. Output cannot exceed ``max_tokens`` for each of ``n`` choices.
The prompt cannot exceed one token per UTF-8 byte of everything the engine was sent (no
byte-level BPE or byte-fallback SentencePiece vocabulary has a token shorter than a byte),
counted as the template prints it (JSON spaced, indented, escaped) and the tokenizer
normalizes it (NFC, NFKC), plus the chat template's markers around each message and tool,
what a vision encoder may take for each image, and the template's own text. Where the
request lets the prompt grow past what Mesh can count (its own chat template, image
processor settings), only the context length bounds it.

The bound must hold for any prompt a client can write, not only for typical ones: a
client who could make an honest engine cross it could have the whole worker fleet
quarantined with a few requests. So it is not a guess of the real count; English is
about 4.5 bytes a token, so a liar may claim up to about 4.5 times its prompt.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import replace

import orjson

from mesh.canonical import CanonicalRequest, ImagePart, ReasoningPart, TextPart, ToolCallPart, ToolResultPart, Usage

# Role markers and separators around a message, a tool call or a tool result; and around a
# tool's definition (Llama 3.1's template also explains each parameter's type).
TEMPLATE_TOKENS_PER_PART = 32
TEMPLATE_TOKENS_PER_TOOL = 64
# The most one image takes at a vision model's default resolution (Qwen2.5-VL: 12,845,056
# pixels in 28x28 patches); a request that changes the processor's settings may take more.
IMAGE_TOKENS_MOST = 16384
_PATCH_PIXELS = 28 * 28
# The template's own text: a default system prompt, tool-use instructions.
PROMPT_SLACK = 512
# Extensions whose values a chat template prints into the prompt.
_PRINTED_EXTENSIONS = ("documents", "chat_template_kwargs")
_UNBOUNDED = 1 << 40


def _text_bytes(text: str) -> int:
    """UTF-8 bytes of ``text`` as a tokenizer may see it: Qwen's normalize to NFC first, some
    SentencePiece models to NFKC, and either can lengthen a string (U+1D160 is 4 bytes, 12
    in NFC; U+FDFA is 3 bytes, 33 in NFKC)."""
    size = len(text.encode())
    if not text.isascii():
        for form in ("NFC", "NFKC"):
            if not unicodedata.is_normalized(form, text):
                size = max(size, len(unicodedata.normalize(form, text).encode()))
    return size


def _json_bytes(value: object) -> int:
    """At least the bytes of ``value`` as a template prints it: spaced separators (Python's
    ``json.dumps``), indented up to four spaces (Llama 3's tools), non-ASCII escaped or not
    (and normalized), all measured with C-speed encoders."""
    try:
        compact = orjson.dumps(value, default=str)
        indented = orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2)
        escaped = len(json.dumps(value, default=str))  # ", " and ": ", \uXXXX for non-ASCII
    except (TypeError, ValueError):
        return 3 * len(repr(value).encode())
    # Four-space indentation doubles two-space indentation's whitespace at most.
    return max(escaped, _text_bytes(compact.decode())) + 2 * (len(indented) - len(compact))


def _arguments_bytes(arguments: str) -> int:
    """A tool call's arguments: engines parse them and the template prints the object again."""
    try:
        return max(_text_bytes(arguments), _json_bytes(orjson.loads(arguments)))
    except orjson.JSONDecodeError:
        return _text_bytes(arguments)


def _image_tokens_most(request: CanonicalRequest) -> int | None:
    """The most one image may take, or None when the request's processor settings (min_pixels,
    size, max_dynamic_patch...) let an image fill the context."""
    kwargs = request.extra.get("mm_processor_kwargs")
    if not kwargs:
        return IMAGE_TOKENS_MOST
    if not isinstance(kwargs, dict) or set(kwargs) != {"max_pixels"}:
        return None
    pixels = kwargs["max_pixels"]
    if isinstance(pixels, bool) or not isinstance(pixels, int | float) or pixels <= 0:
        return None
    return max(IMAGE_TOKENS_MOST, int(pixels) // _PATCH_PIXELS + 2)


def most_prompt_tokens(request: CanonicalRequest, context_length: int | None = None) -> int:
    """The most prompt tokens an honest engine may report for ``request`` as sent upstream."""
    size, images = _printed_tokens_most(request)
    per_image = _image_tokens_most(request)
    if "chat_template" in request.extra or (images and per_image is None):
        # The request's own template (which may loop) or image settings: up to the context.
        return max(size, context_length or _UNBOUNDED)
    return size + images * (per_image or 0)


def _printed_tokens_most(request: CanonicalRequest) -> tuple[int, int]:
    """The bound on everything but images, and how many images there are."""
    size = PROMPT_SLACK
    images = 0
    for m in request.messages:
        size += TEMPLATE_TOKENS_PER_PART + _text_bytes(m.name or "")
        for p in m.parts:
            if isinstance(p, TextPart | ReasoningPart):
                size += _text_bytes(p.text)
            elif isinstance(p, ImagePart):
                images += 1
            elif isinstance(p, ToolCallPart):
                size += (TEMPLATE_TOKENS_PER_PART + _text_bytes(p.id) + _text_bytes(p.name)
                         + _arguments_bytes(p.arguments))
            elif isinstance(p, ToolResultPart):
                size += TEMPLATE_TOKENS_PER_PART + _text_bytes(p.call_id)
                for c in p.content:
                    if isinstance(c, ImagePart):
                        images += 1
                    else:
                        size += _text_bytes(c.text)
    for t in request.tools:
        size += TEMPLATE_TOKENS_PER_TOOL + _json_bytes(
            {"name": t.name, "description": t.description, "parameters": t.parameters})
    for key in _PRINTED_EXTENSIONS:
        if key in request.extra:
            documents = request.extra[key]
            size += _json_bytes(documents)
            if key == "documents" and isinstance(documents, list):
                size += TEMPLATE_TOKENS_PER_PART * len(documents)
    return size, images


def _output_cap(request: CanonicalRequest, context_length: int | None) -> int | None:
    cap = request.max_tokens or context_length
    return None if cap is None else cap * max(1, request.n)


def out_of_bounds(
    request: CanonicalRequest, prompt_estimate: int, usage: Usage, context_length: int | None = None,
    *, resumed: bool = False,
) -> str | None:
    """Why ``usage`` cannot be true for ``request`` (as sent upstream), or None if it can.

    ``resumed``: the answer was continued on another replica, whose prompt was this one plus
    the delivered output; the splice subtracts that output as counted in deltas, which an
    engine sending several tokens per delta undercounts, so the prompt may carry up to the
    output cap more."""
    cap = _output_cap(request, context_length)
    if cap is not None and usage.output_tokens > cap:
        return f"reported {usage.output_tokens} output tokens for at most {cap}"
    most_prompt = most_prompt_tokens(request, context_length) + ((cap or 0) if resumed else 0)
    if usage.input_tokens > most_prompt:
        return (f"reported {usage.input_tokens} prompt tokens for at most {most_prompt} "
                f"(Mesh estimated {prompt_estimate})")
    return None


def clamp(request: CanonicalRequest, prompt_estimate: int, usage: Usage, context_length: int | None = None) -> Usage:
    """What to bill for ``usage`` that is out of bounds: the prompt at Mesh's own estimate (it
    leans high) and the output at its cap, never more than the engine reported."""
    cap = _output_cap(request, context_length)
    output = usage.output_tokens if cap is None else min(usage.output_tokens, cap)
    prompt = min(usage.input_tokens, prompt_estimate)
    return replace(usage, input_tokens=prompt, output_tokens=output, cached_tokens=min(usage.cached_tokens, prompt),
                   reasoning_tokens=min(usage.reasoning_tokens, output))
