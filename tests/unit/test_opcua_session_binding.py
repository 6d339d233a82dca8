"""The session ↔ channel binding's footing in asyncua 2.1.0 (canaries), without a network.

:class:`SecureSession` closes asyncua's trust-list gap (tests/integration/test_opcua_security.py
mounts the attacks).  It relies on how asyncua's ``UaProcessor`` drives CreateSession and
ActivateSession, and on the processor's secure connection that :func:`current_channel` reads; the
canaries below fail when an asyncua update changes any of it, so the override is re-checked
instead of silently doing nothing.
"""

from __future__ import annotations

import inspect
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.security_policies import SecurityPolicyNone
from asyncua.server.binary_server_asyncio import OPCUAProtocol
from asyncua.server.internal_session import InternalSession
from asyncua.server.uaprocessor import UaProcessor

from appliance.plc import log_once
from appliance.plc.log_once import PerHost
from appliance.plc.opcua_security import AccountManager, SecureInternalServer, SecureSession
from appliance.plc.opcua_transport import GuardedProtocol, MalformedTraffic, current_channel, transport_limits
from tests.unit.test_opcua_transport import Transport


def test_asyncua_is_the_version_the_overrides_were_written_for() -> None:
    from importlib.metadata import version

    assert version("asyncua") == "2.1.0", "re-read the asyncua overrides in appliance/plc (DESIGN.md) and the canaries"


def test_asyncua_activates_sessions_with_the_channel_certificate_after_checking_its_signature() -> None:
    """What SecureSession builds on: the processor creates sessions through the internal server
    (our SecureSession), hands CreateSession's parameters to it, verifies ActivateSession's client
    signature with the channel's certificate, and passes that certificate to activate_session."""
    source = inspect.getsource(UaProcessor._process_message)
    created = source.index("self.session = self.iserver.create_session(self.name, external=True)")
    assert source.index("await self.session.create_session(params, sockname=self.sockname)") > created
    verified = source.index("self._connection.security_policy.asymmetric_cryptography.verify(data, "
                            "params.ClientSignature.Signature)")
    activated = source.index("self.session.activate_session(params, self._connection.security_policy.peer_certificate)")
    assert verified < activated
    assert list(inspect.signature(InternalSession.create_session).parameters) == ["self", "params", "sockname"]
    assert list(inspect.signature(InternalSession.activate_session).parameters) == [
        "self", "params", "peer_certificate"]
    # the gap: asyncua validates CreateSession's certificate only when one is sent, never the channel's
    assert "if self.iserver.certificate_validator and params.ClientCertificate:" in inspect.getsource(
        InternalSession.create_session)
    assert "_process_one_msg" in vars(OPCUAProtocol)


async def test_the_channel_is_known_while_a_message_of_it_is_processed() -> None:
    iserver = SimpleNamespace(max_pending_messages_per_connection=10, max_connections=10,
                              max_pending_activation_seconds=0, asyncio_transports=[])
    proto = GuardedProtocol(iserver=iserver, policies=[], clients=[], closing_tasks=[], limits=transport_limits(),
                            traffic=MalformedTraffic())
    proto.connection_made(Transport(("10.1.2.3", 50123)))
    try:
        assert isinstance(proto.processor, UaProcessor)
        seen: list[Any] = []

        async def process(header: Any, buf: Any) -> bool:
            seen.append(current_channel())
            return True

        proto.processor.process = process  # type: ignore[method-assign]
        assert current_channel() is None
        assert await proto._process_one_msg(SimpleNamespace(body_size=0, MessageType=b"MSG"), b"") is True
        assert current_channel() is None  # only while processing
        [channel] = seen
        assert channel.peer == "10.1.2.3:50123"
        assert (channel.policy_uri, channel.mode, channel.certificate) == (SecurityPolicyNone.URI, "None", b"")
    finally:
        proto.connection_lost(None)


def test_activation_outside_the_guarded_transport_is_refused() -> None:
    """Fail closed: without the channel (asyncua changed how it calls us) no session activates."""
    audited: list[tuple[str, ...]] = []
    iserver = SecureInternalServer(AccountManager([]), trust=lambda cert, app: None,
                                   audit=lambda *row: audited.append(row))
    session = iserver.create_session("peer")
    assert isinstance(session, SecureSession)
    with pytest.raises(ServiceError) as refused:
        session.activate_session(ua.ActivateSessionParameters(), b"certificate")
    assert refused.value.code == ua.StatusCodes.BadInternalError
    assert not session.is_activated() and audited == []


def test_refusals_are_logged_once_per_host_while_they_go_on(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    monkeypatch.setattr(log_once, "clock", lambda: now[0])
    per_peer = PerHost(logging.getLogger("test.per_peer"), quiet_s=60, hosts=2)
    with caplog.at_level(logging.DEBUG, logger="test.per_peer"):
        for host in ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"):
            per_peer.event(host, "refused %s", host)
        now[0] += 61  # all quiet for longer than quiet_s: each host starts over
        per_peer.event("10.0.0.3", "refused %s", "10.0.0.3")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "refused 10.0.0.1"), ("DEBUG", "refused 10.0.0.1"), ("WARNING", "refused 10.0.0.2"),
        ("DEBUG", "refused 10.0.0.3"),  # a third host while two are tracked: not tracked, not a warning
        ("DEBUG", "refused 10.0.0.1"), ("WARNING", "refused 10.0.0.3")]
