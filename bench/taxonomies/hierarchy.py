"""Generated set: a hierarchical taxonomy, family → subtype (37 leaves), on real ELPV cells.

What it models: a plant that sorts defects into seven families (ok, scratch, crack, stain,
pinholes, chip, inactive area) and each defect family into six subtypes, told apart by shape
(arc vs straight, ring vs disc, V-notch vs round notch), orientation (horizontal / vertical /
diagonal scratch), count (few / many pinholes), size band (small / large stain or corner chip),
arrangement (pinholes in a line, in a tight cluster, scattered) and texture (dark vs bright
stain, soft gradient vs sharp block).  Heads: ``family`` and ``subtype`` (``parent: family``,
``parent_of`` naming each subtype's family), as dataset.yaml declares them for the appliance.
Surfaces, camera effects and the test cells kept apart from training cells: as in
:mod:`bench.taxonomies.type_severity`.

    python -m bench.taxonomies.hierarchy OUT [--seed 0] [--per-leaf 60] [--test-per-leaf 24]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from appliance.dataset import HeadSpec
from bench.taxonomies.folder import Planned, complete, counts, generate
from bench.taxonomies.marks import (
    SIZE,
    Canvas,
    Points,
    blob_outline,
    brighten,
    crack_tree,
    darken,
    edge_chip,
    fill,
    jagged_path,
    mottle,
    place,
    smooth_curve,
    to_edge,
    visible,
)

VERSION = 2
"""Bump when the drawing changes, so cached sets are drawn again."""
FAMILY_HEAD, SUBTYPE_HEAD = "family", "subtype"
Drawn = tuple[np.ndarray, dict[str, Any]]
Rng = np.random.Generator


def _lines(surface: np.ndarray, rng: Rng, paths: list[Points], width: float | None = None) -> Drawn:
    width = rng.uniform(0.9, 2.0) if width is None else width
    contrast = rng.uniform(0.3, 0.55)
    canvas = Canvas()
    for path in paths:
        canvas.line(path, width)
    mask = canvas.mask()
    contrast = visible(surface, mask, contrast, rng)
    return darken(surface, mask, contrast), {"width_px": width, "contrast": contrast}


def _area(surface: np.ndarray, rng: Rng, polygons: list[Points], contrast: float, blur: float) -> Drawn:
    """Dark regions, unevenly dark as a disconnected or shunted area is."""
    canvas = Canvas()
    for polygon in polygons:
        canvas.polygon(polygon)
    mask = canvas.mask(blur=blur) * mottle(rng, rng.uniform(15, 40), 0.35)
    contrast = visible(surface, mask, contrast, rng)
    return darken(surface, mask, contrast), {"contrast": contrast}


def scratch(angle: Callable[[Rng], float], bend: tuple[float, float] = (-0.05, 0.05), double: bool = False,
            dashed: bool = False) -> Callable[[np.ndarray, Rng], Drawn]:
    def draw(surface: np.ndarray, rng: Rng) -> Drawn:
        a, length = angle(rng), rng.uniform(40, 120)
        curve = smooth_curve(length, a, rng.uniform(*bend) * rng.choice([-1, 1]))
        paths = [curve]
        if double:
            gap = rng.uniform(4, 8)
            paths.append(curve + gap * np.array([-math.sin(a), math.cos(a)]))
        if dashed:
            cut = np.arange(len(curve)) // rng.integers(4, 8) % 2 == 0
            paths = [curve[i:i + 2] for i in range(len(curve) - 1) if cut[i]]
        return _lines(surface, rng, place(paths, rng))
    return draw


def crack(branches: tuple[int, int], length: tuple[float, float],
          spread: tuple[float, float] = (0.5, 1.2)) -> Callable[[np.ndarray, Rng], Drawn]:
    def draw(surface: np.ndarray, rng: Rng) -> Drawn:
        n = int(rng.integers(branches[0], branches[1] + 1))
        return _lines(surface, rng, place(crack_tree(rng, rng.uniform(*length), n, spread=spread), rng))
    return draw


def crack_star(surface: np.ndarray, rng: Rng) -> Drawn:
    rays, turn = int(rng.integers(3, 7)), rng.uniform(0, 2 * math.pi)
    paths = [jagged_path(rng, rng.uniform(15, 40), turn + 2 * math.pi * k / rays + rng.normal(0, 0.2))
             for k in range(rays)]
    return _lines(surface, rng, place(paths, rng))


def crack_isolating(surface: np.ndarray, rng: Rng) -> Drawn:
    """A crack across the cell that cuts off the part beyond it (dark: no current reaches it)."""
    path = jagged_path(rng, SIZE * 1.4, rng.normal(0, 0.3), start=np.array([-5.0, rng.uniform(60, 240)]))
    cut = np.concatenate([path, [[SIZE + 10, SIZE + 10], [-10, SIZE + 10]]])
    image, drawn = _area(surface, rng, [cut], rng.uniform(0.25, 0.55), rng.uniform(0.5, 1.5))
    image, line = _lines(image, rng, [path])
    return np.rot90(image, int(rng.integers(4))), {**drawn, "line_contrast": line["contrast"]}


def crack_edge(surface: np.ndarray, rng: Rng) -> Drawn:
    start = np.array([rng.uniform(40, SIZE - 40), 0.0])
    paths = crack_tree(rng, rng.uniform(40, 100), int(rng.integers(0, 2)), angle=math.pi / 2 + rng.normal(0, 0.3))
    paths = [p + start for p in paths]
    image, drawn = _lines(surface, rng, paths)
    return np.rot90(image, int(rng.integers(4))), drawn


def stain(diameter: tuple[float, float], aspect: tuple[float, float] = (0.55, 1.0), ring: bool = False,
          bright: bool = False, several: tuple[int, int] = (1, 1)) -> Callable[[np.ndarray, Rng], Drawn]:
    def draw(surface: np.ndarray, rng: Rng) -> Drawn:
        n = int(rng.integers(several[0], several[1] + 1))
        blobs = [blob_outline(rng, rng.uniform(*diameter), rng.uniform(*aspect), rng.uniform(0, math.pi), 0.25)
                 for _ in range(n)]
        if n > 1:
            blobs = [b + rng.uniform(-45, 45, 2) for b in blobs]
        blobs = place(blobs, rng)
        canvas = Canvas()
        for b in blobs:
            canvas.polygon(b)
            if ring:
                centre = b.mean(axis=0)
                canvas.polygon(centre + (b - centre) * rng.uniform(0.45, 0.65), level=0)
        d = float(np.ptp(blobs[0], axis=0).max())
        mask = canvas.mask(blur=d * rng.uniform(0.04, 0.1)) * mottle(rng, d / 4, 0.45)
        contrast = visible(surface, mask, rng.uniform(0.18, 0.4), rng)
        return (brighten if bright else darken)(surface, mask, contrast), {"contrast": contrast, "blobs": n}
    return draw


def pinholes(count: tuple[int, int], spread: tuple[float, float] = (8, 25), radius: tuple[float, float] = (0.8, 1.8),
             line: bool = False, scattered: bool = False) -> Callable[[np.ndarray, Rng], Drawn]:
    def draw(surface: np.ndarray, rng: Rng) -> Drawn:
        n = int(rng.integers(count[0], count[1] + 1))
        if scattered:
            dots = rng.uniform(10, SIZE - 10, (n, 2))
        elif line:
            a = rng.uniform(0, math.pi)
            dots = np.linspace(0, rng.uniform(30, 80), n)[:, None] * [math.cos(a), math.sin(a)]
            dots = place([dots + rng.normal(0, 0.8, dots.shape)], rng)[0]
        else:
            dots = place([rng.normal(0, rng.uniform(*spread) / 2, (n, 2))], rng)[0]
        canvas = Canvas()
        for x, y in dots:
            canvas.dot(x, y, rng.uniform(*radius), level=int(255 * rng.uniform(0.6, 1.0)))
        mask = canvas.mask()
        contrast = visible(surface, mask, rng.uniform(0.4, 0.7), rng)
        return darken(surface, mask, contrast), {"contrast": contrast, "count": n}
    return draw


def chip(depth: tuple[float, float], width: tuple[float, float] | None = None, corner: bool = False,
         chips: int = 1) -> Callable[[np.ndarray, Rng], Drawn]:
    """``width``: the break's extent along the edge as a multiple of its depth (edge chips)."""
    def draw(surface: np.ndarray, rng: Rng) -> Drawn:
        canvas = Canvas()
        reach = 0.0
        for _ in range(chips):
            d = rng.uniform(*depth)
            w = d * rng.uniform(*width) if width else 0.0
            canvas.polygon(to_edge(edge_chip(rng, d, w, corner), rng, corner))
            reach = max(reach, d)
        halo = canvas.mask(blur=reach * rng.uniform(0.15, 0.3))
        damaged = darken(surface, np.clip(halo * 2, 0, 1), rng.uniform(0.15, 0.35))
        level = float(np.median(surface)) * rng.uniform(0.15, 0.45)
        return fill(damaged, canvas.mask(blur=rng.uniform(0.3, 0.7)), level), {"depth_px": reach}
    return draw


