"""An attacker's clients, shared by bench/attack_replay.py and tests/integration/test_opcua_security.py.

OPC UA (asyncua): client identities, a SignAndEncrypt client whose CreateSession carries another
certificate than its channel (the security review's trust-list bypass), the Bad status a call ends
in.  Modbus TCP: one raw request from a chosen source address, and its answer in a manual's words.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncua import Client, ua
from asyncua.crypto.cert_gen import generate_private_key, generate_self_signed_app_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

HOST = "127.0.0.1"
APP_NAMESPACE = "urn:defect-appliance:opcua"
INPUTS = "VisionSystem.Inputs"


@dataclass(frozen=True)
class Identity:
    """A client application: its URI, certificate (DER) and private key (PEM)."""

    uri: str
    cert: Path
    key: Path

    @property
    def der(self) -> bytes:
        return self.cert.read_bytes()


def make_identity(folder: Path, name: str, uri: str | None = None) -> Identity:
    """A new self-signed client certificate and key in ``folder`` (not trusted until copied to trusted/)."""
    key = generate_private_key()
    uri = uri or f"urn:test:{name}"
    cert = generate_self_signed_app_certificate(
        key, f"{name} client", {"organizationName": "defect-appliance tests"},
        [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")], extended=[ExtendedKeyUsageOID.CLIENT_AUTH])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    (folder / f"{name}-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return Identity(uri, folder / f"{name}.der", folder / f"{name}-key.pem")


UNSET: Any = object()
"""``session_cert`` default: CreateSession carries the channel's certificate, as asyncua sends it."""


async def secure_client(port: int, channel: Identity, server_cert: Path, user: str, password: str, *,
                        app_uri: str | None = None, session_cert: Any = UNSET) -> Client:
    """A SignAndEncrypt client whose channel carries ``channel``'s certificate; ``session_cert``
    replaces the ClientCertificate its CreateSession sends (None: no certificate) — the attack."""
    client = Client(f"opc.tcp://{HOST}:{port}", timeout=10)
    client.application_uri = app_uri or channel.uri
    await client.set_security(SecurityPolicyBasic256Sha256, certificate=str(channel.cert), private_key=str(channel.key),
                              server_certificate=str(server_cert), mode=ua.MessageSecurityMode.SignAndEncrypt)
    client.set_user(user)
    client.set_password(password)
    if session_cert is not UNSET:
        create_session = client.uaclient.create_session

        async def tampered(params: ua.CreateSessionParameters) -> ua.CreateSessionResult:
            params.ClientCertificate = session_cert
            return await create_session(params)

        client.uaclient.create_session = tampered  # type: ignore[method-assign,assignment]
    return client


async def app_node(client: Client, path: str) -> Any:
    """A node of the appliance's namespace by its string id (``VisionSystem.Inputs.PartId``)."""
    ns = (await client.get_namespace_array()).index(APP_NAMESPACE)
    return client.get_node(ua.NodeId.from_string(f"ns={ns};s={path}"))


async def write_part_id(port: int, server_cert: Path, channel: Identity, user: str, password: str,
                        part_id: str = "EVIL-0001", **tamper: Any) -> str:
    """Connect and write PartId; the status that stopped it, or "written"."""
    client = await secure_client(port, channel, server_cert, user, password, **tamper)
    try:
        await client.connect()
        await (await app_node(client, f"{INPUTS}.PartId")).write_value(ua.Variant(part_id, ua.VariantType.String))
        return "written"
    except ua.UaStatusCodeError as exc:
        return ua.StatusCode(exc.code).name
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def status_of(call: Awaitable[Any]) -> str:
    """"Good", or the name of the Bad status ``call`` was answered with."""
    try:
        await call
    except ua.UaStatusCodeError as exc:
        return ua.StatusCode(exc.code).name
    return "Good"


def coil_on(address: int) -> bytes:
    """FC 5: set one coil."""
    return struct.pack(">BHH", 5, address, 0xFF00)


def registers_text(address: int, registers: int, text: str) -> bytes:
    """FC 16: ``text`` into ``registers`` string registers from ``address``, NUL-padded."""
    return struct.pack(">BHHB", 16, address, registers, 2 * registers) + text.encode().ljust(2 * registers, b"\0")


def mbap(pdu: bytes, unit: int = 1) -> bytes:
    return struct.pack(">HHHB", 1, 0, len(pdu) + 1, unit) + pdu


async def modbus_answer(reader: asyncio.StreamReader) -> str:
    """"answered (FC nn)", "exception nn", or "closed without an answer" (reset or closed)."""
    try:
        head = await asyncio.wait_for(reader.readexactly(7), 5)
        body = await asyncio.wait_for(reader.readexactly(struct.unpack(">H", head[4:6])[0] - 1), 5)
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return "closed without an answer"
    return f"exception {body[1]:02X}" if body[0] & 0x80 else f"answered (FC {body[0]:02d})"


async def modbus_request(port: int, pdu: bytes, unit: int = 1, source: str = HOST) -> str:
    """One request over a new connection from ``source`` (any 127/8 address is this host on Linux)."""
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    try:
        writer.write(mbap(pdu, unit))
        return await modbus_answer(reader)
    finally:
        writer.close()
