"""The operator's workers page names each worker token's registrations and the address the
token was last used from (a leaked token shows up as an address nobody expected)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from mesh.app import create_app
from mesh.config import Settings
from testengine.harness import EngineProcess

from .conftest import ADMIN_EMAIL, Browser, console_settings

TOKEN = "worker-token-page-0123456789abcdef"
IDLE = "worker-token-idle-0123456789abcdef"


@pytest.fixture
async def app(engine: EngineProcess, tmp_path: Path) -> AsyncIterator[Starlette]:
    base = console_settings(tmp_path, engine.base_url)
    settings = Settings.model_validate({
        **base.model_dump(by_alias=True, exclude_none=True, mode="json"),
        "models": [{"id": "probe", "context_length": 4096}],
        "workers": {"tokens": [{"name": "gpu-7", "token": TOKEN, "models": ["probe"], "allow": ["127.0.0.1"]},
                               {"name": "gpu-idle", "token": IDLE}]},
    })
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


async def test_workers_page_shows_registrations_and_last_source(app: Starlette, engine: EngineProcess) -> None:
    worker = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.9.8.7", 40000)),
                               base_url="http://testserver", headers={"Authorization": f"Bearer {TOKEN}"})
    async with worker:
        r = await worker.post("/workers/v1/replicas", json={"model": "probe", "engine_url": engine.base_url})
        assert r.status_code == 201, r.text
        reg_id = r.json()["id"]
    operator = Browser(app)
    try:
        await operator.sign_up(ADMIN_EMAIL)
        page = await operator.get("/console/admin/workers")
    finally:
        await operator.aclose()
    assert page.status_code == 200
    assert "gpu-7" in page.text and reg_id in page.text
    assert page.text.count("10.9.8.7") == 2  # the registration's source and the token's last use
    assert "gpu-idle" in page.text and "token never used" in page.text
