"""The OPC UA server as a PLC sees it, through an independent client (node-opcua, Node 20).

One scenario runs once per module (a daemon start costs seconds): a triggered replay line with an
operator and a reader; tests/clients/opcua_client.mjs connects with SignAndEncrypt, is refused
until the test trusts its certificate (moved from pki/rejected to pki/trusted, as an
administrator would), browses, writes the part inputs, calls StartSingleJob twice, collects the
ResultReadyEvents on the VisionSystem and the Server object, and tries what a reader, an
anonymous user and a None-security client may not do.  The tests below check its report and the
results the daemon stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asyncua import Client, ua

from appliance.config import load_config
from appliance.daemon import Daemon
from appliance.errors import UserError
from appliance.plc import opcua_faults
from appliance.store import ResultFilter
from tests.brightness_model import make_brightness_model
from tests.conftest import DISPOSITION, free_port, write_grade_images, write_yaml

CLIENTS = Path(__file__).resolve().parents[1] / "clients"
NODE = shutil.which("node")

GRADES = ["0", "2/3", "1/3", "1"]
OPERATOR = {"user": "plc-operator", "password": "op-secret-1"}
READER = {"user": "scada-reader", "password": "rd-secret-2"}
INPUTS = {"partId": "PLC-PART-0001", "batch": "PLC-BATCH-9", "processValueNames": ["temp_c", "speed"],
          "processValues": [81.5, 1.25]}
ARG_PART = "ARG-PART-0002"
IMAGE_REASONS = ["brightness 71 vs baseline 120", "sharpness 20 is below 50% of baseline 60"]
QUALITY_REASON = "defect rate 12.5 % above the upper control limit 8.1 %"


async def _run_client(settings: dict[str, Any], pki: Path, timeout: float = 60,
                      on_step: dict[str, Callable[[], None]] | None = None) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        str(NODE), str(CLIENTS / "opcua_client.mjs"), json.dumps(settings), cwd=CLIENTS,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    lines: list[str] = []
    moved: list[str] = []

    async def read() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            if line.startswith("STEP rejected"):
                # the administrator's step: trust the client certificate the server rejected
                for cert in sorted((pki / "rejected").glob("*.der")):
                    shutil.move(cert, pki / "trusted" / cert.name)
                    moved.append(cert.name)
            for name, action in (on_step or {}).items():
                if line.startswith(f"STEP {name}"):
                    action()

    try:
        await asyncio.wait_for(asyncio.gather(read(), proc.wait()), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
    output = "\n".join(lines)
    report = next((json.loads(line[7:]) for line in lines if line.startswith("RESULT ")), None)
    assert report is not None, output
    return {"report": report, "rc": proc.returncode, "output": output, "moved": moved}


async def _scenario(root: Path) -> dict[str, Any]:
    state = root / "state"
    state.mkdir()
    images = root / "images"
    write_grade_images(images, GRADES)
    make_brightness_model(state / "pkg")
    port = free_port()
    config = load_config(write_yaml(root / "line.yaml", {
        "state_dir": str(state),
        "line": {"line_id": "opcua-line", "asset_id": "station-3", "batch": "B-START"},
        "camera": {"view": "top", "source": "replay",
                   "replay": {"path": str(images), "triggered": True, "loop": True}},
        "model": {"path": str(state / "pkg"), "warmup_runs": 1},
        "disposition": DISPOSITION,
        "store": {"retention": {"pass": 1.0, "min_free_mb": 0}},
        "api": {"host": "127.0.0.1", "port": 0},
        "plc": {"type_head": "cell_type", "severity_head": "defect_grade"},
        "opcua": {"enabled": True, "host": "127.0.0.1", "port": port, "users": [
            {"name": OPERATOR["user"], "role": "operator", "password_env": "TEST_OPCUA_OPERATOR_PW"},
            {"name": READER["user"], "role": "reader", "password_env": "TEST_OPCUA_READER_PW"}]},
    }))
    daemon = Daemon(config)
    await daemon.start()

    def raise_warnings() -> None:
        """What the daemon sets when the lamp ages and the defect rate leaves its control limits."""
        daemon.image_health.alarm, daemon.image_health.reasons = True, list(IMAGE_REASONS)
        daemon.quality_alarm, daemon.quality_reason = True, QUALITY_REASON

    try:
        pki = state / "pki"
        client = await _run_client({
            "url": f"opc.tcp://127.0.0.1:{port}", "pki": str(root / "client-pki"),
            "serverCert": str(pki / "own" / "cert.der"), "operator": OPERATOR, "reader": READER,
            "inputs": INPUTS, "argPartId": ARG_PART, "timeoutMs": 20000}, pki,
            on_step={"health-subscribed": raise_warnings})
        await daemon.wait_for_results(3, timeout=10)
        daemon.store.flush()
        client["stored"] = await asyncio.to_thread(daemon.store.query, ResultFilter(limit=10))
        client["model_version"] = daemon.classifier.version if daemon.classifier else None
        client["trusted"] = sorted(p.name for p in (pki / "trusted").iterdir())
        client["faults"] = next(e.faults.counts for e in daemon.endpoints if e.name == "opcua")
        client["fault_metric"] = {
            s.labels["status"]: s.value for m in daemon.metrics.registry.collect()
            if m.name == "appliance_opcua_service_faults" for s in m.samples if s.name.endswith("_total")}
    finally:
        await daemon.stop()
    return client


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if NODE is None or not (CLIENTS / "node_modules" / "node-opcua-client").is_dir():
        pytest.skip("needs Node 20 and node-opcua-client: run scripts/system-deps.sh")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEST_OPCUA_OPERATOR_PW", OPERATOR["password"])
        mp.setenv("TEST_OPCUA_READER_PW", READER["password"])
        mp.delenv("APPLIANCE_OPCUA_USER", raising=False)
        mp.delenv("APPLIANCE_OPCUA_PASSWORD", raising=False)
        records = _Records()
        for name in ("asyncua", opcua_faults.__name__):
            logging.getLogger(name).addHandler(records)
        try:
            result = asyncio.run(_scenario(tmp_path_factory.mktemp("opcua")))
        finally:
            for name in ("asyncua", opcua_faults.__name__):
                logging.getLogger(name).removeHandler(records)
        result["log"] = records.rows
        return result


class _Records(logging.Handler):
    """(logger, level, first argument, message) of every record asyncua's loggers and the service-fault
    reporter let through."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.rows: list[tuple[str, int, Any, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        first = record.args[0] if isinstance(record.args, tuple) and record.args else None
        self.rows.append((record.name, record.levelno, first, record.getMessage()))


