"""Security headers on every HTTP response of the API and of the dashboard (one ASGI middleware).

Both servers are Starlette applications (FastAPI for the API, ``st.App`` for the dashboard), so one
pure ASGI middleware serves both; it leaves WebSocket traffic alone and never replaces a header a
route set itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_HEADERS: Mapping[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
"""JSON, images and CSV: nothing to run, nothing to embed, nothing for a shared cache to keep."""

API_DOCS_PATHS = ("/docs", "/redoc")
"""FastAPI's interactive docs load Swagger UI / ReDoc from a CDN with an inline script: they keep
every header but the Content-Security-Policy, and may still not be framed."""


def api_headers(path: str) -> Mapping[str, str]:
    if path.startswith(API_DOCS_PATHS):
        return {**{k: v for k, v in API_HEADERS.items() if k != "Content-Security-Policy"},
                "Content-Security-Policy": "frame-ancestors 'none'"}
    return API_HEADERS


class SecurityHeaders:
    """ASGI middleware: adds ``headers_for(path)`` to each HTTP response that does not set them."""

    def __init__(self, app: ASGIApp, headers_for: Callable[[str], Mapping[str, str]]) -> None:
        self.app = app
        self.headers_for = headers_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        wanted = self.headers_for(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                for name, value in wanted.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
