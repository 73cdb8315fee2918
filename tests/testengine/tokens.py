"""The engine's deterministic toy tokenizer and prompt accounting.

A token is a maximal run matching ``\\s*\\S+`` (a word with its leading whitespace), so a text
is the concatenation of its tokens (trailing whitespace is folded into the last piece).
"""

from __future__ import annotations

import re
import zlib
from typing import Any

TOKEN_RE = re.compile(r"\s*\S+")
MESSAGE_OVERHEAD = 4  # role / separator tokens of the chat template, per message
PROMPT_OVERHEAD = 2  # BOS + generation prompt
_TEMPLATE_IDS = (1, 2, 3, 4)
_PROMPT_IDS = (5, 6)


def pieces(text: str) -> list[str]:
    """Split ``text`` losslessly into token strings (one per streamed chunk)."""
    toks = TOKEN_RE.findall(text)
    rest = text[sum(len(t) for t in toks) :]
    if rest:
        if toks:
            toks[-1] += rest
        else:
            toks.append(rest)
    return toks


def count(text: str) -> int:
    return len(TOKEN_RE.findall(text))


def token_id(tok: str) -> int:
    return 1000 + zlib.crc32(tok.encode()) % 150_000


def content_text(content: Any) -> str:
    """Text of an OpenAI message ``content``: a string or a list of parts (text parts joined by newlines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "\n".join(texts)
    return str(content)


def tool_calls_text(message: dict[str, Any]) -> str:
    out: list[str] = []
    for call in message.get("tool_calls") or []:
        if not isinstance(call, dict):
            continue
        fn = call.get("function") or {}
        name = fn.get("name") or ""
        args = fn.get("arguments") or ""
        if not isinstance(args, str):
            args = str(args)
        out.append(f"{name}{args}")
    return " ".join(out)


def message_text(message: dict[str, Any]) -> str:
    """Everything in a message that the chat template would turn into tokens."""
    parts = [content_text(message.get("content"))]
    parts.append(tool_calls_text(message))
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str):
            parts.append(value)
    return " ".join(p for p in parts if p)


def message_tokens(message: dict[str, Any]) -> int:
    return MESSAGE_OVERHEAD + count(message_text(message))


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(message_tokens(m) for m in messages) + PROMPT_OVERHEAD


def prompt_token_ids(messages: list[dict[str, Any]]) -> list[int]:
    ids: list[int] = []
    for m in messages:
        ids.extend(_TEMPLATE_IDS)
        ids.extend(token_id(t) for t in TOKEN_RE.findall(message_text(m)))
    ids.extend(_PROMPT_IDS)
    return ids


def text_token_ids(text: str) -> list[int]:
    return [token_id(t) for t in TOKEN_RE.findall(text)]
