"""Request validation and deterministic reply planning (what to answer, not how to send it)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import directives, tokens


class ApiError(Exception):
    """An error answered as vLLM does: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {
        400: "BadRequestError",
        401: "AuthenticationError",
        403: "PermissionDeniedError",
        404: "NotFoundError",
        408: "RequestTimeoutError",
        409: "ConflictError",
        422: "UnprocessableEntityError",
        429: "RateLimitError",
        500: "InternalServerError",
        502: "BadGatewayError",
        503: "ServiceUnavailableError",
        504: "GatewayTimeoutError",
    }

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or self.TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def reasons(model: str) -> bool:
    return "reason" in model.lower()


def reasoning_field(model: str) -> str | None:
    if not reasons(model):
        return None
    return "reasoning" if model.endswith("-vllm") else "reasoning_content"


@dataclass
class Piece:
    """One streamed delta. ``cost`` is its share of completion tokens."""

    kind: str  # "reasoning" | "content" | "tool_start" | "tool_args"
    text: str = ""
    cost: int = 1
    tool_index: int = 0
    tool_id: str = ""
    tool_name: str = ""


@dataclass
class ChoicePlan:
    index: int
    pieces: list[Piece] = field(default_factory=list)
    finish_reason: str = "stop"
    stop_reason: str | None = None
    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    completion_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass
class Plan:
    model: str
    reasoning_field: str | None
    prompt_tokens: int
    choices: list[ChoicePlan]
    directives: directives.Directives
    logprobs: bool = False
    top_logprobs: int = 0


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return tokens.content_text(m.get("content"))
    return ""


def _int_field(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name}: Input should be a valid integer", param=name)
    if value < minimum:
        raise ApiError(400, f"{name} must be at least {minimum}, got {value}.", param=name)
    return value


