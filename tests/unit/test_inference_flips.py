"""Flip averaging in the deployed graph (recipe ``inference_flips``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError

from appliance.dataset import Sample, write_dataset
from appliance.model_package import read_card
from appliance.training.export import export_onnx
from appliance.training.features import View, inference_views
from appliance.training.network import ExportNet, build
from appliance.training.recipe import TrainRecipe
from appliance.training.train import train_model
from tests.drawn_parts import draw_part
from tests.unit.test_training import HEADS, TINY

ALL_FLIPS = [(False, False), (True, False), (False, True), (True, True)]


def _run(path: Path, image: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": image})


def test_the_graph_averages_the_logits_of_the_mirror_images(tmp_path: Path) -> None:
    torch.manual_seed(0)
    frozen, net = build("NHW", 64, 15, [3], 0.0, 0.0)
    model = ExportNet(frozen, net, [1.0], [[0.0, 0.0, 0.0]], flips=ALL_FLIPS).eval()
    export_onnx(model, tmp_path / "m.onnx", "NHW", 64, ["a_probs"])
    image = np.random.default_rng(1).integers(0, 256, (3, 70, 64), dtype=np.uint8)
    (got,) = _run(tmp_path / "m.onnx", image)
    with torch.no_grad():
        logits = [net(frozen(torch.from_numpy(np.ascontiguousarray(im))))[0].numpy()
                  for im in (image, image[:, :, ::-1], image[:, ::-1], image[:, ::-1, ::-1])]
    np.testing.assert_allclose(got, torch.softmax(torch.from_numpy(np.mean(logits, axis=0)), 1).numpy(), atol=1e-5)
    # So the deployed model judges a part and its mirror images alike, whatever the batch.
    for mirror in (image[:, :, ::-1], image[:, ::-1]):
        np.testing.assert_allclose(_run(tmp_path / "m.onnx", np.ascontiguousarray(mirror))[0], got, atol=1e-5)
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", image[1:2])[0], got[1:2], atol=1e-5)


def test_only_the_flips_trained_on_are_averaged() -> None:
    assert inference_views(TrainRecipe()) == [View()]
    assert inference_views(TrainRecipe(inference_flips=True, rotate_90=True, brightness_gains=[0.8])) == [
        View(), View(flip_v=True), View(flip_h=True), View(flip_h=True, flip_v=True)]
    assert inference_views(TrainRecipe(inference_flips=True, flip_vertical=False)) == [View(), View(flip_h=True)]
    with pytest.raises(ValidationError, match="inference_flips"):
        TrainRecipe(inference_flips=True, flip_horizontal=False, flip_vertical=False)


@pytest.mark.slow
def test_a_trained_package_averages_its_flips(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    (tmp_path / "data" / "img").mkdir(parents=True)
    samples = []
    for kind in HEADS[0].classes:
        for i in range(12):
            path = tmp_path / "data" / "img" / f"{kind}{i}.png"
            draw_part(kind, True, rng).save(path)
            samples.append(Sample(image=path, labels={"defect_type": kind}))
    write_dataset(tmp_path / "data", HEADS[:1], samples, name="flips")
    recipe = TINY.model_copy(update={"inference_flips": True, "epochs": 2, "patience": 2})
    card = train_model(tmp_path / "data", tmp_path / "pkg", recipe, progress=False)
    assert card.training["counts"]["inference_views"] == 2  # TINY trains on left-right mirrors only
    image = rng.integers(0, 256, (2, 72, 72), dtype=np.uint8)
    (plain,) = _run(tmp_path / "pkg" / "model.onnx", image)
    (mirrored,) = _run(tmp_path / "pkg" / "model.onnx", np.ascontiguousarray(image[:, :, ::-1]))
    (upside_down,) = _run(tmp_path / "pkg" / "model.onnx", np.ascontiguousarray(image[:, ::-1]))
    np.testing.assert_allclose(mirrored, plain, atol=1e-5)
    assert np.abs(upside_down - plain).max() > 1e-4  # not averaged: it was not trained on
    assert read_card(tmp_path / "pkg").training["recipe"]["inference_flips"] is True
