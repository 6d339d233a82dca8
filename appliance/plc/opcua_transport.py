"""OPC UA on the wire: asyncua's TCP server with the checks a port on the plant network needs.

asyncua 2.1.0's per-connection protocol (``OPCUAProtocol``) trusts the byte stream more than a PLC
port can afford to:

* it buffers a chunk until it is complete and only then compares its size with the transport
  limit, so a header announcing 4 GiB makes the daemon hold whatever a client streams behind it
  (growing the buffer by ``bytes +=`` on the event loop) until the activation watchdog fires
  (docs/reliability.md #7);
* it logs every message it cannot decode at ERROR with a traceback and keeps the connection open,
  so anybody on the network can flood the journal (#8); the same for every connection refused at
  ``max_connections`` or closed for never activating a session (at WARNING).

:class:`GuardedProtocol` keeps asyncua's processing (``UaProcessor``) and replaces the framing in
front of it: each chunk header is checked as soon as its 8 bytes are there — a known message type
(HEL, OPN, MSG, CLO), a chunk type that fits it, and a size between the header and the negotiated
receive buffer (at most 65,535 bytes) — and a connection that breaks a rule, or whose message
cannot be decoded, gets an ERR message and is closed (OPC 10000-6 §7.1.5: the server closes the
socket after an error in the transport or secure-channel layer).  :class:`MalformedTraffic`
reports such events like the Modbus server does: the first one from a host at WARNING, the rest
at DEBUG while it keeps on (and counted in Prometheus), no tracebacks.

asyncua offers no hook for its protocol factory: :class:`GuardedServer` re-states
``Server.start`` (five lines, asyncua 2.1.0) to create a :class:`GuardedBinaryServer`, whose
factory makes :class:`GuardedProtocol`.  ``tests/unit/test_opcua_transport.py`` checks that the
running server uses them, so an asyncua update that changes ``start`` shows up there.

While a connection's message is processed, :func:`current_channel` tells the session layer which
secure channel it came on (policy, mode, the certificate that secured it): asyncua hands
``ActivateSession`` only the channel's certificate, and the audit trail wants the policy too.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from asyncua import Server, ua
from asyncua.common.connection import TransportLimits
from asyncua.common.utils import Buffer
from asyncua.crypto import uacrypto
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.internal_server import InternalServer
from asyncua.ua.ua_binary import header_from_binary, uatcp_to_binary

from appliance.plc.log_once import Persistent

log = logging.getLogger(__name__)

CHUNK_LIMIT = 65535
"""Largest chunk the server accepts (and offers in its ACK): asyncua's default receive buffer."""
MESSAGE_LIMIT = 4 << 20
"""Largest request (all its chunks): PLC, SCADA and MES requests are a few kB; asyncua allows 100 MB."""
PENDING_MESSAGES = 100
"""Decoded chunks queued per connection before it is closed (asyncua: 500, i.e. up to 32 MB)."""
QUIET_S = 60.0
"""A host's malformed traffic counts as over after this long without any."""
TRACKED_HOSTS = 16
"""Hosts whose malformed traffic is logged separately; beyond them, new ones go to DEBUG too."""

_HEADER = struct.Struct("<3scI")  # message type, chunk type, message size (header included)
_SECURE = (b"OPN", b"MSG", b"CLO")
_CHUNK_TYPES = {b"HEL": (b"F",), b"OPN": (b"F",), b"CLO": (b"F",), b"MSG": (b"F", b"C", b"A")}


@dataclass(frozen=True, slots=True)
class Channel:
    """The secure channel a request came on."""

    peer: str
    """``host:port`` of the client."""
    policy_uri: str
    mode: str
    """``None``, ``Sign`` or ``SignAndEncrypt``."""
    certificate: bytes
    """The certificate that secured the channel (DER; empty on a None channel)."""


_serving: contextvars.ContextVar[GuardedProtocol | None] = contextvars.ContextVar("opcua_serving", default=None)


def current_channel() -> Channel | None:
    """The channel of the message being processed (None outside a :class:`GuardedProtocol`)."""
    protocol = _serving.get()
    if protocol is None or protocol.processor is None:
        return None
    policy = protocol.processor._connection.security_policy  # asyncua 2.1.0: UaProcessor's SecureConnection
    return Channel(_peer(protocol.peer_name), policy.URI, ua.MessageSecurityMode(policy.Mode).name.rstrip("_"),
                   policy.peer_certificate or b"")


