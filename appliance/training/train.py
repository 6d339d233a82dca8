"""``train_model``: dataset folder in, validated model package out.

Pipeline: choose rows → export the frozen trunk (with the in-graph preprocessing) to a temporary
ONNX file → cache its output per image and view with onnxruntime → train the top blocks (or an MLP
on pooled features) and the heads on the cache → fit one temperature per head on the validation
part → export the whole graph, check onnxruntime against torch, write the model card.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from appliance.dataset import Dataset, HeadSpec, load_dataset
from appliance.errors import UserError
from appliance.model_package import (
    ONNX_FILE,
    CardHead,
    ModelCard,
    ModelInput,
    new_version,
    output_name,
    sha256_file,
    write_card,
)
from appliance.training.backbone import ARCHITECTURE
from appliance.training.calibration import fit_mixture_temperature, fit_temperature, prior_shift
from appliance.training.data import (
    Rows,
    check_trainable,
    detect_layout,
    fingerprint,
    label_matrix,
    loader,
    select_rows,
)
from appliance.training.export import export_onnx, verify_onnx
from appliance.training.features import FeatureCache, inference_views, trunk_key, views
from appliance.training.fit import fit, logits_of
from appliance.training.metrics import (
    accuracy,
    confusion_matrix,
    expected_calibration_error,
    macro_f1,
    recall_by_class,
    softmax,
)
from appliance.training.network import ExportNet, TrainNet, build, build_pooled, hierarchy, pooled_top
from appliance.training.progress import Progress
from appliance.training.quantize import quantize_if_accurate
from appliance.training.recipe import TrainRecipe
from appliance.training.within import graded, mixture_np, output_widths

VERIFY_IMAGES = 4


def train_model(data: Path, out: Path, recipe: TrainRecipe | None = None, *,
                parent_version: str | None = None, progress: Progress = True,
                features: FeatureCache | None = None) -> ModelCard:
    """Train a model on the dataset folder ``data`` and write its package into ``out``
    (``out/model.onnx`` + ``out/model.json``; ``out`` must be new or empty).  ``features`` keeps
    the frozen trunk's output for the next run (the recipe search)."""
    recipe = recipe or TrainRecipe()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder; choose a new package folder")
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    dataset = load_dataset(data)
    rows = select_rows(dataset, recipe.val_fraction, recipe.seed)
    heads = dataset.heads
    y_train, y_val = label_matrix(rows.train, heads), label_matrix(rows.val, heads)
    check_trainable(dataset, rows, y_train, y_val)
    train_paths, val_paths = [s.image for s in rows.train], [s.image for s in rows.val]
    layout = detect_layout(train_paths + val_paths)
    load = loader(layout)

    torch.manual_seed(recipe.seed)
    classes = output_widths(heads)
    if recipe.method == "pooled_features":
        frozen = build_pooled(layout, recipe.image_size, recipe.pooled_blocks)
    else:
        frozen, net = build(layout, recipe.image_size, recipe.frozen_blocks, classes, recipe.dropout,
                            recipe.drop_connect)
    threads = torch.get_num_threads()
    view_list, judged = views(recipe), inference_views(recipe)
    train_x, val_x = (features or FeatureCache()).get(
        frozen, trunk_key(recipe, layout), layout, recipe.image_size, load,
        [(train_paths, view_list, "features (train)"), (val_paths, judged, "features (val)")], threads, progress)
    seconds["features"] = time.perf_counter() - started
    if recipe.method == "pooled_features":
        top, width = pooled_top(train_x, recipe.hidden_units, recipe.dropout)
        net = TrainNet(top, classes, recipe.dropout, width)

    mark = time.perf_counter()
    result = fit(net, heads, train_x, y_train, val_x, y_val, recipe, progress)
    seconds["train"] = time.perf_counter() - mark
    del train_x

    temperatures, metrics = _calibrate(dataset, rows, logits_of(net, val_x), y_val)
    shifts = [prior_shift(y_train[:, j], h.classes, recipe.class_balance, h.line_frequencies)
              for j, h in enumerate(heads)]

    mark = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model = ExportNet(frozen, net, temperatures, [s.tolist() for s in shifts], hierarchy(heads),
                      [(v.flip_h, v.flip_v) for v in judged], graded(heads)).eval()
    onnx_path = out / ONNX_FILE
    export_onnx(model, onnx_path, layout, recipe.image_size, [output_name(h.name) for h in heads])
    max_diff = verify_onnx(model, onnx_path, _verification_batches(val_paths, load), threads)
    seconds["export"] = time.perf_counter() - mark
    quantization = None
    if recipe.quantize:
        mark = time.perf_counter()
        rng = np.random.default_rng(recipe.seed)
        pick = rng.permutation(len(train_paths))[:recipe.quantization_images]
        quantization = quantize_if_accurate(
            onnx_path, [load(train_paths[i]) for i in pick], val_paths, load, y_val,
            [h.name for h in heads], recipe.max_quantization_drop, threads)
        seconds["quantize"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started

    card = ModelCard(
        version=new_version(salt=str(out.resolve())),
        parent_version=parent_version,
        architecture=ARCHITECTURE,
        input=ModelInput(layout=layout, channels=1 if layout == "NHW" else 3,
                         height=recipe.image_size, width=recipe.image_size),
        heads=[CardHead(**h.model_dump(), temperature=t) for h, t in zip(heads, temperatures, strict=True)],
        metrics=metrics,
        training={
            "recipe": recipe.model_dump(),
            "dataset": str(Path(data).resolve()),
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "counts": {"train": len(rows.train), "val": len(rows.val), "test_untouched": rows.held_out,
                       "views": len(view_list), "inference_views": len(judged),
                       "classes": _class_counts(heads, y_train),
                       **({"within": _cell_counts(heads, y_train)} if graded(heads) else {})},
            "validation": rows.val_source,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "steps": result.steps,
            "history": result.history,
            "onnx_max_abs_diff_vs_torch": max_diff,
            "prior_shift": {h.name: dict(zip(h.classes, np.round(shift, 4).tolist(), strict=True))
                            for h, shift in zip(heads, shifts, strict=True) if h.line_frequencies},
            "quantization": quantization,
            "threads": threads,
        },
        training_data_fingerprint=fingerprint(dataset, rows.train + rows.val),
        onnx_sha256=sha256_file(onnx_path),
    )
    write_card(out, card)  # written last: a folder with model.json is a complete package
    return card


def _calibrate(dataset: Dataset, rows: Rows, logits: list[np.ndarray],
               y_val: np.ndarray) -> tuple[list[float], dict]:
    """Per-head temperatures and the validation metrics before/after calibration.

    A graded head's temperature (shared by its sub-heads) is fitted on its mixture under the
    conditioning head's calibrated probabilities, so the heads it is graded within come first."""
    temperatures = [1.0] * len(dataset.heads)
    per_head: dict[str, dict] = {}
    conditioning = dict(graded(dataset.heads))
    order = sorted(range(len(dataset.heads)), key=lambda j: j in conditioning)
    for j in order:
        head = dataset.heads[j]
        known = y_val[:, j] >= 0
        z, y = logits[j][known], y_val[known, j]
        if j in conditioning:
            c = conditioning[j]
            cond = softmax(logits[c][known] / temperatures[c])
            t = fit_mixture_temperature(cond, z, y)
            before, after = mixture_np(softmax(logits[c][known]), z, 1.0), mixture_np(cond, z, t)
        else:
            t = fit_temperature(z, y)
            before, after = softmax(z), softmax(z / t)
        temperatures[j] = t
        m = confusion_matrix(y, after.argmax(axis=1), len(head.classes))
        per_head[head.name] = {
            "accuracy": round(accuracy(m), 4),
            "macro_f1": round(macro_f1(m), 4),
            "ece_uncalibrated": round(expected_calibration_error(before, y), 4),
            "ece": round(expected_calibration_error(after, y), 4),
            "n": int(known.sum()),
            "classes": list(head.classes),
            "recall": recall_by_class(m, head.classes, digits=4),
            "confusion": m.tolist(),
        }
    per_head = {h.name: per_head[h.name] for h in dataset.heads}  # in head order
    return temperatures, {"split": "val", "source": rows.val_source, "heads": per_head}


def _class_counts(heads: list[HeadSpec], y: np.ndarray) -> dict[str, dict[str, int]]:
    return {h.name: dict(zip(h.classes, np.bincount(y[:, j][y[:, j] >= 0], minlength=len(h.classes)).tolist(),
                             strict=True))
            for j, h in enumerate(heads)}


def _cell_counts(heads: list[HeadSpec], y: np.ndarray) -> dict[str, dict[str, dict[str, int]]]:
    """Per graded head: training rows per (conditioning class, class) cell, the rows each sub-head
    learns from."""
    out = {}
    for j, c in graded(heads):
        n = len(heads[j].classes)
        both = (y[:, j] >= 0) & (y[:, c] >= 0)
        counts = np.bincount(y[both, c] * n + y[both, j], minlength=len(heads[c].classes) * n).reshape(-1, n)
        out[heads[j].name] = {t: dict(zip(heads[j].classes, row.tolist(), strict=True))
                              for t, row in zip(heads[c].classes, counts, strict=True)}
    return out


def _verification_batches(paths: list[Path], load: Callable[[Path], np.ndarray]) -> list[np.ndarray]:
    """A batch of validation images of one size, and the first one cropped to an odd size (the
    graph must accept any height and width)."""
    first = load(paths[0])
    same = [first, *(im for im in map(load, paths[1:VERIFY_IMAGES * 4]) if im.shape == first.shape)]
    cropped = first[: max(8, first.shape[0] - 37), : max(8, first.shape[1] - 11)]
    return [np.stack(same[:VERIFY_IMAGES]), np.ascontiguousarray(cropped[None])]
