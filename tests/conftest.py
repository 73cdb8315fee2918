"""Shared fixtures: real test-engine and gateway processes, and an operator client.

Processes are session-scoped (starting them costs about a second each); every test
makes its own account and key, so tests never share balances.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support.books import check_books, check_stopped
from support.gateway import Admin, GatewayProcess
from testengine.harness import EngineProcess

pytest_plugins = ["conftest_db"]

TEST_PRICING = {"input": "1.0", "cached_input": "0.5", "output": "2.0"}


def engine_models(base_url: str, **extra: Any) -> list[dict[str, Any]]:
    """Catalog entries for the test engine's three models."""
    return [
        {
            "id": name,
            "family": "Test",
            "license": "MIT",
            "context_length": 4096,
            "pricing": TEST_PRICING,
            "engines": [{"type": "openai", "base_url": base_url, "model": name, **extra}],
        }
        for name in ("test-model", "test-reasoner", "test-reasoner-vllm")
    ]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "leaves_state(reason): the test legitimately leaves credit held or slots taken; the "
        "per-test invariant check (support/books.py) is skipped for it",
    )


@pytest.fixture(autouse=True)
def books_balance(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test, on every gateway process it used: nothing held, nothing in flight,
    ledger = balance, usage charges = usage ledger rows (``support.books``)."""
    GatewayProcess.stopped.clear()  # stopped by an earlier module's teardown: checked there
    yield
    if request.node.get_closest_marker("leaves_state") is not None:
        GatewayProcess.stopped.clear()
    elif GatewayProcess.running or GatewayProcess.stopped:
        failures = check_books()
        if failures:
            pytest.fail("invariants broken after the test:\n" + "\n".join(failures), pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def books_balance_at_module_end(request: pytest.FixtureRequest) -> Iterator[None]:
    """The same for gateways a module's fixtures stop after its last test."""
    yield
    failures = check_stopped()
    if failures and request.node.get_closest_marker("leaves_state") is None:
        pytest.fail("invariants broken when the module's gateways stopped:\n" + "\n".join(failures), pytrace=False)


@pytest.fixture(scope="session")
def engine() -> Iterator[EngineProcess]:
    with EngineProcess() as proc:
        yield proc


@pytest.fixture(scope="session")
def gateway(engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    work = tmp_path_factory.mktemp("gateway")
    config = {"database": f"sqlite:///{work}/mesh.db", "models": engine_models(engine.base_url)}
    with GatewayProcess(config, work) as gw:
        yield gw


@pytest.fixture(scope="session")
def admin(gateway: GatewayProcess) -> Iterator[Admin]:
    client = Admin(gateway.url)
    yield client
    client.close()


@pytest.fixture
def account(admin: Admin) -> str:
    return admin.account("test", credits="100")


@pytest.fixture
def api_key(admin: Admin, account: str) -> str:
    key: str = admin.key(account, name="test")["key"]
    return key
