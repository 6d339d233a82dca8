"""Any taxonomy without code change: a hierarchical head (family → subtype) whose predictions stay
consistent with the parent in the exported graph, an ordinal head, and calibration that lowers
ECE on held-out data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from appliance.dataset import HeadSpec, Sample, write_dataset
from appliance.imageio import read_image
from appliance.inference import Classifier
from appliance.model_package import read_card
from appliance.training.calibration import fit_temperature
from appliance.training.evaluate import evaluate_model
from appliance.training.metrics import expected_calibration_error, softmax
from appliance.training.recipe import TrainRecipe
from appliance.training.train import train_model

SIDE = 64
PER_SUBTYPE = 14
SUBTYPES = {"thin_line": "line", "thick_line": "line", "small_blob": "blob", "big_blob": "blob"}
HEADS = [
    HeadSpec(name="family", classes=["line", "blob"]),
    HeadSpec(name="subtype", classes=list(SUBTYPES), parent="family", parent_of=SUBTYPES),
    HeadSpec(name="severity", classes=["low", "mid", "high"], ordinal=True),
]
TINY = TrainRecipe(image_size=64, frozen_blocks=12, epochs=6, patience=6, min_steps=1, batch_size=16, lr=3e-3,
                   val_fraction=0.2, flip_horizontal=True, flip_vertical=False)


def _draw(subtype: str, level: int, rng: np.random.Generator) -> Image.Image:
    im = Image.fromarray(rng.normal(80, 10, (SIDE, SIDE)).clip(0, 255).astype(np.uint8), mode="L")
    draw = ImageDraw.Draw(im)
    colour = (140, 190, 250)[level]
    cx, cy = (int(v) for v in rng.integers(20, SIDE - 20, size=2))
    if subtype.endswith("line"):
        draw.line([(cx - 16, cy - 5), (cx + 16, cy + 5)], fill=colour, width=2 if subtype == "thin_line" else 6)
    else:
        r = 4 if subtype == "small_blob" else 11
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return im


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("taxonomy")
    (root / "img").mkdir()
    rng = np.random.default_rng(11)
    samples = []
    for subtype, family in SUBTYPES.items():
        for i in range(PER_SUBTYPE):
            level = i % 3
            path = root / "img" / f"{subtype}_{i:03d}.png"
            _draw(subtype, level, rng).save(path)
            samples.append(Sample(image=path, split="test" if i % 4 == 3 else "train",
                                  labels={"family": family, "subtype": subtype,
                                          "severity": HEADS[2].classes[level]}))
    write_dataset(root, HEADS, samples, name="taxonomy")
    return root


@pytest.fixture(scope="module")
def package(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tax"
    train_model(dataset, out, TINY, progress=False)
    return out


def test_hierarchical_and_ordinal_heads_train_and_evaluate(package: Path, dataset: Path) -> None:
    card = read_card(package)
    assert card.head("subtype").parent == "family"
    assert card.head("subtype").parent_of == SUBTYPES
    assert card.head("severity").ordinal
    summary = evaluate_model(package, dataset).summary()["heads"]
    assert set(summary) == {"family", "subtype", "severity"}
    assert summary["family"]["accuracy"] > 0.6
    assert "mean_abs_grade_error" in summary["severity"]
    assert "mean_abs_grade_error" not in summary["subtype"]
    assert isinstance(summary["family"]["ece_uncalibrated"], float)
    assert summary["subtype"]["ece_uncalibrated"] is None, "masked by its parent: the temperature cannot be undone"


def test_child_predictions_are_consistent_with_the_parent(package: Path, dataset: Path) -> None:
    clf = Classifier(package)
    images = sorted((dataset / "img").glob("*.png"))
    for path in images:
        pred = clf.classify(read_image(path))
        family, subtype = pred["family"], pred["subtype"]
        assert SUBTYPES[subtype.label] == family.label, path
        # probability mass only on the subtypes of the predicted family, renormalised
        off = [p for c, p in zip(HEADS[1].classes, subtype.probs, strict=True) if SUBTYPES[c] != family.label]
        assert max(off) < 1e-6
        assert abs(sum(subtype.probs) - 1.0) < 1e-4


def test_temperature_scaling_lowers_ece_on_held_out_data() -> None:
    rng = np.random.default_rng(5)
    n, k = 4000, 4
    y = rng.integers(0, k, n)
    signal = rng.normal(0, 1, (n, k))
    signal[np.arange(n), y] += 1.2
    logits = signal * 4.0  # an overconfident model
    fit_half, held_out = slice(0, n // 2), slice(n // 2, n)
    t = fit_temperature(logits[fit_half], y[fit_half])
    assert t > 1.5
    before = expected_calibration_error(softmax(logits[held_out]), y[held_out])
    after = expected_calibration_error(softmax(logits[held_out] / t), y[held_out])
    assert after < before * 0.5


def test_card_records_ece_before_and_after(package: Path) -> None:
    heads = read_card(package).metrics["heads"]
    for name in ("family", "subtype", "severity"):
        assert {"ece", "ece_uncalibrated"} <= set(heads[name])