def transport_limits() -> TransportLimits:
    return TransportLimits(max_recv_buffer=CHUNK_LIMIT, max_send_buffer=CHUNK_LIMIT,
                           max_chunk_count=-(-MESSAGE_LIMIT // CHUNK_LIMIT), max_message_size=MESSAGE_LIMIT)


def _text(value: object, limit: int = 160) -> str:
    """Printable ASCII of something a client sent (exception texts quote its bytes)."""
    text = str(value).encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "…"


def _host(peer: Any) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def _peer(peer: Any) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


def _err(status: int, reason: str) -> bytes:
    """An ERR message (OPC 10000-6 §7.1.2.5)."""
    message = ua.ErrorMessage(ua.StatusCode(ua.UInt32(status)), ua.String(reason))
    return uatcp_to_binary(cast(ua.MessageType, ua.MessageType.Error), message)


class MalformedTraffic:
    """What the OPC UA port refuses, reported without flooding the log.

    ``malformed`` (a message broken at the transport or secure-channel layer) and ``misbehaved``
    (a connection closed for what it did: no session activated in time, too many messages queued) log the
    first event from a host at WARNING and further ones from it at DEBUG until it has been quiet
    for :data:`QUIET_S`; ``at_limit`` logs refusals at ``max_connections`` once, and ``accepted``
    says when the server accepts clients again after a quiet spell.  Every event is counted in
    ``counts`` and passed to ``count`` (the daemon's Prometheus counters).
    """

    def __init__(self, count: Callable[[str, str], None] | None = None) -> None:
        self.count = count
        self.counts: dict[str, int] = {}
        self._last: dict[str, float] = {}  # host → time of its latest event
        self._at_limit = Persistent(log, quiet_s=QUIET_S)

    def _event(self, family: str, kind: str) -> None:
        key = f"{family}:{kind}"
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.count is not None:
            self.count(family, kind)

    def _level(self, host: str) -> int:
        """WARNING for a host's first event after a quiet spell, DEBUG while its events go on."""
        now = asyncio.get_running_loop().time()
        for other, last in list(self._last.items()):
            if now - last > QUIET_S:
                del self._last[other]
        first = host not in self._last and len(self._last) < TRACKED_HOSTS
        if host in self._last or first:
            self._last[host] = now
        return logging.WARNING if first else logging.DEBUG

    def malformed(self, peer: Any, kind: str, detail: str, exc: BaseException | None = None) -> None:
        self._event("malformed", kind)
        level = self._level(_host(peer))
        log.log(level, "OPC UA: malformed message from %s (%s); connection closed%s", _peer(peer), detail,
                " (further ones from this host are logged at debug level while they go on, and counted "
                "in appliance_opcua_malformed_messages_total)" if level == logging.WARNING else "",
                exc_info=exc if level == logging.DEBUG and exc is not None else None)

    def misbehaved(self, peer: Any, reason: str, detail: str) -> None:
        self._event("refused", reason)
        level = self._level(_host(peer))
        log.log(level, "OPC UA: closing the connection from %s: %s%s", _peer(peer), detail,
                " (further ones from this host are logged at debug level while they go on)"
                if level == logging.WARNING else "")

    def at_limit(self, peer: Any, limit: int) -> None:
        self._event("refused", "max_connections")
        self._at_limit.fail("OPC UA: connection from %s refused, %d clients is the limit (opcua.max_connections)",
                            _peer(peer), limit)

    def accepted(self, clients: int) -> None:
        """A connection accepted: the limit counts as over once none was refused for QUIET_S (a flood at
        the limit accepts one now and then, and would otherwise log two lines each time)."""
        self._at_limit.recover("OPC UA: accepting clients again (%d connected)", clients)


class GuardedProtocol(OPCUAProtocol):
    """asyncua's connection with framing that checks every chunk header before buffering its body."""

    def __init__(self, *args: Any, traffic: MalformedTraffic, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.traffic = traffic

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.clients) >= self.iserver.max_connections:
            self.peer_name = transport.get_extra_info("peername")
            self.traffic.at_limit(self.peer_name, self.iserver.max_connections)
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_err(ua.StatusCodes.BadTcpServerTooBusy, "too many connections"))
            transport.close()
            return
        super().connection_made(transport)
        self.traffic.accepted(len(self.clients))

    def chunk_limit(self) -> int:
        """The receive buffer negotiated by the HEL (before it: the server's)."""
        negotiated = getattr(self.processor, "_limits", None)  # UaProcessor's copy, set by the HEL/ACK
        limits = negotiated if isinstance(negotiated, TransportLimits) else self.limits
        return min(int(limits.max_recv_buffer), self.limits.max_recv_buffer)

    def _header_problem(self, kind: bytes, chunk: bytes, size: int) -> tuple[str, str, int] | None:
        """(kind, detail, status) of what is wrong with a chunk header, or None."""
        if kind not in _CHUNK_TYPES:
            return ("message_type", f"message type {_text(kind.decode('latin-1'))!r}",
                    ua.StatusCodes.BadTcpMessageTypeInvalid)
        if chunk not in _CHUNK_TYPES[kind]:
            return ("bad_header", f"{kind.decode()} with chunk type {_text(chunk.decode('latin-1'))!r}",
                    ua.StatusCodes.BadTcpMessageTypeInvalid)
        least = 13 if kind in _SECURE else 9  # the header (with the channel id) and a body
        if size < least:
            return ("bad_header", f"{kind.decode()} of {size} bytes", ua.StatusCodes.BadTcpMessageTypeInvalid)
        limit = self.chunk_limit()
        if size > limit:
            return ("chunk_too_large", f"{kind.decode()} chunk of {size:,} bytes announced, the limit is {limit:,}",
                    ua.StatusCodes.BadTcpMessageTooLarge)
        return None

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # refused, or closed for a broken message: what follows means nothing
        pending = self._buffer + data
        pos = 0
        while len(pending) - pos >= _HEADER.size:
            kind, chunk, size = _HEADER.unpack_from(pending, pos)
            problem = self._header_problem(kind, chunk, size)
            if problem is not None:
                self.refuse(*problem)
                return
            if len(pending) - pos < size:
                break  # the rest of this chunk is on its way (never more than the limit is held)
            buf = Buffer(pending[pos:pos + size])  # the chunk's own bytes, not the whole stream
            header = header_from_binary(buf)
            try:
                self.messages.put_nowait((header, buf))
            except asyncio.QueueFull:
                self.traffic.misbehaved(self.peer_name, "inbound_queue_full",
                                        f"{self.messages.maxsize} messages waiting to be processed")
                self.close(ua.StatusCodes.BadTcpNotEnoughResources, "too many messages waiting")
                return
            pos += size
        self._buffer = pending[pos:] if pos else pending

    async def _process_one_msg(self, header: Any, buf: Buffer) -> bool:
        serving = _serving.set(self)
        try:
            return await super()._process_one_msg(header, buf)
        except Exception as exc:  # noqa: BLE001 - the wire boundary: a broken message costs its connection
            status = getattr(exc, "code", None)
            if not isinstance(status, int):
                status = (ua.StatusCodes.BadSecurityChecksFailed if header.MessageType == b"OPN"
                          else ua.StatusCodes.BadDecodingError)
            self.refuse("undecodable", f"{header.MessageType.decode(errors='replace')}: "
                                       f"{type(exc).__name__}: {_text(exc)}", status, exc)
            return False
        finally:
            _serving.reset(serving)

    async def _activation_watchdog(self) -> None:
        try:
            await asyncio.sleep(self.iserver.max_pending_activation_seconds)
        except asyncio.CancelledError:
            return
        session = self.processor.session if self.processor is not None else None
        if self.processor is not None and (session is None or not session.is_activated()):
            self.traffic.misbehaved(self.peer_name, "not_activated",
                                    f"no session activated within {self.iserver.max_pending_activation_seconds:g} s "
                                    "(opcua.activation_timeout_s)")
            self.close(ua.StatusCodes.BadTimeout, "no session activated in time")

    def refuse(self, kind: str, detail: str, status: int, exc: BaseException | None = None) -> None:
        self.traffic.malformed(self.peer_name, kind, detail, exc)
        self.close(status, "chunk too large" if kind == "chunk_too_large" else "malformed message")

    def close(self, status: int, reason: str) -> None:
        """Send an ERR message (OPC 10000-6 §7.1.2.5) and close; the buffered bytes are dropped."""
        self._buffer = b""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_err(status, reason))
            self.transport.close()


