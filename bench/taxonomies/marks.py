"""The marks a defect leaves, drawn as anti-aliased masks (0..1) on a SIZE×SIZE image, and how a
mask changes the surface under it.

Every shape is drawn at SUPERSAMPLE× and box-filtered down, so a 1 px line is a grey ramp as a
camera sees it, not a jagged binary stroke.  Geometry is in output pixels; the measures the
severity grades use (length, diameter, depth, count) are those of the shape as drawn.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 300
"""Side of every generated image: the ELPV cells' own resolution."""
SUPERSAMPLE = 4
MARGIN = 8.0
"""Free pixels between a mark and the image border (chips, which start at a border, excepted)."""

VISIBILITY = (2.0, 4.0)
"""A labelled mark's darkening is this many times (drawn) the texture's spread around it, at least."""
MAX_CONTRAST = 0.85

Points = np.ndarray
"""``K×2`` float (x, y) vertices."""


class Canvas:
    """A supersampled 8-bit drawing surface that ends as a float mask."""

    def __init__(self) -> None:
        self.image = Image.new("L", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), 0)
        self.draw = ImageDraw.Draw(self.image)

    def line(self, points: Points, width: float, level: int = 255) -> None:
        xy = [(float(x) * SUPERSAMPLE, float(y) * SUPERSAMPLE) for x, y in points]
        self.draw.line(xy, fill=level, width=max(1, round(width * SUPERSAMPLE)), joint="curve")

    def polygon(self, points: Points, level: int = 255) -> None:
        self.draw.polygon([(float(x) * SUPERSAMPLE, float(y) * SUPERSAMPLE) for x, y in points], fill=level)

    def dot(self, x: float, y: float, radius: float, level: int = 255) -> None:
        s = SUPERSAMPLE
        self.draw.ellipse([(x - radius) * s, (y - radius) * s, (x + radius) * s, (y + radius) * s], fill=level)

    def mask(self, blur: float = 0.0) -> np.ndarray:
        small = self.image.resize((SIZE, SIZE), Image.Resampling.BOX)
        if blur > 0:
            small = small.filter(ImageFilter.GaussianBlur(blur))
        return np.asarray(small, dtype=np.float32) / 255.0


def visible(surface: np.ndarray, mask: np.ndarray, contrast: float, rng: np.random.Generator) -> float:
    """``contrast``, raised where needed until the mark stands out from the surface's own texture
    around it, at the mark's scale, by VISIBILITY× (drawn): a defect no inspector can see on the
    image is never labelled, so a set that labelled it would only hold label noise."""
    peak = float(mask.max())
    if peak <= 0:
        return contrast
    core = mask >= 0.5 * peak
    ys, xs = np.nonzero(core)
    extent = max(int(np.ptp(ys)), int(np.ptp(xs)), 1)
    pad = max(8, extent // 2)
    box = (slice(max(0, ys.min() - pad), ys.max() + pad + 1), slice(max(0, xs.min() - pad), xs.max() + pad + 1))
    scale = float(np.clip(extent / 4, 2, 12))
    smooth = Image.fromarray(np.uint8(np.clip(surface, 0, 255))).filter(ImageFilter.GaussianBlur(scale))
    texture = float((surface - np.asarray(smooth, dtype=np.float32))[box].std())
    signal = float((surface * mask)[core].mean())  # grey levels lost at the core per unit of contrast
    needed = rng.uniform(*VISIBILITY) * texture / max(signal, 1e-6)
    return float(min(max(contrast, needed), MAX_CONTRAST))


def darken(surface: np.ndarray, mask: np.ndarray, contrast: float) -> np.ndarray:
    """Electroluminescence loss: the surface keeps ``1 - contrast·mask`` of its light."""
    return surface * (1.0 - contrast * mask)


def brighten(surface: np.ndarray, mask: np.ndarray, contrast: float) -> np.ndarray:
    return surface * (1.0 + contrast * mask)


def fill(surface: np.ndarray, mask: np.ndarray, level: float) -> np.ndarray:
    """Material gone (a chip): the mask shows the dark surroundings at ``level`` instead."""
    return surface * (1.0 - mask) + level * mask


def polyline_length(points: Points) -> float:
    return float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum())


def place(shapes: list[Points], rng: np.random.Generator, margin: float = MARGIN) -> list[Points]:
    """Move shapes drawn around the origin, together, to a random spot where they fit."""
    allpts = np.concatenate(shapes)
    lo, hi = allpts.min(axis=0), allpts.max(axis=0)
    span = np.maximum(SIZE - 2 * margin - (hi - lo), 0.0)
    offset = margin - lo + rng.uniform(0, 1, 2) * span
    return [s + offset for s in shapes]


def smooth_curve(length: float, angle: float, bend: float, n: int = 48) -> Points:
    """A quadratic Bézier from the origin whose arc length is ``length``; ``bend`` is the control
    point's offset from the chord, as a share of the chord (0: straight)."""
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    t = np.linspace(0, 1, n)[:, None]
    end, control = direction, direction / 2 + normal * bend
    curve = 2 * (1 - t) * t * control + t**2 * end
    return curve * (length / polyline_length(curve))


