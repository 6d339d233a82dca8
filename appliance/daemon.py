"""The edge daemon: one asyncio loop wiring camera → classifier → disposition → store → publishers.

Start order: store, image archive, model, HTTP API, pipeline worker, camera.  Stop order is the
reverse for producers first: the camera stops, the frames already queued are still judged and
journaled, then the API and the store close.  Nothing a PLC has seen is ever lost, because
publishers run only after the store has the result on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import numpy as np

from appliance.active import ReviewQueue
from appliance.analytics import Analytics, Filters, Shifts, heads_for
from appliance.archive import ImageArchive
from appliance.audit import AuditTrail
from appliance.auth import TokenIssuer, UserStore
from appliance.camera.base import Frame, FrameSource, TriggerNotSupported
from appliance.config import AppConfig
from appliance.disposition import IMAGE_ERROR, Disposer
from appliance.errors import UserError
from appliance.gate import GateVerdict, run_gate
from appliance.image_health import ImageHealth
from appliance.inference import BadImage, Classifier
from appliance.login_guard import UNLOCK_DIR, LoginGuard
from appliance.metrics import LineMetrics
from appliance.part_text import loggable
from appliance.priority import background_executor
from appliance.registry import ModelRegistry
from appliance.result import PartResult, head_results, new_result_id
from appliance.retrain import Retrainer
from appliance.sd_notify import notify, watchdog_interval_s
from appliance.shadow import ShadowRunner
from appliance.store import Store

log = logging.getLogger(__name__)

Publisher = Callable[[PartResult], Awaitable[None]]
BACKGROUND_WORKERS = 6
"""Threads for asyncio.to_thread work, as asyncio's own default on 2 cores (cores + 4)."""
LATENCY_WINDOW = 2048
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 30.0
STUCK_AFTER_S = 10.0
"""Frames waiting but none judged for this long: inference is hung; stop feeding the watchdog."""
HOLDS_REFRESH_S = 5.0
QUALITY_CHECK_S = 60.0
QUALITY_WINDOW = timedelta(hours=8)
"""The control chart the PLC's quality alarm follows: the defect rate of the last shift's length."""


class LineHalted(RuntimeError):
    """The line is halted (vision state machine); a trigger is refused until Reset."""


class HaltOwned(LineHalted):
    """A Reset from another channel than the one that halted the line; the message names that channel."""

    def __init__(self, owner: str, who: str) -> None:
        super().__init__(f"the line was halted over {owner} (by {who}); only {owner}, or an engineer "
                         f"through the API (POST /api/v1/line/reset), may reset it")
        self.owner = owner


ENGINEER_CHANNEL = "api"
"""The channel that may always reset: an engineer through the HTTP API (the route checks the role)."""


class GateRefused(UserError):
    """The candidate failed the validation gate; the champion keeps serving."""

    def __init__(self, verdict: GateVerdict) -> None:
        super().__init__(f"model {verdict.candidate} failed the gate: " + "; ".join(verdict.reasons))
        self.verdict = verdict


class FrameDropped(RuntimeError):
    """The triggered frame was dropped because the classifier queue was full."""


class PlcEndpoint(Protocol):
    """A PLC-facing server (OPC UA, Modbus) living in the daemon's loop."""

    name: str

    async def start(self) -> None:
        """Bind and serve; raise UserError (port taken, bad settings) after undoing a half start."""

    async def stop(self) -> None:
        """Stop serving; idempotent."""

    async def publish(self, result: PartResult) -> None:
        """Called once per result, in sequence order, after the result is durable."""


@dataclass(slots=True)
class Ticket:
    """One trigger: the part data the PLC sent with it, and the future of its result."""

    part_id: str | None
    batch: str | None
    process_values: dict[str, float]
    result: asyncio.Future[PartResult]
    tag: str | None = None


@dataclass(slots=True)
class PartContext:
    """What the PLC told us about the parts: batch (sticky), part id and process values (next part)."""

    batch: str | None = None
    part_id: str | None = None
    process_values: dict[str, float] = field(default_factory=dict)

    def take(self) -> tuple[str | None, str | None, dict[str, float]]:
        part_id, values = self.part_id, self.process_values
        self.part_id, self.process_values = None, {}
        return self.batch, part_id, values


