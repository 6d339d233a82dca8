"""Heads graded within another head's classes (``within`` in dataset.yaml): severity within type.

Such a head has one set of logits (a sub-head) per class of its conditioning head, laid out as one
``N×(K·S)`` output of the trained net (K conditioning classes, S graded classes; sub-head t is
columns ``t·S … t·S+S-1``).  What the model outputs for it is the mixture
``P(s|x) = Σ_t P(t|x) · P(s|t,x)``, so the package contract (one ``<head>_probs`` over the head's
classes) is the same as for any other head.

Training: a row whose conditioning label is known is scored by the sub-head of that class; a row
without one by the mixture, with the conditioning head's probabilities detached (the type head
learns from type labels only).  Both go through the ordinary head loss (cross-entropy plus the
ordinal term), since the log of a probability vector is a valid logit vector.
"""

from __future__ import annotations

import numpy as np
import torch

from appliance.dataset import HeadSpec
from appliance.training.metrics import softmax


def graded(heads: list[HeadSpec]) -> list[tuple[int, int]]:
    """``(graded head index, conditioning head index)`` for every head with ``within``."""
    names = [h.name for h in heads]
    return [(i, names.index(h.within)) for i, h in enumerate(heads) if h.within is not None]


def output_widths(heads: list[HeadSpec]) -> list[int]:
    """Logits the trained net yields per head: the class count, times the conditioning head's
    class count for a graded head."""
    by_name = {h.name: h for h in heads}
    return [len(h.classes) * (len(by_name[h.within].classes) if h.within else 1) for h in heads]


def mixture(cond_probs: torch.Tensor, logits: torch.Tensor, inv_temperature: torch.Tensor | float) -> torch.Tensor:
    """``Σ_t P(t) · softmax(sub-head t / T)``: ``N×K`` and ``N×(K·S)`` in, ``N×S`` out."""
    k = cond_probs.shape[1]
    sub = torch.softmax(logits.reshape(-1, k, logits.shape[1] // k) * inv_temperature, dim=2)
    return (cond_probs.unsqueeze(2) * sub).sum(dim=1)


def training_logits(logits: torch.Tensor, cond_logits: torch.Tensor, cond_target: torch.Tensor) -> torch.Tensor:
    """``N×S`` logits for the head loss: the labelled class's sub-head where ``cond_target`` ≥ 0,
    else the log of the mixture under the (detached) conditioning probabilities."""
    k = cond_logits.shape[1]
    sub = logits.reshape(len(logits), k, -1)
    known = cond_target >= 0
    chosen = sub[torch.arange(len(sub)), cond_target.clamp_min(0)]
    if bool(known.all()):
        return chosen
    log_mix = torch.logsumexp(torch.log_softmax(cond_logits.detach(), dim=1).unsqueeze(2)
                              + torch.log_softmax(sub, dim=2), dim=1)
    return torch.where(known.unsqueeze(1), chosen, log_mix)


def cells(y: np.ndarray, y_cond: np.ndarray, n_classes: int, n_cond: int) -> np.ndarray:
    """Class-balance group per row: the (conditioning class, class) cell, or, for a row without a
    conditioning label, one extra group per class (``n_cond·n_classes + class``); -1 where ``y``
    is unknown."""
    group = np.where(y_cond >= 0, y_cond * n_classes + y, n_cond * n_classes + y)
    return np.where(y >= 0, group, -1)


def mixture_np(cond_probs: np.ndarray, logits: np.ndarray, temperature: float) -> np.ndarray:
    """:func:`mixture` in numpy (calibration and validation scores)."""
    k = cond_probs.shape[1]
    n, width = logits.shape
    sub = softmax(logits.reshape(n * k, width // k) / temperature).reshape(n, k, width // k)
    return (cond_probs[:, :, None] * sub).sum(axis=1)
