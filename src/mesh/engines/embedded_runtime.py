"""The llama.cpp side of the embedded engine: load, tokenize, generate.

A ``Llama`` object is not thread-safe, so :class:`LlamaRuntime` is used from exactly one
thread, the engine's worker. It never touches the event loop: a :class:`Job` carries an
``emit`` callback that hands events over, and a ``cancelled`` flag checked before every
token.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from mesh.canonical import CanonicalRequest, Event, Finish, FinishReason, ResponseFormat, TextDelta, Usage
from mesh.config import EmbeddedEngineConfig
from mesh.engines.embedded_model import resolve_gguf
from mesh.engines.embedded_prompt import PromptRenderer
from mesh.engines.embedded_text import TextStream
from mesh.errors import ContextLengthExceeded, EngineError, EngineUnavailable, InvalidRequest, MeshError

# Sampling defaults when the request names none: llama.cpp's own.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
_SEED_MODULUS = 2**32

Emit = Callable[[Event | MeshError], None]


@dataclass(eq=False, slots=True)
class Job:
    """One generation request on its way through the worker.

    ``emit`` receives every event, then either ``Usage`` or one :class:`MeshError` last.
    ``generated`` counts sampled tokens so far (readable from any thread).
    """

    request: CanonicalRequest
    emit: Emit
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0


@contextlib.contextmanager
def _map_errors(name: str) -> Iterator[None]:
    """Translate llama.cpp's exceptions into the EngineError tree, at the adapter edge."""
    try:
        yield
    except MeshError:
        raise
    except Exception as exc:
        raise EngineError(f"Embedded engine {name} failed: {type(exc).__name__}: {exc}") from exc


def reused_prefix(cached: Sequence[int], prompt: Sequence[int], *, logits_fresh: bool) -> int:
    """How many prompt tokens ``Llama.generate`` (0.3.36) keeps from its KV cache.

    It keeps the longest common prefix with what the cache holds, minus one token when
    the prompt is entirely cached (the last one is decoded again to get fresh logits),
    unless the cache holds exactly the prompt with logits from a live decode.
    """
    if not cached:
        return 0
    common = 0
    for a, b in zip(cached, prompt, strict=False):
        if a != b:
            break
        common += 1
    if common < len(prompt):
        return common
    if len(cached) == len(prompt) and logits_fresh:
        return common
    return common - 1


def _grammar(fmt: ResponseFormat | None) -> Any:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and fmt.schema:
        try:
            return LlamaGrammar.from_json_schema(json.dumps(fmt.schema), verbose=False)
        except Exception as exc:  # the converter raises plain Exceptions for unsupported schemas
            raise InvalidRequest(f"unsupported JSON schema: {exc}", param="response_format") from None
    return LlamaGrammar.from_string(JSON_GBNF, verbose=False)


