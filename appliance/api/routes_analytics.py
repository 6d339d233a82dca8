"""Root-cause analytics for the dashboard (and for the PLC side: the control-chart alarm).

Every route takes the same filters (time window, line, asset, camera view, batch, shift, model
version) and the shift plan (``shifts=early=06:00,late=14:00,night=22:00``, ``tz=Europe/Berlin``;
defaults in :mod:`appliance.analytics`).  Queries run in worker threads; see analytics for how they
stay fast at 10^6 results.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from appliance import analytics as an
from appliance.api.deps import Engineer, Operator, daemon_of

router = APIRouter(prefix="/analytics", tags=["analytics"])

Dimension = Literal["line_id", "asset_id", "camera_view", "batch", "shift", "model_version"]
Bucket = Literal["1m", "5m", "15m", "1h", "8h", "1d"]


@dataclass(frozen=True, slots=True)
class Selection:
    """The parsed filters and shift plan of a request."""

    filters: an.Filters
    shifts: an.Shifts


def selection(
    since: Annotated[datetime | None, Query(description="From this time (inclusive, ISO 8601).")] = None,
    until: Annotated[datetime | None, Query(description="Up to this time (exclusive).")] = None,
    line_id: str | None = None,
    asset_id: str | None = None,
    camera_view: str | None = None,
    batch: str | None = None,
    shift: Annotated[str | None, Query(description="Only parts of this shift (see `shifts`).")] = None,
    model_version: str | None = None,
    shifts: Annotated[str | None, Query(
        description="Shift plan: name=HH:MM start times, ascending, e.g. early=06:00,late=14:00,night=22:00",
        max_length=400)] = None,
    tz: Annotated[str | None, Query(description="IANA time zone of the shift plan (default: the "
                                                "appliance's own).", max_length=64)] = None,
) -> Selection:
    if since is not None and until is not None and since >= until:
        raise HTTPException(422, "'since' must be before 'until'")
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise HTTPException(422, f"'{name}' needs a time zone, e.g. 2026-11-20T06:00:00+01:00 or …Z")
    try:
        plan = an.Shifts.parse(shifts, tz)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    if shift is not None and shift not in plan.names:
        raise HTTPException(422, f"shift '{shift}': expected one of {', '.join(plan.names)}")
    return Selection(an.Filters(since, until, line_id, asset_id, camera_view, batch, shift, model_version),
                     plan)


Selected = Annotated[Selection, Depends(selection)]


def analytics_of(request: Request) -> an.Analytics:
    """One Analytics (and rollup) per API app, created on first use; follows the serving model's heads."""
    daemon = daemon_of(request)
    card = daemon.classifier.card if daemon.classifier is not None else None
    heads = an.heads_for(daemon.config, card)
    current: an.Analytics | None = daemon.analytics or getattr(request.app.state, "analytics", None)
    if current is None or current.store is not daemon.store:
        current = an.Analytics(daemon.store, heads)
        request.app.state.analytics = current
    current.set_heads(heads)
    return current


