"""How far a worker's engine may overstate a prompt before Mesh calls it a liar: never on an
honest count (measured with the embedded model's tokenizer and chat template), and not
by a multiple of the real count either."""

from __future__ import annotations

import json

import llama_cpp
import pytest

from billing.test_estimate import TEXTS
from mesh.billing.estimate import estimate_prompt_tokens
from mesh.canonical import CanonicalRequest, ImagePart, Message, TextPart, Tool, Usage
from mesh.config import EmbeddedEngineConfig
from mesh.engines.embedded_model import resolve_gguf
from mesh.workers.bounds import IMAGE_TOKENS_MOST, clamp, out_of_bounds

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
    markers around every message, the tools pretty-printed four spaces deep."""
    text = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    if request.tools:
        text += "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n"
        for t in request.tools:
            text += json.dumps({"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters}}, indent=4) + "\n"
        text += "Return each call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n"
    for m in request.messages:
        body = "".join(p.text for p in m.parts if isinstance(p, TextPart))
        text += f"<|im_start|>{m.role}\n{body}<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    return len(vocab.tokenize(text.encode(), add_bos=True, special=True))


def chat(*texts: str, tools: tuple[Tool, ...] = (), images: int = 0) -> CanonicalRequest:
    messages = tuple(Message("user" if i % 2 == 0 else "assistant", (TextPart(t),)) for i, t in enumerate(texts))
    if images:
        picture = ImagePart(url="data:image/png;base64,iVBORw0KGgo=")
        messages += (Message("user", (TextPart("What is in these?"),) + (picture,) * images),)
    return CanonicalRequest(model="m", messages=messages, tools=tools, max_tokens=16)


HONEST = {
    **{name: chat(text) for name, text in TEXTS.items()},
    "a short question": chat("Hi"),
    "a long conversation": chat(*(["ok", "Sure, here it is: 1 2 3."] * 60)),
    "tools": chat("Read main.py", tools=TOOLS),
    "tools, short": chat("ls", tools=TOOLS[1:]),
}


@pytest.mark.parametrize("name", list(HONEST))
def test_an_honest_prompt_count_is_within_bounds(vocab: llama_cpp.Llama, name: str) -> None:
    request = HONEST[name]
    real = rendered_tokens(vocab, request)
    usage = Usage(input_tokens=real, output_tokens=16)
    assert out_of_bounds(request, estimate_prompt_tokens(request), usage) is None, (name, real)


def test_images_may_take_what_a_large_vision_encoder_takes() -> None:
    request = chat("Compare them.", images=3)
    estimate = estimate_prompt_tokens(request)
    honest = Usage(input_tokens=3 * IMAGE_TOKENS_MOST + 40, output_tokens=16)
    assert out_of_bounds(request, estimate, honest) is None
    assert out_of_bounds(request, estimate, Usage(input_tokens=4 * IMAGE_TOKENS_MOST, output_tokens=16)) is not None


@pytest.mark.parametrize("name", ["english", "code", "a long conversation"])
def test_a_prompt_reported_at_six_times_its_real_count_is_out_of_bounds(vocab: llama_cpp.Llama, name: str) -> None:
    """Without a tokenizer Mesh's estimate is about 3 times an English prompt (2 for code),
    so the bound cannot be tight; it was 12 times before (4 times the estimate)."""
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
