"""Operator commands: ``accounts``, ``credits``, ``keys``, ``usage`` and ``redeem``.

Rate limits: ``mesh keys create ACCOUNT_ID --rpm N --tpm N --concurrent N``,
``mesh accounts limits ACCOUNT_ID --rpm N ...`` and ``mesh keys limits KEY_ID --rpm N ...``
(``0``: no limit; ``default``: back to the configured default; no option: show them).

Each command loads the settings (``--config`` / ``MESH_CONFIG``), migrates the configured
database, does its work and exits. ``--json`` prints one JSON object for scripts (amounts
are strings with 6 decimals); without it a table is printed. Errors go to stderr with
exit code 1 (2 for bad arguments or configuration).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from mesh.admin.views import account_json, balance_json, daily_json, entry_json, key_json
from mesh.billing.money import MicroCredits, format_credits, parse_credits
from mesh.config import Settings
from mesh.errors import MeshError
from mesh.limits.policy import FIELDS, effective

if TYPE_CHECKING:  # the store and services are imported where a command runs: `mesh serve` and
    # `mesh --help` start without them (SQLAlchemy and the billing services: ~0.5 s)
    from mesh.billing.services import Services

T = TypeVar("T")

accounts_app = typer.Typer(no_args_is_help=True, help="Create and list accounts.")
credits_app = typer.Typer(no_args_is_help=True, help="Grant credits and read balances.")
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
redeem_app = typer.Typer(no_args_is_help=True, help="Mint redeem codes.")

JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of a table.")
_LIMIT_HELP = "0 for no limit, 'default' for the configured default."
RPM_OPT = typer.Option(None, "--rpm", help="Requests per minute; " + _LIMIT_HELP)
TPM_OPT = typer.Option(None, "--tpm", help="Tokens (input + output) per minute; " + _LIMIT_HELP)
CONCURRENT_OPT = typer.Option(None, "--concurrent", help="Requests in flight at once; " + _LIMIT_HELP)
CLEAR_OPT = typer.Option(False, "--clear", help="Drop every override: back to the configured defaults.")


def register(app: typer.Typer) -> None:
    """Add the operator commands to the ``mesh`` command."""
    app.add_typer(accounts_app, name="accounts")
    app.add_typer(credits_app, name="credits")
    app.add_typer(keys_app, name="keys")
    app.add_typer(redeem_app, name="redeem")
    app.command("usage")(usage)


def _settings() -> Settings:
    from mesh.cli import _state

    loaded: Settings = _state.settings()
    return loaded


def _run(work: Callable[[Services], Awaitable[T]]) -> T:
    from mesh.billing.services import open_services

    settings = _settings()

    async def main() -> T:
        services = await open_services(settings, background=False)
        try:
            return await work(services)
        finally:
            await services.aclose()

    try:
        return asyncio.run(main())
    except MeshError as err:
        typer.echo(f"error: {err.message}", err=True)
        raise typer.Exit(1) from None
    except ValueError as err:  # a bad database URL, mostly
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _credits(text: str, what: str, *, allow_negative: bool = False) -> MicroCredits:
    try:
        return parse_credits(text, allow_negative=allow_negative)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=what) from None


def _limit(text: str | None, what: str) -> int | None:
    if text is None or text.strip().lower() == "default":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise typer.BadParameter("expected a whole number >= 0 or 'default'", param_hint=what)
    return value


def _limits_patch(
    rpm: str | None, tpm: str | None, concurrent: str | None, clear: bool
) -> dict[str, int | None] | None:
    """The overrides the options ask for; ``None`` for ``--clear``; ``{}`` for nothing."""
    if clear:
        return None
    given = {"rpm": rpm, "tpm": tpm, "concurrent": concurrent}
    return {name: _limit(text, f"--{name}") for name, text in given.items() if text is not None}


def _limits_out(settings: Settings, scope: str, item: dict[str, Any]) -> dict[str, Any]:
    default = settings.limits.account if scope == "account" else settings.limits.key
    eff = effective(item["rate_limits"], default)
    return {**item, "effective_rate_limits": {name: getattr(eff, name) for name in FIELDS}}


def _print_limits(out: dict[str, Any]) -> None:
    overrides, eff = out["rate_limits"], out["effective_rate_limits"]
    for name in FIELDS:
        shown = "none" if eff[name] is None else str(eff[name])
        source = "default" if overrides[name] is None else "override"
        typer.echo(f"{name:>10}  {shown}  ({source})")


def _emit(data: dict[str, Any]) -> None:
    typer.echo(json.dumps(data, indent=2))


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console  # only for a table: `mesh serve` starts without rich
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    Console().print(table)


@accounts_app.command("create")
def accounts_create(name: str = typer.Argument(..., help="Display name."), as_json: bool = JSON_OPT) -> None:
    """Create an account with no credits; prints its id."""
    account = _run(lambda s: s.accounts.create(name))
    if as_json:
        _emit(account_json(account))
    else:
        typer.echo(account.id)


@accounts_app.command("list")
def accounts_list(
    limit: int = typer.Option(100, "--limit", min=1, max=1000),
    offset: int = typer.Option(0, "--offset", min=0),
    as_json: bool = JSON_OPT,
) -> None:
    """List accounts with their balances."""
    found = _run(lambda s: s.accounts.list_accounts(limit=limit, offset=offset))
    if as_json:
        _emit({"object": "list", "data": [account_json(a) for a in found]})
        return
    _table(
        "Accounts",
        ["id", "name", "balance", "held", "created"],
        [[a.id, a.name, format_credits(a.balance), format_credits(a.held), a.created_at.isoformat()] for a in found],
    )


@accounts_app.command("limits")
def accounts_limits(
    account_id: str = typer.Argument(...),
    rpm: str | None = RPM_OPT,
    tpm: str | None = TPM_OPT,
    concurrent: str | None = CONCURRENT_OPT,
    clear: bool = CLEAR_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Show or set an account's rate limits (shared by all of its keys)."""
    patch = _limits_patch(rpm, tpm, concurrent, clear)

    async def work(s: Services) -> dict[str, Any]:
        if patch == {}:
            return account_json(await s.accounts.get(account_id))
        account = await s.accounts.set_account_limits(account_id, patch)
        await s.authenticator.account_changed(account_id)
        return account_json(account)

    out = _limits_out(_settings(), "account", _run(work))
    if as_json:
        _emit(out)
    else:
        _print_limits(out)


