"""The Modbus TCP endpoint against real clients: Debian mbpoll (independent of our code) and raw sockets.

Every test starts a real daemon (replay camera, ONNX model, DuckDB) with Modbus on a free port.
mbpoll runs as an asyncio subprocess so the daemon's loop keeps serving while it talks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import shutil
import socket
import struct
import time
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.daemon import Daemon
from appliance.demo_plc import SimulatedProcess, run_simulated_plc
from appliance.plc.modbus import ModbusEndpoint
from appliance.plc.modbus_map import MapError, load_register_map
from appliance.plc.modbus_wire import ModbusTcpServer, answer
from appliance.store import ResultFilter
from tests.brightness_model import GRADES
from tests.conftest import auth_headers, free_port, write_grade_images

pytestmark = pytest.mark.skipif(shutil.which("mbpoll") is None,
                                reason="needs Debian mbpoll (scripts/system-deps.sh)")

HOST = "127.0.0.1"
LOCAL = [ip_network(HOST)]
DI = {n: i for i, n in enumerate(["ready", "trigger_ack", "busy", "result_valid", "error",
                                  "camera_online", "halted", "trigger_failed", "image_warning",
                                  "quality_alarm"])}
PLC = {"type_head": "cell_type", "severity_head": "defect_grade"}


# -- helpers ------------------------------------------------------------------------------------

async def mbpoll(port: int, *args: str) -> tuple[int, dict[int, float], str]:
    """Run mbpoll once; return its exit code, the values it printed by address, and its output."""
    proc = await asyncio.create_subprocess_exec(
        "mbpoll", "-0", "-1", "-o", "2", "-p", str(port), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out_bytes, _ = await proc.communicate()
    out = out_bytes.decode()
    values = {int(a): float(v) for a, v in re.findall(r"^\[(\d+)\]:\s+(-?[\d.e+-]+)", out, re.M)}
    return proc.returncode or 0, values, out


async def mb_read(port: int, *args: str) -> dict[int, float]:
    rc, values, out = await mbpoll(port, *args, HOST)
    assert rc == 0, out
    return values


async def mb_write(port: int, *args: str, values: list[Any]) -> None:
    rc, _, out = await mbpoll(port, *args, HOST, "--", *map(str, values))
    assert rc == 0 and "Written" in out, out


async def status(port: int) -> dict[str, bool]:
    bits = await mb_read(port, "-t", "1", "-r", "0", "-c", str(len(DI)))
    return {name: bool(bits[i]) for name, i in DI.items()}


async def wait_status(port: int, name: str, value: bool, timeout: float = 10) -> dict[str, bool]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bits = await status(port)
        if bits[name] is value:
            return bits
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} did not become {value}: {bits}")


def ascii_registers(text: str, length: int = 16) -> list[int]:
    raw = text.encode().ljust(2 * length, b"\0")
    return list(struct.unpack(f">{length}H", raw))


def registers_text(regs: list[float]) -> str:
    return struct.pack(f">{len(regs)}H", *(int(r) for r in regs)).split(b"\0")[0].decode()


def mbap(tid: int, pdu: bytes, unit: int = 1, pid: int = 0, length: int | None = None) -> bytes:
    return struct.pack(">HHHB", tid, pid, len(pdu) + 1 if length is None else length, unit) + pdu


async def read_answers(reader: asyncio.StreamReader, n: int) -> list[tuple[int, bytes]]:
    out = []
    for _ in range(n):
        head = await asyncio.wait_for(reader.readexactly(6), 5)
        tid, _pid, length = struct.unpack(">HHH", head)
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        out.append((tid, body[1:]))  # drop the unit id
    return out


def triggered_line(tmp_path: Path, line_config, grades: list[str], **modbus: Any):
    images = tmp_path / "images"
    write_grade_images(images, grades)
    port = free_port()
    cfg = line_config(images, camera={"view": "top", "source": "replay",
                                      "replay": {"path": str(images), "triggered": True}},
                      plc=PLC, modbus={"enabled": True, "port": port, **modbus})
    return cfg, port


def free_running_line(tmp_path: Path, line_config, rate_hz: float):
    images = tmp_path / "images"
    write_grade_images(images, ["0", "1"] * 3)
    port = free_port()
    cfg = line_config(images, camera={"view": "top", "source": "replay",
                                      "replay": {"path": str(images), "rate_hz": rate_hz, "loop": True}},
                      plc=PLC, modbus={"enabled": True, "port": port})
    return cfg, port


def endpoint(daemon: Daemon) -> ModbusEndpoint:
    ep = next(e for e in daemon.endpoints if e.name == "modbus")
    assert isinstance(ep, ModbusEndpoint)
    return ep


# -- the handshake through an independent client ---------------------------------------------------

async def test_mbpoll_triggers_a_part_and_reads_the_result_through_the_handshake(
        tmp_path: Path, line_config) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0", "1/3"])
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        bits = await status(port)
        assert bits == {**dict.fromkeys(DI, False), "ready": True, "camera_online": True}
        await mb_write(port, "-t", "4", "-r", "101", values=ascii_registers("SN-0001"))
        await mb_write(port, "-t", "4", "-r", "117", values=ascii_registers("LOT-42"))
        await mb_write(port, "-t", "4:float", "-B", "-r", "133", values=[21.5])
        await mb_write(port, "-t", "0", "-r", "0", values=[1])  # trigger
        bits = await wait_status(port, "result_valid", True)
        assert bits["trigger_ack"] and not bits["ready"]
        block = await mb_read(port, "-t", "4", "-r", "10", "-c", "42")
        seq = await mb_read(port, "-t", "4:int", "-B", "-r", "10")
        first = daemon.latest
        assert first is not None
        assert seq[10] == first.seq == block[10] * 65536 + block[11]
        assert block[12] == 1  # pass
        assert block[13] == 1 and block[14] == 1  # cell_type "mono" (index 0), grade "0" (index 0)
        assert 600 <= block[15] <= 1000 and block[18] == 1  # confident, status ok
        assert registers_text([block[a] for a in range(20, 36)]) == "SN-0001"
        assert registers_text([block[a] for a in range(36, 52)]) == "LOT-42"

        await mb_write(port, "-t", "0", "-r", "1", values=[1])  # result_ack
        bits = await wait_status(port, "result_valid", False)
        assert bits["trigger_ack"]
        await mb_write(port, "-t", "0", "-r", "0", values=[0, 0])  # clear trigger and ack
        bits = await wait_status(port, "ready", True)
        assert not bits["trigger_ack"] and not bits["busy"]

        # a second part without new inputs: the part id was used up, the batch is sticky
        await mb_write(port, "-t", "0", "-r", "0", values=[1])
        await wait_status(port, "result_valid", True)
        block = await mb_read(port, "-t", "4", "-r", "10", "-c", "42")
        assert block[11] == first.seq + 1 and block[12] == 2  # rework
        assert registers_text([block[a] for a in range(20, 36)]) == "part0001"
        assert registers_text([block[a] for a in range(36, 52)]) == "LOT-42"

        daemon.store.flush()
        stored = daemon.store.get(first.result_id)
        second = daemon.store.query(ResultFilter(part_id="part0001"))
    finally:
        await daemon.stop()
    assert stored is not None
    assert stored["part_id"] == "SN-0001" and stored["batch"] == "LOT-42"
    assert stored["process_values"] == {"process_value_1": 21.5}
    assert len(second) == 1 and second[0]["batch"] == "LOT-42" and second[0]["process_values"] == {}


async def test_free_running_line_takes_part_data_written_by_the_plc(tmp_path: Path, line_config) -> None:
    cfg, port = free_running_line(tmp_path, line_config, rate_hz=50)
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        # one FC 16 from 101 carries part id, batch and process values 1-2 to the same part
        pv = list(struct.unpack(">HHHH", struct.pack(">ff", 0.0, 3.25)))
        await mb_write(port, "-t", "4", "-r", "101",
                       values=ascii_registers("FR-7") + ascii_registers("LOT-FR") + pv)
        judged = daemon.stats.judged
        await daemon.wait_for_results(judged + 5, timeout=10)
        daemon.store.flush()
        mine = daemon.store.query(ResultFilter(part_id="FR-7"))
        later = daemon.store.query(ResultFilter(batch="LOT-FR", limit=10))
    finally:
        await daemon.stop()
    assert len(mine) == 1, "a written part id belongs to exactly one part"
    assert mine[0]["batch"] == "LOT-FR"
    assert mine[0]["process_values"] == {"process_value_1": 0.0, "process_value_2": 3.25}
    assert len(later) >= 3 and all(r["batch"] == "LOT-FR" for r in later)


@pytest.mark.parametrize("word_order", ["big", "little"])
async def test_word_order_and_the_register_only_handshake(tmp_path: Path, line_config,
                                                          word_order: str) -> None:
    """A PLC that only speaks FC 3/16: control_word triggers and acks, status_word reports."""
    cfg, port = triggered_line(tmp_path, line_config, ["2/3"], word_order=word_order)
    order = ["-B"] if word_order == "big" else []
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        await mb_write(port, "-t", "4:float", *order, "-r", "139", values=[-1234.5])
        raw = await mb_read(port, "-t", "4", "-r", "139", "-c", "2")
        words = list(struct.unpack(">HH", struct.pack(">f", -1234.5)))
        assert [raw[139], raw[140]] == (words if word_order == "big" else words[::-1])
        await mb_write(port, "-t", "4", "-r", "100", values=[1])  # control_word: trigger
        deadline = time.monotonic() + 10
        while not int((await mb_read(port, "-t", "4", "-r", "1"))[1]) & 0b1000:  # result_valid
            assert time.monotonic() < deadline
        seq = await mb_read(port, "-t", "4:int", *order, "-r", "10")
        codes = await mb_read(port, "-t", "4", "-r", "12", "-c", "3")
        await mb_write(port, "-t", "4", "-r", "100", values=[2])  # trigger off, result_ack on
        word = int((await mb_read(port, "-t", "4", "-r", "1"))[1])
        control = await mb_read(port, "-t", "0", "-r", "0", "-c", "3")
        latest = daemon.latest
        daemon.store.flush()
        stored = daemon.store.get(latest.result_id) if latest else None
    finally:
        await daemon.stop()
    assert latest is not None and seq[10] == latest.seq
    assert codes == {12: 3, 13: 2, 14: 3}  # reject, cell_type poly, grade 2/3
    assert word & 0b1010 == 0  # trigger_ack and result_valid cleared
    assert control == {0: 0, 1: 1, 2: 0}
    assert stored is not None and stored["process_values"] == {"process_value_4": -1234.5}


async def test_trigger_on_a_halted_line_is_reported_and_reset_recovers(tmp_path: Path, line_config) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0"])
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        await daemon.halt("modbus", HOST)
        await mb_write(port, "-t", "4", "-r", "101", values=ascii_registers("KEEP-ME"))
        await mb_write(port, "-t", "0", "-r", "0", values=[1])
        bits = await wait_status(port, "trigger_failed", True)
        error = await mb_read(port, "-t", "4", "-r", "2", "-c", "2")
        await mb_write(port, "-t", "0", "-r", "0", values=[0, 0, 1])  # trigger off, reset on
        after = await wait_status(port, "halted", False)
        await mb_write(port, "-t", "0", "-r", "2", values=[0])
        kept = daemon.context.part_id
    finally:
        await daemon.stop()
    assert bits["halted"] and not bits["ready"] and not bits["busy"] and not bits["result_valid"]
    assert error == {2: 2, 3: 1}  # vision_state halted, trigger_error halted
    assert after["ready"] and not after["trigger_failed"]
    assert kept == "KEEP-ME", "inputs of a refused trigger wait for the next part"


async def test_image_health_and_quality_alarms_reach_the_plc(tmp_path: Path, line_config) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0"])
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        quiet = await status(port)
        daemon.image_health.alarm = True  # as after a drift (tests/unit/test_image_health.py)
        daemon.quality_alarm = True  # as after the control chart left its limits
        raised = await wait_status(port, "quality_alarm", True)
        word = (await mb_read(port, "-t", "4", "-r", "1", "-c", "1"))[1]  # status_word
    finally:
        await daemon.stop()
    assert not quiet["image_warning"] and not quiet["quality_alarm"]
    assert raised["image_warning"] and raised["ready"], "a warning, not a stop: the line still takes triggers"
    assert int(word) & (1 << 8) and int(word) & (1 << 9)


async def test_a_camera_that_refuses_the_trigger_is_reported(tmp_path: Path, line_config,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0"])
    daemon = Daemon(cfg)
    await daemon.start()

    async def broken_trigger() -> None:
        raise OSError("GenTL: device lost")

    try:
        monkeypatch.setattr(daemon.source, "trigger", broken_trigger)
        await mb_write(port, "-t", "0", "-r", "0", values=[1])
        bits = await wait_status(port, "trigger_failed", True)
        error = await mb_read(port, "-t", "4", "-r", "3")
    finally:
        await daemon.stop()
    assert not bits["busy"] and bits["trigger_ack"] and not bits["result_valid"]
    assert error == {3: 5}  # camera error



# -- ready: 1 exactly when a trigger would be served -----------------------------------------------

async def test_ready_is_0_on_a_free_running_line_whose_camera_refuses_triggers(
        tmp_path: Path, line_config) -> None:
    """The reviewer's demo line: a free-running camera at 10 parts/s, operational and online."""
    cfg, port = free_running_line(tmp_path, line_config, rate_hz=10)
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        before = await status(port)
        regs = await mb_read(port, "-t", "4", "-r", "1", "-c", "2")  # status_word, vision_state
        await mb_write(port, "-t", "0", "-r", "0", values=[1])  # a PLC that ignores ready
        refused = await wait_status(port, "trigger_failed", True)
        error = await mb_read(port, "-t", "4", "-r", "3")
    finally:
        await daemon.stop()
    assert before["camera_online"] and regs[2] == 1, "operational and online, as in the demo"
    assert not before["ready"] and int(regs[1]) & 1 == 0, "status_word bit 0 says the same"
    assert error == {3: 2} and not refused["ready"], "the refusal ready announced: camera runs free"


