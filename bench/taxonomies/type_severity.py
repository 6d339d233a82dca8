"""Generated set: defect type × severity graded *within* each type, on real ELPV cells.

What it models: a line whose parts (ELPV's functional solar cells, cropped, mirrored and turned)
are ok or carry one of five defects, as an electroluminescence camera sees them (a defect darkens
the cell):

- ``scratch``: a thin, smooth, straight or slightly curved dark line (graded by length);
- ``crack``: a thin, jagged dark polyline with 0-3 branches (graded by total length);
- ``stain``: a soft, mottled, low-contrast dark blob (graded by diameter);
- ``pinholes``: a cluster of small dark dots (graded by how many);
- ``chip``: material broken off an edge, dark as the cell's surroundings, with a darkened rim
  (graded by how deep it reaches into the cell).

Scratch and crack are both thin lines and differ only in smoothness and branching; pinholes and
stains sit on the grain of polycrystalline cells.  Each family's severity (minor/major/critical;
ok parts have ``none``) is decided by its own measure and its own thresholds (``FAMILIES``): a
45 px scratch is major, a 45 px crack minor, a 45 px stain major; no single size rule fits every
type.  Within a grade, the measure is drawn uniformly from the grade's band less BAND_MARGIN of
the band at each end: a labeller grades a clear case the same way each time, so the model has
to measure size to about that precision, not guess at a coin-flip boundary.  Position,
orientation, line width, contrast, blur, noise, gain and the cell vary freely and independently
of the grade; a mark's contrast is only raised where the cell's own texture would hide it
(:func:`bench.taxonomies.marks.visible`: a labelled defect is one an inspector can see).

    python -m bench.taxonomies.type_severity OUT [--seed 0] [--per-type 150] [--test-per-type 60] [--within]

``--within`` declares ``within: defect_type`` on the severity head of dataset.yaml (severity
graded per defect type); a training without support for that field refuses the file.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.dataset import HeadSpec
from bench.taxonomies.folder import Planned, complete, counts, generate
from bench.taxonomies.marks import (
    Canvas,
    blob_outline,
    crack_tree,
    darken,
    edge_chip,
    fill,
    mottle,
    place,
    smooth_curve,
    to_edge,
    visible,
)

VERSION = 2
"""Bump when the drawing changes, so cached sets are drawn again."""
TYPE_HEAD, SEVERITY_HEAD = "defect_type", "severity"
OK, NONE = "ok", "none"
GRADES = ("minor", "major", "critical")
BAND_MARGIN = 0.1


def scratch(surface: np.ndarray, rng: np.random.Generator, length: float) -> tuple[np.ndarray, dict[str, Any]]:
    width, contrast, bend = rng.uniform(0.8, 2.0), rng.uniform(0.25, 0.55), rng.uniform(-0.12, 0.12)
    (curve,) = place([smooth_curve(length, rng.uniform(0, np.pi), bend)], rng)
    canvas = Canvas()
    canvas.line(curve, width)
    mask = canvas.mask()
    contrast = visible(surface, mask, contrast, rng)
    return darken(surface, mask, contrast), {"width_px": width, "contrast": contrast}


def crack(surface: np.ndarray, rng: np.random.Generator, length: float) -> tuple[np.ndarray, dict[str, Any]]:
    width, contrast, branches = rng.uniform(0.8, 1.8), rng.uniform(0.3, 0.6), int(rng.integers(0, 4))
    canvas = Canvas()
    for k, path in enumerate(place(crack_tree(rng, length, branches), rng)):
        canvas.line(path, width if k == 0 else width * 0.8)
    mask = canvas.mask()
    contrast = visible(surface, mask, contrast, rng)
    return darken(surface, mask, contrast), {"width_px": width, "contrast": contrast, "branches": branches}


def stain(surface: np.ndarray, rng: np.random.Generator, diameter: float) -> tuple[np.ndarray, dict[str, Any]]:
    contrast = rng.uniform(0.18, 0.4)
    outline = blob_outline(rng, diameter, rng.uniform(0.55, 1.0), rng.uniform(0, np.pi), wobble=0.25)
    canvas = Canvas()
    canvas.polygon(place([outline], rng)[0])
    mask = canvas.mask(blur=diameter * rng.uniform(0.08, 0.16)) * mottle(rng, diameter / 4, 0.45)
    contrast = visible(surface, mask, contrast, rng)
    return darken(surface, mask, contrast), {"contrast": contrast}


def pinholes(surface: np.ndarray, rng: np.random.Generator, count: float) -> tuple[np.ndarray, dict[str, Any]]:
    spread, contrast = rng.uniform(8, 28), rng.uniform(0.4, 0.7)
    (dots,) = place([rng.normal(0, spread / 2, (int(count), 2))], rng)
    canvas = Canvas()
    for x, y in dots:
        canvas.dot(x, y, rng.uniform(0.8, 1.8), level=int(255 * rng.uniform(0.6, 1.0)))
    mask = canvas.mask()
    contrast = visible(surface, mask, contrast, rng)
    return darken(surface, mask, contrast), {"spread_px": spread, "contrast": contrast}


def chip(surface: np.ndarray, rng: np.random.Generator, depth: float) -> tuple[np.ndarray, dict[str, Any]]:
    corner = False  # an edge, where the break is on the cell itself (a corner's chamfer hides small ones)
    outline = to_edge(edge_chip(rng, depth, depth * rng.uniform(1.5, 3.0), corner), rng, corner)
    canvas = Canvas()
    canvas.polygon(outline)
    level = float(np.median(surface)) * rng.uniform(0.15, 0.45)
    halo = canvas.mask(blur=depth * rng.uniform(0.15, 0.3))  # the cracked rim around the break
    damaged = darken(surface, np.clip(halo * 2, 0, 1), rng.uniform(0.15, 0.35))
    return fill(damaged, canvas.mask(blur=rng.uniform(0.3, 0.7)), level), {"corner": corner, "level": level}


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    measure: str
    """What the grade is decided on (a column of marks.csv)."""
    bands: tuple[tuple[float, float], ...]
    """Per grade (minor, major, critical): [low, high) of the measure; inclusive whole numbers
    where ``whole``."""
    draw: Callable[[np.ndarray, np.random.Generator, float], tuple[np.ndarray, dict[str, Any]]]
    whole: bool = False

    def measure_for(self, grade: int, rng: np.random.Generator) -> float:
        low, high = self.bands[grade]
        if self.whole:
            return float(rng.integers(int(low), int(high) + 1))
        return float(rng.uniform(low + BAND_MARGIN * (high - low), high - BAND_MARGIN * (high - low)))


FAMILIES = (
    Family("scratch", "length_px", ((15, 35), (35, 65), (65, 130)), scratch),
    Family("crack", "length_px", ((25, 60), (60, 120), (120, 220)), crack),
    Family("stain", "diameter_px", ((16, 36), (36, 64), (64, 110)), stain),
    Family("pinholes", "count", ((2, 3), (5, 8), (11, 18)), pinholes, whole=True),
    Family("chip", "depth_px", ((5, 12), (12, 24), (24, 42)), chip),
)
HEADS = [
    HeadSpec(name=TYPE_HEAD, classes=[OK, *(f.name for f in FAMILIES)]),
    HeadSpec(name=SEVERITY_HEAD, classes=[NONE, *GRADES], ordinal=True),
]


def _ok(surface: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    return surface, {}


def _defect(family: Family, grade: int) -> Callable[[np.ndarray, np.random.Generator],
                                                   tuple[np.ndarray, dict[str, Any]]]:
    def draw(surface: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        value = family.measure_for(grade, rng)
        image, drawn = family.draw(surface, rng, value)
        return image, {family.measure: value, **drawn}
    return draw


def plan(per_type: int, test_per_type: int) -> list[Planned]:
    """Every type gets ``per_type`` images (``test_per_type`` of them test), a defect type's
    spread evenly over its grades."""
    out = [Planned({TYPE_HEAD: OK, SEVERITY_HEAD: NONE}, split, _ok)
           for split, n in counts(per_type, test_per_type) for _ in range(n)]
    for family in FAMILIES:
        for g, grade in enumerate(GRADES):
            share = per_type // 3 + (g < per_type % 3)
            test = test_per_type // 3 + (g < test_per_type % 3)
            out += [Planned({TYPE_HEAD: family.name, SEVERITY_HEAD: grade}, split, _defect(family, g))
                    for split, n in counts(share, test) for _ in range(n)]
    return out


def build(out: Path, seed: int = 0, per_type: int = 150, test_per_type: int = 60, within: bool = False) -> Path:
    """The set in ``out``, drawn unless ``out`` already holds it."""
    params = {"generator": "type_severity", "version": VERSION, "seed": seed, "per_type": per_type,
              "test_per_type": test_per_type, "within": within}
    if complete(out, params):
        return out
    return generate(out, HEADS, plan(per_type, test_per_type), params, "type x severity within type (generated)",
                    within={SEVERITY_HEAD: TYPE_HEAD} if within else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder to write (new, or a set drawn before)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-type", type=int, default=150, help="images per defect type (ok included)")
    ap.add_argument("--test-per-type", type=int, default=60, help="of which in the test split")
    ap.add_argument("--within", action="store_true", help="declare severity as graded within defect_type")
    args = ap.parse_args()
    print(f"wrote {build(args.out, args.seed, args.per_type, args.test_per_type, args.within)}")


if __name__ == "__main__":
    main()
