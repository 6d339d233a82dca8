"""Modbus TCP has no login: what the appliance does about it, against real servers and clients.

Regression tests for the security review (issue F, finding 3): a client outside
``modbus.allowed_clients`` is reset at connect and holds no slot; one address holds at most
``max_connections_per_client``; unit 0 (serial broadcast) is never executed; the control coils can be
refused; part text outside the safe character set gets exception 03; a Halt set over OPC UA cannot
be cleared over Modbus (the attack of the review), only over OPC UA or by an engineer through the
HTTP API; and every input write, halt and reset reaches the audit trail with its channel and writer.
Strangers connect from 127.0.0.2 (all of 127/8 is this machine on Linux) while the PLC is 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import struct
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import httpx
import pytest
from asyncua import Client, ua

from appliance.daemon import Daemon
from appliance.plc.modbus_wire import ModbusTcpServer
from tests.conftest import auth_headers, free_port, write_grade_images
from tests.integration.test_modbus import (
    HOST,
    ascii_registers,
    mb_read,
    mb_write,
    mbap,
    mbpoll,
    read_answers,
    status,
    triggered_line,
)

pytestmark = pytest.mark.skipif(shutil.which("mbpoll") is None,
                                reason="needs Debian mbpoll (scripts/system-deps.sh)")

STRANGER = "127.0.0.2"
READ_HEARTBEAT = struct.pack(">BHH", 3, 0, 1)
OPERATOR, PASSWORD = "plc-op", "plc-password-1"


async def request(port: int, pdu: bytes, unit: int = 1, source: str = HOST) -> bytes:
    """One request over a fresh connection from ``source``; the answer's PDU."""
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    try:
        writer.write(mbap(1, pdu, unit=unit))
        return (await read_answers(reader, 1))[0][1]
    finally:
        writer.close()


