"""Garbage on the PLC ports: Modbus TCP and OPC UA keep answering, memory stays bounded, the line runs.

The daemon runs as a child process (its own RSS and file descriptors are read from /proc) on a
replay line at 50 parts/s, with Modbus TCP and OPC UA (SignAndEncrypt only, one operator login,
this test's client certificate in the trust list) on free ports.

Modbus (CI 2·10^4 frames, full 10^5) — a different mix from tests/integration/test_modbus.py's
10^4 single-connection frames: several concurrent connections pipelining frames with sound headers
and random PDUs (every one must be answered, in order), frames dribbled in small pieces, slow-loris
partial frames that are completed late or abandoned, headers that cannot be trusted (the server
must close), random bytes, a client that never reads its answers, and a connection flood beyond
``max_connections``.  A PLC connected before the fuzz is polled all along and must always be
answered.

OPC UA (CI 2,000 connections, full 10,000): random bytes, truncated and nonsensical HEL, HEL then
garbage, mutated and truncated OpenSecureChannel requests, MSG chunks on channels that do not
exist, unknown message types, and huge length fields (with a bounded body), many connections at
a time.  Afterwards a raw HEL gets its ACK and a real asyncua client opens a SignAndEncrypt
session with a user login and reads the vision state.

Two minimal tests at the end isolate the weaknesses this fuzz found (see docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto.cert_gen import generate_private_key, generate_self_signed_app_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.ua_binary import struct_to_binary
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from appliance.daemon import Daemon
from tests.brightness_model import GRADES
from tests.conftest import free_port, write_grade_images
from tests.reliability.conftest import (
    HOST,
    MBAP,
    DaemonProcess,
    config_file,
    fd_count,
    mbap,
    read_holding,
    record,
    rss_mb,
    sized,
    thread_count,
)

MODBUS_FRAMES = sized(20_000, 100_000)
OPCUA_CONNECTIONS = sized(2_000, 10_000)
OPCUA_CONCURRENCY = 25
RSS_GROWTH_LIMIT_MB = 40.0
FD_GROWTH_LIMIT = 5
OPERATOR, PASSWORD = "plc-operator", "reliability-op-secret-1"
CLIENT_URI = "urn:reliability-tests:fuzz-client"

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(sized(300, 1800))]


# -- Modbus fuzz ------------------------------------------------------------------------------------------

class ModbusFuzz:
    def __init__(self, port: int, rng: random.Random) -> None:
        self.port, self.rng = port, rng
        self.counts: dict[str, int] = dict.fromkeys(
            ("pipelined", "split", "slow_loris", "bad_header", "random_bytes", "unread", "flood"), 0)
        self.answered = self.refused = self.closed_by_server = 0

    @property
    def frames(self) -> int:
        return sum(self.counts.values())

    def bad_pdu(self) -> bytes:
        rng = self.rng
        fc = rng.choice([0, 1, 2, 3, 4, 5, 6, 15, 16, 7, 8, 17, 20, 23, 43, 0x7F, 0x80, 0x83, 0xFF])
        pdu = bytes([fc]) + rng.randbytes(rng.choice([0, 1, 2, 4, rng.randint(0, 252)]))
        return pdu[:253]

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection(HOST, self.port)
        except OSError:
            self.refused += 1
            return None

    async def _accepted(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection the server kept (one read answered); retried while it is at its limit."""
        while True:
            conn = await self._connect()
            if conn is not None:
                reader, writer = conn
                writer.write(mbap(0, struct.pack(">BHH", 3, 0, 1)))
                try:
                    await self._answers(reader, [0])
                    return reader, writer
                except (ConnectionError, asyncio.IncompleteReadError):
                    self.refused += 1
                    writer.close()
            await asyncio.sleep(0.05)

    async def _answers(self, reader: asyncio.StreamReader, tids: list[int]) -> None:
        for tid in tids:
            head = await asyncio.wait_for(reader.readexactly(7), 20)
            r_tid, pid, length, _ = MBAP.unpack(head)
            body = await asyncio.wait_for(reader.readexactly(length - 1), 20)
            assert (r_tid, pid) == (tid, 0) and body, f"answer {r_tid} for request {tid}"
            self.answered += 1

    async def pipelined(self, frames: int) -> None:
        """Batches of frames with sound headers and random PDUs; every one answered, in order."""
        sent = 0
        while sent < frames:
            reader, writer = await self._accepted()
            try:
                for _ in range(self.rng.randint(1, 20)):
                    batch = min(self.rng.randint(1, 100), frames - sent)
                    tids = [self.rng.randrange(65536) for _ in range(batch)]
                    writer.write(b"".join(mbap(t, self.bad_pdu(), unit=self.rng.choice([1, 1, 0, 255, 9]))
                                          for t in tids))
                    await self._answers(reader, tids)
                    sent += batch
                    self.counts["pipelined"] += batch
                    if sent >= frames:
                        break
            except (ConnectionError, asyncio.IncompleteReadError):
                self.refused += 1  # refused at the connection limit (a reset), not a wrong answer
            finally:
                writer.close()

    async def split(self, frames: int) -> None:
        """Each frame dribbled in pieces of 1-7 bytes; still answered."""
        reader, writer = await self._accepted()
        try:
            for i in range(frames):
                frame = mbap(i, self.bad_pdu())
                pos = 0
                while pos < len(frame):
                    step = self.rng.randint(1, 7)
                    writer.write(frame[pos:pos + step])
                    await writer.drain()
                    pos += step
                    if self.rng.random() < 0.05:
                        await asyncio.sleep(0.002)
                await self._answers(reader, [i])
                self.counts["split"] += 1
        finally:
            writer.close()

    async def slow_loris(self, frames: int) -> None:
        """A partial frame trickled a byte at a time; completed late (answered) or abandoned."""
        for i in range(frames):
            reader, writer = await self._accepted()
            frame = mbap(i, struct.pack(">BHH", 3, 10, 2))
            cut = self.rng.randint(1, len(frame) - 1)
            try:
                for b in frame[:cut]:
                    writer.write(bytes([b]))
                    await asyncio.sleep(0.02)
                if self.rng.random() < 0.5:
                    writer.write(frame[cut:])
                    await self._answers(reader, [i])
                self.counts["slow_loris"] += 1
            finally:
                writer.close()

    async def bad_header(self, frames: int) -> None:
        """Protocol id not 0 or an impossible length: the stream cannot be trusted, the server closes."""
        done = 0
        while done < frames:
            conn = await self._connect()
            if conn is None:
                continue
            reader, writer = conn
            body = struct.pack(">BHH", 3, 0, 1)
            frame = (mbap(1, body, pid=self.rng.randint(1, 0xFFFF)) if self.rng.random() < 0.5 else
                     mbap(1, body, length=self.rng.choice([0, 1, 255, 256, 4096, 65535])))
            writer.write(frame + self.rng.randbytes(self.rng.randint(0, 64)))
            try:
                closed = await asyncio.wait_for(reader.read(), 10) == b""
            except ConnectionError:  # reset: refused at the connection limit; send it again
                self.refused += 1
                writer.close()
                await asyncio.sleep(0.02)
                continue
            writer.close()
            self.closed_by_server += closed
            self.counts["bad_header"] += 1
            done += 1

    async def random_bytes(self, frames: int) -> None:
        for _ in range(frames):
            conn = await self._connect()
            if conn is None:
                continue
            _, writer = conn
            writer.write(self.rng.randbytes(self.rng.randint(1, 300)))
            await asyncio.sleep(0)
            writer.close()
            self.counts["random_bytes"] += 1

    async def unread(self, frames: int) -> None:
        """Pipelines valid reads and never reads the answers: the server must not buffer without end."""
        _, writer = await self._accepted()
        request = struct.pack(">BHH", 3, 0, 125)
        writer.write(b"".join(mbap(i & 0xFFFF, request) for i in range(frames)))
        await asyncio.sleep(1.0)
        writer.transport.abort()
        self.counts["unread"] += frames

    async def flood(self, connections: int) -> None:
        """More connections at once than max_connections: the extra ones are refused, nothing else."""
        opened = []
        for _ in range(connections):
            conn = await self._connect()
            if conn is not None:
                opened.append(conn)
                conn[1].write(mbap(1, struct.pack(">BHH", 3, 0, 1)))
        await asyncio.sleep(0.2)
        for _, writer in opened:
            writer.close()
        self.counts["flood"] += connections

    async def run(self, total: int) -> None:
        share = {"split": total // 20, "slow_loris": sized(12, 40), "bad_header": total // 40,
                 "random_bytes": total // 40, "unread": total // 20, "flood": sized(40, 200)}
        share["pipelined"] = total - sum(share.values())
        workers = 3  # with the PLC and the others: 8 connections at most, modbus.max_connections

        async def transient() -> None:
            await self.bad_header(share["bad_header"])
            await self.random_bytes(share["random_bytes"])

        await asyncio.gather(
            *(self.pipelined(share["pipelined"] // workers + (share["pipelined"] % workers if w == 0 else 0))
              for w in range(workers)),
            self.split(share["split"]), self.slow_loris(share["slow_loris"]), transient(),
            self.unread(share["unread"]))
        await self.flood(share["flood"])  # last: it takes every free slot while it lasts


class PlcPoller:
    """The PLC: connected before the fuzz, reading status and the result block every 20 ms."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.polls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plc", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tid = 0
        while not self._stop.wait(0.02):
            tid = (tid + 1) & 0xFFFF
            try:
                read_holding(self.sock, 0, 36, tid)
                self.polls += 1
            except (OSError, ConnectionError, AssertionError) as exc:
                self.failures.append(repr(exc))
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()


# -- OPC UA fuzz ------------------------------------------------------------------------------------------

def hel(url: str, recv: int = 65535, send: int = 65535, max_msg: int = 0, max_chunks: int = 0,
        url_len: int | None = None) -> bytes:
    raw = url.encode()
    body = struct.pack("<IIIIIi", 0, recv, send, max_msg, max_chunks, len(raw) if url_len is None else url_len)
    return b"HELF" + struct.pack("<I", 8 + len(body) + len(raw)) + body + raw


def opn_none() -> bytes:
    """A well-formed OpenSecureChannel request with SecurityPolicy None (the discovery channel)."""
    request = ua.OpenSecureChannelRequest()
    request.Parameters.RequestType = ua.SecurityTokenRequestType.Issue
    request.Parameters.SecurityMode = ua.MessageSecurityMode.None_
    request.Parameters.ClientNonce = b""
    request.Parameters.RequestedLifetime = 600_000
    security = ua.AsymmetricAlgorithmHeader()
    security.SecurityPolicyURI = "http://opcfoundation.org/UA/SecurityPolicy#None"
    sequence = ua.SequenceHeader()
    sequence.SequenceNumber, sequence.RequestId = 1, 1
    body = (struct.pack("<I", 0) + struct_to_binary(security) + struct_to_binary(sequence)
            + struct_to_binary(request))  # the request's TypeId is its first field
    return b"OPNF" + struct.pack("<I", 8 + len(body)) + body


class OpcUaFuzz:
    KINDS = ("random", "hel_truncated", "hel_fields", "hel_garbage", "opn_valid", "opn_mutated", "opn_truncated",
             "msg_no_channel", "unknown_type", "huge_length")

    def __init__(self, port: int, rng: random.Random) -> None:
        self.port, self.rng = port, rng
        self.url = f"opc.tcp://{HOST}:{port}"
        self.opn = opn_none()
        self.counts = dict.fromkeys(self.KINDS, 0)
        self.replies = {"ACK": 0, "ERR": 0, "OPN": 0, "other": 0, "none": 0}

    def message(self, kind: str) -> bytes:
        rng, good_hel = self.rng, hel(self.url)
        if kind == "random":
            return rng.randbytes(rng.randint(1, 400))
        if kind == "hel_truncated":
            return good_hel[:rng.randint(1, len(good_hel) - 1)]
        if kind == "hel_fields":
            big = rng.choice([0, 1, 7, 8191, 0x7FFFFFFF, 0xFFFFFFFF])
            return hel(self.url, recv=big, send=rng.choice([0, 1, 0xFFFFFFFF, 65535]), max_msg=big,
                       max_chunks=rng.choice([0, 0xFFFFFFFF]),
                       url_len=rng.choice([None, -1, -2, 0x7FFFFFFF, 5000]))
        if kind == "hel_garbage":
            return good_hel + rng.randbytes(rng.randint(1, 300))
        if kind == "opn_valid":  # the discovery channel (None) may be opened; it leads nowhere else
            return good_hel + self.opn
        if kind == "opn_mutated":
            data = bytearray(self.opn)
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(8, len(data))] = rng.randrange(256)
            return good_hel + bytes(data)
        if kind == "opn_truncated":
            return good_hel + self.opn[:rng.randint(1, len(self.opn) - 1)]
        if kind == "msg_no_channel":
            body = struct.pack("<IIII", rng.randrange(1 << 32), rng.randrange(1 << 32), 1, 1)
            body += rng.randbytes(rng.randint(0, 200))
            return good_hel + b"MSGF" + struct.pack("<I", 8 + len(body)) + body
        if kind == "unknown_type":
            body = rng.randbytes(rng.randint(0, 100))
            head = rng.choice([b"XYZF", b"MSGX", b"HELC", b"ACKF", b"ERRF", b"CLOF", b"RHEF"])
            return head + struct.pack("<I", 8 + len(body)) + body
        # huge_length: a header announcing far more than will ever come, a bounded body, then close
        head = rng.choice([b"HELF", b"OPNF", b"MSGF", b"MSGC", b"CLOF", b"XYZF"])
        size = rng.choice([0, 1, 7, 8, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(1 << 32)])
        prefix = good_hel if rng.random() < 0.5 else b""
        return prefix + head + struct.pack("<I", size) + rng.randbytes(rng.randint(0, 4096))

    async def one(self, kind: str) -> None:
        try:
            reader, writer = await asyncio.open_connection(HOST, self.port)
        except OSError:
            self.replies["none"] += 1
            return
        try:
            writer.write(self.message(kind))
            reply = b""
            deadline = time.monotonic() + self.rng.choice([0.05, 0.2, 0.5])
            with contextlib.suppress(TimeoutError, ConnectionError):
                while len(reply) < 1 << 16 and (left := deadline - time.monotonic()) > 0:
                    data = await asyncio.wait_for(reader.read(1 << 16), left)
                    if not data:
                        break
                    reply += data
            tags = []
            while len(reply) >= 8:  # the server's answers, chunk by chunk
                tags.append(reply[:3].decode("ascii", "replace"))
                reply = reply[max(8, struct.unpack_from("<I", reply, 4)[0]):]
            for tag in tags or ["none"]:
                self.replies[tag if tag in self.replies else "other"] += 1
            self.counts[kind] += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def run(self, connections: int) -> None:
        kinds = [self.KINDS[i % len(self.KINDS)] for i in range(connections)]
        self.rng.shuffle(kinds)
        limit = asyncio.Semaphore(OPCUA_CONCURRENCY)

        async def guarded(kind: str) -> None:
            async with limit:
                await self.one(kind)

        await asyncio.gather(*(guarded(k) for k in kinds))


async def hel_ack(port: int) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(hel(f"opc.tcp://{HOST}:{port}"))
        return await asyncio.wait_for(reader.readexactly(28), 10)
    finally:
        writer.close()


def client_certificate(folder: Path) -> tuple[Path, Path]:
    key = generate_private_key()
    cert = generate_self_signed_app_certificate(
        key, "reliability fuzz client", {"organizationName": "defect-appliance tests"},
        [x509.UniformResourceIdentifier(CLIENT_URI), x509.DNSName("localhost")],
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH])
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "client.der", folder / "client-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def secure_session_state(port: int, cert: Path, key: Path, server_cert: Path) -> str:
    """Open a SignAndEncrypt session with the operator login and read the vision state."""
    client = Client(f"opc.tcp://{HOST}:{port}", timeout=20)
    client.application_uri = CLIENT_URI
    await client.set_security(SecurityPolicyBasic256Sha256, certificate=str(cert), private_key=str(key),
                              server_certificate=str(server_cert), mode=ua.MessageSecurityMode.SignAndEncrypt)
    client.set_user(OPERATOR)
    client.set_password(PASSWORD)
    async with client:
        namespaces = await client.get_namespace_array()
        app = namespaces.index("urn:defect-appliance:opcua")
        node = client.get_node(ua.NodeId("VisionSystem.VisionStateMachine.CurrentState", app))
        return str((await node.read_value()).Text)


async def test_garbage_on_both_plc_ports(tmp_path: Path, line_config, state_dir: Path,
                                         daemon_process: list[DaemonProcess]) -> None:
    images = tmp_path / "images"
    write_grade_images(images, GRADES * 4)
    api_port, modbus_port, opcua_port = free_port(), free_port(), free_port()
    cfg = line_config(images, api={"host": HOST, "port": api_port},
                      camera={"view": "top", "source": "replay",
                              "replay": {"path": str(images), "rate_hz": 50, "loop": True}},
                      store={"retention": {"pass": 0.0, "rework": 0.0, "reject": 0.0, "min_free_mb": 0}},
                      # every fuzz client is 127.0.0.1, like the PLC: the per-address cap would refuse the
                      # fuzz's own workers (tests/integration/test_modbus_security.py tests that cap)
                      modbus={"enabled": True, "host": HOST, "port": modbus_port, "max_connections_per_client": 8},
                      opcua={"enabled": True, "host": HOST, "port": opcua_port,
                             "users": [{"name": OPERATOR, "role": "operator", "password_env": "FUZZ_OPCUA_PW"}]})
    cert, key = client_certificate(tmp_path / "client-pki")
    (state_dir / "pki" / "trusted").mkdir(parents=True)
    (state_dir / "pki" / "trusted" / "fuzz-client.der").write_bytes(cert.read_bytes())
    (tmp_path / "logs").mkdir()
    daemon = DaemonProcess(config_file(tmp_path / "run.yaml", cfg), api_port, tmp_path / "logs",
                           env={"FUZZ_OPCUA_PW": PASSWORD})
    daemon_process.append(daemon)
    daemon.spawn()
    daemon.wait_running(timeout=120)
    daemon.wait_judged(100)  # warmed up: caches, the first DuckDB ingests, one OPC UA session
    # read after the warm-up: the OPC UA state machine mirrors the daemon every 0.2 s, so right at
    # start it may still (correctly) say Preoperational
    state_before = await secure_session_state(opcua_port, cert, key, state_dir / "pki" / "own" / "cert.der")
    rss_before, fds_before, threads_before = rss_mb(daemon.pid), fd_count(daemon.pid), thread_count(daemon.pid)
    judged_before = daemon.health()["judged"]

    rng = random.Random(20261124)
    plc = PlcPoller(modbus_port)
    modbus, opcua = ModbusFuzz(modbus_port, rng), OpcUaFuzz(opcua_port, rng)
    started = time.monotonic()
    try:
        await asyncio.gather(modbus.run(MODBUS_FRAMES), opcua.run(OPCUA_CONNECTIONS))
        fuzz_s = time.monotonic() - started
        await asyncio.sleep(0.5)
    finally:
        plc.stop()
    rss_peak = rss_mb(daemon.pid)

    # afterwards: a new PLC connection, a raw HEL, a real secure session; the line still judging
    with socket.create_connection((HOST, modbus_port), timeout=10) as sock:
        regs = read_holding(sock, 0, 3)
    ack = await hel_ack(opcua_port)
    state_after = await secure_session_state(opcua_port, cert, key, state_dir / "pki" / "own" / "cert.der")
    health = daemon.wait_judged(judged_before + 50, timeout=60)
    await asyncio.sleep(2)  # closed connections' sessions and tasks are cleaned up
    rss_after, fds_after, threads_after = rss_mb(daemon.pid), fd_count(daemon.pid), thread_count(daemon.pid)
    health = daemon.health()
    figures = record(
        "fuzz", modbus_frames=modbus.frames, modbus_by_kind=modbus.counts, modbus_answered=modbus.answered,
        modbus_refused_or_reset=modbus.refused, modbus_closed_by_server=modbus.closed_by_server,
        opcua_connections=sum(opcua.counts.values()), opcua_by_kind=opcua.counts, opcua_replies=opcua.replies,
        fuzz_s=round(fuzz_s, 1), plc_polls_during_fuzz=plc.polls, plc_failures=plc.failures[:3],
        rss_before_mb=round(rss_before, 1), rss_peak_mb=round(rss_peak, 1), rss_after_mb=round(rss_after, 1),
        fds_before=fds_before, fds_after=fds_after, threads_before=threads_before, threads_after=threads_after,
        judged_during_and_after=health["judged"] - judged_before, dropped=health["dropped"],
        state_after=health["state"], daemon_log_lines=len(daemon.output().splitlines()),
        daemon_log_tracebacks=daemon.output().count("Traceback"))
    assert modbus.frames >= MODBUS_FRAMES, figures
    assert opcua.replies["OPN"] >= opcua.counts["opn_valid"] // 2, "valid OpenSecureChannel requests are answered"
    assert not plc.failures and plc.polls > 0, f"the connected PLC was not answered during the fuzz: {figures}"
    assert modbus.closed_by_server >= modbus.counts["bad_header"] * 0.9, "untrustworthy headers close the stream"
    assert regs[2] == 1, "vision_state operational, read by a new Modbus connection"
    assert ack[:4] == b"ACKF", ack
    assert state_before == state_after == "Operational"
    assert health["state"] == "operational" and health["status"] == "running"
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB, f"daemon memory grew: {figures}"
    assert fds_after - fds_before <= FD_GROWTH_LIMIT, f"file descriptors leaked: {figures}"
    assert daemon.terminate() == 0, daemon.output()[-3000:]


# -- minimal tests for what the fuzz found ---------------------------------------------------------------

async def test_modbus_slow_loris_cannot_hold_connections_past_the_idle_timeout(tmp_path: Path, line_config) -> None:
    """docs/plc-modbus.md: "idle_timeout_s: a connection without a request for this long is closed".

    A client that trickles one byte of a frame now and then never completes a request; today every
    byte resets the idle timer, so ``max_connections`` such clients lock the PLC out for good.
    """
    images = tmp_path / "images"
    write_grade_images(images, ["0"])
    port = free_port()
    cfg = line_config(images, camera={"view": "top", "source": "replay",
                                      "replay": {"path": str(images), "triggered": True}},
                      modbus={"enabled": True, "host": HOST, "port": port, "max_connections": 2,
                              "idle_timeout_s": 1.0})
    daemon = Daemon(cfg)
    await daemon.start()
    lorises = []
    try:
        for _ in range(2):
            _, writer = await asyncio.open_connection(HOST, port)
            writer.write(MBAP.pack(1, 0, 200, 1))  # announces 199 more bytes
            lorises.append(writer)
        for _ in range(12):  # 3 s: three idle timeouts, a byte every 0.25 s, never a whole request
            for writer in lorises:
                writer.write(b"\x00")
            await asyncio.sleep(0.25)
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(mbap(7, struct.pack(">BHH", 3, 0, 1)))
            answer = await asyncio.wait_for(reader.readexactly(11), 5)
            writer.close()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            answer = repr(exc).encode()
    finally:
        for writer in lorises:
            writer.close()
        await daemon.stop()
    assert answer[:2] == b"\x00\x07", f"the PLC was locked out by clients that never sent a request: {answer!r}"


async def test_opcua_announced_huge_chunk_is_refused_before_it_is_buffered(tmp_path: Path, line_config,
                                                                           state_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk header may announce up to 4 GiB; asyncua 2.1.0 buffers whatever follows until it is all there.

    The transport limit (65,535-byte chunks) is checked only once a chunk is complete, and the buffer
    grows by ``bytes +=`` (quadratic copying on the daemon's loop), so one client streaming into such
    a header costs the daemon memory without bound (and stalls the line) until the 30 s activation
    watchdog closes it.  Expected: the connection is closed as soon as the announced size exceeds
    the chunk limit, and nothing like the streamed amount is ever held.
    """
    monkeypatch.setenv("HUGE_TEST_PW", PASSWORD)
    images = tmp_path / "images"
    write_grade_images(images, ["0"])
    port = free_port()
    cfg = line_config(images, camera={"view": "top", "source": "replay",
                                      "replay": {"path": str(images), "triggered": True}},
                      opcua={"enabled": True, "host": HOST, "port": port,
                             "users": [{"name": OPERATOR, "role": "operator", "password_env": "HUGE_TEST_PW"}]})
    daemon = Daemon(cfg)
    await daemon.start()
    stream_mb, sent, closed_by_server = 8, 0, False

    def attacker() -> None:
        nonlocal sent, closed_by_server
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(hel(f"opc.tcp://{HOST}:{port}") + b"MSGF" + struct.pack("<I", 0xFFFFFFF0))
            chunk = bytes(65536)
            deadline = time.monotonic() + 20
            try:
                while sent < stream_mb << 20 and time.monotonic() < deadline:
                    sock.sendall(chunk)
                    sent += len(chunk)
                sock.settimeout(3)
                while sock.recv(65536):  # the ACK of the HEL; then stay until the server closes (or 3 s)
                    pass
                closed_by_server = True
            except TimeoutError:
                closed_by_server = False
            except OSError:
                closed_by_server = True

    endpoint: Any = next(e for e in daemon.endpoints if e.name == "opcua")
    held = 0
    try:
        thread = threading.Thread(target=attacker, daemon=True)
        thread.start()
        while thread.is_alive():
            clients = endpoint.server.bserver.clients
            held = max([held, *(len(c._buffer) for c in clients)])
            await asyncio.sleep(0.02)
    finally:
        await daemon.stop()
    record("opcua_huge_chunk", streamed_bytes=sent, max_bytes_held_for_one_connection=held,
           closed_by_server=closed_by_server)
    assert held <= 1 << 20, f"the server held {held:,} bytes of a chunk it can never accept"
    assert closed_by_server, "a connection announcing a chunk over the limit is closed"


async def test_opcua_garbage_does_not_flood_the_log(tmp_path: Path, line_config,
                                                    daemon_process: list[DaemonProcess]) -> None:
    """asyncua logs every malformed OPC UA message at ERROR, most with a full traceback.

    In the fuzz above, 2,000 garbage connections made the daemon write about 12,600 log lines with
    635 tracebacks: anybody on the plant network can flood the journal (and hide what matters).
    Expected, as the Modbus server does it: the first one logged, the rest at debug level while
    they persist, and counted in ``appliance_opcua_malformed_messages_total``.  Here: 300
    connections each send a HEL and a mutated OpenSecureChannel; the daemon's log (the product's
    own logging set-up, in a child process) may hold at most 10 error lines and 2 tracebacks for
    them.
    """
    images = tmp_path / "images"
    write_grade_images(images, ["0"])
    api_port, opcua_port = free_port(), free_port()
    cfg = line_config(images, api={"host": HOST, "port": api_port},
                      camera={"view": "top", "source": "replay", "replay": {"path": str(images), "triggered": True}},
                      opcua={"enabled": True, "host": HOST, "port": opcua_port,
                             "users": [{"name": OPERATOR, "role": "operator", "password_env": "FLOOD_OPCUA_PW"}]})
    (tmp_path / "logs").mkdir()
    daemon = DaemonProcess(config_file(tmp_path / "run.yaml", cfg), api_port, tmp_path / "logs",
                           env={"FLOOD_OPCUA_PW": PASSWORD})
    daemon_process.append(daemon)
    daemon.spawn()
    daemon.wait_running(timeout=120)
    lines_before = len(daemon.output().splitlines())
    fuzz = OpcUaFuzz(opcua_port, random.Random(7))
    limit = asyncio.Semaphore(OPCUA_CONCURRENCY)

    async def one() -> None:
        async with limit:
            await fuzz.one("opn_mutated")

    await asyncio.gather(*(one() for _ in range(300)))
    await asyncio.sleep(1.0)
    counted = sum(float(m) for m in re.findall(r"^appliance_opcua_malformed_messages_total\{[^}]*\} (\S+)$",
                                               daemon.metrics(), re.M))
    assert daemon.terminate() == 0
    new = daemon.output().splitlines()[lines_before:]
    errors = [line for line in new if re.match(r"\S+ \[(error|critical)", line)]
    tracebacks = sum("Traceback" in line for line in new)
    record("opcua_log_flood", connections=300, new_log_lines=len(new), error_lines=len(errors),
           tracebacks=tracebacks, first_error=errors[0][:160] if errors else None, malformed_counted=counted)
    assert len(errors) <= 10 and tracebacks <= 2, (
        f"300 garbage OPC UA connections wrote {len(new)} log lines, {len(errors)} errors, {tracebacks} tracebacks")
    assert counted >= 100, f"the malformed messages are counted in /metrics instead: {counted}"
