import numpy as np
import pytest

from appliance.active import (
    CLASS_PENALTY,
    DUPLICATE_COSINE,
    DUPLICATE_PENALTY,
    FAILED_SCORE,
    informativeness,
    rank,
)


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_equals_the_plain_rule_on_a_mixed_queue(seed: int) -> None:
    rng = np.random.default_rng(seed)
    queue = []
    for i in range(120):
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
    for heads in (None, ["grade"]):
        expected = reference_rank(queue, heads, limit=40)
        ranked = rank([dict(c) for c in queue], heads, limit=40)
        assert [(r["result_id"], r["priority"]) for r in ranked] == expected