async def test_ready_follows_the_acquisition_mode_and_the_camera(tmp_path: Path, line_config) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0"])
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        triggered = await status(port)
        # no trigger, no frame: nothing clears the stall while the camera is marked offline
        daemon.camera_stalled = True  # as after a stall: the camera is offline, vision state error
        offline = await status(port)
        daemon.camera_stalled = False
        online = await status(port)
        await daemon.set_continuous(True)  # e.g. OPC UA StartContinuous
        free = await status(port)
        await mb_write(port, "-t", "0", "-r", "0", values=[1])
        refused = await wait_status(port, "trigger_failed", True)
        error = await mb_read(port, "-t", "4", "-r", "3")
        await mb_write(port, "-t", "0", "-r", "0", values=[0])
        await daemon.set_continuous(False)
        back = await wait_status(port, "ready", True)
    finally:
        await daemon.stop()
    assert triggered["ready"]
    assert not offline["ready"] and not offline["camera_online"] and offline["error"]
    assert online["ready"]
    assert not free["ready"] and free["camera_online"]
    assert error == {3: 2} and not refused["ready"]
    assert back["ready"]


async def test_ready_is_0_once_a_finite_replay_has_delivered_its_last_image(
        tmp_path: Path, line_config) -> None:
    images = tmp_path / "images"
    write_grade_images(images, ["0"])
    port = free_port()
    cfg = line_config(images, camera={"view": "top", "source": "replay",
                                      "replay": {"path": str(images), "triggered": True, "loop": False}},
                      plc=PLC, modbus={"enabled": True, "port": port})
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        first = await status(port)
        await mb_write(port, "-t", "0", "-r", "0", values=[1])
        await wait_status(port, "result_valid", True)
        await mb_write(port, "-t", "0", "-r", "0", values=[0])
        await wait_status(port, "trigger_ack", False)
        await asyncio.sleep(0.2)
        after = await status(port)
        finished = daemon.source.finished
    finally:
        await daemon.stop()
    assert first["ready"]
    assert finished and not after["ready"], "no further frame will come: a trigger would never be served"


