"""What a PLC may do over OPC UA: the state machine methods, the part inputs and the trigger.

Everything here is for the operator role; a reader gets BadUserAccessDenied.  Failures become
status codes at the wire (BadInvalidState while halted or free-running, BadTypeMismatch for a
wrong argument, BadOutOfRange for a part id or batch outside the safe character set of
:mod:`appliance.part_text`, counted in ``appliance_plc_inputs_refused_total``), never exceptions
in the server.  Every input written and every trigger-mode change goes to the audit trail with
the OPC UA user who did it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AttributeService
from ulid import ULID

from appliance.camera.base import TriggerNotSupported
from appliance.part_text import MAX_PART_TEXT, UnsafeText, check_part_text, loggable
from appliance.plc.opcua_security import caller, may_operate
from appliance.result import PartResult

if TYPE_CHECKING:
    from appliance.daemon import Daemon

log = logging.getLogger(__name__)

MAX_TEXT = MAX_PART_TEXT
"""Longest id accepted in a method argument or an input."""
JOB_MEMORY = 4096
"""Results whose job id is remembered (GetResultListFiltered by jobId, GetResultById)."""

Bad = ua.StatusCodes


def status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def _name(user: User | None) -> str:
    """Who an audit row names: the OPC UA user, or the server's own internal session."""
    return (user.name if user is not None else None) or "internal"


class ArgumentError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _Job:
    job_id: str
    result: asyncio.Future[PartResult]
    claimed: str | None = None


@dataclass
class Jobs:
    """OPC 40100 job ids: one per StartSingleJob, one per continuous run.

    A StartSingleJob passes its job id to the daemon as the trigger's tag, and the result carries
    it back (``trigger_tag``), so the match is exact even when other trigger sources (HTTP API,
    Modbus) interleave; results of untagged triggers carry the current (continuous/line) job id.
    """

    current: str = field(default_factory=lambda: str(ULID()))
    _pending: deque[_Job] = field(default_factory=deque)
    _by_result: OrderedDict[str, str] = field(default_factory=OrderedDict)

    @staticmethod
    def new_id() -> str:
        return str(ULID())

    def start_single(self, result: asyncio.Future[PartResult], job_id: str) -> str:
        job = _Job(job_id, result)
        self._pending.append(job)
        result.add_done_callback(lambda fut: self._settled(job, fut))
        return job.job_id

    def start_continuous(self) -> str:
        self.current = str(ULID())
        return self.current

    @property
    def single_pending(self) -> bool:
        return any(job.claimed is None for job in self._pending)

    def claim(self, result: PartResult) -> str:
        """The job id of a result being published."""
        job_id = self.current
        for job in self._pending:
            if job.claimed is None and job.job_id == result.trigger_tag:
                job.claimed, job_id = result.result_id, job.job_id
                break
        self._by_result[result.result_id] = job_id
        while len(self._by_result) > JOB_MEMORY:
            self._by_result.popitem(last=False)
        return job_id

    def job_of(self, result_id: str) -> str | None:
        return self._by_result.get(result_id)

    def results_of(self, job_id: str) -> list[str]:
        return [rid for rid, jid in reversed(self._by_result.items()) if jid == job_id]

    def _settled(self, job: _Job, fut: asyncio.Future[PartResult]) -> None:
        self._pending.remove(job)
        if not fut.cancelled() and fut.exception() is None and fut.result().result_id != job.claimed:
            log.debug("job %s: result %s was published under another job id (interleaved triggers)",
                      job.job_id, fut.result().result_id)


def _text(value: Any, what: str) -> str:
    """A String or an OPC 40100 Id structure (…IdDataType) as text; empty when null."""
    if value is None or (isinstance(value, ua.ExtensionObject) and not value.Body):
        return ""  # a null structure
    if isinstance(value, str):
        return value
    if hasattr(value, "Id") and isinstance(value.Id or "", str):
        return value.Id or ""
    raise ArgumentError(Bad.BadTypeMismatch, f"{what}: expected a String or an Id structure")


def text_id(value: Any, what: str) -> str:
    """:func:`_text`, trimmed and at most :data:`MAX_TEXT` characters (filters, ids)."""
    text = _text(value, what).strip()
    if len(text) > MAX_TEXT:
        raise ArgumentError(Bad.BadOutOfRange, f"{what}: longer than {MAX_TEXT} characters")
    return text


def process_values(items: list[Any] | None, names: list[str]) -> dict[str, float]:
    """Numbers (named by ``names``, else pv1, pv2, …) or KeyValuePairs, as a name → value dict."""
    out: dict[str, float] = {}
    if items is not None and not isinstance(items, list):
        raise ArgumentError(Bad.BadTypeMismatch, "process values: expected an array")
    for i, item in enumerate(items or []):
        value = item.Value if isinstance(item, ua.Variant) else item
        if isinstance(value, ua.KeyValuePair):
            name = value.Key.Name if value.Key is not None else ""
            value = value.Value.Value if isinstance(value.Value, ua.Variant) else value.Value
        else:
            name = names[i] if i < len(names) and names[i] else f"pv{i + 1}"
        if isinstance(value, bool) or not isinstance(value, int | float) or not name:
            raise ArgumentError(Bad.BadTypeMismatch, f"process value {i + 1}: expected a number")
        if not math.isfinite(value):
            raise ArgumentError(Bad.BadOutOfRange, f"process value {name}: not a finite number")
        out[name] = float(value)
    return out


