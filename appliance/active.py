"""Active learning: which waiting parts a person should label first.

Informativeness is the predictive entropy of the watched heads (normalised to 0..1), plus the
inverse top-2 margin.  A greedy pass then spreads the picks: each pick lowers the score of later
candidates with the same predicted class (class balance) and of near-identical probability
vectors (diversity), so the queue is not ten copies of one ambiguous case.  Held parts always
come before audit samples: they are blocking production.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
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
    ranking looks at the newest ``ranked_from`` of them.

    The pool comes from the store as Arrow columns and is ranked on arrays; Python objects are
    built only for the ``limit`` parts picked.  Building them for the whole pool held the GIL long
    enough to stall the inference threads: the line's p99 rose ×4.7 while the queue was ranked 8
    times a second, against ×1.3 this way (bench/query_load.py)."""
    ranked_at = datetime.now(UTC)
    waiting, predictions = store.review_pool(CANDIDATE_POOL, heads)
    ids = waiting.column("result_id").to_pylist()
    position = {result_id: i for i, result_id in enumerate(ids)}
    keys = [""] * len(ids)
    of = np.array([position[r] for r in predictions.column("result_id").to_pylist()], int)  # row -> candidate
    for candidate, key in zip(of, predictions.column("key").to_pylist(), strict=True):
        keys[candidate] = key
    per_candidate = predictions.column("probs").combine_chunks()  # a list of per-head lists per row
    per_head = per_candidate.flatten()
    values = per_head.flatten().to_numpy(zero_copy_only=False)
    owners = np.repeat(of, np.diff(per_candidate.offsets.to_numpy()))
    in_order = np.argsort(owners, kind="stable")  # each candidate's predictions together, in head order
    bounds = per_head.offsets.to_numpy()
    probs = [values[bounds[j]:bounds[j + 1]] for j in in_order]
    owners = owners[in_order]
    tier = np.array(waiting.column("review").to_pylist(), dtype=object)
    order = _order(tier, keys, owners, probs, limit)
    ranked = store.results_by_ids([ids[i] for i, _ in order])
    for record, (_, priority) in zip(ranked, order, strict=True):
        record["priority"] = priority
    return {"waiting": sum(store.waiting_for_review().values()), "ranked_from": len(ids), "count": len(ranked),
            "ranked_at": ranked_at.isoformat(), "results": ranked}


@dataclass(frozen=True, slots=True)
class _Ranked:
    label_writes: int
    at: float
    queue: dict[str, Any]


class ReviewQueue:
    """The review queue the daemon serves, ranked at most once per ``max_age_s`` while nobody labels.

    A ranking of the newest 1,000 waiting parts takes about 40 ms of CPU in the daemon's process
    (:func:`review_queue`); dashboards refreshing many times a second would take that from the line
    over and over (bench/query_load.py).  Requests that arrive together share one ranking; a label
    always re-ranks, so a labelled part never comes back; a newly held part appears within
    ``max_age_s``.
    """

    def __init__(self, store: Store, heads: Sequence[str] | None, max_age_s: float) -> None:
        self.store = store
        self.heads = heads
        self.max_age_s = max_age_s
        self.rankings = 0
        """How many times the queue was actually ranked."""
        self._lock = asyncio.Lock()
        self._ranked: dict[int, _Ranked] = {}  # by limit

    async def get(self, limit: int) -> dict[str, Any]:
        async with self._lock:
            writes = self.store.label_writes  # read first: a label stored while ranking makes it stale
            cached = self._ranked.get(limit)
            if cached and cached.label_writes == writes and time.monotonic() - cached.at < self.max_age_s:
                return cached.queue
            at = time.monotonic()
            queue = await asyncio.to_thread(review_queue, self.store, self.heads, limit)
            self.rankings += 1
            self._ranked = {n: r for n, r in self._ranked.items() if r.label_writes == writes}
            self._ranked[limit] = _Ranked(writes, at, queue)
            return queue


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
    """Order review candidates (results with ``predictions``); adds ``priority`` to each."""
    keys: list[str] = []
    owners: list[int] = []  # candidate of each watched prediction
    probs: list[np.ndarray] = []
    for i, c in enumerate(candidates):
        preds = sorted((p for p in c.get("predictions", []) if heads is None or p["head"] in heads),
                       key=lambda p: p["head"])
        keys.append("/".join(f"{p['head']}={p['label']}" for p in preds))
        owners += [i] * len(preds)
        probs += [np.asarray(p["probs"], float) for p in preds]
    tier = np.array([c.get("review") for c in candidates], dtype=object)
    picked = []
    for i, priority in _order(tier, keys, np.array(owners, int), probs, limit):
        candidates[i]["priority"] = priority
        picked.append(candidates[i])
    return picked


def _order(tier: np.ndarray, keys: Sequence[str], owners: np.ndarray, probs: Sequence[np.ndarray],
           limit: int) -> list[tuple[int, float]]:
    """The greedy pass over ``n`` candidates: (candidate, priority) of up to ``limit`` picks.

    ``tier`` is each candidate's review ('hold' or 'audit'), ``keys`` its predicted classes,
    ``probs[j]`` the class probabilities of watched prediction ``j``, which belongs to candidate
    ``owners[j]`` (a candidate's predictions are in head order).  Vectorised over the candidates:
    each pick costs one pass over the pool, so a queue of 1,000 waiting parts ranks in milliseconds."""
    n = len(tier)
    # a candidate's score is its most uncertain head's; one without predictions failed: first
    score = np.full(n, -np.inf)
    for length in {len(q) for q in probs}:
        of_length = [j for j, q in enumerate(probs) if len(q) == length]
        np.maximum.at(score, owners[of_length], informativeness_rows(np.stack([probs[j] for j in of_length])))
    score[np.isneginf(score)] = FAILED_SCORE
    key_ids = np.unique(np.array(keys, dtype=object), return_inverse=True)[1] if n else np.zeros(0, int)
    # each candidate's probability vector (its heads' probabilities, concatenated); duplicates are
    # found among the candidates whose vectors have the same length
    starts = np.searchsorted(owners, np.arange(n + 1))
    vectors = [np.concatenate(probs[a:b]) if b > a else None for a, b in itertools.pairwise(starts)]
    groups = {length: np.array([i for i, v in enumerate(vectors) if v is not None and len(v) == length])
              for length in {len(v) for v in vectors if v is not None}}
    stacked = {length: np.stack([vectors[i] for i in members]) for length, members in groups.items()}
    norms = {length: np.linalg.norm(m, axis=1) for length, m in stacked.items()}

    picks_of_key = np.zeros(int(key_ids.max()) + 1 if n else 0)
    duplicate = np.zeros(n, bool)
    picked: list[tuple[int, float]] = []
    for name in ("hold", "audit"):
        in_tier = tier == name  # still to pick in this tier
        while in_tier.any() and len(picked) < limit:
            adjusted = score - CLASS_PENALTY * picks_of_key[key_ids] - DUPLICATE_PENALTY * duplicate
            best = int(np.argmax(np.where(in_tier, adjusted, -np.inf)))
            in_tier[best] = False
            picked.append((best, round(float(adjusted[best]), 4)))
            picks_of_key[key_ids[best]] += 1
            v = vectors[best]
            if v is not None:
                members = groups[len(v)]
                cos = stacked[len(v)] @ v / (norms[len(v)] * np.linalg.norm(v) + 1e-12)
                duplicate[members] |= cos > DUPLICATE_COSINE
    return picked
