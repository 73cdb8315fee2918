"""The request path, top to bottom: authenticate, parse, admit, route, stream, settle.

Each step is a named method of :class:`Pipeline` sharing one :class:`RequestContext`;
the protocol endpoints in ``mesh.api`` call them in order. Nothing here knows a wire
format: protocols turn bodies into canonical requests and events back into bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import replace
from typing import Any

from mesh.accounts.principal import Principal
from mesh.billing.attribution import attribution, end_user_of
from mesh.billing.estimate import (
    BYTES_PER_TOKEN_LOW,
    estimate_prompt_tokens,
    estimate_prompt_tokens_low,
    typical_prompt_tokens,
)
from mesh.canonical import (
    CanonicalRequest,
    Event,
    Finish,
    ReasoningDelta,
    Relayed,
    TextDelta,
    ToolArgsDelta,
    Usage,
)
from mesh.config import ModelConfig, Settings
from mesh.deadline import StreamDeadline
from mesh.errors import (
    ContextLengthExceeded,
    EngineTimeout,
    InvalidRequest,
    MeshError,
    ModelNotFound,
    PermissionDenied,
)
from mesh.http.credentials import presented_credential
from mesh.limits.base import Limiter, LimitExceeded
from mesh.observability.logging import AccessLog
from mesh.observability.metrics import Metrics
from mesh.protocols.extensions import allow_extensions
from mesh.request_context import RequestContext as RequestContext
from mesh.request_context import billed_prompt_tokens as billed_prompt_tokens
from mesh.request_context import refusal_line
from mesh.routing.pending import PendingStream
from mesh.routing.resume import resume_fields
from mesh.routing.router import RoutedStream, Router
from mesh.seams import Authenticator, Ledger, UsageGuard

log = logging.getLogger("mesh.pipeline")

# A stream whose engine reports no usage until the end checkpoints every this many deltas.
_CHECKPOINT_DELTAS = 16
# No tokenizer packs more text than this into one token on real prompts: a prompt larger
# than the context at this density cannot fit, and count_tokens refuses it without asking
# an engine.
_MOST_BYTES_PER_TOKEN = 16


_NO_USAGE = Usage()  # frozen: the usage of a request that reported none


def _at_least(usage: Usage | None, deltas: int) -> Usage | None:
    """Each non-empty delta is at least one token: an engine that reports less output (or
    none) than it streamed must not serve the rest unbilled."""
    if usage is None or usage.output_tokens >= deltas:
        return usage
    return replace(usage, output_tokens=deltas)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        router: Router,
        authenticator: Authenticator,
        ledger: Ledger,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        metrics: Metrics | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.metrics = metrics
        self.limiter = limiter
        self.settings = settings
        self.router = router
        self.authenticator = authenticator
        self.ledger = ledger
        self._spawn = spawn
        self._models = {m.id: m for m in router.models()}
        self.usage_guard: UsageGuard | None = None
        self.access_log = AccessLog(log, settings.logging.request_sample, settings.logging.slow_request_ms)

    # 1. authenticate ----------------------------------------------------------------------
    async def authenticate(self, ctx: RequestContext, authorization: str | None, api_key: str | None) -> Principal:
        """Bearer token or ``x-api-key``; raises AuthenticationFailed (401)."""
        with ctx.trace.step("authenticate"):
            ctx.principal = await self.authenticator.authenticate(presented_credential(authorization, api_key))
        return ctx.principal

    # 2. resolve the model (after the protocol parsed the body) -------------------------------
    async def resolve(
        self, ctx: RequestContext, request: CanonicalRequest, *, fit_context: bool = True
    ) -> CanonicalRequest:
        model = self._models.get(request.model)
        if model is None:
            raise ModelNotFound(
                f"The model '{request.model}' does not exist or you do not have access to it.", param="model"
            )
        if not ctx.who.may_use(model.id):
            raise PermissionDenied(f"This API key may not use the model '{model.id}'.", param="model")
        ctx.model = model
        ctx.model_id = model.id
        ctx.models = self._candidates(ctx, model, request)
        # Only the engine extensions the operator enabled for this model reach its engines.
        request = allow_extensions(request, model.engine_extensions)
        if ctx.session_hint:
            request = replace(request, cache_key=ctx.session_hint)
        if model.context_length and fit_context:
            request = await self._fit_context(ctx, model.context_length, request)
        ctx.request = request
        return request

    async def _fit_context(self, ctx: RequestContext, limit: int, request: CanonicalRequest) -> CanonicalRequest:
        """Lower a ``max_tokens`` the context cannot hold (Claude Code asks 32000 of every
        model; engines refuse prompt + max_tokens > context) to the room the prompt leaves.

        The prompt is counted by a replica's own tokenizer when the answer matters, else
        estimated leaning low (so the room is never squeezed to nothing by a guess). A prompt
        that fills the context alone raises ContextLengthExceeded with the numbers."""
        low = estimate_prompt_tokens_low(request)
        wanted = request.max_tokens
        if low < limit and (wanted is None or wanted + low <= limit):
            return request
        counted = await self._count_prompt(ctx, request)
        prompt = low if counted is None else counted
        if prompt >= limit:
            measure = "" if counted is not None else "at least "
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your messages resulted "
                f"in {measure}{prompt} tokens. Please reduce the length of the messages.",
                param="messages",
            )
        if wanted is not None and wanted > limit - prompt:
            request = request.with_max_tokens(limit - prompt)
        return request

    async def _count_prompt(self, ctx: RequestContext, request: CanonicalRequest) -> int | None:
        """The prompt's length by the tokenizer of the model's least busy healthy replica, or None."""
        pool = self.router.pools.get(request.model)
        healthy = [r for r in pool.replicas if r.healthy] if pool else []
        if not healthy:
            return None
        replica = min(healthy, key=lambda r: r.load)
        try:
            return await replica.engine.count_tokens(request.messages, request)
        except Exception:
            log.warning("count_tokens failed on %s for %s", replica.name, ctx.request_id, exc_info=True)
            return None

    def _candidates(self, ctx: RequestContext, model: ModelConfig, request: CanonicalRequest) -> tuple[str, ...]:
        """The model, its configured fallbacks, then the request's own ``models`` list (as
        OpenRouter does), keeping only known models this key may use."""
        asked = request.extra.get("models")
        if asked is not None and (not isinstance(asked, list) or not all(isinstance(m, str) for m in asked)):
            raise InvalidRequest("'models' must be a list of model names.", param="models")
        out: list[str] = []
        for name in (model.id, *model.fallbacks, *(asked or ())):
            if name in self._models and name not in out and ctx.who.may_use(name):
                out.append(name)
        return tuple(out)

    # 3. admit: rate limits, then hold credit for the prompt and the most output it may produce
    async def admit(self, ctx: RequestContext, request: CanonicalRequest) -> CanonicalRequest:
        """Take the rate limits (``RateLimited``, 429), then hold credit (``InsufficientCredits``,
        402; the request still counts against requests per minute, but its tokens and
        concurrency slot are given back). May lower ``max_tokens`` to what the balance covers."""
        assert ctx.model is not None
        model = ctx.model
        ctx.prompt_estimate = estimate_prompt_tokens(request)
        with ctx.trace.step("admit"):
            await self.limit(ctx)
            try:
                request = await self._hold(ctx, request, model)
            except BaseException:
                await self._give_back(ctx, 0)
                raise
        return request

    async def limit(self, ctx: RequestContext) -> None:
        """Take one request, the prompt estimate's tokens and a concurrency slot from the
        key's and the account's limits (nothing for an unlimited principal); raises
        ``RateLimited`` (429, with ``retry_after``). The state the headers show lands on
        ``ctx.limit_state`` either way."""
        scopes = ctx.who.limits
        if not scopes or self.limiter is None:
            return
        try:
            ctx.lease = await self.limiter.acquire(scopes, ctx.prompt_estimate)
        except LimitExceeded as exc:
            ctx.limit_state = exc.state
            raise
        ctx.limit_state = ctx.lease.state

    async def _give_back(self, ctx: RequestContext, tokens: int) -> None:
        """Settle the rate-limit lease with the tokens really used (once; never raises)."""
        lease, ctx.lease = ctx.lease, None
        if lease is None or self.limiter is None:
            return
        try:
            await self.limiter.settle(lease, tokens)
        except Exception:
            log.exception("rate-limit settlement failed for %s", ctx.request_id)

    async def _hold(self, ctx: RequestContext, request: CanonicalRequest, model: ModelConfig) -> CanonicalRequest:
        """Hold credit for the prompt and the most output the request can produce, and make
        sure no engine can produce more than was held: output beyond the admission's limit
        is never charged (an engine reporting more is not trusted)."""
        wanted = request.max_tokens
        contexts = [self._models[m].context_length for m in ctx.models or (model.id,)]  # known models only
        sizes = [c for c in contexts if c]
        bounded = wanted is not None or len(sizes) == len(contexts)
        if wanted is None:
            # No max_tokens: an engine may write until its context is full. Its prompt takes
            # at least a token, but how many is only known to its tokenizer (the high estimate
            # runs 3x for English): hold for the whole context of the largest model that may
            # serve it, so that whatever the engine writes is held for and charged.
            wanted = max(sizes) if bounded else self.settings.billing.default_hold_output_tokens
        ctx.admission = await self.ledger.admit(
            ctx.who, model.pricing, ctx.request_id, ctx.prompt_estimate, wanted, choices=request.n,
            end_user=end_user_of(request.user),  # a key's user_budget counts it
        )
        allowed = int(ctx.admission.max_output_tokens)
        if not bounded:
            request = request.with_max_tokens(allowed)
        elif allowed < wanted:
            if request.max_tokens is None:
                # The credit covers less than a full context: cap the engine there, and not
                # above the room a typical prompt of this size leaves (more, an engine would
                # refuse as a context overflow; the high estimate would squeeze English answers).
                allowed = max(1, min(allowed, min(sizes) - typical_prompt_tokens(request)))
            request = request.with_max_tokens(allowed)
        ctx.request = request
        return request

    # 4. route: a replica that produced its first event --------------------------------------
    async def route(
        self, ctx: RequestContext, request: CanonicalRequest, *, patience: float | None = None,
        impatient: Callable[[], object] | None = None,
    ) -> RoutedStream | PendingStream:
        """Open the request on a replica (failing over, then over fallback models).

        With ``patience`` and ``impatient``, the route runs in the caller's task and
        ``impatient`` is called (from the event loop) if it is still under way after that
        many seconds: a streaming response starts there and sends keep-alives while the
        route goes on (``api/inference.py``). With ``patience`` alone, the route runs in a
        task of its own and, still waiting after that many seconds, comes back as a
        :class:`PendingStream`, whose errors then surface from iteration.
        """
        loop = asyncio.get_running_loop()
        timeout = self.settings.routing.request_timeout
        if timeout is not None and ctx.deadline is None:
            ctx.deadline = loop.time() + timeout - (time.monotonic() - ctx.started)
        if patience is None:
            return await self._route(ctx, request)
        if impatient is not None:
            timer = loop.call_later(patience, impatient)
            try:
                return await self._route(ctx, request)
            finally:
                timer.cancel()
        task = loop.create_task(self._route(ctx, request))
        pending = PendingStream(task)
        ctx.stream = pending  # owned from now on: finish() cancels it if nobody iterates it
        if await pending.routed_within(patience):
            return task.result()
        return pending

    async def _route(self, ctx: RequestContext, request: CanonicalRequest) -> RoutedStream:
        try:
            try:
                async with asyncio.timeout_at(ctx.deadline):
                    with ctx.trace.active():  # the router's queue wait and attempt spans are the request's
                        stream = await self.router.open(request, ctx.who.account_id, ctx.models, relay=ctx.relay)
            except TimeoutError:
                raise self._deadline_error() from None
        except BaseException as exc:
            ctx.status, ctx.error = ("error", exc) if isinstance(exc, MeshError) else ("cancelled", None)
            await self._settle_now(ctx)
            raise
        if ctx.stream is None:
            ctx.stream = stream
        ctx.routed = stream
        if stream.choice.model != ctx.model_id:
            ctx.model = self._models[stream.choice.model]  # a fallback served it: bill its prices
            if ctx.admission is not None:
                try:  # and hold for them: a dearer model than the one held for is re-held or refused
                    ctx.admission = await self.ledger.rehold(ctx.admission, ctx.model.pricing)
                except BaseException as exc:
                    await stream.aclose()
                    ctx.status, ctx.error = ("error", exc) if isinstance(exc, MeshError) else ("cancelled", None)
                    await self._settle_now(ctx)
                    raise
        ctx.replica = stream.replica.name
        ctx.route_reason = stream.choice.reason
        ctx.first_token_at = time.monotonic()
        return stream

    def _deadline_error(self) -> EngineTimeout:
        return EngineTimeout(
            f"The request did not finish within its deadline of {self.settings.routing.request_timeout:g} s."
        )

    # 5. stream, metering what passes -----------------------------------------------------------
    def metered(self, ctx: RequestContext, stream: RoutedStream | PendingStream) -> AsyncGenerator[Event, None]:
        """Pass events through, remembering usage; settle when the stream ends in any way.

        Kept on ``ctx`` for :meth:`finish` to close: an encoder closed while it waits on the
        client stops iterating it without closing it (and the GC is too late to settle).

        A normal end settles before the protocol writes its final event, so the balance is
        current when the client sees the end; a disconnect or failure settles in the
        background. A stream that fails after its first token (504 past the request's
        deadline included) pays for what it delivered: the tokens streamed so far, or
        nothing when the answer was not streamed (the client got only the error); a client
        that hangs up pays for what was generated.
        """
        events = self._metered(ctx, stream)
        ctx.metered = events
        return events

    async def _metered(self, ctx: RequestContext, stream: RoutedStream | PendingStream) -> AsyncGenerator[Event, None]:
        usage: Usage | None = None
        produced = 0
        checkpoint_at = _CHECKPOINT_DELTAS
        ctx.metering = True
        # Only a streamed answer is checkpointed: what it streamed was delivered and is owed
        # even if this process dies; an aggregated answer delivers nothing until its end.
        admission = ctx.admission if ctx.request is not None and ctx.request.stream else None
        events = aiter(stream)
        deadline = StreamDeadline(ctx.deadline)
        try:
            while True:
                if deadline.expired:
                    raise self._deadline_error()
                deadline.waiting = True
                try:
                    ev = await anext(events)
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if deadline.cancelled_us():
                        raise self._deadline_error() from None
                    raise
                deadline.waiting = False
                if isinstance(ev, Relayed):  # the relay path's chunks: the common case first
                    produced += ev.deltas
                    if ev.finish is not None:
                        ctx.finish_reason = ev.finish
                    if usage is None and admission is not None and produced >= checkpoint_at:
                        checkpoint_at = produced + _CHECKPOINT_DELTAS
                        self.ledger.checkpoint(admission, Usage(output_tokens=produced))
                elif isinstance(ev, Usage):
                    if ev.input_tokens == 0:
                        # The engine reported no prompt count (llama.cpp's server in streams):
                        # bill and show a typical-density estimate (not the hold's, which leans
                        # high on purpose), the same number on both sides.
                        ev = replace(ev, input_tokens=billed_prompt_tokens(ctx))
                    ev = usage = _at_least(ev, produced) or ev
                    if admission is not None:
                        self.ledger.checkpoint(admission, ev)
                elif isinstance(ev, TextDelta | ReasoningDelta | ToolArgsDelta):
                    produced += 1
                    if usage is None and admission is not None and produced >= checkpoint_at:
                        # No usage from the engine yet: at least one token per delta so far.
                        checkpoint_at = produced + _CHECKPOINT_DELTAS
                        self.ledger.checkpoint(admission, Usage(output_tokens=produced))
                elif isinstance(ev, Finish) and ev.choice == 0:
                    ctx.finish_reason = ev.reason
                yield ev
            ctx.usage = usage = self._guarded(ctx, _at_least(usage, produced))
            await self._settle_now(ctx)
        except MeshError as exc:
            ctx.status, ctx.error = "error", exc
            raise
        except BaseException:
            ctx.status = "error" if ctx.status == "error" else "cancelled"  # an endpoint's 500 delivered nothing
            raise
        finally:
            deadline.cancel()
            try:
                await stream.aclose()  # a route still pending is cancelled: it settles, at no cost
            finally:
                if not ctx.settled:
                    # An engine that reported usage and then failed is judged like any other
                    # (a liar leaves rotation), even when the client is owed nothing.
                    judged = self._guarded(ctx, _at_least(usage, produced))
                    delivered = ctx.status != "error" or (ctx.request is not None and ctx.request.stream)
                    if delivered:
                        ctx.usage = judged or Usage(input_tokens=billed_prompt_tokens(ctx), output_tokens=produced)
                    self._spawn(self._settle_now(ctx))

    def _guarded(self, ctx: RequestContext, usage: Usage | None) -> Usage | None:
        """Usage a worker's engine could not have produced takes its replica out of rotation
        and is billed only as far as Mesh can bound it. After a resume the usage is partly
        the continuation's replica's report: every replica that served the answer is judged
        on it, not only the one that started it (which may be the operator's own)."""
        if usage is None or self.usage_guard is None or ctx.model is None or ctx.request is None:
            return usage
        served = ctx.routed.served_by if ctx.routed is not None else [ctx.replica]
        billed = usage
        for name in dict.fromkeys(served):
            judged = self.usage_guard(ctx.model.id, name, ctx.request, ctx.prompt_estimate, usage,
                                      ctx.model.context_length, len(served) > 1)
            if judged != usage:
                billed = judged  # clamped: the same bound whichever replica lied
        return billed

    async def start(
        self, ctx: RequestContext, request: CanonicalRequest, *, patience: float | None = None
    ) -> tuple[CanonicalRequest, RoutedStream | PendingStream]:
        """Steps 2 to 4 in order (resolve, admit, route) for a parsed request."""
        request = await self.resolve(ctx, request)
        request = await self.admit(ctx, request)
        return request, await self.route(ctx, request, patience=patience)

    # 6. finish and settle --------------------------------------------------------------------
    async def finish(self, ctx: RequestContext) -> None:
        """End ``ctx`` however its response went (idempotent, never raises): a stream that
        :meth:`metered` never started is closed here (a route still waiting is cancelled,
        which gives back its queue place, replica slot and breaker probe), then the request
        is settled if nothing settled it yet. The response calls this when it is done."""
        metered, ctx.metered = ctx.metered, None
        if metered is not None and not ctx.settled:
            try:  # left suspended at an event: its own finally settles for what it passed on
                await metered.aclose()
            except Exception:
                log.exception("closing the metered stream of %s failed", ctx.request_id)
        stream = ctx.stream
        if stream is not None and not ctx.metering:
            ctx.stream = None
            routed = isinstance(stream, RoutedStream) or (
                stream.task.done() and not stream.task.cancelled() and stream.task.exception() is None
            )
            try:
                await stream.aclose()
            except Exception:
                log.exception("closing the stream of %s failed", ctx.request_id)
            if routed and not ctx.settled:
                # An engine started it (its prompt was read) but nothing reached the client.
                ctx.status = "cancelled"
                ctx.usage = Usage(input_tokens=billed_prompt_tokens(ctx), output_tokens=0)
        if not ctx.settled:
            if ctx.status == "ok":
                ctx.status = "cancelled"
            await self._settle_now(ctx)

    async def _settle_now(self, ctx: RequestContext) -> None:
        if ctx.lease is not None:
            used = ctx.usage.input_tokens + ctx.usage.output_tokens if ctx.usage is not None else 0
            await self._give_back(ctx, used)
        if ctx.settled or ctx.admission is None or ctx.model is None:
            refused = None if ctx.settled else refusal_line(ctx)
            if refused is not None:  # an operator sees refusals in the log, not only in metrics
                self.access_log.request(refused[0], always=refused[1])
            ctx.settled = True
            ctx.trace.finish(ctx)
            return
        ctx.settled = True
        model = ctx.model
        duration = time.monotonic() - ctx.started
        duration_ms = int(duration * 1000)
        ttft_ms = ctx.ttft_ms
        request = ctx.request
        charged = 0
        try:
            with ctx.trace.step("settle"):
                charged = await self.ledger.settle(
                    ctx.admission,
                    ctx.usage,
                    status=ctx.status,
                    model=model.id,
                    pricing=model.pricing,
                    replica=ctx.replica,
                    protocol=ctx.protocol,
                    ttft_ms=ttft_ms,
                    duration_ms=duration_ms,
                    attribution=attribution(
                        request.user if request else None, request.metadata if request else None, ctx.tags
                    ),
                    finish_reason=ctx.finish_reason,
                )
        except Exception:
            # The hold stays in place and the stale-hold sweeper releases it; never lose the
            # response over a bookkeeping failure, and never charge twice.
            log.exception("settlement failed for %s", ctx.request_id, extra={"request_id": ctx.request_id})
            if self.metrics is not None:
                self.metrics.settlement_failures.inc()
        usage = ctx.usage or _NO_USAGE
        routed = ctx.routed
        resumed = {} if routed is None or not routed.resumes else resume_fields(routed.resumes,
                                                                                routed.reprocessed_tokens)
        if self.metrics is not None:
            if resumed and routed is not None:
                self.metrics.resumes(model.id, [r.outcome for r in routed.resumes], routed.reprocessed_tokens)
            first = ctx.first_token_at
            self.metrics.observe(
                model=model.id, protocol=ctx.protocol, status=ctx.status,
                ttft_s=None if first is None else first - ctx.started, duration_s=duration,
                input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                cached_tokens=usage.cached_tokens, charged=charged,
            )
        # One line per request, never with content: ids, sizes and timings only.
        self.access_log.request({
            "request_id": ctx.request_id, "account_id": ctx.who.account_id, "model": model.id,
            "protocol": ctx.protocol, "status": ctx.status, "replica": ctx.replica, "route": ctx.route_reason,
            "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "cached_tokens": usage.cached_tokens, "charged_micro": charged,
            "ttft_ms": ttft_ms, "duration_ms": duration_ms, **resumed, **ctx.trace.log_ids(),
            **({"error": ctx.error.kind} if ctx.error is not None else {}),
        })
        ctx.trace.finish(ctx, charged=charged, extra=resumed)

    # count tokens (its own route: after resolve, nothing is held or charged) -----------------
    async def count_tokens(self, ctx: RequestContext, request: CanonicalRequest) -> int:
        """Prompt tokens by the model's own tokenizer, asked of its least busy healthy replica;
        :func:`estimate_prompt_tokens` when that engine cannot count (None) or fails.

        Counts as one request against the key's and account's limits (``RateLimited``, 429;
        no tokens are charged, and its concurrency slot is given back at once); a prompt too
        large for the model's context at any density is refused (``ContextLengthExceeded``,
        400) before an engine sees it."""
        estimate = estimate_prompt_tokens(request)
        model = ctx.model
        if model is not None and model.context_length:
            size = estimate_prompt_tokens_low(request) * BYTES_PER_TOKEN_LOW  # about the prompt's bytes
            if size > model.context_length * _MOST_BYTES_PER_TOKEN:
                raise ContextLengthExceeded(
                    f"prompt is too long: about {estimate} tokens > {model.context_length} maximum",
                    param="messages",
                )
        await self.limit(ctx)
        try:
            return await self._count_tokens(ctx, request)
        finally:
            await self._give_back(ctx, 0)

    async def _count_tokens(self, ctx: RequestContext, request: CanonicalRequest) -> int:
        pool = self.router.pools.get(request.model)
        healthy = [r for r in pool.replicas if r.healthy] if pool else []
        if healthy:
            replica = min(healthy, key=lambda r: r.load)
            try:
                count = await replica.engine.count_tokens(request.messages, request)
            except Exception:
                log.warning("count_tokens failed on %s for %s", replica.name, ctx.request_id, exc_info=True)
                count = None
            if count is not None:
                return count
        return estimate_prompt_tokens(request)
