"""The multi-head loss: masked, optionally class-weighted cross-entropy, plus an expected-distance
term for ordinal heads."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def class_weights(y: np.ndarray, n_classes: int, balance: float) -> torch.Tensor:
    """``count^-balance`` per class, scaled so that the average sample weight is 1."""
    counts = np.bincount(y[y >= 0], minlength=n_classes).astype(float)
    w = np.where(counts > 0, np.maximum(counts, 1.0) ** -balance, 0.0)
    w *= counts.sum() / max((w * counts).sum(), 1e-12)
    return torch.tensor(w, dtype=torch.float32)


def head_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, ordinal: bool,
              ordinal_weight: float, label_smoothing: float, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss over the samples labelled for this head (label -1 = unknown, masked out).

    ``weights`` is indexed by each sample's class, or by its entry in ``groups`` when given
    (e.g. the (type, severity) cell of a head graded within another)."""
    known = target >= 0
    if not bool(known.any()):
        return logits.sum() * 0.0
    z, t = logits[known], target[known]
    loss = F.cross_entropy(z, t, reduction="none", label_smoothing=label_smoothing)
    if ordinal and ordinal_weight > 0:
        n = z.shape[1]
        grades = torch.arange(n, dtype=z.dtype)
        distance = (grades[None, :] - t[:, None].to(z.dtype)).abs() / (n - 1)
        loss = loss + ordinal_weight * (torch.softmax(z, dim=1) * distance).sum(dim=1)
    w = weights[t if groups is None else groups[known]]
    return (w * loss).sum() / w.sum().clamp_min(1e-12)