def validate(body: Any, models: list[str], max_model_len: int) -> tuple[str, int]:
    """Check a chat request the way vLLM does; return (model, max_tokens budget)."""
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: Field required (a non-empty list of messages)", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages.{i}: each message must be an object with a 'role'", param="messages")
    if body.get("stream_options") is not None and not body.get("stream"):
        raise ApiError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
    if body.get("continue_final_message") and body.get("add_generation_prompt"):
        raise ApiError(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    model = body.get("model") or models[0]
    if model not in models:
        raise ApiError(404, f"The model `{model}` does not exist.")
    _int_field(body, "n", 1)
    top = _int_field(body, "top_logprobs", 0)
    if top and not body.get("logprobs"):
        raise ApiError(400, "when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
    max_tokens = _int_field(body, "max_completion_tokens", 1) or _int_field(body, "max_tokens", 1)
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in [(t.get("function") or {}).get("name") for t in body.get("tools") or []]:
            raise ApiError(400, f"Tool '{name}' has not been passed in `tools`.", param="tool_choice")
    n_in = tokens.prompt_tokens(messages)
    if n_in >= max_model_len:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{n_in} input tokens. Please reduce the length of the input messages.",
        )
    if max_tokens is not None and max_tokens > max_model_len - n_in:
        raise ApiError(
            400,
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
            f"context length is {max_model_len} tokens and your request has {n_in} input tokens "
            f"({max_tokens} > {max_model_len} - {n_in}).",
        )
    return model, (max_tokens if max_tokens is not None else max_model_len - n_in)


def thinking_enabled(body: dict[str, Any]) -> bool:
    kwargs = body.get("chat_template_kwargs") or {}
    if isinstance(kwargs, dict) and (kwargs.get("enable_thinking") is False or kwargs.get("thinking") is False):
        return False
    return body.get("reasoning_effort") != "none"


def sample_value(name: str, schema: Any) -> Any:
    schema = schema if isinstance(schema, dict) else {}
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return {}
    return "Paris" if name.lower() in ("city", "location") else "test"


def sample_arguments(parameters: Any) -> dict[str, Any]:
    props = parameters.get("properties") if isinstance(parameters, dict) else None
    if not isinstance(props, dict):
        return {}
    return {name: sample_value(name, schema) for name, schema in props.items()}


def _functions(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [t.get("function") or {} for t in body.get("tools") or [] if isinstance(t, dict)]


def choose_tools(body: dict[str, Any], d: directives.Directives) -> list[tuple[str, str]]:
    """The (name, arguments JSON) of each tool call to make; empty when answering with text."""
    fns = _functions(body)
    choice = body.get("tool_choice")
    if not fns or choice == "none" or (d.no_tool and choice != "required" and not isinstance(choice, dict)):
        return []
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        picked = [f for f in fns if f.get("name") == wanted][:1]
    elif d.tool is not None:
        picked = [f for f in fns if f.get("name") == d.tool][:1] or fns[:1]
    elif d.parallel and body.get("parallel_tool_calls") is not False:
        picked = fns[:2] if len(fns) > 1 else [fns[0], fns[0]]
    else:
        picked = fns[:1]
    out = []
    for fn in picked:
        args = d.args if d.args is not None else sample_arguments(fn.get("parameters"))
        out.append((str(fn.get("name") or ""), json.dumps(args, ensure_ascii=False)))
    return out


def continuing(body: dict[str, Any]) -> bool:
    """A continuation: the final assistant message goes on instead of a new turn starting."""
    messages = body["messages"]
    return bool(body.get("continue_final_message")) and messages[-1].get("role") == "assistant"


def _prior(body: dict[str, Any]) -> tuple[str, str]:
    """The (reasoning, content) of the final assistant message a continuation goes on from."""
    last = body["messages"][-1]
    reasoning = last.get("reasoning_content") or last.get("reasoning") or ""
    return (reasoning if isinstance(reasoning, str) else ""), tokens.content_text(last.get("content"))


def plan_content(body: dict[str, Any], d: directives.Directives) -> str:
    messages = body["messages"]
    if continuing(body):
        # Deterministic, like a model at temperature 0: the answer the turn would get, from
        # where the prefix leaves it, when the prefix is its start (a resumed stream).
        full = plan_content({**body, "messages": messages[:-1], "continue_final_message": False}, d)
        _, done = _prior(body)
        return full[len(done):] if full.startswith(done) else " and so it continues."
    if d.tokens is not None:
        return " ".join(f"tok{i}" for i in range(d.tokens))
    if messages[-1].get("role") == "tool":
        trailing: list[str] = []
        for m in reversed(messages):
            if m.get("role") != "tool":
                break
            trailing.append(tokens.content_text(m.get("content")))
        return "Tool result: " + " | ".join(reversed(trailing))
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"):
        return orjson.dumps({"answer": d.text}).decode()
    return "Hello! You said: " + d.text


def apply_stop(content: str, body: dict[str, Any]) -> tuple[str, str | None]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
    best: tuple[int, str] | None = None
    for s in stops:
        at = content.find(s) if s else -1
        if at >= 0 and (best is None or at < best[0]):
            best = (at, s)
    if best is None:
        return content, None
    end = best[0] + (len(best[1]) if body.get("include_stop_str_in_output") else 0)
    return content[:end], best[1]


def _arg_fragments(args: str) -> list[str]:
    frags = tokens.pieces(args)
    if len(frags) < 3 and len(args) >= 2:
        size = max(1, -(-len(args) // 3))
        frags = [args[i : i + size] for i in range(0, len(args), size)]
    return frags or [args]


def plan_choice(index: int, body: dict[str, Any], model: str, budget: int, d: directives.Directives) -> ChoicePlan:
    messages = body["messages"]
    plan = ChoicePlan(index=index)
    goes_on = continuing(body)
    left = budget
    truncated = False
    thought, done = _prior(body) if goes_on else ("", "")
    text = f"Let me think about this. The user wrote {len(d.text.split())} words."
    # A continuation thinks on only from thinking it was given without an answer after it.
    thinks_on = not goes_on or (thought and not done and text.startswith(thought))
    if reasons(model) and thinking_enabled(body) and thinks_on:
        text = text[len(thought):]
        kept = tokens.pieces(text)[:left]
        truncated = len(kept) < len(tokens.pieces(text))
        plan.pieces += [Piece("reasoning", t) for t in kept]
        plan.reasoning = "".join(kept)
        plan.reasoning_tokens = len(kept)
        left -= len(kept)
    calls = [] if goes_on or messages[-1].get("role") == "tool" else choose_tools(body, d)
    if calls and not truncated:
        for i, (name, args) in enumerate(calls):
            cost = max(1, tokens.count(name + args))
            if left <= 0:
                truncated = True
                break
            if cost > left:
                args, cost, truncated = "".join(tokens.pieces(args)[:left]), left, True
            call_id = "call_" + secrets.token_hex(12)
            plan.pieces.append(Piece("tool_start", "", cost, i, call_id, name))
            plan.pieces += [Piece("tool_args", f, 0, i) for f in _arg_fragments(args)]
            plan.tool_calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
            left -= cost
            if truncated:
                break
        plan.finish_reason = "length" if truncated else "tool_calls"
    elif not calls:
        content, stop_reason = apply_stop(plan_content(body, d), body)
        all_pieces = tokens.pieces(content)
        kept = all_pieces[: max(left, 0)]
        truncated = truncated or len(kept) < len(all_pieces)
        plan.pieces += [Piece("content", t) for t in kept]
        if kept or plan.reasoning is None or not truncated:
            plan.content = "".join(kept)
        plan.stop_reason = None if truncated else stop_reason
        plan.finish_reason = "length" if truncated else "stop"
    else:
        plan.finish_reason = "length"
    plan.completion_tokens = sum(p.cost for p in plan.pieces)
    return plan


def plan_request(body: dict[str, Any], model: str, budget: int) -> Plan:
    d = directives.parse(last_user_text(body["messages"]))
    n = body.get("n") or 1
    return Plan(
        model=model,
        reasoning_field=reasoning_field(model),
        prompt_tokens=tokens.prompt_tokens(body["messages"]),
        choices=[plan_choice(i, body, model, budget, d) for i in range(n)],
        directives=d,
        logprobs=bool(body.get("logprobs")),
        top_logprobs=int(body.get("top_logprobs") or 0),
    )
