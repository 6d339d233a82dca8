"""The development taxonomy suite's generated sets: dataset folder format, labels that follow each
family's own severity thresholds, a valid hierarchy, test cells apart from training cells."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ruamel.yaml import YAML

from appliance.dataset import load_dataset
from appliance.imageio import read_image
from bench.taxonomies import hierarchy, type_severity
from bench.taxonomies.folder import read_marks
from bench.taxonomies.marks import SIZE
from bench.taxonomies.surfaces import functional_cells
from bench.taxonomy_suite import when_holding


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return type_severity.build(tmp_path_factory.mktemp("ts") / "set", seed=3, per_type=6, test_per_type=3)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hierarchy.build(tmp_path_factory.mktemp("h") / "set", seed=3, per_leaf=2, test_per_leaf=1)


def test_type_severity_folder(graded: Path) -> None:
    ds = load_dataset(graded)
    kind, severity = ds.heads
    assert kind.classes == ["ok", "scratch", "crack", "stain", "pinholes", "chip"]
    assert (severity.classes, severity.ordinal) == (["none", "minor", "major", "critical"], True)
    rows = Counter((s.labels["defect_type"], s.labels["severity"], s.split) for s in ds.samples)
    assert rows[("ok", "none", "train")] == 3 and rows[("ok", "none", "test")] == 3
    for family in kind.classes[1:]:
        for grade in ("minor", "major", "critical"):
            assert (rows[(family, grade, "train")], rows[(family, grade, "test")]) == (1, 1), (family, grade)
    assert sum(rows.values()) == len(ds.samples) == 36
    for s in ds.samples[::7]:
        image = read_image(s.image)
        assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8


def test_each_family_grades_by_its_own_thresholds(graded: Path) -> None:
    by_family = {f.name: f for f in type_severity.FAMILIES}
    for row in read_marks(graded):
        if row["defect_type"] == "ok":
            assert row["severity"] == "none"
            continue
        family = by_family[row["defect_type"]]
        low, high = family.bands[type_severity.GRADES.index(row["severity"])]
        value = float(row[family.measure])
        assert low <= value <= high if family.whole else low < value < high, row
    # No shared size rule: no one length separates minor from major (or major from critical) in
    # every family measured in pixels.
    px = [f for f in type_severity.FAMILIES if f.measure.endswith("_px")]
    assert len(px) >= 3
    for grade in (0, 1):
        assert max(f.bands[grade][1] for f in px) > min(f.bands[grade + 1][0] for f in px)


def test_generation_is_deterministic_and_cached(graded: Path, tmp_path: Path) -> None:
    again = type_severity.build(tmp_path / "again", seed=3, per_type=6, test_per_type=3)
    other = type_severity.build(tmp_path / "other", seed=4, per_type=6, test_per_type=3)
    name = "images/00020.png"
    assert (again / name).read_bytes() == (graded / name).read_bytes()
    assert (other / name).read_bytes() != (graded / name).read_bytes()
    stamp = (again / name).stat().st_mtime_ns
    type_severity.build(again, seed=3, per_type=6, test_per_type=3)
    assert (again / name).stat().st_mtime_ns == stamp  # the same parameters: not drawn again


def test_within_flag_declares_severity_per_type(tmp_path: Path) -> None:
    out = type_severity.build(tmp_path / "within", seed=0, per_type=6, test_per_type=3, within=True)
    heads = {h["name"]: h for h in YAML().load(out / "dataset.yaml")["heads"]}
    assert heads["severity"]["within"] == "defect_type"
    assert "within" not in heads["defect_type"]


def test_hierarchy_folder(tree: Path) -> None:
    ds = load_dataset(tree)
    family, subtype = ds.heads
    assert len(subtype.classes) >= 30 and subtype.parent == "family"
    assert set(subtype.parent_of) == set(subtype.classes)
    assert set(subtype.parent_of.values()) == set(family.classes)
    for s in ds.samples:
        assert subtype.parent_of[s.labels["subtype"]] == s.labels["family"]
    assert Counter(s.split for s in ds.samples) == {"train": len(subtype.classes), "test": len(subtype.classes)}


def test_test_images_never_share_a_cell_with_training_images() -> None:
    cells = functional_cells(seed=5)
    assert cells.train and cells.test and not set(cells.train) & set(cells.test)


def test_when_holding_drops_the_least_confident_parts() -> None:
    confidence = np.array([0.9, 0.2, 0.8, 0.3, 0.7, 0.6, 0.95, 0.85, 0.75, 0.65])
    correct = {"a": confidence > 0.5}
    held = when_holding(confidence, correct)
    assert held["20%"]["a"] == 1.0 and held["10%"]["a"] == pytest.approx(8 / 9, abs=1e-4)
