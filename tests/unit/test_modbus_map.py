"""The Modbus register map: the shipped file, what a bad map is told, the value codec, access rules."""

from __future__ import annotations

import math
import random
import re
import struct
from pathlib import Path

import pytest

from appliance.demo_plc import SimulatedProcess
from appliance.errors import UserError
from appliance.plc.modbus import RegisterImage
from appliance.plc.modbus_map import (
    REQUIRED,
    MapError,
    decode,
    default_map_path,
    encode,
    load_register_map,
    markdown_table,
)
from appliance.plc.modbus_wire import ModbusError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plc-modbus.md"
SHIPPED = default_map_path().read_text()


def bad_map(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "map.yaml"
    path.write_text(text)
    return path


def replace_entry(name: str, **fields: object) -> str:
    """The shipped map with fields of entry ``name`` replaced (or added)."""
    lines = SHIPPED.splitlines()
    start = lines.index(f"  - name: {name}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("  - ")), len(lines))
    body = [ln for ln in lines[start + 1:end] if ln.split(":")[0].strip() not in fields]
    body += [f"    {k}: {v}" for k, v in fields.items()]
    return "\n".join([*lines[:start + 1], *body, *lines[end:]]) + "\n"


def test_the_shipped_map_loads_and_binds_every_name() -> None:
    regmap = load_register_map(None, "big")
    assert set(REQUIRED) <= {e.name for e in regmap.entries}
    assert [e.name for e in regmap.process_values] == [f"process_value_{i}" for i in range(1, 5)]
    block = [regmap[n] for n in ("result_sequence", "disposition_code", "result_part_id", "result_batch")]
    assert max(e.end for e in block) - min(e.address for e in block) <= 125, "one FC 3 reads the block"
    assert regmap.enums["disposition"] == {"none": 0, "pass": 1, "rework": 2, "reject": 3, "hold": 4}


def test_the_docs_carry_exactly_the_table_of_the_map() -> None:
    assert markdown_table(load_register_map(None, "big")) in DOCS.read_text()


@pytest.mark.parametrize(("text", "message"), [
    (SHIPPED.replace("    address: 13\n", "    address: 12\n"),
     r"map.yaml:\d+: registers\[\d+\] \(defect_type_code\) at holding_register 12..12 overlaps "
     r"registers\[\d+\] \(disposition_code\)"),
    (replace_entry("heartbeat", type="int16"), r"\(heartbeat\): the appliance needs heartbeat as uint16"),
    (replace_entry("process_value_1", process_value="false"), r"\(process_value_1\): unknown name"),
    (replace_entry("result_part_id", length="null"), r"\(result_part_id\): strings need 'length'"),
    (replace_entry("result_sequence", word_order="null"), r"\(result_sequence\): 32-bit types need"),
    (replace_entry("busy", access="rw"), r"\(busy\): access rw is impossible in table discrete_input"),
    (replace_entry("halted", bit=0), r"\(halted\): bit 0 already used by registers\[0\] \(ready\)"),
    (replace_entry("disposition_code", enum="colours"), r"enum 'colours' is not defined"),
    (replace_entry("process_value_2", type="string", length=2),
     r"\(process_value_2\): a process value must be a writable \(rw\) numeric"),
    (SHIPPED.replace("  - name: process_value_3\n", "  - name: process_value_4\n"),
     r"\(process_value_4\): name already used by registers"),
    (SHIPPED.replace("{none: 0, pass: 1, rework: 2, reject: 3, hold: 4}", "{none: 0, pass: 1, hold: 1}"),
     r"enums.disposition lacks rework, reject[\s\S]*enums.disposition: codes must be distinct"),
    (re.sub(r"  - name: heartbeat\n(    .*\n)+", "", SHIPPED), r"registers: missing heartbeat"),
    (replace_entry("reset", address=-3), r"map.yaml:\d+: registers\[\d+\] \(reset\)\.address: .*"
                                         r"greater than or equal to 0 \(got -3\)"),
    (replace_entry("trigger", colour="red"), r"registers\[\d+\] \(trigger\)\.colour: unknown key"),
    ("version: 1\nregisters: [\n", r"map.yaml:\d+: invalid YAML"),
])
def test_a_bad_map_is_refused_naming_file_line_and_entry(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(MapError, match=message):
        load_register_map(bad_map(tmp_path, text), "big")


def test_a_missing_map_file_says_which_setting_to_fix(tmp_path: Path) -> None:
    with pytest.raises(MapError, match=r"does not exist.*modbus\.register_map"):
        load_register_map(tmp_path / "nope.yaml", "big")


def test_32_bit_values_honour_the_word_order() -> None:
    regmap = load_register_map(None, "little")
    seq, pv = regmap["result_sequence"], regmap["process_value_1"]
    assert encode(seq, 0x12345678, "big") == [0x1234, 0x5678]
    assert encode(seq, 0x12345678, "little") == [0x5678, 0x1234]
    assert regmap.encode(seq, 0x12345678) == [0x5678, 0x1234]  # word_order: config follows the line
    assert encode(pv, 1.5, "big") == [0x3FC0, 0x0000]
    for order in ("big", "little"):
        for value in (0.0, -1234.5, 3.25e-7, 1e30):
            decoded = decode(pv, encode(pv, value, order), order)
            assert decoded == value and struct.pack(">f", decoded) == struct.pack(">f", value)
        assert decode(seq, encode(seq, 4_000_000_000, order), order) == 4_000_000_000
    pinned = seq.model_copy(update={"word_order": "big"})
    assert regmap.encode(pinned, 1) == [0, 1], "an explicit order in the map wins over the config"


def test_a_float32_process_value_is_what_the_plc_wrote_not_its_binary_expansion() -> None:
    """A PLC's REAL 12.02 is the float32 12.0200004577...; the appliance stores 12.02 (its shortest
    decimal, which rounds back to the very same float32), so the API and exports show what the PLC
    showed."""
    pv = load_register_map(None, "big")["process_value_1"]
    for order in ("big", "little"):
        for value in (12.02, 252.2, 0.1, -7.3, 12.5, 245.0, 1e-45, 3.4028235e38, -3.4028235e38):
            decoded = decode(pv, encode(pv, value, order), order)
            assert isinstance(decoded, float) and repr(decoded) == repr(value), (order, value, decoded)
    assert repr(decode(pv, [0x8000, 0])) == "-0.0", "the sign of zero stays"
    rng = random.Random(32)
    for _ in range(20_000):  # any bit pattern: the same float32, in the fewest digits that say so
        bits = rng.getrandbits(32)
        raw = struct.pack(">I", bits)
        (exact,) = struct.unpack(">f", raw)
        if not math.isfinite(exact):
            continue
        decoded = decode(pv, [bits >> 16, bits & 0xFFFF])
        assert isinstance(decoded, float) and struct.pack(">f", decoded) == raw, hex(bits)
        digits = next(p for p in range(1, 10) if struct.pack(">f", float(f"{exact:.{p}g}")) == raw)
        assert decoded == float(f"{exact:.{digits}g}"), hex(bits)


@pytest.mark.parametrize("value", [math.nan, -math.nan, math.inf, -math.inf])
def test_nan_and_infinite_process_values_are_still_refused(value: float) -> None:
    pv = load_register_map(None, "big")["process_value_1"]
    with pytest.raises(ValueError, match="NaN and infinities"):
        decode(pv, list(struct.unpack(">HH", struct.pack(">f", value))))
    with pytest.raises(ValueError, match="NaN and infinities"):  # a NaN with a payload too
        decode(pv, [0x7FC1, 0x2345])


def test_strings_are_ascii_two_characters_per_register() -> None:
    part = load_register_map(None, "big")["part_id"]
    regs = encode(part, "AB-12")
    assert regs[:4] == [0x4142, 0x2D31, 0x3200, 0] and len(regs) == 16
    assert decode(part, regs) == "AB-12"
    assert decode(part, encode(part, "X" * 40)) == "X" * 32, "longer text is cut to the field"
    assert decode(part, [0x4142, 0x2020] + [0] * 14) == "AB", "trailing spaces (S7 padding) are dropped"
    with pytest.raises(ValueError, match="printable ASCII"):
        decode(part, [0x41C3, 0xA900] + [0] * 14)
    with pytest.raises(ValueError, match="NaN"):
        decode(load_register_map(None, "big")["process_value_1"],
               list(struct.unpack(">HH", struct.pack(">f", math.inf))))


def test_the_register_image_enforces_the_access_rules() -> None:
    image = RegisterImage(load_register_map(None, "big"))
    hr = "holding_register"
    for address, values, code in [
        (0, [1], 2),                 # heartbeat is read only
        (12, [1], 2),                # the result block too
        (99, [0, 0], 2),             # 99 is not in the map
        (133, [0x3FC0], 2),          # half a float32
        (134, [0, 0], 2),            # straddles two float32 values
        (140, [0, 0], 2),            # past the end of the map
        (101, [0x41C3], 3),          # not ASCII
        (133, list(struct.unpack(">HH", struct.pack(">f", math.nan))), 3),
    ]:
        with pytest.raises(ModbusError) as err:
            image.write(hr, address, values)
        assert err.value.code == code, (address, values)
    assert image.read(hr, 0, 141) == [0] * 141, "a refused write stores nothing"
    touched = image.write(hr, 101, [0x4142, 0, 0x4C4F, 0x5400])  # part_id "AB", ... then more part_id
    assert [e.name for e in touched] == ["part_id"] and image.get("part_id") == "AB"
    touched = image.write(hr, 131, [0, 0, 0x3FC0, 0])  # end of batch + process_value_1
    assert [e.name for e in touched] == ["batch", "process_value_1"] and image.get("process_value_1") == 1.5
    with pytest.raises(ModbusError) as err:
        image.read(hr, 140, 2)
    assert err.value.code == 2
    with pytest.raises(ModbusError):
        image.write("coil", 3, [1])


def test_the_demos_simulated_plc_writes_its_inputs_in_one_request_or_refuses_the_map(tmp_path: Path) -> None:
    shipped = load_register_map(None, "big")
    start, words = SimulatedProcess().registers(shipped)
    assert start == shipped["batch"].address and len(words) == 16 + 2 + 2
    assert decode(shipped["batch"], words[:16]) == "LOT-0001"
    assert decode(shipped["process_value_1"], words[16:18]) == pytest.approx(245.0)
    apart = load_register_map(bad_map(tmp_path, replace_entry("process_value_2", address=150)), "big")
    with pytest.raises(UserError, match="contiguous"):
        SimulatedProcess().registers(apart)
