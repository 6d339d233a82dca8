"""The dashboard's only way to the appliance: the daemon's HTTP API with a bearer token.

The daemon alone owns the database (DESIGN.md), so every number the dashboard shows comes through
here.  Errors become :class:`ApiError` with the API's own message, so a page can show what went
wrong (403: "'olga' is operator; this needs the engineer role") instead of a stack trace.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
PREFIX = "/api/v1"


def base_url() -> str:
    """``APPLIANCE_API_URL`` (the daemon's address), without a trailing slash."""
    return os.environ.get("APPLIANCE_API_URL", DEFAULT_URL).rstrip("/")


class ApiError(Exception):
    """The API said no (or could not be reached: ``status`` 0)."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        detail = self.detail
        if isinstance(detail, dict):
            detail = detail.get("message") or detail
        if isinstance(detail, list):  # FastAPI's validation errors
            detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail
                               if isinstance(d, dict)) or detail
        return str(detail)

    @property
    def unavailable(self) -> bool:
        """The route does not exist on this daemon (an older or partial build)."""
        return self.status == 405 or (self.status == 404 and self.detail == "Not Found")


class Api:
    def __init__(self, token: str | None = None, url: str | None = None, timeout: float = 15.0) -> None:
        self.url = (url or base_url()) + PREFIX
        self.token = token
        self.timeout = timeout

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                json: Any = None, timeout: float | None = None) -> httpx.Response:
        clean = {k: v for k, v in (params or {}).items() if v is not None and v != ""}
        try:
            response = httpx.request(method, self.url + path, params=clean, json=json,
                                     headers=self._headers(), timeout=timeout or self.timeout)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"the appliance at {self.url} cannot be reached ({exc.__class__.__name__})"
                           ) from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail)
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params).json()

    def post(self, path: str, json: Any = None, **params: Any) -> Any:
        return self.request("POST", path, params=params, json=json if json is not None else {}).json()

    def put(self, path: str, json: Any = None) -> Any:
        return self.request("PUT", path, json=json or {}).json()

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path).json()

    def content(self, path: str, timeout: float | None = None, **params: Any) -> bytes:
        return self.request("GET", path, params=params, timeout=timeout).content

    def login(self, username: str, password: str) -> dict[str, Any]:
        """``{access_token, user, role, expires_at}``; raises ApiError(401) on a wrong password."""
        return dict(self.post("/auth/token", {"username": username, "password": password}))
