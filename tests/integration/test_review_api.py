"""Review loop through the real HTTP API: roles, labels with who and when, two-person rule, audit."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from appliance.daemon import Daemon
from tests.conftest import DISPOSITION, auth_headers

# mean brightness → (grade, confidence) with the brightness model: 64, 128 and 192 sit between two
# grade centres, so those parts are held; 32 and 224 are confident.
BRIGHTNESS = [32, 64, 128, 224, 192, 64, 32]


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, value in enumerate(BRIGHTNESS):
        Image.fromarray(np.full((40, 40), value, np.uint8)).save(folder / f"p{i}.png")


async def start(tmp_path: Path, line_config, **overrides) -> Daemon:
    write_images(tmp_path / "img")
    daemon = Daemon(line_config(tmp_path / "img", **overrides))
    await daemon.start()
    await daemon.wait_for_results(len(BRIGHTNESS), timeout=30)
    daemon.store.flush()
    return daemon


def client(daemon: Daemon, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}/api/v1", headers=headers or {})


async def test_login_roles_and_user_admin(tmp_path: Path, line_config) -> None:
    daemon = await start(tmp_path, line_config)
    try:
        daemon.users.set("ana", "operator", "correct horse battery")
        async with client(daemon) as api:
            wrong = await api.post("/auth/token", json={"username": "ana", "password": "nope-nope-nope"})
            ok = await api.post("/auth/token", json={"username": "ana", "password": "correct horse battery"})
            token = {"Authorization": f"Bearer {ok.json()['access_token']}"}
            me = await api.get("/auth/me", headers=token)
            forged = await api.get("/auth/me", headers={"Authorization": "Bearer abc.def.ghi"})
            operator_users = await api.get("/users", headers=token)
            admin = auth_headers(daemon, "admin")
            created = await api.put("/users/bo", json={"role": "engineer", "password": "0123456789ab"},
                                    headers=admin)
            short = await api.put("/users/cy", json={"role": "engineer", "password": "short"}, headers=admin)
            removed = await api.delete("/users/ana", headers=admin)
            after_removal = await api.get("/auth/me", headers=token)
            audit = await api.get("/audit", headers=admin)
    finally:
        await daemon.stop()
    assert wrong.status_code == 401
    assert ok.status_code == 200 and ok.json()["role"] == "operator"
    assert me.json() == {"user": "ana", "role": "operator"}
    assert forged.status_code == 401
    assert operator_users.status_code == 403
    assert created.status_code == 200 and short.status_code == 422
    assert removed.status_code == 200
    assert after_removal.status_code == 401, "a removed user's token stops working at once"
    actions = [(e["action"], e["target"], e["user"]) for e in audit.json()["entries"]]
    assert ("user.set", "bo", "test-admin") in actions and ("user.remove", "ana", "test-admin") in actions


async def test_operator_labels_held_parts_from_the_ranked_queue(tmp_path: Path, line_config) -> None:
    daemon = await start(tmp_path, line_config)
    try:
        operator = auth_headers(daemon, "operator", "olga")
        async with client(daemon, operator) as api:
            queue = (await api.get("/review/queue")).json()
            first = queue["results"][0]
            bad_class = await api.post(f"/results/{first['result_id']}/labels",
                                       json={"labels": {"defect_grade": "9"}})
            bad_head = await api.post(f"/results/{first['result_id']}/labels",
                                      json={"labels": {"colour": "red"}})
            labelled = await api.post(f"/results/{first['result_id']}/labels",
                                      json={"labels": {"defect_grade": "1/3"}, "comment": "faint crack"})
            after = (await api.get("/review/queue")).json()
            stored = (await api.get("/labels", params={"result_id": first["result_id"]})).json()
            operator_audit = await api.get("/audit")
        async with client(daemon, auth_headers(daemon, "engineer")) as api:
            audit = (await api.get("/audit")).json()["entries"]
    finally:
        await daemon.stop()
    held = {r["result_id"] for r in queue["results"] if r["review"] == "hold"}
    assert queue["waiting"] == queue["ranked_from"] == 4 and len(held) == 4, "the four mid-grey parts are held"
    assert all(r["review"] == "hold" for r in queue["results"][:4])
    assert all("priority" in r for r in queue["results"])
    assert bad_class.status_code == 422 and "has no class '9'" in bad_class.text
    assert bad_head.status_code == 422
    assert labelled.status_code == 200 and labelled.json()["verified"] is True
    assert first["result_id"] not in {r["result_id"] for r in after["results"]}
    assert after["waiting"] == 3
    (label,) = stored["labels"]
    assert (label["head"], label["label"], label["labelled_by"], label["verified_by"]) == (
        "defect_grade", "1/3", "olga", "olga")
    assert label["labelled_at"] is not None and label["comment"] == "faint crack"
    assert operator_audit.status_code == 403
    assert audit[0]["action"] == "label" and audit[0]["user"] == "olga"
    assert audit[0]["detail"]["labels"] == {"defect_grade": "1/3"}


async def test_two_person_rule(tmp_path: Path, line_config) -> None:
    daemon = await start(tmp_path, line_config, review={"two_person": True})
    try:
        first, second = auth_headers(daemon, "operator", "first"), auth_headers(daemon, "operator", "second")
        async with client(daemon) as api:
            queue = (await api.get("/review/queue", headers=first)).json()
            rid = queue["results"][0]["result_id"]
            posted = (await api.post(f"/results/{rid}/labels", json={"labels": {"defect_grade": "0"}},
                                     headers=first)).json()
            label_id = posted["label_ids"][0]
            unverified = (await api.get("/labels", params={"verified": False}, headers=first)).json()
            self_verify = await api.post(f"/labels/{label_id}/verify", headers=first)
            verified = await api.post(f"/labels/{label_id}/verify", headers=second)
            again = await api.post(f"/labels/{label_id}/verify", headers=second)
    finally:
        await daemon.stop()
    assert posted["verified"] is False
    assert [lbl["label_id"] for lbl in unverified["labels"]] == [label_id]
    assert self_verify.status_code == 403
    assert verified.status_code == 200 and verified.json()["verified_by"] == "second"
    assert again.status_code == 409


async def test_holds_and_audit_samples_waiting_are_counted_apart(tmp_path: Path, line_config,
                                                                 monkeypatch) -> None:
    """The queue counts both; health, metrics and the Live page tell held parts from audit samples."""
    import asyncio

    import appliance.daemon

    monkeypatch.setattr(appliance.daemon, "HOLDS_REFRESH_S", 0.1)
    disposition = {**DISPOSITION, "audit_rate": 1.0}  # every confident pass is sampled for audit
    no_passes_kept = {"retention": {"pass": 0.0, "min_free_mb": 0}}
    daemon = await start(tmp_path, line_config, disposition=disposition, store=no_passes_kept)
    try:
        async with client(daemon, auth_headers(daemon, "operator")) as api:
            queue = (await api.get("/review/queue")).json()
            held = next(r for r in queue["results"] if r["review"] == "hold")
            await api.post(f"/results/{held['result_id']}/labels", json={"labels": {"defect_grade": "0"}})
            for _ in range(100):  # the daemon refreshes these gauges in its supervision loop (~1 s)
                health = (await api.get("/health")).json()
                if (health["holds_waiting"], health["audits_waiting"]) == (3, 2):
                    break
                await asyncio.sleep(0.1)
            metrics = (await api.get("/metrics")).text
            live = (await api.get("/analytics/live")).json()
    finally:
        await daemon.stop()
    assert queue["waiting"] == 6, "four held parts and two audit samples (the two dark passes)"
    assert all(r["image_ref"] for r in queue["results"]), "a part to review keeps its image, audit passes too"
    assert (health["holds_waiting"], health["audits_waiting"]) == (3, 2)
    assert "appliance_holds_waiting 3.0" in metrics and "appliance_audits_waiting 2.0" in metrics
    assert (live["holds_waiting"], live["audits_waiting"]) == (3, 2)
