"""The OPC UA server (asyncua, in the daemon's loop): OPC 40100 Machine Vision for the PLC.

What it serves is the information model in :mod:`opcua_model`; who may do what is
:mod:`appliance.plc.opcua_security` (users, roles, secured channels only) and
:mod:`appliance.plc.opcua_pki` (certificates); the PLC's handles on the line are
:mod:`appliance.plc.opcua_control`; stored results :mod:`appliance.plc.opcua_query`.

:meth:`OpcUaEndpoint.publish` runs for every result on the line's critical path, so it does a
fixed amount of work: no nodes are created, the latest-result variables are written in one call,
and one ResultReadyEvent is emitted on the VisionSystem object and on the Server object.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from asyncua import Server, ua
from asyncua.crypto.permission_rules import SimpleRoleRuleset
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256, SecurityPolicyNone

from appliance.config import OpcUaConfig
from appliance.errors import UserError
from appliance.model_package import CARD_FILE, ModelCard
from appliance.plc.opcua_control import InputWriteService, Jobs, LineControl
from appliance.plc.opcua_faults import ServiceFaults
from appliance.plc.opcua_pki import Pki, default_hostnames
from appliance.plc.opcua_query import ResultQueries
from appliance.plc.opcua_results import Reported, ResultEncoder, ResultReadyEvent
from appliance.plc.opcua_security import AccountManager, SecureInternalServer, load_accounts
from appliance.plc.opcua_transport import GuardedServer, MalformedTraffic
from appliance.result import PartResult
from opcua_model import LoadedModel, load_model

if TYPE_CHECKING:
    from appliance.daemon import Daemon

log = logging.getLogger(__name__)

STATE_POLL_S = 0.2
VISION_STATES = {"preoperational": "Preoperational", "operational": "Operational", "halted": "Halted",
                 "error": "Error"}
EVENT_SEVERITY = {"pass": 100, "hold": 400, "rework": 500, "reject": 700}

GENERATED_LOGIN = "credentials/opcua-operator"
"""Where the generated operator password is kept (relative to state_dir) when no users are configured."""
NEVER = datetime(1601, 1, 1, tzinfo=UTC)
"""OPC UA's minimum DateTime, the value of a time that has not happened yet."""
_S, _U16, _D = ua.VariantType.String, ua.VariantType.UInt16, ua.VariantType.Double
LATEST: tuple[tuple[str, ua.VariantType, Any], ...] = (
    ("ResultId", _S, ""), ("Sequence", ua.VariantType.UInt32, 0), ("PartId", _S, ""), ("Batch", _S, ""),
    ("Disposition", _S, ""), ("DispositionCode", _U16, 0), ("DefectType", _S, ""), ("DefectTypeCode", _U16, 0),
    ("Severity", _S, ""), ("SeverityCode", _U16, 0), ("Confidence", _D, 0.0), ("ModelVersion", _S, ""),
    ("Status", _S, ""), ("AcquiredAt", ua.VariantType.DateTime, NEVER), ("LatencyMs", _D, 0.0),
    ("Content", ua.VariantType.ExtensionObject, None),
)
"""App:LatestResult variables: name, type, value before the first result (Content: an empty one)."""
HEALTH: dict[str, tuple[str, ua.VariantType]] = {
    "image_warning": ("VisionSystem.Health.ImageWarning", ua.VariantType.Boolean),
    "image_reason": ("VisionSystem.Health.ImageWarningReason", _S),
    "quality_alarm": ("VisionSystem.Health.QualityAlarm", ua.VariantType.Boolean),
    "quality_reason": ("VisionSystem.Health.QualityAlarmReason", _S),
}
"""App:Health variables (the Modbus status bits image_warning and quality_alarm, with their reasons)."""


def _encrypt_passwords(server: Server) -> None:
    """Ask clients to encrypt passwords with the server certificate even inside an encrypted channel.

    asyncua advertises plain password tokens on SignAndEncrypt endpoints; a client that then
    ignores the endpoints and opens a None channel would send its password in clear text before
    the session is refused.
    """
    for endpoint in server.iserver.endpoints:
        policy = endpoint.SecurityPolicyUri
        if policy == SecurityPolicyNone.URI:
            policy = SecurityPolicyBasic256Sha256.URI
        for token in endpoint.UserIdentityTokens:
            if token.TokenType == ua.UserTokenType.UserName:
                token.SecurityPolicyUri = policy


