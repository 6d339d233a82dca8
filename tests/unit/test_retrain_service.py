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
