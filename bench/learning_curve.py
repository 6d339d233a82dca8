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

The measuring is :mod:`appliance.training.learning_curve`, which ``appliance learning-curve`` runs
on a user's own dataset; this benchmark adds ELPV's binary accuracy and keeps both settings.

    python -m bench.learning_curve                       # 25/50/100/200 per class, seeds 0 and 1
    python -m bench.learning_curve --per-class 25 50 --seeds 0
    python -m bench.learning_curve --no-line-mix         # without the line's class frequencies

Prints a table and writes bench/results/learning_curve.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from appliance.dataset import Dataset, load_dataset
from appliance.training import learning_curve
from appliance.training.recipe import TrainRecipe
from bench.common import RESULTS, machine, write_result
from bench.elpv import DEFAULT_DATA, GRADE_HEAD, binary_accuracy, ensure_dataset


def run_point(dataset: Dataset, per_class: int, seed: int, recipe: TrainRecipe, use_line_mix: bool) -> dict:
    """One point of :func:`appliance.training.learning_curve.run_point` on the grade head, with
    ELPV's binary accuracy (defective = grade ≥ 1/2) beside the 4-level one."""
    point = learning_curve.run_point(dataset, GRADE_HEAD, per_class, seed, recipe, use_line_mix)
    point["accuracy_4level"] = point.pop("accuracy")
    point["binary_accuracy"] = round(binary_accuracy(np.array(point["confusion"]), point["classes"]), 4)
    return point


def summarise(points: list[dict]) -> list[dict]:
    return learning_curve.summarise(points, metrics=("accuracy_4level", "macro_f1", "binary_accuracy"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ELPV dataset folder (imported if absent)")
    parser.add_argument("--per-class", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--line-mix", action=argparse.BooleanOptionalAction, default=True,
                        help="give the grade head the line's class frequencies (dataset.yaml line_frequencies)")
    args = parser.parse_args()
    setting = "line_mix" if args.line_mix else "training_mix"
    dataset = load_dataset(ensure_dataset(args.data))
    recipe = TrainRecipe()
    points = []
    for per_class in args.per_class:
        for seed in args.seeds:
            point = run_point(dataset, per_class, seed, recipe, args.line_mix)
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
