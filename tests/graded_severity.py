"""A synthetic taxonomy whose severity is graded within each defect type, for training tests.

A line's severity grows with its length (its brightness is random); a blob's with its contrast (its
size is random).  So what makes a part "major" differs by type: one rule for every type cannot
read it from a single cue.  A flawless part ("ok") has severity "none".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from appliance.dataset import HeadSpec, Sample, write_dataset

TYPES = ["ok", "line", "blob"]
SEVERITIES = ["none", "minor", "major"]
HEADS = [
    HeadSpec(name="defect_type", classes=TYPES),
    HeadSpec(name="severity", classes=SEVERITIES, ordinal=True, within="defect_type"),
]


def draw(kind: str, severity: str, rng: np.random.Generator, side: int = 64) -> Image.Image:
    """Noisy grey background with a line (long when major) or a blob (bright when major)."""
    im = Image.fromarray(rng.normal(80, 8, (side, side)).clip(0, 255).astype(np.uint8), mode="L")
    d = ImageDraw.Draw(im)
    cx, cy = (int(v) for v in rng.integers(side // 3, side - side // 3, size=2))
    major = severity == "major"
    if kind == "line":
        half = int(side * (0.36 if major else 0.12) * rng.uniform(0.85, 1.15))
        colour = int(rng.integers(140, 250))
        d.line([(cx - half, cy - half // 3), (cx + half, cy + half // 3)], fill=colour, width=2)
    elif kind == "blob":
        r = int(rng.integers(side // 12, side // 6))
        colour = int(rng.integers(215, 250)) if major else int(rng.integers(110, 135))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return im


def make_dataset(root: Path, per_cell: int, test_every: int = 4, seed: int = 0,
                 heads: list[HeadSpec] = HEADS) -> Path:
    """``per_cell`` images per (type, severity) cell (``ok`` is one cell: none); every
    ``test_every``-th image of a cell goes to the test split."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    cells = [("ok", "none")] + [(t, s) for t in TYPES[1:] for s in SEVERITIES[1:]]
    for kind, severity in cells:
        for i in range(per_cell):
            path = root / "img" / f"{kind}_{severity}_{i:03d}.png"
            draw(kind, severity, rng).save(path)
            samples.append(Sample(image=path, labels={"defect_type": kind, "severity": severity},
                                  split="test" if i % test_every == test_every - 1 else "train"))
    write_dataset(root, heads, samples, name="graded severity")
    return root