class LlamaRuntime:
    """The loaded model. Every method must run on the engine's single worker thread."""

    def __init__(self, config: EmbeddedEngineConfig, public_model: str, name: str, cache_dir: Path) -> None:
        self._config = config
        self._public_model = public_model
        self._name = name
        self._cache_dir = cache_dir
        self._llm: Any = None
        self._vocab: Any = None
        self._prompt: PromptRenderer | None = None
        self.load_error: MeshError | None = None  # why the last load failed, if it did
        self.tokens_generated = 0  # over all jobs, cancelled ones included

    def load(self) -> None:
        """Load the weights (about a second for SmolLM2); a no-op once loaded."""
        if self._llm is not None:
            return
        try:
            self._load()
        except MeshError as exc:
            self.load_error = exc
            raise
        self.load_error = None

    def _load(self) -> None:
        with _map_errors(self._name):
            path = resolve_gguf(self._config, self._cache_dir)
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=self._config.context_length,
                n_threads=self._config.threads,
                n_threads_batch=self._config.threads,
                n_batch=self._config.batch_size,
                verbose=False,
            )
            template = llm.metadata.get("tokenizer.chat_template")
            if not template:
                llm.close()
                raise EngineUnavailable(f"{path.name} carries no chat template.")
            self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
            self._prompt = PromptRenderer(
                template,
                bos_token=self._token_text(llm, llm.token_bos()),
                eos_token=self._token_text(llm, llm.token_eos()),
                model=self._public_model,
            )
            self._llm = llm

    @staticmethod
    def _token_text(llm: Any, token: int) -> str:
        if token < 0:
            return ""
        text: str = llm.detokenize([token], special=True).decode("utf-8", errors="replace")
        return text

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def prompt_tokens(self, request: CanonicalRequest) -> list[int]:
        """The request's prompt, rendered by the chat template and tokenized."""
        self.load()
        assert self._prompt is not None
        prompt = self._prompt.render(request)
        with _map_errors(self._name):
            llm = self._llm
            tokens: list[int] = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            bos = llm.token_bos()
            # Templates that write the BOS text themselves have it tokenized already.
            if llama_cpp.llama_vocab_get_add_bos(self._vocab) and bos >= 0 and tokens[:1] != [bos]:
                tokens.insert(0, bos)
        return tokens

    def run(self, job: Job) -> None:
        """Serve one job to completion or cancellation. Never raises: errors are emitted."""
        try:
            self._check_cancelled(job)
            with _map_errors(self._name):
                self._generate(job)
        except MeshError as exc:
            job.emit(exc)

    @staticmethod
    def _check_cancelled(job: Job) -> None:
        if job.cancelled.is_set():
            raise EngineUnavailable("The generation was cancelled.")

    def _generate(self, job: Job) -> None:
        req = job.request
        tokens = self.prompt_tokens(req)
        llm = self._llm
        n_ctx: int = llm.n_ctx()
        if len(tokens) >= n_ctx:
            raise ContextLengthExceeded(
                f"The prompt has {len(tokens)} tokens; model {self._public_model} reads at most {n_ctx - 1}.",
                param="messages",
            )
        room = n_ctx - len(tokens)
        limit = room if req.max_tokens is None else min(req.max_tokens, room)
        cached = reused_prefix(
            llm.input_ids[: llm.n_tokens].tolist(),
            tokens,
            # Private in 0.3.36: False when the last decode's logits are still current.
            logits_fresh=not getattr(llm, "_requires_eval", True),
        )
        s = req.sampling
        llm.set_seed(s.seed % _SEED_MODULUS if s.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
        text = TextStream(req.stop)
        reason: FinishReason = "length"
        self._check_cancelled(job)
        if limit > 0:
            reason = self._sample(job, tokens, limit, text)
        tail = text.flush()
        if tail:
            job.emit(TextDelta(tail))
        job.emit(Finish(reason, stop_sequence=text.stop_sequence))
        job.emit(Usage(input_tokens=len(tokens), output_tokens=job.generated, cached_tokens=cached))

    def _sample(self, job: Job, tokens: list[int], limit: int, text: TextStream) -> FinishReason:
        req = job.request
        s = req.sampling
        llm = self._llm
        temperature = DEFAULT_TEMPERATURE if s.temperature is None else max(s.temperature, 0.0)
        generator = llm.generate(
            tokens,
            temp=temperature,
            top_p=DEFAULT_TOP_P if s.top_p is None else s.top_p,
            top_k=DEFAULT_TOP_K if s.top_k is None else s.top_k,
            min_p=DEFAULT_MIN_P,
            repeat_penalty=1.0,
            frequency_penalty=s.frequency_penalty or 0.0,
            presence_penalty=s.presence_penalty or 0.0,
            reset=True,  # with reset, generate() keeps the longest cached prefix
            grammar=_grammar(req.response_format),
        )
        try:
            for token in generator:
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    return "stop"
                job.generated += 1
                self.tokens_generated += 1
                piece = text.feed(llm.detokenize([token]))
                if piece:
                    job.emit(TextDelta(piece))
                if text.stop_sequence is not None:
                    return "stop"
                if job.generated >= limit:
                    return "length"
                self._check_cancelled(job)
        finally:
            generator.close()
        return "stop"  # pragma: no cover  # generate() only ends through a stopping criterion
