"""Shared fixtures: a state directory, a line configuration written as real YAML, test images."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from ruamel.yaml import YAML

from appliance.config import AppConfig, load_config
from bench.common import free_port  # noqa: F401 - the tests take it from here
from tests.brightness_model import GRADES, brightness_for, make_brightness_model

DISPOSITION = {
    "min_confidence": 0.6,
    "heads": ["defect_grade"],
    "audit_rate": 0.0,
    "rules": [
        {"name": "functional", "when": {"defect_grade": ["0"]}, "disposition": "pass"},
        {"name": "possibly-defective", "when": {"defect_grade": ["1/3"]}, "disposition": "rework"},
        {"name": "defective", "when": {"defect_grade": ["2/3", "1"]}, "disposition": "reject"},
    ],
}



def write_yaml(path: Path, data: Any) -> Path:
    yaml = YAML()
    yaml.default_flow_style = False
    with path.open("w") as fh:
        yaml.dump(data, fh)
    return path


def write_grade_images(folder: Path, grades: list[str], size: tuple[int, int] = (48, 64)) -> list[Path]:
    """One PNG per grade, uniform grey at that grade's brightness (see brightness_model)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, grade in enumerate(grades):
        noise = rng.integers(-3, 4, size=size)
        pixels = np.clip(brightness_for(grade) + noise, 0, 255).astype(np.uint8)
        path = folder / f"part{i:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def write_holdout(folder: Path, grades: list[str] = GRADES * 3) -> Path:
    """A labelled dataset folder (all rows in the test split) for the validation gate."""
    paths = write_grade_images(folder / "images", grades)
    with (folder / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "defect_grade", "cell_type", "split"])
        for path, grade in zip(paths, grades, strict=True):
            w.writerow([path.relative_to(folder).as_posix(), grade,
                        "mono" if GRADES.index(grade) < 2 else "poly", "test"])
    return folder


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def line_config(tmp_path: Path, state_dir: Path):
    """Factory: write a config for a replay line over ``images`` and load it through the real loader."""

    def make(images: Path, **overrides: Any) -> AppConfig:
        model_dir = state_dir / "pkg"
        if not (model_dir / "model.json").exists():
            make_brightness_model(model_dir)
        data: dict[str, Any] = {
            "state_dir": str(state_dir),
            "line": {"line_id": "test-line", "asset_id": "station-7", "batch": "B-001"},
            "camera": {"view": "top", "source": "replay",
                       "replay": {"path": str(images), "rate_hz": 200, "loop": False}},
            "model": {"path": str(model_dir), "warmup_runs": 1},
            "disposition": DISPOSITION,
            "store": {"retention": {"pass": 1.0, "min_free_mb": 0}},
            "api": {"host": "127.0.0.1", "port": 0},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return load_config(write_yaml(tmp_path / "line.yaml", data))

    return make


def auth_headers(daemon: Any, role: str = "operator", name: str | None = None) -> dict[str, str]:
    """Create a user of ``role`` in the daemon's user store and return its bearer header."""
    name = name or f"test-{role}"
    daemon.users.set(name, role, f"{name}-password-123")
    token, _ = daemon.tokens.issue(daemon.users.identity(name))
    return {"Authorization": f"Bearer {token}"}
