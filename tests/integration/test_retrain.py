"""Retraining through the API: verified labels join the training set, a low-priority worker trains,
the candidate is registered and gated; progress is visible throughout."""

from __future__ import annotations

import asyncio
import csv
import os
from pathlib import Path

import httpx
import pytest

from appliance.daemon import Daemon
from tests.brightness_model import GRADES
from tests.conftest import auth_headers, write_grade_images, write_yaml
from tests.integration.test_review_api import BRIGHTNESS, write_images

pytestmark = pytest.mark.slow


def base_dataset(folder: Path) -> Path:
    grades = GRADES * 8
    paths = write_grade_images(folder / "images", grades, size=(48, 48))
    with (folder / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "defect_grade", "cell_type", "split"])
        for i, (path, grade) in enumerate(zip(paths, grades, strict=True)):
            w.writerow([path.relative_to(folder).as_posix(), grade,
                        "mono" if GRADES.index(grade) < 2 else "poly", "test" if i % 4 == 0 else "train"])
    (folder / "dataset.yaml").write_text(
        "heads:\n- name: defect_grade\n  classes: ['0', '1/3', '2/3', '1']\n  ordinal: true\n"
        "- name: cell_type\n  classes: [mono, poly]\n")
    return folder


async def test_retrain_includes_verified_labels(tmp_path: Path, line_config) -> None:
    write_images(tmp_path / "img")
    base = base_dataset(tmp_path / "base")
    recipe = write_yaml(tmp_path / "recipe.yaml", {"image_size": 64, "frozen_blocks": 14, "epochs": 2, "min_steps": 1,
                                                   "patience": 2, "batch_size": 16, "val_fraction": 0.2})
    daemon = Daemon(line_config(tmp_path / "img", review={"two_person": True},
                                registry={"base_dataset": str(base), "holdout": str(base),
                                          "retrain_recipe": str(recipe)}))
    await daemon.start()
    try:
        await daemon.wait_for_results(len(BRIGHTNESS), timeout=30)
        daemon.store.flush()
        op, eng = auth_headers(daemon, "operator"), auth_headers(daemon, "engineer")
        second = auth_headers(daemon, "operator", "second-operator")
        base_url = f"http://127.0.0.1:{daemon.api_port}/api/v1"
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as api:
            queue = (await api.get("/review/queue", headers=op)).json()["results"]
            verified_id, unverified_id = queue[0]["result_id"], queue[1]["result_id"]
            posted = await api.post(f"/results/{verified_id}/labels", json={"labels": {"defect_grade": "1"}},
                                    headers=op)
            await api.post(f"/labels/{posted.json()['label_ids'][0]}/verify", headers=second)
            # this one never gets its second person, so it must stay out of training
            await api.post(f"/results/{unverified_id}/labels", json={"labels": {"defect_grade": "0"}},
                           headers=op)
            refused = await api.post("/retrain", headers=op)
            started = await api.post("/retrain", headers=eng)
            again = await api.post("/retrain", headers=eng)
            job = daemon.retrainer.job
            assert job is not None and job.process is not None
            nice = os.getpriority(os.PRIO_PROCESS, job.process.pid) - os.getpriority(os.PRIO_PROCESS, 0)
            seen_running = []
            for _ in range(600):
                status = (await api.get("/retrain", headers=op)).json()
                seen_running.append(status["state"] == "running" and 0 <= status["progress"] <= 1)
                if status["state"] != "running":
                    break
                await asyncio.sleep(0.5)
            models = (await api.get("/models", headers=op)).json()
    finally:
        await daemon.stop()
    assert refused.status_code == 403
    assert started.status_code == 200 and started.json()["training_set"]["verified_parts"] == 1
    assert again.status_code == 409
    assert nice == 10, "the worker trains at a lower CPU priority than the line"
    assert any(seen_running)
    assert status["state"] == "done", status
    assert status["candidate_version"] in {m["version"] for m in models["models"]}
    assert status["gate"] is not None and "passed" in status["gate"]
    assert models["champion"] != status["candidate_version"], "promotion stays a person's decision"
    rows = list(csv.DictReader((job.folder / "dataset" / "labels.csv").open()))
    archived = [r for r in rows if r["image"].startswith("archive/")]
    assert len(archived) == 1 and archived[0]["defect_grade"] == "1" and archived[0]["split"] == "train"
    assert len(rows) == len(GRADES) * 8 + 1
