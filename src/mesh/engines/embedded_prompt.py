"""The embedded engine's prompt: canonical messages through the model's own chat template.

Messages are first encoded exactly as the HTTP engines send them
(:func:`mesh.engines.openai_wire.encode_messages`), then flattened to text: the packaged
models read neither images nor tool definitions, so earlier tool calls and results are
rendered as plain text the model can still follow.
"""

from __future__ import annotations

from typing import Any, cast

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_types import ChatCompletionRequestMessage

from mesh.canonical import CanonicalRequest, ImagePart, Message, ToolResultPart
from mesh.engines.openai_wire import encode_messages
from mesh.errors import InvalidRequest


def _has_image(m: Message) -> bool:
    return any(
        isinstance(p, ImagePart) or (isinstance(p, ToolResultPart) and any(isinstance(c, ImagePart) for c in p.content))
        for p in m.parts
    )


def reject_images(request: CanonicalRequest, model: str) -> None:
    """Raise :class:`InvalidRequest` if any message carries an image: the packaged models read text."""
    if any(_has_image(m) for m in request.messages):
        raise InvalidRequest(f"model {model} does not accept images", param="messages")


def _flatten(message: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI-style message with string content and no structured tool calls."""
    out = dict(message)
    content = out.get("content")
    if isinstance(content, list):
        content = "\n".join(p.get("text", "") for p in content if p.get("type") == "text")
    text = content or ""
    calls = out.pop("tool_calls", None) or ()
    lines = [f"Tool call ({c['id']}): {c['function']['name']}({c['function']['arguments']})" for c in calls]
    out["content"] = "\n".join([text, *lines] if text else lines)
    return out


def _tool_as_user(message: dict[str, Any]) -> dict[str, Any]:
    if message["role"] != "tool":
        return message
    return {"role": "user", "content": f"Tool result ({message.get('tool_call_id', '')}): {message['content']}"}


def _apply(formatter: Jinja2ChatFormatter, messages: list[dict[str, Any]]) -> str:
    # The messages are OpenAI-style dicts, the shape llama_types' TypedDicts describe.
    return formatter(messages=cast("list[ChatCompletionRequestMessage]", messages)).prompt


class PromptRenderer:
    """Renders a :class:`CanonicalRequest` into the model's prompt text.

    ``template`` is the GGUF's ``tokenizer.chat_template``; ``bos_token``/``eos_token`` are
    the vocabulary's texts for those tokens. Raises :class:`InvalidRequest` for images and
    for messages the template refuses.
    """

    def __init__(self, template: str, *, bos_token: str, eos_token: str, model: str) -> None:
        self._model = model
        self._open = Jinja2ChatFormatter(template, eos_token=eos_token, bos_token=bos_token)
        self._closed = Jinja2ChatFormatter(
            template, eos_token=eos_token, bos_token=bos_token, add_generation_prompt=False
        )

    def render(self, request: CanonicalRequest) -> str:
        """The prompt, ending with the assistant's turn opened (or, for ``continue_final``,
        inside the final assistant message, so the model continues it)."""
        reject_images(request, self._model)
        messages = [_flatten(m) for m in encode_messages(request.messages, "reasoning_content")]
        prefix: str | None = None
        if request.continue_final and messages and messages[-1]["role"] == "assistant":
            if messages[-1]["content"]:
                prefix = messages[-1]["content"]
            else:
                messages.pop()  # an empty prefill is just a new assistant turn
        prompt = self._render(messages, generation_prompt=prefix is None)
        return prompt if prefix is None else self._cut_after(prompt, prefix)

    def _render(self, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
        formatter = self._open if generation_prompt else self._closed
        try:
            return _apply(formatter, messages)
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            if not any(m["role"] == "tool" for m in messages):
                raise InvalidRequest(f"model {self._model}'s chat template rejected the messages: {exc}") from None
        # The template knows no tool role: results become user turns.
        try:
            return _apply(formatter, [_tool_as_user(m) for m in messages])
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            raise InvalidRequest(f"model {self._model}'s chat template rejected the messages: {exc}") from None

    def _cut_after(self, prompt: str, prefix: str) -> str:
        """Drop the end-of-turn the template put after the final assistant message."""
        for needle in (prefix, prefix.rstrip()):
            at = prompt.rfind(needle)
            if needle and at >= 0:
                return prompt[: at + len(needle)]
        raise InvalidRequest(f"model {self._model}'s chat template cannot continue the final assistant message")
