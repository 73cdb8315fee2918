"""Routing: pick a replica, open its stream, fail over while nothing has reached the client.

:meth:`Router.open` returns a :class:`RoutedStream` only once an engine produced its
first event, so every failure before that point (connection refused, 5xx, overload,
first-token timeout) is retried: on another replica of the model with a short backoff,
then on the model's fallbacks, in order. After the first event, failures belong to the
caller (the protocol encoder ends the stream with its error event).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence, Set
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace

from mesh.canonical import CanonicalRequest, Event, Finish
from mesh.config import ModelConfig
from mesh.errors import EngineError, EngineOverloaded, EngineUnavailable
from mesh.observability.spans import child
from mesh.routing.policy import LeastOutstanding, Policy, PrefixAffinity
from mesh.routing.pool import ModelPool
from mesh.routing.replica import Replica
from mesh.routing.resume import (
    FAILED,
    FINISHED,
    REFUSED,
    RESUMED,
    Delivered,
    ResumeRecord,
    Splice,
    continuation,
    refusal,
)
from mesh.routing.sessions import MemorySessionMap, SessionKeys, SessionMap, session_keys

log = logging.getLogger("mesh.routing")

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MAX_RESUMES = 1
DEFAULT_RESUME_TIMEOUT = 30.0
_BACKOFF_BASE = 0.05
_BACKOFF_MAX = 0.5


@dataclass(frozen=True, slots=True)
class Choice:
    """Which replica served a request, of which model, and why (for usage records and metrics)."""

    model: str
    replica: str
    reason: str
    attempts: int


class RoutedStream:
    """The event stream of one replica, primed with its first event.

    Iterate it once; :meth:`aclose` (idempotent) closes the engine stream, which cancels
    the upstream request if it is still running, and frees the replica's slot.

    A failure of the replica after the first event resumes the answer on another replica
    of the model when it may (routing/resume.py, docs/resume.md): the client's stream goes
    on from what it was delivered. ``resumes`` records every such failure and its outcome;
    ``reprocessed_tokens`` is what continuations read again (the operator's cost).
    """

    def __init__(self, pool: ModelPool, replica: Replica, events: AsyncIterator[Event], first: Event,
                 choice: Choice, router: Router | None = None, request: CanonicalRequest | None = None) -> None:
        self.pool = pool
        self.replica = replica
        self.choice = choice
        self.resumes: list[ResumeRecord] = []
        self.reprocessed_tokens = 0
        self._events = events
        self._first: Event | None = first
        self._closed = False
        self._holding = True  # self.replica's in-flight slot is this stream's
        self._router = router
        self._request = request
        self._failed: set[int] = set()  # replicas this answer saw fail: never resumed onto
        self._context = otel_context.get_current()  # the request's trace, for the resume's spans

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        delivered = Delivered()
        splice: Splice | None = None
        try:
            if self._first is not None:
                first, self._first = self._first, None
                delivered.observe(first)
                yield first
            while True:
                try:
                    async for ev in self._events:
                        if splice is not None:
                            ev = splice.event(ev)
                        delivered.observe(ev)
                        yield ev
                    break
                except EngineError as err:
                    if err.replica_fault:
                        self.replica.breaker.record_failure()  # passive health: a stream broke mid-way
                        self.replica.failures += 1
                    if splice is not None:
                        self.reprocessed_tokens += splice.reprocessed_tokens
                        splice = None
                    outcome = await self._resume(err, delivered)
                    if outcome is None:
                        raise
                    if isinstance(outcome, Splice):
                        splice = outcome
                        first = splice.event(self._primed())
                        delivered.observe(first)
                        yield first
                        continue
                    for ev in outcome:  # the answer was complete: it ends as it is
                        yield ev
                    return
            self.replica.breaker.record_success()  # served to the end: clears counted failures
        finally:
            if splice is not None:
                self.reprocessed_tokens += splice.reprocessed_tokens
            await self.aclose()

    def _primed(self) -> Event:
        first, self._first = self._first, None
        assert first is not None
        return first

    async def _resume(self, err: EngineError, delivered: Delivered) -> Splice | list[Event] | None:
        """Continue on another replica after ``err``: a Splice for the new stream (primed with
        its first event), the events that end an answer already complete, or None (re-raise)."""
        router, request, failed = self._router, self._request, self.replica
        if router is None or request is None:
            return None
        self._failed.add(id(failed))
        if delivered.finished and request.n == 1:
            # Broke between the answer's end and its usage report: nothing is missing.
            self._record(FINISHED, err.kind, delivered, None)
            return [delivered.final_usage()]
        can_continue = any(_continues(r) for r in self.pool.replicas if id(r) not in self._failed)
        left = router.max_resumes - sum(1 for r in self.resumes if r.outcome in (RESUMED, FAILED))
        structured = request.response_format is not None and request.response_format.type != "text"
        why = refusal(err, delivered, resumes_left=left, can_continue=can_continue, structured=structured,
                      choices=request.n)
        if why is not None:
            self._record(REFUSED, why, delivered, None)
            return None
        follow_up = continuation(request, delivered)
        if follow_up is None:  # max_tokens used up exactly at the failure
            self._record(FINISHED, err.kind, delivered, None)
            return [Finish("length"), delivered.final_usage()]
        await self._let_go()
        token = otel_context.attach(self._context)
        try:
            with child(router.tracer, "resume", {
                "gen_ai.request.model": self.pool.model.id, "mesh.resume.from": failed.name,
                "mesh.resume.reason": err.kind, "mesh.resume.delivered_tokens": delivered.output_tokens,
            }) as span:
                try:
                    async with asyncio.timeout(router.resume_timeout):
                        replica, events, first, _, _ = await router.attempts(
                            self.pool, follow_up, None, exclude=self._failed, only=_continues, over_capacity=True)
                except (EngineError, TimeoutError) as exc:
                    span.set_attribute("mesh.resume.outcome", FAILED)
                    self._record(FAILED, getattr(exc, "kind", "timeout"), delivered, None)
                    log.warning("could not resume a stream of %s after %s failed: %s", self.pool.model.id,
                                failed.name, getattr(exc, "message", "timed out"))
                    return None
                span.set_attribute("mesh.resume.to", replica.name)
                span.set_attribute("mesh.resume.outcome", RESUMED)
        except BaseException:  # cancelled (the client left, or the deadline passed) while resuming
            self._record(FAILED, "cancelled", delivered, None)
            raise
        finally:
            otel_context.detach(token)
        log.warning("resumed a stream of %s on %s after %s failed (%s) at %d tokens", self.pool.model.id,
                    replica.name, failed.name, err.kind, delivered.output_tokens)
        self._record(RESUMED, err.kind, delivered, replica.name)
        self.replica, self._events, self._first, self._holding = replica, events, first, True
        return Splice.after(delivered)

    @property
    def served_by(self) -> list[str]:
        """Every replica that produced part of this answer, in order: the one that started it,
        then each that a resume continued it on (their usage reports make up the bill)."""
        return [self.choice.replica, *(r.to_replica for r in self.resumes if r.to_replica is not None)]

    def _record(self, outcome: str, reason: str, delivered: Delivered, to: str | None) -> None:
        self.resumes.append(ResumeRecord(outcome, reason, self.replica.name, to, delivered.output_tokens))

    async def _let_go(self) -> None:
        """Give up the failed replica's slot and stream (the pool slot stays: the request goes on)."""
        if self._holding:
            self._holding = False
            self.replica.in_flight -= 1
        await _close(self._events)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._holding:
            self._holding = False
            self.replica.in_flight -= 1
        self.pool.release()
        await _close(self._events)


class Router:
    """``sessions`` is where session affinity is kept (in process unless given); only the
    ``prefix_affinity`` policy uses it."""

    def __init__(
        self,
        pools: dict[str, ModelPool],
        policy: Policy | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        sessions: SessionMap | None = None,
        tracer: trace.Tracer | None = None,
        max_resumes: int = DEFAULT_MAX_RESUMES,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
    ) -> None:
        self.pools = pools
        self.policy: Policy = policy or LeastOutstanding()
        self.max_attempts = max_attempts
        self.max_resumes = max_resumes  # continuations per request after failures mid-stream
        self.resume_timeout = resume_timeout  # from a failure to the continuation's first event
        self._min_prefix = self.policy.min_prefix_chars if isinstance(self.policy, PrefixAffinity) else None
        self.sessions: SessionMap | None = None
        if self._min_prefix is not None:
            self.sessions = sessions or MemorySessionMap()
        self.tracer = tracer or trace.NoOpTracer()  # queue wait and route attempt spans

    def models(self) -> list[ModelConfig]:
        return [pool.model for pool in self.pools.values()]

    async def open(
        self, request: CanonicalRequest, account: str, models: Sequence[str] = (), *, relay: bool = False
    ) -> RoutedStream:
        """Start ``request`` on a replica of the first of ``models`` (default: its own) that can
        serve it. Waits in the model's queue when every replica is full. Raises EngineError
        (or EngineOverloaded when the queue deadline passes) when nothing can serve.

        With ``relay``, a replica whose engine can relay (``OpenAIEngine.relay``) is asked for
        its chunks as they are (:class:`mesh.canonical.Relayed`); any other engine streams
        canonical events as usual, so the caller's encoder must take both."""
        last: EngineError | None = None
        for model in models or (request.model,):
            pool = self.pools.get(model)
            if pool is None:
                continue
            try:
                return await self._open_in(pool, request, account, relay)
            except EngineError as err:
                if not err.retryable:
                    raise
                last = err
                log.warning("model %s could not serve request: %s", model, err.message)
        if last is not None:
            raise last
        raise EngineUnavailable(f"No healthy replica can serve model {request.model!r} right now.", retry_after=1)

    async def _open_in(self, pool: ModelPool, request: CanonicalRequest, account: str, relay: bool) -> RoutedStream:
        keys: SessionKeys | None = None
        owner: str | None = None
        if self.sessions is not None and self._min_prefix is not None:
            keys = session_keys(request, self._min_prefix, pool.model.id)
            owner = await self.sessions.find(pool.model.id, keys.lookup)
        with child(self.tracer, "queue wait", {"gen_ai.request.model": pool.model.id,
                                                  "mesh.queue.depth": len(pool.queue)}):
            await pool.acquire(account)
        try:
            replica, events, first, reason, attempt = await self.attempts(pool, request, owner, relay=relay)
        except BaseException:
            pool.release()  # failed, timed out or cancelled (even in a backoff): the slot goes on
            raise
        stream = RoutedStream(pool, replica, events, first, Choice(pool.model.id, replica.name, reason, attempt),
                              self, request)
        if keys is not None and self.sessions is not None and keys.remember:
            try:
                await self.sessions.remember(pool.model.id, keys.remember, stream.replica.name)
            except BaseException:
                await stream.aclose()  # gives the slot back
                raise
        return stream

    async def attempts(
        self, pool: ModelPool, request: CanonicalRequest, owner: str | None, *,
        exclude: Set[int] = frozenset(), only: Callable[[Replica], bool] | None = None, relay: bool = False,
        over_capacity: bool = False,
    ) -> tuple[Replica, AsyncIterator[Event], Event, str, int]:
        """Open ``request`` on a replica of ``pool`` that produces a first event, failing over;
        never on a replica whose id is in ``exclude``, only on those ``only`` accepts, and
        (unless ``over_capacity``: a continuation, which keeps its pool slot and so moves
        load rather than adding to the pool's) only on one with room. Returns
        the replica (its in-flight count taken), its events, the first one, why it was
        picked and the attempt number. The pool slot is the caller's. With ``relay``, an
        engine that can relay is asked for its chunks as they are (see :meth:`open`)."""
        def usable(r: Replica) -> bool:
            return (r.healthy and (over_capacity or r.has_room) and id(r) not in exclude
                    and (only is None or only(r)))

        tried: set[int] = set()
        faulted: set[int] = set()
        last: EngineError | None = None
        for attempt in range(self.max_attempts):
            candidates = [r for r in pool.replicas if usable(r) and id(r) not in tried]
            if not candidates:
                # Retry a replica already tried (after backoff) only when none is left and the
                # failure looked transient (a reset, not an answer the engine gave).
                if last is None or not last.replica_fault:
                    break
                candidates = [r for r in pool.replicas if usable(r)]
                if not candidates:
                    break
            if attempt:
                await asyncio.sleep(min(_BACKOFF_BASE * 2 ** (attempt - 1), _BACKOFF_MAX))
            replica, reason = self.policy.pick(candidates, request, owner)
            tried.add(id(replica))
            breaker = replica.breaker
            if not breaker.acquire():
                continue
            # From here every exit resolves a half-open probe this request may have taken.
            replica.in_flight += 1
            relayer = getattr(replica.engine, "relay", None) if relay else None
            events = aiter(relayer(request) if relayer is not None else replica.engine.stream(request))
            try:
                # The engine's request goes out inside this span: its traceparent names it.
                with child(self.tracer, "route attempt", {
                    "gen_ai.request.model": pool.model.id, "mesh.replica": replica.name, "mesh.route.reason": reason,
                    "mesh.route.attempt": attempt + 1,
                }):
                    first = await anext(events)
            except EngineError as err:
                replica.in_flight -= 1
                if err.replica_fault and not isinstance(err, EngineOverloaded) and id(replica) not in faulted:
                    faulted.add(id(replica))  # one request counts once against a replica
                    breaker.record_failure()
                    replica.failures += 1
                elif not err.replica_fault:
                    breaker.record_alive()  # it answered: alive, just full or refusing
                else:
                    breaker.release()  # counted already by this request: no second verdict
                await _close(events)
                log.warning("replica %s failed before the first token: %s", replica.name, err.message)
                if not err.retryable:
                    raise
                last = err
                continue
            except StopAsyncIteration:
                replica.in_flight -= 1
                breaker.record_failure()
                last = EngineError(f"Engine {replica.name} ended the stream without output.")
                continue
            except BaseException:
                # Cancelled, or an error of the gateway's own (the request could not be
                # encoded): nothing learned about the replica, but its probe goes back.
                replica.in_flight -= 1
                breaker.release()
                await _close(events)
                raise
            breaker.record_alive()
            replica.served += 1
            return replica, events, first, reason, attempt + 1
        if last is not None:
            raise last
        raise EngineUnavailable(f"No healthy replica can serve model {pool.model.id!r} right now.", retry_after=1)

    async def aclose(self) -> None:
        for pool in self.pools.values():
            for r in pool.replicas:
                await r.engine.aclose()
        if self.sessions is not None:
            await self.sessions.aclose()


def _continues(replica: Replica) -> bool:
    """Whether the replica's engine continues a final assistant message (config: ``continuation``)."""
    return bool(getattr(replica.engine, "continues_final", False))


async def _close(events: AsyncIterator[Event]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