def test_client_runs_clean(run: dict[str, Any]) -> None:
    assert run["rc"] == 0 and run["report"]["failures"] == [], run["output"]


def test_unknown_client_certificate_is_refused_until_trusted(run: dict[str, Any]) -> None:
    report = run["report"]
    assert "BadCertificateUntrusted" in report["firstAttempt"], report["firstAttempt"]
    assert len(run["moved"]) == 1 and run["moved"][0].endswith("].der")
    assert run["moved"] == run["trusted"]
    assert report["securityMode"] == "SignAndEncrypt"
    assert report["securityPolicy"].endswith("#Basic256Sha256")


def test_vision_system_browses_like_opc_40100(run: dict[str, Any]) -> None:
    mv, app = "http://opcfoundation.org/UA/MachineVision", "urn:defect-appliance:opcua"
    children = set(run["report"]["visionSystemChildren"])
    assert {f"{mv}|VisionStateMachine", f"{mv}|ResultManagement", f"{mv}|RecipeManagement",
            f"{mv}|ConfigurationManagement", f"{app}|LatestResult", f"{app}|Inputs", f"{app}|Health"} <= children
    assert run["report"]["stateBefore"] == "Operational"


def test_start_single_job_returns_job_ids(run: dict[str, Any]) -> None:
    jobs = run["report"]["jobs"]
    assert [j["status"] for j in jobs] == ["Good", "Good"]
    for job in jobs:
        job_id, error = job["out"]
        assert job_id["dataType"] == "ExtensionObject" and job_id["value"]["id"]
        assert error == {"dataType": "Int32", "array": False, "value": 0, "decoded": True}


