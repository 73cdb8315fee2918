"""The console in real Chromium: a customer's whole first day, then the same pages on a
phone, then the operator's pages. Every step leaves a screenshot in tests/_artifacts/console/.

sign up → buy credits (test provider) → create a key → call the API with it (openai SDK)
→ the request shows in the dashboard's chart and table → revoke the key → the API says 401.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from playwright.sync_api import Browser, Page, expect

from support.gateway import GatewayProcess

from .conftest import ADMIN_EMAIL, DESKTOP, PHONE

PASSWORD = "a long enough password"


def shooter(page: Page, artifacts: Path, width: str) -> Callable[[str], None]:
    def shoot(name: str) -> None:
        page.screenshot(path=str(artifacts / f"{name}-{width}.png"), full_page=True)

    return shoot


def sign_up(page: Page, base: str, email: str) -> None:
    page.goto(base + "/console/signup")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.fill("#password_confirm", PASSWORD)
    page.click("button[type=submit]")
    # Sign-up answers alike for free and taken emails: it never signs in by itself.
    expect(page).to_have_url(re.compile(r"/console/signin$"))
    expect(page.locator(".flash.ok")).to_contain_text("Your account is ready")
    sign_in(page, base, email)


def sign_in(page: Page, base: str, email: str) -> None:
    page.goto(base + "/console/signin")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/console/dashboard$"))


@pytest.fixture(scope="module")
def customer_email() -> str:
    return f"e2e-{secrets.token_hex(4)}@example.com"


def test_customer_journey_desktop(
    chromium: Browser, console_gateway: GatewayProcess, artifacts: Path, customer_email: str
) -> None:
    base = console_gateway.url
    context = chromium.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    shoot = shooter(page, artifacts, "desktop")

    page.goto(base + "/console/dashboard")
    expect(page).to_have_url(re.compile(r"/console/signin\?next=/console/dashboard$"))
    shoot("01-signin")
    page.goto(base + "/console/signup")
    shoot("02-signup")
    sign_up(page, base, customer_email)
    shoot("03-dashboard-empty")

    # Buy credits through the test provider's checkout.
    page.click("nav >> text=Billing")
    expect(page.locator("#balance")).to_contain_text("0.00")
    shoot("04-billing-empty")
    page.click("button[data-pack=builder]")
    expect(page).to_have_url(re.compile(r"/console/billing/checkout/pay_"))
    shoot("05-test-checkout")
    page.click("#pay")
    expect(page).to_have_url(re.compile(r"/console/billing\?paid=pay_"))
    expect(page.locator("#balance")).to_contain_text("20.00")
    expect(page.locator("#credit-history")).to_contain_text("purchase")
    shoot("06-billing-paid")

    # Create a key; it is shown once.
    page.click("nav >> text=API keys")
    shoot("07-keys-empty")
    page.fill("#name", "e2e backend")
    page.fill("#spend_limit", "5")
    page.click("#create-key button[type=submit]")
    key = page.locator("#new-key-value").inner_text().strip()
    assert key.startswith("sk-mesh-")
    expect(page.locator("#key-list")).to_contain_text("e2e backend")
    shoot("08-key-created")

    # Call the public API with it, as a customer's backend would.
    client = openai.OpenAI(base_url=console_gateway.base_url, api_key=key, max_retries=0)
    reply = client.chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "hello from the browser test"}]
    )
    assert reply.choices[0].message.content == "Hello! You said: hello from the browser test"
    stream = client.chat.completions.create(
        model="test-reasoner", messages=[{"role": "user", "content": "and a streamed one"}], stream=True,
        stream_options={"include_usage": True},
    )
    assert any(chunk.usage for chunk in stream)

    # The requests appear in the dashboard's table and charts (usage is written in batches).
    deadline = time.monotonic() + 15
    while True:
        page.goto(base + "/console/dashboard")
        # The charts and the table are separate reads: wait until a flush is visible to both.
        charted = page.locator("#usage-charts svg rect.series-0").count() >= 1
        if (charted and page.locator("#recent-requests tbody tr").count() >= 2) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    rows = page.locator("#recent-requests tbody tr")
    expect(rows).to_have_count(2)
    expect(page.locator("#recent-requests")).to_contain_text("test-model")
    expect(page.locator("#recent-requests")).to_contain_text("e2e backend")
    assert page.locator("#usage-charts svg rect.series-0").count() >= 1
    expect(page.locator("#usage-by-model")).to_contain_text("test-reasoner")
    expect(page.locator("#usage-by-model svg.bars")).to_have_count(2)
    expect(page.locator("#month-spend")).not_to_contain_text("0.00credits")
    shoot("09-dashboard-usage")

    # Revoke the key: the API refuses it at once.
    page.click("nav >> text=API keys")
    page.click("#key-list tr:has-text('e2e backend') button:has-text('Revoke')")
    expect(page.locator(".flash.ok")).to_contain_text("revoked")
    expect(page.locator("#key-list")).not_to_contain_text("e2e backend")
    shoot("10-key-revoked")
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "again"}])
    assert refused.value.status_code == 401

    # The playground streams a reply and shows what the turn cost.
    page.click("nav >> text=Playground")
    shoot("11-playground-empty")
    page.select_option("#model", "test-model")
    page.fill("#prompt", "What is Mesh?")
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    expect(answer.locator(".text")).to_have_text("Hello! You said: What is Mesh?")
    expect(answer.locator(".stats")).to_contain_text("credits")
    expect(page.locator("#session-total")).not_to_contain_text("0 tokens")
    shoot("12-playground-chat")

    page.click("nav >> text=Models")
    expect(page.locator("#model-table")).to_contain_text("test-model")
    expect(page.locator("tr[data-model=test-model]")).to_contain_text("available")
    shoot("13-models")
    page.click("nav >> text=Quick start")
    expect(page.locator("#code-openai")).to_contain_text(console_gateway.base_url)
    shoot("14-quickstart")
    page.click("a:has-text('Settings')")
    shoot("15-settings")
    assert not errors, errors
    context.close()


def test_customer_pages_phone(
    chromium: Browser, console_gateway: GatewayProcess, artifacts: Path, customer_email: str
) -> None:
    context = chromium.new_context(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    page = context.new_page()
    shoot = shooter(page, artifacts, "phone")
    base = console_gateway.url
    page.goto(base + "/console/signup")
    no_sideways_scroll(page)
    shoot("02-signup")
    page.goto(base + "/console/signin")
    shoot("01-signin")
    sign_in(page, base, customer_email)
    no_sideways_scroll(page)
    shoot("03-dashboard")
    for path, name in [("billing", "06-billing"), ("keys", "08-keys"), ("models", "13-models"),
                       ("quickstart", "14-quickstart"), ("settings", "15-settings"),
                       ("playground", "11-playground")]:
        page.goto(f"{base}/console/{path}")
        no_sideways_scroll(page)
        shoot(name)
    page.fill("#prompt", "hi from a phone")
    page.click("#send")
    expect(page.locator(".msg.assistant .stats").last).to_contain_text("credits")
    shoot("12-playground-chat")
    context.close()


def no_sideways_scroll(page: Page) -> None:
    """The page itself never scrolls sideways on a phone (wide tables scroll inside their card)."""
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"{page.url} is {width}px wide"


def test_operator_pages(chromium: Browser, console_gateway: GatewayProcess, artifacts: Path,
                        customer_email: str) -> None:
    base = console_gateway.url
    for viewport, width in ((DESKTOP, "desktop"), (PHONE, "phone")):
        context = chromium.new_context(viewport=viewport)
        page = context.new_page()
        shoot = shooter(page, artifacts, width)
        if width == "desktop":
            sign_up(page, base, ADMIN_EMAIL)
        else:
            sign_in(page, base, ADMIN_EMAIL)
        page.click("nav >> text=Operator")
        expect(page.locator("#accounts-table")).to_contain_text(customer_email)
        shoot("20-admin-accounts")
        page.click(f"#accounts-table tr:has-text('{customer_email}') >> text=Open")
        if width == "desktop":
            page.fill("#amount", "2.5")
            page.fill("#memo", "e2e goodwill")
            page.click("#grant button[type=submit]")
            expect(page.locator(".flash.ok")).to_contain_text("2.50 credits")
        shoot("21-admin-account")
        for path, name in [("usage", "22-admin-usage"), ("models", "23-admin-fleet"), ("workers", "24-admin-workers")]:
            page.goto(f"{base}/console/admin/{path}")
            shoot(name)
        page.goto(base + "/console/admin/codes")
        page.fill("#amount", "3")
        page.fill("#count", "2")
        page.click("button:has-text('Mint codes')")
        expect(page.locator("#codes")).to_contain_text("MESH-")
        shoot("25-admin-codes")
        context.close()
