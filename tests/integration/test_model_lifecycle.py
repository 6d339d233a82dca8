"""Registry, gate, hot swap, rollback and shadow mode on a running replay line, through the API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from appliance.daemon import Daemon
from appliance.registry import ModelRegistry
from tests.brightness_model import GRADES, make_brightness_model
from tests.conftest import auth_headers, write_grade_images, write_holdout


async def running_line(tmp_path: Path, line_config, state_dir: Path) -> tuple[Daemon, ModelRegistry]:
    registry = ModelRegistry(state_dir / "models")
    for name, centres in (("v1", (32, 96, 160, 224)), ("v2-worse", (32, 96, 250, 251)),
                          ("v3-same", (32, 96, 160, 224))):
        make_brightness_model(tmp_path / name, version=name, centres=centres)
        registry.register(tmp_path / name)
    registry.set_champion("v1")
    images = tmp_path / "line"
    write_grade_images(images, GRADES * 10)
    cfg = line_config(images, model={"path": None, "warmup_runs": 1},
                      # a deep queue: this test is about the handoff losing nothing, not about CPU
                      # starvation on a shared 2-core test machine (bench/swap.py measures that)
                      camera={"view": "top", "source": "replay", "queue_size": 512,
                              "replay": {"path": str(images), "rate_hz": 60, "loop": True}},
                      registry={"holdout": str(write_holdout(tmp_path / "holdout")), "gate_margin": 0.02})
    daemon = Daemon(cfg)
    await daemon.start()
    return daemon, registry


async def test_gate_swap_rollback_and_shadow(tmp_path: Path, line_config, state_dir: Path) -> None:
    daemon, _ = await running_line(tmp_path, line_config, state_dir)
    try:
        eng = auth_headers(daemon, "engineer")
        op = auth_headers(daemon, "operator")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}/api/v1",
                                     timeout=60) as api:
            await daemon.wait_for_results(20, timeout=30)
            as_operator = await api.post("/models/v3-same/promote", json={}, headers=op)
            refused = await api.post("/models/v2-worse/promote", json={}, headers=eng)
            force_by_engineer = await api.post("/models/v2-worse/promote", json={"force": True}, headers=eng)
            assert daemon.classifier is not None and daemon.classifier.version == "v1"

            shadow_on = await api.put("/models/v2-worse/shadow", headers=eng)
            await asyncio.sleep(1.5)
            agreement = (await api.get("/models/shadow", headers=op)).json()
            latest = (await api.get("/results/latest", headers=op)).json()

            before = daemon.stats.judged
            promoted = await api.post("/models/v3-same/promote", json={}, headers=eng)
            await daemon.wait_for_results(before + 30, timeout=30)
            listing = (await api.get("/models", headers=op)).json()
            rolled = await api.post("/models/rollback", headers=eng)
            await daemon.wait_for_results(daemon.stats.judged + 10, timeout=30)
            nothing_left = await api.post("/models/rollback", headers=eng)
            audit = [e["action"] for e in (await api.get("/audit", headers=eng)).json()["entries"]]
    finally:
        stats = daemon.stats
        await daemon.stop()

    assert as_operator.status_code == 403
    assert refused.status_code == 409
    reasons = refused.json()["detail"]["gate"]["reasons"]
    assert any("defect_grade" in r and "recall" in r for r in reasons), reasons
    assert force_by_engineer.status_code == 403
    assert shadow_on.status_code == 200
    assert agreement["shadow_version"] == "v2-worse"
    grade = agreement["heads"]["defect_grade"]
    assert grade["n"] > 0 and grade["per_class"]["0"]["agreement"] == 1.0
    assert grade["per_class"]["2/3"]["agreement"] == 0.0, "the worse model disagrees on grade 2/3"
    assert latest["model_version"] == "v1" and latest["shadow_predictions"] == [], "shadow never published"
    assert promoted.status_code == 200 and promoted.json()["gate"]["passed"] is True
    assert listing["champion"] == "v3-same" and listing["rollback_to"] == "v1"
    assert rolled.json() == {"serving": "v1", "rolled_back_from": "v3-same"}
    assert nothing_left.status_code == 409
    assert {"model.promote.refused", "model.shadow.start", "model.promote", "model.rollback"} <= set(audit)
    assert stats.dropped == 0, "no frame was dropped by the swaps"
    assert stats.judged == stats.frames - daemon.queue_depth, "every acquired frame was judged"

    rows = stored_versions(state_dir)
    versions = [v for _, v in rows]
    assert [s for s, _ in rows] == list(range(1, len(rows) + 1))
    # every result records the version that judged it; the switch happens between two frames
    first_v3, last_v3 = versions.index("v3-same"), len(versions) - 1 - versions[::-1].index("v3-same")
    assert set(versions[:first_v3]) == {"v1"}
    assert set(versions[first_v3:last_v3 + 1]) == {"v3-same"}
    assert set(versions[last_v3 + 1:]) == {"v1"}
    shadow_rows = shadow_predictions(state_dir)
    assert shadow_rows > 0, "shadow predictions are stored"


def stored_versions(state_dir: Path) -> list[tuple[int, str]]:
    import duckdb

    con = duckdb.connect(str(state_dir / "results.duckdb"), read_only=True)
    try:
        return con.execute("SELECT seq, model_version FROM results ORDER BY seq").fetchall()
    finally:
        con.close()


def shadow_predictions(state_dir: Path) -> int:
    import duckdb

    con = duckdb.connect(str(state_dir / "results.duckdb"), read_only=True)
    try:
        return int(con.execute("SELECT count(*) FROM predictions WHERE role = 'shadow' "
                               "AND model_version = 'v2-worse'").fetchone()[0])  # type: ignore[index]
    finally:
        con.close()


async def test_tampered_model_is_refused_and_the_champion_keeps_serving(tmp_path: Path, line_config,
                                                                          state_dir: Path) -> None:
    daemon, registry = await running_line(tmp_path, line_config, state_dir)
    try:
        onnx_file = registry.path("v3-same") / "model.onnx"
        data = bytearray(onnx_file.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped bit somewhere in the weights
        onnx_file.write_bytes(bytes(data))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}/api/v1", timeout=60,
                                     headers=auth_headers(daemon, "engineer")) as api:
            refused = await api.post("/models/v3-same/promote", json={})
        before = daemon.stats.judged
        await daemon.wait_for_results(before + 10, timeout=30)
    finally:
        await daemon.stop()
    assert refused.status_code == 422 and "sha256" in refused.text
    assert daemon.classifier is not None and daemon.classifier.version == "v1"
    assert registry.champion() == "v1"


async def test_a_restart_serves_the_promoted_model_not_model_path(tmp_path: Path, line_config, state_dir: Path) -> None:
    """model.path is where a line starts; a promotion must survive a restart (systemd restarts on
    failure and on reboot), and check-config looks at the model the daemon will serve."""
    from typer.testing import CliRunner

    from appliance.cli import app

    registry = ModelRegistry(state_dir / "models")
    for name in ("v1", "v3-same"):
        make_brightness_model(tmp_path / name, version=name)
        registry.register(tmp_path / name)
    images = tmp_path / "line"
    write_grade_images(images, GRADES)
    cfg = line_config(images, model={"path": str(registry.path("v1")), "warmup_runs": 1},
                      registry={"holdout": str(write_holdout(tmp_path / "holdout")), "gate_margin": 0.02})
    first = Daemon(cfg)
    await first.start()
    try:
        assert first.classifier is not None and first.classifier.version == "v1", "no champion yet: model.path"
        await first.promote("v3-same", "erik")
    finally:
        await first.stop()
    again = Daemon(cfg)
    await again.start()
    try:
        served = again.classifier.version if again.classifier else None
    finally:
        await again.stop()
    checked = await asyncio.to_thread(CliRunner().invoke, app, ["check-config", str(tmp_path / "line.yaml")])
    assert served == "v3-same" and registry.champion() == "v3-same"
    assert "fits model v3-same" in checked.output, checked.output


async def test_an_unknown_version_is_404_and_a_copied_folder_is_refused(tmp_path: Path, line_config,
                                                                        state_dir: Path) -> None:
    """A folder copied under another name would serve under its card's version: results, history and
    audit would disagree about which model judged the parts."""
    import shutil

    daemon, registry = await running_line(tmp_path, line_config, state_dir)
    shutil.copytree(registry.path("v3-same"), registry.path("copy-ok"))
    try:
        eng = auth_headers(daemon, "engineer")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}/api/v1", headers=eng,
                                     timeout=60) as api:
            unknown = await api.post("/models/no-such-version/promote", json={})
            copied = await api.post("/models/copy-ok/promote", json={})
            copied_shadow = await api.put("/models/copy-ok/shadow")
            listed = [m["version"] for m in (await api.get("/models")).json()["models"]]
    finally:
        await daemon.stop()
    assert unknown.status_code == 404 and "no model version 'no-such-version'" in unknown.text
    assert copied.status_code == 422 and "holds model v3-same" in copied.text, copied.text
    assert copied_shadow.status_code == 422
    assert daemon.classifier is not None and daemon.classifier.version == "v1", "the champion kept serving"
    assert sorted(listed) == ["v1", "v2-worse", "v3-same"], "a copy is not a version of its own"
