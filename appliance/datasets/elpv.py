"""Import the ELPV solar-cell dataset (PyPI ``elpv-dataset``) into the dataset folder format.

Heads: ``defect_grade`` (ordinal: the defect probability 0, 1/3, 2/3, 1 that the annotators gave)
and ``cell_type`` (mono/poly).  The split follows the benchmark protocol in DESIGN.md: stratified
on (grade, type) with a fixed seed, 25 % test (656 cells) and 75 % train (1,968).

The images are CC BY-NC-SA licensed, so they are never copied into a repository: ``images/`` in
the output is a symlink to the installed package's folder (a copy only where symlinks fail).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from appliance.dataset import Dataset, HeadSpec, Sample, load_dataset, write_dataset
from appliance.datasets.split import stratified_pick
from appliance.errors import UserError

GRADES = ["0", "1/3", "2/3", "1"]
TYPES = ["mono", "poly"]
TEST_FRACTION = 0.25
HEADS = [
    HeadSpec(name="defect_grade", classes=GRADES, ordinal=True),
    HeadSpec(name="cell_type", classes=TYPES),
]
LICENCE = ("CC BY-NC-SA 4.0 (images and labels; non-commercial use only). Buerhop-Lutz et al. 2018, "
           "Deitsch et al. 2019, https://github.com/zae-bayern/elpv-dataset")


def package_data() -> Path:
    """The ``data`` folder of the installed ``elpv-dataset`` package (labels.csv + images/)."""
    try:
        import elpv_dataset
    except ImportError as exc:
        raise UserError("the ELPV dataset is not installed; install the [train] extra "
                        "(pip install elpv-dataset)") from exc
    return Path(elpv_dataset.__file__).parent / "data"


def read_labels(labels_csv: Path) -> list[tuple[str, str, str]]:
    """(relative image path, grade, type) per row of the package's whitespace-separated labels."""
    rows = []
    for lineno, line in enumerate(labels_csv.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            path, probability, cell_type = line.split()
            grade = GRADES[round(float(probability) * 3)]
        except (ValueError, IndexError) as exc:
            raise UserError(f"{labels_csv}:{lineno}: unexpected row {line!r}") from exc
        if cell_type not in TYPES:
            raise UserError(f"{labels_csv}:{lineno}: unknown cell type {cell_type!r}")
        rows.append((path, grade, cell_type))
    return rows


def _link_images(source: Path, target: Path) -> None:
    try:
        target.symlink_to(source, target_is_directory=True)
    except OSError:
        shutil.copytree(source, target)


def import_elpv(out: Path, seed: int = 0) -> Dataset:
    """Write the ELPV dataset folder into ``out`` (new or empty) and return it loaded."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder")
    data = package_data()
    rows = read_labels(data / "labels.csv")
    test = stratified_pick([(grade, cell_type) for _, grade, cell_type in rows], TEST_FRACTION, seed)
    out.mkdir(parents=True, exist_ok=True)
    _link_images(data / "images", out / "images")
    samples = [
        Sample(image=Path(path), labels={"defect_grade": grade, "cell_type": cell_type},
               split="test" if is_test else "train")
        for (path, grade, cell_type), is_test in zip(rows, test, strict=True)
    ]
    write_dataset(out, HEADS, samples, name="ELPV solar cells", licence=LICENCE)
    return load_dataset(out)