async def refused(reader: asyncio.StreamReader) -> bool:
    """The server reset or closed the connection without answering."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


def metric(text: str, name: str, reason: str) -> float:
    found = re.search(rf'^{name}_total\{{reason="{reason}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_a_client_outside_allowed_clients_is_refused_at_connect_and_holds_no_slot(
        tmp_path: Path, line_config, caplog: pytest.LogCaptureFixture) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0"], max_connections=2, allowed_clients=[HOST])
    daemon = Daemon(cfg)
    await daemon.start()
    strangers = []
    try:
        with caplog.at_level(logging.DEBUG, logger="appliance.plc.modbus_wire"):
            for _ in range(20):  # held open from their side, each with a reset coil write sent at once
                reader, writer = await asyncio.open_connection(HOST, port, local_addr=(STRANGER, 0))
                writer.write(mbap(1, struct.pack(">BHH", 5, 2, 0xFF00)))
                strangers.append((reader, writer))
            answered = [not await refused(reader) for reader, _ in strangers]
        bits = await status(port)  # the PLC still gets in (mbpoll from 127.0.0.1), with two slots free
        first = await asyncio.open_connection(HOST, port)
        second = await asyncio.open_connection(HOST, port)
        for reader, writer in (first, second):
            writer.write(mbap(2, READ_HEARTBEAT))
            assert (await read_answers(reader, 1))[0][1][0] == 3
        metrics = daemon.metrics.render().decode()
    finally:
        for _, writer in strangers:
            writer.close()
        await daemon.stop()
    assert not any(answered), "a stranger was served"
    assert bits["ready"] and not bits["halted"]
    assert metric(metrics, "appliance_modbus_refused_connections", "not_allowed") == 20
    refusals = [r for r in caplog.records if "not in modbus.allowed_clients" in r.getMessage()]
    assert [r.levelname for r in refusals].count("WARNING") == 1 and len(refusals) == 20, "logged once per peer"
    assert STRANGER in refusals[0].getMessage()


async def test_allowing_everyone_works_but_is_a_warning_at_every_start(
        tmp_path: Path, line_config, caplog: pytest.LogCaptureFixture) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0"], allowed_clients=["0.0.0.0/0"])
    daemon = Daemon(cfg)
    with caplog.at_level(logging.WARNING, logger="appliance.plc.modbus"):
        await daemon.start()
    try:
        answer = await request(port, READ_HEARTBEAT, source=STRANGER)
    finally:
        await daemon.stop()
    assert answer[0] == 3
    assert any("allowed_clients includes 0.0.0.0/0: EVERY host" in r.getMessage() for r in caplog.records)


async def test_one_address_holds_at_most_max_connections_per_client() -> None:
    server = ModbusTcpServer(_Bank(), host=HOST, port=0, unit_id=1, allowed_clients=[ip_network("127.0.0.0/8")],
                             max_connections=8, max_connections_per_client=2, idle_timeout_s=60)
    await server.start()
    opened = []
    try:
        for _ in range(2):
            opened.append(await asyncio.open_connection(HOST, server.port))
        greedy = await asyncio.open_connection(HOST, server.port)
        opened.append(greedy)
        greedy[1].write(mbap(1, READ_HEARTBEAT))
        third_refused = await refused(greedy[0])
        other = await request(server.port, READ_HEARTBEAT, source="127.0.0.3")
        counters = dict(server.counters)
    finally:
        for _, writer in opened:
            writer.close()
        await server.stop()
    assert third_refused and other == bytes([3, 2, 0, 0])
    assert counters["refused"] == 1


class _Bank:
    def __init__(self) -> None:
        self.writes: list[tuple[str, int, list[int], str]] = []

    def read(self, table: str, address: int, count: int) -> list[int]:
        return [0] * count

    def write(self, table: str, address: int, values: list[int], peer: str) -> None:
        self.writes.append((table, address, values, peer))


async def test_unit_0_broadcast_is_not_executed_and_255_is_served(tmp_path: Path, line_config) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0"])
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        trigger = await request(port, struct.pack(">BHH", 5, 0, 0xFF00), unit=0)
        read = await request(port, READ_HEARTBEAT, unit=0)
        rc, _, out = await mbpoll(port, "-a", "0", "-t", "0", "-r", "0", HOST, "--", "1")
        await asyncio.sleep(0.3)
        judged, coils = daemon.stats.judged, await mb_read(port, "-t", "0", "-r", "0", "-c", "3")
        served = await request(port, READ_HEARTBEAT, unit=255)
    finally:
        await daemon.stop()
    assert trigger == bytes([0x85, 0x0B]) and read == bytes([0x83, 0x0B])  # gateway target did not respond
    assert rc != 0, out
    assert judged == 0 and coils == {0: 0, 1: 0, 2: 0}, "a broadcast trigger acquired nothing"
    assert served[0] == 3


async def test_allow_control_false_refuses_the_control_coils_and_word_but_not_the_inputs(
        tmp_path: Path, line_config) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0"], allow_control=False)
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        answers = [await request(port, pdu) for pdu in (
            struct.pack(">BHH", 5, 0, 0xFF00),                               # trigger coil
            struct.pack(">BHH", 5, 1, 0xFF00),                               # result_ack coil
            struct.pack(">BHH", 5, 2, 0xFF00),                               # reset coil
            struct.pack(">BHHBB", 15, 0, 3, 1, 0b111),                       # all three at once
            struct.pack(">BHH", 6, 100, 1),                                  # control_word
            struct.pack(">BHHB", 16, 100, 17, 34) + struct.pack(">H", 0) + b"SN-1".ljust(32, b"\0"),
        )]
        await mb_write(port, "-t", "4", "-r", "101", values=ascii_registers("SN-2"))
        coils = await mb_read(port, "-t", "0", "-r", "0", "-c", "3")
        part_id, judged = daemon.context.part_id, daemon.stats.judged
        metrics = daemon.metrics.render().decode()
    finally:
        await daemon.stop()
    assert [a[:2] for a in answers] == [bytes([fc | 0x80, 2]) for fc in (5, 5, 5, 15, 6, 16)]
    assert coils == {0: 0, 1: 0, 2: 0} and judged == 0
    assert part_id == "SN-2", "the part inputs stay writable"
    assert metric(metrics, "appliance_modbus_refused_writes", "control_disabled") == 6


@pytest.mark.parametrize("text", ["<script>x</script>", "=HYPERLINK(1)", "+SUM(A1)", "a\"b", "lot;1"])
async def test_part_text_outside_the_safe_set_gets_exception_03_and_changes_nothing(
        tmp_path: Path, line_config, text: str) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0"])
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        await mb_write(port, "-t", "4", "-r", "101", values=ascii_registers("SN-OK"))
        raw = text.encode().ljust(32, b"\0")
        part = await request(port, struct.pack(">BHHB", 16, 101, 16, 32) + raw)
        batch = await request(port, struct.pack(">BHHB", 16, 117, 16, 32) + raw)
        context = (daemon.context.part_id, daemon.context.batch)
        metrics = daemon.metrics.render().decode()
    finally:
        await daemon.stop()
    assert part == bytes([0x90, 3]) and batch == bytes([0x90, 3])
    assert context == ("SN-OK", "B-001"), "a refused write changes nothing"
    assert metric(metrics, "appliance_modbus_refused_writes", "unsafe_text") == 2


async def test_a_halt_set_over_opcua_is_not_cleared_over_modbus_only_by_opcua_or_an_engineer(
        tmp_path: Path, line_config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's attack: after an operator's OPC UA Halt, a Modbus client set reset and the line
    went back to Operational.  Now the reset write gets exception 01 and the line stays halted."""
    monkeypatch.setenv("APPLIANCE_OPCUA_USER", OPERATOR)
    monkeypatch.setenv("APPLIANCE_OPCUA_PASSWORD", PASSWORD)
    images = tmp_path / "images"
    write_grade_images(images, ["0"])
    ua_port, mb_port = free_port(), free_port()
    cfg = line_config(images, camera={"view": "top", "source": "replay",
                                      "replay": {"path": str(images), "triggered": True, "loop": True}},
                      opcua={"enabled": True, "port": ua_port, "insecure_commissioning": True},
                      modbus={"enabled": True, "port": mb_port})
    daemon = Daemon(cfg)
    await daemon.start()
    seen: dict[str, Any] = {}
    try:
        engineer, operator = auth_headers(daemon, "engineer"), auth_headers(daemon, "operator")
        client = Client(f"opc.tcp://127.0.0.1:{ua_port}")
        client.set_user(OPERATOR)
        client.set_password(PASSWORD)
        async with client, httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}/api/v1") as api:
            app = (await client.get_namespace_array()).index("urn:defect-appliance:opcua")
            vsm = client.get_node(ua.NodeId("VisionSystem.VisionStateMachine", app))
            halt, reset = (client.get_node(ua.NodeId(f"VisionSystem.VisionStateMachine.{m}", app))
                           for m in ("Halt", "Reset"))

            await vsm.call_method(halt)
            seen["modbus_reset"] = await request(mb_port, struct.pack(">BHH", 5, 2, 0xFF00))
            seen["modbus_word"] = await request(mb_port, struct.pack(">BHH", 6, 100, 0b100))
            rc, _, seen["mbpoll"] = await mbpoll(mb_port, "-t", "0", "-r", "2", HOST, "--", "1")
            await asyncio.sleep(0.2)
            seen["after_modbus"] = (daemon.state, await status(mb_port),
                                    await mb_read(mb_port, "-t", "0", "-r", "0", "-c", "3"))
            await vsm.call_method(reset)
            seen["after_opcua_reset"] = daemon.state

            await vsm.call_method(halt)
            seen["operator_api"] = (await api.post("/line/reset", headers=operator)).status_code
            seen["engineer_api"] = (await api.post("/line/reset", headers=engineer)).json()

            seen["api_halt"] = (await api.post("/line/halt", headers=engineer)).json()
            with pytest.raises(ua.UaStatusCodeError) as refusal:
                await vsm.call_method(reset)
            seen["opcua_refused"] = (refusal.value.code, daemon.state)
            seen["engineer_api_2"] = (await api.post("/line/reset", headers=engineer)).json()
        metrics = daemon.metrics.render().decode()
        daemon.audit_trail.flush()
        audit = daemon.store.audit_log()
    finally:
        await daemon.stop()
    assert seen["modbus_reset"] == bytes([0x85, 0x01]) and seen["modbus_word"] == bytes([0x86, 0x01])
    assert rc != 0, seen["mbpoll"]
    state, bits, coils = seen["after_modbus"]
    assert state == "halted" and bits["halted"] and coils == {0: 0, 1: 0, 2: 0}
    assert metric(metrics, "appliance_modbus_refused_writes", "reset_refused") == 3
    assert seen["after_opcua_reset"] == "operational"
    assert seen["operator_api"] == 403
    assert seen["engineer_api"] == {"state": "operational", "halted_by": None}
    assert seen["api_halt"] == {"state": "halted", "halted_by": "api"}
    assert seen["opcua_refused"] == (ua.StatusCodes.BadInvalidState, "halted")
    assert seen["engineer_api_2"]["state"] == "operational"

    rows = [(r["action"], r["role"], r["user"]) for r in reversed(audit) if r["action"].startswith("line.")]
    assert rows[:1] == [("line.halt", "opcua", OPERATOR)]
    assert rows.count(("line.reset.refused", "modbus", HOST)) == 1, "the first refusal is a row, repeats are counted"
    opcua_reset = next(r for r in reversed(audit) if (r["action"], r["role"]) == ("line.reset", "opcua"))
    assert opcua_reset["detail"] == {"from": "halted", "halted_by": "opcua", "refused_resets": 3}
    assert ("line.reset", "api", "test-engineer") in rows and ("line.halt", "api", "test-engineer") in rows
    assert ("line.reset.refused", "opcua", OPERATOR) in rows


