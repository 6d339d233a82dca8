import asyncio
from pathlib import Path

import numpy as np
import pytest

from appliance.active import (
    CLASS_PENALTY,
    DUPLICATE_COSINE,
    DUPLICATE_PENALTY,
    FAILED_SCORE,
    ReviewQueue,
    informativeness,
    rank,
    review_queue,
)
from appliance.result import HeadResult
from tests.unit.test_store import make_store, result


def cand(rid: str, review: str, probs: list[float]) -> dict:
    label = str(max(range(len(probs)), key=probs.__getitem__))
    return {"result_id": rid, "review": review,
            "predictions": [{"head": "grade", "label": label, "probs": probs}]}


def test_uncertain_beats_confident() -> None:
    assert informativeness([0.5, 0.5]) > informativeness([0.7, 0.3]) > informativeness([0.99, 0.01])


def test_holds_first_then_audits() -> None:
    ranked = rank([cand("a1", "audit", [0.5, 0.5]), cand("h1", "hold", [0.9, 0.1])])
    assert [r["result_id"] for r in ranked] == ["h1", "a1"]


def test_duplicates_and_one_class_do_not_crowd_the_queue() -> None:
    same = [cand(f"dup{i}", "hold", [0.52, 0.48, 0.0]) for i in range(5)]
    other = cand("other", "hold", [0.05, 0.3, 0.65])  # less uncertain, but a different case
    ranked = [r["result_id"] for r in rank([*same, other], limit=3)]
    assert ranked[0].startswith("dup")
    assert ranked[1] == "other", ranked


def test_failed_parts_without_predictions_rank_first() -> None:
    failed = {"result_id": "f", "review": "hold", "predictions": []}
    ranked = rank([cand("x", "hold", [0.5, 0.5]), failed])
    assert ranked[0]["result_id"] == "f"


def reference_rank(candidates: list[dict], heads: list[str] | None, limit: int) -> list[tuple[str, float]]:
    """The queue's rule written plainly, one candidate at a time: what the vectorised rank must equal."""
    def vector(c: dict) -> np.ndarray | None:
        preds = [p for p in c["predictions"] if heads is None or p["head"] in heads]
        return np.concatenate([np.asarray(p["probs"], float) for p in preds]) if preds else None

    def key(c: dict) -> str:
        preds = sorted((p for p in c["predictions"] if heads is None or p["head"] in heads), key=lambda p: p["head"])
        return "/".join(f"{p['head']}={p['label']}" for p in preds)

    def base(c: dict) -> float:
        preds = [p for p in c["predictions"] if heads is None or p["head"] in heads]
        return max((informativeness(p["probs"]) for p in preds), default=FAILED_SCORE)

    def adjusted(c: dict) -> float:
        score = base(c) - CLASS_PENALTY * sum(key(p) == key(c) for p in picked)
        v = vector(c)
        if v is not None and any(w is not None and w.shape == v.shape
                                 and w @ v / (np.linalg.norm(w) * np.linalg.norm(v) + 1e-12) > DUPLICATE_COSINE
                                 for w in map(vector, picked)):
            score -= DUPLICATE_PENALTY
        return score

    picked: list[dict] = []
    out = []
    for tier in ("hold", "audit"):
        pool = [c for c in candidates if c["review"] == tier]
        while pool and len(picked) < limit:
            best = max(pool, key=adjusted)
            out.append((best["result_id"], round(adjusted(best), 4)))
            pool.remove(best)
            picked.append(best)
    return out


