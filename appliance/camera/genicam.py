"""GenICam cameras through a GenTL producer (.cti), driven by harvesters.

Producers are C code that can block or hang, so each opening gets its own driver state
(:class:`_Camera`) and its own thread (:class:`_DriverThread`) that makes every driver call; the
loop only awaits that thread with a timeout.  A thread that does not come back is abandoned (it is
a daemon thread) and the source goes offline; reconnecting means opening again, with a fresh thread
and a fresh ``Harvester``, while anything the old thread still does touches only its old state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from genicam import genapi, gentl
from harvesters.core import Harvester

from appliance.camera.base import Frame, FrameSource, TriggerNotSupported
from appliance.config import GenICamConfig
from appliance.errors import UserError

log = logging.getLogger(__name__)

DRIVER_ERRORS = (genapi.GenericException, gentl.GenericException)
_VALUE_TYPES = (genapi.IInteger, genapi.IFloat, genapi.IBoolean, genapi.IString, genapi.IEnumeration)
_POLL_S = 0.05  # one fetch waits this long, then the thread looks for calls (close, trigger)
_EVENT_WAIT_MS = 20  # one GenTL EventGetData wait inside a fetch; 1 ms (the default) burns CPU
_QUEUE_MAX = 16  # frames copied out of the driver and not yet taken by frames()
_MAX_FETCH_ERRORS = 10  # consecutive failed fetches before the source gives up (and goes offline)
# PFNC name -> (bytes per pixel, channel order giving RGB); only 8-bit formats are converted.
_LAYOUTS: dict[str, tuple[int, tuple[int, ...]]] = {"Mono8": (1, (0,)), "RGB8": (3, (0, 1, 2)),
                                                    "BGR8": (3, (2, 1, 0)), "RGBa8": (4, (0, 1, 2)),
                                                    "BGRa8": (4, (2, 1, 0))}


class GenICamError(RuntimeError):
    """The producer failed or stopped answering; close and open again to reconnect."""


def to_image(data: np.ndarray, width: int, height: int, pixel_format: str) -> np.ndarray:
    """Own uint8 pixels, H×W or H×W×3 RGB, copied out of a driver buffer (line padding dropped)."""
    if pixel_format not in _LAYOUTS or data.dtype != np.uint8:
        supported = ", ".join(_LAYOUTS)
        raise ValueError(f"pixel format {pixel_format} is not supported; configure one of {supported}")
    channels, order = _LAYOUTS[pixel_format]
    flat, row = data.reshape(-1), width * channels
    if width <= 0 or height <= 0 or flat.size < height * row:
        raise ValueError(f"{pixel_format} {width}×{height} needs {height * row} bytes; got {flat.size}")
    stride = flat.size // height
    rows = flat[: stride * height].reshape(height, stride)[:, :row]
    if channels == 1:
        return rows.reshape(height, width).copy()
    return rows.reshape(height, width, channels)[..., list(order)]  # fancy indexing copies


class _DriverThread:
    """Runs submitted calls in order; between calls, runs ``idle`` while it asks to go on."""

    def __init__(self, name: str, idle: Callable[[], bool]) -> None:
        self._idle = idle
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], cf.Future] | None] = queue.SimpleQueue()
        self.exited: cf.Future[None] = cf.Future()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[[], Any]) -> cf.Future:
        future: cf.Future = cf.Future()
        self._calls.put((fn, future))
        return future

    def stop(self) -> None:
        self._calls.put(None)

    def _run(self) -> None:
        eager = False  # True while idle() wants to be called again without waiting for a call
        try:
            while True:
                try:
                    item = self._calls.get(block=not eager)
                except queue.Empty:
                    eager = self._run_idle()
                    continue
                if item is None:
                    return
                fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                        future.set_exception(exc)
                eager = True
        finally:
            self.exited.set_result(None)

    def _run_idle(self) -> bool:
        try:
            return self._idle()
        except Exception:  # the thread must live on: only it can close the device
            log.exception("GenICam driver thread: unexpected error while fetching")
            time.sleep(_POLL_S)
            return False


class _Camera:
    """The driver side of one opening; its methods run only in that opening's driver thread."""

    def __init__(self, config: GenICamConfig, view: str, post: Callable[[Frame | None], None]) -> None:
        self.config, self.view, self._post = config, view, post
        self.harvester: Harvester | None = None
        self.ia: Any = None
        self.serial = ""
        self.acquiring = self.stalled = False
        self.continuous = not config.triggered
        self.failure: str | None = None
        self._chunk_features: list[str] = []
        self._pending: deque[float] = deque()  # monotonic times of triggers still waiting for a frame
        self._last_frame = 0.0
        self._errors = 0

    def open(self) -> None:
        self.harvester = Harvester()
        self.harvester.add_file(str(self.config.cti))
        self.harvester.update()
        self.ia = self.harvester.create(self._find_device(list(self.harvester.device_info_list)))
        self.ia.timeout_period_on_client_fetch_call = _POLL_S
        self.ia.timeout_period_on_update_event_data_call = _EVENT_WAIT_MS
        node_map = self.ia.remote_device.node_map
        self._configure(node_map)
        if node_map.has_node("ChunkModeActive") and node_map.ChunkModeActive.value:
            category = node_map.get_node("ChunkDataControl")
            self._chunk_features = [f.node.name for f in category.features if isinstance(f, _VALUE_TYPES)
                                    and not f.node.name.endswith(("Selector", "Enable", "ModeActive"))]
        self.ia.start()
        self.acquiring, self._last_frame = True, time.monotonic()

    def _find_device(self, infos: list[Any]) -> int:
        wanted, serials = self.config.device, [_info(info, "serial_number") for info in infos]
        for i, info in enumerate(infos):
            if (i == wanted) if isinstance(wanted, int) else (serials[i] == wanted):
                self.serial = serials[i] or _info(info, "id_") or str(i)
                return i
        found = "; ".join(f"#{i} serial {serials[i]!r} ({_info(info, 'vendor')} {_info(info, 'model')})"
                          for i, info in enumerate(infos)) or (
            "none (is the camera connected, the .cti built for this platform, or the producer already "
            "in use by another source in this process?)")
        raise UserError(f"camera.genicam.device: no device {wanted!r} via {self.config.cti}; found: {found}")

    def _configure(self, node_map: Any) -> None:
        """Apply the config in the order GenICam needs: format, then size before offsets."""
        cfg, roi = self.config, self.config.roi
        if cfg.pixel_format is not None:
            self._set(node_map, "PixelFormat", cfg.pixel_format, "pixel_format")
        if roi is not None:
            offsets = (("OffsetX", roi.offset_x, "roi.offset_x"), ("OffsetY", roi.offset_y, "roi.offset_y"))
            for name, offset, key in offsets:  # offsets to 0 first, so that the new size fits
                if offset or node_map.has_node(name):
                    self._set(node_map, name, 0, key)
            self._set(node_map, "Width", roi.width, "roi.width")
            self._set(node_map, "Height", roi.height, "roi.height")
            for name, offset, key in offsets:
                if offset:
                    self._set(node_map, name, offset, key)
        if cfg.frame_rate is not None:
            if node_map.has_node("AcquisitionFrameRateEnable"):
                self._set(node_map, "AcquisitionFrameRateEnable", True, "frame_rate")
            self._set(node_map, "AcquisitionFrameRate", cfg.frame_rate, "frame_rate")
        if cfg.triggered or (node_map.has_node("TriggerMode") and _can(node_map.TriggerMode, "WO")):
            self._trigger_mode(node_map, cfg.triggered)  # Off too: a camera keeps what the last user set

    def _trigger_mode(self, node_map: Any, on: bool) -> None:
        if on:
            if node_map.has_node("TriggerSelector") and "FrameStart" in node_map.TriggerSelector.symbolics:
                self._set(node_map, "TriggerSelector", "FrameStart", "triggered")
            self._set(node_map, "TriggerMode", "On", "triggered")
            self._set(node_map, "TriggerSource", "Software", "triggered")
            if not node_map.has_node("TriggerSoftware"):
                raise UserError(f"camera.genicam.triggered: device {self.serial} has no TriggerSoftware")
        else:
            self._set(node_map, "TriggerMode", "Off", "triggered")
        self.continuous = not on

    def _set(self, node_map: Any, name: str, value: Any, key: str) -> None:
        if not node_map.has_node(name):
            raise UserError(f"camera.genicam.{key}: device {self.serial} has no {name} feature")
        feature = getattr(node_map, name)
        try:
            feature.value = value
        except DRIVER_ERRORS as exc:
            choices = f" (it offers {', '.join(feature.symbolics)})" if hasattr(feature, "symbolics") else ""
            reason = str(exc).split(" : ")[0]
            raise UserError(f"camera.genicam.{key}: device {self.serial} refused {name} = {value!r}"
                            f"{choices}: {reason}") from exc

    def trigger(self) -> None:
        self.ia.remote_device.node_map.TriggerSoftware.execute()
        self._pending.append(time.monotonic())

    def set_continuous(self, on: bool) -> None:
        """Switch the trigger mode with acquisition stopped, which every camera accepts."""
        node_map = self.ia.remote_device.node_map
        if not all(node_map.has_node(name) for name in ("TriggerMode", "TriggerSoftware")):
            raise TriggerNotSupported(f"camera {self.serial} has no software trigger; it can only run free")
        self.ia.stop()
        try:
            self._trigger_mode(node_map, not on)
        finally:
            self.ia.start()
            self._pending.clear()
            self.stalled, self._last_frame = False, time.monotonic()

    def fetch_once(self) -> bool:
        """Wait up to one poll for a frame and post it; False: nothing to wait for until a call."""
        if not self.acquiring or (not self.continuous and not self._pending):
            return False
        try:
            buffer = self.ia.fetch(timeout=_POLL_S)
        except gentl.TimeoutException:
            self._check_overdue()
            return True
        except Exception as exc:  # a failed fetch fails one part visibly; the stream goes on
            log.log(logging.DEBUG if self._errors else logging.WARNING, "GenICam fetch failed: %s", exc,
                    exc_info=not self._errors)
            self._fetch_failed(f"fetch failed: {exc}")
            return self.acquiring
        if buffer is None:  # harvesters requeued a buffer it could not read
            self._fetch_failed("the producer delivered a buffer without image information")
            return True
        with buffer:
            frame = self._to_frame(buffer)
        if self._errors or self.stalled:
            log.info("GenICam camera %s delivers frames again", self.serial)
        self._errors, self.stalled, self._last_frame = 0, False, time.monotonic()
        self._deliver(frame)
        return True

    def _to_frame(self, buffer: Any) -> Frame:
        frame_id = _info(buffer, "frame_id")
        meta: dict[str, Any] = {"frame_id": frame_id, "timestamp": buffer.timestamp, "device": self.serial}
        ref = f"{self.serial}#{frame_id}"
        with contextlib.suppress(*DRIVER_ERRORS):  # chunk data is a bonus; the image matters
            node_map = self.ia.remote_device.node_map  # this buffer's chunk data is attached to it
            features = [getattr(node_map, name) for name in self._chunk_features]
            if chunk := {f.node.name: f.value for f in features if _can(f, "RO")}:
                meta["chunk"] = chunk
        try:
            component = buffer.payload.components[0]
            meta["pixel_format"] = component.data_format
            image = to_image(component.data, component.width, component.height, component.data_format)
        except (ValueError, IndexError, AttributeError, *DRIVER_ERRORS) as exc:
            return self._error_frame(str(exc), ref, meta)
        return Frame(image=image, camera_view=self.view, source_ref=ref, meta=meta)

    def _error_frame(self, error: str, ref: str = "", meta: dict[str, Any] | None = None) -> Frame:
        return Frame(image=None, camera_view=self.view, source_ref=ref or f"{self.serial}#?",
                     error=error, meta=meta or {})

    def _check_overdue(self) -> None:
        now, limit = time.monotonic(), self.config.fetch_timeout_s
        if self._pending and now - self._pending[0] > limit:
            self._deliver(self._error_frame(f"no frame within {limit:g} s of the trigger"))
        elif self.continuous and not self.stalled and now - self._last_frame > limit:
            self.stalled = True
            log.warning("GenICam camera %s delivered no frame for %g s", self.serial, limit)

    def _fetch_failed(self, error: str) -> None:
        self._errors += 1
        self._deliver(self._error_frame(error))
        if self._errors >= _MAX_FETCH_ERRORS:
            self.acquiring = False
            self.failure = f"camera {self.serial}: {self._errors} fetches failed in a row; last: {error}"
            self._post(None)
        else:
            time.sleep(_POLL_S)  # a fetch that fails at once must not spin

    def _deliver(self, frame: Frame) -> None:
        if self._pending:
            self._pending.popleft()
        self._post(frame)

    def teardown(self) -> None:
        """Undo open in reverse order; every step runs even if an earlier one fails."""
        self.acquiring = False
        ia, harvester, self.ia, self.harvester = self.ia, self.harvester, None, None
        steps = [ia.stop, ia.destroy] if ia is not None else []
        steps += [harvester.reset] if harvester is not None else []
        for step in steps:
            try:
                step()
            except DRIVER_ERRORS as exc:
                log.warning("GenICam %s failed during close: %s", step.__name__, exc)


