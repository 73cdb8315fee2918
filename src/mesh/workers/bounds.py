"""What usage an engine may report for a request, judged from what Mesh asked of it.

A worker's engine is not the operator's: it may report more tokens than it could have
produced, to be paid more. Output cannot exceed ``max_tokens`` for each of ``n`` choices.
The prompt cannot exceed one token per UTF-8 byte of everything the engine was sent (no
byte-level BPE or byte-fallback SentencePiece vocabulary has a token shorter than a byte),
plus the chat template's markers around each message and tool, what a vision encoder may
take for each image, and the template's own text.

The bound must hold for any prompt a client can write, not only for typical ones: a
client who could make an honest engine cross it could have the whole worker fleet
quarantined with a few requests. So it is not a guess of the real count; English is
about 4.5 bytes a token, so a liar may claim up to about 4.5 times its prompt.
"""

from __future__ import annotations

from dataclasses import replace

import orjson

from mesh.canonical import CanonicalRequest, ImagePart, ReasoningPart, TextPart, ToolCallPart, ToolResultPart, Usage

# Role markers and separators around a message, a tool call or a tool result; and around a
# tool's definition (Llama 3.1's template also explains each parameter's type).
TEMPLATE_TOKENS_PER_PART = 32
TEMPLATE_TOKENS_PER_TOOL = 64
# The most one image takes at a vision model's default resolution (Qwen2.5-VL: 12,845,056
# pixels in 28x28 patches), unless the request raises it (``mm_processor_kwargs``).
IMAGE_TOKENS_MOST = 16384
_PATCH_PIXELS = 28 * 28
# The template's own text: a default system prompt, tool-use instructions.
PROMPT_SLACK = 512


def _image_tokens_most(request: CanonicalRequest) -> int:
    kwargs = request.extra.get("mm_processor_kwargs")
    pixels = kwargs.get("max_pixels") if isinstance(kwargs, dict) else None
    if isinstance(pixels, int | float) and not isinstance(pixels, bool) and pixels > 0:
        return max(IMAGE_TOKENS_MOST, int(pixels) // _PATCH_PIXELS + 2)
    return IMAGE_TOKENS_MOST


def most_prompt_tokens(request: CanonicalRequest) -> int:
    """The most prompt tokens an honest engine may report for ``request`` as sent upstream."""
    size = PROMPT_SLACK
    images = 0
    for m in request.messages:
        size += TEMPLATE_TOKENS_PER_PART + len((m.name or "").encode())
        for p in m.parts:
            if isinstance(p, TextPart | ReasoningPart):
                size += len(p.text.encode())
            elif isinstance(p, ImagePart):
                images += 1
            elif isinstance(p, ToolCallPart):
                size += TEMPLATE_TOKENS_PER_PART + len(p.id) + len(p.name.encode()) + len(p.arguments.encode())
            elif isinstance(p, ToolResultPart):
                size += TEMPLATE_TOKENS_PER_PART + len(p.call_id)
                for c in p.content:
                    if isinstance(c, ImagePart):
                        images += 1
                    else:
                        size += len(c.text.encode())
    for t in request.tools:
        size += TEMPLATE_TOKENS_PER_TOOL + len(orjson.dumps(
            {"name": t.name, "description": t.description, "parameters": t.parameters}, default=str))
    if request.extra:  # the model's enabled extensions: documents, template kwargs the template may print
        size += len(orjson.dumps(request.extra, default=str))
    return size + images * _image_tokens_most(request)


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
    most_prompt = most_prompt_tokens(request) + ((cap or 0) if resumed else 0)
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
