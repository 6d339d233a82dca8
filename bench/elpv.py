"""ELPV benchmark: the protocol of ../shared/DESIGN.md end to end, on this machine.

1. the ELPV dataset folder (stratified 75/25 split on (grade, type), seed 0) is imported unless
   ``--data`` already holds it;
2. a model is trained with the default :class:`TrainRecipe` (``--recipe FILE.yaml`` overrides
   fields), timing the wall-clock training seconds;
3. the test split is evaluated through :func:`appliance.training.evaluate.evaluate_model` (the
   line's ``Classifier`` on onnxruntime);
4. the exported model's latency is measured: batch 1, 2 threads, 300 consecutive runs on real
   test cells (after 20 warm-up runs).

Prints a table and writes bench/results/elpv.json (``--out`` elsewhere).
Literature (Deitsch et al. 2019, 4-level accuracy): fine-tuned VGG-19 0.8842, SVM 0.8244.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from appliance.dataset import load_dataset
from appliance.datasets.elpv import import_elpv
from appliance.imageio import read_image
from appliance.inference import Classifier
from appliance.model_package import read_card
from appliance.training.evaluate import HeadReport, evaluate_model
from appliance.training.recipe import TrainRecipe
from appliance.training.train import train_model
from appliance.yamlio import load_validated
from bench.common import cpu_model

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "var" / "datasets" / "elpv"
GRADE_HEAD = "defect_grade"
DEFECTIVE = ("2/3", "1")
"""Binary protocol: defective = defect probability ≥ 1/2."""
LATENCY_RUNS = 300
LATENCY_WARMUP = 20
GOAL_ACCURACY = 0.90
GOAL_SECONDS = 600.0
HELD_SHARES = (0.1, 0.2, 0.3)
"""Selective accuracy: the 4-level accuracy on the parts left when the least confident share is held."""


def ensure_dataset(data: Path) -> Path:
    if (data / "dataset.yaml").is_file() and (data / "labels.csv").is_file():
        return data
    import_elpv(data, seed=0)
    return data


def binary_accuracy(confusion: np.ndarray, classes: list[str]) -> float:
    bad = np.array([c in DEFECTIVE for c in classes])
    m = np.asarray(confusion)
    correct = m[np.ix_(~bad, ~bad)].sum() + m[np.ix_(bad, bad)].sum()
    return float(correct / max(m.sum(), 1))


def accuracy_when_holding(head: HeadReport) -> dict[str, float]:
    """4-level accuracy of the parts the line would still decide if it held the least confident
    ``HELD_SHARES`` for review (what ``disposition.min_confidence`` does on the line)."""
    order = np.argsort(-head.confidence, kind="stable")
    out = {}
    for share in HELD_SHARES:
        decided = order[:len(order) - round(share * len(order))]
        out[f"{share:.0%}"] = round(float(head.correct[decided].mean()), 4)
    return out


def latency(package: Path, data: Path, runs: int = LATENCY_RUNS) -> dict[str, float]:
    """p50/p99/mean ms of one ``classify`` (bs 1, 2 threads) over real test cells."""
    dataset = load_dataset(data)
    tests = [s for s in dataset.samples if s.split == "test"] or dataset.samples
    classifier = Classifier(package, intra_op_threads=2)
    images = [classifier.conform(read_image(s.image)) for s in tests[:runs]]
    for i in range(LATENCY_WARMUP):
        classifier.classify(images[i % len(images)])
    times = []
    for i in range(runs):
        t = time.perf_counter()
        classifier.classify(images[i % len(images)])
        times.append((time.perf_counter() - t) * 1000)
    a = np.array(times)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2), "runs": runs, "batch": 1, "threads": 2}


def run(data: Path, recipe: TrainRecipe, package: Path | None, label: str) -> dict:
    data = ensure_dataset(data)
    with tempfile.TemporaryDirectory(prefix="elpv-bench-") as tmp:
        out = package or Path(tmp) / "model"
        t0 = time.perf_counter()
        card = train_model(data, out, recipe, progress=os.isatty(2))
        train_seconds = time.perf_counter() - t0
        evaluation = evaluate_model(out, data, split="test")
        report = evaluation.summary()["heads"]
        lat = latency(out, data)
        card = read_card(out)
    g = report[GRADE_HEAD]
    classes = g["classes"]
    val = card.metrics.get("heads", {}).get(GRADE_HEAD, {})
    result = {
        "variant": label,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "protocol": "ELPV, stratified (grade, type) 75/25 split seed 0; test split via Classifier",
        "recipe": recipe.model_dump(),
        "test_images": g["n"],
        "accuracy_4level": round(g["accuracy"], 4),
        "macro_f1": round(g["macro_f1"], 4),
        "recall": {c: None if r is None else round(r, 4) for c, r in g["recall"].items()},
        "binary_accuracy": round(binary_accuracy(np.array(g["confusion"]), classes), 4),
        "confusion": g["confusion"],
        "classes": classes,
        "mean_abs_grade_error": round(g.get("mean_abs_grade_error", float("nan")), 4),
        "ece_test": round(g["ece"], 4),
        "ece_test_uncalibrated": g["ece_uncalibrated"],
        "accuracy_4level_when_holding": accuracy_when_holding(evaluation.heads[GRADE_HEAD]),
        "hold_curve": g["hold_curve"],
        "ece_val_uncalibrated": val.get("ece_uncalibrated"),
        "ece_val_calibrated": val.get("ece"),
        "temperature": card.head(GRADE_HEAD).temperature,
        "cell_type_accuracy": round(report["cell_type"]["accuracy"], 4) if "cell_type" in report else None,
        "training_seconds": round(train_seconds, 1),
        "training_seconds_by_stage": card.training.get("seconds"),
        "best_epoch": card.training.get("best_epoch"),
        "epochs_run": card.training.get("epochs_run"),
        "latency": lat,
        "quantization": card.training.get("quantization"),
        "goal": {"accuracy_4level": GOAL_ACCURACY, "training_seconds": GOAL_SECONDS,
                 "met": g["accuracy"] >= GOAL_ACCURACY and train_seconds <= GOAL_SECONDS},
        "literature": {"Deitsch2019_CNN": 0.8842, "Deitsch2019_SVM": 0.8244},
    }
    return result


def table(r: dict) -> str:
    rec = "  ".join(f"{c}:{v:.3f}" for c, v in r["recall"].items() if v is not None)
    lines = [
        f"ELPV ({r['variant']}): {r['test_images']} test cells",
        f"  4-level accuracy   {r['accuracy_4level']:.4f}   (goal ≥ {GOAL_ACCURACY}; VGG-19 0.8842, SVM 0.8244)",
        f"  macro-F1           {r['macro_f1']:.4f}",
        f"  recall per grade   {rec}",
        f"  binary accuracy    {r['binary_accuracy']:.4f}   (defective = grade ≥ 1/2)",
        "  4-level accuracy of the parts decided when the least confident are held: "
        + ", ".join(f"{share} held {acc:.4f}" for share, acc in r["accuracy_4level_when_holding"].items()),
        f"  ECE before/after calibration  test {r['ece_test_uncalibrated']} / {r['ece_test']:.4f}, "
        f"val {r['ece_val_uncalibrated']} / {r['ece_val_calibrated']}   (T={r['temperature']:.3f})",
        f"  training seconds   {r['training_seconds']:.1f}   (goal ≤ {GOAL_SECONDS:.0f}) "
        f"{r['training_seconds_by_stage']}",
        f"  latency bs1 2thr   p50 {r['latency']['p50_ms']} ms  p99 {r['latency']['p99_ms']} ms",
    ]
    if r.get("quantization"):
        lines.append(f"  quantization       {r['quantization']}")
    return "\n".join(lines)


def variant_row(r: dict) -> dict:
    """One line of the variants table kept in the results file."""
    rec = r["recipe"]
    pooled = rec.get("method") == "pooled_features"
    return {"variant": r["variant"], "date": r["date"], "method": rec.get("method", "fine_tune_top"),
            "image_size": rec["image_size"],
            "frozen_blocks": None if pooled else rec["frozen_blocks"],
            "pooled_blocks": rec["pooled_blocks"] if pooled else None,
            "epochs": rec["epochs"], "best_epoch": r["best_epoch"],
            "class_balance": rec["class_balance"], "quantize": rec.get("quantize", False),
            "training_seconds": r["training_seconds"], "load_avg_1m_at_end": r["machine"]["load_avg_1m_at_end"],
            "accuracy_4level": r["accuracy_4level"], "binary_accuracy": r["binary_accuracy"],
            "macro_f1": r["macro_f1"], "recall": r["recall"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ELPV dataset folder (imported if absent)")
    ap.add_argument("--recipe", type=Path, help="YAML mapping of TrainRecipe field overrides")
    ap.add_argument("--package", type=Path, help="keep the trained model package here (new folder)")
    ap.add_argument("--label", default=None, help="variant name recorded in the results")
    ap.add_argument("--out", type=Path, default=RESULTS / "elpv.json")
    args = ap.parse_args()
    recipe = load_validated(args.recipe, TrainRecipe) if args.recipe else TrainRecipe()
    label = args.label or (args.recipe.stem if args.recipe else "default")
    result = run(args.data, recipe, args.package, label)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["variants"] = [*previous.get("variants", []), variant_row(result)]  # every run, in order
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
