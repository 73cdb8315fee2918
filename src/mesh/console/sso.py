"""Sign in with OpenID Connect (any provider the operator configures in ``console.sso``).

The OAuth client is Authlib's (authorization URL with PKCE, the code exchange); the ID token
is verified with joserfc (Authlib's JOSE library) against the provider's JWKS: signature,
issuer, audience, expiry and our nonce. The state, nonce and PKCE verifier travel in a
short-lived cookie signed with the console secret, so any gateway replica can finish the
sign-in. Only an email the provider marks verified is accepted; it signs in the person with
that email (created if new) and makes them a member of the organizations that claim its
domain (``mesh.accounts.sso``).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
import unicodedata
from typing import TYPE_CHECKING, Any

from starlette.responses import Response
from starlette.routing import Route

from mesh.accounts.sso import SingleSignOn
from mesh.config import OidcProvider
from mesh.console.auth_routes import _next_url, start_session
from mesh.console.passwords import normalize_email
from mesh.console.secrets import sign, verify
from mesh.console.web import PREFIX, Console, Page

if TYPE_CHECKING:  # imported where used: httpx, Authlib and joserfc (cryptography) cost a
    # gateway about half a second at start, and most gateways never sign anyone in with SSO
    from authlib.integrations.httpx_client import AsyncOAuth2Client
    from joserfc.jwk import KeySet

log = logging.getLogger("mesh.console.sso")
STATE_COOKIE = "mesh_sso"
STATE_SECONDS = 600
DISCOVERY_SECONDS = 3600.0
HTTP_TIMEOUT = 10.0


class SsoFailed(Exception):
    """The sign-in cannot finish; the message is safe to show."""


class Discovery:
    """The providers' metadata and keys, fetched over HTTPS and kept an hour."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[float, dict[str, Any], KeySet]] = {}

    async def get(self, provider: OidcProvider) -> tuple[dict[str, Any], KeySet]:
        hit = self._cache.get((provider.id, provider.issuer))
        if hit is not None and time.monotonic() - hit[0] < DISCOVERY_SECONDS:
            return hit[1], hit[2]
        import httpx
        from joserfc.errors import JoseError
        from joserfc.jwk import KeySet

        url = provider.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
                meta = (await client.get(url)).raise_for_status().json()
                keys = KeySet.import_key_set((await client.get(meta["jwks_uri"])).raise_for_status().json())
        except (httpx.HTTPError, KeyError, ValueError, JoseError) as exc:
            log.warning("OIDC discovery for %s failed: %s", provider.id, exc)
            raise SsoFailed(f"{provider.name} cannot be reached right now; try again in a moment.") from None
        if meta.get("issuer", "").rstrip("/") != provider.issuer.rstrip("/"):
            raise SsoFailed(f"{provider.name} is misconfigured (issuer mismatch).")
        self._cache[(provider.id, provider.issuer)] = (time.monotonic(), meta, keys)
        return meta, keys


_discovery = Discovery()


def _provider(page: Page) -> OidcProvider | None:
    wanted = page.request.path_params["provider"]
    return next((p for p in page.console.config.sso if p.id == wanted), None)


def _callback_url(page: Page, provider: OidcProvider) -> str:
    configured = page.console.settings.server.public_url
    base = configured.rstrip("/").removesuffix("/v1") if configured else str(page.request.base_url).rstrip("/")
    return f"{base}{PREFIX}/sso/{provider.id}/callback"


def _client(page: Page, provider: OidcProvider) -> AsyncOAuth2Client:
    from authlib.integrations.httpx_client import AsyncOAuth2Client

    return AsyncOAuth2Client(client_id=provider.client_id, client_secret=provider.client_secret.get_secret_value(),
                             scope=provider.scopes, redirect_uri=_callback_url(page, provider),
                             code_challenge_method="S256", timeout=HTTP_TIMEOUT)


def _error(page: Page, message: str, status: int = 400) -> Response:
    return page.render("signin.html", status=status, title="Sign in", email="", next=PREFIX + "/dashboard",
                       error=message, providers=page.console.config.sso)


async def start(page: Page) -> Response:
    provider = _provider(page)
    if provider is None:
        return page.render("error.html", status=404, title="Not found", message="There is no such sign-in provider.")
    try:
        meta, _ = await _discovery.get(provider)
    except SsoFailed as err:
        return _error(page, str(err), 502)
    state, nonce, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48)
    async with _client(page, provider) as client:
        url, _ = client.create_authorization_url(meta["authorization_endpoint"], state=state, code_verifier=verifier,
                                                 nonce=nonce)
    payload = base64.urlsafe_b64encode(json.dumps({
        "p": provider.id, "s": state, "n": nonce, "v": verifier, "t": int(time.time()),
        "next": _next_url(page.request.query_params.get("next", "")),
    }).encode()).decode()
    page.set_cookie(STATE_COOKIE, f"{payload}.{sign(page.bound.secret, 'sso', payload)}", STATE_SECONDS)
    return page.redirect(url)


