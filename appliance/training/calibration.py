"""Temperature scaling (Guo et al. 2017): one scalar per head, fitted on held-out logits."""

from __future__ import annotations

import numpy as np

from appliance.training.metrics import softmax

T_MIN, T_MAX = 0.25, 10.0
"""Bounds on the temperature: a perfectly separated validation part would otherwise drive it
towards 0 (infinitely confident outputs)."""


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    p = softmax(logits / t)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood; 1.0 without samples.

    The NLL is unimodal in log T, so a coarse log grid followed by a golden-section search on
    the best bracket is enough and needs no optimiser library.
    """
    if len(y) == 0:
        return 1.0
    grid = np.geomspace(T_MIN, T_MAX, 61)
    losses = [_nll(logits, y, t) for t in grid]
    i = int(np.argmin(losses))
    lo, hi = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if _nll(logits, y, np.exp(a)) < _nll(logits, y, np.exp(b)):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))
