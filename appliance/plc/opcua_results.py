"""A PartResult in OPC UA terms: the DefectResultDataType, the Machine Vision ResultDataType and
the fields of a ResultReadyEvent.

Every value leaves here with an explicit type and never as None: a PLC cannot do anything useful
with a Null, and asyncua would send an untyped None as Null.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asyncua import ua
from asyncua.common.event_objects import BaseEvent

from appliance.config import DISPOSITIONS, PlcReportConfig
from appliance.model_package import ModelCard
from appliance.result import HeadResult, PartResult
from opcua_model import LoadedModel

RESULT_COMPLETED, RESULT_FAILED = 1, 4
"""ResultStateDataType values (OPC 40100-1 12.19)."""

CardLookup = Callable[[str | None], ModelCard | None]

EVENT_FIELDS: tuple[tuple[str, ua.VariantType], ...] = (
    ("IsPartial", ua.VariantType.Boolean), ("IsSimulated", ua.VariantType.Boolean),
    ("ResultState", ua.VariantType.Int32), ("MeasId", ua.VariantType.ExtensionObject),
    ("PartId", ua.VariantType.ExtensionObject), ("ExternalRecipeId", ua.VariantType.ExtensionObject),
    ("InternalRecipeId", ua.VariantType.ExtensionObject), ("ProductId", ua.VariantType.ExtensionObject),
    ("ExternalConfigurationId", ua.VariantType.ExtensionObject),
    ("InternalConfigurationId", ua.VariantType.ExtensionObject), ("JobId", ua.VariantType.ExtensionObject),
    ("ResultId", ua.VariantType.ExtensionObject), ("CreationTime", ua.VariantType.DateTime),
    ("ProcessingTimes", ua.VariantType.ExtensionObject), ("ResultContent", ua.VariantType.ExtensionObject),
)
"""Every property of ResultReadyEventType, each with its explicit type (an untyped one goes out Null)."""


def disposition_code(disposition: str) -> int:
    """1 pass, 2 rework, 3 reject, 4 hold (0 unknown) — the order of config.DISPOSITIONS."""
    return DISPOSITIONS.index(disposition) + 1 if disposition in DISPOSITIONS else 0


@dataclass(frozen=True, slots=True)
class Reported:
    """The flat answer a PLC reads: disposition, defect type and severity with their codes."""

    disposition: str
    disposition_code: int
    defect_type: str
    defect_type_code: int
    severity: str
    severity_code: int
    confidence: float


class ResultEncoder:
    def __init__(self, model: LoadedModel, plc: PlcReportConfig, cards: CardLookup, *, simulated: bool,
                 configuration_id: Any, judged_heads: list[str] | None = None) -> None:
        self.model = model
        self.plc = plc
        self.judged_heads = judged_heads
        self.cards = cards
        self.simulated = simulated
        self.configuration_id = configuration_id
        self._recipes: dict[str | None, Any] = {}

    # -- the defect content (the same codes and confidence as the Modbus registers) ---------------
    @staticmethod
    def _code(card: ModelCard | None, head: str, label: str) -> int:
        if card is None:
            return 0
        try:
            return card.head(head).classes.index(label) + 1
        except (KeyError, ValueError):
            return 0

    def reported(self, result: PartResult) -> Reported:
        card = self.cards(result.model_version)
        type_head, severity_head = self.plc.type_head, self.plc.severity_head
        type_pred = result.head(type_head) if type_head else None
        severity_pred = result.head(severity_head) if severity_head else None
        judged = self.judged_heads
        confidences = [p.confidence for p in result.predictions if judged is None or p.head in judged]
        return Reported(
            disposition=result.disposition, disposition_code=disposition_code(result.disposition),
            defect_type=type_pred.label if type_pred else "",
            defect_type_code=self._code(card, type_pred.head, type_pred.label) if type_pred else 0,
            severity=severity_pred.label if severity_pred else "",
            severity_code=self._code(card, severity_pred.head, severity_pred.label) if severity_pred else 0,
            confidence=float(min(confidences)) if confidences else 0.0,
        )

    def content(self, result: PartResult, reported: Reported | None = None) -> Any:
        """The appliance's DefectResultDataType for ``result``."""
        rep = reported or self.reported(result)
        card = self.cards(result.model_version)
        heads = [self.model.new("HeadResultDataType", Head=p.head, Label=p.label,
                                Code=self._code(card, p.head, p.label), Confidence=float(p.confidence))
                 for p in result.predictions]
        return self.model.new(
            "DefectResultDataType", ResultId=result.result_id, Sequence=result.seq & 0xFFFFFFFF,
            PartId=result.part_id or "", Batch=result.batch or "", Disposition=rep.disposition,
            DispositionCode=rep.disposition_code, Rule=result.rule, DefectType=rep.defect_type,
            DefectTypeCode=rep.defect_type_code, Severity=rep.severity, SeverityCode=rep.severity_code,
            Confidence=rep.confidence, Heads=heads, ModelVersion=result.model_version or "",
            CameraView=result.camera_view, Status=result.status, Error=result.error or "",
            AcquiredAt=result.acquired_at, LatencyMs=float(result.latency.get("total_ms", 0.0)))

    # -- Machine Vision structures ---------------------------------------------------------------
    def recipe_id(self, version: str | None) -> Any:
        """RecipeIdInternalDataType: the model version, with the sha256 of its model.onnx.

        Built once per version and shared: nothing changes these structures after they are made.
        """
        recipe = self._recipes.get(version)
        if recipe is None:
            card = self.cards(version)
            recipe = self.model.new("RecipeIdInternalDataType", Id=version or "")
            if card is not None:
                recipe.Hash = bytes.fromhex(card.onnx_sha256)
                recipe.HashAlgorithm = "SHA-256"
            self._recipes[version] = recipe
        return recipe

    def fields(self, result: PartResult, job_id: str, content: Any) -> dict[str, ua.Variant]:
        """The ResultReadyEvent fields, also the members of ResultDataType (same names)."""
        new, ext = self.model.new, ua.VariantType.ExtensionObject
        processing_ms = result.latency.get("inference_ms", 0.0) + result.latency.get("decide_ms", 0.0)
        return {
            "ResultId": ua.Variant(new("ResultIdDataType", Id=result.result_id), ext),
            "IsPartial": ua.Variant(False, ua.VariantType.Boolean),
            "IsSimulated": ua.Variant(self.simulated, ua.VariantType.Boolean),
            "ResultState": ua.Variant(RESULT_COMPLETED if result.status == "ok" else RESULT_FAILED,
                                      ua.VariantType.Int32),
            "PartId": ua.Variant(new("PartIdDataType", Id=result.part_id or ""), ext),
            "InternalRecipeId": ua.Variant(self.recipe_id(result.model_version), ext),
            "InternalConfigurationId": ua.Variant(self.configuration_id, ext),
            "JobId": ua.Variant(new("JobIdDataType", Id=job_id), ext),
            "CreationTime": ua.Variant(result.decided_at, ua.VariantType.DateTime),
            "ProcessingTimes": ua.Variant(new(
                "ProcessingTimesDataType", StartTime=result.acquired_at, EndTime=result.decided_at,
                ProcessingDuration=float(processing_ms)), ext),
            # BaseDataType[]: sent as an ExtensionObject array, which clients decode without help
            "ResultContent": ua.Variant([content], ext),
        }

    def result_data(self, result: PartResult, job_id: str) -> Any:
        """ResultDataType (GetResultById / GetResultListFiltered)."""
        content = self.content(result)
        values = {name: v.Value for name, v in self.fields(result, job_id, content).items()}
        values["ResultContent"] = [ua.Variant(content, ua.VariantType.ExtensionObject)]  # a Variant field
        return self.model.new("ResultDataType", **values)