@dataclass(slots=True)
class LineStats:
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    frames: int = 0
    dropped: int = 0
    discarded_halted: int = 0
    judged: int = 0
    failed: int = 0
    store_errors: int = 0
    dispositions: Counter[str] = field(default_factory=Counter)
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    stored_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def summary(self) -> dict[str, Any]:
        def pct(values: deque[float]) -> dict[str, float | None]:
            if not values:
                return {"p50": None, "p99": None}
            arr = np.fromiter(values, float)
            return {"p50": round(float(np.percentile(arr, 50)), 3),
                    "p99": round(float(np.percentile(arr, 99)), 3)}

        return {
            "frames": self.frames, "dropped": self.dropped, "discarded_halted": self.discarded_halted,
            "judged": self.judged,
            "failed": self.failed, "store_errors": self.store_errors,
            "dispositions": dict(self.dispositions),
            "decided_latency_ms": pct(self.latency_ms), "stored_latency_ms": pct(self.stored_ms),
        }

    def in_words(self) -> str:
        """The summary as one log line an operator can read."""
        s = self.summary()
        mix = ", ".join(f"{d} {n}" for d, n in s["dispositions"].items())
        latency = "; ".join(f"{what} p50 {v['p50']:.1f} ms, p99 {v['p99']:.1f} ms" for what, v in
                            (("decided", s["decided_latency_ms"]), ("stored", s["stored_latency_ms"]))
                            if v["p50"] is not None)
        return (f"{s['frames']} frames, {s['judged']} judged ({mix or 'none'}), {s['dropped']} dropped, "
                f"{s['failed']} failed, {s['store_errors']} not stored"
                + (f", {s['discarded_halted']} discarded while halted" if s["discarded_halted"] else "")
                + (f"; {latency}" if latency else ""))


def make_endpoints(config: AppConfig, daemon: Daemon) -> list[PlcEndpoint]:
    endpoints: list[PlcEndpoint] = []
    if config.opcua.enabled:
        from appliance.plc.opcua import OpcUaEndpoint

        endpoints.append(OpcUaEndpoint(config.opcua, daemon))
    if config.modbus.enabled:
        from appliance.plc.modbus import ModbusEndpoint

        endpoints.append(ModbusEndpoint(config.modbus, daemon))
    return endpoints


def make_source(config: AppConfig) -> FrameSource:
    cam = config.camera
    if cam.source == "replay":
        from appliance.camera.replay import ReplaySource

        assert cam.replay is not None
        replay = cam.replay.model_copy(update={"path": config.resolve(cam.replay.path)})
        return ReplaySource(replay, cam.view)
    from appliance.camera.genicam import GenICamSource

    assert cam.genicam is not None
    genicam = cam.genicam.model_copy(update={"cti": config.resolve(cam.genicam.cti)})
    return GenICamSource(genicam, cam.view)


