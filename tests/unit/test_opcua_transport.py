"""The OPC UA port's framing guard (appliance.plc.opcua_transport), byte by byte, without a network.

A :class:`GuardedProtocol` is fed through ``data_received`` exactly as asyncio would, with a
recording transport; its messages go to asyncua's real ``UaProcessor`` (a HEL gets a real ACK).
The last test starts a real :class:`GuardedServer` to check that asyncua's ``Server.start``
re-stated there still installs the guard.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from asyncua import ua

from appliance.plc import log_once, opcua_transport
from appliance.plc.opcua_transport import (
    CHUNK_LIMIT,
    GuardedBinaryServer,
    GuardedProtocol,
    GuardedServer,
    MalformedTraffic,
    transport_limits,
)
from tests.conftest import free_port

PEER = ("10.1.2.3", 50123)
Maker = Callable[..., tuple[GuardedProtocol, "Transport"]]


class Transport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int] = PEER) -> None:
        super().__init__()
        self.peer, self.sent, self.closed = peer, bytearray(), False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 4840)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:  # asyncio drops what is written after close()
            self.sent += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def replies(self) -> list[tuple[bytes, bytes]]:
        """(type, body) of every message the server sent."""
        out, data = [], bytes(self.sent)
        while len(data) >= 8:
            size = struct.unpack_from("<I", data, 4)[0]
            out.append((data[:3], data[8:size]))
            data = data[size:]
        return out


def hel(send_buffer: int = 65535) -> bytes:
    url = b"opc.tcp://appliance:4840"
    body = struct.pack("<IIIIIi", 0, 65535, send_buffer, 0, 0, len(url)) + url
    return b"HELF" + struct.pack("<I", 8 + len(body)) + body


def err_status(body: bytes) -> int:
    return struct.unpack_from("<I", body)[0]


@pytest.fixture
async def protocol() -> AsyncIterator[Maker]:
    made: list[tuple[GuardedProtocol, Transport]] = []

    def make(traffic: MalformedTraffic | None = None) -> tuple[GuardedProtocol, Transport]:
        iserver = SimpleNamespace(max_pending_messages_per_connection=100, max_connections=10,
                                  max_pending_activation_seconds=0, asyncio_transports=[])
        proto = GuardedProtocol(iserver=iserver, policies=[], clients=[], closing_tasks=[],
                                limits=transport_limits(), traffic=traffic or MalformedTraffic())
        transport = Transport()
        proto.connection_made(transport)
        made.append((proto, transport))
        return proto, transport

    yield make
    for proto, _ in made:  # what asyncio does when the socket is gone: the message loop ends
        proto.connection_lost(None)
    await settle()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_huge_chunk_header_split_across_reads_is_refused_before_its_body(protocol: Maker) -> None:
    traffic = MalformedTraffic()
    proto, transport = protocol(traffic)
    proto.data_received(hel())
    proto.data_received(b"MSGF")  # half a header: nothing known yet
    assert not transport.closed and len(proto._buffer) == 4
    proto.data_received(struct.pack("<I", 0xFFFFFFF0) + bytes(100))  # 4 GiB announced
    assert transport.closed and proto._buffer == b""
    proto.data_received(bytes(1 << 16))  # what the client still streams is not kept
    assert proto._buffer == b""
    await settle()
    replies = transport.replies()  # the HEL's ACK would come after the close: not sent
    assert [kind for kind, _ in replies] == [b"ERR"]
    assert err_status(replies[0][1]) == ua.StatusCodes.BadTcpMessageTooLarge
    assert traffic.counts == {"malformed:chunk_too_large": 1}


async def test_chunks_dribbled_a_byte_at_a_time_are_framed_exactly(protocol: Maker) -> None:
    proto, transport = protocol()
    stream = hel() + hel(8192)
    for i in range(len(stream)):
        proto.data_received(stream[i:i + 1])
    await settle()
    assert [kind for kind, _ in transport.replies()] == [b"ACK", b"ACK"] and not transport.closed
    assert proto._buffer == b""


async def test_several_chunks_in_one_read_are_all_processed(protocol: Maker) -> None:
    proto, transport = protocol()
    proto.data_received(hel() + hel() + hel()[:10])
    await settle()
    assert [kind for kind, _ in transport.replies()] == [b"ACK", b"ACK"] and len(proto._buffer) == 10


async def test_the_limit_is_the_receive_buffer_the_hel_negotiated(protocol: Maker) -> None:
    proto, transport = protocol()
    proto.data_received(hel(send_buffer=8192))  # the client sends at most 8 kB chunks
    await settle()
    assert proto.chunk_limit() == 8192
    proto.data_received(b"MSGF" + struct.pack("<I", 8192) + bytes(40))
    assert not transport.closed, "a chunk within the negotiated size waits for its body"
    proto2, transport2 = protocol()
    proto2.data_received(hel(send_buffer=8192))
    await settle()
    proto2.data_received(b"MSGF" + struct.pack("<I", 8193))
    assert transport2.closed
    assert protocol()[0].chunk_limit() == CHUNK_LIMIT, "before a HEL: the server's own limit"


@pytest.mark.parametrize(("data", "kind", "status"), [
    (b"XYZF" + struct.pack("<I", 20) + bytes(12), "message_type", ua.StatusCodes.BadTcpMessageTypeInvalid),
    (b"ACKF" + struct.pack("<I", 28) + bytes(20), "message_type", ua.StatusCodes.BadTcpMessageTypeInvalid),
    (b"HELC" + struct.pack("<I", 40) + bytes(32), "bad_header", ua.StatusCodes.BadTcpMessageTypeInvalid),
    (b"MSGX" + struct.pack("<I", 40) + bytes(32), "bad_header", ua.StatusCodes.BadTcpMessageTypeInvalid),
    (b"MSGF" + struct.pack("<I", 12) + bytes(4), "bad_header", ua.StatusCodes.BadTcpMessageTypeInvalid),
    (b"HELF" + struct.pack("<I", 0), "bad_header", ua.StatusCodes.BadTcpMessageTypeInvalid),
    (b"OPNF" + struct.pack("<I", 1 << 20), "chunk_too_large", ua.StatusCodes.BadTcpMessageTooLarge),
])
async def test_headers_that_cannot_be_trusted_close_the_connection(protocol: Maker, data: bytes, kind: str,
                                                                   status: int) -> None:
    traffic = MalformedTraffic()
    proto, transport = protocol(traffic)
    proto.data_received(data)
    assert transport.closed
    [(reply, body)] = transport.replies()
    assert reply == b"ERR" and err_status(body) == status
    assert traffic.counts == {f"malformed:{kind}": 1}


async def test_a_message_asyncua_cannot_decode_closes_the_connection_without_a_traceback(
        protocol: Maker, caplog: pytest.LogCaptureFixture) -> None:
    """An OpenSecureChannel for a policy the server does not offer: asyncua raises (and would log the
    traceback at ERROR and keep the connection open); here: one warning, an ERR, closed."""
    traffic = MalformedTraffic()
    proto, transport = protocol(traffic)
    uri = b"http://opcfoundation.org/UA/SecurityPolicy#Nothing"
    body = struct.pack("<I", 0) + struct.pack("<i", len(uri)) + uri + struct.pack("<ii", -1, -1) + bytes(40)
    with caplog.at_level(logging.DEBUG):
        proto.data_received(hel() + b"OPNF" + struct.pack("<I", 8 + len(body)) + body)
        await settle()
    assert transport.closed
    assert [kind for kind, _ in transport.replies()] == [b"ACK", b"ERR"]
    assert err_status(transport.replies()[1][1]) == ua.StatusCodes.BadSecurityChecksFailed
    assert traffic.counts == {"malformed:undecodable": 1}
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "No matching policy" in warnings[0].getMessage()
    assert warnings[0].exc_info is None


async def test_malformed_traffic_is_logged_once_per_host_then_counted(caplog: pytest.LogCaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    counted: list[tuple[str, str]] = []
    traffic = MalformedTraffic(lambda family, kind: counted.append((family, kind)))
    with caplog.at_level(logging.DEBUG, logger="appliance.plc.opcua_transport"):
        for port in range(5):
            traffic.malformed(("10.0.0.1", port), "bad_header", "HEL of 0 bytes")
        traffic.malformed(("10.0.0.2", 1), "message_type", "message type 'XYZ'")
        traffic.misbehaved(("10.0.0.2", 2), "not_activated", "no session activated within 10 s")
        monkeypatch.setattr(opcua_transport, "QUIET_S", -1.0)  # every earlier event is now "long ago"
        traffic.malformed(("10.0.0.1", 9), "bad_header", "HEL of 0 bytes")
    levels = [(r.levelname, r.getMessage().split(" (")[0]) for r in caplog.records]
    assert levels == [
        ("WARNING", "OPC UA: malformed message from 10.0.0.1:0"),
        *[("DEBUG", f"OPC UA: malformed message from 10.0.0.1:{p}") for p in range(1, 5)],
        ("WARNING", "OPC UA: malformed message from 10.0.0.2:1"),
        ("DEBUG", "OPC UA: closing the connection from 10.0.0.2:2: no session activated within 10 s"),
        ("WARNING", "OPC UA: malformed message from 10.0.0.1:9"),  # a new spell after a quiet one
    ]
    assert traffic.counts == {"malformed:bad_header": 6, "malformed:message_type": 1, "refused:not_activated": 1}
    assert len(counted) == 8


async def test_refusals_at_the_connection_limit_do_not_flap_in_the_log(caplog: pytest.LogCaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    traffic = MalformedTraffic()
    with caplog.at_level(logging.INFO, logger="appliance.plc.opcua_transport"):
        for port in range(3):  # a flood at the limit: refused, accepted, refused ...
            traffic.at_limit(("10.0.0.7", port), 32)
            traffic.accepted(32)
        monkeypatch.setattr(log_once, "clock", lambda: time.monotonic() + opcua_transport.QUIET_S)  # a quiet minute
        traffic.accepted(5)
    assert [(r.levelname, r.getMessage().split(",")[0]) for r in caplog.records] == [
        ("WARNING", "OPC UA: connection from 10.0.0.7:0 refused"),
        ("INFO", "OPC UA: accepting clients again (5 connected)")]
    assert traffic.counts == {"refused:max_connections": 3}


async def test_the_server_installs_the_guard_and_refuses_past_max_connections(
        caplog: pytest.LogCaptureFixture) -> None:
    traffic = MalformedTraffic()
    server = GuardedServer(traffic=traffic)
    await server.init()
    port = free_port()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    server.iserver.max_connections = 1
    await server.start()
    try:
        assert isinstance(server.bserver, GuardedBinaryServer)
        assert server.limits.max_message_size == 4 << 20
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(hel()[:5])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(hel()[5:])
        assert (await asyncio.wait_for(reader.readexactly(28), 5))[:4] == b"ACKF"
        assert isinstance(server.bserver.clients[0], GuardedProtocol)
        with caplog.at_level(logging.WARNING, logger="appliance.plc.opcua_transport"):
            for _ in range(3):  # one too many, three times: one log line
                extra_reader, extra = await asyncio.open_connection("127.0.0.1", port)
                refusal = await asyncio.wait_for(extra_reader.read(), 5)
                assert refusal[:4] == b"ERRF" and err_status(refusal[8:]) == ua.StatusCodes.BadTcpServerTooBusy
                extra.close()
        assert traffic.counts == {"refused:max_connections": 3}
        assert sum("refused" in r.getMessage() for r in caplog.records) == 1
        writer.write(b"MSGF" + struct.pack("<I", 0xFFFFFFFF))
        reply = await asyncio.wait_for(reader.read(), 5)
        assert reply[:4] == b"ERRF" and err_status(reply[8:]) == ua.StatusCodes.BadTcpMessageTooLarge
        writer.close()
    finally:
        await server.stop()
