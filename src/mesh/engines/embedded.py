"""The embedded engine: a small chat model run in-process on CPU by llama.cpp.

One worker thread owns the model (a ``Llama`` object is not thread-safe) and serves
requests one at a time, in arrival order: a single-thread executor is the queue. Tokens
cross to the event loop through ``loop.call_soon_threadsafe`` onto a per-request
``asyncio.Queue``, so the loop never waits on llama.cpp. Closing the event iterator early
(a client disconnect) sets the request's cancel flag; the worker stops before its next
token and moves on to the next request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from mesh.canonical import CanonicalRequest, Event, Message, Usage
from mesh.config import EmbeddedEngineConfig
from mesh.engines.embedded_model import DEFAULT_MODEL_CACHE
from mesh.engines.embedded_prompt import reject_images
from mesh.engines.embedded_runtime import Job, LlamaRuntime
from mesh.errors import EngineError, EngineUnavailable, InvalidRequest, MeshError

T = TypeVar("T")


class EmbeddedEngine:
    """A model served in-process. See :class:`mesh.engines.base.Engine`.

    The weights load on first use or on :meth:`start`. ``cache_dir`` is where joined
    multi-part weights are written (``./.mesh/models`` by default).
    """

    def __init__(
        self, config: EmbeddedEngineConfig, public_model: str, *, cache_dir: Path = DEFAULT_MODEL_CACHE
    ) -> None:
        self.config = config
        self.model = public_model
        self.name = config.name or f"embedded-{config.model}"
        self.continues_final = True  # its prompt builder continues a final assistant message
        self._runtime = LlamaRuntime(config, public_model, self.name, cache_dir)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mesh-{self.name}")
        self._jobs: set[Job] = set()
        self._pending: set[asyncio.Future[Any]] = set()
        self._closed = False

    @property
    def tokens_generated(self) -> int:
        """Tokens sampled since the engine started, over all requests (cancelled ones too)."""
        return self._runtime.tokens_generated

    def _submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        if self._closed:
            raise EngineUnavailable(f"Engine {self.name} is closed.")
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    async def start(self) -> None:
        """Load the model now, in the worker thread. Raises EngineError if it cannot load."""
        await self._submit(self._runtime.load)

    async def stream(self, request: CanonicalRequest) -> AsyncGenerator[Event, None]:
        """Generate: ``TextDelta``\\ s, then ``Finish`` and ``Usage``.

        Raises InvalidRequest (images, ``n`` > 1, a rejected template or JSON schema),
        ContextLengthExceeded (prompt longer than the context) or EngineError (the model
        cannot load) before the first event; EngineError later only if llama.cpp fails
        mid-generation, or EngineUnavailable if the engine closes meanwhile. Waits its turn
        behind earlier requests. Closing the iterator early stops generation before the
        next token; no Usage follows then (see :attr:`tokens_generated`).
        """
        if self._closed:
            raise EngineUnavailable(f"Engine {self.name} is closed.")
        if request.n != 1:
            raise InvalidRequest(f"model {self.model} generates one choice per request", param="n")
        reject_images(request, self.model)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | MeshError] = asyncio.Queue()

        def emit(item: Event | MeshError) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        job = Job(request, emit)
        self._jobs.add(job)
        try:
            self._submit(lambda: self._runtime.run(job))
            while True:
                item = await queue.get()
                if isinstance(item, MeshError):
                    raise item
                yield item
                if isinstance(item, Usage):
                    return
        finally:
            job.cancelled.set()
            self._jobs.discard(job)

    async def health(self) -> bool:
        """True unless the engine is closed or its model failed to load."""
        return not self._closed and self._runtime.load_error is None

    async def count_tokens(self, messages: Sequence[Message], request: CanonicalRequest) -> int | None:
        """The exact prompt length for ``messages`` with the model's template and tokenizer.

        Runs on the worker, so it waits behind requests already queued. Raises
        InvalidRequest as :meth:`stream` would; None if the model cannot load.
        """
        counted = replace(request, messages=tuple(messages))
        try:
            tokens = await self._submit(lambda: self._runtime.prompt_tokens(counted))
        except EngineError:
            return None
        return len(tokens)

    async def aclose(self) -> None:
        """Cancel every request, free the model and join the worker thread."""
        if self._closed:
            return
        for job in self._jobs:
            job.cancelled.set()
        # The worker serves in order, so this runs after every job already queued.
        closing = self._submit(self._runtime.close)
        self._closed = True
        try:
            await closing
            if self._pending:
                await asyncio.gather(*self._pending, return_exceptions=True)
        finally:
            # The worker is idle once the close job is done, so joining it takes no time.
            self._executor.shutdown(wait=closing.done())
