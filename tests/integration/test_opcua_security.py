"""OPC UA attacks from the security review, against a real server (asyncua as the attacker's client).

One daemon runs for the module (secured endpoints only, an operator and a reader).  Two client
certificates are trusted (a PLC's and an HMI's); a third (mallory's) is not.  Each attack runs
with the operator's password, as an insider who knows it would:

* the channel is secured with mallory's untrusted certificate and CreateSession carries no client
  certificate, or the PLC's (public) one — asyncua 2.1.0 checked only the certificate in
  CreateSession, and only when one was sent, so both activated a session that could write PartId;
* the channel is secured with a trusted certificate but CreateSession omits it or names the other
  trusted client.

The legitimate PLC then writes its inputs; text outside the safe character set, and bad
GetResultListFiltered arguments, get proper Bad status codes; sessions, refusals and input writes
reach the audit table.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from appliance.config import load_config
from appliance.daemon import Daemon
from bench.attacker import HOST, INPUTS, Identity, make_identity, secure_client, status_of, write_part_id
from tests.brightness_model import make_brightness_model
from tests.conftest import DISPOSITION, free_port, write_grade_images, write_yaml

OPERATOR, PASSWORD = "plc-operator", "op-secret-1"
GRADES = ["0", "2/3", "1/3", "1"]
RM = "VisionSystem.ResultManagement"


async def _attack(port: int, server_cert: Path, channel: Identity, **tamper: Any) -> str:
    return await write_part_id(port, server_cert, channel, OPERATOR, PASSWORD, **tamper)


async def _client(port: int, channel: Identity, server_cert: Path) -> Client:
    return await secure_client(port, channel, server_cert, OPERATOR, PASSWORD)


async def _legitimate(port: int, plc: Identity, server_cert: Path, daemon: Daemon) -> dict[str, Any]:
    """What the trusted PLC can do, and what it gets for text and arguments the server refuses."""
    out: dict[str, Any] = {}
    async with await _client(port, plc, server_cert) as client:
        app = (await client.get_namespace_array()).index("urn:defect-appliance:opcua")
        part_id, batch, trigger = (client.get_node(ua.NodeId(f"{INPUTS}.{name}", app))
                                   for name in ("PartId", "Batch", "Trigger"))
        await batch.write_value(ua.Variant("LOT-7", ua.VariantType.String))
        await part_id.write_value(ua.Variant("SN-0001", ua.VariantType.String))
        out["part_id"], out["batch"] = daemon.context.part_id, daemon.context.batch
        out["script_part_id"] = await status_of(part_id.write_value(
            ua.Variant("<script>alert(document.cookie)</script>", ua.VariantType.String)))
        out["iframe_batch"] = await status_of(batch.write_value(
            ua.Variant('<iframe srcdoc="x">', ua.VariantType.String)))
        out["formula_part_id"] = await status_of(part_id.write_value(
            ua.Variant("=HYPERLINK(1)", ua.VariantType.String)))
        out["after_refusals"] = daemon.context.part_id, daemon.context.batch
        auto_path = "VisionSystem.VisionStateMachine.AutomaticModeStateMachine"
        auto = client.get_node(ua.NodeId(auto_path, app))
        null = [ua.Variant()] * 4 + [ua.Variant([], ua.VariantType.Variant)]
        out["script_job"] = await status_of(auto.call_method(
            ua.NodeId(f"{auto_path}.StartSingleJob", app), ua.Variant(), ua.Variant("<b>x</b>", ua.VariantType.String),
            *null[2:]))
        await trigger.write_value(ua.Variant(True, ua.VariantType.Boolean))
        await daemon.wait_for_results(1, timeout=10)
        out["stored_part_id"] = daemon.latest.part_id if daemon.latest else None
        out["trigger_mode"] = [await status_of(auto.call_method(ua.NodeId(f"{auto_path}.{name}", app), *args))
                               for name, args in (("StartContinuous", null), ("Stop", []))]

        rm = client.get_node(ua.NodeId(RM, app))
        method = ua.NodeId(f"{RM}.GetResultListFiltered", app)

        def query(max_results: ua.Variant, start_index: ua.Variant) -> Any:
            text = [ua.Variant("", ua.VariantType.String)] * 8
            return rm.call_method(method, ua.Variant(0, ua.VariantType.Int32), *text, max_results, start_index,
                                  ua.Variant(0, ua.VariantType.Int32))

        u32, i32 = ua.VariantType.UInt32, ua.VariantType.Int32
        out["query_ok"] = await status_of(query(ua.Variant(10, u32), ua.Variant(0, u32)))
        out["query_bad"] = {
            "startIndex=-1": await status_of(query(ua.Variant(10, u32), ua.Variant(-1, i32))),
            "maxResults=-5": await status_of(query(ua.Variant(-5, i32), ua.Variant(0, u32))),
            "maxResults=2**40": await status_of(query(ua.Variant(2 ** 40, ua.VariantType.Int64), ua.Variant(0, u32))),
            "startIndex='3'": await status_of(query(ua.Variant(10, u32), ua.Variant("3", ua.VariantType.String))),
            "maxResults=1.5": await status_of(query(ua.Variant(1.5, ua.VariantType.Double), ua.Variant(0, u32))),
            "maxResults=true": await status_of(query(ua.Variant(True, ua.VariantType.Boolean), ua.Variant(0, u32))),
        }
    return out


async def _scenario(root: Path) -> dict[str, Any]:
    state, images = root / "state", root / "images"
    state.mkdir()
    write_grade_images(images, GRADES)
    make_brightness_model(state / "pkg")
    port = free_port()
    config = load_config(write_yaml(root / "line.yaml", {
        "state_dir": str(state),
        "line": {"line_id": "sec-line", "asset_id": "station-1", "batch": "B-START"},
        "camera": {"view": "top", "source": "replay", "replay": {"path": str(images), "triggered": True, "loop": True}},
        "model": {"path": str(state / "pkg"), "warmup_runs": 1},
        "disposition": DISPOSITION,
        "store": {"retention": {"pass": 1.0, "min_free_mb": 0}},
        "api": {"host": HOST, "port": 0},
        "opcua": {"enabled": True, "host": HOST, "port": port, "users": [
            {"name": OPERATOR, "role": "operator", "password_env": "TEST_OPCUA_SEC_PW"}]},
    }))
    plc, hmi, mallory = (make_identity(root / "clients", name) for name in ("plc", "hmi", "mallory"))
    plc_old = make_identity(root / "clients", "plc-old", plc.uri)  # the PLC's previous certificate, still trusted
    trusted = state / "pki" / "trusted"
    trusted.mkdir(parents=True)
    for ident in (plc, plc_old, hmi):
        shutil.copy(ident.cert, trusted / ident.cert.name)
    daemon = Daemon(config)
    await daemon.start()
    server_cert = state / "pki" / "own" / "cert.der"
    try:
        report: dict[str, Any] = {"attacks": {
            "untrusted channel, no session certificate":
                await _attack(port, server_cert, mallory, session_cert=None),
            "untrusted channel, the PLC's certificate in CreateSession":
                await _attack(port, server_cert, mallory, session_cert=plc.der, app_uri=plc.uri),
            "trusted channel, no session certificate": await _attack(port, server_cert, plc, session_cert=None),
            "trusted channel, the same application's other trusted certificate in CreateSession":
                await _attack(port, server_cert, plc, session_cert=plc_old.der),
            "trusted channel, another trusted client's certificate in CreateSession":
                await _attack(port, server_cert, plc, session_cert=hmi.der, app_uri=hmi.uri),
        }}
        report["part_id_after_attacks"] = daemon.context.part_id
        report["rejected"] = sorted(p.name for p in (state / "pki" / "rejected").iterdir())
        report["legitimate"] = await _legitimate(port, plc, server_cert, daemon)
        daemon.audit_trail.flush()
        report["audit"] = await asyncio.to_thread(daemon.store.audit_log)
        report["refused_metric"] = {
            (s.labels["protocol"], s.labels["input"]): s.value for m in daemon.metrics.registry.collect()
            if m.name == "appliance_plc_inputs_refused" for s in m.samples if s.name.endswith("_total")}
    finally:
        await daemon.stop()
    return report


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEST_OPCUA_SEC_PW", PASSWORD)
        return asyncio.run(_scenario(tmp_path_factory.mktemp("opcua-security")))


def test_a_session_certificate_that_is_not_the_channels_is_refused(run: dict[str, Any]) -> None:
    assert run["attacks"] == {
        "untrusted channel, no session certificate": "BadCertificateUntrusted",
        "untrusted channel, the PLC's certificate in CreateSession": "BadCertificateUntrusted",
        "trusted channel, no session certificate": "BadSecurityChecksFailed",
        "trusted channel, the same application's other trusted certificate in CreateSession":
            "BadSecurityChecksFailed",
        # the channel's certificate is checked against the application CreateSession names
        "trusted channel, another trusted client's certificate in CreateSession": "BadCertificateUriInvalid",
    }
    assert run["part_id_after_attacks"] is None  # nothing written
    assert [name for name in run["rejected"] if "mallory" in name], run["rejected"]  # for an admin to trust


def test_the_trusted_plc_still_writes_its_inputs(run: dict[str, Any]) -> None:
    legit = run["legitimate"]
    assert (legit["part_id"], legit["batch"]) == ("SN-0001", "LOT-7")
    assert legit["stored_part_id"] == "SN-0001"
    assert legit["trigger_mode"] == ["Good", "Good"]


def test_part_text_outside_the_safe_set_is_refused_and_counted(run: dict[str, Any]) -> None:
    legit = run["legitimate"]
    assert (legit["script_part_id"], legit["iframe_batch"], legit["formula_part_id"], legit["script_job"]) == (
        "BadOutOfRange",) * 4
    assert legit["after_refusals"] == ("SN-0001", "LOT-7")  # nothing of theirs applied
    assert run["refused_metric"] == {("opcua", "PartId"): 2.0, ("opcua", "Batch"): 1.0,
                                     ("opcua", "StartSingleJob.partId"): 1.0}


def test_bad_query_arguments_get_a_proper_badstatus_of(run: dict[str, Any]) -> None:
    legit = run["legitimate"]
    assert legit["query_ok"] == "Good"
    assert legit["query_bad"] == {
        "startIndex=-1": "BadOutOfRange", "maxResults=-5": "BadOutOfRange", "maxResults=2**40": "BadOutOfRange",
        "startIndex='3'": "BadTypeMismatch", "maxResults=1.5": "BadTypeMismatch", "maxResults=true": "BadTypeMismatch"}


def test_sessions_refusals_and_input_writes_are_audited(run: dict[str, Any]) -> None:
    audit = run["audit"]
    sessions = [r for r in audit if r["action"] == "opcua.session"]
    assert sessions and {r["user"] for r in sessions} == {OPERATOR}
    assert all(r["role"] == "opcua" and r["target"].startswith(f"{HOST}:") for r in sessions)
    assert {r["detail"]["policy"] for r in sessions} == {SecurityPolicyBasic256Sha256.URI}
    refused = [r for r in audit if r["action"] == "opcua.session.refused"]
    assert sorted(r["detail"]["status"] for r in refused) == [
        "BadCertificateUntrusted", "BadCertificateUntrusted", "BadCertificateUriInvalid", "BadSecurityChecksFailed",
        "BadSecurityChecksFailed"]
    assert {r["user"] for r in refused} == {OPERATOR}
    writes = {r["target"]: r["detail"] for r in audit if r["action"] == "plc.input" and r["role"] == "opcua"}
    assert writes["PartId"] == {"writes": 1, "last": "SN-0001"}  # refused writes are counted, not applied
    assert writes["Batch"] == {"writes": 1, "last": "LOT-7"}
    assert writes["Trigger"]["last"] is True
    assert {r["user"] for r in audit if r["action"] == "plc.input"} == {OPERATOR}
    modes = sorted((r["at"], r["target"], r["user"]) for r in audit if r["action"] == "line.trigger_mode")
    assert [(target, user) for _, target, user in modes] == [("continuous", OPERATOR), ("triggered", OPERATOR)]
