"""The daemon's local HTTP API (FastAPI, served by uvicorn inside the daemon's own loop).

It is the only way other processes (dashboard, CLI queries, retraining) reach the results, since
only the daemon may open the DuckDB file.  Queries run in worker threads on their own DuckDB
cursors, so the line's loop never waits for a query.  Everything but ``/health`` needs a bearer
token (``POST /api/v1/auth/token``); routes check the caller's role.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import uvicorn
from fastapi import Depends, FastAPI

from appliance import __version__
from appliance.api import (
    routes_analytics,
    routes_auth,
    routes_line,
    routes_models,
    routes_results,
    routes_review,
)
from appliance.api.deps import known_query_only
from appliance.errors import UserError
from appliance.http_headers import SecurityHeaders, api_headers

if TYPE_CHECKING:
    from appliance.daemon import Daemon

API_PREFIX = "/api/v1"


def build_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(title="Defect appliance API", version=__version__,
                  description="Results, review, models and health of one inspection station.",
                  dependencies=[Depends(known_query_only)])
    app.state.daemon = daemon
    app.add_middleware(SecurityHeaders, headers_for=api_headers)
    for module in (routes_results, routes_auth, routes_review, routes_models, routes_analytics, routes_line):
        app.include_router(module.router, prefix=API_PREFIX)
    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ApiServer:
    def __init__(self, daemon: Daemon) -> None:
        self.app = build_app(daemon)
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 = any free port); returns the port."""
        try:
            sock = socket.create_server((host, port), family=_family(host), reuse_port=False)
        except OSError as exc:
            raise UserError(f"api: cannot listen on {host}:{port} ({exc.strerror}); "
                            "is another appliance running, or is the port taken?") from exc
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off")
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="api")
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        await self._build_routes()
        return int(sock.getsockname()[1])

    async def _build_routes(self) -> None:
        """FastAPI builds a router's route table on the router's first request, in the event loop:
        about 40 ms per router here, which the line would feel when the first dashboard connects.
        A request that matches no route walks every router, so all of them are built now."""
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://daemon") as api:
            await api.get(f"{API_PREFIX}/-build-routes-")

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
