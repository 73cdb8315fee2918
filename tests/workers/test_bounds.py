"""How far a worker's engine may overstate a prompt before Mesh calls it a liar: never on an
honest count (measured with the embedded model's tokenizer and chat template), whatever
text a client sends, and not by a large multiple of the real count either."""

from __future__ import annotations

import json
import unicodedata

import llama_cpp
import orjson
import pytest

from billing.test_estimate import TEXTS
from mesh.billing.estimate import estimate_prompt_tokens
from mesh.canonical import (
    CanonicalRequest,
    ImagePart,
    Message,
    TextPart,
    Tool,
    ToolCallPart,
    ToolResultPart,
    Usage,
)
from mesh.config import EmbeddedEngineConfig
from mesh.engines.embedded_model import resolve_gguf
from mesh.workers.bounds import IMAGE_TOKENS_MOST, clamp, most_prompt_tokens, out_of_bounds

TOOLS = (
    Tool(name="read_file", description="Read a file from the workspace and return its contents with line numbers.",
         parameters={"type": "object", "properties": {
             "path": {"type": "string", "description": "Path relative to the workspace root"},
             "offset": {"type": "integer", "description": "First line to read"},
             "limit": {"type": "integer", "description": "How many lines"}}, "required": ["path"]}),
    Tool(name="run", description="Run a shell command.",
         parameters={"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}),
)


@pytest.fixture(scope="module")
def vocab() -> llama_cpp.Llama:
    return llama_cpp.Llama(str(resolve_gguf(EmbeddedEngineConfig(type="embedded"))), vocab_only=True, verbose=False)


def rendered_tokens(vocab: llama_cpp.Llama, request: CanonicalRequest) -> int:
    """The prompt as a verbose chat template renders it: a default system prompt, role
    markers around every message, the tools pretty-printed four spaces deep, tool calls'
    arguments parsed and printed again with spaces; normalized to NFC as Qwen's tokenizer
    does before counting."""
    text = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    if request.tools:
        text += "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n"
        for t in request.tools:
            text += json.dumps({"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters}}, indent=4) + "\n"
        text += "Return each call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n"
    for m in request.messages:
        body = ""
        for p in m.parts:
            if isinstance(p, TextPart):
                body += p.text
            elif isinstance(p, ToolCallPart):
                call = {"name": p.name, "arguments": json.loads(p.arguments)}
                body += f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        text += f"<|im_start|>{m.role}\n{body}<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    text = unicodedata.normalize("NFC", text)
    return len(vocab.tokenize(text.encode(), add_bos=True, special=True))


def chat(*texts: str, tools: tuple[Tool, ...] = (), images: int = 0) -> CanonicalRequest:
    messages = tuple(Message("user" if i % 2 == 0 else "assistant", (TextPart(t),)) for i, t in enumerate(texts))
    if images:
        picture = ImagePart(url="data:image/png;base64,iVBORw0KGgo=")
        messages += (Message("user", (TextPart("What is in these?"),) + (picture,) * images),)
    return CanonicalRequest(model="m", messages=messages, tools=tools, max_tokens=16)


DIGITS = list(range(10)) * 300
HONEST = {
    **{name: chat(text) for name, text in TEXTS.items()},
    "a short question": chat("Hi"),
    "a long conversation": chat(*(["ok", "Sure, here it is: 1 2 3."] * 60)),
    "tools": chat("Read main.py", tools=TOOLS),
    "tools, short": chat("ls", tools=TOOLS[1:]),
    # Compact JSON the template prints spaced or indented: a digit, a comma and a space
    # (or a newline and an indent) are a token each.
    "a tool whose schema lists small numbers": chat("Pick one", tools=(Tool(
        name="pick", description="Pick a number", parameters={"type": "object", "properties": {
            "n": {"type": "integer", "enum": DIGITS}}}),)),
    "an earlier tool call with a list of numbers": CanonicalRequest(model="m", max_tokens=16, messages=(
        Message("user", (TextPart("Plot it"),)),
        Message("assistant", (ToolCallPart("call_1", "plot", orjson.dumps({"xs": DIGITS}).decode()),)),
        Message("tool", (ToolResultPart("call_1", (TextPart("done"),)),)))),
    # Qwen's tokenizers normalize to NFC first: U+1D160 is 4 bytes, 12 in NFC.
    "characters that NFC lengthens": chat("\U0001d160" * 3000),
}


@pytest.mark.parametrize("name", list(HONEST))
def test_an_honest_prompt_count_is_within_bounds(vocab: llama_cpp.Llama, name: str) -> None:
    request = HONEST[name]
    real = rendered_tokens(vocab, request)
    usage = Usage(input_tokens=real, output_tokens=16)
    assert out_of_bounds(request, estimate_prompt_tokens(request), usage) is None, (name, real)


def unmerged_letters(vocab: llama_cpp.Llama, n: int) -> str:
    """ASCII letters chosen one at a time so that each costs a token of its own: the worst a
    client can write for an estimate that counts letter runs at 0.6 a letter."""
    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=False))

    text = "Q"
    letters = "qzxjkvwfyhgbpmdlcurtsnoiaeQZXJKVWFYHGBPMDLCURTSNOIAE"
    while len(text) < n:
        tail = text[-8:]
        base = count(tail)
        text += next((c for c in letters if count(tail + c) > base), letters[len(text) % len(letters)])
    return text


def test_letters_a_client_chose_to_cost_a_token_each_stay_within_bounds(vocab: llama_cpp.Llama) -> None:
    """An honest engine must never be quarantined for a client's prompt: this one costs far
    more than Mesh's estimate of it (1.5 times the estimate was the bound once)."""
    request = chat(unmerged_letters(vocab, 8000))
    real = rendered_tokens(vocab, request)
    estimate = estimate_prompt_tokens(request)
    assert real > 1.5 * estimate + 512  # the estimate is for typical text, not a bound on any text
    assert out_of_bounds(request, estimate, Usage(input_tokens=real, output_tokens=16)) is None
    assert real <= most_prompt_tokens(request)


def test_images_may_take_what_a_large_vision_encoder_takes() -> None:
    request = chat("Compare them.", images=3)
    estimate = estimate_prompt_tokens(request)
    honest = Usage(input_tokens=3 * IMAGE_TOKENS_MOST + 40, output_tokens=16)
    assert out_of_bounds(request, estimate, honest) is None
    assert out_of_bounds(request, estimate, Usage(input_tokens=4 * IMAGE_TOKENS_MOST, output_tokens=16)) is not None


def test_an_image_in_a_tool_result_is_an_image() -> None:
    """A computer-use turn: the screenshot comes back in a tool result, by URL."""
    shot = ToolResultPart("call_1", (ImagePart(url="https://cdn.example.com/screens/step-17.png"),))
    request = CanonicalRequest(model="m", messages=(
        Message("user", (TextPart("Open the settings"),)), Message("tool", (shot,))), max_tokens=16)
    estimate = estimate_prompt_tokens(request)
    assert estimate >= 1600  # held for as an image, not as the URL's letters
    assert out_of_bounds(request, estimate, Usage(input_tokens=2693 + 40, output_tokens=16)) is None


def test_a_request_that_raises_the_image_resolution_may_take_more_per_image() -> None:
    request = chat("Compare them.", images=2)
    big = Usage(input_tokens=2 * 40_000, output_tokens=16)
    assert out_of_bounds(request, estimate_prompt_tokens(request), big) is not None
    raised = CanonicalRequest(model="m", messages=request.messages, max_tokens=16,
                              extra={"mm_processor_kwargs": {"max_pixels": 40_000 * 28 * 28}})
    assert out_of_bounds(raised, estimate_prompt_tokens(raised), big) is None


def test_a_request_that_lets_the_prompt_grow_past_what_mesh_counts_is_bounded_by_the_context() -> None:
    """Its own chat template (which may loop), or image processor settings beyond
    max_pixels: an honest engine may then fill its context, never more."""
    base = chat("Compare them.", images=2)
    for extra in ({"chat_template": "{% for i in range(100000) %}x{% endfor %}"},
                  {"mm_processor_kwargs": {"min_pixels": 50_000_000}}):
        request = CanonicalRequest(model="m", messages=base.messages, max_tokens=16, extra=extra)
        estimate = estimate_prompt_tokens(request)
        assert out_of_bounds(request, estimate, Usage(input_tokens=100_000, output_tokens=16), 131_072) is None
        assert out_of_bounds(request, estimate, Usage(input_tokens=140_000, output_tokens=16), 131_072) is not None


def test_a_resumed_answer_may_carry_its_delivered_output_in_the_prompt() -> None:
    """The continuation re-read the delivered text; the splice subtracts it as counted in
    deltas, fewer than its tokens when an engine sends several tokens a delta."""
    request = chat("Hi")
    estimate = estimate_prompt_tokens(request)
    usage = Usage(input_tokens=most_prompt_tokens(request) + 10, output_tokens=16)
    assert out_of_bounds(request, estimate, usage) is not None
    assert out_of_bounds(request, estimate, usage, resumed=True) is None


@pytest.mark.parametrize("name", ["english", "code", "a long conversation"])
def test_a_prompt_reported_at_six_times_its_real_count_is_out_of_bounds(vocab: llama_cpp.Llama, name: str) -> None:
    """The bound is one token a byte (about 4.5 times an English prompt, 2 for code) so that
    no client's text can cross it; it was 12 times before (4 times the estimate)."""
    request = HONEST[name]
    real = rendered_tokens(vocab, request)
    estimate = estimate_prompt_tokens(request)
    inflated = Usage(input_tokens=6 * real, output_tokens=16)
    assert out_of_bounds(request, estimate, inflated) is not None, (name, real, estimate)
    billed = clamp(request, estimate, inflated)
    assert billed.input_tokens == estimate < 6 * real  # billed at Mesh's own estimate


def test_output_beyond_max_tokens_for_each_choice_is_out_of_bounds() -> None:
    request = chat("Hi")
    estimate = estimate_prompt_tokens(request)
    assert out_of_bounds(request, estimate, Usage(input_tokens=5, output_tokens=16)) is None
    assert out_of_bounds(request, estimate, Usage(input_tokens=5, output_tokens=17)) is not None
    assert clamp(request, estimate, Usage(input_tokens=5, output_tokens=500)).output_tokens == 16
