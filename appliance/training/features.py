"""Views (flip/rotation/brightness augmentations) and the cached output of the frozen trunk.

The frozen part runs through onnxruntime (several times faster than torch on a small CPU) once
per image and view; training then only runs the top blocks on the cached maps.  Images are read
in chunks, so a dataset never has to fit in memory as pixels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from appliance.model_package import INPUT_NAME
from appliance.training.export import session
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
