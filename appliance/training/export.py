"""ONNX export (legacy TorchScript exporter, opset 17) and the onnxruntime-vs-torch check."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from appliance.model_package import INPUT_NAME

OPSET = 17
TOLERANCE = 2e-3
"""Largest allowed |onnxruntime - torch| on an output (probabilities or features)."""


def example_input(layout: str, size: int, batch: int = 2) -> torch.Tensor:
    """A uint8 example whose size differs from the recipe size, so nothing is specialised to it."""
    shape = (batch, size + 13, size + 7) if layout == "NHW" else (batch, size + 13, size + 7, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def export_onnx(module: nn.Module, path: Path, layout: str, size: int, output_names: list[str]) -> None:
    """Export with dynamic batch, height and width on the uint8 input."""
    module.eval()
    spatial = {0: "batch", 1: "height", 2: "width"}
    dynamic = {INPUT_NAME: spatial, **{name: {0: "batch"} for name in output_names}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer chatter
        torch.onnx.export(
            module, (example_input(layout, size),), str(path), input_names=[INPUT_NAME],
            output_names=output_names, dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
        )


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(module: nn.Module, path: Path, inputs: list[np.ndarray], threads: int) -> float:
    """Run each input batch through torch and onnxruntime; raise if any output differs by more
    than ``TOLERANCE``.  Returns the largest difference seen."""
    sess = session(path, threads)
    names = [o.name for o in sess.get_outputs()]
    worst = 0.0
    module.eval()
    for batch in inputs:
        with torch.no_grad():
            expected = module(torch.from_numpy(batch))
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = sess.run(names, {INPUT_NAME: batch})
        for name, e, g in zip(names, expected, got, strict=True):
            diff = float(np.max(np.abs(e.numpy() - g)))
            worst = max(worst, diff)
            if not diff <= TOLERANCE:
                raise RuntimeError(
                    f"{path}: onnxruntime output '{name}' differs from torch by {diff:.2e} "
                    f"on input {batch.shape}"
                )
    return worst
