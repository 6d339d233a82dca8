"""Prometheus metrics (official prometheus-client), served at ``/metrics`` by the daemon's API.

Counters and histograms are updated on the hot path (cheap: a lock and an add); gauges that need a
look at the daemon (camera, queue, holds waiting, model version, retraining) are read at scrape time
by a collector, so nothing polls.  Each daemon has its own registry, so tests can run several.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.result import PartResult

if TYPE_CHECKING:
    from appliance.daemon import Daemon

LATENCY_BUCKETS_MS = (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 250, 500, 1000)
STATES = ("preoperational", "operational", "halted", "error")


class LineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames = Counter("appliance_frames", "Frames acquired from the camera", registry=r)
        self.dropped = Counter("appliance_frames_dropped", "Frames dropped because the classifier queue was "
                               "full", registry=r)
        self.results = Counter("appliance_results", "Results stored and published", ["disposition", "status"],
                               registry=r)
        self.stage = Histogram("appliance_stage_latency_ms", "Latency per pipeline stage in milliseconds",
                               ["stage"], buckets=LATENCY_BUCKETS_MS, registry=r)
        self.store_errors = Counter("appliance_store_errors", "Results that could not be journaled",
                                    registry=r)
        self.opcua_malformed = Counter(
            "appliance_opcua_malformed_messages", "OPC UA messages refused as malformed, each closing its "
            "connection (kind: chunk_too_large, bad_header, message_type, undecodable)", ["kind"], registry=r)
        self.opcua_refused = Counter(
            "appliance_opcua_refused_connections", "OPC UA connections refused or closed by the server (reason: "
            "max_connections, not_activated, inbound_queue_full)", ["reason"], registry=r)
        self.opcua_faults = Counter(
            "appliance_opcua_service_faults", "OPC UA requests answered with a service fault (status: the "
            "OPC UA status name, e.g. BadNodeIdUnknown, BadUserAccessDenied, BadSessionIdInvalid)", ["status"],
            registry=r)
        self.plc_inputs_refused = Counter(
            "appliance_plc_inputs_refused", "Part ids and batches a PLC wrote that were refused (outside the safe "
            "character set or too long; protocol: opcua/modbus, input: the input or method argument)",
            ["protocol", "input"], registry=r)
        self.logins = Counter("appliance_logins", "Successful password log-ins (channel: api, opcua)", ["channel"],
                              registry=r)
        self.login_failures = Counter("appliance_login_failures", "Log-ins refused for a wrong user name or "
                                      "password (channel: api, opcua)", ["channel"], registry=r)
        self.login_lockouts = Counter("appliance_login_lockouts", "User names (scope=user) or addresses "
                                      "(scope=source) locked after repeated failed log-ins", ["channel", "scope"],
                                      registry=r)
        self.login_refused = Counter(
            "appliance_login_refused", "Log-ins refused before the password was checked (reason: locked, "
            "backoff, busy: too many waiting for a check)", ["channel", "reason"], registry=r)
        self.modbus_refused = Counter(
            "appliance_modbus_refused_connections", "Modbus TCP connections refused by the server (reason: "
            "not_allowed, max_connections, per_client_limit)", ["reason"], registry=r)
        self.modbus_refused_writes = Counter(
            "appliance_modbus_refused_writes", "Modbus writes refused with an exception and not applied (reason: "
            "unsafe_text, bad_value, control_disabled, reset_refused)", ["reason"], registry=r)

    def opcua_event(self, family: str, kind: str) -> None:
        """Count what the OPC UA port refused (see appliance.plc.opcua_transport.MalformedTraffic)."""
        (self.opcua_malformed if family == "malformed" else self.opcua_refused).labels(kind).inc()

    def observe(self, result: PartResult, stored_ms: float) -> None:
        self.results.labels(result.disposition, result.status).inc()
        for stage, ms in result.latency.items():
            self.stage.labels(stage.removesuffix("_ms")).observe(ms)
        self.stage.labels("stored").observe(stored_ms)

    def attach(self, daemon: Daemon) -> None:
        self.registry.register(_DaemonCollector(daemon))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        state = GaugeMetricFamily("appliance_state", "Vision system state (1 = current)", labels=["state"])
        for name in STATES:
            state.add_metric([name], 1.0 if d.state == name else 0.0)
        yield state
        yield GaugeMetricFamily("appliance_camera_online", "1 while the camera delivers frames",
                                value=1.0 if d.source.online else 0.0)
        yield GaugeMetricFamily("appliance_queue_depth", "Frames waiting for the classifier",
                                value=d.queue_depth)
        yield GaugeMetricFamily("appliance_holds_waiting", "Held parts nobody has labelled yet",
                                value=d.waiting_for_review["hold"])
        yield GaugeMetricFamily("appliance_audits_waiting", "Audit samples nobody has labelled yet",
                                value=d.waiting_for_review["audit"])
        yield GaugeMetricFamily("appliance_image_health_alarm", "1 while images drift from their baseline",
                                value=1.0 if d.image_health.alarm else 0.0)
        yield GaugeMetricFamily("appliance_quality_alarm", "1 while the defect rate is outside its control limits",
                                value=1.0 if d.quality_alarm else 0.0)
        yield GaugeMetricFamily("appliance_archive_low_disk", "1 while image archiving is stopped for disk",
                                value=1.0 if d.archive.low_disk else 0.0)
        conns = GaugeMetricFamily("appliance_plc_connections", "Open PLC client connections",
                                  labels=["protocol"])
        for endpoint in d.endpoints:
            clients = getattr(endpoint, "clients", None)
            if clients is not None:
                conns.add_metric([endpoint.name], float(clients))
        yield conns
        model = InfoMetricFamily("appliance_model", "The serving model")
        model.add_metric([], {"version": d.classifier.version if d.classifier else "",
                              "shadow": d.shadow.version if d.shadow else ""})
        yield model
        retrain = GaugeMetricFamily("appliance_retrain_state", "Retraining job state (1 = current)",
                                    labels=["state"])
        current = d.retrainer.status()["state"]
        for name in ("idle", "running", "done", "failed"):
            retrain.add_metric([name], 1.0 if current == name else 0.0)
        yield retrain
