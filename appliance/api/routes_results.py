"""Results, images, health and the serving model's card."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from appliance.api.deps import Operator, daemon_of
from appliance.store import ResultFilter, record_of

router = APIRouter(tags=["results"])


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


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus exposition format (no log-in, like /health; the API listens on localhost)."""
    body = await asyncio.to_thread(daemon_of(request).metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Line state, model version, camera, counters and recent latency (no log-in needed)."""
    return daemon_of(request).health()

@router.get("/results", response_model=ResultPage)
async def results(
    who: Operator,
    request: Request,
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
) -> Response:
    """Stored results, newest first (results reach the database within a fraction of a second).

    The page is rendered as JSON by DuckDB (:meth:`Store.query_json`), so that a large page does
    not hold the GIL the line's threads need; ``ResultPage`` documents its shape."""
    if since and until and since >= until:
        raise HTTPException(422, "'since' must be before 'until'")
    f = ResultFilter(since=since, until=until, disposition=disposition, batch=batch,
                     camera_view=camera_view, status=status, review=review, part_id=part_id,
                     limit=limit, offset=offset)
    return Response(await asyncio.to_thread(daemon_of(request).store.query_json, f), media_type="application/json")

@router.get("/results/latest", response_model=ResultOut)
async def latest(who: Operator, request: Request) -> dict[str, Any]:
    """The last published result, in the same shape as ``/results/{id}`` (from memory: no database
    round trip)."""
    daemon = daemon_of(request)
    if daemon.latest is None:
        raise HTTPException(404, "no result yet")
    return record_of(daemon.latest)

@router.get("/results/{result_id}", response_model=ResultOut)
async def result(result_id: str, who: Operator, request: Request) -> dict[str, Any]:
    row = await asyncio.to_thread(daemon_of(request).store.get, result_id)
    if row is None:
        raise HTTPException(404, f"no result {result_id}")
    return row

@router.get("/results/{result_id}/image")
async def result_image(result_id: str, who: Operator, request: Request) -> FileResponse:
    """The archived image of a result (404 if retention did not keep it)."""
    daemon = daemon_of(request)
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

@router.get("/model")
async def model(who: Operator, request: Request) -> dict[str, Any]:
    """The card of the model now serving."""
    daemon = daemon_of(request)
    if daemon.classifier is None:
        raise HTTPException(503, "no model loaded")
    return daemon.classifier.card.model_dump(mode="json")

@router.get("/stats")
async def stats(who: Operator, request: Request) -> dict[str, Any]:
    """Totals from the database (all time) by disposition."""
    return await asyncio.to_thread(daemon_of(request).store.counts)


