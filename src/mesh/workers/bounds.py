"""What usage an engine may report for a request, judged from what Mesh asked of it.

A worker's engine is not the operator's: it may report more tokens than it could have
produced, to be paid more. Output cannot exceed ``max_tokens`` for each of ``n`` choices;
the prompt cannot be much larger than Mesh's own estimate of it (which leans high, 2
bytes a token), allowing for the chat template's own tokens.
"""

from __future__ import annotations

from dataclasses import replace

from mesh.canonical import CanonicalRequest, Usage

# The real prompt may exceed Mesh's estimate by this factor plus the template's overhead.
PROMPT_FACTOR = 4
PROMPT_SLACK = 512


def out_of_bounds(
    request: CanonicalRequest, prompt_estimate: int, usage: Usage, context_length: int | None = None
) -> str | None:
    """Why ``usage`` cannot be true for ``request`` (as sent upstream), or None if it can."""
    cap = request.max_tokens or context_length
    if cap is not None:
        most = cap * max(1, request.n)
        if usage.output_tokens > most:
            return f"reported {usage.output_tokens} output tokens for at most {most}"
    most_prompt = prompt_estimate * PROMPT_FACTOR + PROMPT_SLACK
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
