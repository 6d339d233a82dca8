"""The image archive: which part images are kept, where, and for how long.

Retention is a share per disposition (holds and defects by default all, passes a sample) and a
maximum age.  Failed parts keep their raw bytes for diagnosis.  Files are written by a worker
thread so the line never waits on the disk; below ``min_free_mb`` archiving stops (and says so
once) while results keep being stored.
"""

from __future__ import annotations

import logging
import queue
import random
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from appliance.config import RetentionConfig
from appliance.imageio import encode_png
from appliance.priority import lower_this_thread

log = logging.getLogger(__name__)


class ImageArchive:
    def __init__(self, root: Path, retention: RetentionConfig, seed: int | None = None) -> None:
        self.root = root
        self.retention = retention
        self._rng = random.Random(seed)
        self._queue: queue.Queue[tuple[Path, bytes | np.ndarray] | None] = queue.Queue(maxsize=256)
        self._thread: threading.Thread | None = None
        self.written = 0
        self.skipped_low_disk = 0
        self.failed = 0
        self.low_disk = False
        self._last_disk_check = 0.0

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="image-archive", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def path_for(self, ref: str) -> Path:
        """The file for an ``image_ref``; refuses anything that would leave the archive."""
        path = (self.root / ref).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"image reference outside the archive: {ref}")
        return path

    def keep(self, disposition: str, failed: bool, review: str | None = None) -> bool:
        """Whether to archive a part's image: always for a failed part or one waiting for review (a
        person must see it, and its label can train a model only with its image), else by the
        retention share of its disposition."""
        share = 1.0 if failed or review is not None else self.retention.share(disposition)
        return share >= 1.0 or self._rng.random() < share

    def submit(self, result_id: str, acquired_at: datetime, image: np.ndarray | None,
               encoded: bytes | None) -> str | None:
        """Queue the part's image for writing; returns its ``image_ref``, or None if not archived."""
        if self._disk_low():
            self.skipped_low_disk += 1
            return None
        payload: bytes | np.ndarray
        if encoded is not None and image is None:
            suffix, payload = ".bin", encoded  # undecodable: keep the raw bytes for diagnosis
        elif encoded is not None:
            suffix, payload = _suffix(encoded), encoded
        elif image is not None:
            suffix, payload = ".png", image
        else:
            return None
        ref = f"{acquired_at:%Y/%m/%d}/{result_id}{suffix}"
        try:
            self._queue.put_nowait((self.root / ref, payload))
        except queue.Full:
            self.failed += 1
            log.warning("image archive queue full; image of %s not kept", result_id)
            return None
        return ref

    def _disk_low(self) -> bool:
        now = time.monotonic()
        if now - self._last_disk_check > 1.0:
            self._last_disk_check = now
            try:
                free_mb = shutil.disk_usage(self.root).free / 1e6
            except OSError:  # the folder was deleted (to free space?); the writer re-creates it
                free_mb = shutil.disk_usage(self.root.parent).free / 1e6
            low = free_mb < self.retention.min_free_mb
            if low and not self.low_disk:
                log.error("disk nearly full (%.0f MB free < %d MB): image archiving stopped",
                          free_mb, self.retention.min_free_mb)
            elif self.low_disk and not low:
                log.info("disk space recovered (%.0f MB free): image archiving resumed", free_mb)
            self.low_disk = low
        return self.low_disk

    def _run(self) -> None:
        lower_this_thread()  # encoding and writing images can wait; the line cannot
        while (item := self._queue.get()) is not None:
            path, payload = item
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                data = payload if isinstance(payload, bytes) else encode_png(payload)
                tmp = path.with_suffix(path.suffix + ".tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
                self.written += 1
            except OSError as exc:
                self.failed += 1
                log.warning("could not archive %s: %s", path.name, exc)

    def prune(self, now: datetime | None = None) -> int:
        """Delete day folders older than ``max_age_days``; returns how many files went."""
        cutoff = (now or datetime.now(UTC)) - timedelta(days=self.retention.max_age_days)
        removed = 0
        for day in sorted(self.root.glob("*/*/*")):
            try:
                stamp = datetime.strptime("/".join(day.parts[-3:]), "%Y/%m/%d").replace(tzinfo=UTC)
            except ValueError:
                continue
            if stamp < cutoff.replace(hour=0, minute=0, second=0, microsecond=0):
                removed += sum(1 for _ in day.iterdir())
                shutil.rmtree(day, ignore_errors=True)
        return removed


def _suffix(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    if data.startswith(b"BM"):
        return ".bmp"
    return ".bin"
