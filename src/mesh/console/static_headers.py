"""Security headers on the console's static files (scripts, styles, images).

``nosniff`` keeps a browser from running a file as something its type does not say; the
CSP forbids everything to a file opened on its own (an SVG with script, say).
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC_CSP = "default-src 'none'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; sandbox"


class StaticHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["x-content-type-options"] = "nosniff"
                headers["content-security-policy"] = STATIC_CSP
                headers["referrer-policy"] = "same-origin"
            await send(message)

        await self.app(scope, receive, send_with_headers)
