"""What usage an engine may report for a request, judged from what Mesh asked of it.

A worker's engine is not the operator's: it may report more tokens than it could have
produced, to be paid more. Output cannot exceed ``max_tokens`` for each of ``n`` choices;
the prompt cannot be much larger than Mesh's own estimate of its text (already at or above
a byte-level BPE tokenizer's count, ``billing/estimate.py``), plus what a vision encoder
may take for each image and the chat template's own tokens.
"""

from __future__ import annotations

from dataclasses import replace

from mesh.billing.estimate import TOKENS_PER_IMAGE
from mesh.canonical import CanonicalRequest, ImagePart, Usage

# The estimate of the text covers a byte-level BPE count on every script measured (English
# about 3 times over); half as much again covers smaller vocabularies and a template that
# spells tools out more verbosely than Mesh's estimate reads them.
PROMPT_FACTOR = 1.5
# The most one image takes at a vision model's default resolution (Qwen2.5-VL: 12,845,056
# pixels in 28x28 patches); Mesh's estimate counts far fewer, as a typical image.
IMAGE_TOKENS_MOST = 16384
# The template's own tokens beyond the estimate's per-message markers: a default system
# prompt, tool-use instructions.
PROMPT_SLACK = 512


def most_prompt_tokens(request: CanonicalRequest, prompt_estimate: int) -> int:
    """The most prompt tokens an honest engine may report for ``request``, whose estimate
    (``estimate_prompt_tokens``) is ``prompt_estimate``."""
    images = sum(isinstance(p, ImagePart) for m in request.messages for p in m.parts)
    text = max(0, prompt_estimate - images * TOKENS_PER_IMAGE)
    return int(text * PROMPT_FACTOR) + images * IMAGE_TOKENS_MOST + PROMPT_SLACK


def out_of_bounds(
    request: CanonicalRequest, prompt_estimate: int, usage: Usage, context_length: int | None = None
) -> str | None:
    """Why ``usage`` cannot be true for ``request`` (as sent upstream), or None if it can."""
    cap = request.max_tokens or context_length
    if cap is not None:
        most = cap * max(1, request.n)
        if usage.output_tokens > most:
            return f"reported {usage.output_tokens} output tokens for at most {most}"
    most_prompt = most_prompt_tokens(request, prompt_estimate)
    if usage.input_tokens > most_prompt:
        return f"reported {usage.input_tokens} prompt tokens for an estimated {prompt_estimate}"
    return None


def clamp(request: CanonicalRequest, prompt_estimate: int, usage: Usage, context_length: int | None = None) -> Usage:
    """What to bill for ``usage`` that is out of bounds: the prompt at Mesh's own estimate (it
    leans high) and the output at its cap, never more than the engine reported."""
    cap = request.max_tokens or context_length
    output = usage.output_tokens if cap is None else min(usage.output_tokens, cap * max(1, request.n))
    prompt = min(usage.input_tokens, prompt_estimate)
    return replace(usage, input_tokens=prompt, output_tokens=output, cached_tokens=min(usage.cached_tokens, prompt),
                   reasoning_tokens=min(usage.reasoning_tokens, output))
