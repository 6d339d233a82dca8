"""The model package: ``<version>/model.onnx`` + ``<version>/model.json`` (the model card).

The ONNX graph takes raw uint8 images (``N×H×W`` for mono, ``N×H×W×C`` for colour) and does its
own resizing and normalisation, so training and the appliance cannot disagree.  It has one
calibrated probability output per head, named ``<head>_probs``.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.dataset import HeadSpec, check_relations
from appliance.errors import ModelRejected

ONNX_FILE = "model.onnx"
CARD_FILE = "model.json"
INPUT_NAME = "image"


def output_name(head: str) -> str:
    return f"{head}_probs"


class ModelInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layout: Literal["NHW", "NHWC"] = Field(description="NHW for mono images, NHWC for colour.")
    channels: int = Field(ge=1, le=4, description="Channels the graph expects (1 for NHW).")
    height: int = Field(ge=8, le=8192, description="Height the graph resizes to internally.")
    width: int = Field(ge=8, le=8192, description="Width the graph resizes to internally.")
    dtype: Literal["uint8"] = "uint8"


class CardHead(HeadSpec):
    temperature: float = Field(default=1.0, gt=0, description="Calibration temperature applied in-graph.")


class ModelCard(BaseModel):
    """What a model is, where it came from and how good it is."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    version: str = Field(description="Unique version string, e.g. 20261123-101500-ab12cd.")
    parent_version: str | None = Field(default=None, description="The model this one was trained from.")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    architecture: str = Field(default="efficientnet-lite0", description="Trunk architecture.")
    input: ModelInput
    heads: list[CardHead] = Field(min_length=1)
    metrics: dict = Field(default_factory=dict, description="Held-out metrics per head (and ECE).")
    training: dict = Field(default_factory=dict, description="Recipe, seconds, sample counts.")
    training_data_fingerprint: str | None = Field(
        default=None, description="sha256 over the training rows (image path + labels)."
    )
    onnx_sha256: str = Field(description="sha256 of model.onnx; checked on every load.")

    @field_validator("heads")
    @classmethod
    def _heads_relate(cls, heads: list[CardHead]) -> list[CardHead]:
        check_relations(list(heads))
        return heads

    def head(self, name: str) -> CardHead:
        for h in self.heads:
            if h.name == name:
                return h
        raise KeyError(name)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def new_version(now: datetime | None = None, salt: str = "") -> str:
    now = now or datetime.now(UTC)
    tag = hashlib.sha256(f"{now.isoformat()}{salt}".encode()).hexdigest()[:6]
    return f"{now:%Y%m%d-%H%M%S}-{tag}"


def read_card(package_dir: Path) -> ModelCard:
    """Read and validate ``model.json``; checks that model.onnx exists and matches its sha256."""
    package_dir = Path(package_dir)
    card_path = package_dir / CARD_FILE
    onnx_path = package_dir / ONNX_FILE
    if not card_path.is_file():
        raise ModelRejected(f"{package_dir}: not a model package (no {CARD_FILE})")
    if not onnx_path.is_file():
        raise ModelRejected(f"{package_dir}: not a model package (no {ONNX_FILE})")
    try:
        card = ModelCard.model_validate_json(card_path.read_bytes())
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ModelRejected(f"{card_path}: invalid model card: {key}: {first['msg']}") from exc
    actual = sha256_file(onnx_path)
    if actual != card.onnx_sha256:
        raise ModelRejected(
            f"{onnx_path}: sha256 {actual[:12]}… does not match the card's {card.onnx_sha256[:12]}…; "
            "the file was changed or damaged"
        )
    return card


def write_card(package_dir: Path, card: ModelCard) -> None:
    (Path(package_dir) / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
