"""In-process fakes at the pipeline's seams: engine, ledger, principal, clock.

For fast unit tests of the request lifecycle (``tests/test_pipeline.py``,
``tests/routing/test_router.py``); the real processes are exercised in
``tests/integration``. The limiter needs no fake: ``MemoryLimiter`` is the real one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.canonical import CanonicalRequest, Event, Finish, Message, TextDelta, TextPart, Usage
from mesh.config import Pricing
from mesh.limits.policy import RateLimits, Scope


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Replays ``tokens`` text deltas then Finish and Usage. ``gate`` (when set) holds the
    first event back until it is set; ``fail_first`` raises before the first event,
    ``fail_after`` after that many deltas; ``stall_after`` waits forever after that many.
    ``open`` counts streams not yet closed; ``cancelled`` those closed before their end.
    A continuation (``continue_final`` after an assistant message that starts the answer)
    goes on from there, reading the prefix as input, when ``continues_final`` is set."""

    def __init__(self, name: str = "fake", tokens: int = 3) -> None:
        self.name = name
        self.tokens = tokens
        self.gate: asyncio.Event | None = None
        self.fail_first: BaseException | None = None
        self.fail_after: tuple[int, BaseException] | None = None
        self.stall_after: int | None = None
        self.healthy = True
        self.continues_final = False
        self.requests: list[CanonicalRequest] = []
        self.open = 0
        self.started = 0
        self.cancelled = 0

    async def stream(self, request: CanonicalRequest) -> AsyncIterator[Event]:
        self.open += 1
        self.started += 1
        finished = False
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_first is not None:
                raise self.fail_first
            self.requests.append(request)
            skip = 0
            last = request.messages[-1]
            if request.continue_final and last.role == "assistant":
                while skip < self.tokens and last.text.startswith("".join(f"t{i} " for i in range(skip + 1))):
                    skip += 1
            count = self.tokens - skip if request.max_tokens is None else min(self.tokens - skip, request.max_tokens)
            for n, i in enumerate(range(skip, skip + count)):
                if self.fail_after is not None and n == self.fail_after[0]:
                    raise self.fail_after[1]
                if self.stall_after is not None and n == self.stall_after:
                    await asyncio.Event().wait()
                yield TextDelta(f"t{i} ")
            yield Finish("stop" if skip + count == self.tokens else "length")
            yield Usage(input_tokens=10 + skip, output_tokens=count)
            finished = True
        finally:
            self.open -= 1
            if not finished:
                self.cancelled += 1

    async def health(self) -> bool:
        return self.healthy

    async def count_tokens(self, messages: Sequence[Message], request: CanonicalRequest) -> int | None:
        return 7

    async def aclose(self) -> None:
        return None


@dataclass
class FakeAdmission:
    request_id: str
    held: int
    max_output_tokens: int


@dataclass
class FakeLedger:
    """Holds a fixed amount per request; settlement records what it was given."""

    hold: int = 1000
    holds: dict[str, int] = field(default_factory=dict)
    settled: list[dict[str, Any]] = field(default_factory=list)

    checkpoints: list[tuple[str, Usage]] = field(default_factory=list)

    async def admit(
        self, principal: Any, pricing: Pricing, request_id: str, prompt_tokens_estimate: int, max_output_tokens: int,
        *, choices: int = 1, end_user: str | None = None,
    ) -> FakeAdmission:
        self.holds[request_id] = self.hold * choices
        return FakeAdmission(request_id, self.hold * choices, max_output_tokens)

    async def rehold(self, admission: Any, pricing: Pricing) -> Any:
        return admission  # one price here: a fallback never costs more

    def checkpoint(self, admission: Any, usage: Usage) -> None:
        assert admission.request_id in self.holds, "checkpoint after settlement"
        self.checkpoints.append((admission.request_id, usage))

    async def settle(self, admission: Any, usage: Usage | None, *, status: str, **details: Any) -> int:
        assert admission.request_id in self.holds, "settled twice"
        del self.holds[admission.request_id]
        charged = 0 if usage is None else usage.input_tokens + 2 * usage.output_tokens
        self.settled.append({"request_id": admission.request_id, "usage": usage, "status": status,
                             "charged": charged, **details})
        return charged


@dataclass
class FakePrincipal:
    account_id: str = "acct"
    key_id: str = "key"
    limits: tuple[Scope, ...] = ()

    def may_use(self, model: str) -> bool:
        return True


def limited(concurrent: int | None = None, rpm: int | None = None) -> FakePrincipal:
    scope = Scope("key", "key", "acct", RateLimits(rpm=rpm, concurrent=concurrent))
    return FakePrincipal(limits=(scope,))


def request(model: str = "m", *, stream: bool = True, text: str = "hello") -> CanonicalRequest:
    return CanonicalRequest(model=model, messages=(Message("user", (TextPart(text),)),), stream=stream,
                            max_tokens=16)


class SlowSource:
    """A streamed body whose chunks come after delays; records whether it was cancelled or closed."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.cancelled = False
        self.closed = False

    async def run(self) -> AsyncIterator[bytes]:
        try:
            for i, delay in enumerate(self.delays):
                await asyncio.sleep(delay)
                yield f"chunk{i}".encode()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.closed = True