def _rect(w: float, h: float) -> Points:
    return np.array([[0, 0], [w, 0], [w, h], [0, h]], float)


def inactive(kind: str) -> Callable[[np.ndarray, Rng], Drawn]:
    def draw(surface: np.ndarray, rng: Rng) -> Drawn:
        contrast = rng.uniform(0.3, 0.6)
        if kind == "band":
            y, h = rng.uniform(0, SIZE - 40), rng.uniform(15, 40)
            image, drawn = _area(surface, rng, [np.array([[-5, y], [SIZE + 5, y], [SIZE + 5, y + h], [-5, y + h]])],
                                 contrast, rng.uniform(0.5, 1.5))
        elif kind == "block":
            image, drawn = _area(surface, rng, place([_rect(rng.uniform(30, 90), rng.uniform(30, 90))], rng),
                                 contrast, rng.uniform(0.5, 1.5))
        elif kind == "triangle":
            a, b = rng.uniform(60, 180, 2)
            corner = np.array([[-5, -5], [a, -5], [-5, b]])
            image, drawn = _area(surface, rng, [corner], contrast, rng.uniform(0.5, 1.5))
        elif kind == "half":
            x = rng.uniform(0.35, 0.6) * SIZE
            image, drawn = _area(surface, rng, [np.array([[-5, -5], [x, -5], [x, SIZE + 5], [-5, SIZE + 5]])],
                                 rng.uniform(0.2, 0.4), rng.uniform(6, 14))
        elif kind == "gradient":
            ramp = np.linspace(0, 1, SIZE, dtype=np.float32) ** rng.uniform(1, 2.5)
            contrast = rng.uniform(0.3, 0.5)
            image, drawn = darken(surface, np.broadcast_to(ramp, (SIZE, SIZE)), contrast), {"contrast": contrast}
        else:  # fingers: a row of short parallel interruptions
            n, length, pitch = int(rng.integers(4, 11)), rng.uniform(8, 20), rng.uniform(6, 12)
            bars = [np.array([[k * pitch, 0.0], [k * pitch, length]]) for k in range(n)]
            image, drawn = _lines(surface, rng, place(bars, rng), width=rng.uniform(1.5, 3.0))
        return np.rot90(image, int(rng.integers(4))), drawn
    return draw


