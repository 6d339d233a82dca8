"""Classification with onnxruntime only: load and check a model package, warm it, classify.

A package is refused (``ModelRejected``) when its card is invalid, its sha256 does not match,
its outputs do not match the card's heads, or onnxruntime cannot load or run it.  Nothing here
imports torch, and nothing but ONNX is ever loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from appliance.errors import ModelRejected, UserError
from appliance.model_package import INPUT_NAME, ONNX_FILE, ModelCard, output_name, read_card

MIN_SIDE = 8


class BadImage(UserError):
    """The image cannot be classified (empty, wrong shape or type); only that part fails."""


@dataclass(slots=True, frozen=True)
class HeadPrediction:
    label: str
    index: int
    confidence: float
    probs: tuple[float, ...]


Prediction = dict[str, HeadPrediction]


class Classifier:
    """One loaded, validated and warmed ONNX session."""

    def __init__(self, package_dir: Path | str, intra_op_threads: int = 2, warmup_runs: int = 3,
                 spin_wait: bool = False) -> None:
        self.package_dir = Path(package_dir)
        self.card: ModelCard = read_card(self.package_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        try:
            self._session = ort.InferenceSession(
                str(self.package_dir / ONNX_FILE), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise ModelRejected(f"{self.package_dir}: onnxruntime cannot load the model: {exc}") from exc
        self._check_contract()
        self._outputs = [output_name(h.name) for h in self.card.heads]
        for _ in range(warmup_runs):
            self._warm()

    @property
    def version(self) -> str:
        return self.card.version

    def _check_contract(self) -> None:
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(uint8)":
            got = ", ".join(f"{i.name}:{i.type}" for i in inputs)
            raise ModelRejected(f"{self.package_dir}: expected one uint8 input '{INPUT_NAME}', got {got}")
        rank = 3 if self.card.input.layout == "NHW" else 4
        if len(inputs[0].shape) != rank:
            raise ModelRejected(
                f"{self.package_dir}: input rank {len(inputs[0].shape)} does not match layout "
                f"{self.card.input.layout}"
            )
        outputs = {o.name: o for o in self._session.get_outputs()}
        for head in self.card.heads:
            name = output_name(head.name)
            if name not in outputs:
                raise ModelRejected(f"{self.package_dir}: no output '{name}' for head '{head.name}'")
            width = outputs[name].shape[-1]
            if isinstance(width, int) and width != len(head.classes):
                raise ModelRejected(
                    f"{self.package_dir}: output '{name}' has {width} classes, the card lists "
                    f"{len(head.classes)}"
                )

    def _warm(self) -> None:
        spec = self.card.input
        shape = (1, spec.height, spec.width) if spec.layout == "NHW" else (1, spec.height, spec.width,
                                                                              spec.channels)
        try:
            results = self._session.run(self._outputs, {INPUT_NAME: np.zeros(shape, np.uint8)})
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise ModelRejected(f"{self.package_dir}: the model fails on a blank image: {exc}") from exc
        for head, probs in zip(self.card.heads, results, strict=True):
            if probs.shape != (1, len(head.classes)) or not np.all(np.isfinite(probs)):
                raise ModelRejected(
                    f"{self.package_dir}: output for head '{head.name}' has shape {probs.shape} or "
                    "non-finite values"
                )

    def conform(self, image: np.ndarray) -> np.ndarray:
        """Check an image and bring it to the layout the graph expects (without resizing)."""
        if not isinstance(image, np.ndarray) or image.size == 0:
            raise BadImage("empty image")
        if image.dtype != np.uint8:
            raise BadImage(f"pixel type {image.dtype}, expected uint8")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise BadImage(f"image shape {image.shape}, expected H×W or H×W×3/4")
        if min(image.shape[:2]) < MIN_SIDE:
            raise BadImage(f"image {image.shape[1]}×{image.shape[0]} px is smaller than {MIN_SIDE} px")
        spec = self.card.input
        if spec.layout == "NHW":
            if image.ndim == 3:  # colour camera, mono model: ITU-R BT.601 luma
                rgb = image[:, :, :3].astype(np.float32)
                image = (rgb @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)
        else:
            if image.ndim == 2:
                image = np.repeat(image[:, :, None], spec.channels, axis=2)
            elif image.shape[2] != spec.channels:
                image = image[:, :, : spec.channels]
        return np.ascontiguousarray(image)

    def classify(self, image: np.ndarray) -> Prediction:
        return self.classify_batch([image])[0]

    def classify_batch(self, images: list[np.ndarray]) -> list[Prediction]:
        """Classify images of one size in one run (callers group by size)."""
        batch = np.stack([self.conform(im) for im in images])
        try:
            results = self._session.run(self._outputs, {INPUT_NAME: batch})
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise BadImage(f"the model cannot run on this {batch.shape[2]}×{batch.shape[1]} image: {exc}") from exc
        out: list[Prediction] = []
        for row in range(len(images)):
            pred: Prediction = {}
            for head, probs in zip(self.card.heads, results, strict=True):
                p = probs[row]
                i = int(np.argmax(p))
                pred[head.name] = HeadPrediction(
                    label=head.classes[i], index=i, confidence=float(p[i]),
                    probs=tuple(float(x) for x in p),
                )
            out.append(pred)
        return out
