"""Views (flip/rotation/brightness augmentations) and the cached output of the frozen trunk.

The frozen part runs through onnxruntime (several times faster than torch on a small CPU) once
per image and view; training then only runs the top blocks on the cached maps.  Images are read
in chunks, so a dataset never has to fit in memory as pixels.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from torch import nn

from appliance.model_package import INPUT_NAME
from appliance.training.export import export_onnx, session
from appliance.training.progress import Progress, progress_bar
from appliance.training.recipe import TrainRecipe

CHUNK = 32


class View(NamedTuple):
    """A rigid transform of the image (quarter turns, then mirrors), then a gain on its pixel values."""

    quarter_turns: int = 0
    flip_h: bool = False
    flip_v: bool = False
    gain: float = 1.0

    def apply(self, batch: np.ndarray) -> np.ndarray:
        """Transform a uint8 batch ``N×H×W[×C]``."""
        out = np.rot90(batch, k=self.quarter_turns, axes=(1, 2)) if self.quarter_turns else batch
        if self.flip_h:
            out = out[:, :, ::-1]
        if self.flip_v:
            out = out[:, ::-1]
        if self.gain != 1.0:
            return np.clip(out * np.float32(self.gain), 0, 255).round().astype(np.uint8)
        return np.ascontiguousarray(out)


def views(recipe: TrainRecipe) -> list[View]:
    """The identity first, then every combination the recipe enables (at most the 8 symmetries
    of a square), then all of those again at each brightness gain."""
    rigid = [
        (q, h, v)
        for q in ((0, 1) if recipe.rotate_90 else (0,))
        for h in ((False, True) if recipe.flip_horizontal else (False,))
        for v in ((False, True) if recipe.flip_vertical else (False,))
    ]
    return [View(*r) for r in rigid] + [View(*r, g) for g in recipe.brightness_gains for r in rigid]


def inference_views(recipe: TrainRecipe) -> list[View]:
    """The views the deployed graph judges and averages: the identity, plus the recipe's flips
    when ``inference_flips`` is on."""
    if not recipe.inference_flips:
        return [View()]
    return [v for v in views(recipe) if v.quarter_turns == 0 and v.gain == 1.0]


def extract(trunk_onnx: Path, paths: Sequence[Path], load: Callable[[Path], np.ndarray],
            view_list: Sequence[View], threads: int, progress: Progress, desc: str) -> np.ndarray:
    """Frozen-trunk features as float16 ``V×N×C×h×w`` (view, image, feature map)."""
    sess = session(trunk_onnx, threads)
    out: np.ndarray | None = None
    with progress_bar(len(paths) * len(view_list), desc, "img", progress) as bar:
        for start in range(0, len(paths), CHUNK):
            by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
            images = {}
            for i in range(start, min(start + CHUNK, len(paths))):
                images[i] = load(paths[i])
                by_shape[images[i].shape].append(i)
            for rows in by_shape.values():
                batch = np.stack([images[i] for i in rows])
                for v, view in enumerate(view_list):
                    (maps,) = sess.run(None, {INPUT_NAME: view.apply(batch)})
                    if out is None:
                        out = np.empty((len(view_list), len(paths), *maps.shape[1:]), np.float16)
                    out[v, rows] = maps
                    bar.update(len(rows))
    assert out is not None  # paths is never empty
    return out


Job = tuple[Sequence[Path], Sequence[View], str]
"""Images, the views to compute for each, and the progress label."""


def trunk_key(recipe: TrainRecipe, layout: str) -> Hashable:
    """What decides the frozen part's output for one image and view: two recipes with the same key
    share cached features.  A recipe field that changes the frozen part must join this key."""
    depth = tuple(sorted(set(recipe.pooled_blocks))) if recipe.method == "pooled_features" else recipe.frozen_blocks
    return layout, recipe.method, recipe.image_size, depth


class FeatureCache:
    """Frozen-trunk features kept per (trunk key, image list, view) between training runs: a recipe
    search tries several tops, balances and view sets on one extraction.  Without a cache object,
    :meth:`get` is a plain extraction."""

    def __init__(self) -> None:
        self._store: dict[tuple[Hashable, int, View], np.ndarray] = {}

    def keep_only(self, key: Hashable) -> None:
        """Forget every trunk's features but ``key``'s (memory: one trunk's maps can be large)."""
        self._store = {k: v for k, v in self._store.items() if k[0] == key}

    def missing(self, key: Hashable, paths: Sequence[Path], view_list: Sequence[View]) -> list[View]:
        """The views of ``paths`` not cached yet under ``key``."""
        ident = hash(tuple(paths))
        return [v for v in view_list if (key, ident, v) not in self._store]

    def get(self, frozen: nn.Module, key: Hashable, layout: str, size: int, load: Callable[[Path], np.ndarray],
            jobs: Sequence[Job], threads: int, progress: Progress) -> list[np.ndarray]:
        """``V×N×…`` features per job; the frozen part is exported and run only for what is missing."""
        todo = [(job, self.missing(key, job[0], job[1])) for job in jobs]
        if any(views_left for _, views_left in todo):
            with tempfile.TemporaryDirectory(prefix="trunk-") as tmp:
                trunk_onnx = Path(tmp) / "trunk.onnx"
                export_onnx(frozen, trunk_onnx, layout, size, ["features"])
                for (paths, _, desc), views_left in todo:
                    if views_left:
                        maps = extract(trunk_onnx, paths, load, views_left, threads, progress, desc)
                        ident = hash(tuple(paths))
                        for view, part in zip(views_left, maps, strict=True):
                            self._store[key, ident, view] = part
        out = []
        for paths, view_list, _ in jobs:
            ident = hash(tuple(paths))
            out.append(np.stack([self._store[key, ident, v] for v in view_list]))
        return out