# -- process values: what the PLC wrote -------------------------------------------------------------

async def test_float32_process_values_are_stored_as_the_plc_wrote_them(tmp_path: Path, line_config) -> None:
    """12.02 written as a REAL is stored, served and exported as 12.02, not 12.020000457763672."""
    cfg, port = triggered_line(tmp_path, line_config, ["0"])
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        await mb_write(port, "-t", "4:float", "-B", "-r", "133", values=[12.02, 252.2, -0.1])
        await mb_write(port, "-t", "0", "-r", "0", values=[1])
        await wait_status(port, "result_valid", True)
        latest = daemon.latest
        assert latest is not None
        daemon.store.flush()
        stored = daemon.store.get(latest.result_id)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}/api/v1") as api:
            served = await api.get(f"/results/{latest.result_id}", headers=auth_headers(daemon, "operator"))
            exported = await api.get("/analytics/export", headers=auth_headers(daemon, "engineer"))  # CSV
    finally:
        await daemon.stop()
    wanted = {"process_value_1": 12.02, "process_value_2": 252.2, "process_value_3": -0.1}
    assert latest.process_values == wanted
    assert stored is not None and stored["process_values"] == wanted
    assert served.status_code == 200 and served.json()["process_values"] == wanted
    assert exported.status_code == 200, exported.text
    assert "12.02" in exported.text and "252.2" in exported.text
    for noise in ("12.0200004", "252.199996", "0.100000001"):
        assert noise not in served.text and noise not in exported.text


