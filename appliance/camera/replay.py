"""The simulated line: replays a folder of images (or a dataset split) at a rate or on trigger."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from appliance.camera.base import Frame, FrameSource
from appliance.config import ReplayConfig
from appliance.dataset import load_dataset
from appliance.errors import UserError
from appliance.imageio import decode_image
from appliance.inference import BadImage

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


def list_images(config: ReplayConfig) -> list[tuple[Path, dict[str, str]]]:
    """The images to replay, each with its ground-truth labels when the folder is a dataset."""
    root = config.path
    if not root.exists():
        raise UserError(f"camera.replay.path: {root} does not exist")
    if (root / "labels.csv").is_file():
        dataset = load_dataset(root)
        samples = dataset.split(config.split) if config.split else dataset.samples
        items = [(s.image, s.labels) for s in samples]
    else:
        if config.split:
            raise UserError(f"camera.replay.split is set but {root} is not a dataset (no labels.csv)")
        items = [(p, {}) for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise UserError(f"camera.replay.path: no images in {root}"
                        + (f" (split '{config.split}')" if config.split else ""))
    if config.shuffle_seed is not None:
        random.Random(config.shuffle_seed).shuffle(items)
    return items


class ReplaySource(FrameSource):
    def __init__(self, config: ReplayConfig, camera_view: str) -> None:
        self.config = config
        self.camera_view = camera_view
        self.items: list[tuple[Path, dict[str, str]]] = []
        self._triggers: asyncio.Queue[None] = asyncio.Queue()
        self._reader: ThreadPoolExecutor | None = None
        self._closed = asyncio.Event()
        self._mode_changed = asyncio.Event()
        self._continuous = not config.triggered
        self.frames_emitted = 0

    async def open(self) -> None:
        self.items = await asyncio.to_thread(list_images, self.config)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-read")
        self._closed.clear()

    async def close(self) -> None:
        self._closed.set()
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
            self._reader = None

    async def trigger(self) -> None:
        if self.continuous:
            await super().trigger()
        self._triggers.put_nowait(None)

    @property
    def continuous(self) -> bool:
        return self._continuous

    async def set_continuous(self, on: bool) -> None:
        if on != self._continuous:
            self._continuous = on
            self._mode_changed.set()

    async def frames(self) -> AsyncIterator[Frame]:
        loop = asyncio.get_running_loop()
        period_ns = int(1e9 / self.config.rate_hz)
        next_ns = time.perf_counter_ns()
        index = 0
        while not self._closed.is_set():
            if index == len(self.items):
                if not self.config.loop:
                    self.finished = True
                    return
                index = 0
            if not self.continuous:
                if not await self._next_trigger():
                    continue  # switched to continuous while waiting
                next_ns = time.perf_counter_ns()
            else:
                delay = (next_ns - time.perf_counter_ns()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
                # absolute schedule, but never try to catch up on a backlog after a stall
                next_ns = max(next_ns + period_ns, time.perf_counter_ns() - period_ns)
            path, labels = self.items[index]
            index += 1
            assert self._reader is not None
            yield await loop.run_in_executor(self._reader, self._read, path, labels)
            self.frames_emitted += 1

    async def _next_trigger(self) -> bool:
        """Wait for a trigger; False if the mode changed to continuous (or closed) meanwhile."""
        self._mode_changed.clear()
        if not self._triggers.empty():
            self._triggers.get_nowait()
            return True
        got = asyncio.ensure_future(self._triggers.get())
        changed = asyncio.ensure_future(self._mode_changed.wait())
        closed = asyncio.ensure_future(self._closed.wait())
        await asyncio.wait({got, changed, closed}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (changed, closed):
            waiter.cancel()
        if got.done():
            return True
        got.cancel()
        return False

    def _read(self, path: Path, labels: dict[str, str]) -> Frame:
        """The file's pixels as a camera delivers them: the frame is stamped acquired once they are in
        memory, as a GenICam buffer is, so the PNG decode (the simulation's sensor) is not counted
        as the line's latency."""
        image, encoded, error = None, None, None
        try:
            encoded = path.read_bytes()
            image = decode_image(encoded, path.name)
        except OSError as exc:
            error = f"{path.name}: cannot read ({exc.strerror})"
        except BadImage as exc:
            error = str(exc)
        return Frame(image=image, camera_view=self.camera_view, source_ref=str(path), error=error,
                     encoded=encoded, meta={"labels": labels})
