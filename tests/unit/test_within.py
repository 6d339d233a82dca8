"""A head graded within another (severity within defect type): dataset.yaml validation, the
mixture the exported graph computes, the training loss's pieces, and both training methods on a
taxonomy whose severity rule differs by type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from appliance.dataset import HeadSpec, load_dataset
from appliance.errors import UserError
from appliance.model_package import output_name, read_card
from appliance.training.evaluate import evaluate_model
from appliance.training.export import export_onnx
from appliance.training.network import ExportNet, build, hierarchy
from appliance.training.recipe import TrainRecipe
from appliance.training.train import train_model
from appliance.training.within import cells, graded, output_widths, training_logits
from tests.graded_severity import SEVERITIES, TYPES, make_dataset

TINY = TrainRecipe(image_size=64, frozen_blocks=12, epochs=8, patience=8, min_steps=1, batch_size=16, lr=3e-3,
                   val_fraction=0.2, flip_horizontal=True, flip_vertical=False)


def _yaml(tmp_path: Path, heads: str) -> Path:
    (tmp_path / "labels.csv").write_text("image,defect_type,severity,family\na.png,ok,none,\n")
    (tmp_path / "dataset.yaml").write_text(heads)
    return tmp_path


TYPE = "  - {name: defect_type, classes: [ok, scratch, stain]}\n"


@pytest.mark.parametrize(("severity", "message"), [
    ("within: defect_typ", r"heads: Value error, heads\.1\.within \('severity'\): 'defect_typ' is not a head "
                           r"of this dataset \(heads: defect_type, severity\)"),
    ("within: severity", r"heads\.1: Value error, within: head 'severity' cannot be graded within itself"),
    ("within: defect_type, parent: defect_type", r"heads\.1: .*has both parent and within"),
    ("within: defect_type, line_frequencies: {none: 9, minor: 1}",
     r"heads\.1: .*line_frequencies: not supported on 'severity'.*give the line's mix to 'defect_type'"),
])
def test_dataset_yaml_refuses_a_bad_within(tmp_path: Path, severity: str, message: str) -> None:
    root = _yaml(tmp_path, "heads:\n" + TYPE + f"  - {{name: severity, classes: [none, minor], {severity}}}\n")
    with pytest.raises(UserError, match=r"dataset\.yaml:\d+: " + message):
        load_dataset(root)


def test_dataset_yaml_refuses_nesting_and_a_graded_parent(tmp_path: Path) -> None:
    cycle = ("heads:\n  - {name: defect_type, classes: [a, b], within: severity}\n"
             "  - {name: severity, classes: [none, minor], within: defect_type}\n")
    with pytest.raises(UserError, match=r"heads\.0\.within \('defect_type'\): 'severity' is itself graded "
                                        r"within 'defect_type'"):
        load_dataset(_yaml(tmp_path, cycle))
    graded_parent = ("heads:\n" + TYPE + "  - {name: severity, classes: [none, minor], within: defect_type}\n"
                     "  - {name: family, classes: [x, y], parent: severity}\n")
    with pytest.raises(UserError, match=r"heads\.2\.parent \('family'\): 'severity' is graded within "
                                        r"'defect_type' and cannot be a parent"):
        load_dataset(_yaml(tmp_path, graded_parent))
    fine = load_dataset(_yaml(tmp_path, "heads:\n" + TYPE + "  - {name: severity, classes: [none, minor], "
                                        "ordinal: true, within: defect_type}\n"))
    assert fine.head("severity").within == "defect_type" and fine.head("defect_type").within is None


def test_the_exported_graph_outputs_the_mixture_of_the_sub_heads(tmp_path: Path) -> None:
    """``severity_probs`` = Σ_t P(t)·P(s|t), with P(t) the type head's final (calibrated, prior-
    shifted, parent-masked) probabilities and P(s|t) each sub-head's softmax at the shared
    temperature; worked out by hand from the torch logits and compared with onnxruntime."""
    heads = [HeadSpec(name="family", classes=["f0", "f1"]),
             HeadSpec(name="defect_type", classes=TYPES, parent="family",
                      parent_of={"ok": "f0", "line": "f1", "blob": "f1"}),
             HeadSpec(name="severity", classes=SEVERITIES, ordinal=True, within="defect_type")]
    widths = output_widths(heads)
    assert widths == [2, 3, 9] and graded(heads) == [(2, 1)]
    torch.manual_seed(0)
    frozen, net = build("NHW", 64, 15, widths, 0.0, 0.0)
    for head in net.heads:  # spread the logits so that the mixture is not near uniform
        torch.nn.init.normal_(head.weight, std=0.5)
    temperatures, shifts = [1.3, 0.8, 2.0], [[0.0, 0.0], [0.5, -0.2, 0.1], [0.0] * 3]
    model = ExportNet(frozen, net, temperatures, shifts, hierarchy(heads), graded=graded(heads)).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, "NHW", 64, [output_name(h.name) for h in heads])
    images = np.random.default_rng(1).integers(0, 256, (5, 70, 90), dtype=np.uint8)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    family, kind, severity = sess.run(None, {"image": images})
    with torch.no_grad():
        z_family, z_type, z_sev = (z.numpy().astype(np.float64) for z in net(frozen(torch.from_numpy(images))))

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p_family = softmax(z_family / 1.3)
    p_type = softmax(z_type / 0.8 + shifts[1])
    allowed = np.array([[1, 0, 0], [0, 1, 1]])[p_family.argmax(axis=1)]  # the masks of the predicted family
    p_type = p_type * allowed / (p_type * allowed).sum(axis=1, keepdims=True)
    expected = np.zeros((5, 3))
    for t in range(3):
        expected += p_type[:, [t]] * softmax(z_sev[:, 3 * t:3 * t + 3] / 2.0)
    np.testing.assert_allclose(kind, p_type, atol=1e-4)
    np.testing.assert_allclose(severity, expected, atol=1e-4)
    np.testing.assert_allclose(severity.sum(axis=1), 1.0, atol=1e-5)
    assert severity.shape == (5, len(SEVERITIES)) and family.shape == (5, 2)


def test_training_logits_use_the_labelled_sub_head_or_the_mixture() -> None:
    rng = np.random.default_rng(0)
    z_type = torch.tensor(rng.normal(size=(3, 2)))
    z = torch.tensor(rng.normal(size=(3, 2 * 4)))  # 2 types × 4 grades
    out = training_logits(z, z_type, torch.tensor([1, 0, -1]))
    assert torch.equal(out[0], z[0, 4:]) and torch.equal(out[1], z[1, :4])
    p_type = torch.softmax(z_type[2], 0)
    mixture = p_type[0] * torch.softmax(z[2, :4], 0) + p_type[1] * torch.softmax(z[2, 4:], 0)
    torch.testing.assert_close(torch.softmax(out[2], 0), mixture)
    # Class balance per (type, severity) cell; rows without a type form their own groups per severity.
    assert cells(np.array([0, 2, 1, -1, 3]), np.array([1, 0, -1, 1, 0]), 4, 2).tolist() == [4, 2, 9, -1, 3]


def test_every_type_needs_rows_with_a_severity(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", per_cell=6)
    rows = (root / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join(r.replace(",ok,none,", ",ok,,") for r in rows) + "\n")
    with pytest.raises(UserError, match=r"head 'severity' is graded within 'defect_type', but no training row "
                                        r"of defect_type 'ok' has a 'severity' label"):
        train_model(root, tmp_path / "out", TINY, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("graded"), per_cell=16)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fine_tune_top", "pooled_features"])
def test_both_methods_learn_severity_within_type(dataset: Path, tmp_path: Path, method: str) -> None:
    recipe = TINY if method == "fine_tune_top" else TINY.model_copy(update={
        "method": "pooled_features", "pooled_blocks": [2, 5, 10], "hidden_units": 64, "epochs": 20,
        "patience": 20, "min_steps": 200, "inference_flips": True})
    card = train_model(dataset, tmp_path / "m", recipe, progress=False)
    assert read_card(tmp_path / "m").head("severity").within == "defect_type"  # the relation is on the card
    counts = card.training["counts"]
    cell = counts["within"]["severity"]  # training rows per (type, severity): what each sub-head learns from
    assert {t: sum(cell[t].values()) for t in TYPES} == counts["classes"]["defect_type"]
    assert {s: sum(cell[t][s] for t in TYPES) for s in SEVERITIES} == counts["classes"]["severity"]
    assert cell["ok"]["minor"] == cell["line"]["none"] == 0
    assert 0.25 <= card.head("severity").temperature <= 10
    summary = evaluate_model(tmp_path / "m", dataset).summary()["heads"]
    assert summary["defect_type"]["accuracy"] >= 0.85
    assert summary["severity"]["accuracy"] >= 0.8, summary["severity"]
    assert summary["severity"]["ece_uncalibrated"] is None, "a mixture: its temperature cannot be undone"
    assert "mean_abs_grade_error" in summary["severity"]
