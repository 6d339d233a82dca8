"""``evaluate_model``: run a model package over a dataset split exactly as the line runs it
(through ``appliance.inference.Classifier``) and report per-head metrics."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance.dataset import SPLITS, Sample, load_dataset
from appliance.errors import UserError
from appliance.imageio import read_image
from appliance.inference import Classifier
from appliance.training.metrics import (
    accuracy,
    confusion_matrix,
    expected_calibration_error,
    hold_at,
    hold_curve,
    macro_f1,
    recall_by_class,
    without_temperature,
)

BATCH = 32
TEXT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
"""The rows of the hold curve the text report prints (the JSON has every 0.01)."""


@dataclass(slots=True)
class HeadReport:
    classes: list[str]
    ordinal: bool
    confusion: np.ndarray
    ece: float
    ece_uncalibrated: float | None
    """The same parts' ECE without the head's temperature; None where that cannot be undone."""
    confidence: np.ndarray
    """Per part: the (calibrated) confidence of the predicted class."""
    correct: np.ndarray
    """Per part: whether the predicted class is the true one."""

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    def summary(self) -> dict:
        out = {
            "accuracy": accuracy(self.confusion),
            "macro_f1": macro_f1(self.confusion),
            "ece": self.ece,
            "n": self.n,
            "recall": recall_by_class(self.confusion, self.classes),
            "confusion": self.confusion.tolist(),
            "classes": list(self.classes),
            "ece_uncalibrated": None if self.ece_uncalibrated is None else round(self.ece_uncalibrated, 4),
            "hold_curve": hold_curve(self.confidence, self.correct),
        }
        if self.ordinal:  # mean distance in grades between truth and prediction
            k = np.arange(len(self.classes))
            out["mean_abs_grade_error"] = float((self.confusion * np.abs(k[:, None] - k[None, :])).sum()
                                                / max(self.n, 1))
        return out


@dataclass(slots=True)
class EvalReport:
    model_version: str
    dataset: Path
    split: str | None
    images: int
    heads: dict[str, HeadReport] = field(default_factory=dict)

    def summary(self) -> dict:
        """``{"heads": {head: {"accuracy", "macro_f1", "ece", "n", "recall", "confusion", …}}}``."""
        return {"heads": {name: h.summary() for name, h in self.heads.items()}}

    def to_text(self) -> str:
        lines = [f"model {self.model_version} on {self.dataset} "
                 f"(split: {self.split or 'all rows'}, {self.images} images)"]
        for name, head in self.heads.items():
            s = head.summary()
            lines.append("")
            lines.append(f"{name}: accuracy {s['accuracy']:.4f}  macro-F1 {s['macro_f1']:.4f}  "
                         f"ECE {s['ece']:.4f}"
                         + (f" ({s['ece_uncalibrated']:.4f} before calibration)"
                            if s["ece_uncalibrated"] is not None else "") + f"  n={s['n']}"
                         + (f"  mean |grade error| {s['mean_abs_grade_error']:.3f}" if head.ordinal else ""))
            corner = "true \\ predicted"
            label = max(len(corner), *(len(c) for c in head.classes)) + 2
            width = max(6, *(len(c) for c in head.classes)) + 2
            lines.append(f"  {corner:<{label}}" + "".join(f"{c:>{width}}" for c in head.classes) + "  recall")
            for i, c in enumerate(head.classes):
                r = s["recall"][c]
                cells = "".join(f"{v:>{width}}" for v in head.confusion[i])
                lines.append(f"  {c:<{label}}{cells}" + (f"{r:8.3f}" if r is not None else "       -"))
            curve = s["hold_curve"]
            lines.append("  min_confidence  held  accuracy of the parts decided")
            for threshold in TEXT_THRESHOLDS:
                _, held, decided = hold_at(curve, threshold)
                lines.append(f"  {threshold:>14.2f} {held:>5.0%}  " + ("-" if decided is None else f"{decided:.1%}"))
        return "\n".join(lines)


def _rows(samples: list[Sample], split: str | None, has_splits: bool) -> tuple[list[Sample], str | None]:
    if split is not None:
        if split not in SPLITS:
            raise UserError(f"split '{split}' is not one of {', '.join(SPLITS)}")
        return [s for s in samples if s.split == split], split
    if has_splits and any(s.split == "test" for s in samples):
        return [s for s in samples if s.split == "test"], "test"
    return samples, None


def evaluate_model(model: Path, data: Path, split: str | None = None) -> EvalReport:
    """Evaluate the ``test`` split when the dataset has one, else every row; ``split`` overrides."""
    classifier = Classifier(model)
    dataset = load_dataset(data)
    samples, used = _rows(dataset.samples, split, dataset.has_splits)
    if not samples:
        raise UserError(f"{dataset.root}: no rows in split '{used}'")
    heads = []
    for spec in dataset.heads:
        try:
            card_head = classifier.card.head(spec.name)
        except KeyError:
            continue  # a column the model does not predict
        unknown = set(spec.classes) - set(card_head.classes)
        if unknown:
            raise UserError(f"{dataset.root}: head '{spec.name}' has classes the model does not know: "
                            f"{', '.join(sorted(unknown))}")
        heads.append(card_head)
    if not heads:
        raise UserError(f"{dataset.root}: none of the model's heads "
                        f"({', '.join(h.name for h in classifier.card.heads)}) is a dataset column")

    truth: dict[str, list[int]] = defaultdict(list)
    probs: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for start in range(0, len(samples), BATCH):
        chunk = samples[start:start + BATCH]
        by_shape: dict[tuple[int, ...], list[tuple[Sample, np.ndarray]]] = defaultdict(list)
        for s in chunk:
            image = classifier.conform(read_image(s.image))
            by_shape[image.shape].append((s, image))
        for group in by_shape.values():
            for (s, _), pred in zip(group, classifier.classify_batch([im for _, im in group]), strict=True):
                for head in heads:
                    label = s.labels.get(head.name)
                    if label is not None:
                        truth[head.name].append(head.classes.index(label))
                        probs[head.name].append(pred[head.name].probs)

    report = EvalReport(classifier.version, dataset.root, used, len(samples))
    for head in heads:
        y = np.array(truth[head.name], dtype=np.int64)
        p = np.array(probs[head.name], dtype=np.float64).reshape(len(y), len(head.classes))
        predicted = p.argmax(axis=1)
        report.heads[head.name] = HeadReport(
            classes=list(head.classes), ordinal=head.ordinal,
            confusion=confusion_matrix(y, predicted, len(head.classes)),
            ece=expected_calibration_error(p, y),
            ece_uncalibrated=None if head.parent or head.within or head.line_frequencies else
            expected_calibration_error(without_temperature(p, head.temperature), y),
            confidence=p.max(axis=1), correct=predicted == y,
        )
    return report
