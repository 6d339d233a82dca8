"""Which rows a training run uses, their label matrix, their fingerprint, and image loading."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from appliance.dataset import Dataset, HeadSpec, Sample
from appliance.datasets.split import stratified_pick
from appliance.errors import UserError
from appliance.imageio import read_image

COLOUR_MODES = frozenset({"RGB", "RGBA", "P", "CMYK", "YCbCr", "LA"})
"""PIL modes that ``read_image`` decodes to H×W×3."""

Layout = Literal["NHW", "NHWC"]


@dataclass(slots=True)
class Rows:
    train: list[Sample]
    val: list[Sample]
    val_source: str
    held_out: int
    """Rows of the ``test`` split: counted, never read."""


def select_rows(dataset: Dataset, val_fraction: float, seed: int) -> Rows:
    """Train on ``train`` rows and rows without a split; validate on ``val`` rows if there are
    any, else on a stratified part of the training rows; never touch ``test``."""
    pool = [s for s in dataset.samples if s.split in (None, "train")]
    held_out = sum(1 for s in dataset.samples if s.split == "test")
    val = dataset.split("val")
    if val:
        return Rows(pool, val, "val split", held_out)
    keys = [tuple(s.labels.get(h.name, "") for h in dataset.heads) for s in pool]
    pick = stratified_pick(keys, val_fraction, seed)
    train = [s for s, p in zip(pool, pick, strict=True) if not p]
    val = [s for s, p in zip(pool, pick, strict=True) if p]
    return Rows(train, val, f"{val_fraction:.0%} of the training rows (stratified)", held_out)


def label_matrix(samples: list[Sample], heads: list[HeadSpec]) -> np.ndarray:
    """``N×heads`` class indices, -1 where the label is unknown."""
    index = [{c: i for i, c in enumerate(h.classes)} for h in heads]
    return np.array([[index[j].get(s.labels.get(h.name, ""), -1) for j, h in enumerate(heads)]
                     for s in samples], dtype=np.int64).reshape(len(samples), len(heads))


def check_trainable(dataset: Dataset, rows: Rows, y_train: np.ndarray, y_val: np.ndarray) -> None:
    """Raise :class:`UserError` unless every head has two classes to learn and a validation part,
    and every class a head is graded within has rows with that head's label."""
    where = dataset.root / "labels.csv"
    if not rows.train:
        raise UserError(f"{where}: no training rows (split 'train' or empty)")
    if not rows.val:
        raise UserError(f"{where}: nothing to validate on; add 'val' rows or at least two labelled "
                        "images per class")
    for j, head in enumerate(dataset.heads):
        present = np.unique(y_train[:, j][y_train[:, j] >= 0])
        if len(present) < 2:
            raise UserError(f"{where}: head '{head.name}' has fewer than two classes among the "
                            "training rows")
        if not (y_val[:, j] >= 0).any():
            raise UserError(f"{where}: head '{head.name}' has no labelled validation rows")
        if head.within is not None:  # every sub-head needs rows to learn from
            c = [h.name for h in dataset.heads].index(head.within)
            labelled = np.unique(y_train[:, c][(y_train[:, j] >= 0) & (y_train[:, c] >= 0)])
            bare = [cls for i, cls in enumerate(dataset.heads[c].classes) if i not in labelled]
            if bare:
                raise UserError(f"{where}: head '{head.name}' is graded within '{head.within}', but no "
                                f"training row of {head.within} {', '.join(repr(b) for b in bare)} has a "
                                f"'{head.name}' label; label them (e.g. with the lowest grade)")


def fingerprint(dataset: Dataset, samples: list[Sample]) -> str:
    """sha256 over the sorted (relative image path, labels in head order) rows."""
    rows = sorted(
        json.dumps([s.image.relative_to(dataset.root).as_posix(),
                    [s.labels.get(h.name, "") for h in dataset.heads]])
        for s in samples
    )
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def detect_layout(paths: list[Path]) -> Layout:
    """NHW when every image decodes to mono, else NHWC (reads only the file headers)."""
    for path in paths:
        try:
            with Image.open(path) as im:
                if im.mode in COLOUR_MODES:
                    return "NHWC"
        except OSError as exc:
            raise UserError(f"{path}: not a readable image ({exc})") from exc
    return "NHW"


def loader(layout: Layout) -> Callable[[Path], np.ndarray]:
    """A function reading an image in ``layout`` (mono images are replicated for NHWC)."""
    def load(path: Path) -> np.ndarray:
        image = read_image(path)
        if layout == "NHWC" and image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return image
    return load
