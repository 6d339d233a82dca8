"""The demo's simulated PLC stops when it is told to, whatever it was waiting for at that moment."""

from __future__ import annotations

import asyncio
import struct

from appliance.demo_plc import SimulatedProcess, run_simulated_plc
from appliance.plc.modbus_map import load_register_map


async def answer_everything(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            requests: list[int]) -> None:
    """A Modbus server that answers at once: FC 3 with a new result sequence each time, FC 16 with OK."""
    try:
        while head := await reader.readexactly(7):
            tid, _proto, length, unit = struct.unpack(">HHHB", head)
            pdu = await reader.readexactly(length - 1)
            requests.append(pdu[0])
            if pdu[0] == 3:
                count = struct.unpack(">H", pdu[3:5])[0]
                body = struct.pack(f">BB{count}H", 3, 2 * count, *([0] * (count - 1) + [len(requests)]))
            else:
                body = pdu[:5]
            writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def test_cancelling_the_simulated_plc_ends_it_at_any_point_of_its_cycle() -> None:
    """Cancelled in every step of a request (one loop turn apart), the task ends each time.

    Python 3.11's ``asyncio.wait_for`` swallows a cancel that lands as its awaitable completes
    (gh-86296); a simulated PLC built on it kept polling and hung the demo's shutdown and CI.
    """
    requests: list[int] = []
    server = await asyncio.start_server(lambda r, w: answer_everything(r, w, requests), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    regmap = load_register_map(None, "big")
    try:
        for turns in range(40):
            plc = asyncio.create_task(run_simulated_plc("127.0.0.1", port, 1, regmap, SimulatedProcess(), poll_s=0))
            seen = len(requests)
            while len(requests) < seen + 4:  # connected and cycling
                await asyncio.sleep(0)
            for _ in range(turns):
                await asyncio.sleep(0)
            plc.cancel()
            done, _ = await asyncio.wait([plc], timeout=2)
            assert done, f"still running 2 s after a cancel {turns} loop turns into its cycle"
            assert plc.cancelled()
    finally:
        server.close()
