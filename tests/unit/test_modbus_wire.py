"""The Modbus server's connection limit (appliance.plc.modbus_wire): a flood is logged once and counted.

Like the OPC UA port (tests/unit/test_opcua_transport.py): the first refusal at ``max_connections``
is a warning, the rest are debug lines and counted, and "accepting again" waits for a quiet minute,
because a flood at the limit gets a client in whenever another leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from ipaddress import ip_network
from typing import Any

import pytest

from appliance.metrics import LineMetrics
from appliance.plc import log_once, modbus_wire
from appliance.plc.modbus_wire import ModbusTcpServer

LOGGER = "appliance.plc.modbus_wire"
ALLOWED = [ip_network("127.0.0.1"), ip_network("10.0.0.0/24")]


class Bank:
    def read(self, table: str, address: int, count: int) -> list[int]:
        return [0] * count

    def write(self, table: str, address: int, values: list[int], peer: str) -> None:
        pass


def server(counted: list[str] | None = None, max_connections: int = 1) -> ModbusTcpServer:
    return ModbusTcpServer(Bank(), host="127.0.0.1", port=0, unit_id=1, allowed_clients=ALLOWED,
                           max_connections=max_connections, max_connections_per_client=max_connections,
                           idle_timeout_s=60, refused=None if counted is None else counted.append)


class Client:
    """All that ``accept`` looks at in a connection."""

    def __init__(self, port: int, host: str = "10.0.0.7") -> None:
        self.host, self.peer = host, f"{host}:{port}"


def client(port: int, host: str = "10.0.0.7") -> Any:
    return Client(port, host)


def later(monkeypatch: pytest.MonkeyPatch, minutes: int) -> None:
    """Move the log helper's clock ``minutes`` quiet spells forward."""
    monkeypatch.setattr(log_once, "clock", lambda: time.monotonic() + minutes * modbus_wire.QUIET_S)


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage().split(",")[0].split(" (")[0]) for r in caplog.records]


def test_a_refusal_burst_logs_one_warning_and_counts_every_refusal(caplog: pytest.LogCaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    counted: list[str] = []
    srv = server(counted)
    assert srv.accept(client(1))
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for port in range(2, 62):  # a flood at the limit: the one client leaves now and then, another gets in
            if port % 5 == 0:
                srv.connections.clear()
                assert srv.accept(client(port))
            else:
                assert not srv.accept(client(port))
    assert [level for level, _ in messages(caplog)].count("WARNING") == 1
    assert messages(caplog)[0] == ("WARNING", "modbus: connection from 10.0.0.7:2 refused")
    assert {level for level, _ in messages(caplog)[1:]} == {"DEBUG"}, "no 'accepting again' during the flood"
    assert srv.counters["refused"] == len(counted) == 48 and set(counted) == {"max_connections"}

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        later(monkeypatch, 1)
        srv.connections.clear()
        assert srv.accept(client(100))  # after a quiet minute: the flood is over
        assert srv.accept(client(101)) is False and srv.accept(client(102)) is False  # a new one
        later(monkeypatch, 2)
        assert not srv.accept(client(103))  # a quiet minute, nobody got in: still a new flood
    assert messages(caplog) == [
        ("INFO", "modbus: accepting clients again"),
        ("WARNING", "modbus: connection from 10.0.0.7:101 refused"),
        ("WARNING", "modbus: connection from 10.0.0.7:103 refused"),
    ]
    assert srv.counters["refused"] == len(counted) == 51


async def test_refused_sockets_are_reset_logged_once_and_in_prometheus(caplog: pytest.LogCaptureFixture) -> None:
    metrics = LineMetrics()
    srv = ModbusTcpServer(Bank(), host="127.0.0.1", port=0, unit_id=1, allowed_clients=ALLOWED, max_connections=1,
                          max_connections_per_client=1, idle_timeout_s=60,
                          refused=lambda reason: metrics.modbus_refused.labels(reason).inc())
    await srv.start()
    try:
        _, first = await asyncio.open_connection("127.0.0.1", srv.port)
        for _ in range(100):
            if srv.connections:
                break
            await asyncio.sleep(0.01)
        with caplog.at_level(logging.INFO, logger=LOGGER):
            for _ in range(5):  # one too many, five times: one log line
                reader, extra = await asyncio.open_connection("127.0.0.1", srv.port)
                with contextlib.suppress(ConnectionResetError):  # reset, or closed: nothing said either way
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                extra.close()
        assert srv.counters["refused"] == 5 and len(srv.connections) == 1
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert 'appliance_modbus_refused_connections_total{reason="max_connections"} 5.0' in metrics.render().decode()
        first.close()
    finally:
        await srv.stop()


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1", True), ("10.0.0.200", True), ("::ffff:10.0.0.9", True),  # IPv4-mapped, from a dual-stack socket
    ("10.0.1.1", False), ("::1", False), ("fe80::1%eth0", False), ("not-an-address", False),
])
def test_allowed_clients_match_addresses_and_networks(host: str, allowed: bool) -> None:
    assert server().allows(host) is allowed


def test_a_stranger_is_refused_before_the_limits_and_logged_once_per_address(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    counted: list[str] = []
    srv = server(counted, max_connections=1)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for port in range(1, 6):
            assert not srv.accept(client(port, "192.0.2.1"))
        assert not srv.accept(client(9, "192.0.2.2"))
        assert srv.accept(client(10))  # the PLC still has its slot
        later(monkeypatch, 2)
        assert not srv.accept(client(11, "192.0.2.1"))  # back after a quiet spell: said again
    warnings = [r.getMessage().split(":", 2)[1].strip() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["connection from 192.0.2.1", "connection from 192.0.2.2", "connection from 192.0.2.1"]
    assert counted == ["not_allowed"] * 7 and len(srv.connections) == 1
