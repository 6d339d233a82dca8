"""Calibration: temperature scaling (Guo et al. 2017), one scalar per head fitted on held-out
logits; and the prior shift from the training set's class mix to the line's."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from appliance.training.losses import class_weights
from appliance.training.metrics import softmax
from appliance.training.within import mixture_np

T_MIN, T_MAX = 0.25, 10.0
"""Bounds on the temperature: a perfectly separated validation part would otherwise drive it
towards 0 (infinitely confident outputs)."""


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def _minimise(nll: Callable[[float], float]) -> float:
    """The temperature in ``[T_MIN, T_MAX]`` minimising ``nll``.

    The NLL is unimodal in log T, so a coarse log grid followed by a golden-section search on
    the best bracket is enough and needs no optimiser library.
    """
    grid = np.geomspace(T_MIN, T_MAX, 61)
    losses = [nll(t) for t in grid]
    i = int(np.argmin(losses))
    lo, hi = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(np.exp(a)) < nll(np.exp(b)):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood; 1.0 without samples."""
    if len(y) == 0:
        return 1.0
    return _minimise(lambda t: _nll(softmax(logits / t), y))


def fit_mixture_temperature(cond_probs: np.ndarray, logits: np.ndarray, y: np.ndarray) -> float:
    """For a head graded within another: the one temperature of its sub-heads that minimises the
    NLL of the mixture the graph outputs (``cond_probs``: the conditioning head's calibrated
    probabilities); 1.0 without samples."""
    if len(y) == 0:
        return 1.0
    return _minimise(lambda t: _nll(mixture_np(cond_probs, logits, t), y))


def prior_shift(y: np.ndarray, classes: list[str], balance: float,
                line_frequencies: dict[str, float]) -> np.ndarray:
    """Per-class log-ratio ``log(line prior / training prior)`` to add to calibrated logits.

    A loss weighted by ``w_c`` trains as if class c had the prior ``count_c · w_c``; adding the log
    ratio turns calibrated probabilities for that prior into probabilities for the line's (Bayes'
    rule; Saerens et al. 2002).  Zero (no shift) without ``line_frequencies``, and for a class
    absent from the training rows.
    """
    n = len(classes)
    if not line_frequencies:
        return np.zeros(n)
    counts = np.bincount(y[y >= 0], minlength=n).astype(float)
    trained = counts * class_weights(y, n, balance).numpy()
    trained /= trained.sum()
    line = np.array([line_frequencies[c] for c in classes], float)
    line /= line.sum()
    return np.where(trained > 0, np.log(line) - np.log(np.where(trained > 0, trained, 1.0)), 0.0)
