"""Active learning: which waiting parts a person should label first.

Informativeness is the predictive entropy of the watched heads (normalised to 0..1), plus the
inverse top-2 margin.  A greedy pass then spreads the picks: each pick lowers the score of later
candidates with the same predicted class (class balance) and of near-identical probability
vectors (diversity), so the queue is not ten copies of one ambiguous case.  Held parts always
come before audit samples: they are blocking production.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from appliance.store import Store

CLASS_PENALTY = 0.05
"""Score lost per earlier pick of the same predicted class.  bench/active_learning.py on ELPV (3 seeds,
40 + 40 labels per round to 600): mean accuracy 0.7052 at 0.05, 0.7075 at 0, 0.7005 at 0.15 (the same
as random order), 0.6993 at 0.3; a stronger penalty makes the queue pick confident cells of the
other classes."""
DUPLICATE_COSINE = 0.995
"""Probability vectors this similar to an earlier pick count as duplicates."""
DUPLICATE_PENALTY = 0.5
FAILED_SCORE = 2.0
"""A part whose image could not be classified: a person must look at it first."""
CANDIDATE_POOL = 1000
"""The queue ranks the newest this many waiting parts (held ones first)."""


def review_queue(store: Store, heads: Sequence[str] | None, limit: int) -> dict[str, Any]:
    """The review queue as the API serves it.  ``waiting`` counts every unlabelled part; the
    ranking looks at the newest ``ranked_from`` of them."""
    candidates = store.review_candidates(CANDIDATE_POOL)
    ranked = rank(candidates, heads, limit)
    return {"waiting": sum(store.waiting_for_review().values()), "ranked_from": len(candidates), "count": len(ranked),
            "results": ranked}


def informativeness_rows(p: np.ndarray) -> np.ndarray:
    """Informativeness of each row of an (n, k) matrix of class probabilities, in 0..1."""
    p = np.clip(np.asarray(p, float), 1e-12, 1.0)
    if p.shape[1] < 2:
        return np.zeros(len(p))
    entropy = -(p * np.log(p)).sum(axis=1) / np.log(p.shape[1])
    top = np.sort(p, axis=1)
    margin = top[:, -1] - top[:, -2]
    return 0.5 * entropy + 0.5 * (1.0 - margin)


def informativeness(probs: Sequence[float]) -> float:
    return float(informativeness_rows(np.asarray(probs, float)[None, :])[0])


def rank(candidates: list[dict[str, Any]], heads: Sequence[str] | None = None,
         limit: int = 50) -> list[dict[str, Any]]:
    """Order review candidates (results with ``predictions``); adds ``priority`` to each.

    Vectorised over the candidates: each pick costs one pass over the pool, so a queue of 1,000
    waiting parts ranks in milliseconds."""
    n = len(candidates)
    keys: list[str] = []
    vectors: list[np.ndarray | None] = []
    owners: list[int] = []  # candidate of each watched prediction
    probs: list[np.ndarray] = []
    for i, c in enumerate(candidates):
        preds = sorted((p for p in c.get("predictions", []) if heads is None or p["head"] in heads),
                       key=lambda p: p["head"])
        keys.append("/".join(f"{p['head']}={p['label']}" for p in preds))
        for p in preds:
            owners.append(i)
            probs.append(np.asarray(p["probs"], float))
        vectors.append(np.concatenate(probs[len(probs) - len(preds):]) if preds else None)
    # a candidate's score is its most uncertain head's; one without predictions failed: first
    score = np.full(n, -np.inf)
    for length in {len(q) for q in probs}:
        of_length = [j for j, q in enumerate(probs) if len(q) == length]
        np.maximum.at(score, np.array(owners)[of_length], informativeness_rows(np.stack([probs[j] for j in of_length])))
    score[np.isneginf(score)] = FAILED_SCORE
    key_ids = np.unique(np.array(keys, dtype=object), return_inverse=True)[1] if n else np.zeros(0, int)
    # candidates whose probability vectors have the same length, stacked: duplicates are found per group
    groups = {length: np.array([i for i, v in enumerate(vectors) if v is not None and len(v) == length])
              for length in {len(v) for v in vectors if v is not None}}
    stacked = {length: np.stack([vectors[i] for i in members]) for length, members in groups.items()}
    norms = {length: np.linalg.norm(m, axis=1) for length, m in stacked.items()}

    picks_of_key = np.zeros(int(key_ids.max()) + 1 if n else 0)
    duplicate = np.zeros(n, bool)
    tier = np.array([c.get("review") for c in candidates], dtype=object)
    picked: list[dict[str, Any]] = []
    for name in ("hold", "audit"):
        in_tier = tier == name  # still to pick in this tier
        while in_tier.any() and len(picked) < limit:
            adjusted = score - CLASS_PENALTY * picks_of_key[key_ids] - DUPLICATE_PENALTY * duplicate
            best = int(np.argmax(np.where(in_tier, adjusted, -np.inf)))
            in_tier[best] = False
            candidates[best]["priority"] = round(float(adjusted[best]), 4)
            picked.append(candidates[best])
            picks_of_key[key_ids[best]] += 1
            v = vectors[best]
            if v is not None:
                members = groups[len(v)]
                cos = stacked[len(v)] @ v / (norms[len(v)] * np.linalg.norm(v) + 1e-12)
                duplicate[members] |= cos > DUPLICATE_COSINE
    return picked
