"""Classification metrics in plain numpy (no scikit-learn on the appliance)."""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``m[t, p]`` = how many samples of true class t were predicted as p."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def recall_per_class(m: np.ndarray) -> np.ndarray:
    """Recall of each class; NaN for a class with no samples."""
    support = m.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(m) / support, np.nan)


def recall_by_class(m: np.ndarray, classes: list[str], digits: int | None = None) -> dict[str, float | None]:
    """Recall of each named class (None for a class with no samples), for reports and cards."""
    return {c: None if np.isnan(r) else float(r) if digits is None else round(float(r), digits)
            for c, r in zip(classes, recall_per_class(m), strict=True)}


def macro_f1(m: np.ndarray) -> float:
    """Mean F1 over the classes that occur (as truth or prediction)."""
    tp = np.diag(m).astype(float)
    support, predicted = m.sum(axis=1), m.sum(axis=0)
    present = (support + predicted) > 0
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return float(f1.mean()) if f1.size else 0.0


def accuracy(m: np.ndarray) -> float:
    total = m.sum()
    return float(np.trace(m) / total) if total else 0.0


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: |confidence - accuracy| averaged over equal-width confidence bins."""
    if len(y_true) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(confidence[sel].mean() - correct[sel].mean())
    return float(ece)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def without_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """The probabilities the head gave before its temperature ``t``: ``softmax(t · log p)``.

    Exact for a head whose graph is ``softmax(z / t)``; not for one with a prior shift or a parent
    (its probabilities are masked by the parent's), which callers must leave out.
    """
    return softmax(np.log(np.clip(probs, 1e-30, None)) * t)


HOLD_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(100))
"""The ``min_confidence`` settings a hold curve is worked out for: 0.00, 0.01 … 0.99."""


def hold_curve(confidence: np.ndarray, correct: np.ndarray) -> dict[str, list]:
    """What each ``min_confidence`` would do on these parts: the share held (confidence below it)
    and the accuracy on the parts still decided automatically (None once every part is held)."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=bool)
    held, decided_accuracy = [], []
    for threshold in HOLD_THRESHOLDS:
        decided = confidence >= threshold
        held.append(round(1.0 - float(decided.mean()), 4) if len(decided) else 0.0)
        decided_accuracy.append(round(float(correct[decided].mean()), 4) if decided.any() else None)
    return {"threshold": list(HOLD_THRESHOLDS), "held": held, "accuracy": decided_accuracy}


def hold_at(curve: dict[str, list], min_confidence: float) -> tuple[float, float, float | None]:
    """(threshold, share held, accuracy decided) of ``curve`` at the step nearest ``min_confidence``."""
    i = min(round(min_confidence * 100), len(HOLD_THRESHOLDS) - 1)
    return curve["threshold"][i], curve["held"][i], curve["accuracy"][i]
