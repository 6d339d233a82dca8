"""The demo's simulated line PLC: a Modbus TCP client that does what the PLC of a free-running line
does (docs/plc-modbus.md, "Free-running lines"), through the appliance's real Modbus server.

After each new result it writes, in one FC 16 from the ``batch`` register, the batch (a new lot
every ``parts_per_batch`` parts) and two process values for the next part: a stringer soldering
temperature and the line speed.  Both are slow random walks: simulated readings that carry no
information about the cells, so the dashboard's correlation view honestly finds none.  It writes
no part id, so each part keeps its ELPV file name.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from appliance.plc.modbus_map import RegisterMap

log = logging.getLogger(__name__)

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
        entries = sorted((regmap[name] for name in values), key=lambda e: e.address)
        start, words = entries[0].address, list[int]()
        for e in entries:
            if e.address != start + len(words):
                raise ValueError(f"{regmap.source}: batch and {', '.join(PROCESS_VALUES)} must be contiguous")
            words += regmap.encode(e, values[e.name])
        return start, words


async def run_simulated_plc(host: str, port: int, unit: int, regmap: RegisterMap,
                            process: SimulatedProcess | None = None, poll_s: float = 0.02) -> None:
    """Run until cancelled; reconnects on its own if the link drops (as a PLC would)."""
    process = process or SimulatedProcess()
    sequence = regmap["result_sequence"]
    client = AsyncModbusTcpClient(host, port=port, reconnect_delay=1.0, reconnect_delay_max=10.0)
    last: int | None = None
    try:
        while True:
            if not client.connected and not await client.connect():
                await asyncio.sleep(1.0)
                continue
            try:
                reply = _checked(await client.read_holding_registers(sequence.address, count=sequence.width,
                                                                     device_id=unit))
                seen = int(regmap.decode(sequence, reply.registers))
                if seen != last:  # a part was judged: the inputs were used, write the next part's
                    if last is not None:
                        process.step()
                    start, words = process.registers(regmap)
                    _checked(await client.write_registers(start, words, device_id=unit))
                    last = seen
            except ModbusException as exc:
                log.warning("simulated PLC: %s", exc)
                await asyncio.sleep(1.0)
            await asyncio.sleep(poll_s)
    finally:
        client.close()


def _checked(reply: Any) -> Any:
    """pymodbus returns a Modbus exception response instead of raising it."""
    if reply.isError():
        raise ModbusException(f"the appliance answered {reply}")
    return reply
