"""The prior shift: probabilities moved from the training set's class mix to the line's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from appliance.dataset import HeadSpec, Sample, load_dataset, write_dataset
from appliance.errors import UserError
from appliance.training.calibration import prior_shift
from appliance.training.export import export_onnx
from appliance.training.network import ExportNet, build
from appliance.training.train import train_model
from tests.drawn_parts import draw_part
from tests.unit.test_training import TINY


def test_no_line_frequencies_no_shift() -> None:
    y = np.array([0] * 30 + [1] * 10)
    assert prior_shift(y, ["a", "b"], 0.3, {}).tolist() == [0.0, 0.0]


def test_shift_is_the_log_ratio_of_the_priors() -> None:
    y = np.array([0] * 50 + [1] * 50)  # trained on a 50/50 mix; the line is 90/10
    np.testing.assert_allclose(prior_shift(y, ["a", "b"], 0.0, {"a": 9, "b": 1}),
                               [np.log(0.9 / 0.5), np.log(0.1 / 0.5)])


def test_class_weighting_counts_as_part_of_the_training_prior() -> None:
    y = np.array([0] * 90 + [1] * 10)  # fully balanced weights make a 90/10 set train like 50/50
    np.testing.assert_allclose(prior_shift(y, ["a", "b"], 1.0, {"a": 90, "b": 10}),
                               [np.log(0.9 / 0.5), np.log(0.1 / 0.5)], atol=1e-6)
    np.testing.assert_allclose(prior_shift(y, ["a", "b"], 0.0, {"a": 90, "b": 10}), [0.0, 0.0], atol=1e-9)


def test_the_exported_graph_applies_bayes_rule(tmp_path: Path) -> None:
    torch.manual_seed(0)
    frozen, net = build("NHW", 64, 15, [2, 3], 0.0, 0.0)
    shift = [[np.log(0.9 / 0.5), np.log(0.1 / 0.5)], [0.0, 0.0, 0.0]]
    plain = ExportNet(frozen, net, [1.5, 1.0], [[0.0, 0.0], [0.0, 0.0, 0.0]]).eval()
    shifted = ExportNet(frozen, net, [1.5, 1.0], shift).eval()
    image = np.random.default_rng(1).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    export_onnx(shifted, tmp_path / "m.onnx", "NHW", 64, ["a_probs", "b_probs"])
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": image})
    with torch.no_grad():
        base = [p.numpy() for p in plain(torch.from_numpy(image))]
    expected = base[0] * np.exp(shift[0])
    np.testing.assert_allclose(got[0], expected / expected.sum(axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(got[1], base[1], atol=1e-5)  # a head without frequencies is unchanged


def test_frequencies_must_name_every_class(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("image,grade\na.png,ok\nb.png,bad\n")
    (tmp_path / "dataset.yaml").write_text(
        "heads:\n- name: grade\n  classes: [ok, bad]\n  line_frequencies:\n    ok: 0.98\n    bda: 0.02\n")
    with pytest.raises(UserError, match=r"dataset\.yaml:\d+: .*line_frequencies must name exactly the classes"):
        load_dataset(tmp_path)


def test_training_records_the_shift(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    (tmp_path / "img").mkdir()
    samples = []
    for kind in ("none", "scratch"):
        for i in range(16):
            path = tmp_path / "img" / f"{kind}{i}.png"
            draw_part(kind, True, rng).save(path)
            samples.append(Sample(path, {"defect": kind}, "train"))
    head = HeadSpec(name="defect", classes=["none", "scratch"], line_frequencies={"none": 95, "scratch": 5})
    write_dataset(tmp_path, [head], samples)
    card = train_model(tmp_path, tmp_path / "model", TINY.model_copy(update={"class_balance": 0.0}), progress=False)
    assert card.head("defect").line_frequencies == {"none": 95, "scratch": 5}
    shift = card.training["prior_shift"]["defect"]
    assert shift["none"] == pytest.approx(np.log(0.95 / 0.5), abs=0.05)  # trained on 50/50
    assert shift["scratch"] == pytest.approx(np.log(0.05 / 0.5), abs=0.05)