async def test_modbus_input_writes_are_audited_with_the_peer(tmp_path: Path, line_config) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0"])
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        await mb_write(port, "-t", "4", "-r", "101", values=ascii_registers("SN-A1") + ascii_registers("LOT-7"))
        await mb_write(port, "-t", "4:float", "-B", "-r", "133", values=[21.5])
        await mb_write(port, "-t", "0", "-r", "0", values=[1])
        await daemon.wait_for_results(1, timeout=10)
        await mb_write(port, "-t", "0", "-r", "1", values=[1])
        daemon.audit_trail.flush()
        audit = daemon.store.audit_log()
    finally:
        await daemon.stop()
    rows = {r["target"]: r for r in audit if r["action"] == "plc.input"}
    assert {name: (r["role"], r["user"], r["detail"]["last"]) for name, r in rows.items()} == {
        "part_id": ("modbus", HOST, "SN-A1"), "batch": ("modbus", HOST, "LOT-7"),
        "process_value_1": ("modbus", HOST, 21.5), "trigger": ("modbus", HOST, True),
        "result_ack": ("modbus", HOST, True)}



async def test_engineers_halt_and_reset_from_the_cli_operators_may_not(tmp_path: Path, line_config) -> None:
    from typer.testing import CliRunner

    from appliance.cli import app

    cfg, port = triggered_line(tmp_path, line_config, ["0"])
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        auth_headers(daemon, "engineer", "erin")
        auth_headers(daemon, "operator", "olga")
        url = f"http://127.0.0.1:{daemon.api_port}"

        def cli(action: str, user: str) -> Any:  # a thread: the daemon's loop goes on serving the API
            return CliRunner().invoke(app, ["line", action, "--api", url, "--user", user],
                                      env={"APPLIANCE_PASSWORD": f"{user}-password-123", "APPLIANCE_API_TOKEN": ""})

        halted = await asyncio.to_thread(cli, "halt", "erin")
        modbus_reset = await request(port, struct.pack(">BHH", 5, 2, 0xFF00))
        operator = await asyncio.to_thread(cli, "reset", "olga")
        state_then = daemon.state
        reset = await asyncio.to_thread(cli, "reset", "erin")
        state_after = daemon.state
    finally:
        await daemon.stop()
    assert halted.exit_code == 0 and "line halted (halt held by api)" in halted.output, halted.output
    assert modbus_reset == bytes([0x85, 0x01]), "a halt set through the API is not reset over Modbus"
    assert operator.exit_code == 2 and "this needs the engineer role" in operator.output, operator.output
    assert state_then == "halted"
    assert reset.exit_code == 0 and "line operational" in reset.output, reset.output
    assert state_after == "operational"