@credits_app.command("grant")
def credits_grant(
    account_id: str = typer.Argument(...),
    amount: str = typer.Argument(..., help="Credits, a decimal such as 12.5 (up to 6 decimals)."),
    idempotency_key: str | None = typer.Option(None, "--idempotency-key", help="Retries with it grant once."),
    kind: str = typer.Option("grant", "--kind", help="grant, purchase, refund or adjustment (may be negative)."),
    memo: str | None = typer.Option(None, "--memo"),
    as_json: bool = JSON_OPT,
) -> None:
    """Add credits to an account (one ledger row)."""
    micro = _credits(amount, "AMOUNT", allow_negative=kind == "adjustment")

    async def work(s: Services) -> dict[str, Any]:
        entry = await s.ledger.grant(account_id, micro, idempotency_key, kind, memo)
        balance, held = await s.ledger.balance(account_id)
        return {"account_id": account_id, "entry": entry_json(entry), **balance_json(balance, held)}

    out = _run(work)
    if as_json:
        _emit(out)
    else:
        typer.echo(f"{out['entry']['amount']} credits → {account_id}; balance {out['balance']}")


@credits_app.command("balance")
def credits_balance(account_id: str = typer.Argument(...), as_json: bool = JSON_OPT) -> None:
    """Show an account's balance, held credit and what is available."""
    balance, held = _run(lambda s: s.ledger.balance(account_id))
    out = balance_json(balance, held)
    if as_json:
        _emit(out)
    else:
        typer.echo(f"balance {out['balance']}  held {out['held']}  available {out['available']}")


