"""The retraining service protocol: queued → claimed → trained | failed, reported in progress.json."""

import json
from pathlib import Path

import pytest

from appliance.retrain import QUEUED, read_progress, serve_jobs, write_progress

pytest.importorskip("torch")


def test_service_claims_a_queued_job_and_reports_failure(tmp_path: Path) -> None:
    job = tmp_path / "20261124-000000"
    job.mkdir()
    (job / "job.json").write_text(json.dumps({"parent_version": None, "recipe": {"epochs": -1}}))
    write_progress(job, phase=QUEUED, progress=0.0, message="queued")
    other = tmp_path / "20261124-000001"
    other.mkdir()
    (other / "job.json").write_text("{}")
    write_progress(other, phase="trained", progress=1.0, message="already done")

    rounds: list[str] = []

    def stop() -> bool:  # one round over the queue, then stop
        rounds.append(read_progress(job).get("phase", ""))
        return len(rounds) > 1

    serve_jobs(tmp_path, stop)
    state = read_progress(job)
    assert state["phase"] == "failed"
    assert "epochs" in state["message"], "the reason reaches the daemon"
    assert read_progress(other)["phase"] == "trained", "finished jobs are left alone"


def test_training_set_from_a_dataset_whose_images_are_a_symlink(tmp_path: Path) -> None:
    """ELPV's images folder is a symlink into site-packages; the set must still be built."""
    from appliance.retrain import build_training_set
    from tests.conftest import write_grade_images

    elsewhere = tmp_path / "site-packages" / "images"
    write_grade_images(elsewhere, ["0", "1"])
    base = tmp_path / "dataset"
    base.mkdir()
    (base / "images").symlink_to(elsewhere, target_is_directory=True)
    (base / "labels.csv").write_text("image,defect_grade,split\nimages/part0000.png,0,train\n"
                                     "images/part0001.png,1,test\n")
    archive = tmp_path / "archive"
    write_grade_images(archive / "2026/11/24", ["1"])
    labels = [{"result_id": "r1", "head": "defect_grade", "label": "1"}]
    counts = build_training_set(tmp_path / "job", base, labels, archive, {"r1": "2026/11/24/part0000.png"})
    rows = (tmp_path / "job" / "dataset" / "labels.csv").read_text().splitlines()
    assert counts == {"base_rows": 2, "verified_parts": 1, "skipped_no_image": 0, "skipped_in_holdout": 0}
    assert rows[1:] == ["base/images/part0000.png,0,train", "base/images/part0001.png,1,test",
                        "archive/2026/11/24/part0000.png,1,train"]


def test_a_labelled_part_whose_image_is_in_the_gate_holdout_does_not_train(tmp_path: Path) -> None:
    """The demo line replays the holdout: a label on one of those images must not train the candidate
    the gate then judges on the same image (it would pass the gate on memorised parts)."""
    import shutil

    from appliance.retrain import build_training_set
    from tests.conftest import write_grade_images

    base = tmp_path / "dataset"
    write_grade_images(base / "images", ["0", "1", "2/3"])
    (base / "labels.csv").write_text("image,defect_grade,split\nimages/part0000.png,0,train\n"
                                     "images/part0001.png,1,test\nimages/part0002.png,2/3,test\n")
    archive = tmp_path / "archive"
    (archive / "day").mkdir(parents=True)
    shutil.copy(base / "images" / "part0002.png", archive / "day" / "replayed.png")  # a holdout image
    write_grade_images(archive / "new", ["1"])  # a part the holdout does not have
    labels = [{"result_id": "r1", "head": "defect_grade", "label": "2/3"},
              {"result_id": "r2", "head": "defect_grade", "label": "1"}]
    refs = {"r1": "day/replayed.png", "r2": "new/part0000.png"}
    counts = build_training_set(tmp_path / "job", base, labels, archive, refs, holdout=base)
    rows = (tmp_path / "job" / "dataset" / "labels.csv").read_text().splitlines()
    assert counts == {"base_rows": 3, "verified_parts": 1, "skipped_no_image": 0, "skipped_in_holdout": 1}
    assert [r for r in rows if r.startswith("archive/")] == ["archive/new/part0000.png,1,train"]
