"""The ELPV importer: benchmark split, class orders, and no copies of the licensed images."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from appliance.dataset import load_dataset
from appliance.datasets import import_elpv
from appliance.datasets.elpv import package_data
from appliance.datasets.split import stratified_pick
from appliance.errors import UserError


@pytest.fixture(scope="module")
def elpv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("elpv") / "dataset"
    import_elpv(out)
    return out


def test_counts_and_split(elpv: Path) -> None:
    ds = load_dataset(elpv)
    assert len(ds.samples) == 2624
    assert Counter(s.split for s in ds.samples) == {"train": 1968, "test": 656}
    strata = Counter((s.labels["defect_grade"], s.labels["cell_type"]) for s in ds.samples)
    test = Counter((s.labels["defect_grade"], s.labels["cell_type"]) for s in ds.split("test"))
    assert len(strata) == 8
    for key, n in strata.items():
        assert abs(test[key] - n * 0.25) <= 1, key
    assert all(s.image.is_file() for s in ds.samples[:: 97])


def test_heads_and_licence(elpv: Path) -> None:
    ds = load_dataset(elpv)
    grade, cell_type = ds.heads
    assert (grade.name, grade.classes, grade.ordinal) == ("defect_grade", ["0", "1/3", "2/3", "1"], True)
    assert (cell_type.name, cell_type.classes, cell_type.ordinal) == ("cell_type", ["mono", "poly"], False)
    assert "CC BY-NC-SA" in (elpv / "dataset.yaml").read_text()


def test_labels_match_the_package(elpv: Path) -> None:
    source = {}
    for line in (package_data() / "labels.csv").read_text().splitlines():
        path, probability, kind = line.split()
        source[path] = (probability, kind)
    grade_of = {"0": 0.0, "1/3": 1 / 3, "2/3": 2 / 3, "1": 1.0}
    with (elpv / "labels.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            probability, kind = source[row["image"]]
            assert grade_of[row["defect_grade"]] == pytest.approx(float(probability))
            assert row["cell_type"] == kind


def test_images_are_linked_not_copied(elpv: Path) -> None:
    images = elpv / "images"
    assert images.is_symlink() and images.resolve() == (package_data() / "images").resolve()
    assert sum(f.stat().st_size for f in elpv.iterdir() if f.is_file()) < 1_000_000


def test_same_seed_same_split(elpv: Path, tmp_path: Path) -> None:
    again = import_elpv(tmp_path / "again")
    other = import_elpv(tmp_path / "other", seed=1)
    first = [s.split for s in load_dataset(elpv).samples]
    assert [s.split for s in again.samples] == first
    assert [s.split for s in other.samples] != first


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("image\n")
    with pytest.raises(UserError, match="not an empty folder"):
        import_elpv(tmp_path)


def test_stratified_pick_exact_total_and_singletons() -> None:
    keys = ["a"] * 7 + ["b"] * 5 + ["c"]
    mask = stratified_pick(keys, 0.3, seed=3)
    assert mask.sum() == round(13 * 0.3)
    assert not mask[-1]  # a class with one example keeps it for training
    assert abs(mask[:7].sum() - 2.1) <= 1 and abs(mask[7:12].sum() - 1.5) <= 1