def _error_out(code: int = 0) -> list[ua.Variant]:
    return [ua.Variant(code, ua.VariantType.Int32)]


class LineControl:
    """The operator's handles on the line: methods of the state machines, inputs, trigger."""

    def __init__(self, daemon: Daemon, jobs: Jobs, new_job_id: Callable[[str], Any],
                 changed: Callable[[], Awaitable[None]], continuous: bool) -> None:
        self.daemon = daemon
        self.jobs = jobs
        self._job_id = new_job_id
        self._changed = changed
        self.continuous = continuous
        self.process_value_names: list[str] = []
        self.process_values_raw: list[float] = []

    # -- methods (asyncua calls them with the parent NodeId and the input Variants) ---------------
    async def start_single_job(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        try:
            self._require_operator()
            meas, part, recipe, product, params = (list(args) + [ua.Variant()] * 5)[:5]
            text_id(meas.Value, "measId")
            part_id = self._part_text(part.Value, "StartSingleJob.partId")
            self._no_recipe(recipe.Value, product.Value)
            values = process_values(params.Value, self.process_value_names)
            job_id = await self.trigger(part_id or None, values)
        except ArgumentError as exc:
            log.info("StartSingleJob refused: %s", exc)
            return status(exc.code)
        self.daemon.audit_trail.input_write("opcua", _who(), "StartSingleJob", part_id)
        return [ua.Variant(self._job_id(job_id), ua.VariantType.ExtensionObject), *_error_out()]

    async def start_continuous(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        try:
            self._require_operator()
            _meas, part, recipe, product, params = (list(args) + [ua.Variant()] * 5)[:5]
            self._no_recipe(recipe.Value, product.Value)
            part_id = self._part_text(part.Value, "StartContinuous.partId")
            values = process_values(params.Value, self.process_value_names)
            await self._set_continuous(True)
        except ArgumentError as exc:
            log.info("StartContinuous refused: %s", exc)
            return status(exc.code)
        self.daemon.audit_trail.record(_who(), "opcua", "line.trigger_mode", "continuous",
                                       {"part_id": part_id, "process_values": values})
        if part_id:
            self.daemon.context.part_id = part_id
        if values:
            self.daemon.context.process_values = values
        job_id = self.jobs.start_continuous()
        await self._changed()
        return [ua.Variant(self._job_id(job_id), ua.VariantType.ExtensionObject), *_error_out()]

    async def stop(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        """Stop and Abort: back to triggered acquisition; parts already acquired are finished."""
        try:
            self._require_operator()
            await self._set_continuous(False)
        except ArgumentError as exc:
            return status(exc.code)
        self.daemon.audit_trail.record(_who(), "opcua", "line.trigger_mode", "triggered")
        await self._changed()
        return _error_out()

    async def halt(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        user = caller()
        if not may_operate(user):
            return status(Bad.BadUserAccessDenied)
        await self.daemon.halt("opcua", _name(user))
        self.continuous = False
        await self._changed()
        return _error_out()

    async def reset(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        """BadInvalidState when the line was halted over another channel (Modbus, the HTTP API)."""
        from appliance.daemon import HaltOwned

        user = caller()
        if not may_operate(user):
            return status(Bad.BadUserAccessDenied)
        try:
            await self.daemon.reset("opcua", _name(user))
        except HaltOwned as exc:
            log.info("OPC UA Reset refused: %s", exc)
            return status(Bad.BadInvalidState)
        await self._changed()
        return _error_out()

    # -- shared ------------------------------------------------------------------------------------
    async def trigger(self, part_id: str | None, values: dict[str, float]) -> str:
        """One part now, with the part data written before (arguments win); returns the job id."""
        from appliance.daemon import LineHalted

        context = self.daemon.context
        part_id = part_id or context.part_id
        values = {**context.process_values, **values}
        try:
            job_id = self.jobs.new_id()
            future = await self.daemon.trigger(part_id=part_id, process_values=values, tag=job_id)
        except LineHalted as exc:
            raise ArgumentError(Bad.BadInvalidState, "the line is halted; call Reset first") from exc
        except TriggerNotSupported as exc:
            raise ArgumentError(Bad.BadInvalidState,
                                "the camera runs free (continuous); call Stop first") from exc
        except (RuntimeError, OSError) as exc:
            log.warning("OPC UA trigger failed: %s", exc)
            raise ArgumentError(Bad.BadResourceUnavailable, f"camera trigger failed: {exc}") from exc
        context.part_id, context.process_values = None, {}  # consumed by this part
        self.jobs.start_single(future, job_id)
        await self._changed()
        return job_id

    async def _set_continuous(self, on: bool) -> None:
        from appliance.daemon import LineHalted

        try:
            await self.daemon.set_continuous(on)
        except LineHalted as exc:
            raise ArgumentError(Bad.BadInvalidState, "the line is halted; call Reset first") from exc
        except TriggerNotSupported as exc:
            raise ArgumentError(Bad.BadNotSupported, str(exc)) from exc
        self.continuous = on

    def _part_text(self, value: Any, what: str) -> str:
        """A part id or batch: text in the safe character set, or BadOutOfRange (counted)."""
        try:
            return check_part_text(_text(value, what), what)
        except UnsafeText as exc:
            self.daemon.metrics.plc_inputs_refused.labels("opcua", what).inc()
            raise ArgumentError(Bad.BadOutOfRange, str(exc)) from None

    @staticmethod
    def _require_operator() -> None:
        if not may_operate(caller()):
            raise ArgumentError(Bad.BadUserAccessDenied, "the operator role is required")

    @staticmethod
    def _no_recipe(recipe: Any, product: Any) -> None:
        if text_id(recipe, "recipeId") or text_id(product, "productId"):
            raise ArgumentError(Bad.BadInvalidArgument, "recipeId/productId must be empty: the recipe is "
                                                        "the model version the appliance serves")

    # -- inputs (values written by the PLC) --------------------------------------------------------
    async def write_part_id(self, value: Any) -> Any:
        text = self._part_text(value, "PartId")
        self.daemon.context.part_id = text or None
        return text  # the variable shows the part id in use (trimmed)

    async def write_batch(self, value: Any) -> Any:
        text = self._part_text(value, "Batch")
        self.daemon.context.batch = text or None
        return text

    async def write_value_names(self, value: Any) -> Any:
        names = [text_id(v, "ProcessValueNames") for v in (value or [])]
        self.daemon.context.process_values = process_values(self.process_values_raw, names)
        self.process_value_names = names
        return value

    async def write_values(self, value: Any) -> Any:
        values = process_values(list(value or []), self.process_value_names)
        self.daemon.context.process_values = values
        self.process_values_raw = list(values.values())
        return value

    async def write_trigger(self, value: Any) -> Any:
        if value is True:
            await self.trigger(None, {})
        return False  # written back at once: the PLC sees its trigger taken


def _who() -> str:
    """The OPC UA user calling a method (for the audit trail)."""
    user = caller()
    return (user.name if user is not None else None) or ""


InputHandler = Callable[[Any], Awaitable[Any]]
InputAudit = Callable[[str, str, Any], None]
"""Records one input write: (OPC UA user, input name, value stored)."""


class InputWriteService(AttributeService):
    """asyncua's Write service with roles, and with the PLC inputs handled by :class:`LineControl`.

    asyncua checks only the nodes' access levels, which are the same for every user; here a reader
    gets BadUserAccessDenied for any write, and an input's handler validates and applies the value
    before it is stored (its status code goes back to the PLC); each input stored is audited.
    """

    def __init__(self, aspace: Any, inputs: dict[ua.NodeId, InputHandler], audit: InputAudit) -> None:
        super().__init__(aspace)
        self.inputs = inputs
        self.audit = audit

    async def write(self, params: ua.WriteParameters,
                    user: User = User(role=UserRole.Admin)) -> list[ua.StatusCode]:  # noqa: B008
        if user.role == UserRole.Admin:  # the server itself
            return await super().write(params, user)
        results: list[ua.StatusCode] = []
        for item in params.NodesToWrite:
            handler = self.inputs.get(item.NodeId)
            if not may_operate(user):
                results.append(status(Bad.BadUserAccessDenied))
            elif handler is None or item.AttributeId != ua.AttributeIds.Value:
                results.extend(await super().write(ua.WriteParameters(NodesToWrite=[item]), user))
            elif item.IndexRange:
                results.append(status(Bad.BadWriteNotSupported))
            else:
                results.append(await self._write_input(item, handler, user.name or ""))
        return results

    async def _write_input(self, item: ua.WriteValue, handler: InputHandler, who: str) -> ua.StatusCode:
        variant = item.Value.Value if item.Value is not None else None
        current = self._aspace.read_attribute_value(item.NodeId, ua.AttributeIds.Value).Value
        if (variant is None or current is None or variant.VariantType != current.VariantType
                or variant.is_array != current.is_array):
            return status(Bad.BadTypeMismatch)
        name = str(item.NodeId.Identifier).rsplit(".", 1)[-1]
        try:
            stored = await handler(variant.Value)
        except ArgumentError as exc:
            log.info("OPC UA input %s from user %s refused: %s", name, loggable(who), exc)
            return status(exc.code)
        self.audit(who, name, variant.Value)
        return await self._aspace.write_attribute_value(
            item.NodeId, ua.AttributeIds.Value,
            ua.DataValue(ua.Variant(stored, variant.VariantType, is_array=variant.is_array)))
