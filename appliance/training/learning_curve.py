"""Learning curve: how many labelled images per class one head needs, measured on your own data.

For each budget of labelled images per class and each seed, that many training rows per class of
the head are picked at random (all of them where a class has fewer), trained with the recipe (its
validation part comes out of the picked rows, as it would for a user with that many labels) and
scored on the dataset's untouched test split.  Other heads' labels ride along on the picked rows.

With ``line_mix`` the head is given the class mix of the whole training split as its
``line_frequencies`` (unless the dataset already sets them): a subset with as many images of every
class would otherwise make the model flag rare classes far too often on a line where most parts
are good.  A head graded ``within`` another takes no line mix of its own (its mixture follows the
conditioning head's probabilities), so it is trained as the dataset says.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from appliance.dataset import Dataset, HeadSpec, Sample, load_dataset, write_dataset
from appliance.errors import UserError
from appliance.training.evaluate import evaluate_model
from appliance.training.recipe import TrainRecipe
from appliance.training.train import train_model

BUDGETS = (25, 50, 100, 200)
SEEDS = (0, 1)
DATASET_FILES = ("labels.csv", "dataset.yaml")


def subset(dataset: Dataset, head: str, per_class: int, seed: int) -> list[Sample]:
    """``per_class`` random training rows per class of ``head`` (fewer where a class has fewer)."""
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in dataset.split("train"):
        if head in s.labels:
            by_class[s.labels[head]].append(s)
    rng = np.random.default_rng(seed)
    picked: list[Sample] = []
    for label in sorted(by_class):
        rows = by_class[label]
        picked += [rows[i] for i in sorted(rng.permutation(len(rows))[:per_class])]
    return picked


def with_line_mix(dataset: Dataset, head: str) -> list[HeadSpec]:
    """The heads, ``head`` given the class counts of the whole training split as its line mix."""
    train = dataset.split("train")
    return [h.model_copy(update={"line_frequencies": {c: max(1, sum(1 for s in train if s.labels.get(h.name) == c))
                                                      for c in h.classes}})
            if h.name == head and not h.line_frequencies and h.within is None else h for h in dataset.heads]


def check(dataset: Dataset, head: str) -> None:
    """Refuse, with the reason, a dataset the curve cannot be measured on."""
    if head not in {h.name for h in dataset.heads}:
        raise UserError(f"{dataset.root}: no head '{head}' (heads: {', '.join(h.name for h in dataset.heads)})")
    if not dataset.split("test") or not dataset.split("train"):
        raise UserError(f"{dataset.root}: a learning curve needs rows with split 'train' and split 'test' "
                        "in labels.csv (the test rows score every point)")


def run_point(dataset: Dataset, head: str, per_class: int, seed: int, recipe: TrainRecipe,
              line_mix: bool) -> dict[str, Any]:
    """Train on ``per_class`` labels per class of ``head`` and score the test split (a dataset
    :func:`check` has passed)."""
    data = dataset.root
    train_rows = subset(dataset, head, per_class, seed)
    heads = with_line_mix(dataset, head) if line_mix else dataset.heads
    with tempfile.TemporaryDirectory(prefix="learning-curve-") as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        for entry in data.iterdir():  # the images stay where they are
            if entry.name not in DATASET_FILES:
                (root / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        rows = [Sample(root / s.image.relative_to(data), s.labels, s.split)
                for s in train_rows + dataset.split("test")]
        write_dataset(root, heads, rows, name=f"{data.name} {per_class}/class seed {seed}")
        t0 = time.perf_counter()
        train_model(root, Path(tmp) / "model", recipe.model_copy(update={"seed": seed}), progress=False)
        seconds = time.perf_counter() - t0
        scored = evaluate_model(Path(tmp) / "model", root, split="test").summary()["heads"][head]
    return {
        "per_class": per_class, "seed": seed, "labelled_images": len(train_rows), "test_images": scored["n"],
        "per_label": {c: sum(1 for s in train_rows if s.labels[head] == c) for c in scored["classes"]},
        "accuracy": round(scored["accuracy"], 4), "macro_f1": round(scored["macro_f1"], 4),
        "recall": {c: None if r is None else round(r, 4) for c, r in scored["recall"].items()},
        "confusion": scored["confusion"], "classes": scored["classes"],
        "training_seconds": round(seconds, 1),
    }


def summarise(points: list[dict[str, Any]], metrics: tuple[str, ...] = ("accuracy", "macro_f1")) -> list[dict]:
    """Per budget: mean, min and max over seeds of each metric, balanced accuracy (mean recall
    over classes) and training seconds."""
    out = []
    for per_class in sorted({p["per_class"] for p in points}):
        group = [p for p in points if p["per_class"] == per_class]
        row: dict[str, Any] = {"per_class": per_class, "labelled_images": group[0]["labelled_images"],
                               "runs": len(group)}
        for metric in metrics:
            values = np.array([p[metric] for p in group], float)
            row |= {f"{metric}_mean": round(float(values.mean()), 4), f"{metric}_min": round(float(values.min()), 4),
                    f"{metric}_max": round(float(values.max()), 4)}
        row["balanced_accuracy_mean"] = round(float(np.mean(
            [np.mean([r for r in p["recall"].values() if r is not None]) for p in group])), 4)
        row["training_seconds_mean"] = round(float(np.mean([p["training_seconds"] for p in group])), 1)
        out.append(row)
    return out


def to_text(head: str, summary: list[dict]) -> str:
    lines = [f"{head}: accuracy on the test split by labelled images per class (mean [min, max] over seeds)",
             "per class  images  accuracy                  balanced  macro-F1  train s"]
    lines += [f"{s['per_class']:>9}  {s['labelled_images']:>6}  {s['accuracy_mean']:.4f} "
              f"[{s['accuracy_min']:.4f}, {s['accuracy_max']:.4f}]  {s['balanced_accuracy_mean']:.4f}    "
              f"{s['macro_f1_mean']:.4f}    {s['training_seconds_mean']:.0f}" for s in summary]
    return "\n".join(lines)


def measure(data: Path, head: str | None, budgets: tuple[int, ...] = BUDGETS, seeds: tuple[int, ...] = SEEDS,
            recipe: TrainRecipe | None = None, line_mix: bool = True,
            on_point: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every budget × seed; ``head`` defaults to the dataset's first.  ``on_point(point)`` is
    called after each training (progress)."""
    dataset = load_dataset(data)
    head = head or dataset.heads[0].name
    check(dataset, head)
    recipe = recipe or TrainRecipe()
    points = []
    for per_class in budgets:
        for seed in seeds:
            points.append(run_point(dataset, head, per_class, seed, recipe, line_mix))
            if on_point is not None:
                on_point(points[-1])
    return {"dataset": str(data), "head": head, "line_mix": line_mix, "recipe": recipe.model_dump(),
            "summary": summarise(points), "points": points}
