"""The Modbus register map: a YAML file the PLC programmer and the appliance both read.

The map is data, not code, so an integrator can read (and, if a PLC program demands it, move) every
address without reading Python.  The code binds to entries by *name*; this module checks at start
that every name the appliance needs is present with the type and access it needs, that nothing
overlaps, and that 32-bit values say which word goes first.  A bad map is refused with a message
naming the file, line and entry.  It also holds the value codec (registers <-> Python values),
so the server and the tests encode values the same way.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.errors import UserError
from appliance.yamlio import load_yaml_with_lines, validation_message

Table = Literal["coil", "discrete_input", "input_register", "holding_register"]
ValueType = Literal["bool", "uint16", "int16", "uint32", "int32", "float32", "string"]
WordOrder = Literal["big", "little"]
Value = bool | int | float | str

BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete_input"})
WRITABLE_TABLES: frozenset[str] = frozenset({"coil", "holding_register"})
WIDTH = {"bool": 1, "uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2}
STRUCT = {"uint16": ">H", "int16": ">h", "uint32": ">I", "int32": ">i", "float32": ">f"}

# What the appliance binds to: name -> (allowed tables, type, access, enum it must use).
STATUS_BITS = ("ready", "trigger_ack", "busy", "result_valid", "error", "camera_online", "halted",
               "trigger_failed", "image_warning", "quality_alarm")
CONTROL_BITS = ("trigger", "result_ack", "reset")
_OUT = ("input_register", "holding_register")
_IN = ("holding_register",)
REQUIRED: dict[str, tuple[tuple[str, ...], str, str, str | None]] = {
    **{n: (("discrete_input",), "bool", "r", None) for n in STATUS_BITS},
    **{n: (("coil",), "bool", "rw", None) for n in CONTROL_BITS},
    "heartbeat": (_OUT, "uint16", "r", None),
    "status_word": (_OUT, "uint16", "r", None),
    "vision_state": (_OUT, "uint16", "r", "vision_state"),
    "trigger_error": (_OUT, "uint16", "r", "trigger_error"),
    "result_sequence": (_OUT, "uint32", "r", None),
    "disposition_code": (_OUT, "uint16", "r", "disposition"),
    "defect_type_code": (_OUT, "uint16", "r", None),
    "severity_code": (_OUT, "uint16", "r", None),
    "confidence_permille": (_OUT, "uint16", "r", None),
    "defect_type_confidence_permille": (_OUT, "uint16", "r", None),
    "severity_confidence_permille": (_OUT, "uint16", "r", None),
    "result_status": (_OUT, "uint16", "r", "result_status"),
    "result_part_id": (_OUT, "string", "r", None),
    "result_batch": (_OUT, "string", "r", None),
    "control_word": (_IN, "uint16", "rw", None),
    "part_id": (_IN, "string", "rw", None),
    "batch": (_IN, "string", "rw", None),
}
# Every code the appliance can emit must be in the map's enums.
REQUIRED_ENUMS: dict[str, tuple[str, ...]] = {
    "disposition": ("none", "pass", "rework", "reject", "hold"),
    "vision_state": ("preoperational", "operational", "halted", "error"),
    "result_status": ("none", "ok", "failed"),
    "trigger_error": ("none", "halted", "not_triggerable", "frame_dropped", "stopped", "camera_failed"),
}


class MapError(UserError):
    """The register map file is invalid; the message names the file, line and entry."""


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,47}$", description="What the code binds to.")
    table: Table
    address: int = Field(ge=0, le=65535, description="0-based (PDU) address of the first register/bit.")
    type: ValueType
    access: Literal["r", "rw"] = Field(description="rw: the PLC may write it; r: writes get exception 02.")
    description: str = Field(min_length=1)
    length: int | None = Field(default=None, ge=1, le=62, description="Registers of a string (2 chars each).")
    word_order: Literal["config", "big", "little"] | None = Field(
        default=None, description="32-bit values: 'config' follows modbus.word_order.")
    bit: int | None = Field(default=None, ge=0, le=15, description="Bit in status_word/control_word.")
    enum: str | None = Field(default=None, description="The codes this register takes (map 'enums').")
    process_value: bool = Field(default=False, description="Stored with the next result under its name.")

    @property
    def width(self) -> int:
        """Registers (or bits) this entry occupies."""
        return (self.length or 0) if self.type == "string" else WIDTH[self.type]

    @property
    def end(self) -> int:
        return self.address + self.width


class MapFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1]
    enums: dict[str, dict[str, int]] = Field(default_factory=dict)
    registers: list[Entry] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class RegisterMap:
    """A validated map; ``word_order`` is what 32-bit entries with ``word_order: config`` use."""

    entries: tuple[Entry, ...]
    enums: dict[str, dict[str, int]]
    word_order: WordOrder
    source: Path
    by_name: dict[str, Entry]

    def __getitem__(self, name: str) -> Entry:
        return self.by_name[name]

    def table(self, table: str) -> list[Entry]:
        return sorted((e for e in self.entries if e.table == table), key=lambda e: e.address)

    def size(self, table: str) -> int:
        """Addresses 0..size-1 of ``table`` are readable (gaps read as 0)."""
        return max((e.end for e in self.entries if e.table == table), default=0)

    @property
    def process_values(self) -> list[Entry]:
        return [e for e in self.entries if e.process_value]

    def code(self, enum: str, key: str) -> int:
        return self.enums[enum][key]

    def order(self, entry: Entry) -> WordOrder:
        if entry.word_order == "big" or entry.word_order == "little":
            return entry.word_order
        return self.word_order

    def encode(self, entry: Entry, value: Value) -> list[int]:
        return encode(entry, value, self.order(entry))

    def decode(self, entry: Entry, registers: Sequence[int]) -> Value:
        return decode(entry, registers, self.order(entry))


def default_map_path() -> Path:
    """The shipped map (``configs/modbus_map.yaml`` beside the ``appliance`` package)."""
    return Path(__file__).resolve().parents[2] / "configs" / "modbus_map.yaml"


def load_register_map(path: Path | None, word_order: WordOrder) -> RegisterMap:
    """Load and validate ``path`` (the shipped map when None); raise MapError naming the entry."""
    path = path or default_map_path()
    if not path.is_file():
        raise MapError(f"{path}: the Modbus register map does not exist (set modbus.register_map)")
    try:
        data, lines = load_yaml_with_lines(path)
    except UserError as exc:
        raise MapError(str(exc)) from None
    try:
        parsed = MapFile.model_validate(data)
    except ValidationError as exc:
        raise MapError("invalid Modbus register map:\n"
                       + _named(validation_message(path, exc, lines), data)) from None
    problems: list[str] = []
    for i, entry in enumerate(parsed.registers):
        where = f"{path}:{lines.get(('registers', i), '?')}: registers[{i}] ({entry.name})"
        problems += [f"{where}: {p}" for p in _entry_problems(entry, parsed.enums)]
    problems += _map_problems(parsed, path, lines)
    if problems:
        raise MapError("invalid Modbus register map:\n" + "\n".join(problems))
    return RegisterMap(tuple(parsed.registers), parsed.enums, word_order, path,
                       {e.name: e for e in parsed.registers})


def _named(message: str, data: object) -> str:
    """Add the entry's name to ``registers.<i>`` in pydantic's messages."""
    regs = data.get("registers") if isinstance(data, dict) else None
    if not isinstance(regs, list):
        return message
    for i, reg in enumerate(regs):
        if isinstance(reg, dict) and "name" in reg:
            message = message.replace(f": registers.{i}.", f": registers[{i}] ({reg['name']}).")
            message = message.replace(f": registers.{i}:", f": registers[{i}] ({reg['name']}):")
    return message


def _entry_problems(e: Entry, enums: dict[str, dict[str, int]]) -> list[str]:
    out = []
    if (e.type == "bool") != (e.table in BIT_TABLES):
        out.append(f"type {e.type} cannot live in table {e.table} (bool <-> coil/discrete_input)")
    if e.access == "rw" and e.table not in WRITABLE_TABLES:
        out.append(f"access rw is impossible in table {e.table} (Modbus has no write function for it)")
    if (e.type == "string") != (e.length is not None):
        out.append("strings need 'length' (registers); other types must not have it")
    if (WIDTH.get(e.type) == 2) != (e.word_order is not None):
        out.append("32-bit types need 'word_order' (config, big or little); others must not have it")
    if (e.type == "bool") != (e.bit is not None):
        out.append("bool entries need 'bit' (their bit in status_word/control_word); others must not")
    if e.enum is not None and e.enum not in enums:
        out.append(f"enum '{e.enum}' is not defined under 'enums'")
    if e.process_value and (e.access != "rw" or e.type in ("bool", "string")):
        out.append("a process value must be a writable (rw) numeric holding register")
    if e.end > 65536:
        out.append(f"ends past address 65535 (address {e.address} + {e.width})")
    if e.name in REQUIRED:
        tables, vtype, access, enum = REQUIRED[e.name]
        if e.table not in tables or e.type != vtype or e.access != access:
            out.append(f"the appliance needs {e.name} as {vtype}, access {access}, in {' or '.join(tables)}")
        if enum is not None and e.enum != enum:
            out.append(f"needs enum: {enum}")
        if e.process_value:
            out.append("a known register cannot also be a process value")
    elif not e.process_value:
        out.append("unknown name; the appliance knows " + ", ".join(sorted(REQUIRED))
                   + " (or set process_value: true for a PLC-written process value)")
    return out


def _map_problems(parsed: MapFile, path: Path, lines: dict) -> list[str]:
    out = []
    for enum, keys in REQUIRED_ENUMS.items():
        codes = parsed.enums.get(enum)
        if codes is None:
            out.append(f"{path}: enums.{enum} is missing (needs {', '.join(keys)})")
            continue
        if missing := [k for k in keys if k not in codes]:
            out.append(f"{path}:{lines.get(('enums', enum), '?')}: enums.{enum} lacks {', '.join(missing)}")
        if len(set(codes.values())) != len(codes) or not all(0 <= c <= 65535 for c in codes.values()):
            out.append(f"{path}:{lines.get(('enums', enum), '?')}: enums.{enum}: codes must be "
                       "distinct and within 0..65535")
    seen: dict[str, int] = {}
    for i, e in enumerate(parsed.registers):
        if e.name in seen:
            out.append(f"{path}:{lines.get(('registers', i), '?')}: registers[{i}] ({e.name}): "
                       f"name already used by registers[{seen[e.name]}]")
        seen.setdefault(e.name, i)
    if missing_names := sorted(set(REQUIRED) - set(seen)):
        out.append(f"{path}: registers: missing {', '.join(missing_names)}")
    indexed = list(enumerate(parsed.registers))
    for i, a in indexed:
        for j, b in indexed[i + 1:]:
            if a.table == b.table and a.address < b.end and b.address < a.end:
                out.append(f"{path}:{lines.get(('registers', j), '?')}: registers[{j}] ({b.name}) at "
                           f"{b.table} {b.address}..{b.end - 1} overlaps registers[{i}] ({a.name}) at "
                           f"{a.address}..{a.end - 1}")
            if a.table == b.table and a.bit is not None and a.bit == b.bit:
                out.append(f"{path}:{lines.get(('registers', j), '?')}: registers[{j}] ({b.name}): "
                           f"bit {b.bit} already used by registers[{i}] ({a.name})")
    return out


# -- the value codec ------------------------------------------------------------------------------

def encode(entry: Entry, value: Value, word_order: WordOrder = "big") -> list[int]:
    """``value`` as the registers of ``entry`` (strings: ASCII, 2 chars per register, NUL padded)."""
    if entry.type == "string":
        raw = str(value).encode("ascii", "replace")[: 2 * entry.width].ljust(2 * entry.width, b"\0")
        return list(struct.unpack(f">{entry.width}H", raw))
    if entry.type == "bool":
        return [int(bool(value))]
    if entry.type != "float32":
        value = int(value)
    raw = struct.pack(STRUCT[entry.type], value)
    words = list(struct.unpack(f">{len(raw) // 2}H", raw))
    return words[::-1] if word_order == "little" else words


def decode(entry: Entry, registers: Sequence[int], word_order: WordOrder = "big") -> Value:
    """The value ``registers`` hold; ValueError for text that is not printable ASCII or NaN/inf.

    A float32 comes back as the shortest double that rounds to it (12.02, not 12.020000457763672).
    """
    if entry.type == "string":
        raw = struct.pack(f">{len(registers)}H", *registers).split(b"\0", 1)[0]
        if any(not 0x20 <= c < 0x7F for c in raw):
            raise ValueError(f"{entry.name}: only printable ASCII is allowed")
        return raw.decode("ascii").rstrip(" ")
    if entry.type == "bool":
        return bool(registers[0])
    words = list(registers)
    if word_order == "little":
        words.reverse()
    (value,) = struct.unpack(STRUCT[entry.type], struct.pack(f">{len(words)}H", *words))
    if entry.type == "float32":
        if not math.isfinite(value):
            raise ValueError(f"{entry.name}: NaN and infinities are not process values")
        return float32_value(value)
    return value


def float32_value(value: float) -> float:
    """The shortest double that rounds to the same float32 as ``value``: what the PLC wrote.

    A PLC's REAL 12.02 arrives as the float32 nearest to it, 12.0200004577...; widened as it is,
    that noise would be stored and shown.  The shortest decimal that identifies the float32 (what
    the PLC's own display shows, numpy's float32 repr) is 12.02, and it still rounds to the very
    same float32, so nothing the register held is lost.
    """
    return float(np.format_float_scientific(np.float32(value), unique=True))


def markdown_table(regmap: RegisterMap) -> str:
    """The register table for docs/README (the docs test checks they carry exactly this table)."""
    tables = ("discrete_input", "coil", "holding_register", "input_register")
    fc = {"discrete_input": "2", "coil": "1 / 5, 15", "holding_register": "3 / 6, 16", "input_register": "4"}
    rows = ["| Table (FC read / write) | Address | Name | Type | Access | Description |",
            "|---|---|---|---|---|---|"]
    for table in tables:
        for e in regmap.table(table):
            span = str(e.address) if e.width == 1 else f"{e.address}–{e.end - 1}"
            vtype: str = e.type
            if e.type == "string":
                vtype = f"string[{2 * e.width}]"
            elif e.word_order is not None:
                order = "modbus.word_order" if e.word_order == "config" else f"{e.word_order} endian"
                vtype = f"{e.type} ({order})"
            elif e.bit is not None:
                vtype = f"bool (bit {e.bit})"
            text = e.description.replace("|", "\\|").replace("\n", " ").strip()
            rows.append(f"| {table.replace('_', ' ')} ({fc[table]}) | {span} | `{e.name}` | {vtype} | "
                        f"{'read/write' if e.access == 'rw' else 'read only'} | {text} |")
    return "\n".join(rows)

