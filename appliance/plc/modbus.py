"""The Modbus TCP endpoint: the register image a PLC polls, and the In-Sight-style handshake.

Handshake (docs/plc-modbus.md has the timing diagram)::

    PLC: trigger 0->1      appliance: trigger_ack=1, busy=1, result_valid=0, inputs taken
                           ... part acquired, judged, stored ...
                           appliance: result block written, result_sequence=seq, result_valid=1;
                                      busy=0 as soon as the trigger's result is settled
    PLC: result_ack 0->1   appliance: result_valid=0
    PLC: trigger 1->0      appliance: trigger_ack=0 (ready again once not busy)

``ready`` is 1 only while a trigger would be served: vision state operational, the camera waits for
triggers (never on a free-running line), no trigger pending, the trigger bit clear.

The part inputs (part id, process values) belong to exactly one part, the next one; the batch is
sticky.  On a free-running line they go into ``daemon.context`` when written; a trigger takes
them out of it and hands them to ``daemon.trigger``.  Status bits are computed when a PLC reads,
so they never lag the daemon.  All register changes happen on the loop thread without awaiting in
between, so a PLC never reads a half-written result block.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from pymodbus.constants import ExcCodes

from appliance.camera.base import TriggerNotSupported
from appliance.config import ModbusConfig
from appliance.part_text import check_part_text
from appliance.plc.log_once import PerHost, Persistent
from appliance.plc.modbus_map import (
    CONTROL_BITS,
    STATUS_BITS,
    Entry,
    RegisterMap,
    Value,
    load_register_map,
)
from appliance.plc.modbus_wire import ModbusError, ModbusTcpServer, Network
from appliance.result import PartResult

if TYPE_CHECKING:
    from appliance.daemon import Daemon

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
PART_TEXT = frozenset({"part_id", "batch"})
"""Inputs held to appliance.part_text's safe character set (exception 03 otherwise)."""
CONTROL = frozenset({*CONTROL_BITS, "control_word"})
"""What ``modbus.allow_control: false`` refuses (exception 02)."""
REFUSALS_QUIET_S = 60.0


class RegisterImage:
    """The values of every table, addressed like the PLC addresses them, with the map's access rules."""

    def __init__(self, regmap: RegisterMap, locked: frozenset[str] = frozenset()) -> None:
        self.map = regmap
        self.locked = locked  # writable entries refused anyway (the control bits when allow_control is off)
        tables = ("coil", "discrete_input", "input_register", "holding_register")
        self.values: dict[str, list[int]] = {t: [0] * regmap.size(t) for t in tables}
        self.owner: dict[str, list[Entry | None]] = {t: [None] * regmap.size(t) for t in tables}
        for e in regmap.entries:
            self.owner[e.table][e.address:e.end] = [e] * e.width

    def get(self, name: str) -> Value:
        e = self.map[name]
        if e.type in ("bool", "uint16"):  # the hot path: status and control, read on every poll
            raw = self.values[e.table][e.address]
            return bool(raw) if e.type == "bool" else raw
        return self.map.decode(e, self.values[e.table][e.address:e.end])

    def set(self, name: str, value: Value) -> None:
        e = self.map[name]
        if e.type in ("bool", "uint16"):
            self.values[e.table][e.address] = int(value) & 0xFFFF
        else:
            self.values[e.table][e.address:e.end] = self.map.encode(e, value)

    def read(self, table: str, address: int, count: int) -> list[int]:
        if address + count > len(self.values[table]):
            raise ModbusError(ExcCodes.ILLEGAL_ADDRESS, f"{table} {address}..{address + count - 1} "
                                                        "is outside the map")
        return self.values[table][address:address + count]

    def write(self, table: str, address: int, values: list[int]) -> list[Entry]:
        """Check, then store ``values``; return the entries touched, in address order.

        02 when any address is not a PLC-writable entry (or a locked one) or a 32-bit value would be
        split, 03 when a value is not acceptable (part text outside the safe character set, NaN);
        nothing is stored unless all is well.
        """
        end = address + len(values)
        owners = self.owner[table][address:end] if end <= len(self.owner[table]) else []
        if len(owners) != len(values) or any(o is None or o.access != "rw" for o in owners):
            raise ModbusError(ExcCodes.ILLEGAL_ADDRESS, f"{table} {address}..{end - 1} is not writable")
        touched = list(dict.fromkeys(o for o in owners if o is not None))
        if locked := [e.name for e in touched if e.name in self.locked]:
            raise ModbusError(ExcCodes.ILLEGAL_ADDRESS, f"{', '.join(locked)}: control over Modbus is off "
                                                        "(modbus.allow_control)", kind="control_disabled")
        staged = self.values[table][:]
        staged[address:end] = values
        for e in touched:
            if e.type != "string" and (e.address < address or e.end > end):
                raise ModbusError(ExcCodes.ILLEGAL_ADDRESS, f"{e.name} must be written whole")
            try:
                value = self.map.decode(e, staged[e.address:e.end])
                if e.name in PART_TEXT:
                    check_part_text(str(value), e.name)
            except ValueError as exc:
                raise ModbusError(ExcCodes.ILLEGAL_VALUE, str(exc),
                                  kind="unsafe_text" if e.name in PART_TEXT else "bad_value") from None
        self.values[table][address:end] = values
        return touched