def jagged_path(rng: np.random.Generator, length: float, angle: float, start: Points | None = None,
                step: tuple[float, float] = (4.0, 8.0), wander: float = 0.25) -> Points:
    """A crack-like random walk of exactly ``length``: short steps whose heading jitters around
    a slowly drifting direction."""
    pts = [np.zeros(2) if start is None else np.asarray(start, float)]
    heading, drift, left = angle, angle, length
    while left > 1e-6:
        d = min(rng.uniform(*step), left)
        drift += rng.normal(0, wander / 3)
        heading = drift + rng.normal(0, wander)
        pts.append(pts[-1] + d * np.array([math.cos(heading), math.sin(heading)]))
        left -= d
    return np.array(pts)


def crack_tree(rng: np.random.Generator, total: float, branches: int, angle: float | None = None,
               spread: tuple[float, float] = (0.5, 1.2)) -> list[Points]:
    """A trunk and ``branches`` side cracks; the polylines' lengths add up to ``total``."""
    angle = rng.uniform(0, 2 * math.pi) if angle is None else angle
    trunk_share = 1.0 if branches == 0 else rng.uniform(0.5, 0.75)
    trunk = jagged_path(rng, total * trunk_share, angle)
    paths = [trunk]
    if branches:
        shares = rng.dirichlet(np.full(branches, 2.0)) * total * (1 - trunk_share)
        for share in shares:
            at = trunk[rng.integers(1, max(2, len(trunk) - 1))]
            side = rng.choice([-1.0, 1.0])
            paths.append(jagged_path(rng, float(share), angle + side * rng.uniform(*spread), start=at))
    return paths


def blob_outline(rng: np.random.Generator, diameter: float, aspect: float, angle: float,
                 wobble: float = 0.12, n: int = 64) -> Points:
    """A closed irregular ellipse around the origin whose longest axis is about ``diameter``."""
    theta = np.linspace(0, 2 * math.pi, n, endpoint=False)
    r = np.ones(n)
    for k in (2, 3, 4, 5):
        r += rng.uniform(0, wobble / (k - 1)) * np.sin(k * theta + rng.uniform(0, 2 * math.pi))
    x, y = r * np.cos(theta) * diameter / 2, r * np.sin(theta) * diameter / 2 * aspect
    c, s = math.cos(angle), math.sin(angle)
    pts = np.stack([c * x - s * y, s * x + c * y], axis=1)
    extent = np.linalg.norm(pts[:, None] - pts[None], axis=2).max()
    return pts * (diameter / extent)


def mottle(rng: np.random.Generator, scale: float, amount: float) -> np.ndarray:
    """Smooth multiplicative texture ``1 - amount·noise`` (noise 0..1 with features ~``scale`` px)."""
    coarse = max(2, round(SIZE / max(scale, 1.0)))
    noise = Image.fromarray((rng.uniform(0, 255, (coarse, coarse))).astype(np.uint8))
    smooth = np.asarray(noise.resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return 1.0 - amount * smooth


def edge_chip(rng: np.random.Generator, depth: float, width: float, corner: bool) -> Points:
    """The outline of material broken off the top edge (``corner``: off the top-left corner),
    reaching ``depth`` px into the part, before it is turned to a random edge or corner."""
    if corner:
        a, b = depth * rng.uniform(1.0, 1.8), depth * rng.uniform(1.0, 1.8)
        # a jagged fracture line from (a, 0) on the top edge to (0, b) on the left edge, bulging inwards
        t = np.linspace(0, 1, 9)[1:-1]
        line = np.stack([a * (1 - t), b * t], axis=1)
        bulge = np.sin(np.pi * t)[:, None] * rng.uniform(0.1, 0.35) * np.array([a, b]) / math.sqrt(2)
        inner = line + bulge + rng.normal(0, depth * 0.06, line.shape)
        pts = np.concatenate([[[-4.0, -4.0], [a, -4.0], [a, 0.0]], inner, [[0.0, b], [-4.0, b]]])
        reach = float(np.max(pts[:, 0] + pts[:, 1])) / math.sqrt(2)  # from the corner, along its bisector
        return pts * (depth / reach)
    x = np.linspace(-width / 2, width / 2, 17) + rng.normal(0, width / 60, 17)
    peak = rng.uniform(-0.25, 0.25)  # where the break reaches deepest, off centre
    profile = np.clip(1 - np.abs(x / width * 2 - peak) / (1 + abs(peak)), 0, 1) ** rng.uniform(0.5, 1.2)
    y = depth * profile * (1 + rng.normal(0, 0.15, x.shape))
    y = y * (depth / y.max())
    inner = np.stack([x, y], axis=1)
    return np.concatenate([[[x[0], -4.0]], inner, [[x[-1], -4.0]]])


def to_edge(points: Points, rng: np.random.Generator, corner: bool) -> Points:
    """Turn a chip outline drawn at the top edge (or top-left corner) to a random edge (corner)
    and slide it along that edge."""
    pts = points.copy()
    if not corner:
        pts[:, 0] += rng.uniform(points[:, 0].max() + MARGIN, SIZE - MARGIN + points[:, 0].min())
    for _ in range(int(rng.integers(0, 4))):  # quarter turns about the image centre
        pts = np.stack([SIZE - pts[:, 1], pts[:, 0]], axis=1)
    return pts
