"""``mesh serve --quickstart``: the newcomer's first minute.

Creates (once) a local account named ``quickstart`` with free credits and a key, keeps
the key in ``.mesh/quickstart-key`` (mode 0600) so later runs reuse it, and prints the
base URL and a ready-to-paste curl line.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from pathlib import Path

import typer

from mesh.billing.money import format_credits, parse_credits
from mesh.billing.services import Services, open_services
from mesh.config import Settings
from mesh.errors import AuthenticationFailed

ACCOUNT_NAME = "quickstart"
KEY_FILE = Path(".mesh") / "quickstart-key"


async def _ensure(settings: Settings) -> tuple[str, str, int]:
    services = await open_services(settings, background=False)
    try:
        return await _ensure_with(services, settings)
    finally:
        await services.aclose()


async def _ensure_with(services: Services, settings: Settings) -> tuple[str, str, int]:
    account_id = None
    for account in await services.accounts.list_accounts(limit=1000):
        if account.name == ACCOUNT_NAME:
            account_id = account.id
            break
    if account_id is None:
        account_id = (await services.accounts.create(ACCOUNT_NAME)).id
    # The idempotency key makes the free credit a one-time gift, however often this runs.
    await services.ledger.grant(
        account_id,
        parse_credits(settings.billing.quickstart_credits),
        idempotency_key=f"quickstart:{account_id}",
        memo="quick start credits",
    )
    key = KEY_FILE.read_text().strip() if KEY_FILE.exists() else ""
    try:
        principal = await services.authenticator.authenticate(key or None)
        if principal.account_id != account_id:
            raise AuthenticationFailed("the saved key belongs to another account")
    except AuthenticationFailed:
        created = await services.accounts.create_key(account_id, name="quickstart")
        key = created.key
        KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
    balance, held = await services.ledger.balance(account_id)
    return account_id, key, balance - held


def prepare(settings: Settings, host: str, port: int) -> None:
    account_id, key, available = asyncio.run(_ensure(settings))
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown_host}:{port}/v1"
    model = settings.models[0].id
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Say hello!"}}], "stream": true}}'
    curl = (
        f"curl -N {base}/chat/completions -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )
    typer.echo(
        "\n".join(
            [
                "",
                "Mesh is starting.",
                f"  Base URL:   {base}",
                f"  API key:    {key}   (saved in {KEY_FILE}; account {account_id})",
                f"  Credits:    {format_credits(available)}",
                f"  Models:     {', '.join(m.id for m in settings.models)}",
                *([f"  Console:    http://{shown_host}:{port}/console  (sign up to manage credits and keys)"]
                  if settings.console.enabled else []),
                "",
                "Try it:",
                f"  {curl}",
                "",
            ]
        )
    )
