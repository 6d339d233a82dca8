"""The development taxonomy suite: the product's default training on three kinds of taxonomy.

- ``elpv``: ELPV (4-level ``defect_grade`` + ``cell_type``) with the protocol of
  ../shared/DESIGN.md: the stratified 75/25 split on (grade, type) of
  :func:`appliance.datasets.elpv.import_elpv`, one split per seed (mean and spread over seeds);
- ``type_severity``: :mod:`bench.taxonomies.type_severity`, defect type × severity graded within
  each type (one set drawn per seed);
- ``hierarchy``: :mod:`bench.taxonomies.hierarchy`, family → subtype with 37 leaves.

Each set is trained as ``appliance train --data D --out P`` trains it (the recipe search within
``--budget``, :func:`appliance.training.search.search_and_train`; ``--fixed-default`` trains
``TrainRecipe``'s defaults instead, as ``appliance train`` did before the search; the record says
which), timed, then its ``test`` split is judged through the line's
``Classifier`` (:func:`appliance.training.evaluate.evaluate_model`): accuracy, macro-F1 and the
recall of each class per head, the hold curve (per head, and for the part: a part is held when
any head is below ``min_confidence``, as the disposition does), and the exported model's latency
(bs 1, 2 threads: :func:`bench.elpv.latency`).  The hierarchy adds the leaf accuracy and the share
of test parts whose predicted subtype belongs to the predicted family.

    python -m bench.taxonomy_suite                          # all sets, seeds 0 1 2
    python -m bench.taxonomy_suite --only type_severity --seeds 0
    python -m bench.taxonomy_suite --quick                  # tiny sets: a smoke test of the suite

Generated and imported sets are cached under ``--data-dir`` (default: the system's temp folder),
never in the repository.  Writes bench/results/taxonomy_suite.json (the sets not run keep their
last figures) and re-renders bench/results/README.md; ``--quick`` writes beside the data instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from appliance.dataset import Sample, load_dataset, write_dataset
from appliance.datasets.elpv import HEADS as ELPV_HEADS
from appliance.datasets.elpv import import_elpv
from appliance.datasets.split import stratified_pick
from appliance.imageio import read_image
from appliance.inference import Classifier
from appliance.training.evaluate import EvalReport, evaluate_model
from appliance.training.metrics import hold_at
from appliance.training.search import search_and_train
from appliance.training.train import train_model
from bench.common import RESULTS, machine
from bench.elpv import GRADE_HEAD, binary_accuracy, latency
from bench.taxonomies import hierarchy, type_severity

SETS = ("elpv", "type_severity", "hierarchy")
DEFAULT_DATA = Path(tempfile.gettempdir()) / "appliance-taxonomy-suite"
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
"""The ``min_confidence`` settings reported (the JSON keeps each head's full curve)."""
HELD_SHARES = (0.1, 0.2, 0.3)
QUICK_ELPV_SHARE = 0.05
QUICK_LATENCY_RUNS = 30


def elpv_data(root: Path, seed: int, quick: bool) -> Path:
    """ELPV split with ``seed``; ``quick``: a stratified 5 % of each split."""
    full = root / f"elpv-seed{seed}"
    if not (full / "labels.csv").is_file():
        partial = root / f"elpv-seed{seed}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        import_elpv(partial, seed=seed)
        partial.rename(full)
    if not quick:
        return full
    small = root / f"elpv-seed{seed}-quick"
    if not (small / "labels.csv").is_file():
        samples = load_dataset(full).samples
        keys = [(s.split, *s.labels.values()) for s in samples]
        pick = stratified_pick(keys, QUICK_ELPV_SHARE, seed)
        small.mkdir(parents=True, exist_ok=True)
        (small / "images").unlink(missing_ok=True)
        (small / "images").symlink_to((full / "images").resolve(), target_is_directory=True)
        write_dataset(small, ELPV_HEADS, [Sample(s.image.relative_to(full), s.labels, s.split)
                                          for s, p in zip(samples, pick, strict=True) if p])
    return small


def dataset_for(name: str, seed: int, root: Path, quick: bool, within: bool) -> Path:
    if name == "elpv":
        return elpv_data(root, seed, quick)
    if name == "type_severity":
        folder = root / f"type_severity-seed{seed}{'-within' if within else ''}{'-quick' if quick else ''}"
        if quick:
            return type_severity.build(folder, seed, per_type=12, test_per_type=6, within=within)
        return type_severity.build(folder, seed, within=within)
    if quick:
        return hierarchy.build(root / f"hierarchy-seed{seed}-quick", seed, per_leaf=4, test_per_leaf=2)
    return hierarchy.build(root / f"hierarchy-seed{seed}", seed)


def when_holding(confidence: np.ndarray, correct: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per held share: each head's accuracy on the parts still decided when the least confident
    share of parts is held."""
    order = np.argsort(-confidence, kind="stable")
    out = {}
    for share in HELD_SHARES:
        decided = order[:len(order) - round(share * len(order))]
        out[f"{share:.0%}"] = {h: round(float(c[decided].mean()), 4) for h, c in correct.items()}
    return out


def part_hold(evaluation: EvalReport) -> dict[str, Any]:
    """The line's view: a part is held when any head's confidence is under ``min_confidence``."""
    confidence = np.min([h.confidence for h in evaluation.heads.values()], axis=0)
    correct = {name: h.correct for name, h in evaluation.heads.items()}
    at = {}
    for t in THRESHOLDS:
        decided = confidence >= t
        at[f"{t:.2f}"] = {"held": round(1 - float(decided.mean()), 4),
                          **{h: round(float(c[decided].mean()), 4) if decided.any() else None
                             for h, c in correct.items()}}
    return {"at_min_confidence": at, "when_holding": when_holding(confidence, correct)}


def head_figures(summary: dict[str, Any], confidence: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    curve = summary["hold_curve"]
    return {
        "accuracy": round(summary["accuracy"], 4), "macro_f1": round(summary["macro_f1"], 4),
        "ece": round(summary["ece"], 4), "n": summary["n"],
        "recall": {c: None if r is None else round(r, 4) for c, r in summary["recall"].items()},
        "classes": summary["classes"], "confusion": summary["confusion"],
        "at_min_confidence": {f"{t:.2f}": dict(zip(("held", "accuracy"), hold_at(curve, t)[1:], strict=True))
                              for t in THRESHOLDS},
        "when_holding": {k: v["head"] for k, v in when_holding(confidence, {"head": correct}).items()},
        "hold_curve": curve,
    }


def consistency(package: Path, data: Path, child: str, parent: str) -> dict[str, Any]:
    """Share of test parts whose predicted ``child`` class belongs to the predicted ``parent`` class."""
    classifier = Classifier(package)
    parent_of = classifier.card.head(child).parent_of
    tests = load_dataset(data).split("test")
    agree = 0
    for start in range(0, len(tests), 32):
        images = [classifier.conform(read_image(s.image)) for s in tests[start:start + 32]]
        for p in classifier.classify_batch(images):
            agree += parent_of.get(p[child].label) == p[parent].label
    return {"consistent_with_parent": round(agree / len(tests), 4), "n": len(tests)}


def run_one(name: str, data: Path, seed: int, quick: bool, budget_s: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="taxonomy-suite-") as tmp:
        package = Path(tmp) / "model"
        started = time.perf_counter()
        if budget_s is None:
            card = train_model(data, package, progress=os.isatty(2))
        else:  # what `appliance train` runs
            card = search_and_train(data, package, budget_s, say=lambda line: print(line, file=sys.stderr))
        seconds = time.perf_counter() - started
        evaluation = evaluate_model(package, data, split="test")
        summary = evaluation.summary()["heads"]
        result: dict[str, Any] = {
            "seed": seed, "dataset": str(data), "test_images": evaluation.images,
            "training_seconds": round(seconds, 1), "training_seconds_by_stage": card.training.get("seconds"),
            "recipe": card.training.get("recipe"),
            "trained_by": "fixed defaults" if budget_s is None else f"recipe search, budget {budget_s:g} s",
            "heads": {h: head_figures(summary[h], r.confidence, r.correct) for h, r in evaluation.heads.items()},
            "part": part_hold(evaluation),
            "latency": latency(package, data, **({"runs": QUICK_LATENCY_RUNS} if quick else {})),
        }
        if name == "elpv":
            g = summary[GRADE_HEAD]
            result["binary_accuracy"] = round(binary_accuracy(np.array(g["confusion"]), g["classes"]), 4)
        if name == "hierarchy":
            result["leaf_accuracy"] = result["heads"][hierarchy.SUBTYPE_HEAD]["accuracy"]
            result |= consistency(package, data, hierarchy.SUBTYPE_HEAD, hierarchy.FAMILY_HEAD)
    return result


def figures(run: dict[str, Any]) -> dict[str, float]:
    """The scalar figures of one run that the summary averages over seeds."""
    out = {f"{h}.{m}": f[m] for h, f in run["heads"].items() for m in ("accuracy", "macro_f1")}
    out |= {k: run[k] for k in ("binary_accuracy", "leaf_accuracy", "consistent_with_parent") if k in run}
    out |= {"training_seconds": run["training_seconds"], "latency_p50_ms": run["latency"]["p50_ms"],
            "latency_p99_ms": run["latency"]["p99_ms"]}
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    values: dict[str, list[float]] = {}
    for run in runs:
        for k, v in figures(run).items():
            values.setdefault(k, []).append(v)
    return {k: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4),
                "min": round(float(np.min(v)), 4), "max": round(float(np.max(v)), 4), "runs": len(v)}
            for k, v in values.items()}


def readme_rows(p: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(benchmark, figure, measured, goal) rows of bench/results/README.md."""
    goals = {"elpv": {f"{GRADE_HEAD}.accuracy": "≥ 0.85 (best comparable literature: 0.835)",
                      f"{GRADE_HEAD}.macro_f1": "≥ 0.65", "binary_accuracy": "≥ 0.92"},
             "type_severity": {"defect_type.accuracy": "≥ 0.97", "severity.accuracy": "≥ 0.85"},
             "hierarchy": {"consistent_with_parent": "1.0"}}
    rows = []
    for name, s in p["sets"].items():
        summary, runs = s["summary"], s["runs"]
        seeds = ", ".join(str(r["seed"]) for r in runs)
        for key, v in summary.items():
            if key.startswith("latency_p50"):
                continue
            if key == "latency_p99_ms":
                text = f"{summary['latency_p50_ms']['mean']} / {v['mean']} ms"
                key = "model latency bs1, 2 threads, p50 / p99"
            else:
                text = f"{v['mean']}" + (f" ± {v['std']} (min {v['min']}, max {v['max']})" if v["runs"] > 1 else "")
            goal = goals.get(name, {}).get(key, "≤ 10 ms p99" if key.startswith("model latency") else
                                           "≤ 600 s" if key == "training_seconds" else "–")
            rows.append((f"taxonomy_suite/{name}", f"{key} (seeds {seeds})", text, goal))
        if name == "type_severity":
            held = [r["part"]["when_holding"]["20%"]["severity"] for r in runs]
            rows.append((f"taxonomy_suite/{name}", f"severity accuracy of the parts decided, 20 % held (seeds {seeds})",
                         f"{np.mean(held):.4f}", "≥ 0.95"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=SETS, action="append", help="run only this set (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=float, default=600.0, help="seconds for each training's recipe search")
    ap.add_argument("--fixed-default", action="store_true",
                    help="train TrainRecipe's defaults, no search (appliance train before the search)")
    ap.add_argument("--quick", action="store_true", help="tiny sets: checks the suite runs, measures nothing")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="where sets are generated and cached")
    ap.add_argument("--within", action="store_true",
                    help="type_severity: declare severity as graded within defect_type (dataset.yaml 'within')")
    ap.add_argument("--out", type=Path, help="results file (default: bench/results/taxonomy_suite.json; "
                                             "with --quick, taxonomy_suite.quick.json in --data-dir)")
    args = ap.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    out = args.out or (args.data_dir / "taxonomy_suite.quick.json" if args.quick else RESULTS / "taxonomy_suite.json")
    previous = json.loads(out.read_text()) if out.is_file() else {}
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), "quick": args.quick,
              "sets": previous.get("sets", {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only or SETS:
        runs: list[dict[str, Any]] = []
        for seed in args.seeds:
            data = dataset_for(name, seed, args.data_dir, args.quick, args.within)
            print(f"== {name} seed {seed}: {data}", flush=True)
            runs.append(run_one(name, data, seed, args.quick, None if args.fixed_default else args.budget))
            print(json.dumps(figures(runs[-1])), flush=True)
            report["sets"][name] = {"date": report["date"], "machine": machine(), "runs": runs,
                                    "summary": summarise(runs)}
            if name == "type_severity":
                report["sets"][name]["within"] = args.within
            out.write_text(json.dumps(report, indent=2) + "\n")  # after every run: a killed suite keeps its runs
    for row in readme_rows(report):
        print(" | ".join(row[1:]))
    print(f"wrote {out}")
    if out == RESULTS / "taxonomy_suite.json":
        from bench.run_all import render

        print(f"wrote {render()}")


if __name__ == "__main__":
    main()