class Daemon:
    def __init__(self, config: AppConfig, source: FrameSource | None = None) -> None:
        self.config = config
        self.source = source or make_source(config)
        self.store = Store(config.resolve(config.store.path), config.state_dir / "journal",
                           memory_limit_mb=config.store.duckdb_memory_limit_mb, threads=config.store.duckdb_threads,
                           max_spill_mb=config.store.duckdb_max_spill_mb)
        self.archive = ImageArchive(config.resolve(config.store.archive_dir), config.store.retention)
        self.audit_trail = AuditTrail(self.store)
        self.registry = ModelRegistry(config.models_dir)
        self.users = UserStore(config.state_dir / "users.json")
        self.tokens = TokenIssuer(config.state_dir / "api-secret")
        self.disposer = Disposer(config.disposition)
        self.context = PartContext(batch=config.line.batch)
        self.stats = LineStats()
        self.publishers: list[Publisher] = []
        self.endpoints: list[PlcEndpoint] = make_endpoints(config, self)
        self.halted = False
        self.halted_by: tuple[str, str] | None = None
        """(channel, who) of the halt in force: only that channel, or the API, may reset it."""
        self._refused_resets: Counter[tuple[str, str]] = Counter()
        self._tickets: deque[Ticket] = deque()
        self.classifier: Classifier | None = None
        self.shadow: ShadowRunner | None = None
        self.retrainer = Retrainer(self)
        self.metrics = LineMetrics()
        self.login_guard = LoginGuard(config.login, self.audit_trail, self.metrics, config.state_dir / UNLOCK_DIR)
        self.image_health = ImageHealth(config.camera.health)
        self.waiting_for_review = {"hold": 0, "audit": 0}
        self.review_queue = ReviewQueue(self.store, config.disposition.heads, config.review.queue_max_age_s)
        self.analytics: Analytics | None = None
        self.quality_alarm = False
        self.quality_reason = ""
        self.camera_stalled = False
        self._last_frame = time.monotonic()
        self._last_judged = (0, time.monotonic())
        self._swap_lock = asyncio.Lock()
        self.latest: PartResult | None = None
        self.running = False
        self.source_done = False
        self.api_port: int | None = None
        self._queue: asyncio.Queue[Frame | None] = asyncio.Queue(maxsize=config.camera.queue_size)
        self._infer_pool = ThreadPoolExecutor(max_workers=config.model.inference_workers,
                                              thread_name_prefix="inference")
        self._background = background_executor(BACKGROUND_WORKERS)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._api: Any = None
        self._result_event = asyncio.Condition()
        self._started = False
        self._started_endpoints: list[PlcEndpoint] = []
        self.metrics.attach(self)  # last: its collector reads the attributes above

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bring everything up; on any failure, undo what already started and re-raise."""
        # asyncio.to_thread work (API and dashboard queries, PLC result queries, model loading)
        # yields the CPU to the line: see appliance.priority
        asyncio.get_running_loop().set_default_executor(self._background)
        try:
            self.classifier = await asyncio.to_thread(self._load_model)
            self.store.open()
            if self.store.recovered:
                log.warning("recovered %d results from the journal after an unclean stop",
                            self.store.recovered)
            self.audit_trail.start()
            self.archive.start()
            self.analytics = Analytics(self.store, heads_for(self.config, self.classifier.card))
            from appliance.api import ApiServer

            self._api = ApiServer(self)
            self.api_port = await self._api.start(self.config.api.host, self.config.api.port)
            for endpoint in self.endpoints:
                await endpoint.start()
                self._started_endpoints.append(endpoint)
                self.publishers.append(endpoint.publish)
            self._tasks.append(asyncio.create_task(self._judge_loop(), name="judge"))
            await self.source.open()
            self._tasks.append(asyncio.create_task(self._acquire_loop(), name="acquire"))
            self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
            self._tasks.append(asyncio.create_task(self._supervise(), name="supervise"))
        except BaseException:
            await self.stop()
            raise
        self.running = self._started = True
        notify("READY=1", f"STATUS=line running, model {self.classifier.version}")
        m = self.config.model
        log.info("line running: model %s (%d inference worker(s) x %d thread(s)), camera '%s' (%s), "
                 "API http://%s:%s", self.classifier.version, m.inference_workers, m.intra_op_threads,
                 self.config.camera.view, self.config.camera.source, self.config.api.host, self.api_port)

    def _load_model(self) -> Classifier:
        """The registry's champion once there is one (a promote or rollback made it), else model.path:
        the configured model is where a line starts, and a restart never undoes a promotion."""
        path = self.registry.champion_path()
        configured = self.config.resolve(self.config.model.path) if self.config.model.path else None
        if path is None:
            path = configured
        elif configured is not None and configured.resolve() != path.resolve():
            log.warning("serving the registry's champion %s, not model.path %s: model.path is the first model; "
                        "a promote or rollback since then decides (appliance models list)", path.name, configured)
        if path is None:
            raise UserError(
                f"no model to serve: set model.path to a model package (e.g. one `appliance train` wrote or "
                f"registered in {self.registry.root}); promotions then choose the model served"
            )
        m = self.config.model
        classifier = Classifier(path, m.intra_op_threads, m.warmup_runs, m.spin_wait)
        self.disposer.check_against(classifier.card)
        return classifier

    async def stop(self) -> None:
        """Stop producers first, judge and store what is already queued, then close the rest."""
        self.running = False
        self._stop.set()
        await self.retrainer.stop()
        with contextlib.suppress(Exception):
            await self.source.close()
        notify("STOPPING=1")
        acquire = [t for t in self._tasks if t.get_name() in ("acquire", "housekeeping", "supervise")]
        for task in acquire:
            task.cancel()
        await asyncio.gather(*acquire, return_exceptions=True)
        judge = [t for t in self._tasks if t.get_name() == "judge"]
        if any(not t.done() for t in judge):  # a judge task that ended would never take the sentinel
            await self._queue.put(None)
        await asyncio.gather(*judge, return_exceptions=True)
        self._tasks.clear()
        for ticket in self._tickets:
            if not ticket.result.done():
                ticket.result.cancel()
        self._tickets.clear()
        for endpoint in reversed(self._started_endpoints):
            with contextlib.suppress(Exception):
                await endpoint.stop()
        self._started_endpoints.clear()
        if self._api is not None:
            await self._api.stop()
            self._api = None
        self._infer_pool.shutdown(wait=True)
        if self.shadow is not None:
            await asyncio.to_thread(self.shadow.close)
            self.shadow = None
        self.archive.close()
        self.audit_trail.close()
        self.login_guard.close()
        if self.analytics is not None:
            self.analytics.close()
            self.analytics = None
        await asyncio.to_thread(self.store.close)
        if self._started:
            log.info("line stopped: %s", self.stats.in_words())

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def request_stop(self) -> None:
        self._stop.set()

    # -- PLC-facing controls ---------------------------------------------------------------------
    @property
    def state(self) -> Literal["preoperational", "operational", "halted", "error"]:
        """The vision system state (OPC 40100): what a PLC should believe about the station."""
        if not self.running:
            return "preoperational"
        if self.halted:
            return "halted"
        if not self.camera_online or self.stats.store_errors:
            return "error"
        return "operational"

    async def trigger(self, part_id: str | None = None, batch: str | None = None,
                      process_values: dict[str, float] | None = None,
                      tag: str | None = None) -> asyncio.Future[PartResult]:
        """Acquire one part now; returns the future of that part's published result.

        ``tag`` is recorded with the result (``trigger_tag``), e.g. the OPC UA JobId.

        Raises LineHalted while halted, TriggerNotSupported when the camera runs free.
        """
        if self.halted:
            raise LineHalted("the line is halted; Reset it first")
        if batch is not None:
            self.context.batch = batch
        ticket = Ticket(part_id, self.context.batch, dict(process_values or {}),
                        asyncio.get_running_loop().create_future(), tag)
        self._tickets.append(ticket)
        try:
            await self.source.trigger()
        except BaseException:
            self._tickets.remove(ticket)
            raise
        return ticket.result

    async def set_continuous(self, on: bool) -> None:
        """Free-running acquisition (True) or one part per trigger (False)."""
        if on and self.halted:
            raise LineHalted("the line is halted; Reset it first")
        await self.source.set_continuous(on)

    async def halt(self, channel: str, who: str) -> None:
        """Stop acquiring (vision state Halted); parts already acquired are still judged and stored.

        The first halt owns it: halting again from another channel does not take the halt over, so a
        channel cannot make a halt its own to reset it.
        """
        self.audit_trail.record(who, channel, "line.halt", None,
                                {"held_by": self.halted_by[0]} if self.halted_by else None)
        if self.halted_by is None:
            self.halted_by = (channel, who)
        self.halted = True
        log.info("line halted over %s by %s", channel, loggable(who))
        with contextlib.suppress(TriggerNotSupported):
            await self.source.set_continuous(False)

    @property
    def resettable(self) -> bool:
        """Whether a reset would change anything: the line is halted, or results could not be stored."""
        return self.halted or self.stats.store_errors > 0

    def check_reset(self, channel: str, who: str) -> None:
        """Raise HaltOwned if ``channel`` may not reset the halt in force.

        The first refusal of each (channel, who) during a halt is audited; repeats are only counted
        and reported with the reset that ends the halt, so hammering a reset coil cannot flood the
        audit table.
        """
        if self.halted_by is None or channel in (self.halted_by[0], ENGINEER_CHANNEL):
            return
        owner, holder = self.halted_by
        if (channel, who) not in self._refused_resets:
            self.audit_trail.record(who, channel, "line.reset.refused", None,
                                    {"halted_by": owner, "holder": holder})
        self._refused_resets[(channel, who)] += 1
        raise HaltOwned(owner, holder)

    async def reset(self, channel: str, who: str) -> None:
        """Leave Halted/Error: clear the error counters; acquisition stays stopped until started.

        Raises HaltOwned when the line was halted over another channel than ``channel`` (except "api").
        """
        self.check_reset(channel, who)
        detail: dict[str, Any] = {"from": self.state}
        if self.halted_by is not None:
            detail["halted_by"] = self.halted_by[0]
        if self._refused_resets:
            detail["refused_resets"] = sum(self._refused_resets.values())
        self.audit_trail.record(who, channel, "line.reset", None, detail)
        if self.halted:
            log.info("line reset over %s by %s", channel, loggable(who))
        self.halted, self.halted_by = False, None
        self._refused_resets.clear()
        self.stats.store_errors = 0

    async def wait_for_results(self, count: int, timeout: float) -> None:
        """Wait until ``count`` parts have been judged and stored (tests, demo)."""
        async with self._result_event:
            await asyncio.wait_for(
                self._result_event.wait_for(lambda: self.stats.judged >= count), timeout)

    # -- model lifecycle ---------------------------------------------------------------------------
    def _load_version(self, version: str) -> Classifier:
        self.registry.card(version)  # a registered version, named after what it holds
        m = self.config.model
        classifier = Classifier(self.registry.path(version), m.intra_op_threads, m.warmup_runs, m.spin_wait)
        self.disposer.check_against(classifier.card)
        return classifier

    async def promote(self, version: str, by: str | None = None, force: bool = False,
                      action: str = "promote") -> GateVerdict | None:
        """Hot swap: load and warm ``version`` beside the serving model, gate it, switch between frames.

        Raises ModelRejected (bad package) or GateRefused; either way the champion keeps serving.
        ``force`` skips the gate (rollback to a model that already served).
        """
        async with self._swap_lock:
            candidate = await asyncio.to_thread(self._load_version, version)
            verdict = None
            holdout = self.config.registry.holdout
            if not force and holdout is not None:
                assert self.classifier is not None
                verdict = await asyncio.to_thread(
                    run_gate, candidate.package_dir, self.classifier.package_dir,
                    self.config.resolve(holdout), self.config.registry.gate_margin)
                if not verdict.passed:
                    raise GateRefused(verdict)
            previous = self.classifier.version if self.classifier else None
            self.classifier = candidate  # the judge loop picks it up for the next frame
            if self.shadow is not None and self.shadow.version == version:
                await asyncio.to_thread(self.shadow.close)
                self.shadow = None
            await asyncio.to_thread(self.registry.set_champion, version, action, by)
            log.info("model %s now serving (was %s, %s by %s)", version, previous, action, by or "-")
            return verdict

    async def rollback(self, by: str | None = None) -> str:
        target = self.registry.rollback_target()
        if target is None:
            raise UserError("nothing to roll back to: the serving model replaced no earlier champion")
        await self.promote(target, by, force=True, action="rollback")
        return target

    async def set_shadow(self, version: str | None) -> None:
        """Run ``version`` as a challenger on live frames (None stops the shadow)."""
        async with self._swap_lock:
            old, self.shadow = self.shadow, None
            if old is not None:
                await asyncio.to_thread(old.close)
            if version is not None:
                await asyncio.to_thread(self.registry.card, version)
                classifier = await asyncio.to_thread(
                    lambda: Classifier(self.registry.path(version), 1, self.config.model.warmup_runs))
                self.shadow = ShadowRunner(classifier, self.store, self.config.registry.shadow_max_pending)
                log.info("shadow model %s now judging live frames (stored, never published)", version)

    # -- the pipeline ----------------------------------------------------------------------------
    async def _acquire_loop(self) -> None:
        """Feed the queue; if the camera's stream fails, reopen it with a capped backoff."""
        backoff = RECONNECT_MIN_S
        while True:
            try:
                await self._acquire()
                if self.source.finished or self._stop.is_set():
                    break
                log.error("camera '%s' stopped delivering; reconnecting in %.0f s", self.config.camera.view,
                          backoff)
            except (RuntimeError, OSError) as exc:
                log.error("camera '%s' failed (%s); reconnecting in %.0f s", self.config.camera.view,
                          exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)
            with contextlib.suppress(Exception):
                await self.source.close()
            try:
                await self.source.open()
                self._last_frame = time.monotonic()
                self.camera_stalled = False
                log.info("camera '%s' reconnected", self.config.camera.view)
                backoff = RECONNECT_MIN_S
            except (UserError, RuntimeError, OSError) as exc:
                log.debug("camera '%s' still unavailable: %s", self.config.camera.view, exc)
        self.source_done = True
        log.info("camera source finished after %d frames", self.stats.frames)

    async def _acquire(self) -> None:
        async for frame in self.source.frames():
            self.stats.frames += 1
            self.metrics.frames.inc()
            self._last_frame = time.monotonic()
            if self.camera_stalled:
                self.camera_stalled = False
                log.info("camera '%s' delivers frames again", self.config.camera.view)
            if self.halted and not self._tickets:
                self.stats.discarded_halted += 1  # a free-running camera keeps sending while halted
                continue
            ticket = self._tickets.popleft() if self._tickets else None
            if ticket is not None:
                frame.meta["ticket"] = ticket
                frame.meta["context"] = (ticket.batch, ticket.part_id, ticket.process_values)
            else:  # free-running: the PLC's last written part data belongs to this frame
                frame.meta["context"] = self.context.take()
            try:
                self._queue.put_nowait(frame)
            except asyncio.QueueFull:
                if ticket is not None:
                    ticket.result.set_exception(FrameDropped("classifier queue full"))
                self.stats.dropped += 1
                self.metrics.dropped.inc()
                if self.stats.dropped == 1 or self.stats.dropped % 100 == 0:
                    log.warning("classifier busy: %d frames dropped so far", self.stats.dropped)

    async def _judge_loop(self) -> None:
        """Classify up to ``model.inference_workers`` frames at once; store and publish in camera order.

        A frame leaves the camera queue only when an inference thread is free, so a busy line still
        drops (and counts) at the queue.  The committer takes results in the order the frames were
        dispatched: results are stored and published in acquisition order, and a part's commit
        overlaps the next parts' inference.
        """
        loop = asyncio.get_running_loop()
        workers = self.config.model.inference_workers
        free = asyncio.Semaphore(workers)
        judged: asyncio.Queue[tuple[Frame, asyncio.Future[PartResult]] | None] = asyncio.Queue(workers)
        committer = asyncio.create_task(self._commit_in_order(judged), name="commit")
        while True:
            await free.acquire()
            if (frame := await self._queue.get()) is None:
                break
            dequeued_ns = time.perf_counter_ns()
            classifier = self.classifier  # a model swap takes effect between two frames
            assert classifier is not None
            future = loop.run_in_executor(self._infer_pool, self._judge, frame, classifier, dequeued_ns)
            future.add_done_callback(lambda _: free.release())
            await judged.put((frame, future))
        await judged.put(None)
        await committer

    async def _commit_in_order(
            self, judged: asyncio.Queue[tuple[Frame, asyncio.Future[PartResult]] | None]) -> None:
        while (item := await judged.get()) is not None:
            frame, future = item
            try:
                result = await future
            except Exception:  # a bug must cost one part, never the line (the PLC would see "ready")
                log.exception("part from %s could not be judged; it is dropped and counted", frame.source_ref)
                self.stats.dropped += 1
                self.metrics.dropped.inc()
                continue
            await self._commit(result, frame)

    def _judge(self, frame: Frame, classifier: Classifier, dequeued_ns: int) -> PartResult:
        batch, part_id, process_values = frame.meta.get("context") or (self.context.batch, None, {})
        error = frame.error
        prediction = None
        t_infer = time.perf_counter_ns()
        if error is None and frame.image is not None:
            try:
                prediction = classifier.classify(frame.image)
            except BadImage as exc:
                error = str(exc)
        t_decide = time.perf_counter_ns()
        decision = IMAGE_ERROR if prediction is None else self.disposer.decide(prediction)
        t_done = time.perf_counter_ns()
        result_id = new_result_id()
        result = PartResult(
            result_id=result_id, acquired_at=frame.acquired_at, decided_at=datetime.now(UTC),
            line_id=self.config.line.line_id, asset_id=self.config.line.asset_id,
            camera_view=frame.camera_view, batch=batch,
            part_id=part_id or frame.meta.get("part_id") or _stem(frame.source_ref),
            model_version=classifier.version, disposition=decision.disposition, rule=decision.rule,
            review=decision.review, status="ok" if prediction is not None else "failed",
            error=error or (None if prediction is not None else "no image"),
            source_ref=frame.source_ref, process_values=process_values,
            predictions=head_results(prediction) if prediction else [],
            trigger_tag=ticket.tag if (ticket := frame.meta.get("ticket")) else None,
            latency={
                "queue_ms": (dequeued_ns - frame.acquired_ns) / 1e6,
                "inference_ms": (t_decide - t_infer) / 1e6,
                "decide_ms": (t_done - t_decide) / 1e6,
                "total_ms": (t_done - frame.acquired_ns) / 1e6,
            },
        )
        if self.archive.keep(result.disposition, failed=prediction is None, review=result.review):
            result.image_ref = self.archive.submit(result_id, frame.acquired_at, frame.image, frame.encoded)
        return result

    async def _commit(self, result: PartResult, frame: Frame) -> None:
        try:
            await self.store.append(result)
        except OSError as exc:
            self.stats.store_errors += 1
            self.metrics.store_errors.inc()
            log.error("result %s could not be stored (%s); it is not published", result.result_id, exc)
            return
        stored_ms = (time.perf_counter_ns() - frame.acquired_ns) / 1e6
        self.stats.stored_ms.append(stored_ms)
        self.metrics.observe(result, stored_ms)
        self.stats.latency_ms.append(result.latency["total_ms"])
        self.stats.judged += 1
        self.stats.dispositions[result.disposition] += 1
        if result.status == "failed":
            self.stats.failed += 1
            log.warning("part %s failed: %s (held for review)", result.part_id, result.error)
        self.latest = result
        for publish in self.publishers:
            try:
                await publish(result)
            except Exception:  # one broken publisher must not stop the line or the others
                log.exception("publisher %s failed for result %s", publish, result.result_id)
        if frame.image is not None:
            self.image_health.observe(frame.image)
            if self.shadow is not None:
                self.shadow.offer(result.result_id, frame.image)
        ticket = frame.meta.get("ticket")
        if ticket is not None and not ticket.result.done():
            ticket.result.set_result(result)
        async with self._result_event:
            self._result_event.notify_all()

    async def _housekeeping(self) -> None:
        while True:
            removed = await asyncio.to_thread(self.archive.prune)
            if removed:
                log.info("image retention: removed %d images older than %d days", removed,
                         self.config.store.retention.max_age_days)
            await asyncio.sleep(3600)

    async def _supervise(self) -> None:
        """Camera stall detection, the systemd watchdog, and slow-changing gauges."""
        watchdog = watchdog_interval_s()
        tick = min(watchdog or 1.0, 1.0)
        next_holds = 0.0
        next_quality = time.monotonic() + QUALITY_CHECK_S  # a chart needs a while of parts first
        while True:
            await asyncio.sleep(tick)
            self._check_camera()
            if watchdog is not None and self._progressing():
                notify("WATCHDOG=1", f"STATUS={self.state}, {self.stats.judged} parts judged")
            if time.monotonic() >= next_holds:
                next_holds = time.monotonic() + HOLDS_REFRESH_S
                self.waiting_for_review = await asyncio.to_thread(self.store.waiting_for_review)
            if time.monotonic() >= next_quality:
                next_quality = time.monotonic() + QUALITY_CHECK_S
                await self._check_quality()

    async def _check_quality(self) -> None:
        """The defect-rate control chart's alarm, for the PLC (Modbus bit, health, metrics)."""
        if self.analytics is None:
            return
        try:
            chart = await asyncio.to_thread(self.analytics.control,
                                            Filters(since=datetime.now(UTC) - QUALITY_WINDOW), Shifts())
        except Exception:  # analytics is advisory: never let it stop the supervisor
            log.exception("quality control chart could not be computed")
            return
        alarm = chart.get("alarm") or {}
        active, reason = bool(alarm.get("active")), str(alarm.get("reason") or "")
        if active != self.quality_alarm:
            (log.warning if active else log.info)("quality alarm %s: %s", "raised" if active else "cleared",
                                                  reason or "defect rate back within its control limits")
        self.quality_alarm, self.quality_reason = active, reason

    def _check_camera(self) -> None:
        silent = time.monotonic() - self._last_frame
        expect_frames = self.source.continuous and not (self.halted or self.source.finished)
        if expect_frames and not self.camera_stalled and silent > self.config.camera.stall_timeout_s:
            self.camera_stalled = True
            log.error("camera '%s' stalled: no frame for %.1f s; reconnecting", self.config.camera.view,
                      silent)
            self._tasks.append(asyncio.create_task(self.source.close(), name="close-stalled-camera"))

    def _progressing(self) -> bool:
        """Feed the watchdog only while parts are judged, or while the line is idle by design."""
        judged, since = self._last_judged
        if self.stats.judged != judged:
            self._last_judged = (self.stats.judged, time.monotonic())
            return True
        stuck = self._queue.qsize() > 0 and time.monotonic() - since > STUCK_AFTER_S
        if stuck:
            log.error("inference made no progress for %.0f s with %d frames waiting; not feeding the "
                      "watchdog", time.monotonic() - since, self._queue.qsize())
        return not stuck and not self.camera_stalled

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def camera_online(self) -> bool:
        return self.source.online and not self.camera_stalled

    def health(self) -> dict[str, Any]:
        return {
            "status": "running" if self.running else "stopped",
            "state": self.state,
            "line_id": self.config.line.line_id, "asset_id": self.config.line.asset_id,
            "camera": {"view": self.config.camera.view, "source": self.config.camera.source,
                       "online": self.camera_online, "stalled": self.camera_stalled,
                       "finished": self.source_done, "image_health": self.image_health.summary()},
            "holds_waiting": self.waiting_for_review["hold"],
            "audits_waiting": self.waiting_for_review["audit"],
            "quality_alarm": {"active": self.quality_alarm, "reason": self.quality_reason},
            "plc": {e.name: {"online": e in self._started_endpoints, "clients": getattr(e, "clients", None)}
                    for e in self.endpoints},
            "model_version": self.classifier.version if self.classifier else None,
            "shadow": {"version": self.shadow.version, "judged": self.shadow.judged,
                       "skipped": self.shadow.skipped} if self.shadow else None,
            "queue_depth": self._queue.qsize(),
            "uptime_s": round((datetime.now(UTC) - self.stats.started_at).total_seconds(), 1),
            "store": {"ingested_seq": self.store.ingested_seq, "next_seq": self.store.next_seq,
                      "recovered": self.store.recovered},
            "archive": {"written": self.archive.written, "failed": self.archive.failed,
                        "skipped_low_disk": self.archive.skipped_low_disk, "low_disk": self.archive.low_disk},
            **self.stats.summary(),
        }


def _stem(source_ref: str) -> str:
    name = source_ref.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name