async def test_toggling_reset_on_a_running_line_is_counted_not_audited_row_by_row(tmp_path: Path, line_config) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0"])
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"".join(mbap(i, struct.pack(">BHH", 5, 2, 0xFF00 if i % 2 else 0)) for i in range(200)))
        answers = await read_answers(reader, 200)
        writer.close()
        await daemon.halt("api", "erin")
        await mb_write(port, "-t", "0", "-r", "2", values=[0])
        refused = await request(port, struct.pack(">BHH", 5, 2, 0xFF00))
        await daemon.reset("api", "erin")
        await mb_write(port, "-t", "0", "-r", "2", values=[1])
        daemon.audit_trail.flush()
        audit = daemon.store.audit_log()
    finally:
        await daemon.stop()
    assert all(body[0] == 5 for _, body in answers)
    assert refused == bytes([0x85, 0x01])
    line_rows = [(r["action"], r["role"]) for r in reversed(audit) if r["action"] != "plc.input"]
    assert line_rows == [("line.halt", "api"), ("line.reset.refused", "modbus"), ("line.reset", "api")]
    writes = [r for r in audit if r["action"] == "plc.input"]
    assert {(r["role"], r["user"], r["target"]) for r in writes} == {("modbus", HOST, "reset")}
    assert sum(r["detail"]["writes"] for r in writes) == 101, "every rising edge counted, none lost"
