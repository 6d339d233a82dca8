"""The result record: everything known about one inspected part (DESIGN.md, "A result")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from ulid import ULID

from appliance.inference import Prediction

STAGES = ("queue_ms", "inference_ms", "decide_ms", "total_ms")
"""Per-stage latency: waiting for the classifier, inference, disposition, acquired → decided."""


def new_result_id() -> str:
    """Sortable (time first) and unique across restarts."""
    return str(ULID())


@dataclass(slots=True)
class HeadResult:
    head: str
    label: str
    confidence: float
    probs: list[float]


@dataclass(slots=True)
class PartResult:
    result_id: str
    acquired_at: datetime
    decided_at: datetime
    line_id: str
    asset_id: str
    camera_view: str
    batch: str | None
    part_id: str | None
    model_version: str | None
    disposition: str
    rule: str
    status: str
    """'ok', or 'failed' when the image could not be classified."""
    source_ref: str
    seq: int = 0
    """Sequence number as the PLC sees it; assigned by the store when the result is journaled."""
    review: str | None = None
    error: str | None = None
    process_values: dict[str, float] = field(default_factory=dict)
    predictions: list[HeadResult] = field(default_factory=list)
    shadow_version: str | None = None
    shadow_predictions: list[HeadResult] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)
    image_ref: str | None = None
    trigger_tag: str | None = None
    """What the trigger's sender called this part's job (e.g. an OPC UA JobId); None if free-running."""

    def head(self, name: str) -> HeadResult | None:
        return next((p for p in self.predictions if p.head == name), None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["acquired_at"] = self.acquired_at.isoformat()
        out["decided_at"] = self.decided_at.isoformat()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartResult:
        data = dict(data)
        data["acquired_at"] = datetime.fromisoformat(data["acquired_at"])
        data["decided_at"] = datetime.fromisoformat(data["decided_at"])
        data["predictions"] = [HeadResult(**p) for p in data.get("predictions", [])]
        data["shadow_predictions"] = [HeadResult(**p) for p in data.get("shadow_predictions", [])]
        return cls(**data)


def head_results(prediction: Prediction) -> list[HeadResult]:
    return [HeadResult(name, p.label, p.confidence, list(p.probs)) for name, p in prediction.items()]