# -- the wire: pipelining, exceptions, garbage, limits ---------------------------------------------

async def test_pipelined_requests_in_one_segment_are_all_answered_in_order(
        tmp_path: Path, line_config) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0"])
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        pipelined = b"".join([
            mbap(1, struct.pack(">BHHB", 16, 101, 2, 4) + b"PIPE"),  # write part_id
            mbap(2, struct.pack(">BHH", 3, 101, 2)),                   # read it back
            mbap(3, struct.pack(">BHH", 2, 0, 8)),                     # status bits
        ])
        writer.write(pipelined)
        three = await read_answers(reader, 3)
        writer.write(b"".join(mbap(100 + i, struct.pack(">BHH", 3, 0, 1)) for i in range(50)))
        fifty = await read_answers(reader, 50)
        frame = mbap(7, struct.pack(">BHH", 1, 0, 3))
        writer.write(frame[:5])  # one request split over two segments
        await asyncio.sleep(0.05)
        writer.write(frame[5:] + mbap(8, struct.pack(">BHH", 3, 0, 1))[:9])
        await asyncio.sleep(0.05)
        writer.write(mbap(8, struct.pack(">BHH", 3, 0, 1))[9:])
        split = await read_answers(reader, 2)
        writer.close()
    finally:
        await daemon.stop()
    assert [t for t, _ in three] == [1, 2, 3]
    assert three[0][1] == struct.pack(">BHH", 16, 101, 2)
    assert three[1][1] == bytes([3, 4]) + b"PIPE"
    assert three[2][1][0] == 2
    assert [t for t, _ in fifty] == list(range(100, 150))
    assert [t for t, _ in split] == [7, 8] and split[0][1][0] == 1


