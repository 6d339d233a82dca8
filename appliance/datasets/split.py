"""Stratified splits with exact totals (largest-remainder allocation over the strata)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np


def stratified_pick(keys: Sequence[Hashable], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask selecting ``round(len(keys) * fraction)`` items, spread over the strata in
    proportion to their size (each stratum gets its quota within ±1).

    Strata with one item are never picked, so a rare class keeps its only example for training.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} is not within 0..1")
    strata: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        strata[key].append(i)
    rng = np.random.default_rng(seed)
    order = sorted(strata, key=repr)  # deterministic, independent of row order
    quota = {k: len(strata[k]) * fraction for k in order}
    take = {k: int(np.floor(q)) if len(strata[k]) > 1 else 0 for k, q in quota.items()}
    target = round(len(keys) * fraction)
    # Hand out what is left to the strata with the largest remainders (ties: larger stratum).
    spare = sorted((k for k in order if len(strata[k]) > 1 and take[k] < len(strata[k])),
                   key=lambda k: (-(quota[k] - take[k]), -len(strata[k])))
    for k in spare[: max(0, target - sum(take.values()))]:
        take[k] += 1
    mask = np.zeros(len(keys), dtype=bool)
    for k in order:
        members = np.array(strata[k])
        mask[rng.permutation(members)[: take[k]]] = True
    return mask
