"""Who is calling: bearer tokens checked against the user store, roles enforced per route."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from appliance.auth import Identity, Role, role_at_least

if TYPE_CHECKING:
    from appliance.daemon import Daemon

_bearer = HTTPBearer(auto_error=False)


def daemon_of(request: Request) -> Daemon:
    return request.app.state.daemon


async def known_query_only(request: Request) -> None:
    """422 for a query parameter the endpoint does not take: a misspelt filter (``dispositon=hold``)
    would otherwise be ignored, and the caller handed every result as if filtered."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    allowed = query_parameters(route)
    if unknown := sorted(set(request.query_params) - allowed):
        takes = ", ".join(sorted(allowed)) or "no query parameters"
        raise HTTPException(422, f"unknown query parameter {', '.join(unknown)}; this endpoint takes: {takes}")


def query_parameters(route: APIRoute) -> set[str]:
    """The query parameters a route and its dependencies declare (a walk of a few objects)."""
    def declared(dependant: Dependant) -> set[str]:
        return {f.alias for f in dependant.query_params}.union(*map(declared, dependant.dependencies))
    return declared(route.dependant)


def require(role: Role) -> Callable[..., Awaitable[Identity]]:
    """Dependency: 401 without a valid token, 403 when the user's role is below ``role``."""

    async def check(request: Request,
                    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Identity:
        if creds is None:
            raise HTTPException(401, "log in first: POST /api/v1/auth/token",
                                headers={"WWW-Authenticate": "Bearer"})
        daemon = daemon_of(request)
        who = daemon.tokens.check(creds.credentials)
        # a removed user, or one whose role or password changed, loses access at once, not when the
        # token expires
        current = daemon.users.identity(who.name) if who else None
        if who is None or current != who:
            raise HTTPException(401, "invalid or expired token", headers={"WWW-Authenticate": "Bearer"})
        if not role_at_least(who.role, role):
            raise HTTPException(403, f"'{who.name}' is {who.role}; this needs the {role} role")
        return who

    return check


Operator = Annotated[Identity, Depends(require("operator"))]
Engineer = Annotated[Identity, Depends(require("engineer"))]
Admin = Annotated[Identity, Depends(require("admin"))]
