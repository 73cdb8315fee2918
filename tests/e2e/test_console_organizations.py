"""The organization walk of issue 18 in real Chromium against a real gateway: an owner
invites a developer and a viewer (the links come from the gateway's log: no SMTP); the
developer signs up through the link, creates a key and calls the API; the viewer sees usage
but gets 403 on keys and billing; the owner removes the developer, whose session ends at
once; every step is in the audit log."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

import openai
from playwright.sync_api import Browser, BrowserContext, expect

from support.gateway import GatewayProcess

from .conftest import DESKTOP
from .test_console_browser import PASSWORD, shooter, sign_up


def _link(gateway: GatewayProcess, email: str) -> str:
    deadline = time.monotonic() + 10
    pattern = re.compile(rf"mail to {re.escape(email)} .*?(/console/invitations/[A-Za-z0-9_-]+)", re.S)
    while True:
        found = pattern.search(gateway.log())
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert found, f"no invitation for {email} in the log"
    return found.group(1)


def _join(context: BrowserContext, base: str, link: str) -> None:
    page = context.pages[0] if context.pages else context.new_page()
    page.goto(base + link)
    expect(page.locator("h1")).to_contain_text("Join")
    page.fill("#password", PASSWORD)
    page.fill("#password_confirm", PASSWORD)
    page.click("#accept")
    expect(page).to_have_url(re.compile(r"/console/dashboard$"))
    expect(page.locator(".flash.ok")).to_contain_text("Welcome to")


def test_owner_invites_developer_and_viewer_then_removes_the_developer(
    chromium: Browser, console_gateway: GatewayProcess, artifacts: Path
) -> None:
    base = console_gateway.url
    tag = secrets.token_hex(4)
    owner_email, dev_email, viewer_email = (f"e2e-{who}-{tag}@example.com" for who in ("owner", "dev", "viewer"))
    owner_ctx, dev_ctx, viewer_ctx = (chromium.new_context(viewport=DESKTOP) for _ in range(3))
    errors: list[str] = []
    owner = owner_ctx.new_page()
    owner.on("dialog", lambda dialog: dialog.accept())
    owner.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    shoot = shooter(owner, artifacts, "organizations")

    # The owner buys credits and invites two people.
    sign_up(owner, base, owner_email)
    owner.click("nav >> text=Billing")
    owner.click("button[data-pack=builder]")
    owner.click("#pay")
    expect(owner).to_have_url(re.compile(r"/console/billing\?paid=pay_"))
    owner.click("nav >> text=Members")
    for email, role in ((dev_email, "developer"), (viewer_email, "viewer")):
        owner.fill("#invite-email", email)
        owner.select_option("#invite-role", role)
        owner.click("#invite button[type=submit]")
        expect(owner.locator(".flash.ok")).to_contain_text(f"Invitation sent to {email}")
    expect(owner.locator("#invitations")).to_contain_text(dev_email)
    shoot("01-invitations-pending")

    # The developer signs up through the link, creates a key and calls the API.
    dev = dev_ctx.new_page()
    _join(dev_ctx, base, _link(console_gateway, dev_email))
    dev.click("nav >> text=API keys")
    dev.fill("#name", "dev backend")
    dev.click("#create-key button[type=submit]")
    key = dev.locator("#new-key-value").inner_text().strip()
    with openai.OpenAI(base_url=console_gateway.base_url, api_key=key, max_retries=0) as client:
        reply = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content

    # The viewer signs up too: usage yes, keys and billing no.
    viewer = viewer_ctx.new_page()
    _join(viewer_ctx, base, _link(console_gateway, viewer_email))
    expect(viewer.locator("nav")).not_to_contain_text("API keys")
    expect(viewer.locator("nav")).not_to_contain_text("Billing")
    deadline = time.monotonic() + 10
    while True:  # the developer's request reaches usage when it settles
        viewer.goto(base + "/console/dashboard")
        if "test-model" in viewer.locator("main").inner_text() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    expect(viewer.locator("main")).to_contain_text("test-model")
    for path in ("/console/keys", "/console/billing"):
        response = viewer.goto(base + path)
        assert response is not None and response.status == 403, path
        expect(viewer.locator("h1")).to_contain_text("Not allowed")

    # The owner sees the developer's key, then removes the developer: signed out at once.
    owner.click("nav >> text=API keys")
    expect(owner.locator("#key-list tr:has-text('dev backend')")).to_contain_text(f"by {dev_email}")
    owner.click("nav >> text=Members")
    owner.locator(f"tr[data-member='{dev_email}'] button:has-text('Remove')").click()
    expect(owner.locator(".flash.ok")).to_contain_text("removed and signed out")
    shoot("02-developer-removed")
    dev.goto(base + "/console/keys")
    expect(dev).to_have_url(re.compile(r"/console/signin"))
    owner.click("nav >> text=API keys")
    expect(owner.locator("#key-list tr:has-text('dev backend')")).to_contain_text("no longer a member")

    # Every step is in the audit log.
    owner.click("nav >> text=Audit log")
    log = owner.locator("#audit")
    for action, who, target in (
        ("credits.purchased", "test checkout", ""),
        ("member.invited", owner_email, dev_email),
        ("member.invited", owner_email, viewer_email),
        ("member.joined", dev_email, dev_email),
        ("key.created", dev_email, ""),
        ("member.joined", viewer_email, viewer_email),
        ("access.denied", viewer_email, "/console/keys"),
        ("access.denied", viewer_email, "/console/billing"),
        ("member.removed", owner_email, dev_email),
    ):
        row = log.locator(f"tr[data-action='{action}']", has_text=who).filter(has_text=target)
        expect(row.first).to_be_visible()
    shoot("03-audit-log")
    assert not errors, errors
    for ctx in (owner_ctx, dev_ctx, viewer_ctx):
        ctx.close()
