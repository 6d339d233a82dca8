"""A small client of the daemon's API for the CLI: log in once, raise a clear error on refusal."""

from __future__ import annotations

import os
from typing import Any

import httpx

from appliance.errors import UserError


class ApiClient:
    def __init__(self, base_url: str, user: str | None = None, password: str | None = None,
                 token: str | None = None) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/") + "/api/v1", timeout=30)
        token = token or os.environ.get("APPLIANCE_API_TOKEN")
        self._anonymous = user is None and not token
        if user is not None:
            login = self._call("POST", "/auth/token", json={"username": user, "password": password or ""})
            token = login["access_token"]
        if token:
            self._http.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise UserError(f"cannot reach the daemon at {self._http.base_url} ({exc})") from exc
        if resp.status_code == 401 and self._anonymous:
            raise UserError("not logged in: pass --user NAME (the password is asked for, or taken from "
                            "$APPLIANCE_PASSWORD), or set APPLIANCE_API_TOKEN")
        if resp.status_code >= 400:
            raise UserError(f"{method} {path}: {resp.status_code} {_detail(resp)}")
        return resp.json()

    def get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", path, json=body or {})


def _detail(resp: httpx.Response) -> str:
    """The API's reason in words: FastAPI's validation errors as 'field: message; …'."""
    try:
        detail = resp.json().get("detail", resp.text)
    except ValueError:
        return resp.text
    if isinstance(detail, dict):
        detail = detail.get("message", detail)
    if isinstance(detail, list):  # [{"loc": ["query", "disposition"], "msg": "Input should be …"}, …]
        return "; ".join(f"{'.'.join(map(str, e.get('loc', [])[1:])) or 'request'}: {e.get('msg', e)}"
                         if isinstance(e, dict) else str(e) for e in detail)
    return str(detail)
