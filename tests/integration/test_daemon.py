"""The daemon end to end on a replay folder: real model, real DuckDB, real HTTP API."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from appliance import daemon as daemon_module
from appliance.daemon import Daemon
from appliance.inference import Classifier
from tests.conftest import auth_headers, write_grade_images

GRADES = ["0", "1/3", "2/3", "1", "0", "0", "1", "1/3"]
EXPECTED = {"0": "pass", "1/3": "rework", "2/3": "reject", "1": "reject"}


async def test_replay_folder_stores_every_part_with_every_field(tmp_path: Path, line_config) -> None:
    images = tmp_path / "images"
    paths = write_grade_images(images, GRADES)
    (images / "part0100.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (images / "part0101.png").write_bytes(b"")
    cfg = line_config(images)
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        await daemon.wait_for_results(len(GRADES) + 2, timeout=30)
        daemon.store.flush()
        anonymous = httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}")
        refused = await anonymous.get("/api/v1/results")
        await anonymous.aclose()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}",
                                     headers=auth_headers(daemon)) as api:
            health = (await api.get("/api/v1/health")).json()
            page = (await api.get("/api/v1/results", params={"limit": 100})).json()
            failed = (await api.get("/api/v1/results", params={"status": "failed"})).json()
            reject = (await api.get("/api/v1/results", params={"disposition": "reject"})).json()
            one = page["results"][-1]
            latest = (await api.get("/api/v1/results/latest")).json()
            latest_by_id = (await api.get(f"/api/v1/results/{latest['result_id']}")).json()
            image = await api.get(f"/api/v1/results/{one['result_id']}/image")
            bad_filter = await api.get("/api/v1/results", params={"disposition": "maybe"})
            misspelt_filter = await api.get("/api/v1/results", params={"dispositon": "hold"})
            missing = await api.get("/api/v1/results/nope")
    finally:
        await daemon.stop()

    assert refused.status_code == 401
    assert health["status"] == "running" and health["judged"] == 10 and health["failed"] == 2
    assert page["count"] == 10
    by_part = {r["part_id"]: r for r in page["results"]}
    for i, grade in enumerate(GRADES):
        r = by_part[paths[i].stem]
        assert r["disposition"] == EXPECTED[grade], r
        assert r["rule"] in {"functional", "possibly-defective", "defective"}
        assert r["status"] == "ok" and r["error"] is None
        assert {p["head"] for p in r["predictions"]} == {"defect_grade", "cell_type"}
        grade_pred = next(p for p in r["predictions"] if p["head"] == "defect_grade")
        assert grade_pred["label"] == grade and len(grade_pred["probs"]) == 4
        assert abs(sum(grade_pred["probs"]) - 1) < 1e-4
        assert r["line_id"] == "test-line" and r["asset_id"] == "station-7"
        assert r["camera_view"] == "top" and r["batch"] == "B-001"
        assert r["model_version"] == daemon.classifier.version  # type: ignore[union-attr]
        assert r["acquired_at"] <= r["decided_at"]
        for stage in ("queue_ms", "inference_ms", "decide_ms", "total_ms"):
            assert r[stage] is not None and r[stage] >= 0
        assert r["image_ref"] and r["source_ref"].endswith(".png")
    assert sorted(r["seq"] for r in page["results"]) == list(range(1, 11))
    newest = next(r for r in page["results"] if r["seq"] == 10)
    assert latest == latest_by_id == newest, "one result, one shape: from memory, by id and in a page"
    assert {r["part_id"] for r in failed["results"]} == {"part0100", "part0101"}
    for r in failed["results"]:
        assert r["disposition"] == "hold" and r["rule"] == "image_error" and r["review"] == "hold"
        assert r["error"] and r["predictions"] == []
    assert {r["part_id"] for r in reject["results"]} == {"part0002", "part0003", "part0006"}
    assert image.status_code == 200 and image.content == paths[0].read_bytes()
    assert bad_filter.status_code == 422
    assert misspelt_filter.status_code == 422, "a misspelt filter must not return every result"
    assert "dispositon" in misspelt_filter.json()["detail"] and "disposition" in misspelt_filter.json()["detail"]
    assert missing.status_code == 404


async def test_bad_model_refuses_to_start_with_clear_message(tmp_path: Path, line_config, state_dir) -> None:
    from appliance.errors import ModelRejected

    cfg = line_config(tmp_path)
    onnx_file = state_dir / "pkg" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ModelRejected, match=r"sha256 .* does not match"):
        await Daemon(cfg).start()


def _start(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_judged(port_file: Path, proc: subprocess.Popen[bytes], at_least: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            health = httpx.get(f"http://127.0.0.1:{port_file.read_text()}/api/v1/health", timeout=2).json()
            if health["judged"] >= at_least:
                return int(health["judged"])
        except (httpx.HTTPError, OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError("the daemon did not judge enough parts in time")


def _stored(db: Path) -> list[tuple[int, str]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT seq, result_id FROM results ORDER BY seq").fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stop_mid_run_loses_no_result(tmp_path: Path, line_config, state_dir, how: str) -> None:
    from tests.conftest import free_port, write_yaml

    images = tmp_path / "images"
    write_grade_images(images, GRADES * 4)
    port = free_port()
    cfg = line_config(images, api={"port": port},
                      camera={"view": "top", "source": "replay",
                              "replay": {"path": str(images), "rate_hz": 100, "loop": True}})
    config_file = write_yaml(tmp_path / "run.yaml", cfg.model_dump(mode="json", by_alias=True))
    port_file = tmp_path / "port"
    port_file.write_text(str(port))
    proc = _start(config_file)
    try:
        seen = _wait_judged(port_file, proc, 40)
        proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read().decode() if proc.stdout else ""
    if how == "SIGTERM":
        assert code == 0, output
        stopped = re.search(r"line stopped: (\d+) frames, (\d+) judged \(.*\), 0 dropped, 0 failed, 0 not stored; "
                            r"decided p50 [\d.]+ ms, p99 [\d.]+ ms; stored p50", output)
        assert stopped and int(stopped[2]) >= seen, output
        assert not list((state_dir / "journal").glob("*.jsonl")), "clean stop: everything ingested"
    else:
        assert code == -signal.SIGKILL
        restarted = _start(config_file)  # recovery happens on start
        try:
            _wait_judged(port_file, restarted, 1)
            restarted.send_signal(signal.SIGTERM)
            assert restarted.wait(timeout=30) == 0
        finally:
            if restarted.poll() is None:
                restarted.kill()
    rows = _stored(state_dir / "results.duckdb")
    seqs = [seq for seq, _ in rows]
    assert len(rows) >= seen, f"{seen} results were reported, {len(rows)} stored"
    assert seqs == list(range(1, len(rows) + 1)), "no gap and no duplicate in the sequence"
    assert len({rid for _, rid in rows}) == len(rows)
    assert os.path.exists(state_dir / "results.duckdb")


async def test_triggered_parts_carry_plc_data_into_the_store(tmp_path: Path, line_config) -> None:
    from appliance.daemon import LineHalted

    images = tmp_path / "images"
    write_grade_images(images, GRADES)
    cfg = line_config(images, camera={"view": "top", "source": "replay",
                                      "replay": {"path": str(images), "triggered": True}})
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        first = await daemon.trigger(part_id="SN-1001", batch="LOT-42", process_values={"temp_c": 71.5})
        result = await asyncio.wait_for(first, 10)
        second = await asyncio.wait_for(await daemon.trigger(part_id="SN-1002"), 10)
        await asyncio.sleep(0.3)
        assert daemon.stats.judged == 2, "no frame without a trigger"
        await daemon.halt("api", "test-engineer")
        assert daemon.state == "halted"
        with pytest.raises(LineHalted):
            await daemon.trigger(part_id="SN-1003")
        await daemon.reset("api", "test-engineer")
        await daemon.set_continuous(True)
        await daemon.wait_for_results(5, timeout=10)
        daemon.store.flush()
        stored = daemon.store.get(result.result_id)
    finally:
        await daemon.stop()
    assert (result.part_id, result.batch, result.process_values) == ("SN-1001", "LOT-42", {"temp_c": 71.5})
    assert (second.part_id, second.batch, second.process_values) == ("SN-1002", "LOT-42", {})
    assert stored is not None
    assert (stored["part_id"], stored["batch"], stored["process_values"]) == ("SN-1001", "LOT-42",
                                                                               {"temp_c": 71.5})


async def test_results_are_stored_and_published_in_camera_order_though_commits_overlap(
        tmp_path: Path, line_config) -> None:
    """A part's commit runs beside the next part's inference; a slow, uneven publisher must
    still see every part once, in the order the camera took them, with rising sequence numbers."""
    images = tmp_path / "images"
    paths = write_grade_images(images, GRADES * 5)
    daemon = Daemon(line_config(images, camera={"queue_size": 64}))  # no frame may be dropped
    published: list[tuple[int, str]] = []
    delays = iter([0.004, 0.0, 0.012, 0.001, 0.0, 0.008] * 10)

    async def uneven_publisher(result) -> None:
        await asyncio.sleep(next(delays))
        published.append((result.seq, result.part_id))

    daemon.publishers.append(uneven_publisher)
    await daemon.start()
    try:
        await daemon.wait_for_results(len(paths), timeout=30)
    finally:
        await daemon.stop()
    assert [part for _, part in published] == [p.stem for p in paths]
    assert [seq for seq, _ in published] == list(range(1, len(paths) + 1))


async def test_parallel_inference_still_stores_and_publishes_in_camera_order(
        tmp_path: Path, line_config, monkeypatch) -> None:
    """Two frames are classified at once and a slow one is overtaken by the next; the PLC must
    still see the parts in the order the camera took them, each once, with rising seq."""
    running, most, calls = 0, 0, 0
    lock = threading.Lock()

    class UnevenClassifier(Classifier):
        def classify(self, image):  # every third frame is slow, so its successor finishes first
            nonlocal running, most, calls
            with lock:
                running, calls = running + 1, calls + 1
                most, slow = max(most, running), calls % 3 == 1
            try:
                time.sleep(0.03 if slow else 0.0)
                return super().classify(image)
            finally:
                with lock:
                    running -= 1

    monkeypatch.setattr(daemon_module, "Classifier", UnevenClassifier)
    images = tmp_path / "images"
    paths = write_grade_images(images, GRADES * 3)
    daemon = Daemon(line_config(images, camera={"queue_size": 64},
                                model={"inference_workers": 2, "intra_op_threads": 1}))
    published: list[tuple[int, str]] = []

    async def publisher(result) -> None:
        published.append((result.seq, result.part_id))

    daemon.publishers.append(publisher)
    await daemon.start()
    try:
        await daemon.wait_for_results(len(paths), timeout=30)
    finally:
        await daemon.stop()
    assert most == 2  # the two workers did overlap
    assert [part for _, part in published] == [p.stem for p in paths]
    assert [seq for seq, _ in published] == list(range(1, len(paths) + 1))


async def test_cli_lists_results_through_the_api_and_says_how_to_log_in(tmp_path: Path, line_config) -> None:
    from typer.testing import CliRunner

    from appliance.cli import app

    images = tmp_path / "images"
    write_grade_images(images, GRADES)
    daemon = Daemon(line_config(images))
    await daemon.start()
    try:
        await daemon.wait_for_results(len(GRADES), timeout=30)
        daemon.store.flush()
        auth_headers(daemon, "operator", "olga")
        url = f"http://127.0.0.1:{daemon.api_port}"

        def cli(*args: str) -> Any:  # a thread: the daemon's loop must go on serving the API meanwhile
            return CliRunner().invoke(app, ["results", "--api", url, *args],
                                      env={"APPLIANCE_PASSWORD": "olga-password-123", "APPLIANCE_API_TOKEN": ""})

        anonymous = await asyncio.to_thread(cli)
        rejects = await asyncio.to_thread(cli, "--user", "olga", "--disposition", "reject")
        bad_value = await asyncio.to_thread(cli, "--user", "olga", "--disposition", "maybe")
    finally:
        await daemon.stop()

    assert anonymous.exit_code == 2 and "not logged in: pass --user NAME" in anonymous.output
    assert rejects.exit_code == 0, rejects.output
    assert sorted(line.split()[2] for line in rejects.output.splitlines()) == ["part0002", "part0003", "part0006"]
    assert bad_value.exit_code == 2 and "disposition: Input should be" in bad_value.output, bad_value.output