def _near(centre: float) -> Callable[[Rng], float]:
    return lambda rng: centre + rng.normal(0, 0.06) + rng.choice([0.0, math.pi])


def _any_angle(rng: Rng) -> float:
    return float(rng.uniform(0, 2 * math.pi))


LEAVES: dict[str, dict[str, Callable[[np.ndarray, Rng], Drawn]]] = {
    "ok": {"ok": lambda surface, rng: (surface, {})},
    "scratch": {"horizontal": scratch(_near(0.0)), "vertical": scratch(_near(math.pi / 2)),
                "diagonal": scratch(lambda rng: rng.choice([1, 3]) * math.pi / 4 + rng.normal(0, 0.08)),
                "arc": scratch(_any_angle, bend=(0.25, 0.45)), "double": scratch(_any_angle, double=True),
                "dashed": scratch(_any_angle, dashed=True)},
    "crack": {"single": crack((0, 0), (60, 160)), "branched": crack((1, 2), (60, 160)),
              "dendritic": crack((5, 8), (120, 220), spread=(0.3, 0.9)), "star": crack_star,
              "isolating": crack_isolating, "from_edge": crack_edge},
    "stain": {"small": stain((15, 30)), "large": stain((70, 120)), "streak": stain((60, 140), aspect=(0.15, 0.3)),
              "ring": stain((30, 70), ring=True), "bright": stain((30, 80), bright=True),
              "several": stain((10, 22), several=(3, 6))},
    "pinholes": {"few": pinholes((2, 4)), "many": pinholes((15, 30), spread=(15, 35)),
                 "line": pinholes((5, 10), line=True), "scattered": pinholes((8, 15), scattered=True),
                 "large": pinholes((1, 3), radius=(3.0, 5.0)), "tight": pinholes((6, 12), spread=(2, 5))},
    "chip": {"corner_small": chip((14, 24), corner=True), "corner_large": chip((32, 50), corner=True),
             "notch": chip((10, 22), (1.5, 2.2)), "shallow": chip((4, 8), (8, 14)),
             "v_notch": chip((15, 35), (0.4, 0.7)), "double": chip((8, 20), (1.5, 2.5), chips=2)},
    "inactive": {kind: inactive(kind) for kind in ("band", "block", "triangle", "half", "gradient", "fingers")},
}


