"""The review loop: the ranked queue, labels (optionally verified by a second person), the audit log."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from appliance.api.deps import Engineer, Operator, daemon_of

router = APIRouter(tags=["review"])


class LabelsIn(BaseModel):
    labels: dict[str, str] = Field(min_length=1, description="head -> the class a person saw")
    comment: str | None = Field(default=None, max_length=1000)


@router.get("/review/queue")
async def review_queue(who: Operator, request: Request,
                       limit: int = Query(default=50, ge=1, le=500)) -> dict[str, Any]:
    """Parts waiting for a person: held parts first, then audit samples, most informative first.
    ``waiting`` counts every unlabelled part; the ranking looks at the newest ``ranked_from``; it was
    made at ``ranked_at`` (at most ``review.queue_max_age_s`` ago, or at the last label)."""
    return await daemon_of(request).review_queue.get(limit)


@router.post("/results/{result_id}/labels")
async def add_labels(result_id: str, body: LabelsIn, who: Operator, request: Request) -> dict[str, Any]:
    """Confirm or correct a result's classes; stored with who and when, audited."""
    daemon = daemon_of(request)
    if (result := await asyncio.to_thread(daemon.store.get, result_id)) is None:
        raise HTTPException(404, f"no result {result_id}")
    assert daemon.classifier is not None
    heads = {h.name: h.classes for h in daemon.classifier.card.heads}
    for head, label in body.labels.items():
        if head not in heads:
            raise HTTPException(422, f"unknown head '{head}'; the model has {sorted(heads)}")
        if label not in heads[head]:
            raise HTTPException(422, f"head '{head}' has no class '{label}'; expected one of {heads[head]}")
    two_person = daemon.config.review.two_person
    ids = await asyncio.to_thread(daemon.store.add_labels, result_id, body.labels, who.name, body.comment,
                                  not two_person)
    await asyncio.to_thread(daemon.store.audit, who.name, who.role, "label", result_id,
                            {"part": result["part_id"], "labels": body.labels, "comment": body.comment})
    return {"result_id": result_id, "label_ids": ids, "verified": not two_person}


@router.post("/labels/{label_id}/verify")
async def verify_label(label_id: str, who: Operator, request: Request) -> dict[str, Any]:
    """Second-person verification of a label (two-person rule)."""
    daemon = daemon_of(request)
    try:
        row = await asyncio.to_thread(daemon.store.verify_label, label_id, who.name)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from exc
    await asyncio.to_thread(daemon.store.audit, who.name, who.role, "label.verify", label_id, {})
    return row


@router.get("/labels")
async def labels(who: Operator, request: Request, result_id: str | None = None,
                 verified: bool | None = None, limit: int = Query(default=1000, ge=1, le=100_000)
                 ) -> dict[str, Any]:
    rows = await asyncio.to_thread(daemon_of(request).store.labels, result_id=result_id,
                                   verified=verified, limit=limit)
    return {"count": len(rows), "labels": rows}


@router.get("/audit")
async def audit(who: Engineer, request: Request,
                limit: int = Query(default=200, ge=1, le=10_000)) -> dict[str, Any]:
    """Every privileged action: labels, verifications, retrains, promotions, user changes."""
    rows = await asyncio.to_thread(daemon_of(request).store.audit_log, limit)
    return {"count": len(rows), "entries": rows}
