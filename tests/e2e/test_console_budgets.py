"""Spend controls on the console in real Chromium: create a key with a daily budget, spend
from it through the API, see this period's spend against the budget, change the budget;
open a request from the dashboard, break spend down by end user and tag, export CSV."""

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


def test_generation_detail_and_breakdowns(chromium: Browser, console_gateway: GatewayProcess, artifacts: Path) -> None:
    base = console_gateway.url
    context = chromium.new_context(viewport=DESKTOP, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    shoot = shooter(page, artifacts, "breakdown")
    sign_up(page, base, f"e2e-spend-{secrets.token_hex(4)}@example.com")
    page.click("nav >> text=Billing")
    page.click("button[data-pack=builder]")
    page.click("#pay")
    expect(page).to_have_url(re.compile(r"/console/billing\?paid=pay_"))
    page.click("nav >> text=API keys")
    page.fill("#name", "attributed")
    page.click("#create-key button[type=submit]")
    key = page.locator("#new-key-value").inner_text().strip()

    costs: dict[str, float] = {}
    with openai.OpenAI(base_url=console_gateway.base_url, api_key=key, max_retries=0) as client:
        for user, tag in (("alice", "search"), ("bob", "chat"), ("alice", "chat")):
            reply = client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": f"{user} {tag}"}], user=user,
                extra_headers={"x-mesh-tags": tag},
            )
            costs[reply.id] = float(((reply.usage and reply.usage.model_extra) or {})["cost"])
    deadline = time.monotonic() + 15
    while True:
        page.goto(base + "/console/dashboard")
        if page.locator("#recent-requests tbody tr").count() >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    expect(page.locator("#recent-requests tbody tr")).to_have_count(3)
    expect(page.locator("#recent-requests")).to_contain_text("alice · search")

    page.locator("#recent-requests a:has-text('test-model')").first.click()
    expect(page).to_have_url(re.compile(r"/console/generations/req_"))
    expect(page.locator("#generation [data-field=user]")).to_have_text("alice")
    expect(page.locator("#generation [data-field=tags]")).to_have_text("chat")
    expect(page.locator("#generation [data-field=finish_reason]")).to_have_text("stop")
    shoot("01-generation")

    page.goto(base + "/console/dashboard")
    page.click("#breakdown-link")
    expect(page.locator("#breakdown tr[data-group=alice] td").nth(1)).to_have_text("2")
    expect(page.locator("#breakdown tr[data-group=bob] td").nth(1)).to_have_text("1")
    shoot("02-by-user")
    page.select_option("#group_by", "tag")
    page.click("#breakdown button:has-text('Show')")
    expect(page.locator("#breakdown tr[data-group=chat] td").nth(1)).to_have_text("2")
    expect(page.locator("#breakdown tr[data-group=search] td").nth(1)).to_have_text("1")
    shoot("03-by-tag")
    with page.expect_download() as download:
        page.click("#breakdown-csv")
    lines = Path(download.value.path()).read_text().splitlines()
    assert lines[0] == "tag,requests,input_tokens,output_tokens,cost"
    assert sorted(line.split(",")[0] for line in lines[1:]) == ["chat", "search"]
    assert abs(sum(float(line.split(",")[4]) for line in lines[1:]) - sum(costs.values())) < 1e-9

    other = chromium.new_context(viewport=DESKTOP)
    stranger = other.new_page()
    sign_up(stranger, base, f"e2e-stranger-{secrets.token_hex(4)}@example.com")
    stranger.goto(base + "/console/generations/" + next(iter(costs)))  # another account's request
    assert stranger.locator("h1").inner_text() == "Not found"
    other.close()
    assert not errors, errors
    context.close()