class ModbusEndpoint:
    """A PlcEndpoint (see appliance.daemon) serving the register map over Modbus TCP."""

    name = "modbus"

    def __init__(self, config: ModbusConfig, daemon: Daemon) -> None:
        self.config = config
        self.daemon = daemon
        self.server: ModbusTcpServer | None = None
        self.image: RegisterImage | None = None
        self.trigger_ack = self.result_valid = self.trigger_failed = False
        self.pending = 0  # triggers whose result is not settled yet
        self._tasks: set[asyncio.Task[None]] = set()
        self._trigger_trouble = Persistent(log)
        self._refused_writes = PerHost(log, quiet_s=REFUSALS_QUIET_S)
        self._batch_shown: str | None = None  # the batch the ``batch`` register was last set to

    @property
    def clients(self) -> int:
        """Open PLC connections (for /health and the metrics)."""
        return len(self.server.connections) if self.server else 0

    @property
    def port(self) -> int | None:
        return self.server.port if self.server else None

    async def start(self) -> None:
        path = self.config.register_map
        regmap = load_register_map(self.daemon.config.resolve(path) if path else None, self.config.word_order)
        self.image = RegisterImage(regmap, frozenset() if self.config.allow_control else CONTROL)
        self._describe_codes()
        self._warn_if_open(self.config.allowed_clients)
        self.server = ModbusTcpServer(self, host=self.config.host, port=self.config.port,
                                      unit_id=self.config.unit_id, allowed_clients=self.config.allowed_clients,
                                      max_connections=self.config.max_connections,
                                      max_connections_per_client=self.config.max_connections_per_client,
                                      idle_timeout_s=self.config.idle_timeout_s,
                                      refused=lambda reason: self.daemon.metrics.modbus_refused.labels(reason).inc())
        await self.server.start()
        self._spawn(self._heartbeat())
        log.info("Modbus TCP on %s:%s (unit %d, %s word order first, map %s; clients from %s; control %s)",
                 self.config.host, self.server.port, self.config.unit_id,
                 "high" if self.config.word_order == "big" else "low", regmap.source,
                 ", ".join(map(str, self.config.allowed_clients)),
                 "allowed" if self.config.allow_control else "refused (modbus.allow_control: false)")

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.stop()

    async def publish(self, result: PartResult) -> None:
        assert self.image is not None
        regmap, img = self.image.map, self.image
        card_heads = self._head_classes()
        judged = self.daemon.config.disposition.heads
        confidences = [p.confidence for p in result.predictions if judged is None or p.head in judged]
        img.set("disposition_code", regmap.enums["disposition"].get(result.disposition, 0))
        for field, head_name in (("defect_type", self.daemon.config.plc.type_head),
                                 ("severity", self.daemon.config.plc.severity_head)):
            head = result.head(head_name) if head_name else None
            classes = card_heads.get(head_name or "", [])
            img.set(f"{field}_code",
                    classes.index(head.label) + 1 if head and head.label in classes else 0)
            img.set(f"{field}_confidence_permille", _permille(head.confidence) if head else 0)
        img.set("confidence_permille", _permille(min(confidences)) if confidences else 0)
        img.set("result_status", regmap.code("result_status", "ok" if result.status == "ok" else "failed"))
        img.set("result_part_id", result.part_id or "")
        img.set("result_batch", result.batch or "")
        img.set("result_sequence", result.seq & 0xFFFFFFFF)
        self.result_valid = True

    # -- the RegisterBank the wire server reads and writes ------------------------------------------
    def read(self, table: str, address: int, count: int) -> list[int]:
        assert self.image is not None
        self._refresh()
        return self.image.read(table, address, count)

    def write(self, table: str, address: int, values: list[int], peer: str) -> None:
        """Apply a PLC write from ``peer``; refusals are counted by kind and logged once per peer and kind."""
        try:
            self._write(table, address, values, peer)
        except ModbusError as exc:
            if exc.kind is not None:
                self.daemon.metrics.modbus_refused_writes.labels(exc.kind).inc()
                self._refused_writes.event(f"{peer} {exc.kind}", "modbus: write from %s refused: %s (further "
                                           "ones like it are logged at debug level; counted in "
                                           "appliance_modbus_refused_writes_total)", peer, exc)
            raise

    def _write(self, table: str, address: int, values: list[int], peer: str) -> None:
        from appliance.daemon import HaltOwned

        assert self.image is not None
        img = self.image
        self._show_batch()  # a write of part of the batch changes the batch in use
        before = self._control_bits()
        saved = {t: img.values[t][:] for t in ("coil", "holding_register")}
        touched = img.write(table, address, values)
        names = {e.name for e in touched}
        if "control_word" in names:
            word = int(img.get("control_word"))
            for name in CONTROL_BITS:
                img.set(name, bool(word >> int(img.map[name].bit or 0) & 1))
        after = self._control_bits()
        if after["reset"] and not before["reset"]:
            try:
                self.daemon.check_reset("modbus", peer)
            except HaltOwned as exc:  # the halt belongs to OPC UA or the API: this write changes nothing
                img.values.update(saved)
                raise ModbusError(ExcCodes.ILLEGAL_FUNCTION, str(exc), kind="reset_refused") from None
        ctx, audit = self.daemon.context, self.daemon.audit_trail
        for e in touched:  # inputs first, so one write can carry the part data and the trigger
            if e.name == "part_id":
                ctx.part_id = str(img.get("part_id")) or None
                audit.input_write("modbus", peer, "part_id", ctx.part_id)
            elif e.name == "batch":
                ctx.batch = str(img.get("batch")) or None
                audit.input_write("modbus", peer, "batch", ctx.batch)
            elif e.process_value:
                ctx.process_values[e.name] = float(img.get(e.name))
                audit.input_write("modbus", peer, e.name, ctx.process_values[e.name])
        if after["trigger"] and not before["trigger"]:
            audit.input_write("modbus", peer, "trigger", True)
            self._on_trigger()
        elif before["trigger"] and not after["trigger"]:
            self.trigger_ack = False
        if after["result_ack"] and not before["result_ack"]:
            audit.input_write("modbus", peer, "result_ack", True)
            self.result_valid = False
        if after["reset"] and not before["reset"]:
            self.trigger_failed = False
            img.set("trigger_error", img.map.code("trigger_error", "none"))
            if self.daemon.resettable:
                self._spawn(self._reset(peer))
            else:  # nothing to reset: counted like an input, so toggling the coil cannot flood the audit
                audit.input_write("modbus", peer, "reset", True)

    async def _reset(self, peer: str) -> None:
        from appliance.daemon import HaltOwned

        try:
            await self.daemon.reset("modbus", peer)
        except HaltOwned as exc:  # halted over another channel since the write was checked
            log.warning("modbus: reset from %s refused: %s", peer, exc)

    # -- the handshake ------------------------------------------------------------------------------
    def _on_trigger(self) -> None:
        assert self.image is not None
        self.trigger_ack, self.result_valid, self.trigger_failed = True, False, False
        self.image.set("trigger_error", self.image.map.code("trigger_error", "none"))
        self.pending += 1
        batch, part_id, values = self.daemon.context.take()
        self._spawn(self._run_trigger(part_id, batch, values))

    async def _run_trigger(self, part_id: str | None, batch: str | None, values: dict[str, float]) -> None:
        from appliance.daemon import FrameDropped, LineHalted

        error, detail = None, ""
        try:
            future = await self.daemon.trigger(part_id=part_id, batch=batch, process_values=values)
            await asyncio.wait([future])
            if future.cancelled():
                error = "stopped"
            elif (exc := future.exception()) is not None:
                error = "frame_dropped" if isinstance(exc, FrameDropped) else "camera_failed"
                detail = str(exc)
        except LineHalted:
            error = "halted"
        except TriggerNotSupported:
            error = "not_triggerable"
        except (RuntimeError, OSError) as exc:  # the camera refused the software trigger
            error, detail = "camera_failed", str(exc)
        finally:
            self.pending -= 1
        if error in ("halted", "not_triggerable"):  # the inputs were not used: keep them for the next part
            ctx = self.daemon.context
            ctx.part_id = ctx.part_id or part_id
            ctx.process_values = {**values, **ctx.process_values}
        if error is None:
            self._trigger_trouble.recover("modbus: triggers produce results again")
            return
        assert self.image is not None
        self.trigger_failed = True
        self.image.set("trigger_error", self.image.map.code("trigger_error", error))
        self._trigger_trouble.fail("modbus: trigger gave no result (%s%s)", error,
                                   f": {detail}" if detail else "")

    def _control_bits(self) -> dict[str, bool]:
        assert self.image is not None
        return {name: bool(self.image.get(name)) for name in CONTROL_BITS}

    def _refresh(self) -> None:
        """Write the live status into the image just before a PLC reads it."""
        assert self.image is not None
        img, state = self.image, self.daemon.state
        bits = {
            "ready": self._ready(state),
            "trigger_ack": self.trigger_ack, "busy": self.pending > 0,
            "result_valid": self.result_valid, "error": state == "error",
            "camera_online": self.daemon.camera_online, "halted": state == "halted",
            "trigger_failed": self.trigger_failed, "image_warning": self.daemon.image_health.alarm,
            "quality_alarm": self.daemon.quality_alarm,
        }
        word = 0
        for name in STATUS_BITS:
            img.set(name, bits[name])
            word |= int(bits[name]) << (img.map[name].bit or 0)
        img.set("status_word", word)
        img.set("control_word", sum(int(img.get(n)) << (img.map[n].bit or 0) for n in CONTROL_BITS))
        img.set("vision_state", img.map.code("vision_state", state))
        self._show_batch()

    def _show_batch(self) -> None:
        """The ``batch`` register holds the batch in use (``daemon.context``), whoever set it; text it
        cannot hold (not printable ASCII) shows as '?', a longer batch is cut."""
        assert self.image is not None
        batch = self.daemon.context.batch or ""
        if batch != self._batch_shown:
            self.image.set("batch", "".join(c if " " <= c < "\x7f" else "?" for c in batch))
            self._batch_shown = batch

    def _ready(self, state: str) -> bool:
        """Whether a trigger rising now is served: false for every refusal known in advance.

        The refusals (``_run_trigger``): halted (trigger_error 1), a free-running camera (2; also
        after a run-time switch to continuous), appliance starting or stopping (4), camera offline
        or stalled (5); a finished replay never delivers the frame.  Vision state Error also covers
        results that could not be stored, where the PLC should not go on triggering either.  What
        cannot be known in advance (a frame dropped because the classifier is full, a camera that
        fails during the trigger) is still reported through trigger_failed / trigger_error.
        """
        assert self.image is not None
        source = self.daemon.source
        return (state == "operational" and not source.continuous and not source.finished
                and self.pending == 0 and not self.image.get("trigger"))

    async def _heartbeat(self) -> None:
        assert self.image is not None
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self.image.set("heartbeat", (int(self.image.get("heartbeat")) + 1) & 0xFFFF)

    @staticmethod
    def _warn_if_open(allowed: list[Network]) -> None:
        if everyone := [str(net) for net in allowed if net.prefixlen == 0]:
            log.warning("modbus: allowed_clients includes %s: EVERY host that can reach the port may connect "
                        "and write part data, trigger, acknowledge results and reset (Modbus has no login); "
                        "list the PLC addresses instead", " and ".join(everyone))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _head_classes(self) -> dict[str, list[str]]:
        """Class names per head of the model being served (codes are index + 1)."""
        classifier = self.daemon.classifier
        return {h.name: list(h.classes) for h in classifier.card.heads} if classifier else {}

    def _describe_codes(self) -> None:
        """Log what defect_type_code / severity_code mean for the model being served."""
        heads = self._head_classes()
        for register, head in (("defect_type_code", self.daemon.config.plc.type_head),
                               ("severity_code", self.daemon.config.plc.severity_head)):
            if head is None:
                log.info("modbus: %s is always 0 (plc.%s is not set)", register,
                         "type_head" if register.startswith("defect") else "severity_head")
            elif head not in heads:
                log.warning("modbus: %s reports head '%s', which the model does not have (%s); it "
                            "stays 0", register, head, ", ".join(heads))
            else:
                log.info("modbus: %s = %s", register,
                         ", ".join(f"{i + 1} {c}" for i, c in enumerate(heads[head])))


def _permille(confidence: float) -> int:
    return max(0, min(1000, round(confidence * 1000)))

