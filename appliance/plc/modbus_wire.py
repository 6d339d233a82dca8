"""Modbus TCP on the wire: MBAP framing, connections, and the PDU codec.

Why not pymodbus' own server: pymodbus 3.16.1 answers only the *first* of several requests that
arrive in one TCP segment (its transport hands one frame per ``data_received`` to the request
handler, keeps the rest in a buffer that it then clears when it sends the answer), its datastore
API is deprecated for v4, and its maintainers call the server a testing aid.  PLCs and gateways do
pipeline requests, so this module owns the socket side itself: an asyncio protocol that cuts
*every* complete MBAP frame out of the byte stream and answers them in order.  pymodbus is kept
for what its client side exercises too: decoding request PDUs and encoding response PDUs.

Every request is answered synchronously inside ``data_received`` (the register image lives in
memory), so the answers leave in request order and no lock is needed: the event loop is the one
owner of the bus.  A frame whose header cannot be trusted (protocol id not 0, impossible length)
closes that connection, because the stream cannot be resynchronised; everything else is answered,
with a Modbus exception when it is wrong.  Nothing a client sends can raise out of this module.

Modbus has no authentication, so the server decides by address, at accept, before reading a byte:
a peer outside ``allowed_clients`` is reset at once and never holds one of the ``max_connections``
slots, and one allowed address holds at most ``max_connections_per_client`` of them.  Requests for
unit 0 (a serial-line broadcast, which a TCP server must not execute) or for another unit than
ours or 255 get exception 0B and change nothing.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Protocol

from pymodbus.constants import ExcCodes
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsResponse,
    ReadDiscreteInputsResponse,
    WriteMultipleCoilsResponse,
    WriteSingleCoilResponse,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
    WriteMultipleRegistersResponse,
    WriteSingleRegisterResponse,
)

from appliance.errors import UserError
from appliance.plc.log_once import PerHost, Persistent

log = logging.getLogger(__name__)

MBAP = struct.Struct(">HHHB")  # transaction id, protocol id, length (unit id + PDU), unit id
MAX_PDU = 253
QUIET_S = 60.0  # malformed frames, or refusals at the limit, count as over after this long without any
READ_TABLE = {1: "coil", 2: "discrete_input", 3: "holding_register", 4: "input_register"}
READ_MAX = {1: 2000, 2: 2000, 3: 125, 4: 125}
READ_RESPONSE: dict[int, type[ModbusPDU]] = {
    1: ReadCoilsResponse, 2: ReadDiscreteInputsResponse,
    3: ReadHoldingRegistersResponse, 4: ReadInputRegistersResponse,
}


class ModbusError(Exception):
    """Answer the request with this Modbus exception code (01 function, 02 address, 03 value, 04 failure).

    ``kind`` names a refusal worth counting on its own (the daemon's Prometheus label), e.g. unsafe_text.
    """

    def __init__(self, code: int, reason: str = "", kind: str | None = None) -> None:
        super().__init__(reason or f"exception {code:02d}")
        self.code, self.kind = code, kind


class RegisterBank(Protocol):
    """What the server reads and writes; bits travel as 0/1.  Raise ModbusError to refuse.

    ``peer`` is the writer's IP address (for the audit trail).
    """

    def read(self, table: str, address: int, count: int) -> list[int]: ...

    def write(self, table: str, address: int, values: list[int], peer: str) -> None: ...


Network = IPv4Network | IPv6Network


def client_address(host: str) -> IPv4Address | IPv6Address | None:
    """The peer's address as ``allowed_clients`` lists it (an IPv4-mapped IPv6 address as IPv4)."""
    try:
        address = ip_address(host)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _check(pdu: bytes) -> None:
    """The Modbus application protocol's checks (v1.1b3 §6) that pymodbus leaves to its datastore."""
    fc = pdu[0]
    if fc not in (1, 2, 3, 4, 5, 6, 15, 16):
        raise ModbusError(ExcCodes.ILLEGAL_FUNCTION, f"function code {fc} is not served")
    if fc <= 6:
        if len(pdu) != 5:
            raise ModbusError(ExcCodes.ILLEGAL_VALUE, f"function {fc} needs a 5-byte PDU, got {len(pdu)}")
        address, value = struct.unpack_from(">HH", pdu, 1)
        if fc in READ_MAX and not 1 <= value <= READ_MAX[fc]:
            raise ModbusError(ExcCodes.ILLEGAL_VALUE, f"count {value} not within 1..{READ_MAX[fc]}")
        if fc in READ_MAX and address + value > 65536:
            raise ModbusError(ExcCodes.ILLEGAL_ADDRESS, "read past address 65535")
        if fc == 5 and value not in (0x0000, 0xFF00):
            raise ModbusError(ExcCodes.ILLEGAL_VALUE, f"coil value {value:#06x} is neither 0x0000 nor 0xFF00")
        return
    if len(pdu) < 6:
        raise ModbusError(ExcCodes.ILLEGAL_VALUE, "write request too short")
    address, count, nbytes = struct.unpack_from(">HHB", pdu, 1)
    limit, need = (1968, (count + 7) // 8) if fc == 15 else (123, 2 * count)
    if not 1 <= count <= limit or nbytes != need or len(pdu) != 6 + nbytes:
        raise ModbusError(ExcCodes.ILLEGAL_VALUE, f"function {fc}: count {count}, byte count {nbytes}, "
                                                   f"{len(pdu) - 6} data bytes do not agree")
    if address + count > 65536:
        raise ModbusError(ExcCodes.ILLEGAL_ADDRESS, "write past address 65535")


_DECODER = DecodePDU(is_server=True)


def answer(bank: RegisterBank, pdu: bytes, peer: str) -> bytes:
    """The response PDU to request ``pdu`` from ``peer`` (an exception response when it is refused)."""
    fc = pdu[0]
    try:
        _check(pdu)
        request = _DECODER.decode(pdu)
        if request is None:  # cannot happen after _check; refuse rather than guess
            raise ModbusError(ExcCodes.ILLEGAL_VALUE, "undecodable request")
        response = _execute(bank, fc, request, peer)
    except ModbusError as exc:
        response = ExceptionResponse(fc & 0x7F, exc.code)
    return bytes([response.function_code]) + response.encode()


def _execute(bank: RegisterBank, fc: int, req: ModbusPDU, peer: str) -> ModbusPDU:
    if fc in READ_TABLE:
        values = bank.read(READ_TABLE[fc], req.address, req.count)
        if fc <= 2:
            return READ_RESPONSE[fc](bits=[bool(v) for v in values])
        return READ_RESPONSE[fc](registers=values)
    if fc == 5:
        bank.write("coil", req.address, [int(req.bits[0])], peer)
        return WriteSingleCoilResponse(address=req.address, bits=[bool(req.bits[0])])
    if fc == 15:
        bank.write("coil", req.address, [int(b) for b in req.bits[: req.count]], peer)
        return WriteMultipleCoilsResponse(address=req.address, count=req.count)
    if fc == 6:
        bank.write("holding_register", req.address, list(req.registers), peer)
        return WriteSingleRegisterResponse(address=req.address, registers=list(req.registers))
    bank.write("holding_register", req.address, list(req.registers), peer)
    return WriteMultipleRegistersResponse(address=req.address, count=req.count)


class ModbusTcpServer:
    """Serves one register bank to at most ``max_connections`` allowed clients; idle clients are dropped.

    Refused connections are counted in ``counters`` and passed to ``refused`` with the reason
    (``not_allowed``, ``max_connections``, ``per_client_limit``: the daemon's Prometheus counter).  A peer
    outside ``allowed_clients`` is logged once per address (then at debug while it keeps trying); at
    the limits the first refusal of a flood is logged at WARNING, the rest at DEBUG, and "accepting
    again" only once none was refused for :data:`QUIET_S` (a flood at the limit lets a client in
    whenever another leaves).
    """

    def __init__(self, bank: RegisterBank, *, host: str, port: int, unit_id: int,
                 allowed_clients: Sequence[Network], max_connections: int, max_connections_per_client: int,
                 idle_timeout_s: float, refused: Callable[[str], None] | None = None) -> None:
        self.bank, self.host, self.port, self.unit_id = bank, host, port, unit_id
        self.allowed_clients = tuple(allowed_clients)
        self.max_connections, self.max_per_client = max_connections, max_connections_per_client
        self.idle_timeout_s = idle_timeout_s
        self.refused = refused
        self.connections: set[_Connection] = set()
        self.counters = {"connections": 0, "refused": 0, "requests": 0, "exceptions": 0, "other_unit": 0,
                         "malformed": 0, "internal_errors": 0, "idle_closed": 0}
        self._server: asyncio.Server | None = None
        self._at_limit = Persistent(log, quiet_s=QUIET_S)
        self._strangers = PerHost(log, quiet_s=QUIET_S)
        self._greedy = PerHost(log, quiet_s=QUIET_S)
        self._internal = Persistent(log, logging.ERROR)
        self._garbage = Persistent(log, quiet_s=QUIET_S)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Connection(self), self.host, self.port)
        except OSError as exc:
            raise UserError(f"modbus: cannot listen on {self.host}:{self.port} "
                            f"({exc.strerror or exc})") from exc
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            conn.close()
        await self._server.wait_closed()
        self._server = None

    def allows(self, host: str) -> bool:
        address = client_address(host)
        return address is not None and any(address in net for net in self.allowed_clients)

    def accept(self, conn: _Connection) -> bool:
        """Whether ``conn`` may stay: its address is allowed and there is a slot for it."""
        if not self.allows(conn.host):
            self._refuse("not_allowed")
            self._strangers.event(conn.host, "modbus: connection from %s refused: not in modbus.allowed_clients "
                                  "(further attempts from it are logged at debug level while they go on, and "
                                  "counted in appliance_modbus_refused_connections_total)", conn.peer)
            return False
        if len(self.connections) >= self.max_connections:
            self._refuse("max_connections")
            self._at_limit.fail("modbus: connection from %s refused, %d clients is the limit "
                                "(modbus.max_connections; further refusals are logged at debug level while "
                                "they go on, and counted in appliance_modbus_refused_connections_total)",
                                conn.peer, self.max_connections)
            return False
        if sum(c.host == conn.host for c in self.connections) >= self.max_per_client:
            self._refuse("per_client_limit")
            self._greedy.event(conn.host, "modbus: connection from %s refused: %s already holds %d connections "
                               "(modbus.max_connections_per_client)", conn.peer, conn.host, self.max_per_client)
            return False
        self.connections.add(conn)
        self.counters["connections"] += 1
        self._at_limit.recover("modbus: accepting clients again (%d connected)", len(self.connections))
        return True

    def _refuse(self, reason: str) -> None:
        self.counters["refused"] += 1
        if self.refused is not None:
            self.refused(reason)

    def malformed(self, peer: str, what: str) -> None:
        self.counters["malformed"] += 1
        self._garbage.recover("modbus: no malformed frames for %.0f s", QUIET_S)
        self._garbage.fail("modbus: malformed frame from %s (%s); closing that connection "
                           "(further ones are logged at debug level)", peer, what)

    def handle(self, unit: int, pdu: bytes, peer: str) -> bytes:
        """Answer one framed request from ``peer`` (its address); never raises."""
        self.counters["requests"] += 1
        try:
            if unit not in (self.unit_id, 255):  # 0 included: a broadcast is not executed, nor answered normally
                self.counters["other_unit"] += 1
                reply = bytes([pdu[0] | 0x80, ExcCodes.GATEWAY_NO_RESPONSE])
            else:
                reply = answer(self.bank, pdu, peer)
            self._internal.recover("modbus: requests are answered normally again")
        except Exception:  # noqa: BLE001 - the wire boundary: a bug costs one answer, not the server
            self.counters["internal_errors"] += 1
            self._internal.fail("modbus: internal error answering %s", pdu.hex(), exc_info=True)
            reply = bytes([pdu[0] | 0x80, ExcCodes.DEVICE_FAILURE])
        if reply[0] & 0x80:
            self.counters["exceptions"] += 1
        return reply


class _Connection(asyncio.Protocol):
    def __init__(self, server: ModbusTcpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = self.host = "?"  # "address:port" for the log; the address for the allow list and audit
        self._buf = bytearray()
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        self.host = str(client_address(host) or host)
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not self.server.accept(self):
            transport.abort()  # RST: the client sees the refusal at once
            return
        self._last = asyncio.get_running_loop().time()
        self._arm(self.server.idle_timeout_s)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self._buf += data
        replies = []
        while len(self._buf) >= MBAP.size:
            tid, pid, length, unit = MBAP.unpack_from(self._buf)
            if pid != 0 or not 2 <= length <= MAX_PDU + 1:
                self._malformed(f"protocol id {pid}, length {length}")
                break
            end = 6 + length
            if len(self._buf) < end:
                break  # the rest of this frame is still on its way
            pdu = bytes(self._buf[MBAP.size:end])
            del self._buf[:end]
            reply = self.server.handle(unit, pdu, self.host)
            replies.append(MBAP.pack(tid, 0, len(reply) + 1, unit) + reply)
        if replies:  # only answered requests count as activity: a trickled partial frame does not
            self._last = asyncio.get_running_loop().time()
            self.transport.write(b"".join(replies))

    def _malformed(self, what: str) -> None:
        """The header cannot be trusted, so neither can the frame boundaries after it: close."""
        self.server.malformed(self.peer, what)
        self._buf.clear()
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # answers already written still go out

    def pause_writing(self) -> None:  # a client that does not read its answers stalls only itself
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()

    def _arm(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        idle = asyncio.get_running_loop().time() - self._last
        if idle < self.server.idle_timeout_s:
            self._arm(self.server.idle_timeout_s - idle)
            return
        self.server.counters["idle_closed"] += 1
        log.debug("modbus: closing %s after %.0f s without a request", self.peer, idle)
        self.close()