async def _run(fn: Any, *args: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc


# -- response models --------------------------------------------------------------------------

class MinuteOut(BaseModel):
    t: datetime
    parts: int


class LiveOut(BaseModel):
    now: datetime
    window_minutes: int
    parts: int
    parts_per_min: float
    mix: dict[str, int]
    defect_rate: float | None
    holds_waiting: int
    audits_waiting: int
    per_minute: list[MinuteOut]


class ShiftOut(BaseModel):
    name: str
    starts: str


class FacetsOut(BaseModel):
    line_id: list[str]
    asset_id: list[str]
    camera_view: list[str]
    model_version: list[str]
    batch: list[str]
    first: datetime | None
    last: datetime | None
    results: int
    shift: list[str]
    shifts: list[ShiftOut]
    timezone: str
    process_values: list[str]
    type_head: str | None
    severity_head: str | None
    type_classes: list[str]
    severity_classes: list[str]


class ParetoItem(BaseModel):
    label: str
    n: int
    share: float | None
    cumulative: float | None


class ParetoOut(BaseModel):
    type_head: str | None
    defective: int
    items: list[ParetoItem]


class SeverityCell(BaseModel):
    type: str
    severity: str
    n: int


class SeverityOut(BaseModel):
    type_head: str | None
    severity_head: str | None
    severity_classes: list[str]
    cells: list[SeverityCell]


class GroupOut(BaseModel):
    group: str
    n: int
    defects: int
    rate: float | None
    first: datetime
    last: datetime


class BreakdownOut(BaseModel):
    by: str
    groups: list[GroupOut]


class TrendPoint(BaseModel):
    t: datetime
    group: str
    n: int
    defects: int
    rate: float | None


class TrendOut(BaseModel):
    by: str | None
    bucket: str
    points: list[TrendPoint]


class ControlPoint(BaseModel):
    t: datetime
    n: int
    defects: int
    p: float | None
    ucl: float | None
    lcl: float | None
    judged: bool
    out: bool


class AlarmOut(BaseModel):
    active: bool
    run_warning: bool
    reason: str | None
    latest: ControlPoint | None
    out_of_control: int


class ControlOut(BaseModel):
    bucket: str
    centre: float | None
    sigma: float
    min_parts: int
    points: list[ControlPoint]
    alarm: AlarmOut


class BinOut(BaseModel):
    lo: float
    hi: float
    n: int
    defects: int
    rate: float | None


class VariableOut(BaseModel):
    name: str
    n: int
    r: float | None
    bins: list[BinOut]


class CorrelationOut(BaseModel):
    n: int
    decided: int
    every: int
    variables: list[VariableOut]


# -- routes ---------------------------------------------------------------------------------------

@router.get("/live", response_model=LiveOut)
async def live(who: Operator, request: Request,
               minutes: Annotated[int, Query(ge=1, le=240)] = 15) -> dict[str, Any]:
    """Parts per minute and disposition mix of the last minutes; holds and audits waiting for review."""
    return await _run(analytics_of(request).live, minutes)


@router.get("/facets", response_model=FacetsOut)
async def facets(who: Operator, request: Request, sel: Selected) -> dict[str, Any]:
    """The values each filter can take, the shift plan, and the process values the PLC records."""
    return await _run(analytics_of(request).facets, sel.shifts)


@router.get("/pareto", response_model=ParetoOut)
async def pareto(who: Operator, request: Request, sel: Selected) -> dict[str, Any]:
    """Defective parts (rework + reject) by defect type, most frequent first."""
    return await _run(analytics_of(request).pareto, sel.filters, sel.shifts)


@router.get("/severity", response_model=SeverityOut)
async def severity(who: Operator, request: Request, sel: Selected) -> dict[str, Any]:
    """Defective parts by defect type and severity."""
    return await _run(analytics_of(request).severity, sel.filters, sel.shifts)


@router.get("/breakdown", response_model=BreakdownOut)
async def breakdown(who: Operator, request: Request, sel: Selected, by: Dimension,
                    limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
    """Decided parts, defects and defect rate per line / asset / camera view / batch / shift / model."""
    return await _run(analytics_of(request).breakdown, sel.filters, sel.shifts, by, limit)


@router.get("/trend", response_model=TrendOut)
async def trend(who: Operator, request: Request, sel: Selected, by: Dimension | None = None,
                bucket: Bucket | None = None) -> dict[str, Any]:
    """Defect rate over time (bucket chosen to give ≤ 120 points unless given), one series per group."""
    return await _run(analytics_of(request).trend, sel.filters, sel.shifts, by, bucket)


@router.get("/control", response_model=ControlOut)
async def control(who: Operator, request: Request, sel: Selected, bucket: Bucket | None = None,
                  min_parts: Annotated[int, Query(ge=1, le=100_000)] = 20) -> dict[str, Any]:
    """p-chart of the defect rate with 3σ limits; ``alarm.active`` when the newest subgroup is outside."""
    return await _run(analytics_of(request).control, sel.filters, sel.shifts, bucket, min_parts)


@router.get("/correlation", response_model=CorrelationOut)
async def correlation(who: Operator, request: Request, sel: Selected,
                      bins: Annotated[int, Query(ge=2, le=50)] = 10) -> dict[str, Any]:
    """Correlation of the defect rate with each PLC process value, and the rate per value bin."""
    return await _run(analytics_of(request).correlation, sel.filters, sel.shifts, bins)


@router.get("/export", response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}}})
async def export(who: Engineer, request: Request, sel: Selected,
                 format: Literal["csv", "parquet"] = "csv") -> StreamingResponse:
    """Download the selected results (one row per part, with defect type and severity), streamed."""
    daemon = daemon_of(request)
    stream = analytics_of(request).export(sel.filters, sel.shifts, format)
    await asyncio.to_thread(daemon.store.audit, who.name, who.role, "analytics.export", format,
                            {"filters": {k: v for k, v in asdict(sel.filters).items() if v is not None}})
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return StreamingResponse(stream, media_type=an.EXPORT_FORMATS[format], headers={
        "Content-Disposition": f'attachment; filename="results-{stamp}.{format}"'})