async def test_stock_pymodbus_server_answers_only_the_first_pipelined_request() -> None:
    """Why appliance.plc.modbus_wire exists; if this fails, pymodbus fixed it and the workaround can go."""
    import logging

    from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
    from pymodbus.server import ModbusTcpServer as StockServer

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    port = free_port()
    ctx = ModbusServerContext(devices={1: ModbusDeviceContext(hr=ModbusSequentialDataBlock(1, [7] * 10))})
    server = StockServer(ctx, address=(HOST, port))
    task = asyncio.create_task(server.serve_forever())
    tids: list[int] = []
    try:
        for _ in range(100):
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
                break
            except OSError:
                await asyncio.sleep(0.02)
        writer.write(b"".join(mbap(i, struct.pack(">BHH", 3, 0, 1)) for i in (1, 2, 3)))
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError):
            while True:
                head = await asyncio.wait_for(reader.readexactly(6), 1.0)
                tids.append(struct.unpack(">H", head[:2])[0])
                await reader.readexactly(struct.unpack(">H", head[4:])[0])
        writer.close()
    finally:
        await server.shutdown()
        task.cancel()
    assert tids == [1], tids


async def test_writes_the_plc_may_not_make_get_a_modbus_exception(tmp_path: Path, line_config) -> None:
    cfg, port = triggered_line(tmp_path, line_config, ["0"])
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        rc, _, out = await mbpoll(port, "-t", "4", "-r", "12", HOST, "--", "3")  # disposition_code
        reader, writer = await asyncio.open_connection(HOST, port)
        nan = struct.pack(">f", math.nan)
        cases = [
            struct.pack(">BHH", 6, 0, 5),                          # heartbeat (read only)
            struct.pack(">BHHB", 16, 98, 4, 8) + bytes(8),         # 98..101: starts outside the map
            struct.pack(">BHH", 5, 7, 0xFF00),                     # a coil that does not exist
            struct.pack(">BHH", 6, 133, 1),                        # half a float32
            struct.pack(">BHHB", 16, 133, 2, 4) + nan,             # NaN process value
            struct.pack(">BHHB", 16, 101, 1, 2) + b"\xc3\xa9",     # non-ASCII part id
            struct.pack(">BHH", 5, 0, 0x1234),                     # coil value neither ON nor OFF
            struct.pack(">BHH", 3, 0, 126),                        # too many registers
            struct.pack(">BHH", 3, 140, 2),                        # read past the map
            struct.pack(">BBB", 0x2B, 0x0E, 1),                    # a function not served
        ]
        writer.write(b"".join(mbap(i, pdu) for i, pdu in enumerate(cases)))
        writer.write(mbap(99, struct.pack(">BHH", 3, 0, 1), unit=9))  # another unit id
        answers = await read_answers(reader, len(cases) + 1)
        writer.close()
        dispo = await mb_read(port, "-t", "4", "-r", "12")
    finally:
        await daemon.stop()
    assert rc != 0 and "Illegal data address" in out, out
    expected = [(0x86, 2), (0x90, 2), (0x85, 2), (0x86, 2), (0x90, 3), (0x90, 3), (0x85, 3),
                (0x83, 3), (0x83, 2), (0xAB, 1), (0x83, 0x0B)]
    assert [(body[0], body[1]) for _, body in answers] == expected
    assert dispo[12] == 0, "a refused write changes nothing"


