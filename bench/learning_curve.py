"""Learning curve on ELPV: how many labelled images per class a user needs.

For each budget of labelled images per grade (25, 50, 100, 200 by default) and each seed, the
benchmark picks that many training cells per grade at random from the ELPV training split (all of
them where a grade has fewer: ELPV's ``2/3`` grade has 80 training cells), writes a dataset
folder of those rows plus the untouched test split, trains it with the default
:class:`TrainRecipe` (its validation part comes out of the picked rows, as it would for a user
with that many labels), and evaluates the 656 test cells through the line's ``Classifier``.

A training set with as many cells of each grade has other class frequencies than the line (57 % of
ELPV's test cells are grade 0, 4 % grade 2/3).  By default the grade head is given the line's mix
(``line_frequencies`` in dataset.yaml: the grade counts of the whole training split, what a plant
knows of its defect rates), and the model's probabilities are shifted to it in the graph;
``--no-line-mix`` keeps the subset's mix.  Each setting is kept in the results file.  Balanced
accuracy (mean recall over grades) and macro-F1 weigh every grade alike; accuracy weighs them as
the line does.

    python -m bench.learning_curve                       # 25/50/100/200 per class, seeds 0 and 1
    python -m bench.learning_curve --per-class 25 50 --seeds 0
    python -m bench.learning_curve --no-line-mix         # without the line's class frequencies

Prints a table and writes bench/results/learning_curve.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from appliance.dataset import Dataset, HeadSpec, Sample, load_dataset, write_dataset
from appliance.training.evaluate import evaluate_model
from appliance.training.recipe import TrainRecipe
from appliance.training.train import train_model
from bench.common import RESULTS, machine, write_result
from bench.elpv import DEFAULT_DATA, GRADE_HEAD, binary_accuracy, ensure_dataset


def subset(dataset: Dataset, per_class: int, seed: int) -> list[Sample]:
    """``per_class`` random training rows per grade (fewer where a grade has fewer)."""
    by_grade: dict[str, list[Sample]] = defaultdict(list)
    for s in dataset.split("train"):
        by_grade[s.labels[GRADE_HEAD]].append(s)
    rng = np.random.default_rng(seed)
    picked: list[Sample] = []
    for grade in sorted(by_grade):
        rows = by_grade[grade]
        picked += [rows[i] for i in sorted(rng.permutation(len(rows))[:per_class])]
    return picked


def line_mix(dataset: Dataset) -> list[HeadSpec]:
    """The heads with the grade mix of the whole training split as the line's class frequencies
    (what a plant knows of its own defect rates)."""
    train = dataset.split("train")
    return [h.model_copy(update={"line_frequencies": {c: sum(1 for s in train if s.labels.get(h.name) == c)
                                                      for c in h.classes}})
            if h.name == GRADE_HEAD else h for h in dataset.heads]


def run_point(data: Path, per_class: int, seed: int, recipe: TrainRecipe, use_line_mix: bool) -> dict:
    dataset = load_dataset(data)
    train_rows = subset(dataset, per_class, seed)
    heads = line_mix(dataset) if use_line_mix else dataset.heads
    with tempfile.TemporaryDirectory(prefix="learning-curve-") as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        (root / "images").symlink_to((data / "images").resolve(), target_is_directory=True)
        rows = [Sample(root / s.image.relative_to(data), s.labels, s.split)
                for s in train_rows + dataset.split("test")]
        write_dataset(root, heads, rows, name=f"ELPV {per_class}/class seed {seed}")
        t0 = time.perf_counter()
        train_model(root, Path(tmp) / "model", recipe.model_copy(update={"seed": seed}), progress=False)
        seconds = time.perf_counter() - t0
        grade = evaluate_model(Path(tmp) / "model", root, split="test").summary()["heads"][GRADE_HEAD]
    counts = {g: sum(1 for s in train_rows if s.labels[GRADE_HEAD] == g) for g in grade["classes"]}
    return {
        "per_class": per_class, "seed": seed, "labelled_images": len(train_rows), "per_grade": counts,
        "accuracy_4level": round(grade["accuracy"], 4), "macro_f1": round(grade["macro_f1"], 4),
        "binary_accuracy": round(binary_accuracy(np.array(grade["confusion"]), grade["classes"]), 4),
        "recall": {c: None if r is None else round(r, 4) for c, r in grade["recall"].items()},
        "training_seconds": round(seconds, 1),
    }


def summarise(points: list[dict]) -> list[dict]:
    """Mean and spread over seeds, per budget."""
    out = []
    for per_class in sorted({p["per_class"] for p in points}):
        group = [p for p in points if p["per_class"] == per_class]
        acc = np.array([p["accuracy_4level"] for p in group])
        f1 = np.array([p["macro_f1"] for p in group])
        balanced = np.array([np.mean([r for r in p["recall"].values() if r is not None]) for p in group])
        out.append({"per_class": per_class, "labelled_images": group[0]["labelled_images"], "runs": len(group),
                    "accuracy_4level_mean": round(float(acc.mean()), 4),
                    "accuracy_4level_min": round(float(acc.min()), 4),
                    "accuracy_4level_max": round(float(acc.max()), 4),
                    "macro_f1_mean": round(float(f1.mean()), 4),
                    "balanced_accuracy_mean": round(float(balanced.mean()), 4),
                    "binary_accuracy_mean": round(float(np.mean([p["binary_accuracy"] for p in group])), 4),
                    "training_seconds_mean": round(float(np.mean([p["training_seconds"] for p in group])), 1)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ELPV dataset folder (imported if absent)")
    parser.add_argument("--per-class", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--line-mix", action=argparse.BooleanOptionalAction, default=True,
                        help="give the grade head the line's class frequencies (dataset.yaml line_frequencies)")
    args = parser.parse_args()
    setting = "line_mix" if args.line_mix else "training_mix"
    data = ensure_dataset(args.data)
    recipe = TrainRecipe()
    points = []
    for per_class in args.per_class:
        for seed in args.seeds:
            point = run_point(data, per_class, seed, recipe, args.line_mix)
            points.append(point)
            print(f"{per_class:>4}/class seed {seed}: {point['labelled_images']:>4} images  "
                  f"4-level {point['accuracy_4level']:.4f}  macro-F1 {point['macro_f1']:.4f}  "
                  f"binary {point['binary_accuracy']:.4f}  {point['training_seconds']:.0f} s", flush=True)
    summary = summarise(points)
    print("\nper class  images  4-level mean [min, max]   balanced  macro-F1  binary  train s")
    for s in summary:
        print(f"{s['per_class']:>9}  {s['labelled_images']:>6}  {s['accuracy_4level_mean']:.4f} "
              f"[{s['accuracy_4level_min']:.4f}, {s['accuracy_4level_max']:.4f}]  "
              f"{s['balanced_accuracy_mean']:.4f}    {s['macro_f1_mean']:.4f}"
              f"    {s['binary_accuracy_mean']:.4f}  {s['training_seconds_mean']:.0f}")
    previous = RESULTS / "learning_curve.json"
    settings = json.loads(previous.read_text()).get("settings", {}) if previous.is_file() else {}
    settings[setting] = {"machine": machine(), "summary": summary, "points": points}
    path = write_result("learning_curve", {
        "protocol": "ELPV training split subsampled per grade; full test split (656 cells) through Classifier; "
                    "default TrainRecipe, its val part from the subset",
        "settings_meaning": {"training_mix": "the model keeps the subset's class mix (as many cells per grade)",
                             "line_mix": "dataset.yaml line_frequencies = the grade mix of the whole training "
                                         "split: probabilities shifted to the line's mix in-graph"},
        "recipe": recipe.model_dump(), "settings": settings,
        "full_training_split": "see bench/results/elpv.json (1,968 labelled cells)",
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
