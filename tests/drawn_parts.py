"""Tiny drawn parts for training tests: a noisy grey background with a scratch (line) or a spot (disc)."""

import numpy as np
from PIL import Image, ImageDraw

SIDE = 72


def draw_part(kind: str, major: bool, rng: np.random.Generator) -> Image.Image:
    """A ``kind`` mark ('scratch', 'spot'; anything else: none), big and bright when ``major``."""
    base = rng.normal(90, 12, (SIDE, SIDE)).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(base, mode="L")
    draw = ImageDraw.Draw(im)
    colour = 250 if major else 150
    cx, cy = (int(v) for v in rng.integers(22, SIDE - 22, size=2))
    if kind == "scratch":
        half = 24 if major else 10
        draw.line([(cx - half, cy - half // 3), (cx + half, cy + half // 3)], fill=colour, width=3)
    elif kind == "spot":
        r = 12 if major else 5
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return im
