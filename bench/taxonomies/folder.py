"""Writing a generated set as a dataset folder (labels.csv + dataset.yaml, DESIGN.md), with what
was drawn in each image beside it (``marks.csv``: family, measure, contrast …) for analysis.

A folder is complete once ``generator.json`` (the generator's parameters) is written, last; the
suite reuses a folder whose parameters match instead of drawing it again.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ruamel.yaml import YAML

from appliance.dataset import HeadSpec, Sample, write_dataset
from appliance.errors import UserError
from bench.taxonomies.surfaces import LICENCE, Surfaces, finish, functional_cells

PARAMS_FILE = "generator.json"
MARKS_FILE = "marks.csv"

Draw = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, dict[str, Any]]]
"""Draws one defect on a surface: (surface, rng) → (image, what was drawn)."""


@dataclass(slots=True)
class Planned:
    """One image to draw: its labels, split and drawing."""

    labels: dict[str, str]
    split: str
    draw: Draw


def complete(out: Path, params: dict[str, Any]) -> bool:
    """Whether ``out`` already holds the set these parameters draw."""
    path = out / PARAMS_FILE
    return path.is_file() and json.loads(path.read_text()) == params


def generate(out: Path, heads: list[HeadSpec], plan: Iterable[Planned], params: dict[str, Any], name: str,
             within: dict[str, str] | None = None) -> Path:
    """Draw every planned image (each from its own seeded generator: ``[seed, index]``) into
    ``out/images`` and write the dataset folder.  ``within`` maps a head to the head it is graded
    within (the ``within`` field of dataset.yaml)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / PARAMS_FILE).is_file():
        raise UserError(f"{out}: not empty and not a generated set; choose a new folder")
    (out / PARAMS_FILE).unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    surfaces: Surfaces = functional_cells(params["seed"])
    samples, marks = [], []
    for i, item in enumerate(plan):
        rng = np.random.default_rng([params["seed"], i])
        image, drawn = item.draw(surfaces.pick(rng, item.split), rng)
        rel = Path("images") / f"{i:05d}.png"
        finish(image, rng).save(out / rel)
        samples.append(Sample(image=rel, labels=item.labels, split=item.split))
        marks.append({"image": rel.as_posix(), **item.labels, **_rounded(drawn)})
    write_dataset(out, heads, samples, name=name, licence=LICENCE)
    if within:
        _declare_within(out / "dataset.yaml", within)
    _write_marks(out / MARKS_FILE, marks)
    (out / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
    return out


def _declare_within(path: Path, within: dict[str, str]) -> None:
    yaml = YAML()
    spec = yaml.load(path)
    for head in spec["heads"]:
        if head["name"] in within:
            head["within"] = within[head["name"]]
    with path.open("w", encoding="utf-8") as fh:
        yaml.dump(spec, fh)


def _rounded(drawn: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in drawn.items()}


def _write_marks(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)


def read_marks(out: Path) -> list[dict[str, str]]:
    with (out / MARKS_FILE).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def counts(per_class: int, test_per_class: int) -> list[tuple[str, int]]:
    """(split, how many) of one class: the labelled training rows, then the test rows."""
    if not 0 < test_per_class < per_class:
        raise UserError(f"test images per class ({test_per_class}) must be between 1 and the images per "
                        f"class ({per_class}) - 1")
    return [("train", per_class - test_per_class), ("test", test_per_class)]