def test_result_ready_events_reach_vision_system_and_server_subscribers(run: dict[str, Any]) -> None:
    events = run["report"]["events"]
    assert len(events["VisionSystem"]) == 3 and len(events["Server"]) == 3
    for a, b in zip(events["VisionSystem"], events["Server"], strict=True):
        assert a["EventId"] == b["EventId"] and a["ResultId"] == b["ResultId"]


def test_event_fields_are_typed_and_never_null(run: dict[str, Any]) -> None:
    expected = {"EventId": "ByteString", "EventType": "NodeId", "SourceName": "String", "Time": "DateTime",
                "Message": "LocalizedText", "Severity": "UInt16", "ResultId": "ExtensionObject",
                "ResultState": "Int32", "IsPartial": "Boolean", "IsSimulated": "Boolean",
                "JobId": "ExtensionObject", "CreationTime": "DateTime", "PartId": "ExtensionObject",
                "InternalRecipeId": "ExtensionObject", "InternalConfigurationId": "ExtensionObject",
                "ProcessingTimes": "ExtensionObject", "ResultContent": "ExtensionObject"}
    jobs = [j["out"][0]["value"]["id"] for j in run["report"]["jobs"]]
    for i, event in enumerate(run["report"]["events"]["VisionSystem"][:2]):
        assert {k: v["dataType"] for k, v in event.items()} == expected
        assert all(v["value"] is not None and v["decoded"] for v in event.values())
        assert event["ResultState"]["value"] == 1 and event["IsPartial"]["value"] is False
        assert event["IsSimulated"]["value"] is True  # a replay camera
        assert event["JobId"]["value"]["id"] == jobs[i]
        assert event["InternalRecipeId"]["value"]["id"] == run["model_version"]
        assert event["InternalConfigurationId"]["value"]["id"] == "opcua-line/station-3"
        assert event["SourceName"]["value"] == "VisionSystem"


def test_result_content_is_the_decoded_defect_result(run: dict[str, Any]) -> None:
    events = run["report"]["events"]["VisionSystem"]
    first, second = (e["ResultContent"] for e in events[:2])
    assert first["array"] and len(first["value"]) == 1
    content = first["value"][0]
    assert content["partId"] == INPUTS["partId"] and content["batch"] == INPUTS["batch"]
    assert content["disposition"] == "pass" and content["dispositionCode"] == 1  # grade "0"
    assert content["severity"] == "0" and content["severityCode"] == 1
    assert content["defectType"] == "mono" and content["defectTypeCode"] == 1
    assert content["modelVersion"] == run["model_version"] and content["status"] == "ok"
    assert {h["head"] for h in content["heads"]} == {"defect_grade", "cell_type"}
    assert 0.6 <= content["confidence"] <= 1 and content["resultId"] == events[0]["ResultId"]["value"]["id"]
    later = second["value"][0]
    assert later["partId"] == ARG_PART and later["batch"] == INPUTS["batch"]  # the batch is sticky
    assert later["disposition"] == "reject" and later["severity"] == "2/3" and later["severityCode"] == 3
    assert later["sequence"] == content["sequence"] + 1


def test_latest_result_variables_and_get_result_by_id(run: dict[str, Any]) -> None:
    report = run["report"]
    latest = {k: v["value"] for k, v in report["latest"].items()}
    assert latest["PartId"] == "part0002" and latest["Disposition"] == "rework"  # the third image, "1/3"
    assert latest["DispositionCode"] == 2 and latest["Severity"] == "1/3" and latest["SeverityCode"] == 2
    assert latest["Content"]["partId"] == "part0002" and latest["ModelVersion"] == run["model_version"]
    assert report["latest"]["Sequence"]["dataType"] == "UInt32"
    assert report["autoState"] == "Ready"
    by_id = report["getResultById"]
    assert by_id["status"] == "Good"
    handle, result, error = by_id["out"]
    assert handle["value"] == 0 and error["value"] == 0 and result["decoded"]
    last_event = report["events"]["VisionSystem"][-1]
    assert result["value"]["resultId"]["id"] == last_event["ResultId"]["value"]["id"]
    assert result["value"]["partId"]["id"] == "part0002"


