"""A taxonomy with severity graded within each defect type, from `appliance train` to a running
line: the daemon judges it with the ordinary model contract (one ``severity_probs`` output), and the
disposition table decides on (type, severity) as for any other model."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from appliance.cli import app
from appliance.daemon import Daemon
from appliance.imageio import read_image
from appliance.inference import Classifier
from appliance.model_package import read_card
from tests.conftest import auth_headers
from tests.graded_severity import make_dataset

RECIPE = {"image_size": 64, "frozen_blocks": 12, "epochs": 8, "patience": 8, "min_steps": 1, "batch_size": 16,
          "lr": 3e-3, "val_fraction": 0.2, "flip_horizontal": True, "flip_vertical": False}
RULES = [
    {"name": "good", "when": {"defect_type": ["ok"]}, "disposition": "pass"},
    {"name": "minor-defect", "when": {"severity": ["none", "minor"]}, "disposition": "rework"},
    {"name": "major-defect", "when": {"severity": ["major"]}, "disposition": "reject"},
]


@pytest.mark.slow
async def test_a_severity_within_type_model_runs_on_the_line(tmp_path: Path, line_config) -> None:
    data = make_dataset(tmp_path / "data", per_cell=16)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(RECIPE))  # JSON is YAML
    package = tmp_path / "model"
    trained = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(package),
                                       "--recipe", str(recipe)])
    assert trained.exit_code == 0, trained.output
    assert read_card(package).head("severity").within == "defect_type"

    tests = [line.split(",") for line in (data / "labels.csv").read_text().splitlines()[1:]]
    truth = {Path(r[0]).stem: (r[1], r[2]) for r in tests if r[3] == "test"}
    cfg = line_config(data, camera={"view": "top", "source": "replay",
                                    "replay": {"path": str(data), "split": "test", "rate_hz": 200, "loop": False}},
                      model={"path": str(package), "warmup_runs": 1},
                      disposition={"rules": RULES, "min_confidence": 0.0, "heads": None})
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        await daemon.wait_for_results(len(truth), timeout=60)
        daemon.store.flush()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}",
                                     headers=auth_headers(daemon)) as api:
            page = (await api.get("/api/v1/results", params={"limit": 100})).json()
    finally:
        await daemon.stop()

    offline = Classifier(package)
    assert page["count"] == len(truth)
    right = 0
    for r in page["results"]:
        assert r["status"] == "ok", r
        pred = {p["head"]: p for p in r["predictions"]}
        assert set(pred) == {"defect_type", "severity"}
        probs = np.array(pred["severity"]["probs"])
        assert probs.shape == (3,) and abs(probs.sum() - 1) < 1e-4
        # the line's answer is the package's answer, computed the same way offline
        expected = offline.classify(read_image(data / "img" / f"{r['part_id']}.png"))
        np.testing.assert_allclose(probs, expected["severity"].probs, atol=1e-5)
        kind, severity = pred["defect_type"]["label"], pred["severity"]["label"]
        rule = "good" if kind == "ok" else "major-defect" if severity == "major" else "minor-defect"
        assert r["rule"] == rule, r
        right += (kind, severity) == truth[r["part_id"]]
    assert right >= 0.8 * len(truth), f"{right} of {len(truth)} parts judged right on both heads"