def application_uri() -> str:
    return f"urn:{socket.gethostname()}:defect-appliance"


class OpcUaEndpoint:
    """The daemon's OPC UA endpoint (a PlcEndpoint)."""

    name = "opcua"

    def __init__(self, config: OpcUaConfig, daemon: Daemon) -> None:
        self.config = config
        self.daemon = daemon
        self.pki = Pki(daemon.config.state_dir / "pki")
        self.url = f"opc.tcp://{config.host}:{config.port}"
        self.jobs = Jobs()
        self.traffic = MalformedTraffic(lambda family, kind: self.daemon.metrics.opcua_event(family, kind))
        self.faults = ServiceFaults(lambda status: self.daemon.metrics.opcua_faults.labels(status).inc())
        self.server: Server | None = None
        self.model: LoadedModel | None = None
        self.encoder: ResultEncoder | None = None
        self.queries: ResultQueries | None = None
        self.control: LineControl | None = None
        self._event: ResultReadyEvent | None = None
        self._emitters: tuple[ua.NodeId, ...] = ()
        self._latest: list[ua.NodeId] = []
        self._latest_shown: list[Any] = [None] * len(LATEST)
        self._shown: dict[str, Any] = {}
        self._cards: dict[str, ModelCard | None] = {}
        self._sync_task: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()

    @property
    def clients(self) -> int:
        """Connected OPC UA clients (for /health and ``appliance_plc_connections``): open connections
        that carry an activated session, i.e. clients that are logged in now.

        A session is what a PLC engineer calls "connected" (UaExpert's green plug, a PLC's
        connection status).  Connections still opening a session, refused (untrusted certificate,
        wrong password) or whose session is closed are not counted, nor are sessions that outlive
        their lost connection while they wait for the client to come back (OPC 10000-4 §6.7):
        nobody is connected through them.
        """
        server = self.server
        bserver = getattr(server, "bserver", None) if server is not None else None
        if bserver is None:
            return 0
        sessions = {id(session) for protocol in bserver.clients
                    if protocol.processor is not None and (session := protocol.processor.session) is not None
                    and session.is_activated()}
        return len(sessions)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Serve; undo a half start (and raise UserError for what the user can fix)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg, daemon = self.config, self.daemon
        self.faults.install()
        accounts, generated = load_accounts(cfg, generated_file=daemon.config.state_dir / GENERATED_LOGIN)
        uri = application_uri()
        try:
            await asyncio.to_thread(self.pki.ensure_server_certificate, uri, default_hostnames(cfg.host))
        except (OSError, ValueError) as exc:
            raise UserError(f"OPC UA: cannot prepare the server certificate in {self.pki.root}: "
                            f"{exc}") from exc
        audit = daemon.audit_trail
        iserver = SecureInternalServer(
            AccountManager(accounts, cfg.insecure_commissioning, daemon.login_guard), trust=self.pki.check,
            audit=lambda user, action, peer, detail: audit.record(user, "opcua", action, peer, detail))
        iserver.allow_unsecured_sessions = cfg.insecure_commissioning
        iserver.max_connections = cfg.max_connections
        iserver.max_pending_activation_seconds = cfg.activation_timeout_s
        # chunk headers checked before a byte of their body is buffered; malformed traffic reported
        # once per host, then counted (asyncua: buffered until complete, an ERROR each)
        server = self.server = GuardedServer(iserver=iserver, traffic=self.traffic)
        await server.init()
        server.set_endpoint(self.url)
        server.set_server_name(f"Defect appliance {daemon.config.line.line_id}/{daemon.config.line.asset_id}")
        await server.set_application_uri(uri)
        server.product_uri = "urn:defect-appliance"
        policies = [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                    ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt]
        tokens: list[type] = [ua.UserNameIdentityToken]
        if cfg.insecure_commissioning:
            policies.append(ua.SecurityPolicyType.NoSecurity)
            tokens.append(ua.AnonymousIdentityToken)
        server.set_security_policy(policies, permission_ruleset=SimpleRoleRuleset())
        server.set_identity_tokens(tokens)
        await server.load_certificate(str(self.pki.cert_path))
        await server.load_private_key(str(self.pki.key_path))
        server.set_certificate_validator(self.pki.validate)
        self.model = model = await load_model(server)
        await self._bind(server, model)
        try:
            await server.start()
        except OSError as exc:
            raise UserError(f"OPC UA: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from exc
        _encrypt_passwords(server)
        self._sync_task = asyncio.create_task(self._sync_loop(), name="opcua-state")
        log.info("OPC UA server on %s (SignAndEncrypt: Basic256Sha256, Aes256Sha256RsaPss; %d user(s)); "
                 "client certificates are trusted from %s", self.url, len(accounts), self.pki.trusted)
        if cfg.insecure_commissioning:
            log.warning("OPC UA INSECURE COMMISSIONING MODE: a None-security endpoint and anonymous read "
                        "access are open on %s — anyone on the network can read the line, and passwords "
                        "may travel unprotected. Set opcua.insecure_commissioning: false for production.",
                        self.url)
        if generated is not None:
            log.warning("OPC UA: no users configured, so one operator login was generated — user %r, its "
                        "password is in %s (readable by this service's user only; kept across restarts). "
                        "Configure opcua.users (or APPLIANCE_OPCUA_USER/APPLIANCE_OPCUA_PASSWORD) instead.",
                        generated.name, daemon.config.state_dir / GENERATED_LOGIN)

    async def _bind(self, server: Server, model: LoadedModel) -> None:
        """Connect the loaded model's nodes to the line: methods, inputs, values, the event."""
        daemon, node = self.daemon, model.app_node
        cam = daemon.config.camera
        source_cfg = cam.replay if cam.source == "replay" else cam.genicam
        self.encoder = ResultEncoder(
            model, daemon.config.plc, self._card, simulated=cam.source == "replay",
            judged_heads=daemon.config.disposition.heads,
            configuration_id=model.new(
                "ConfigurationIdDataType", Id=f"{daemon.config.line.line_id}/{daemon.config.line.asset_id}",
                Version=hashlib.sha256(daemon.config.model_dump_json().encode()).hexdigest()[:16]))
        self.queries = ResultQueries(daemon.store, self.encoder, self.jobs)
        self.control = control = LineControl(
            daemon, self.jobs, lambda job_id: model.new("JobIdDataType", Id=job_id), self.sync_state,
            continuous=not getattr(source_cfg, "triggered", True))
        vsm, auto, rm = ("VisionSystem.VisionStateMachine", "VisionSystem.VisionStateMachine."
                         "AutomaticModeStateMachine", "VisionSystem.ResultManagement")
        for path, handler in ((f"{vsm}.Halt", control.halt), (f"{vsm}.Reset", control.reset),
                              (f"{auto}.StartSingleJob", control.start_single_job),
                              (f"{auto}.StartContinuous", control.start_continuous),
                              (f"{auto}.Stop", control.stop), (f"{auto}.Abort", control.stop),
                              (f"{rm}.GetResultById", self.queries.get_result_by_id),
                              (f"{rm}.GetResultListFiltered", self.queries.get_result_list_filtered),
                              (f"{rm}.ReleaseResultHandle", self.queries.release_result_handle)):
            server.link_method(server.get_node(node(path)), handler)
        inputs = "VisionSystem.Inputs"
        server.iserver.attribute_service = InputWriteService(server.iserver.aspace, {
            node(f"{inputs}.PartId"): control.write_part_id, node(f"{inputs}.Batch"): control.write_batch,
            node(f"{inputs}.ProcessValueNames"): control.write_value_names,
            node(f"{inputs}.ProcessValues"): control.write_values,
            node(f"{inputs}.Trigger"): control.write_trigger,
        }, audit=lambda who, name, value: daemon.audit_trail.input_write("opcua", who, name, value))
        self._latest = [node(f"VisionSystem.LatestResult.{name}") for name, _, _ in LATEST]
        versions = await asyncio.to_thread(lambda: [c.version for c in daemon.registry.versions()])
        empty = model.new("DefectResultDataType", AcquiredAt=NEVER)
        await self._write([
            *((nid, ua.Variant(empty if default is None else default, vtype))
              for nid, (_, vtype, default) in zip(self._latest, LATEST, strict=True)),
            (node(f"{inputs}.PartId"), ua.Variant(daemon.context.part_id or "", ua.VariantType.String)),
            (node(f"{inputs}.Batch"), ua.Variant(daemon.context.batch or "", ua.VariantType.String)),
            (node(f"{inputs}.ProcessValueNames"), ua.Variant([], ua.VariantType.String, is_array=True)),
            (node(f"{inputs}.ProcessValues"), ua.Variant([], ua.VariantType.Double, is_array=True)),
            (node(f"{inputs}.Trigger"), ua.Variant(False, ua.VariantType.Boolean)),
            (node("VisionSystem.RecipeManagement.AvailableRecipes"),
             ua.Variant(versions, ua.VariantType.String, is_array=True)),
            (node("VisionSystem.ConfigurationManagement.ActiveConfiguration"),
             ua.Variant(self.encoder.configuration_id, ua.VariantType.ExtensionObject)),
        ])
        vision_system = node("VisionSystem")
        self._emitters = (vision_system, server.nodes.server.nodeid)
        self._event = ResultReadyEvent(vision_system, model.mv_node("ResultReadyEventType"))
        await self.sync_state()

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        server, self.server = self.server, None
        if server is not None:
            with contextlib.suppress(Exception):  # a half-started server has half its parts
                await server.stop()
        self.faults.remove()

    # -- publishing ------------------------------------------------------------------------------
    async def publish(self, result: PartResult) -> None:
        server, encoder, event = self.server, self.encoder, self._event
        if server is None or encoder is None or event is None or self.queries is None:
            return
        job_id = self.jobs.claim(result)
        self.queries.remember(result)
        reported = encoder.reported(result)
        content = encoder.content(result, reported)
        # the event first: with a publishing interval of 0 it is on the wire before this returns
        event.refill(encoder.fields(result, job_id, content))
        event.EventId = os.urandom(16)
        event.Time = result.decided_at
        event.ReceiveTime = datetime.now(UTC)
        event.Message = ua.LocalizedText(f"{result.part_id or result.result_id}: {result.disposition}")
        event.Severity = EVENT_SEVERITY.get(result.disposition, 500)
        subscriptions = server.iserver.subscription_service
        for emitter in self._emitters:
            event.emitting_node = emitter
            await subscriptions.trigger_event(event)
        await self._write(self._latest_changes(result, reported, content), source_time=result.decided_at)
        if self._shown.get("auto") == "SingleExecution":
            await self.sync_state()

    def _latest_changes(self, result: PartResult, rep: Reported,
                        content: Any) -> list[tuple[ua.NodeId, ua.Variant]]:
        """The LatestResult variables whose value changed (Disposition, Batch … often repeat;
        Sequence, ResultId and Content change with every result)."""
        values = [result.result_id, result.seq & 0xFFFFFFFF, result.part_id or "", result.batch or "",
                  rep.disposition, rep.disposition_code, rep.defect_type, rep.defect_type_code, rep.severity,
                  rep.severity_code, rep.confidence, result.model_version or "", result.status,
                  result.acquired_at, float(result.latency.get("total_ms", 0.0)), content]
        changes = [(nid, ua.Variant(value, vtype))
                   for nid, value, old, (_, vtype, _) in zip(self._latest, values, self._latest_shown, LATEST,
                                                              strict=True)
                   if value != old]
        self._latest_shown = values
        return changes

    async def _write(self, items: list[tuple[ua.NodeId, ua.Variant]],
                     source_time: datetime | None = None) -> None:
        """Write values as the server itself, straight into the address space (subscribers of the
        variables are notified as usual; no service round trip, no per-write copies)."""
        assert self.server is not None
        aspace = self.server.iserver.aspace
        now = cast(ua.DateTime, datetime.now(UTC))  # asyncua types it as its datetime subclass
        source = cast(ua.DateTime, source_time) if source_time else now
        for nid, value in items:
            status = await aspace.write_attribute_value(nid, ua.AttributeIds.Value, ua.DataValue(
                value, SourceTimestamp=source, ServerTimestamp=now))
            if not status.is_good():
                log.error("OPC UA: writing %s failed: %s", nid.to_string(), status.name)

    # -- state machines, recipe, part inputs -----------------------------------------------------
    async def _sync_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(STATE_POLL_S)
            try:
                await self.sync_state()
            except Exception:  # keep mirroring the line whatever one update did; log it once
                if not failing:
                    log.exception("OPC UA state update failed")
                failing = True
            else:
                if failing:
                    log.info("OPC UA state updates work again")
                failing = False

    async def sync_state(self) -> None:
        """Mirror the daemon into the state machines, the recipe, the part inputs and the health
        warnings (at most STATE_POLL_S late).

        The part inputs (PartId, Batch, ProcessValues) show ``daemon.context``, the part data the
        next result will carry, whoever wrote it: this server, Modbus, the HTTP API, or a part that
        consumed the part id and process values.
        """
        model, control, daemon = self.model, self.control, self.daemon
        if model is None or control is None or self.server is None:
            return
        async with self._sync_lock:
            vision = VISION_STATES.get(daemon.state, "Error")
            continuous = getattr(daemon.source, "continuous", None)
            if not isinstance(continuous, bool):
                continuous = control.continuous
            if vision != "Operational":
                auto = "Initialized"
            elif continuous:
                auto = "ContinuousExecution"
            else:
                auto = "SingleExecution" if self.jobs.single_pending else "Ready"
            version = daemon.classifier.version if daemon.classifier else ""
            wanted: dict[str, tuple[str, Any]] = {
                "vision": ("VisionSystem.VisionStateMachine", ("VisionStateMachineType", vision)),
                "auto": ("VisionSystem.VisionStateMachine.AutomaticModeStateMachine",
                         ("VisionAutomaticModeStateMachineType", auto)),
                "recipe": ("VisionSystem.RecipeManagement.ActiveRecipe", version),
                "part": ("VisionSystem.Inputs.PartId", daemon.context.part_id or ""),
                "batch": ("VisionSystem.Inputs.Batch", daemon.context.batch or ""),
                "values": ("VisionSystem.Inputs.ProcessValues", list(daemon.context.process_values.values())),
            }
            health = daemon.image_health
            for key, value in (("image_warning", health.alarm), ("image_reason", "; ".join(health.reasons)),
                               ("quality_alarm", daemon.quality_alarm), ("quality_reason", daemon.quality_reason)):
                wanted[key] = (HEALTH[key][0], value)
            writes: list[tuple[ua.NodeId, ua.Variant]] = []
            for key, (path, value) in wanted.items():
                shown = value[1] if key in ("vision", "auto") else value
                if self._shown.get(key) == shown:
                    continue
                self._shown[key] = shown
                if key in ("vision", "auto"):
                    state_type, state = value
                    writes.append((model.app_node(f"{path}.CurrentState"),
                                   ua.Variant(ua.LocalizedText(state), ua.VariantType.LocalizedText)))
                    writes.append((model.app_node(f"{path}.CurrentState.Id"),
                                   ua.Variant(model.mv_node(f"{state_type}.{state}"), ua.VariantType.NodeId)))
                elif key == "recipe":
                    assert self.encoder is not None
                    writes.append((model.app_node(path), ua.Variant(self.encoder.recipe_id(value),
                                                                    ua.VariantType.ExtensionObject)))
                elif key in ("part", "batch"):
                    writes.append((model.app_node(path), ua.Variant(value, ua.VariantType.String)))
                elif key in HEALTH:
                    writes.append((model.app_node(path), ua.Variant(value, HEALTH[key][1])))
                else:
                    control.process_values_raw = value
                    writes.append((model.app_node(path), ua.Variant(value, ua.VariantType.Double,
                                                                    is_array=True)))
            if writes:
                await self._write(writes)

    def _card(self, version: str | None) -> ModelCard | None:
        """The model card of ``version`` (class names → codes); None if unknown."""
        classifier = self.daemon.classifier
        if version is None:
            return None
        if classifier is not None and classifier.version == version:
            return classifier.card
        if version not in self._cards:
            try:
                path = self.daemon.registry.path(version) / CARD_FILE
                self._cards[version] = ModelCard.model_validate_json(path.read_bytes())
            except (OSError, ValueError, UserError):
                self._cards[version] = None
        return self._cards[version]