@keys_app.command("create")
def keys_create(
    account_id: str = typer.Argument(...),
    name: str = typer.Option("", "--name", help="A label for listings."),
    models: str | None = typer.Option(None, "--models", help="Comma-separated model ids the key may use."),
    expires_in_days: int | None = typer.Option(None, "--expires-in-days", min=1),
    spend_limit: str | None = typer.Option(None, "--spend-limit", help="Most credits the key may spend (per period)."),
    period: str = typer.Option("none", "--period", help="Budget period: none, daily, weekly or monthly (UTC)."),
    reset_day: int | None = typer.Option(None, "--reset-day", help="Weekday 0-6 (weekly) or day 1-28 (monthly)."),
    rpm: str | None = RPM_OPT,
    tpm: str | None = TPM_OPT,
    concurrent: str | None = CONCURRENT_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Create an API key; the full key is printed once and never stored."""
    from mesh.store import utcnow

    rate_limits = _limits_patch(rpm, tpm, concurrent, False)
    allowed = None if models is None else [m for m in models.split(",") if m.strip()]
    limit = None if spend_limit is None else _credits(spend_limit, "--spend-limit")
    expires = None if expires_in_days is None else utcnow() + timedelta(days=expires_in_days)
    created = _run(
        lambda s: s.accounts.create_key(
            account_id,
            name=name,
            allowed_models=allowed,
            expires_at=expires,
            spend_limit=limit,
            rate_limits=rate_limits,
            budget_period=period,
            budget_reset_day=reset_day,
        )
    )
    if as_json:
        _emit({**key_json(created.info), "key": created.key})
    else:
        typer.echo(created.key)
        typer.echo(f"({created.info.id}; store the key now: it is not shown again)", err=True)


@keys_app.command("list")
def keys_list(account_id: str = typer.Argument(...), as_json: bool = JSON_OPT) -> None:
    """List an account's keys (prefixes only)."""

    async def work(s: Services) -> list[Any]:
        await s.accounts.get(account_id)
        return await s.accounts.list_keys(account_id)

    keys = _run(work)
    if as_json:
        _emit({"object": "list", "data": [key_json(k) for k in keys]})
        return
    _table(
        f"Keys of {account_id}",
        ["id", "name", "prefix", "models", "spent", "limit", "expires", "revoked", "last used"],
        [
            [
                k.id,
                k.name,
                k.prefix + "…",
                "all" if k.allowed_models is None else ",".join(k.allowed_models),
                format_credits(k.spent),
                None if k.spend_limit is None else format_credits(k.spend_limit),
                k.expires_at and k.expires_at.isoformat(),
                k.revoked_at and k.revoked_at.isoformat(),
                k.last_used_at and k.last_used_at.isoformat(),
            ]
            for k in keys
        ],
    )


@keys_app.command("limits")
def keys_limits(
    key_id: str = typer.Argument(...),
    rpm: str | None = RPM_OPT,
    tpm: str | None = TPM_OPT,
    concurrent: str | None = CONCURRENT_OPT,
    clear: bool = CLEAR_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Show or set a key's own rate limits (its account's apply as well)."""
    patch = _limits_patch(rpm, tpm, concurrent, clear)

    async def work(s: Services) -> dict[str, Any]:
        if patch == {}:
            return key_json(await s.accounts.get_key(key_id))
        info = await s.accounts.set_key_limits(key_id, patch)
        await s.authenticator.key_changed(key_id)
        return key_json(info)

    out = _limits_out(_settings(), "key", _run(work))
    if as_json:
        _emit(out)
    else:
        _print_limits(out)


@keys_app.command("budget")
def keys_budget(
    key_id: str = typer.Argument(...),
    limit: str | None = typer.Option(None, "--limit", help="Credits per period; 'none' for no limit."),
    period: str | None = typer.Option(None, "--period", help="none, daily, weekly or monthly (UTC)."),
    reset_day: int | None = typer.Option(None, "--reset-day", help="Weekday 0-6 (weekly) or day 1-28 (monthly)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Show or set a key's budget: a spend limit per period that resets (a new period or
    reset day starts a new period now)."""
    amount = None if limit in (None, "none") else _credits(limit, "--limit")

    async def work(s: Services) -> Any:
        if limit is None and period is None and reset_day is None:
            return await s.accounts.get_key(key_id)
        info = await s.accounts.set_key_budget(
            key_id, spend_limit=amount, change_limit=limit is not None, period=period, reset_day=reset_day,
            change_reset_day=reset_day is not None,
        )
        await s.authenticator.key_changed(key_id)
        return info

    k = _run(work)
    out = key_json(k)
    if as_json:
        _emit(out)
    else:
        typer.echo(
            f"{k.id}: budget {out['spend_limit'] or 'none'} ({k.budget_period})  spent {out['spent']}  "
            f"remaining {out['budget_remaining'] or '-'}  resets {out['budget_resets_at'] or 'never'}"
        )


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(...), as_json: bool = JSON_OPT) -> None:
    """Revoke a key at once (gateways sharing Redis drop it from their caches immediately)."""
    changed = _run(lambda s: s.authenticator.revoke(key_id))
    if as_json:
        _emit({"id": key_id, "revoked": True, "already_revoked": not changed})
    else:
        typer.echo(f"revoked {key_id}" if changed else f"{key_id} was already revoked")


def usage(
    account: str | None = typer.Option(None, "--account", help="One account (default: all)."),
    days: int = typer.Option(30, "--days", min=1, max=3660),
    as_json: bool = JSON_OPT,
) -> None:
    """Usage by UTC day and model."""
    from mesh.billing.usage import daily_usage

    rows = _run(lambda s: daily_usage(s.database, account_id=account, days=days))
    if as_json:
        _emit({"object": "list", "days": days, "data": [daily_json(d) for d in rows]})
        return
    _table(
        f"Usage, last {days} days",
        ["day", "account", "model", "requests", "input", "cached", "output", "reasoning", "cost"],
        [
            [
                d.day.isoformat(),
                d.account_id,
                d.model,
                d.requests,
                d.input_tokens,
                d.cached_tokens,
                d.output_tokens,
                d.reasoning_tokens,
                format_credits(d.cost),
            ]
            for d in rows
        ],
    )


@redeem_app.command("mint")
def redeem_mint(
    amount: str = typer.Argument(..., help="Credits per code, e.g. 5 or 2.5."),
    count: int = typer.Option(1, "--count", min=1, max=1000),
    as_json: bool = JSON_OPT,
) -> None:
    """Mint single-use redeem codes; they are printed once and stored hashed."""
    micro = _credits(amount, "AMOUNT")
    minted = _run(lambda s: s.redeem.mint(micro, count))
    if as_json:
        _emit({"amount": format_credits(micro), "codes": [m.code for m in minted]})
    else:
        for m in minted:
            typer.echo(m.code)
