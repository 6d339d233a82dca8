"""The dataset folder format shared by training, evaluation and the replay camera.

A dataset is a folder with ``labels.csv``: column ``image`` (path relative to the folder), one
column per head (empty = unknown for that head) and an optional ``split`` column
(train/val/test).  An optional ``dataset.yaml`` fixes the heads, their class order, ``ordinal``
for graded heads, ``parent`` for hierarchical ones and ``within`` for a head graded within each
class of another (severity within defect type).  Without it, heads are the non-reserved
columns and their classes are the sorted distinct values.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from appliance.errors import UserError
from appliance.yamlio import load_validated

RESERVED_COLUMNS = frozenset({"image", "split"})
SPLITS = ("train", "val", "test")


class HeadSpec(BaseModel):
    """One prediction head: its classes in order, and how they relate."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Head name; also the labels.csv column and the ONNX output prefix.")
    classes: list[str] = Field(min_length=2, description="Class names in output order.")
    ordinal: bool = Field(default=False, description="Classes are ordered grades (e.g. severity).")
    parent: str | None = Field(
        default=None, description="Parent head for a hierarchical taxonomy (family -> subtype)."
    )
    parent_of: dict[str, str] = Field(
        default_factory=dict,
        description="For a child head: each class name -> the parent-head class it belongs to.",
    )
    within: str | None = Field(
        default=None,
        description="Grade this head within each class of the named head (e.g. severity within "
                    "defect_type: a scratch is major by what makes a scratch major, a stain by what "
                    "makes a stain major).  The network learns one set of this head's logits per class "
                    "of that head; the model still outputs one probability vector for this head, "
                    "P(class) = sum over t of P(t) * P(class | t).  The named head must not be graded "
                    "within another itself; not combined with parent or line_frequencies.",
    )
    line_frequencies: dict[str, float] = Field(
        default_factory=dict,
        description="How often each class occurs on the line (positive numbers, e.g. counts or "
                    "shares from the line's history; normalised).  When given, the model's "
                    "probabilities are moved from the training set's class mix to this one (a "
                    "Bayes prior shift after calibration, inside the graph), so that a set labelled "
                    "with as many images of each class does not make the line flag rare defects "
                    "too often.  Empty: the training mix is kept.",
    )

    @model_validator(mode="after")
    def _frequencies_cover_the_classes(self) -> HeadSpec:
        if self.within is not None:
            if self.within == self.name:
                raise ValueError(f"within: head '{self.name}' cannot be graded within itself")
            if self.parent:
                raise ValueError(f"within: head '{self.name}' has both parent and within; a head is either "
                                 "a subtype of a parent class or graded within a head's classes")
            if self.line_frequencies:
                raise ValueError(f"line_frequencies: not supported on '{self.name}', which is graded within "
                                 f"'{self.within}'; give the line's mix to '{self.within}' instead")
        if self.line_frequencies:
            if set(self.line_frequencies) != set(self.classes):
                raise ValueError(f"line_frequencies must name exactly the classes {self.classes}, "
                                 f"not {sorted(self.line_frequencies)}")
            if not all(v > 0 for v in self.line_frequencies.values()):
                raise ValueError("line_frequencies must all be > 0 (a class never seen on the line "
                                 "does not belong in the head)")
        return self


def check_relations(heads: list[HeadSpec]) -> list[HeadSpec]:
    """Raise ``ValueError`` naming the key when a head's ``within`` does not name a usable head.

    A graded head's probabilities are a mixture computed after its conditioning head's, so the
    conditioning head must not be graded itself (which also rules out cycles), and a graded head
    cannot be the parent of a hierarchical one (masking reads the parent before any mixture)."""
    names = [h.name for h in heads]
    if len(set(names)) != len(names):
        raise ValueError(f"head names must be unique, got {', '.join(names)}")
    by_name = {h.name: h for h in heads}
    for i, h in enumerate(heads):
        if h.within is not None:
            key = f"heads.{i}.within ('{h.name}')"
            target = by_name.get(h.within)
            if target is None:
                raise ValueError(f"{key}: '{h.within}' is not a head of this dataset "
                                 f"(heads: {', '.join(names)})")
            if target.within is not None:
                raise ValueError(f"{key}: '{h.within}' is itself graded within '{target.within}'; a head can "
                                 "only be graded within a head that is not graded itself")
        if h.parent is not None and h.parent in by_name and by_name[h.parent].within is not None:
            raise ValueError(f"heads.{i}.parent ('{h.name}'): '{h.parent}' is graded within "
                             f"'{by_name[h.parent].within}' and cannot be a parent")
    return heads


