"""Log-in and user administration."""

from __future__ import annotations

import asyncio
import math
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from appliance.api.deps import Admin, Operator, daemon_of
from appliance.auth import LastAdmin, Role
from appliance.errors import UserError
from appliance.login_guard import LoginRefused, Refusal

router = APIRouter(tags=["auth"])


class LoginIn(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "bearer"
    user: str
    role: Role
    expires_at: datetime


class UserIn(BaseModel):
    role: Role
    password: str = Field(min_length=10, max_length=256)


@router.post("/auth/token", response_model=TokenOut,
             responses={429: {"description": "too many failed log-ins: locked or backing off (Retry-After)"},
                        503: {"description": "too many log-ins waiting for a password check (Retry-After)"}})
async def login(body: LoginIn, request: Request) -> dict[str, Any]:
    """Exchange a user name and password for a bearer token (valid 12 h).

    Repeated failures make a user name, or an address, wait and then lock it (config ``login``);
    a refused attempt is answered at once, without checking the password."""
    daemon = daemon_of(request)
    guard, name = daemon.login_guard, body.username
    source = request.client.host if request.client else None
    try:
        who = await guard.check("api", name, source, daemon.users.verify, name, body.password)
    except LoginRefused as refused:
        raise _refused(refused.refusal, name) from None
    if who is None:
        if lock := guard.failed("api", name, source):
            raise _refused(lock, name)
        raise HTTPException(401, "wrong user name or password")
    guard.succeeded("api", name, source)
    token, expires = daemon.tokens.issue(who)
    return {"access_token": token, "user": who.name, "role": who.role, "expires_at": expires}


def _refused(refusal: Refusal, name: str) -> HTTPException:
    status = 503 if refusal.reason == "busy" else 429
    return HTTPException(status, refusal.message(name),
                         headers={"Retry-After": str(max(1, math.ceil(refusal.retry_after_s)))})


@router.get("/auth/me")
async def me(who: Operator) -> dict[str, str]:
    return {"user": who.name, "role": who.role}


@router.get("/users")
async def list_users(who: Admin, request: Request) -> list[dict[str, str]]:
    return [{"user": u.name, "role": u.role} for u in daemon_of(request).users.list()]


@router.put("/users/{name}")
async def set_user(name: str, body: UserIn, who: Admin, request: Request) -> dict[str, str]:
    """Create a user or change its role and password (admin)."""
    daemon = daemon_of(request)
    try:
        await asyncio.to_thread(daemon.users.set, name, body.role, body.password)
    except UserError as exc:
        raise HTTPException(422, str(exc)) from exc
    await asyncio.to_thread(daemon.store.audit, who.name, who.role, "user.set", name, {"role": body.role})
    return {"user": name, "role": body.role}


@router.delete("/users/{name}")
async def delete_user(name: str, who: Admin, request: Request) -> dict[str, str]:
    daemon = daemon_of(request)
    if name == who.name:
        raise HTTPException(422, "you cannot remove yourself")
    try:
        await asyncio.to_thread(daemon.users.remove, name)
    except LastAdmin as exc:
        raise HTTPException(422, str(exc)) from exc
    except UserError as exc:
        raise HTTPException(404, str(exc)) from exc
    await asyncio.to_thread(daemon.store.audit, who.name, who.role, "user.remove", name, {})
    return {"removed": name}


@router.post("/users/{name}/unlock")
async def unlock_user(name: str, who: Admin, request: Request) -> dict[str, Any]:
    """Lift the log-in lock of a user (on the API and OPC UA) before it expires (admin)."""
    daemon = daemon_of(request)
    was_locked = daemon.login_guard.unlock(name)
    await asyncio.to_thread(daemon.store.audit, who.name, who.role, "user.unlock", name,
                            {"was_locked": was_locked})
    return {"user": name, "was_locked": was_locked}
