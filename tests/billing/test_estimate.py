"""The prompt estimate for holds leans high on every script, measured with the embedded
model's own tokenizer (byte-level BPE, like the models Mesh serves)."""

from __future__ import annotations

import llama_cpp
import pytest

from mesh.billing.estimate import estimate_prompt_tokens, estimate_text_tokens
from mesh.canonical import CanonicalRequest, Message, TextPart
from mesh.config import EmbeddedEngineConfig
from mesh.engines.embedded_model import resolve_gguf

TEXTS = {
    "digits separated by spaces": " ".join(str(i % 10) for i in range(2000)),
    "digits": "".join(str(i * 7919 % 10) for i in range(2000)),
    "chinese": "我们今天去公园散步\uff0c天气很好\u3002" * 100,
    "japanese": "こんにちは世界、今日はいい天気ですね。" * 100,
    "korean": "안녕하세요 세계 오늘 날씨가 좋네요. " * 100,
    "punctuation": "!@#$%^&*()_+-=[]{};':\",./<>?`~|\\" * 60,
    "spaced punctuation": " ! ? . , ; : ( ) [ ] { }" * 100,
    "emoji": "😀🎉🚀👍🔥" * 200,
    "cyrillic": "Привет мир, сегодня хорошая погода. " * 100,
    "arabic": "مرحبا بالعالم اليوم الطقس جميل. " * 100,
    "devanagari": "नमस्ते दुनिया आज मौसम अच्छा है। " * 100,
    "thai": "สวัสดีชาวโลก วันนี้อากาศดี " * 100,
    "hex": "a3f9 0b7c 1d2e 4f5a " * 200,
    "base64": "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODkrLw==" * 50,
    "letters between symbols": "a.b,c;d:e!f?g" * 200,
    "code": "def f(x):\n    return [i*i for i in range(x) if i % 2 == 0]\n" * 50,
    "english": "The quick brown fox jumps over the lazy dog. " * 100,
}


@pytest.fixture(scope="module")
def vocab() -> llama_cpp.Llama:
    return llama_cpp.Llama(str(resolve_gguf(EmbeddedEngineConfig(type="embedded"))), vocab_only=True, verbose=False)


@pytest.mark.parametrize("name", list(TEXTS))
def test_estimate_is_at_least_the_real_token_count(vocab: llama_cpp.Llama, name: str) -> None:
    text = TEXTS[name]
    real = len(vocab.tokenize(text.encode(), add_bos=False, special=False))
    estimate = estimate_text_tokens(text)
    assert estimate >= real, f"{name}: estimated {estimate}, the tokenizer counts {real}"
    assert estimate <= 5 * real, f"{name}: estimated {estimate}, far above the real {real}"


def test_prompt_estimate_counts_every_message() -> None:
    one = CanonicalRequest(model="m", messages=(Message("user", (TextPart("1 2 3 4"),)),))
    two = CanonicalRequest(model="m", messages=one.messages * 2)
    assert estimate_prompt_tokens(one) >= estimate_text_tokens("1 2 3 4") == 7
    assert estimate_prompt_tokens(two) > estimate_prompt_tokens(one)
