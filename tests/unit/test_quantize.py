"""Optional int8 export: the quantised package keeps the contract and records its comparison; a
candidate that loses too much accuracy is refused and the fp32 model is kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image, ImageDraw

from appliance.dataset import HeadSpec, Sample, write_dataset
from appliance.inference import Classifier
from appliance.model_package import read_card, sha256_file
from appliance.training.data import loader
from appliance.training.quantize import quantize_if_accurate
from appliance.training.recipe import TrainRecipe
from appliance.training.train import train_model

SIDE = 64
PER_CLASS = 20
HEADS = [HeadSpec(name="defect_type", classes=["none", "spot"])]
TINY = TrainRecipe(image_size=64, frozen_blocks=13, epochs=3, patience=3, min_steps=1, batch_size=16, lr=3e-3,
                   val_fraction=0.25, flip_horizontal=True, flip_vertical=False,
                   quantize=True, max_quantization_drop=1.0, quantization_images=16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("q")
    (root / "img").mkdir()
    rng = np.random.default_rng(3)
    samples = []
    for kind in HEADS[0].classes:
        for i in range(PER_CLASS):
            im = Image.fromarray(rng.normal(90, 12, (SIDE, SIDE)).clip(0, 255).astype(np.uint8), mode="L")
            if kind == "spot":
                cx, cy = (int(v) for v in rng.integers(18, SIDE - 18, size=2))
                ImageDraw.Draw(im).ellipse([cx - 9, cy - 9, cx + 9, cy + 9], fill=240)
            path = root / "img" / f"{kind}_{i:03d}.png"
            im.save(path)
            samples.append(Sample(image=path, labels={"defect_type": kind}, split="train"))
    write_dataset(root, HEADS, samples, name="quantize")
    return root


@pytest.fixture(scope="module")
def package(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "int8"
    train_model(dataset, out, TINY, progress=False)
    return out


def test_int8_package_keeps_the_contract(package: Path) -> None:
    card = read_card(package)
    q = card.training["quantization"]
    assert q["applied"] is True, q
    assert set(q) >= {"val_accuracy_fp32", "val_accuracy_int8", "accuracy_drop", "latency_p50_ms_fp32",
                      "latency_p50_ms_int8", "speedup"}
    graph = onnx.load(str(package / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert card.onnx_sha256 == sha256_file(package / "model.onnx")
    clf = Classifier(package)  # contract, checksum and warm-up checks of the line
    spot = np.full((SIDE + 5, SIDE + 3), 90, np.uint8)
    pred = clf.classify(spot)["defect_type"]
    assert abs(sum(pred.probs) - 1.0) < 1e-3


def test_refused_when_accuracy_drops_too_much(package: Path, dataset: Path, tmp_path: Path) -> None:
    fp32 = tmp_path / "fp32"
    train_model(dataset, fp32, TINY.model_copy(update={"quantize": False, "epochs": 1}), progress=False)
    model = tmp_path / "model.onnx"
    shutil.copy(fp32 / "model.onnx", model)
    before = sha256_file(model)
    paths = sorted((dataset / "img").glob("*.png"))
    load = loader("NHW")
    y = np.array([[0 if p.name.startswith("none") else 1] for p in paths])
    report = quantize_if_accurate(model, [load(p) for p in paths[:4]], paths, load, y, ["defect_type"],
                                  max_drop=-1.0, threads=1)  # any result "drops" more than -1
    assert report["applied"] is False
    assert "fp32 kept" in report["reason"]
    assert sha256_file(model) == before
    assert not (tmp_path / "model.int8.onnx").exists()
