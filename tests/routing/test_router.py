"""The router on in-process fakes: a breaker probe is resolved on every exit, real
traffic outranks health probes."""

from __future__ import annotations

import asyncio

import pytest

from fakes import Clock, FakeEngine, request
from mesh.config import ModelConfig
from mesh.errors import EngineTimeout, InvalidRequest
from mesh.routing.breaker import BreakerState, CircuitBreaker
from mesh.routing.health import probe
from mesh.routing.pool import ModelPool
from mesh.routing.replica import Replica
from mesh.routing.router import Router


def fleet(engine: FakeEngine, *, threshold: int = 1) -> tuple[Router, Replica, Clock]:
    clock = Clock()
    replica = Replica(engine, breaker=CircuitBreaker(threshold, cooldown=5, clock=clock))
    return Router({"m": ModelPool(ModelConfig(id="m"), [replica])}), replica, clock


def half_open(replica: Replica, clock: Clock) -> None:
    for _ in range(replica.breaker.failure_threshold):
        replica.breaker.record_failure()
    clock.now += 5
    assert replica.healthy and replica.breaker.state is BreakerState.HALF_OPEN


async def test_a_cancelled_probe_goes_back_and_a_passing_health_check_closes_the_breaker() -> None:
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    router, replica, clock = fleet(engine)
    half_open(replica, clock)
    task = asyncio.create_task(router.open(request(), "a"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert replica.breaker.probing and not replica.healthy  # this request is the probe
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert replica.healthy and replica.breaker.state is BreakerState.HALF_OPEN
    assert replica.in_flight == 0 and engine.open == 0
    assert await probe(replica)
    assert replica.breaker.state is BreakerState.CLOSED


async def test_a_probe_that_fails_for_the_gateways_own_reason_goes_back() -> None:
    engine = FakeEngine()
    engine.fail_first = InvalidRequest("The request is nested too deeply to be sent to the engine.")
    router, replica, clock = fleet(engine)
    half_open(replica, clock)
    with pytest.raises(InvalidRequest):
        await router.open(request(), "a")
    assert replica.breaker.state is BreakerState.HALF_OPEN and not replica.breaker.probing
    assert await probe(replica)
    assert replica.breaker.state is BreakerState.CLOSED


async def test_a_probe_that_reaches_its_first_token_closes_the_breaker() -> None:
    router, replica, clock = fleet(FakeEngine())
    half_open(replica, clock)
    stream = await router.open(request(), "a")
    assert replica.breaker.state is BreakerState.CLOSED
    await stream.aclose()
    assert replica.in_flight == 0


async def test_streams_that_stall_after_their_first_token_open_the_breaker_despite_health_checks() -> None:
    engine = FakeEngine(tokens=5)
    engine.fail_after = (1, EngineTimeout("Engine fake timed out."))
    router, replica, _ = fleet(engine, threshold=3)
    for _ in range(3):
        assert await probe(replica)  # /health answers between the requests
        stream = await router.open(request(), "a")
        with pytest.raises(EngineTimeout):
            async for _ in stream:
                pass
    assert replica.breaker.state is BreakerState.OPEN and not replica.healthy
    assert replica.in_flight == 0


async def test_a_stream_served_to_its_end_clears_the_counted_failures() -> None:
    engine = FakeEngine(tokens=2)
    router, replica, _ = fleet(engine, threshold=3)
    replica.breaker.record_failure()
    replica.breaker.record_failure()
    stream = await router.open(request(), "a")
    assert replica.breaker.failures == 2  # a first token proves less than a finished answer
    async for _ in stream:
        pass
    assert replica.breaker.failures == 0
