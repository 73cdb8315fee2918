"""The role table in docs/organizations.md is the truth: every console and admin API route
the app serves is in it, and each role gets exactly the answer it says."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from mesh.accounts.members import Members
from mesh.accounts.roles import ROLES
from mesh.console.users import Users

from .conftest import Browser, account_of, create_key

DOC = Path(__file__).resolve().parents[2] / "docs" / "organizations.md"
_ROW = re.compile(r"^\| (GET|POST|PUT|PATCH|DELETE) \| (\S+) \|(.*)\|\s*$")
CELLS = {"yes", "no", "own", "operator", "admin key", "public"}
UNLISTED = {"/console/{path:path}"}  # the console's 404 page


def role_table() -> list[tuple[str, str, dict[str, str]]]:
    rows = []
    for line in DOC.read_text().splitlines():
        m = _ROW.match(line)
        if m:
            cells = [c.strip() for c in m.group(3).split("|")]
            assert len(cells) == len(ROLES) and set(cells) <= CELLS, line
            rows.append((m.group(1), m.group(2), dict(zip(ROLES, cells, strict=True))))
    return rows


def served(app: Starlette) -> set[tuple[str, str]]:
    out = set()
    for r in app.routes:
        if isinstance(r, Route) and r.path.startswith(("/console", "/admin/")) and r.path not in UNLISTED:
            out |= {(m, r.path) for m in (r.methods or ()) if m != "HEAD"}
    return out


def test_the_table_lists_every_route(console_app: Starlette) -> None:
    listed = {(method, path) for method, path, _ in role_table()}
    assert len(listed) == len(role_table()), "a route is listed twice"
    assert served(console_app) == listed


async def _member(console_app: Starlette, role: str) -> tuple[Browser, dict[str, str]]:
    """A person with ``role`` in a fresh organization that also has its founder (owner, who
    made a key) and a viewer; returns their browser and the path parameters to use."""
    db = console_app.state.gateway.services.database
    members, users = Members(db), Users(db)
    founder = Browser(console_app)
    await founder.sign_up()
    org = await account_of(founder)
    key_id, _ = await create_key(founder, "founder's key")
    extra = Browser(console_app)
    await extra.sign_up()
    target = await users.by_email(extra.email)
    await extra.aclose()
    person = Browser(console_app)
    await person.sign_up()
    me = await users.by_email(person.email)
    assert target is not None and me is not None
    await members.add(org, target.id, "viewer")
    await members.add(org, me.id, role)  # type: ignore[arg-type]
    r = await person.post("/console/organizations/switch", {"account_id": org})
    assert r.status_code == 303, r.text
    await founder.aclose()
    return person, {"key_id": key_id, "user_id": target.id, "account_id": org, "payment_id": "pay_none",
                    "generation_id": "gen_none", "invitation_id": "inv_none", "token": "tok_none", "provider": "none"}


async def _call(b: Browser, method: str, path: str) -> httpx.Response:
    if method == "GET":
        return await b.client.get(path)
    token = await b.csrf("/console/settings")
    if path.endswith("/playground/chat"):
        return await b.client.post(path, json={}, headers={"x-csrf-token": token})
    if method == "POST" and path.startswith("/console"):
        data = {"role": "viewer"} if path.endswith("/role") else {}
        return await b.client.post(path, data={**data, "csrf_token": token})
    return await b.client.request(method, path, json={})


@pytest.mark.parametrize("role", ROLES)
async def test_every_route_answers_each_role_as_the_table_says(console_app: Starlette, role: str) -> None:
    person, params = await _member(console_app, role)
    wrong = []
    try:
        for method, pattern, cells in role_table():
            path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: params[m.group(1)], pattern)
            r = await _call(person, method, path)
            expect = cells[role]
            if expect in ("no", "own", "operator"):
                ok = r.status_code == 403  # "own": the founder's key is not theirs
            elif expect == "admin key":
                ok = r.status_code == 401
            else:
                ok = r.status_code != 403 and r.status_code < 500
            if not ok:
                wrong.append(f"{method} {pattern}: {r.status_code}, the table says {expect}")
    finally:
        await person.aclose()
    assert not wrong, "\n".join(wrong)
