"""The daemon's local HTTP API (FastAPI, served by uvicorn inside the daemon's own loop).

It is the only way other processes (dashboard, CLI queries, retraining) reach the results, since
only the daemon may open the DuckDB file.  Queries run in worker threads on their own DuckDB
cursors, so the line's loop never waits for a query.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from appliance import __version__
from appliance.errors import UserError
from appliance.store import ResultFilter

if TYPE_CHECKING:
    from appliance.daemon import Daemon

API_PREFIX = "/api/v1"


class HeadOut(BaseModel):
    head: str
    label: str
    confidence: float
    probs: list[float]
    model_version: str | None = None


class ResultOut(BaseModel):
    result_id: str
    seq: int
    acquired_at: datetime
    decided_at: datetime
    line_id: str
    asset_id: str
    camera_view: str
    batch: str | None
    part_id: str | None
    process_values: dict[str, float]
    model_version: str | None
    disposition: str
    rule: str
    review: str | None
    status: str
    error: str | None
    queue_ms: float | None = None
    inference_ms: float | None = None
    decide_ms: float | None = None
    total_ms: float | None = None
    image_ref: str | None
    source_ref: str
    predictions: list[HeadOut]
    shadow_predictions: list[HeadOut] = Field(default_factory=list)


class ResultPage(BaseModel):
    count: int
    results: list[ResultOut]


def build_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(title="Defect appliance API", version=__version__,
                  description="Results, health and images of one inspection station.")

    @app.get(f"{API_PREFIX}/health")
    async def health() -> dict[str, Any]:
        """Line state, model version, camera, counters and recent latency."""
        return daemon.health()

    @app.get(f"{API_PREFIX}/results", response_model=ResultPage)
    async def results(
        since: datetime | None = None,
        until: datetime | None = None,
        disposition: Literal["pass", "rework", "reject", "hold"] | None = None,
        batch: str | None = None,
        camera_view: str | None = None,
        status: Literal["ok", "failed"] | None = None,
        review: Literal["hold", "audit"] | None = None,
        part_id: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        """Stored results, newest first (results reach the database within a fraction of a second)."""
        if since and until and since >= until:
            raise HTTPException(422, "'since' must be before 'until'")
        f = ResultFilter(since=since, until=until, disposition=disposition, batch=batch,
                         camera_view=camera_view, status=status, review=review, part_id=part_id,
                         limit=limit, offset=offset)
        rows = await asyncio.to_thread(daemon.store.query, f)
        return {"count": len(rows), "results": rows}

    @app.get(f"{API_PREFIX}/results/latest")
    async def latest() -> dict[str, Any]:
        """The last published result (from memory: no database round trip)."""
        if daemon.latest is None:
            raise HTTPException(404, "no result yet")
        return daemon.latest.to_dict()

    @app.get(f"{API_PREFIX}/results/{{result_id}}", response_model=ResultOut)
    async def result(result_id: str) -> dict[str, Any]:
        row = await asyncio.to_thread(daemon.store.get, result_id)
        if row is None:
            raise HTTPException(404, f"no result {result_id}")
        return row

    @app.get(f"{API_PREFIX}/results/{{result_id}}/image")
    async def result_image(result_id: str) -> FileResponse:
        """The archived image of a result (404 if retention did not keep it)."""
        row = await asyncio.to_thread(daemon.store.get, result_id)
        if row is None:
            raise HTTPException(404, f"no result {result_id}")
        if not row["image_ref"]:
            raise HTTPException(404, f"the image of {result_id} was not archived (retention policy)")
        path = daemon.archive.path_for(row["image_ref"])
        for _ in range(20):  # the archive thread may still be writing a just-decided part
            if path.is_file():
                return FileResponse(path)
            await asyncio.sleep(0.05)
        raise HTTPException(404, f"the image file of {result_id} is missing")

    @app.get(f"{API_PREFIX}/model")
    async def model() -> dict[str, Any]:
        """The card of the model now serving."""
        if daemon.classifier is None:
            raise HTTPException(503, "no model loaded")
        return daemon.classifier.card.model_dump(mode="json")

    @app.get(f"{API_PREFIX}/stats")
    async def stats() -> dict[str, Any]:
        """Totals from the database (all time) by disposition."""
        return await asyncio.to_thread(daemon.store.counts)

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
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