def leaf_name(family: str, subtype: str) -> str:
    return family if family == subtype else f"{family}_{subtype}"


HEADS = [
    HeadSpec(name=FAMILY_HEAD, classes=list(LEAVES)),
    HeadSpec(name=SUBTYPE_HEAD, classes=[leaf_name(f, s) for f, subs in LEAVES.items() for s in subs],
             parent=FAMILY_HEAD, parent_of={leaf_name(f, s): f for f, subs in LEAVES.items() for s in subs}),
]


def plan(per_leaf: int, test_per_leaf: int) -> list[Planned]:
    return [Planned({FAMILY_HEAD: family, SUBTYPE_HEAD: leaf_name(family, subtype)}, split, draw)
            for family, subtypes in LEAVES.items() for subtype, draw in subtypes.items()
            for split, n in counts(per_leaf, test_per_leaf) for _ in range(n)]


def build(out: Path, seed: int = 0, per_leaf: int = 60, test_per_leaf: int = 24) -> Path:
    """The set in ``out``, drawn unless ``out`` already holds it."""
    params = {"generator": "hierarchy", "version": VERSION, "seed": seed, "per_leaf": per_leaf,
              "test_per_leaf": test_per_leaf}
    if complete(out, params):
        return out
    return generate(out, HEADS, plan(per_leaf, test_per_leaf), params, "family -> subtype hierarchy (generated)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder to write (new, or a set drawn before)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-leaf", type=int, default=60, help="images per leaf class")
    ap.add_argument("--test-per-leaf", type=int, default=24, help="of which in the test split")
    args = ap.parse_args()
    print(f"wrote {build(args.out, args.seed, args.per_leaf, args.test_per_leaf)}")


if __name__ == "__main__":
    main()
