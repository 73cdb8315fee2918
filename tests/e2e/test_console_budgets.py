"""Key budgets on the console in real Chromium: create a key with a daily budget, spend
from it through the API, see this period's spend against the budget, change the budget."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

import openai
from playwright.sync_api import Browser, expect

from support.gateway import GatewayProcess

from .conftest import DESKTOP
from .test_console_browser import shooter, sign_up


def test_key_budget_shown_and_changed(chromium: Browser, console_gateway: GatewayProcess, artifacts: Path) -> None:
    base = console_gateway.url
    context = chromium.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    shoot = shooter(page, artifacts, "budgets")
    sign_up(page, base, f"e2e-budget-{secrets.token_hex(4)}@example.com")
    page.click("nav >> text=Billing")
    page.click("button[data-pack=builder]")
    page.click("#pay")
    expect(page).to_have_url(re.compile(r"/console/billing\?paid=pay_"))

    page.click("nav >> text=API keys")
    page.fill("#name", "budgeted backend")
    page.fill("#spend_limit", "5")
    page.select_option("#budget_period", "daily")
    page.click("#create-key button[type=submit]")
    key = page.locator("#new-key-value").inner_text().strip()
    row = page.locator("#key-list tr:has-text('budgeted backend')")
    expect(row).to_contain_text("/ 5.00")
    expect(row.locator("[data-budget]")).to_contain_text("daily budget, resets")

    with openai.OpenAI(base_url=console_gateway.base_url, api_key=key, max_retries=0) as client:
        reply = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "spend"}])
    cost = ((reply.usage and reply.usage.model_extra) or {})["cost"]
    deadline = time.monotonic() + 10
    while True:  # the key's spend is written when the charge settles
        page.goto(base + "/console/keys")
        text = row.inner_text()
        if cost.rstrip("0").rstrip(".") in text or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    expect(row).to_contain_text(cost.rstrip("0"))
    shoot("01-key-daily-budget")

    row.locator("summary:has-text('Change budget')").click()
    row.locator("input[name=spend_limit]").fill("7.5")
    row.locator("select[name=budget_period]").select_option("weekly")
    row.locator("button:has-text('Save')").click()
    expect(page.locator(".flash.ok")).to_contain_text("weekly budget")
    expect(row).to_contain_text("/ 7.50")
    expect(row.locator("[data-budget]")).to_contain_text("weekly budget, resets")
    shoot("02-key-weekly-budget")

    row.locator("summary:has-text('Change budget')").click()
    row.locator("input[name=spend_limit]").fill("lots")
    row.locator("button:has-text('Save')").click()
    expect(page.locator(".flash.err")).to_contain_text("Enter an amount")
    expect(row).to_contain_text("/ 7.50")
    assert not errors, errors
    context.close()