def test_trigger_variable_acquires_a_part_and_is_set_back(run: dict[str, Any]) -> None:
    trigger = run["report"]["trigger"]
    assert trigger == {"write": "Good", "readBack": False}
    third = run["report"]["events"]["VisionSystem"][2]
    assert third["ResultContent"]["value"][0]["partId"] == "part0002"  # no part id written: the image name
    assert third["JobId"]["value"]["id"] not in {j["out"][0]["value"]["id"] for j in run["report"]["jobs"]}


def test_halt_refuses_jobs_until_reset(run: dict[str, Any]) -> None:
    assert run["report"]["halt"] == {"halt": "Good", "state": "Halted", "startSingleJob": "BadInvalidState",
                                     "reset": "Good", "stateAfterReset": "Operational"}


def test_health_warnings_mirror_the_modbus_status_bits(run: dict[str, Any]) -> None:
    """App:Health carries what Modbus status bits 8 (image_warning) and 9 (quality_alarm) carry, with
    the reasons; a subscriber sees them change (within the 0.2 s state mirror), nobody may write them."""
    health = run["report"]["health"]
    plain = {name: v["value"] for name, v in health["before"].items()}
    assert plain == {"ImageWarning": False, "ImageWarningReason": "", "QualityAlarm": False,
                     "QualityAlarmReason": ""}
    assert {name: v["dataType"] for name, v in health["before"].items()} == {
        "ImageWarning": "Boolean", "ImageWarningReason": "String", "QualityAlarm": "Boolean",
        "QualityAlarmReason": "String"}
    assert {name: v["value"] for name, v in health["after"].items()} == {
        "ImageWarning": True, "ImageWarningReason": "; ".join(IMAGE_REASONS), "QualityAlarm": True,
        "QualityAlarmReason": QUALITY_REASON}
    assert ["ImageWarning", True] in health["changes"] and ["QualityAlarm", True] in health["changes"]
    assert health["write"] == "BadUserAccessDenied"  # read-only UserAccessLevel, even for an operator


def test_inputs_check_their_types(run: dict[str, Any]) -> None:
    writes = run["report"]["inputWrites"]
    assert writes == {"partId": "Good", "batch": "Good", "names": "Good", "values": "Good",
                      "wrongType": "BadTypeMismatch"}


def test_reader_may_read_but_not_call_or_write(run: dict[str, Any]) -> None:
    assert run["report"]["reader"] == {"read": "Good", "call": "BadUserAccessDenied",
                                       "write": "BadUserAccessDenied", "trigger": "BadUserAccessDenied"}


def test_only_sign_and_encrypt_with_encrypted_passwords_is_offered(run: dict[str, Any]) -> None:
    assert run["report"]["endpoints"] == [
        {"mode": "SignAndEncrypt", "policy": policy, "tokens": [f"UserName:{policy}"]}
        for policy in ("Basic256Sha256", "Aes256_Sha256_RsaPss")
    ]


def test_anonymous_and_none_security_sessions_are_refused_by_the_server(run: dict[str, Any]) -> None:
    report = run["report"]
    assert "BadIdentityTokenRejected" in report["anonymous"], report["anonymous"]
    assert "BadSecurityModeRejected" in report["noneSecurity"], report["noneSecurity"]


def test_part_id_batch_and_process_values_written_by_the_plc_are_stored(run: dict[str, Any]) -> None:
    stored = sorted(run["stored"], key=lambda r: r["seq"])
    assert [r["part_id"] for r in stored] == [INPUTS["partId"], ARG_PART, "part0002"]
    assert [r["batch"] for r in stored] == [INPUTS["batch"]] * 3
    assert stored[0]["process_values"] == {"temp_c": 81.5, "speed": 1.25}
    assert stored[1]["process_values"] == {}  # consumed by the part they were written for


