"""Real Chromium (Debian's, driven by Playwright) against a real gateway process with the
console enabled and the test payment provider. Screenshots go to tests/_artifacts/console/."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Playwright, sync_playwright

from conftest import engine_models
from support.gateway import GatewayProcess
from testengine.harness import EngineProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "_artifacts" / "console"
ADMIN_EMAIL = "ops@example.com"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


# Module scope, not session: sync Playwright runs its own event loop on this thread while it
# is open, and the async tests of later modules need the thread's loop back.
@pytest.fixture(scope="module")
def console_gateway(engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    work = tmp_path_factory.mktemp("console-e2e")
    config = {
        "database": f"sqlite:///{work}/mesh.db",
        "models": engine_models(engine.base_url),
        "billing": {"usage_flush_interval": 0.1},
        # Email verification has its own tests (tests/console/test_email.py).
        "console": {"payments": {"provider": "test"}, "admins": [ADMIN_EMAIL], "verify_email": False},
    }
    with GatewayProcess(config, work) as gw:
        yield gw


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("MESH_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/ensure-test-deps.sh)")
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run the browser tests")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def chromium(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
