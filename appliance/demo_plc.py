"""The demo's simulated line PLC: a Modbus TCP client that does what the PLC of a free-running line
does (docs/plc-modbus.md, "Free-running lines"), through the appliance's real Modbus server.

After each new result it writes, in one FC 16 from the ``batch`` register, the batch (a new lot
every ``parts_per_batch`` parts) and two process values for the next part: a stringer soldering
temperature and the line speed.  Both are slow random walks: simulated readings that carry no
information about the cells, so the dashboard's correlation view honestly finds none.  It writes
no part id, so each part keeps its ELPV file name.

FC 3 and FC 16 over asyncio streams, each request bounded by a timeout: pymodbus 3.16.1's async
client stalled here with a reply left unread in its socket (tests/integration/test_modbus.py).
The bounds are ``asyncio.timeout`` blocks, not ``asyncio.wait_for``: on Python 3.11 the latter
swallows a cancel that lands as the reply arrives (gh-86296), and the PLC would never stop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from dataclasses import dataclass, field

from appliance.errors import UserError
from appliance.plc.modbus_map import RegisterMap

log = logging.getLogger(__name__)

TIMEOUT_S = 3.0
"""For connecting and for each answer; then the simulated PLC reconnects."""
PROCESS_VALUES = ("process_value_1", "process_value_2")
"""The registers the simulation fills: stringer temperature (°C), line speed (m/min)."""


@dataclass
class SimulatedProcess:
    """The readings and lot of the next part; ``step`` moves them on by one part."""

    seed: int = 7
    parts_per_batch: int = 200
    temperature_c: float = 245.0
    speed_m_min: float = 12.0
    parts: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def batch(self) -> str:
        return f"LOT-{1 + self.parts // self.parts_per_batch:04d}"

    def describe(self) -> str:
        return (f"a new lot every {self.parts_per_batch} parts; {PROCESS_VALUES[0]} = stringer °C, "
                f"{PROCESS_VALUES[1]} = line m/min (simulated readings)")

    def step(self) -> None:
        self.parts += 1
        self.temperature_c = min(255.0, max(235.0, self.temperature_c + self._rng.gauss(0, 0.3)))
        self.speed_m_min = min(13.0, max(11.0, self.speed_m_min + self._rng.gauss(0, 0.02)))

    def registers(self, regmap: RegisterMap) -> tuple[int, list[int]]:
        """(first address, values) of one write covering the batch and the process values."""
        values: dict[str, str | float] = {"batch": self.batch, PROCESS_VALUES[0]: round(self.temperature_c, 1),
                  PROCESS_VALUES[1]: round(self.speed_m_min, 2)}
        if missing := [name for name in values if name not in regmap.by_name]:
            raise UserError(f"{regmap.source}: the simulated PLC needs {', '.join(missing)} "
                            "(or run the demo with --no-simulated-plc)")
        entries = sorted((regmap[name] for name in values), key=lambda e: e.address)
        start, words = entries[0].address, list[int]()
        for e in entries:
            if e.address != start + len(words):
                raise UserError(f"{regmap.source}: the simulated PLC writes batch and {', '.join(PROCESS_VALUES)} "
                                "in one request, so they must be contiguous (or use --no-simulated-plc)")
            words += regmap.encode(e, values[e.name])
        return start, words


async def run_simulated_plc(host: str, port: int, unit: int, regmap: RegisterMap,
                            process: SimulatedProcess | None = None, poll_s: float = 0.02) -> None:
    """Run until cancelled; reconnects on its own if the link drops (as a PLC would)."""
    process = process or SimulatedProcess()
    sequence = regmap["result_sequence"]
    last: int | None = None
    while True:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                link = _Link(*await asyncio.open_connection(host, port), unit)
        except (OSError, TimeoutError) as exc:
            log.warning("simulated PLC: cannot reach %s:%d (%s)", host, port, exc)
            await asyncio.sleep(1.0)
            continue
        try:
            while True:
                seen = int(regmap.decode(sequence, await link.read(sequence.address, sequence.width)))
                if seen != last:  # a part was judged: the inputs were used, write the next part's
                    if last is not None:
                        process.step()
                    await link.write(*process.registers(regmap))
                    last = seen
                await asyncio.sleep(poll_s)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            log.warning("simulated PLC: %s; reconnecting", exc)
            await asyncio.sleep(1.0)
        finally:
            link.writer.close()


class _Link:
    """FC 3 and FC 16 over one TCP connection, one request at a time (a PLC's view of the server)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, unit: int) -> None:
        self.reader, self.writer, self.unit, self.tid = reader, writer, unit, 0

    async def _call(self, pdu: bytes) -> bytes:
        self.tid = (self.tid + 1) & 0xFFFF
        self.writer.write(struct.pack(">HHHB", self.tid, 0, len(pdu) + 1, self.unit) + pdu)
        async with asyncio.timeout(TIMEOUT_S):
            head = await self.reader.readexactly(7)
            _tid, _proto, length, _unit = struct.unpack(">HHHB", head)
            body = await self.reader.readexactly(length - 1)
        if body[0] & 0x80:
            raise ValueError(f"the appliance answered exception {body[1]:02X} to function {pdu[0]}")
        return body

    async def read(self, address: int, count: int) -> list[int]:
        body = await self._call(struct.pack(">BHH", 3, address, count))
        return list(struct.unpack(f">{count}H", body[2:2 + 2 * count]))

    async def write(self, address: int, values: list[int]) -> None:
        await self._call(struct.pack(f">BHHB{len(values)}H", 16, address, len(values), 2 * len(values), *values))