# -- Python-side checks (asyncua as the client) ------------------------------------------------------
async def test_commissioning_mode_free_running_camera_and_generated_login(
        tmp_path: Path, line_config: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """insecure_commissioning opens a None endpoint with anonymous read access, loudly; with no user
    configured an operator password is generated into a private file whose place (never the
    password) is logged; a free-running camera refuses StartSingleJob with a Bad status until Stop."""
    monkeypatch.delenv("APPLIANCE_OPCUA_USER", raising=False)
    monkeypatch.delenv("APPLIANCE_OPCUA_PASSWORD", raising=False)
    images = tmp_path / "images"
    write_grade_images(images, GRADES)
    port = free_port()
    cfg = line_config(images, camera={"view": "top", "source": "replay",
                                      "replay": {"path": str(images), "rate_hz": 20, "loop": True}},
                      opcua={"enabled": True, "port": port, "insecure_commissioning": True})
    daemon = Daemon(cfg)
    caplog.set_level(logging.DEBUG)  # whatever anybody logs, at any level, during the whole test
    await daemon.start()
    try:
        assert "INSECURE COMMISSIONING MODE" in caplog.text
        kept = cfg.state_dir / "credentials" / "opcua-operator"
        password = kept.read_text()
        assert f"user 'operator', its password is in {kept}" in caplog.text
        assert password not in caplog.text
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
        url = f"opc.tcp://127.0.0.1:{port}"
        async with Client(url) as anonymous:  # None security, no user
            ns = await anonymous.get_namespace_array()
            app, mv = ns.index("urn:defect-appliance:opcua"), ns.index("http://opcfoundation.org/UA/MachineVision")
            state = anonymous.get_node(ua.NodeId("VisionSystem.VisionStateMachine.CurrentState", app))
            for _ in range(20):  # mirrored from the daemon every 0.2 s
                if (await state.read_value()).Text == "Operational":
                    break
                await asyncio.sleep(0.1)
            assert (await state.read_value()).Text == "Operational"
            auto_path = "VisionSystem.VisionStateMachine.AutomaticModeStateMachine"
            auto = anonymous.get_node(ua.NodeId(auto_path, app))
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                await auto.call_method(ua.NodeId(f"{auto_path}.Stop", app))
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                await anonymous.get_node(ua.NodeId("VisionSystem.Inputs.Batch", app)).write_value(
                    ua.Variant("x", ua.VariantType.String))
        operator = Client(url)
        operator.set_user("operator")
        operator.set_password(password)
        async with operator:
            auto = operator.get_node(ua.NodeId(auto_path, app))
            auto_state = operator.get_node(ua.NodeId(f"{auto_path}.CurrentState", app))
            assert (await auto_state.read_value()).Text == "ContinuousExecution"
            null = [ua.Variant()] * 4 + [ua.Variant([], ua.VariantType.Variant)]
            with pytest.raises(ua.UaStatusCodeError, match="BadInvalidState"):
                await auto.call_method(ua.NodeId(f"{auto_path}.StartSingleJob", app), *null)
            assert await auto.call_method(ua.NodeId(f"{auto_path}.Stop", app)) == 0
            assert (await auto_state.read_value()).Text == "Ready"
            job, error = await auto.call_method(ua.NodeId(f"{auto_path}.StartSingleJob", app), *null)
            assert job.Id and error == 0
            job, error = await auto.call_method(ua.NodeId(f"{auto_path}.StartContinuous", app), *null)
            assert job.Id and error == 0
            assert (await auto_state.read_value()).Text == "ContinuousExecution"
            ids = await operator.get_node(ua.NodeId(f"{auto_path}.CurrentState.Id", app)).read_value()
            assert ids == ua.NodeId("VisionAutomaticModeStateMachineType.ContinuousExecution", mv)
    finally:
        await daemon.stop()
    assert password not in caplog.text


async def test_a_taken_port_fails_the_start_with_a_clear_message(
        tmp_path: Path, line_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_OPCUA_USER", "demo")
    monkeypatch.setenv("APPLIANCE_OPCUA_PASSWORD", "demo-password")
    images = tmp_path / "images"
    write_grade_images(images, GRADES)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = line_config(images, opcua={"enabled": True, "port": port})
        with pytest.raises(UserError, match=f"OPC UA: cannot listen on 127.0.0.1:{port}"):
            await Daemon(cfg).start()


def test_service_faults_are_counted_and_logged_as_warnings(run: dict[str, Any]) -> None:
    """The scenario's refusals (untrusted certificate, anonymous session, None security, a reader's
    write) are client mistakes: counted per status and logged once at WARNING, never at ERROR."""
    expected = {"BadCertificateUntrusted", "BadIdentityTokenRejected", "BadSecurityModeRejected",
                "BadUserAccessDenied"}
    assert expected <= set(run["faults"]) and all(run["faults"][s] >= 1 for s in expected)
    assert run["fault_metric"] == run["faults"]
    asyncua = [r for r in run["log"] if r[0].startswith("asyncua.server")]
    assert not [r for r in asyncua if r[1] >= logging.ERROR], asyncua
    reported = [r for r in run["log"] if r[0] == opcua_faults.__name__]
    assert {r[2] for r in reported if r[1] == logging.WARNING and "answered a client request with" in r[3]} >= expected


# -- the part context across protocols, connected clients ------------------------------------------
MODBUS_PART_ID, MODBUS_BATCH = 101, 117
"""Holding registers of the shipped map (configs/modbus_map.yaml): 16 registers of text each."""


async def _modbus(port: int, pdu: bytes) -> bytes:
    """One Modbus TCP request (unit 1) over a raw socket; returns the answer's PDU."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(struct.pack(">HHHB", 7, 0, len(pdu) + 1, 1) + pdu)
        _tid, _pid, length, _unit = struct.unpack(">HHHB", await asyncio.wait_for(reader.readexactly(7), 5))
        answer = await asyncio.wait_for(reader.readexactly(length - 1), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer[0] == pdu[0], f"Modbus exception {answer.hex()}"
    return answer


async def _modbus_write_text(port: int, address: int, *texts: str) -> None:
    """FC 16: consecutive 16-register text fields from ``address`` (the PLC's one write of its inputs)."""
    raw = b"".join(t.encode("ascii").ljust(32, b"\0") for t in texts)
    count = len(raw) // 2
    await _modbus(port, struct.pack(">BHHB", 16, address, count, len(raw)) + raw)


async def _modbus_read_text(port: int, address: int) -> str:
    """FC 3: a 16-register text field."""
    answer = await _modbus(port, struct.pack(">BHH", 3, address, 16))
    return answer[2:2 + answer[1]].split(b"\0", 1)[0].decode("ascii")


async def _eventually(read: Callable[[], Any], expected: Any, timeout: float = 3.0) -> Any:
    """``await read()`` until it gives ``expected`` (the OPC UA inputs mirror the daemon every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while (value := await read()) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return value


async def test_inputs_show_the_batch_and_part_in_use_whichever_protocol_wrote_them(
        tmp_path: Path, line_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The part context is one: a batch written over Modbus shows in OPC UA Inputs/Batch, a batch
    written over OPC UA in the Modbus batch register, the configured batch in both before anybody
    wrote one; the part id shows until a part consumes it, and the batch stays (sticky)."""
    monkeypatch.setenv("APPLIANCE_OPCUA_USER", "plc")
    monkeypatch.setenv("APPLIANCE_OPCUA_PASSWORD", "plc-password-1")
    images = tmp_path / "images"
    write_grade_images(images, GRADES)
    port, mb_port = free_port(), free_port()
    cfg = line_config(images, camera={"view": "top", "source": "replay",
                                      "replay": {"path": str(images), "triggered": True, "loop": True}},
                      opcua={"enabled": True, "port": port, "insecure_commissioning": True},
                      modbus={"enabled": True, "port": mb_port})
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        client = Client(f"opc.tcp://127.0.0.1:{port}")
        client.set_user("plc")
        client.set_password("plc-password-1")
        async with client:
            app = (await client.get_namespace_array()).index("urn:defect-appliance:opcua")
            batch, part_id, trigger = (client.get_node(ua.NodeId(f"VisionSystem.Inputs.{name}", app))
                                       for name in ("Batch", "PartId", "Trigger"))
            # before anybody wrote one: the configured batch (line.batch), on both protocols
            assert await batch.read_value() == "B-001"
            assert await _modbus_read_text(mb_port, MODBUS_BATCH) == "B-001"

            # the Modbus PLC writes its inputs (one FC 16: part id, batch)
            await _modbus_write_text(mb_port, MODBUS_PART_ID, "SN-0007", "LOT-0012")
            assert await _eventually(batch.read_value, "LOT-0012") == "LOT-0012"
            assert await _eventually(part_id.read_value, "SN-0007") == "SN-0007"

            # an OPC UA client changes the batch: Modbus shows it, and the next part carries it
            await batch.write_value(ua.Variant("LOT-OPC-7", ua.VariantType.String))
            assert daemon.context.batch == "LOT-OPC-7"
            assert await _modbus_read_text(mb_port, MODBUS_BATCH) == "LOT-OPC-7"
            await trigger.write_value(ua.Variant(True, ua.VariantType.Boolean))
            await daemon.wait_for_results(1, timeout=10)
            assert daemon.latest is not None
            assert (daemon.latest.batch, daemon.latest.part_id) == ("LOT-OPC-7", "SN-0007")
            # the part id was consumed by that part; the batch is sticky
            assert await _eventually(part_id.read_value, "") == ""
            assert await batch.read_value() == "LOT-OPC-7"
            assert await _modbus_read_text(mb_port, MODBUS_BATCH) == "LOT-OPC-7"
    finally:
        await daemon.stop()


async def test_connected_opcua_clients_are_counted_in_health_and_metrics(
        tmp_path: Path, line_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client counts while it has an activated session: not while its connection has not opened
    one, and no longer once it has disconnected.  /api/v1/health and appliance_plc_connections say so."""
    monkeypatch.setenv("APPLIANCE_OPCUA_USER", "plc")
    monkeypatch.setenv("APPLIANCE_OPCUA_PASSWORD", "plc-password-1")
    images = tmp_path / "images"
    write_grade_images(images, GRADES)
    port = free_port()
    cfg = line_config(images, opcua={"enabled": True, "port": port, "insecure_commissioning": True})
    daemon = Daemon(cfg)
    await daemon.start()
    url = f"opc.tcp://127.0.0.1:{port}"

    async def counted() -> tuple[Any, float | None]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}/api/v1") as api:
            health = (await api.get("/health")).json()["plc"]["opcua"]
            metrics = (await api.get("/metrics")).text
        found = re.search(r'^appliance_plc_connections\{protocol="opcua"\} (\S+)$', metrics, re.M)
        assert health["online"] is True
        return health["clients"], float(found.group(1)) if found else None

    try:
        assert await counted() == (0, 0.0)
        _, idle = await asyncio.open_connection("127.0.0.1", port)  # TCP only: no session
        try:
            await asyncio.sleep(0.1)
            assert await counted() == (0, 0.0)
            operator = Client(url)
            operator.set_user("plc")
            operator.set_password("plc-password-1")
            async with operator:
                async with Client(url) as anonymous:  # commissioning mode: an anonymous reader
                    await anonymous.get_namespace_array()
                    assert await counted() == (2, 2.0)
                assert await _eventually(counted, (1, 1.0)) == (1, 1.0)
            assert await _eventually(counted, (0, 0.0)) == (0, 0.0)
        finally:
            idle.close()
            await idle.wait_closed()
    finally:
        await daemon.stop()
