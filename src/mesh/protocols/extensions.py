"""What of a request's non-standard fields may reach an engine: one rule for all three protocols.

A protocol keeps, of the unknown top-level fields of a body, only those named in
:data:`KNOWN_EXTENSIONS` (vLLM's and SGLang's request extensions) and Mesh's own
``models`` fallback list; every other unknown field is logged and dropped at parse time.
Then, once the model is known, :func:`allow_extensions` lets through only the extensions
the operator enabled for that model (``models[].engine_extensions``) and refuses the
others with a 400: a client that sends ``guided_json`` or ``priority`` expects it to act,
so silently ignoring it would be worse than saying no.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from mesh.canonical import CanonicalRequest
from mesh.errors import InvalidRequest

# Mesh's own extension (OpenRouter's fallback list), read by the pipeline, never forwarded.
MESH_FIELDS = frozenset({"models"})

# Request fields vLLM or SGLang act on beyond the OpenAI schema. A model may enable any of
# them; none is forwarded unless enabled. Several are dangerous to expose to tenants:
# chat_template (a request-supplied Jinja template), logits_processors (class loading),
# priority (jumping the queue), vllm_xargs / kv_transfer_params (engine internals) and the
# guided_* grammars (compilation cost).
KNOWN_EXTENSIONS = frozenset({
    "min_p", "repetition_penalty", "length_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
    "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "prompt_logprobs", "allowed_token_ids", "bad_words", "use_beam_search",
    "best_of", "echo", "add_generation_prompt", "continue_final_message", "add_special_tokens",
    "documents", "chat_template", "chat_template_kwargs", "mm_processor_kwargs",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "structured_outputs", "regex", "ebnf", "json_schema",
    "priority", "request_id", "logits_processors", "custom_logit_processor", "vllm_xargs",
    "kv_transfer_params", "cache_salt", "return_tokens_as_token_ids", "return_token_ids",
    "lora_path", "return_hidden_states", "no_stop_trim", "separate_reasoning", "stream_reasoning",
    "session_params", "rid", "thinking_token_budget",
})

# Inside chat_template_kwargs: keys that would replace the template itself. (vLLM merges
# chat_template_kwargs over its own template arguments, so a known extension named there,
# e.g. continue_final_message, acts as if sent at the top level: it needs enabling too.)
_TEMPLATE_KEYS = frozenset({"chat_template", "tokenize", "tools", "documents"})


def keep_known(extra: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split a body's unknown top-level fields into (kept, dropped names)."""
    kept = {k: v for k, v in extra.items() if k in KNOWN_EXTENSIONS or k in MESH_FIELDS}
    return kept, sorted(k for k in extra if k not in kept)


def allow_extensions(request: CanonicalRequest, allowed: Iterable[str]) -> CanonicalRequest:
    """Keep the extensions ``allowed`` for the model; refuse any other with :class:`InvalidRequest`.

    ``chat_template_kwargs`` must be an object of plain values and may not carry a template.
    """
    if not request.extra:
        return request
    permitted = set(allowed)
    out: dict[str, Any] = {}
    for key, value in request.extra.items():
        if key in MESH_FIELDS:
            continue
        if key not in permitted:
            raise InvalidRequest(
                f"The parameter '{key}' is not enabled for the model '{request.model}'.",
                param=key, code="unsupported_parameter",
            )
        if key == "chat_template_kwargs":
            value = _template_kwargs(value, permitted)
        out[key] = value
    return replace(request, extra=out)


def _template_kwargs(value: Any, permitted: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest("'chat_template_kwargs' must be an object.", param="chat_template_kwargs")
    for k, v in value.items():
        smuggled = k in KNOWN_EXTENSIONS and k not in permitted
        if k in _TEMPLATE_KEYS or smuggled or not isinstance(v, str | int | float | bool | None):
            raise InvalidRequest(
                f"'chat_template_kwargs.{k}' is not allowed; only plain values the template reads are.",
                param=f"chat_template_kwargs.{k}",
            )
    return dict(value)