class ResultReadyEvent(BaseEvent):
    """The one event object of a server, refilled for every result (fields typed once, here)."""

    EventId: bytes
    EventType: ua.NodeId
    SourceName: str
    Time: datetime
    ReceiveTime: datetime
    Message: ua.LocalizedText
    Severity: int

    def __init__(self, source: ua.NodeId, event_type: ua.NodeId) -> None:
        self._variants: dict[str, ua.Variant] = {}  # before Event.__init__: not an event field
        super().__init__(sourcenode=source)
        self.EventType = event_type
        self.SourceName = "VisionSystem"
        for name, vtype in EVENT_FIELDS:
            self.add_property(name, None, vtype)

    def refill(self, fields: dict[str, ua.Variant]) -> None:
        for name, variant in fields.items():
            setattr(self, name, variant.Value)
        self._variants = dict(fields)

    def to_event_fields(self, select_clauses: list[ua.SimpleAttributeOperand]) -> list[ua.Variant]:
        """asyncua deep-copies every field for every subscriber (most of the cost of an event);
        :meth:`refill` installs new values for every result and none is changed afterwards, so the
        Variants are built once and shared."""
        out = []
        for clause in select_clauses:
            name = (self.browse_path_to_attribute_name(clause.BrowsePath) if clause.BrowsePath
                    else ua.AttributeIds(clause.AttributeId).name)
            variant = self._variants.get(name)
            if variant is None:
                value = getattr(self, name, None)
                variant = ua.Variant() if value is None else ua.Variant(value, self.data_types[name])
                self._variants[name] = variant
            out.append(variant)
        return out


def result_from_row(row: dict[str, Any]) -> PartResult:
    """A stored result (Store.get/query row) as a PartResult."""
    latency = {k: row[k] for k in ("queue_ms", "inference_ms", "decide_ms", "total_ms")
               if row.get(k) is not None}
    values = row.get("process_values") or {}
    if isinstance(values, str):
        values = json.loads(values)
    return PartResult(
        result_id=row["result_id"], acquired_at=_utc(row["acquired_at"]), decided_at=_utc(row["decided_at"]),
        line_id=row["line_id"], asset_id=row["asset_id"], camera_view=row["camera_view"],
        batch=row["batch"], part_id=row["part_id"], model_version=row["model_version"],
        disposition=row["disposition"], rule=row["rule"], status=row["status"],
        source_ref=row["source_ref"], seq=int(row["seq"]), review=row["review"], error=row["error"],
        process_values=values, latency=latency, image_ref=row.get("image_ref"),
        predictions=[HeadResult(p["head"], p["label"], float(p["confidence"]), list(p["probs"]))
                     for p in row.get("predictions", [])],
    )


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