def mixed_queue(seed: int, n: int = 120) -> list[dict]:
    """Held and audit-sampled candidates with two heads, near-duplicates, one-head and failed parts."""
    rng = np.random.default_rng(seed)
    queue = []
    for i in range(n):
        grade = rng.dirichlet([0.3] * 4) if i % 7 else np.array([0.52, 0.48, 0.0, 0.0])  # some near-duplicates
        kind = rng.dirichlet([1, 1])
        preds = [{"head": "grade", "label": str(grade.argmax()), "probs": grade.tolist()},
                 {"head": "kind", "label": str(kind.argmax()), "probs": kind.tolist()}]
        if i % 11 == 0:
            preds = preds[:1]  # an older model without the second head: a shorter vector
        if i % 29 == 0:
            preds = []  # an image that failed
        queue.append({"result_id": f"r{i}", "review": "hold" if rng.random() < 0.6 else "audit",
                      "predictions": preds})
    return queue


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_equals_the_plain_rule_on_a_mixed_queue(seed: int) -> None:
    queue = mixed_queue(seed)
    for heads in (None, ["grade"]):
        expected = reference_rank(queue, heads, limit=40)
        ranked = rank([dict(c) for c in queue], heads, limit=40)
        assert [(r["result_id"], r["priority"]) for r in ranked] == expected


async def test_the_queue_ranked_from_the_store_equals_the_plain_rule(tmp_path: Path) -> None:
    """The daemon ranks Arrow columns from DuckDB, not these dicts: same picks, same priorities,
    whole records for the picks, labelled parts left out."""
    store = make_store(tmp_path)
    store.open()
    try:
        assert review_queue(store, None, 10)["results"] == [], "an empty store has an empty queue"
        queue = mixed_queue(seed=4, n=90)
        stored_ids = {}
        for i, c in enumerate(queue):
            part = result(i, "hold" if c["review"] == "hold" else "pass")
            part.review = c["review"]
            part.predictions = [HeadResult(p["head"], p["label"], max(p["probs"]), p["probs"])
                                for p in c["predictions"]]
            part.status = "ok" if c["predictions"] else "failed"
            await store.append(part)
            stored_ids[c["result_id"]] = part.result_id
        store.flush()
        labelled = queue[::10]
        for c in labelled:
            store.add_labels(stored_ids[c["result_id"]], {"grade": "0"}, "olga", None, verified=True)
        waiting = [c for c in queue if c not in labelled]
        # the store's order: held first, newest first
        in_store_order = sorted(waiting, key=lambda c: (c["review"] != "hold", -int(c["result_id"][1:])))
        for heads in (None, ["grade"]):
            expected = [(stored_ids[rid], priority) for rid, priority in reference_rank(in_store_order, heads, 30)]
            served = review_queue(store, heads, 30)
            assert [(r["result_id"], r["priority"]) for r in served["results"]] == expected
            assert served["waiting"] == served["ranked_from"] == len(waiting)
            first = served["results"][0]
            assert first["part_id"].startswith("P") and first["review"] in ("hold", "audit")
            assert {p["head"] for p in first["predictions"]} <= {"grade", "kind"}
    finally:
        store.close()


async def test_review_queue_ranks_once_for_requests_together_and_again_after_a_label(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.open()
    try:
        async def hold(i: int) -> str:
            part = result(i, "hold")
            part.review = "hold"
            await store.append(part)
            store.flush()
            return part.result_id

        first = [await hold(i) for i in range(3)]
        queue = ReviewQueue(store, heads=None, max_age_s=60)
        together = await asyncio.gather(*(queue.get(10) for _ in range(8)))
        assert queue.rankings == 1 and all(q is together[0] for q in together)
        assert {r["result_id"] for r in together[0]["results"]} == set(first)

        newer = await hold(3)
        assert (await queue.get(10))["waiting"] == 3 and queue.rankings == 1, "served from the last ranking"
        other_limit = await queue.get(2)
        assert queue.rankings == 2 and other_limit["count"] == 2, "each limit has its own ranking"

        store.add_labels(first[0], {"grade": "0"}, "olga", None, verified=True)
        after = await queue.get(10)
        assert queue.rankings == 3, "a label re-ranks at once"
        assert {r["result_id"] for r in after["results"]} == {first[1], first[2], newer}

        queue.max_age_s = 0
        await queue.get(10)
        await queue.get(10)
        assert queue.rankings == 5, "max age 0 ranks on every request"
    finally:
        store.close()
