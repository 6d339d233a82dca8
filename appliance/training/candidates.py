"""The recipes ``appliance train`` tries when no ``--recipe`` is given, and how it scores them.

The list is derived from the user's data, never tuned to one dataset:

- **resolution** from the images' short side: 160 px (cheap, fast on the line), 224 px (the
  ImageNet trunk's own scale) when the images have that much detail, and the native side up to
  300 px when it is larger still, because thin and small defects vanish when an image is shrunk;
- **method**: the frozen network's maps pooled at shallow and deep blocks with a small MLP on top
  (cheap to train, keeps fine detail), and fine-tuning of the top blocks (more capacity) with as
  many trained blocks as the number of images per class supports;
- **then, on the best representation** (its cached features are reused): class balance when the
  classes are uneven, a linear top when there are few images per class, and quarter-turn views
  when the images are square (whether orientation carries meaning is left to the validation
  score).

Every candidate is scored on the validation rows (see ``SCORE``); the test split
is never read.  Free of torch.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

import numpy as np
from PIL import Image

from appliance.dataset import Dataset
from appliance.errors import UserError
from appliance.training.data import Rows
from appliance.training.recipe import NUM_BLOCKS, TrainRecipe

PROFILE_IMAGES = 64
"""Training images whose headers are read to learn the image size."""
SMALL_SIDE, TRUNK_SIDE, MAX_SIDE = 160, 224, 300
FEW_PER_CLASS = 50
"""Below this many training images per class, fewer weights are trained."""
MANY_IMAGES = 1000
"""From this many training images on, fine-tuning five blocks is worth a try."""
UNEVEN = 2.0
"""Largest/smallest class count from which another class balance is tried."""
MAX_BUDGET_S = 24 * 3600.0
POOLED = TrainRecipe(method="pooled_features", dropout=0.5, batch_size=128, epochs=40, min_steps=2000, patience=8)
"""An MLP on cached vectors: many cheap steps, strong dropout against the wide input."""
HOLD_SHARE = 0.15
SCORE = (f"mean over heads of the accuracy on the validation rows the line would decide when it holds the "
         f"least confident {HOLD_SHARE:.0%} for review (the exported, calibrated model, as the line runs it)")
"""Why this score: it is what a plant gets (a line holds its unsure parts), it rewards a model whose
confidence ranks its own mistakes, and it is steadier than macro-F1, which a handful of
validation rows of a rare class can swing (accuracy and macro-F1 are recorded beside it)."""


@dataclass(frozen=True, slots=True)
class DataProfile:
    """What the candidate list is derived from (training and validation rows only)."""

    train_images: int
    val_images: int
    side: int
    """Median short side of the training images, px."""
    square: bool
    classes: int
    """Most classes of any head."""
    uneven: float
    """Largest / smallest training-class count, worst head."""

    @property
    def per_class(self) -> float:
        return self.train_images / self.classes


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    recipe: TrainRecipe
    why: str


def profile(dataset: Dataset, rows: Rows) -> DataProfile:
    """Measure the training rows: sizes from the headers of up to ``PROFILE_IMAGES`` images."""
    step = max(1, len(rows.train) // PROFILE_IMAGES)
    sizes = []
    for sample in rows.train[::step][:PROFILE_IMAGES]:
        try:
            with Image.open(sample.image) as im:
                sizes.append(im.size)
        except OSError as exc:
            raise UserError(f"{sample.image}: not a readable image ({exc})") from exc
    side = int(statistics.median(min(w, h) for w, h in sizes))
    square = statistics.median(max(w, h) / min(w, h) for w, h in sizes) < 1.1
    uneven = 1.0
    for head in dataset.heads:
        counts = np.array([sum(1 for s in rows.train if s.labels.get(head.name) == c) for c in head.classes])
        present = counts[counts > 0]
        if len(present):
            uneven = max(uneven, float(present.max() / present.min()))
    return DataProfile(len(rows.train), len(rows.val), side, square, max(len(h.classes) for h in dataset.heads),
                       uneven)


def sides(p: DataProfile) -> list[int]:
    """Candidate resolutions: never above the native side (upsampling adds no detail), at most
    ``MAX_SIDE`` (the latency and training time grow with its square)."""
    native = max(64, min(p.side, MAX_SIDE) // 4 * 4)
    out = {min(SMALL_SIDE, native)}
    if native >= TRUNK_SIDE:
        out.add(TRUNK_SIDE)
    if native >= TRUNK_SIDE + 32:
        out.add(native)
    return sorted(out)


def plan(p: DataProfile) -> list[Candidate]:
    """Stage one, the representation: resolution × method (on equal scores, the earlier wins)."""
    blocks = 2 if p.per_class < FEW_PER_CLASS else 3
    hidden = 1024 if p.classes > 32 else 512
    out: list[Candidate] = []
    for side in sides(p):
        taps = [4, 5, 10, 13] if side > TRUNK_SIDE else [5, 10, 13]  # + a stride-8 map at native size
        out.append(Candidate(f"pooled-{side}", POOLED.model_copy(update={
                                 "image_size": side, "pooled_blocks": taps, "hidden_units": hidden}),
                             f"frozen network at {side} px, maps of blocks {taps} + head pooled, MLP"))
        out.append(Candidate(f"finetune{blocks}-{side}",
                             TrainRecipe(image_size=side, frozen_blocks=NUM_BLOCKS - blocks),
                             f"top {blocks} blocks fine-tuned at {side} px"))
        if p.train_images >= MANY_IMAGES:
            out.append(Candidate(f"finetune5-{side}", TrainRecipe(image_size=side, frozen_blocks=11),
                                 f"top 5 blocks fine-tuned at {side} px ({p.train_images} training images)"))
    return out


def refinements(best: Candidate, p: DataProfile) -> list[Candidate]:
    """Stage two, on the best representation's cached features: the top and the views."""
    r = best.recipe
    out: list[Candidate] = []
    if p.uneven >= UNEVEN:
        for balance in (0.7, 0.0):
            if balance != r.class_balance:
                out.append(Candidate(f"{best.name} balance {balance}", r.model_copy(update={"class_balance": balance}),
                                     f"classes uneven ({p.uneven:.1f}×): loss weight (1/frequency)^{balance}"))
    if r.method == "pooled_features" and r.hidden_units and p.per_class < FEW_PER_CLASS:
        out.append(Candidate(f"{best.name} linear", r.model_copy(update={"hidden_units": 0}),
                             f"{p.per_class:.0f} images per class: a linear top"))
    if p.square and not r.rotate_90:
        out.append(Candidate(f"{best.name} rot90", r.model_copy(update={"rotate_90": True}),
                             "square images: quarter-turn views added to the training views"))
    return out


def decided_accuracy(confidence: np.ndarray, correct: np.ndarray, share: float = HOLD_SHARE) -> float:
    """Accuracy of the parts left when the least confident ``share`` is held (ties: first kept)."""
    order = np.argsort(-confidence, kind="stable")
    decided = order[:len(order) - round(share * len(order))]
    return float(correct[decided].mean()) if len(decided) else 0.0


def parse_budget(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``1.5h``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise UserError(f"--budget {text!r}: expected a duration such as 90s, 10m or 1h")
    seconds = float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]
    if not (0 < seconds <= MAX_BUDGET_S) or not math.isfinite(seconds):
        raise UserError(f"--budget {text!r}: must be more than 0 and at most {MAX_BUDGET_S / 3600:.0f}h")
    return seconds