def _state(page: Page, provider: OidcProvider) -> dict[str, Any]:
    raw = page.request.cookies.get(STATE_COOKIE, "")
    payload, _, signature = raw.partition(".")
    if not payload or not verify(page.bound.secret, "sso", payload, signature):
        raise SsoFailed("The sign-in took too long or came from elsewhere; start again.")
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload))
    fresh = time.time() - int(data.get("t", 0)) < STATE_SECONDS
    if data.get("p") != provider.id or not fresh or page.request.query_params.get("state") != data.get("s"):
        raise SsoFailed("The sign-in took too long or came from elsewhere; start again.")
    return data


async def _verified_email(page: Page, provider: OidcProvider, state: dict[str, Any]) -> str:
    from joserfc import jwt
    from joserfc.errors import JoseError

    meta, keys = await _discovery.get(provider)
    code = page.request.query_params.get("code")
    if not code:
        raise SsoFailed(f"{provider.name} did not sign you in ({page.request.query_params.get('error', 'no code')}).")
    async with _client(page, provider) as client:
        try:
            token = await client.fetch_token(meta["token_endpoint"], code=code, code_verifier=state["v"])
        except Exception as exc:  # Authlib raises its own errors and httpx's
            log.warning("OIDC token exchange with %s failed: %s", provider.id, exc)
            raise SsoFailed(f"{provider.name} refused the sign-in; start again.") from None
        try:
            decoded = jwt.decode(str(token.get("id_token", "")), keys, algorithms=["RS256", "ES256", "PS256"])
            jwt.JWTClaimsRegistry(
                iss={"essential": True, "value": meta["issuer"]},
                aud={"essential": True, "value": provider.client_id},
                exp={"essential": True},
                sub={"essential": True},
                nonce={"essential": True, "value": state["n"]},
            ).validate(decoded.claims)
        except (JoseError, ValueError) as exc:
            log.warning("OIDC ID token from %s rejected: %s", provider.id, exc)
            raise SsoFailed(f"{provider.name} sent an ID token that does not verify.") from None
        claims = dict(decoded.claims)
        if "email" not in claims and meta.get("userinfo_endpoint"):
            claims.update((await client.get(meta["userinfo_endpoint"])).json())
    raw = str(claims.get("email") or "")
    email = normalize_email(raw)
    # Only an address that lower case alone maps to ours: "\u212aate@…" (KELVIN SIGN) is another
    # mailbox to the provider, yet lower() makes it "kate@…", someone else's account here.
    stripped = raw.strip()
    if email is not None and (unicodedata.normalize("NFKC", stripped) != stripped
                              or any(not c.isascii() and c.lower().isascii() for c in stripped)):
        email = None
    if email is None or claims.get("email_verified") is not True:
        raise SsoFailed(f"{provider.name} did not give a verified email address.")
    return email


async def callback(page: Page) -> Response:
    provider = _provider(page)
    if provider is None:
        return page.render("error.html", status=404, title="Not found", message="There is no such sign-in provider.")
    page.set_cookie(STATE_COOKIE, None)
    try:
        state = _state(page, provider)
        email = await _verified_email(page, provider, state)
    except SsoFailed as err:
        return _error(page, str(err))
    vouched = {d.strip().lower().lstrip("@") for d in provider.domains}
    if vouched and email.rsplit("@", 1)[-1] not in vouched:
        log.warning("OIDC provider %s asserted %s, outside its domains", provider.id, email)
        return _error(page, f"{provider.name} does not vouch for that email's domain here.", 403)
    sso = SingleSignOn(page.services.database)
    users = page.bound.users
    user = await users.by_email(email)
    if user is None:
        claimed = await sso.organizations_for(email)
        if not page.console.config.allow_signup and not claimed:
            return _error(page, "There is no account for this email, and sign-up is closed.", 403)
        # A password nobody knows: this person signs in through SSO. Someone whose domain an
        # organization claims joins it (below) instead of getting an organization of their own.
        created = await users.sign_up(email, secrets.token_urlsafe(32),
                                      joining=claimed[0].account_id if claimed else None, verified=True)
        user = created or await users.by_email(email)
        if user is None:
            return _error(page, "The account could not be created; try again.", 500)
    if user.email_verified_at is None:
        # Whoever set this account's password never proved the email (maybe a stranger who
        # signed up with it first): that password must not start working now. A new, unknown
        # one replaces it (the person can reset it by mail) and any session ends.
        await users.reset_password(user.id, secrets.token_urlsafe(32))
    await users.mark_verified(user.id)  # the provider verified it
    joined = await sso.join_by_domain(user.id, email)
    for account_id, role in joined:
        await page.services.audit.record(page.actor_as(user), "member.joined", account_id=account_id, target=email,
                                         detail={"role": role, "via": f"sso:{provider.id}"})
    if joined:
        await users.set_landing(user.id, joined[0][0])
        user = await users.get(user.id) or user
    return await start_session(page, user, str(state.get("next") or PREFIX + "/dashboard"))


def sso_routes(console: Console) -> list[Route]:
    r = console.route
    return [
        r("/sso/{provider}", start, access="any"),
        r("/sso/{provider}/callback", callback, access="any"),
    ]
