"""The information model (NodeSet2 files) and how a result is expressed in it, without a network."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from asyncua import Server, ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import extensionobject_from_binary, extensionobject_to_binary

from appliance.config import PlcReportConfig
from appliance.model_package import CardHead, ModelCard, ModelInput
from appliance.plc.opcua_control import ArgumentError, Jobs, process_values, text_id
from appliance.plc.opcua_results import EVENT_FIELDS, ResultEncoder, result_from_row
from appliance.result import HeadResult, PartResult
from opcua_model import APP_NAMESPACE, MV_NAMESPACE, LoadedModel, load_model

MANDATORY = ua.NodeId(ua.ObjectIds.ModellingRule_Mandatory)


async def _load() -> dict[str, Any]:
    server = Server()
    await server.init()
    model = await load_model(server)
    mv, app = model.mv_node, model.app_node
    found: dict[str, Any] = {"model": model, "namespaces": await server.get_namespace_array()}
    event_type = server.get_node(mv("ResultReadyEventType"))
    found["event_properties"] = {}
    for prop in await event_type.get_properties():
        rules = await prop.get_referenced_nodes(ua.ObjectIds.HasModellingRule)
        found["event_properties"][(await prop.read_browse_name()).Name] = (
            bool(rules) and rules[0].nodeid == MANDATORY)
    vision = server.get_node(app("VisionSystem"))
    found["children"] = [(await c.read_browse_name()).to_string() for c in await vision.get_children()]
    found["notifier"] = await vision.read_event_notifier()
    found["arguments"] = {}
    for path in ("VisionSystem.VisionStateMachine.AutomaticModeStateMachine.StartSingleJob",
                 "VisionSystem.ResultManagement.GetResultById",
                 "VisionSystem.ResultManagement.GetResultListFiltered"):
        inputs = await server.get_node(app(f"{path}.InputArguments")).read_value()
        outputs = await server.get_node(app(f"{path}.OutputArguments")).read_value()
        found["arguments"][path.rsplit(".", 1)[1]] = ([a.Name for a in inputs], [a.Name for a in outputs])
    found["states"] = {}
    for name in ("Preoperational", "Halted", "Error", "Operational"):
        number = server.get_node(mv(f"VisionStateMachineType.{name}.StateNumber"))
        found["states"][name] = await number.read_value()
    definition = await server.get_node(app("DefectResultDataType")).read_data_type_definition()
    found["defect_fields"] = [f.Name for f in definition.Fields]
    found["writable"] = {}
    for name in ("PartId", "Batch", "ProcessValueNames", "ProcessValues", "Trigger"):
        found["writable"][name] = await server.get_node(app(f"VisionSystem.Inputs.{name}")).get_access_level()
    latest = server.get_node(app("VisionSystem.LatestResult.Disposition"))
    found["latest_access"] = await latest.get_access_level()
    found["health"] = {}
    for name in ("ImageWarning", "ImageWarningReason", "QualityAlarm", "QualityAlarmReason"):
        variable = server.get_node(app(f"VisionSystem.Health.{name}"))
        found["health"][name] = (await variable.read_data_type(), await variable.get_access_level())
    return found


@pytest.fixture(scope="module")
def loaded() -> dict[str, Any]:
    return asyncio.run(_load())


def test_model_loads_in_its_namespaces(loaded: dict[str, Any]) -> None:
    model: LoadedModel = loaded["model"]
    assert loaded["namespaces"][model.mv] == MV_NAMESPACE
    assert loaded["namespaces"][model.app] == APP_NAMESPACE
    assert loaded["children"] == [f"{model.mv}:VisionStateMachine", f"{model.mv}:ResultManagement",
                                  f"{model.mv}:RecipeManagement", f"{model.mv}:ConfigurationManagement",
                                  f"{model.app}:LatestResult", f"{model.app}:Inputs", f"{model.app}:Health"]
    assert loaded["notifier"] == {ua.EventNotifier.SubscribeToEvents}
    assert loaded["states"] == {"Preoperational": 1, "Halted": 2, "Error": 3, "Operational": 4}


def test_health_warnings_are_read_only_variables(loaded: dict[str, Any]) -> None:
    boolean, string = ua.NodeId(ua.ObjectIds.Boolean), ua.NodeId(ua.ObjectIds.String)
    read_only = {ua.AccessLevel.CurrentRead}
    assert loaded["health"] == {"ImageWarning": (boolean, read_only), "ImageWarningReason": (string, read_only),
                                "QualityAlarm": (boolean, read_only), "QualityAlarmReason": (string, read_only)}


def test_result_ready_event_type_has_the_40100_properties(loaded: dict[str, Any]) -> None:
    props = loaded["event_properties"]
    assert set(props) == {name for name, _ in EVENT_FIELDS}
    assert {name for name, mandatory in props.items() if mandatory} == {
        "IsPartial", "ResultState", "InternalRecipeId", "InternalConfigurationId", "JobId", "ResultId",
        "CreationTime"}


def test_methods_have_the_40100_signatures(loaded: dict[str, Any]) -> None:
    args = loaded["arguments"]
    assert args["StartSingleJob"] == (["measId", "partId", "recipeId", "productId", "parameters"],
                                      ["jobId", "error"])
    assert args["GetResultById"] == (["resultId", "timeout"], ["resultHandle", "result", "error"])
    assert len(args["GetResultListFiltered"][0]) == 12
    assert args["GetResultListFiltered"][1] == ["isComplete", "resultCount", "resultHandle", "resultList",
                                                "error"]


def test_only_the_inputs_are_writable(loaded: dict[str, Any]) -> None:
    read_write = {ua.AccessLevel.CurrentRead, ua.AccessLevel.CurrentWrite}
    assert all(level == read_write for level in loaded["writable"].values())
    assert loaded["latest_access"] == {ua.AccessLevel.CurrentRead}


def test_defect_result_structure(loaded: dict[str, Any]) -> None:
    assert loaded["defect_fields"][:6] == ["ResultId", "Sequence", "PartId", "Batch", "Disposition",
                                           "DispositionCode"]
    assert {"DefectType", "Severity", "Confidence", "Heads", "ModelVersion"} <= set(loaded["defect_fields"])


# -- results in the model ------------------------------------------------------------------------
CARD = ModelCard(version="v1", input=ModelInput(layout="NHW", channels=1, height=8, width=8),
                 heads=[CardHead(name="defect_type", classes=["none", "crack", "finger"]),
                        CardHead(name="severity", classes=["low", "high"], ordinal=True)],
                 onnx_sha256="ab" * 32)


def _result(status: str = "ok") -> PartResult:
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    preds = [HeadResult("defect_type", "finger", 0.91, [0.05, 0.04, 0.91]),
             HeadResult("severity", "high", 0.7, [0.3, 0.7])] if status == "ok" else []
    return PartResult(result_id="01RESULT", acquired_at=now, decided_at=now, line_id="l", asset_id="a",
                      camera_view="top", batch=None, part_id=None, model_version="v1",
                      disposition="reject" if status == "ok" else "hold", rule="r", status=status,
                      source_ref="x.png", seq=7, predictions=preds,
                      latency={"inference_ms": 4.0, "decide_ms": 0.5, "total_ms": 6.0})


REPORTED = PlcReportConfig(type_head="defect_type", severity_head="severity")


def _encoder(model: LoadedModel, plc: PlcReportConfig = REPORTED,
             judged: list[str] | None = None) -> ResultEncoder:
    return ResultEncoder(model, plc, lambda v: CARD if v == "v1" else None, simulated=False,
                         configuration_id=model.new("ConfigurationIdDataType", Id="l/a"), judged_heads=judged)


@pytest.mark.parametrize("status", ["ok", "failed"])
def test_every_event_field_is_typed_and_set(loaded: dict[str, Any], status: str) -> None:
    encoder = _encoder(loaded["model"])
    result = _result(status)
    fields = encoder.fields(result, "job-1", encoder.content(result))
    declared = dict(EVENT_FIELDS)
    assert set(fields) <= set(declared)
    assert set(declared) - set(fields) == {"MeasId", "ExternalRecipeId", "ProductId",
                                           "ExternalConfigurationId"}  # optional, unknown here
    for name, variant in fields.items():
        assert variant.Value is not None and variant.VariantType == declared[name], name
    assert fields["ResultState"].Value == (1 if status == "ok" else 4)
    assert fields["JobId"].Value.Id == "job-1" and fields["PartId"].Value.Id == ""
    assert fields["InternalRecipeId"].Value.Hash == bytes.fromhex("ab" * 32)


def test_codes_follow_the_model_card_and_the_plc_config(loaded: dict[str, Any]) -> None:
    content = _encoder(loaded["model"]).content(_result())
    assert (content.DefectType, content.DefectTypeCode, content.Severity, content.SeverityCode) == (
        "finger", 3, "high", 2)
    assert (content.Disposition, content.DispositionCode, content.Batch) == ("reject", 3, "")
    assert math.isclose(content.Confidence, 0.7) and [h.Code for h in content.Heads] == [3, 2]
    judged = _encoder(loaded["model"], judged=["defect_type"]).content(_result())
    assert math.isclose(judged.Confidence, 0.91)  # only the heads the disposition judges on
    unset = _encoder(loaded["model"], PlcReportConfig()).content(_result())
    assert (unset.DefectType, unset.DefectTypeCode, unset.Severity, unset.SeverityCode) == ("", 0, "", 0)
    swapped = _encoder(loaded["model"], PlcReportConfig(type_head="severity", severity_head="defect_type"))
    content = swapped.content(_result())
    assert (content.DefectType, content.DefectTypeCode, content.Severity, content.SeverityCode) == (
        "high", 2, "finger", 3)
    unknown = _encoder(loaded["model"], PlcReportConfig(type_head="no_such_head"))
    content = unknown.content(_result())
    assert (content.DefectType, content.DefectTypeCode) == ("", 0)
    failed = _encoder(loaded["model"]).content(_result("failed"))
    assert (failed.DispositionCode, failed.Confidence, failed.Heads, failed.Status) == (4, 0.0, [], "failed")


def test_result_data_survives_the_binary_encoding(loaded: dict[str, Any]) -> None:
    data = _encoder(loaded["model"]).result_data(_result(), "job-1")
    decoded = extensionobject_from_binary(Buffer(extensionobject_to_binary(data)))
    assert decoded == data
    assert decoded.ResultContent[0].Value.DefectType == "finger" and decoded.MeasId is None


def test_a_stored_row_becomes_a_result() -> None:
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    row = {"result_id": "r", "seq": 3, "acquired_at": now, "decided_at": now, "line_id": "l", "asset_id": "a",
           "camera_view": "top", "batch": "b", "part_id": "p", "process_values": {"t": 1.0},
           "model_version": "v1", "disposition": "pass", "rule": "ok", "review": None, "status": "ok",
           "error": None, "queue_ms": 1.0, "inference_ms": 2.0, "decide_ms": None, "total_ms": 4.0,
           "image_ref": None, "source_ref": "x",
           "predictions": [{"head": "severity", "label": "low", "confidence": 0.9, "probs": [0.9, 0.1],
                            "model_version": "v1"}]}
    result = result_from_row(row)
    assert result.seq == 3 and result.latency == {"queue_ms": 1.0, "inference_ms": 2.0, "total_ms": 4.0}
    assert result.head("severity") == HeadResult("severity", "low", 0.9, [0.9, 0.1])


# -- what a PLC sends --------------------------------------------------------------------------------
def test_ids_arrive_as_text_or_structures(loaded: dict[str, Any]) -> None:
    model: LoadedModel = loaded["model"]
    assert text_id(None, "x") == "" and text_id(" P-1 ", "x") == "P-1"
    assert text_id(model.new("PartIdDataType", Id="P-2"), "x") == "P-2"
    assert text_id(ua.ExtensionObject(), "x") == ""  # a null structure
    with pytest.raises(ArgumentError) as wrong:
        text_id(3.5, "partId")
    assert wrong.value.code == ua.StatusCodes.BadTypeMismatch
    with pytest.raises(ArgumentError) as long:
        text_id("x" * 129, "partId")
    assert long.value.code == ua.StatusCodes.BadOutOfRange


def test_process_values_by_position_or_key() -> None:
    assert process_values([ua.Variant(81.5), ua.Variant(2)], ["temp_c"]) == {"temp_c": 81.5, "pv2": 2.0}
    pair = ua.KeyValuePair(Key=ua.QualifiedName("speed"), Value=ua.Variant(1.25))
    assert process_values([ua.Variant(pair)], []) == {"speed": 1.25}
    assert process_values(None, []) == {}
    for bad in (True, "12", float("nan")):
        with pytest.raises(ArgumentError):
            process_values([bad], [])


def test_jobs_match_results_by_trigger_tag_even_when_other_triggers_interleave() -> None:
    async def go() -> tuple[list[str], list[str], Jobs]:
        loop = asyncio.get_running_loop()
        jobs = Jobs()
        first, dropped, second = loop.create_future(), loop.create_future(), loop.create_future()
        ids = [jobs.new_id() for _ in range(3)]
        for fut, job_id in zip((first, dropped, second), ids, strict=True):
            jobs.start_single(fut, job_id)
        dropped.set_exception(RuntimeError("frame dropped"))
        await asyncio.sleep(0)
        modbus, a, b = _result(), _result(), _result()
        modbus.result_id, a.result_id, b.result_id = "m", "a", "b"
        a.trigger_tag, b.trigger_tag = ids[0], ids[2]  # modbus: a trigger from another source, untagged
        claimed = [jobs.claim(modbus), jobs.claim(a), jobs.claim(b)]
        first.set_result(a)
        second.set_result(b)
        await asyncio.sleep(0)
        return ids, claimed, jobs

    ids, claimed, jobs = asyncio.run(go())
    assert claimed == [jobs.current, ids[0], ids[2]]  # the dropped frame's job got no result
    assert not jobs.single_pending and jobs.results_of(ids[2]) == ["b"] and jobs.job_of("m") == jobs.current