class GenICamSource(FrameSource):
    """Frames from one GenICam device; free-running, or one frame per software trigger."""

    open_timeout_s = 15.0  # loading the producer, opening and configuring the device
    close_timeout_s = 5.0  # stopping and releasing it; after that its thread is abandoned

    def __init__(self, config: GenICamConfig, camera_view: str) -> None:
        self.config = config
        self.camera_view = camera_view
        self.dropped = 0  # frames thrown away because nobody took them from frames() in time
        self._camera: _Camera | None = None
        self._thread: _DriverThread | None = None
        self._frames: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._hung: str | None = None

    @property
    def online(self) -> bool:
        camera = self._camera
        return (self._thread is not None and camera is not None and camera.acquiring
                and not camera.stalled and self._failure is None)

    @property
    def _failure(self) -> str | None:
        return self._hung or (self._camera.failure if self._camera else None)

    async def open(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the GenICam source is already open")
        if not self.config.cti.is_file():
            raise UserError(f"camera.genicam.cti: the GenTL producer {self.config.cti} does not exist "
                            "(or is not a file)")
        self._frames, self._hung, self.dropped = asyncio.Queue(), None, 0
        self._camera = _Camera(self.config, self.camera_view, self._poster(self._frames))
        self._thread = _DriverThread(f"genicam-{self.camera_view}", self._camera.fetch_once)
        try:
            await self._call(self._camera.open, "opening the device", self.open_timeout_s)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        thread, camera, self._thread = self._thread, self._camera, None
        if thread is None or camera is None:
            return
        camera.acquiring = False
        teardown = thread.submit(camera.teardown)  # runs even if the thread comes back late
        thread.stop()
        try:
            if self._hung is not None:  # it is stuck already: waiting longer helps nobody
                raise GenICamError(self._hung)
            await self._await(teardown, "closing the device", self.close_timeout_s)
            await self._await(thread.exited, "the driver thread's exit", self.close_timeout_s)
        except GenICamError as exc:
            log.error("%s; abandoning the thread of camera %s", exc, self.camera_view)
        self._frames.put_nowait(None)

    async def frames(self) -> AsyncIterator[Frame]:
        if self._thread is None and self._frames.empty():
            # a reopen failed before it started (e.g. the producer file is gone): nothing will ever
            # arrive on this queue, so say so and let the daemon try again later
            raise GenICamError(self._failure or f"camera {self.camera_view} is not open")
        while (frame := await self._frames.get()) is not None:
            yield frame
        if self._failure is not None:
            raise GenICamError(self._failure)

    @property
    def continuous(self) -> bool:
        camera = self._camera
        return camera.continuous if camera is not None else not self.config.triggered

    async def trigger(self) -> None:
        camera = self._camera
        if camera is not None and camera.continuous:
            raise TriggerNotSupported(f"camera {self.camera_view} runs free (camera.genicam.triggered is "
                                      "false, or set_continuous(True) was called)")
        if not self.online or camera is None:
            raise GenICamError(f"camera {self.camera_view} is not acquiring; cannot trigger")
        await self._call(camera.trigger, "TriggerSoftware", self.config.fetch_timeout_s + _POLL_S)

    async def set_continuous(self, on: bool) -> None:
        """Free-run (True) or one frame per trigger() (False), without reopening the device."""
        camera = self._camera
        if not self.online or camera is None:
            raise GenICamError(f"camera {self.camera_view} is not acquiring; cannot switch its mode")
        if on != camera.continuous:
            await self._call(lambda: camera.set_continuous(on), "switching TriggerMode", self.open_timeout_s)

    async def _call(self, fn: Callable[[], Any], what: str, timeout: float) -> Any:
        if self._thread is None:
            raise GenICamError(f"camera {self.camera_view} is closed")
        return await self._await(self._thread.submit(fn), what, timeout)

    async def _await(self, future: cf.Future, what: str, timeout: float) -> Any:
        waiting = asyncio.wrap_future(future)
        done, _ = await asyncio.wait({waiting}, timeout=timeout)  # never cancels the driver call
        if not done:
            self._hung = f"{what} did not return within {timeout:g} s; the GenTL producer seems hung"
            self._frames.put_nowait(None)  # frames() ends with this failure
            raise GenICamError(self._hung)
        return waiting.result()

    def _poster(self, frames: asyncio.Queue[Frame | None]) -> Callable[[Frame | None], None]:
        """How the driver thread hands frames to this opening's queue (never a later opening's)."""
        loop = asyncio.get_running_loop()

        def put(item: Frame | None) -> None:
            if item is not None and frames.qsize() >= _QUEUE_MAX:
                self.dropped += 1
            else:
                frames.put_nowait(item)

        def post(item: Frame | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed; nobody is listening
                loop.call_soon_threadsafe(put, item)

        return post


def _can(feature: Any, access: str) -> bool:
    """Whether a feature is readable (``"RO"``) or writable (``"WO"``) now."""
    mode = feature.node.get_access_mode()
    return mode in (genapi.EAccessMode.RW, getattr(genapi.EAccessMode, access))


def _info(obj: Any, name: str) -> Any:
    """A device-info or buffer attribute, or None where the producer does not provide it."""
    try:
        return getattr(obj, name)
    except DRIVER_ERRORS:
        return None