class DatasetSpec(BaseModel):
    """The contents of ``dataset.yaml``."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="A human name for the dataset.")
    heads: list[HeadSpec] = Field(min_length=1, description="The heads, in output order.")
    licence: str | None = Field(default=None, description="Licence of the images and labels.")

    @field_validator("heads")
    @classmethod
    def _heads_relate(cls, heads: list[HeadSpec]) -> list[HeadSpec]:
        return check_relations(heads)


@dataclass(slots=True)
class Sample:
    """One labelled image; ``labels`` maps head -> class name, absent when unknown."""

    image: Path
    labels: dict[str, str]
    split: str | None = None


@dataclass(slots=True)
class Dataset:
    root: Path
    heads: list[HeadSpec]
    samples: list[Sample] = field(default_factory=list)

    def head(self, name: str) -> HeadSpec:
        for h in self.heads:
            if h.name == name:
                return h
        raise KeyError(name)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    @property
    def has_splits(self) -> bool:
        return any(s.split for s in self.samples)


def load_dataset(root: Path | str) -> Dataset:
    """Read a dataset folder; raises :class:`UserError` naming the file, line and column at fault."""
    root = Path(root)
    labels_path = root / "labels.csv"
    if not labels_path.is_file():
        raise UserError(f"{root}: not a dataset folder (no labels.csv)")
    with labels_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if "image" not in columns:
        raise UserError(f"{labels_path}: the header has no 'image' column (found: {', '.join(columns)})")

    spec_path = root / "dataset.yaml"
    if spec_path.is_file():
        heads = load_validated(spec_path, DatasetSpec).heads
        missing = [h.name for h in heads if h.name not in columns]
        if missing:
            raise UserError(f"{labels_path}: dataset.yaml names heads with no column: {', '.join(missing)}")
    else:
        heads = []
        for col in columns:
            if col in RESERVED_COLUMNS:
                continue
            classes = sorted({r[col].strip() for r in rows if r[col] and r[col].strip()})
            if len(classes) < 2:
                raise UserError(f"{labels_path}: column '{col}' has fewer than two classes; add dataset.yaml")
            heads.append(HeadSpec(name=col, classes=classes))

    known: dict[str, set[str]] = {h.name: set(h.classes) for h in heads}
    samples: list[Sample] = []
    for lineno, row in enumerate(rows, start=2):
        rel = (row.get("image") or "").strip()
        if not rel:
            raise UserError(f"{labels_path}:{lineno}: empty 'image' value")
        labels: dict[str, str] = {}
        for name, allowed in known.items():
            value = (row.get(name) or "").strip()
            if not value:
                continue
            if value not in allowed:
                raise UserError(
                    f"{labels_path}:{lineno}: column '{name}' has '{value}', "
                    f"expected one of {sorted(allowed)}"
                )
            labels[name] = value
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise UserError(f"{labels_path}:{lineno}: split '{split}' is not one of {', '.join(SPLITS)}")
        samples.append(Sample(image=root / rel, labels=labels, split=split))
    if not samples:
        raise UserError(f"{labels_path}: no rows")
    return Dataset(root=root, heads=heads, samples=samples)


def write_dataset(root: Path, heads: list[HeadSpec], samples: list[Sample], name: str | None = None,
                  licence: str | None = None) -> None:
    """Write ``labels.csv`` and ``dataset.yaml``; image paths are stored relative to ``root``."""
    from ruamel.yaml import YAML

    root.mkdir(parents=True, exist_ok=True)
    with (root / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", *(h.name for h in heads), "split"])
        for s in samples:
            rel = s.image.relative_to(root) if s.image.is_absolute() else s.image
            writer.writerow([rel.as_posix(), *(s.labels.get(h.name, "") for h in heads), s.split or ""])
    spec = DatasetSpec(name=name, heads=heads, licence=licence)
    yaml = YAML()
    yaml.default_flow_style = False
    with (root / "dataset.yaml").open("w", encoding="utf-8") as fh:
        yaml.dump(spec.model_dump(exclude_defaults=True), fh)
