"""The model registry through the API: versions, gate verdicts, promote, roll back, shadow."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel

from appliance.api.deps import Engineer, Operator, daemon_of
from appliance.auth import role_at_least
from appliance.daemon import GateRefused
from appliance.errors import UnknownModel, UserError
from appliance.gate import GateVerdict, run_gate

router = APIRouter(tags=["models"])


class PromoteIn(BaseModel):
    force: bool = False
    """Skip the validation gate (admin only)."""


def _summary(daemon: Any, card: Any) -> dict[str, Any]:
    verdict = GateVerdict.load(daemon.registry.path(card.version))
    return {"version": card.version, "parent_version": card.parent_version, "created_at": card.created_at,
            "architecture": card.architecture, "heads": [h.name for h in card.heads],
            "metrics": card.metrics, "training": {k: v for k, v in card.training.items() if k != "history"},
            "onnx_sha256": card.onnx_sha256, "training_data_fingerprint": card.training_data_fingerprint,
            "serving": daemon.classifier is not None
            and daemon.classifier.version == card.version,
            "shadow": daemon.shadow is not None and daemon.shadow.version == card.version,
            "gate": verdict.to_dict() if verdict else None}


@router.get("/models")
async def list_models(who: Operator, request: Request) -> dict[str, Any]:
    daemon = daemon_of(request)
    cards = await asyncio.to_thread(daemon.registry.versions)
    policy = daemon.config.disposition
    return {"champion": daemon.registry.champion(), "rollback_to": daemon.registry.rollback_target(),
            "hold_policy": {"min_confidence": policy.min_confidence, "heads": policy.heads,
                            "class_min_confidence": policy.class_min_confidence},
            "models": [_summary(daemon, c) for c in reversed(cards)]}


@router.get("/models/history")
async def history(who: Operator, request: Request) -> list[dict[str, Any]]:
    return await asyncio.to_thread(daemon_of(request).registry.history)


@router.get("/models/shadow")
async def shadow_agreement(who: Operator, request: Request) -> dict[str, Any]:
    """Agreement of the shadow (challenger) model with the champion on live frames."""
    daemon = daemon_of(request)
    if daemon.shadow is None:
        raise HTTPException(404, "no shadow model is running")
    return await asyncio.to_thread(daemon.store.shadow_agreement, daemon.shadow.version)


def _refused(exc: UserError) -> HTTPException:
    """404 for a version the registry does not have, 422 for a package it refuses."""
    return HTTPException(404 if isinstance(exc, UnknownModel) else 422, str(exc))


@router.get("/models/{version}")
async def show_model(version: str, who: Operator, request: Request) -> dict[str, Any]:
    daemon = daemon_of(request)
    try:
        card = await asyncio.to_thread(daemon.registry.card, version)
    except UserError as exc:  # unknown, or a damaged package (not listed either)
        raise HTTPException(404, str(exc)) from exc
    return {**_summary(daemon, card), "card": card.model_dump(mode="json")}


@router.post("/models/{version}/gate")
async def gate(version: str, who: Engineer, request: Request) -> dict[str, Any]:
    """Run the validation gate against the serving model without promoting."""
    daemon = daemon_of(request)
    holdout = daemon.config.registry.holdout
    if holdout is None:
        raise HTTPException(409, "no held-out set configured (registry.holdout)")
    assert daemon.classifier is not None
    try:
        await asyncio.to_thread(daemon.registry.card, version)
        verdict = await asyncio.to_thread(run_gate, daemon.registry.path(version),
                                          daemon.classifier.package_dir, daemon.config.resolve(holdout),
                                          daemon.config.registry.gate_margin)
    except UserError as exc:
        raise _refused(exc) from exc
    await asyncio.to_thread(daemon.store.audit, who.name, who.role, "model.gate", version,
                            {"passed": verdict.passed, "reasons": verdict.reasons})
    return verdict.to_dict()


@router.post("/models/{version}/promote")
async def promote(version: str, body: PromoteIn, who: Engineer, request: Request) -> dict[str, Any]:
    """Gate, load and warm the version beside the serving model, then switch between two frames."""
    daemon = daemon_of(request)
    if body.force and not role_at_least(who.role, "admin"):
        raise HTTPException(403, "skipping the gate needs the admin role")
    try:
        verdict = await daemon.promote(version, who.name, force=body.force)
    except GateRefused as exc:
        await asyncio.to_thread(daemon.store.audit, who.name, who.role, "model.promote.refused", version,
                                {"reasons": exc.verdict.reasons})
        raise HTTPException(409, {"message": str(exc), "gate": exc.verdict.to_dict()}) from exc
    except UserError as exc:  # ModelRejected included: the champion keeps serving
        raise _refused(exc) from exc
    await asyncio.to_thread(daemon.store.audit, who.name, who.role, "model.promote", version,
                            {"force": body.force, "gate_passed": verdict.passed if verdict else None})
    return {"serving": version, "gate": verdict.to_dict() if verdict else None}


@router.post("/models/rollback")
async def rollback(who: Engineer, request: Request) -> dict[str, Any]:
    daemon = daemon_of(request)
    previous = daemon.classifier.version if daemon.classifier else None
    try:
        target = await daemon.rollback(who.name)
    except UserError as exc:
        raise HTTPException(409, str(exc)) from exc
    await asyncio.to_thread(daemon.store.audit, who.name, who.role, "model.rollback", target,
                            {"from": previous})
    return {"serving": target, "rolled_back_from": previous}


@router.put("/models/{version}/shadow")
async def start_shadow(version: str, who: Engineer, request: Request) -> dict[str, Any]:
    daemon = daemon_of(request)
    try:
        await daemon.set_shadow(version)
    except UserError as exc:
        raise _refused(exc) from exc
    await asyncio.to_thread(daemon.store.audit, who.name, who.role, "model.shadow.start", version, {})
    return {"shadow": version}


@router.delete("/models/shadow")
async def stop_shadow(who: Engineer, request: Request) -> dict[str, Any]:
    daemon = daemon_of(request)
    await daemon.set_shadow(None)
    await asyncio.to_thread(daemon.store.audit, who.name, who.role, "model.shadow.stop", None, {})
    return {"shadow": None}


@router.post("/retrain")
async def start_retrain(who: Engineer, request: Request) -> dict[str, Any]:
    """Train a candidate from the base dataset plus verified labels, in a low-priority process."""
    daemon = daemon_of(request)
    try:
        job = await daemon.retrainer.start(who.name)
    except UserError as exc:
        raise HTTPException(409, str(exc)) from exc
    await asyncio.to_thread(daemon.store.audit, who.name, who.role, "retrain.start", job.job_id, job.counts)
    return job.status()


@router.get("/retrain")
async def retrain_status(who: Operator, request: Request) -> dict[str, Any]:
    """The current or last retraining job: state, phase, progress 0..1, candidate and gate verdict."""
    return daemon_of(request).retrainer.status()
