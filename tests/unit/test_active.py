from appliance.active import informativeness, rank


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
