"""The relay path's decoder (OpenAI Chat in, an OpenAI-compatible engine out): each engine
chunk looked at only as far as metering and the client need, and handed on as it is
(:class:`mesh.canonical.Relayed`) instead of being decoded into canonical events, which
:class:`mesh.engines.openai_wire.ChunkDecoder` does for every other protocol.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from mesh.canonical import Event, Relayed, openai_logprobs
from mesh.engines.openai_wire import (
    _FINISH,
    _MALFORMED,
    DONE,
    ChunkDecoder,
    _malformed,
    _text,
    decode_usage,
    mid_stream_error,
)
from mesh.errors import EngineError

# Finish reasons a client of the OpenAI API knows; the rest map as the canonical path maps them.
_OPENAI_FINISH = frozenset(("stop", "length", "tool_calls", "content_filter"))


def _renote(relayed: Relayed) -> None:
    """The notes of ``relayed`` made again from the chunks it keeps, after
    :meth:`RelayDecoder._inspect` noted part of a chunk it then refused (rare: an engine's
    malformed chunk), so that nothing of that chunk counts as delivered."""
    relayed.texts, relayed.reasoning, relayed.indexes, relayed.active = [], [], set(), set()
    relayed.calls = 0
    relayed.finished = relayed.reasoning_fields = relayed.tools = relayed.logprobs = False
    for chunk in relayed.chunks:
        for choice in chunk["choices"]:
            idx = int(choice.get("index") or 0)
            relayed.indexes.add(idx)
            delta = choice.get("delta")
            if delta:
                if "reasoning_content" in delta or "reasoning" in delta:
                    relayed.reasoning_fields = True
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                    if reasoning:
                        relayed.reasoning.append(reasoning)
                        relayed.active.add(idx)
                content = delta.get("content")
                if content:
                    relayed.texts.append(content)
                    relayed.active.add(idx)
                    relayed.logprobs = relayed.logprobs or bool(choice.get("logprobs"))
                calls = delta.get("tool_calls")
                if calls:
                    relayed.tools = True
                    relayed.active.add(idx)
                    relayed.calls += sum(1 for call in calls if "id" in call)
            if choice.get("finish_reason"):
                relayed.finished = True
                relayed.active.add(idx)


def _plain_text(choices: Any) -> str | None:
    """The text of the common chunk's ``choices``: one choice, index 0, a delta of text (and
    maybe the role) and nothing else, most chunks of every answer. None for any other shape,
    which takes :meth:`RelayDecoder._walk`."""
    if type(choices) is not list or len(choices) != 1:
        return None
    choice = choices[0]
    if type(choice) is not dict:
        return None
    delta = choice.get("delta")
    if (
        type(delta) is dict
        and len(delta) <= 2
        and not choice.get("index")
        and not choice.get("finish_reason")
        and not choice.get("logprobs")
        and (len(delta) == 1 or "role" in delta)
        and type(content := delta.get("content")) is str
    ):
        return content
    return None


class RelayDecoder(ChunkDecoder):
    """The relay path's decoder: looks at each chunk only as far as metering and the
    client need, and hands it on as one :class:`Relayed` (plus a :class:`Usage` when the
    chunk reported one) instead of decoding it into events.

    What it changes in the chunk: usage is taken out (Mesh writes the client's own, billed,
    usage chunk), tool calls are re-indexed and given ids exactly as :class:`ChunkDecoder`
    does, and finish reasons outside OpenAI's set are mapped. Engine errors and aborts raise
    as they do there. A tool call's first delta alone carries its ``id`` (what a resume's
    tracker, ``routing.resume.Delivered``, counts calls by).
    """

    first_finish: str | None = None  # choice 0's finish reason, once it came

    def decode(self, chunk: dict[str, Any]) -> Iterator[Event]:
        """One chunk: its :class:`Relayed` (when it carries choices), then its usage."""
        relayed = Relayed([])
        keep, deltas, answers = self._inspect(chunk, relayed)
        usage = chunk.pop("usage", None)
        if keep:
            relayed.chunks.append(chunk)
            relayed.deltas, relayed.answers, relayed.finish = deltas, answers, self.first_finish
            yield relayed
        if isinstance(usage, dict):
            self.usage = decode_usage(usage)
            yield self.usage

    def decode_batch(self, payloads: list[bytes]) -> tuple[list[Event], bool]:
        """The chunks of one read as one :class:`Relayed` (one write to the client, as a
        bare proxy writes what it read), then the newest usage among them.

        The common chunk (:func:`_plain_text`) is metered here, its counts noted once per
        read: this loop runs for every chunk of every relayed answer. Any other chunk takes
        :meth:`_inspect`, which meters it the same way."""
        relayed = Relayed([])
        chunks = relayed.chunks
        texts = relayed.texts
        deltas = 0
        plain = 0  # the common chunks' deltas (output_deltas counts them once, at the end)
        opened = False  # a common chunk came: choice 0 is among the indexes
        answers = False
        usage: Any = None
        done = False
        loads = orjson.loads
        for payload in payloads:
            if payload == DONE:
                done = True
                break
            try:
                chunk = loads(payload)
            except orjson.JSONDecodeError:
                if not chunks and usage is None:
                    raise
                self.failure = EngineError("The engine sent malformed JSON.")
                break
            if type(chunk) is dict and not chunk.get("error"):
                choices = chunk.get("choices")
                content = _plain_text(choices)
                if content is not None:
                    opened = True
                    if content:
                        texts.append(content)
                        plain += 1
                    reported = chunk.pop("usage", None)
                    if type(reported) is dict:
                        usage = reported  # cumulative: only the newest of the read counts
                    chunks.append(chunk)
                    continue
                if not choices:  # usage alone (or nothing): nothing to send
                    reported = chunk.pop("usage", None)
                    if type(reported) is dict:
                        usage = reported
                    continue
            finish = self.first_finish
            try:
                keep, n, said = self._inspect(chunk, relayed)
            except (EngineError, *_MALFORMED) as exc:
                _renote(relayed)  # nothing of the bad chunk counts as delivered
                self.first_finish = finish  # nor its finish reason
                err = exc if isinstance(exc, EngineError) else _malformed()
                if not chunks:
                    raise err from None
                self.failure = err  # what came before it in this read is delivered first
                break
            reported = chunk.pop("usage", None)
            if isinstance(reported, dict):
                usage = reported  # cumulative: only the newest of the read counts
            if keep:
                chunks.append(chunk)
                deltas += n
                answers = answers or said
        events: list[Event] = []
        if chunks:
            if opened:
                relayed.indexes.add(0)
                if plain:
                    relayed.active.add(0)
                    self.output_deltas += plain
                    deltas += plain
                    answers = True
            relayed.deltas, relayed.answers, relayed.finish = deltas, answers, self.first_finish
            events.append(relayed)
        if usage is not None:
            self.usage = decode_usage(usage)
            events.append(self.usage)
        return events, done

    def _inspect(self, chunk: dict[str, Any], into: Relayed) -> tuple[bool, int, bool]:
        """Meter one chunk and fix it up in place: (has choices to send, deltas, answers);
        what it delivers is noted on ``into`` (see :class:`Relayed`). Its usage is the
        caller's to take (decoded once per read, not once per chunk)."""
        if chunk.get("error"):
            raise mid_stream_error(chunk["error"])
        choices = chunk.get("choices")
        if not choices:
            return False, 0, False
        content = _plain_text(choices)
        if content is not None:
            into.indexes.add(0)
            if not content:
                return True, 0, False
            into.texts.append(content)
            into.active.add(0)
            self.output_deltas += 1
            return True, 1, True
        return self._walk(choices, into)

    def _walk(self, choices: Any, into: Relayed) -> tuple[bool, int, bool]:
        """:meth:`_inspect` of any chunk's choices, the common shape included."""
        deltas = 0
        answers = False
        for choice in choices:
            idx = int(choice.get("index") or 0)
            into.indexes.add(idx)
            delta = choice.get("delta")
            if not delta and choice.get("message"):
                # Content under "message", which the canonical decoder reads too: moved to
                # "delta", where everything after this decoder (the resume tracker, the fold,
                # the client) reads a chunk's content.
                delta = choice["delta"] = choice.pop("message")
            if delta:
                if "reasoning_content" in delta or "reasoning" in delta:
                    into.reasoning_fields = True
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                    if reasoning:
                        into.reasoning.append(_text(reasoning))
                        into.active.add(idx)
                        self.reasoning_deltas += 1
                        deltas += 1
                content = delta.get("content")
                if content:
                    into.texts.append(_text(content))
                    into.active.add(idx)
                    deltas += 1
                    if choice.get("logprobs"):
                        openai_logprobs(choice["logprobs"])  # what a fold or a client would trip on
                        into.logprobs = True
                calls = delta.get("tool_calls")
                if calls:
                    answers = True
                    into.active.add(idx)
                    into.tools = True
                    deltas += self._relay_calls(idx, calls, into)
            reason = choice.get("finish_reason")
            if reason:
                if reason == "abort":
                    raise EngineError("The engine aborted the request.")
                if reason not in _OPENAI_FINISH:
                    choice["finish_reason"] = _FINISH.get(reason, "stop")
                if not idx:
                    self.first_finish = choice["finish_reason"]
                self.finished.add(int(idx))
                into.active.add(idx)
                into.finished = True
                answers = True
        self.output_deltas += deltas
        return True, deltas, answers or deltas > 0

    def _relay_calls(self, choice: int, calls: list[dict[str, Any]], into: Relayed) -> int:
        """Re-index (and name) tool calls in place as ChunkDecoder does; returns argument deltas."""
        deltas = 0
        for position, call in enumerate(calls):
            engine_index = call.get("index")
            key = (choice, int(engine_index) if engine_index is not None else position)
            fn = call.get("function") or {}
            ours = self._calls.get(key)
            if ours is None or (call.get("id") and engine_index is None):
                ours = self._next_call.get(choice, 0)
                self._next_call[choice] = ours + 1
                self._calls[key] = ours
                call["id"] = _text(call.get("id") or f"call_{choice}_{ours}")
                call["type"] = "function"
                into.calls += 1
                _text(fn.get("name") or "")
            else:  # as the canonical path writes it: only the first delta names the call
                call.pop("id", None)
                call.pop("type", None)
            call["index"] = ours
            if fn.get("arguments"):
                _text(fn["arguments"])
                deltas += 1
        return deltas