class GuardedBinaryServer(BinaryServer):
    def __init__(self, internal_server: InternalServer, hostname: str | None, port: int | None,
                 limits: TransportLimits, traffic: MalformedTraffic) -> None:
        super().__init__(internal_server, hostname, port, limits)  # type: ignore[arg-type]  # as asyncua passes them
        self.traffic = traffic

    def _make_protocol(self) -> GuardedProtocol:
        return GuardedProtocol(iserver=self.iserver, policies=self._policies, clients=self.clients,
                               closing_tasks=self.closing_tasks, limits=self.limits, traffic=self.traffic)


class GuardedServer(Server):
    """asyncua's Server with :class:`GuardedBinaryServer` and the appliance's transport limits."""

    def __init__(self, *args: Any, traffic: MalformedTraffic, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.traffic = traffic
        self.limits = transport_limits()
        self.iserver.max_pending_messages_per_connection = PENDING_MESSAGES

    async def start(self) -> None:
        """``Server.start`` of asyncua 2.1.0 with the guarded binary server (and no traceback logged
        for a port that cannot be bound: the caller reports it)."""
        if self.iserver.certificate is not None:
            uacrypto.check_certificate(self.iserver.certificate, self._application_uri, socket.gethostname())
        await self._setup_server_nodes()
        await self.iserver.start()
        try:
            hostname, port = self._get_bind_socket_info()
            self.bserver = GuardedBinaryServer(self.iserver, hostname, port, self.limits, self.traffic)
            self.bserver.set_policies(self._policies)
            await self.bserver.start()
        except Exception:
            await self.iserver.stop()
            raise
