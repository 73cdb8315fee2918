"""``mesh console …``: operator commands for the web console's users."""

from __future__ import annotations

import asyncio

import typer

console_app = typer.Typer(no_args_is_help=True, help="Web console users.")


@console_app.command("make-admin")
def make_admin(
    email: str = typer.Argument(..., help="The console user's email."),
    revoke: bool = typer.Option(False, "--revoke", help="Take operator rights away instead."),
) -> None:
    """Give a console user the operator pages (accounts, grants, fleet, redeem codes)."""
    from mesh.billing.services import open_services  # here, not at the top: `mesh serve` starts without it
    from mesh.cli import _state
    from mesh.console.users import Users

    settings = _state.settings()

    async def main() -> bool:
        services = await open_services(settings, background=False)
        try:
            return await Users(services.database).set_admin(email, not revoke)
        finally:
            await services.aclose()

    if not asyncio.run(main()):
        typer.echo(f"error: no console user has the email {email!r} (they sign up first)", err=True)
        raise typer.Exit(1)
    typer.echo(f"{email} {'is no longer' if revoke else 'is now'} an operator")