async def test_10000_malformed_frames_leave_the_server_answering_and_the_line_running(
        tmp_path: Path, line_config) -> None:
    images = tmp_path / "images"
    write_grade_images(images, GRADES)
    port = free_port()
    cfg = line_config(images, camera={"view": "top", "source": "replay",
                                      "replay": {"path": str(images), "rate_hz": 100, "loop": True}},
                      modbus={"enabled": True, "port": port})
    rng = random.Random(1234)
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        server = endpoint(daemon).server
        assert server is not None
        judged_before = daemon.stats.judged
        sent = 0
        for kind in ("random", "protocol_id", "length", "truncated"):  # each costs the connection
            for _ in range(500):
                _, writer = await asyncio.open_connection(HOST, port)
                body = struct.pack(">BHH", 3, 0, 1)
                frame = {
                    "random": rng.randbytes(rng.randint(1, 40)),
                    "protocol_id": mbap(1, body, pid=rng.randint(1, 0xFFFF)),
                    "length": mbap(1, body, length=rng.choice([0, 1, *range(256, 65536, 97)])),
                    "truncated": mbap(1, body)[: rng.randint(1, 11)],
                }[kind]
                writer.write(frame)
                writer.close()
                sent += 1
        reader, writer = await asyncio.open_connection(HOST, port)
        while sent < 10_000:  # frames with a sound header and a bad PDU: answered with exceptions
            batch = []
            for _ in range(100):
                fc = rng.choice([0, 1, 2, 3, 4, 7, 8, 17, 20, 22, 23, 24, 43, 0x7F, 0x80, 0xFF])
                pdu = bytes([fc]) + rng.randbytes(rng.randint(0, 20))
                if fc in (1, 2, 3, 4) and len(pdu) == 5:
                    pdu += b"\0"  # keep it malformed (a valid read would be fine, but not the point)
                batch.append(mbap(sent + len(batch), pdu, unit=rng.choice([1, 1, 1, 0, 255, 17])))
            writer.write(b"".join(batch))
            answers = await read_answers(reader, len(batch))
            assert all(body[0] & 0x80 for _, body in answers)
            sent += len(batch)
        writer.close()
        values = await mb_read(port, "-t", "4", "-r", "0", "-c", "3")
        await daemon.wait_for_results(judged_before + 3, timeout=10)
        state, running = daemon.state, daemon.running
        counters = dict(server.counters)
        await asyncio.sleep(0.1)
        open_connections = len(server.connections)
    finally:
        await daemon.stop()
    assert sent == 10_000
    assert values[2] == 1 and state == "operational" and running  # vision_state operational
    assert counters["malformed"] >= 1000 and counters["exceptions"] >= 8000
    assert counters["internal_errors"] == 0
    assert open_connections == 0


