"""Log-in and user administration."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from appliance.api.deps import Admin, Operator, daemon_of
from appliance.auth import Role
from appliance.errors import UserError

log = logging.getLogger(__name__)
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


@router.post("/auth/token", response_model=TokenOut)
async def login(body: LoginIn, request: Request) -> dict[str, Any]:
    """Exchange a user name and password for a bearer token (valid 12 h)."""
    daemon = daemon_of(request)
    who = await asyncio.to_thread(daemon.users.verify, body.username, body.password)
    if who is None:
        log.warning("failed log-in for '%s' from %s", body.username,
                    request.client.host if request.client else "?")
        raise HTTPException(401, "wrong user name or password")
    token, expires = daemon.tokens.issue(who)
    return {"access_token": token, "user": who.name, "role": who.role, "expires_at": expires}


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
    except UserError as exc:
        raise HTTPException(404, str(exc)) from exc
    await asyncio.to_thread(daemon.store.audit, who.name, who.role, "user.remove", name, {})
    return {"removed": name}