class _Bank:
    def read(self, table: str, address: int, count: int) -> list[int]:
        return [address + i for i in range(count)]

    def write(self, table: str, address: int, values: list[int], peer: str) -> None:
        pass


async def test_connection_limit_and_idle_timeout() -> None:
    server = ModbusTcpServer(_Bank(), host=HOST, port=0, unit_id=1, allowed_clients=LOCAL, max_connections=2,
                             max_connections_per_client=2, idle_timeout_s=0.5)
    await server.start()
    request = mbap(1, struct.pack(">BHH", 3, 5, 1))
    try:
        first = await asyncio.open_connection(HOST, server.port)
        second = await asyncio.open_connection(HOST, server.port)
        third = await asyncio.open_connection(HOST, server.port)
        third[1].write(request)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(third[0].readexactly(1), 2)
        for reader, writer in (first, second):
            writer.write(request)
            assert (await read_answers(reader, 1))[0][1] == bytes([3, 2, 0, 5])
        second[1].close()
        await asyncio.sleep(0.1)
        fourth = await asyncio.open_connection(HOST, server.port)
        fourth[1].write(request)
        assert (await read_answers(fourth[0], 1))[0][1] == bytes([3, 2, 0, 5])
        await asyncio.sleep(0.8)  # both idle now
        assert await asyncio.wait_for(first[0].read(), 2) == b""
        assert server.counters["refused"] == 1 and server.counters["idle_closed"] >= 1
    finally:
        await server.stop()


async def test_a_bad_register_map_stops_the_start_and_frees_the_port(tmp_path: Path, line_config) -> None:
    shipped = load_register_map(None, "big").source.read_text()
    bad = tmp_path / "map.yaml"
    bad.write_text(shipped.replace("    address: 13\n", "    address: 12\n"))
    cfg, port = triggered_line(tmp_path, line_config, ["0"], register_map=str(bad))
    with pytest.raises(MapError, match=r"defect_type_code.*overlaps.*disposition_code"):
        await Daemon(cfg).start()
    with socket.socket() as s:
        s.bind((HOST, port))  # nothing is left listening


def test_answer_never_raises_on_random_pdus() -> None:
    rng = random.Random(7)
    for _ in range(20_000):
        pdu = bytes([rng.choice([1, 2, 3, 4, 5, 6, 15, 16, rng.randrange(256)])]) + rng.randbytes(
            rng.randint(0, 30))
        reply = answer(_Bank(), pdu, HOST)
        assert reply[0] in (pdu[0], pdu[0] | 0x80)


# -- the demo's simulated PLC ----------------------------------------------------------------------

async def test_the_demos_simulated_plc_gives_every_part_a_lot_and_its_own_readings(
        tmp_path: Path, line_config) -> None:
    cfg, port = free_running_line(tmp_path, line_config, rate_hz=20)
    daemon = Daemon(cfg)
    await daemon.start()
    plc = asyncio.create_task(run_simulated_plc(
        "127.0.0.1", port, cfg.modbus.unit_id, load_register_map(None, cfg.modbus.word_order),
        SimulatedProcess(parts_per_batch=5), poll_s=0.005))
    try:
        await daemon.wait_for_results(daemon.stats.judged + 25, timeout=20)
        daemon.store.flush()
        rows = daemon.store.query(ResultFilter(limit=100))
    finally:
        plc.cancel()
        await asyncio.gather(plc, return_exceptions=True)
        await daemon.stop()
    fed = [r for r in rows if r["process_values"]]
    assert len(fed) >= 15, "after its first poll the PLC feeds every part"
    lots = {r["batch"] for r in fed}
    assert {"LOT-0001", "LOT-0002", "LOT-0003"} <= lots, lots
    temperatures = [r["process_values"]["process_value_1"] for r in fed]
    assert all(235 <= t <= 255 for t in temperatures)
    assert all(t == round(t, 1) for t in temperatures), "stored as the PLC wrote them, no float32 noise"
    assert len(set(temperatures)) > len(fed) // 2, "each part gets the reading of its own moment"
    assert all(r["part_id"].startswith("part") for r in fed), "no part id written: the image names stay"
