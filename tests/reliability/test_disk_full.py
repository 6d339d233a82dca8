"""Disk almost full: image archiving stops first, with an alarm, while results keep being stored.

* On a real small filesystem: a 96 MiB tmpfs mounted for the test (root may mount here; where it
  may not, that variant is skipped and says why) holds the whole state directory — journal,
  DuckDB and the image archive.  A replay of ~1 MB images fills it until less than
  ``store.retention.min_free_mb`` is free; then archiving must stop (health ``archive.low_disk``,
  metric ``appliance_archive_low_disk 1``, one log line) while every part is still judged and
  stored without a single store error.  Freeing space resumes archiving.
* Through the threshold alone: ``min_free_mb`` above the free space of the real disk.
* An operator removing the whole image folder to free space must not stop the line either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from appliance.daemon import Daemon
from tests.brightness_model import GRADES, brightness_for
from tests.reliability.conftest import record

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

TMPFS_MB = 96
MIN_FREE_MB = 40


def noisy_images(folder: Path, count: int, side: int = 1024) -> None:
    """Large, barely compressible images (≈0.75 MB PNG each) around the grade centres."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(count):
        centre = brightness_for(GRADES[i % len(GRADES)])
        pixels = np.clip(centre + rng.integers(-30, 31, (side, side)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"big{i:03d}.png", compress_level=1)


def free_mb(path: Path) -> float:
    """Free space in MB (10^6 bytes), the unit of store.retention.min_free_mb."""
    return shutil.disk_usage(path).free / 1e6


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "test_low_disk_threshold covers the logic through min_free_mb")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def _metric(port: int | None, name: str) -> str:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as api:
        text = (await api.get("/api/v1/metrics")).text
    return next(line for line in text.splitlines() if line.startswith(name + " "))


async def test_a_full_disk_stops_archiving_first_and_results_keep_being_stored(
        tmp_path: Path, line_config, small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = tmp_path / "images"
    noisy_images(images, 12)
    state = small_disk / "state"
    cfg = line_config(images, state_dir=str(state),
                      camera={"view": "top", "source": "replay", "queue_size": 32,
                              "replay": {"path": str(images), "rate_hz": 20, "loop": True}},
                      store={"retention": {"pass": 1.0, "rework": 1.0, "reject": 1.0, "hold": 1.0,
                                           "min_free_mb": MIN_FREE_MB}})
    daemon = Daemon(cfg)
    lowest = free_mb(small_disk)
    with caplog.at_level(logging.INFO, logger="appliance.archive"):
        await daemon.start()
        try:
            started = time.monotonic()
            while not daemon.archive.low_disk and time.monotonic() - started < 60:
                lowest = min(lowest, free_mb(small_disk))
                await asyncio.sleep(0.05)
            filled_s = time.monotonic() - started
            assert daemon.archive.low_disk, f"archiving never stopped ({free_mb(small_disk):.0f} MB free)"
            at_low = (daemon.stats.judged, daemon.archive.written)
            metric_low = await _metric(daemon.api_port, "appliance_archive_low_disk")
            health_low = daemon.health()
            for _ in range(60):  # 3 s more of parts while the disk is low
                lowest = min(lowest, free_mb(small_disk))
                await asyncio.sleep(0.05)
            daemon.store.flush()
            stored_low = daemon.store.counts()["total"]
            judged_low = daemon.stats.judged
            for day in (state / "images").iterdir():  # an operator frees the space
                shutil.rmtree(day)
            await daemon.wait_for_results(judged_low + 40, timeout=30)
            await asyncio.sleep(1.5)
            resumed = not daemon.archive.low_disk
            health_end = daemon.health()
        finally:
            await daemon.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "appliance.archive"]
    full = [m for m in messages if "disk nearly full" in m]
    figures = record(
        "disk_full_tmpfs", tmpfs_mb=TMPFS_MB, min_free_mb=MIN_FREE_MB, filled_s=round(filled_s, 1),
        images_written_before_low=at_low[1], lowest_free_mb=round(lowest, 1),
        judged_while_low=judged_low - at_low[0], skipped_low_disk=health_low["archive"]["skipped_low_disk"],
        stored_when_low=stored_low, store_errors=health_end["store_errors"], resumed_after_freeing=resumed,
        judged_total=health_end["judged"], log_lines=full)
    assert metric_low.endswith(" 1.0") and health_low["archive"]["low_disk"] is True, figures
    assert len(full) == 1, f"one log line when archiving stops, not {len(full)}: {messages}"
    assert judged_low - at_low[0] >= 20, f"parts kept being judged while the disk was low: {figures}"
    assert stored_low >= judged_low - 10, f"results kept being stored while the disk was low: {figures}"
    assert health_end["store_errors"] == 0 and lowest > 0, figures
    assert resumed and any("resumed" in m for m in messages), f"archiving resumes once space is freed: {figures}"


async def test_low_disk_threshold_stops_archiving_with_one_alarm(tmp_path: Path, line_config, state_dir: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The same logic without a small filesystem: ``min_free_mb`` above what the real disk has free."""
    from tests.conftest import write_grade_images

    images = tmp_path / "images"
    write_grade_images(images, GRADES * 4)
    cfg = line_config(images, camera={"view": "top", "source": "replay",
                                      "replay": {"path": str(images), "rate_hz": 50, "loop": True}},
                      store={"retention": {"pass": 1.0, "min_free_mb": int(free_mb(tmp_path) * 4) + 10**6}})
    daemon = Daemon(cfg)
    with caplog.at_level(logging.INFO, logger="appliance.archive"):
        await daemon.start()
        try:
            await daemon.wait_for_results(100, timeout=60)
            metric = await _metric(daemon.api_port, "appliance_archive_low_disk")
            health = daemon.health()
            daemon.store.flush()
            stored = daemon.store.counts()["total"]
            daemon.archive.retention = daemon.archive.retention.model_copy(update={"min_free_mb": 0})
            await daemon.wait_for_results(daemon.stats.judged + 60, timeout=30)
            written_after = daemon.archive.written
        finally:
            await daemon.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "appliance.archive"]
    record("disk_low_threshold", judged=health["judged"], stored=stored,
           skipped_low_disk=health["archive"]["skipped_low_disk"], written_while_low=health["archive"]["written"],
           written_after_recovery=written_after, log=messages)
    assert metric.endswith(" 1.0") and health["archive"]["low_disk"] is True
    assert health["archive"]["written"] == 0 and health["archive"]["skipped_low_disk"] >= 90
    assert stored >= 100 and health["store_errors"] == 0 and health["state"] == "operational"
    assert sum("disk nearly full" in m for m in messages) == 1, messages
    assert written_after > 0 and any("resumed" in m for m in messages), messages


async def test_removing_the_image_folder_does_not_stop_the_line(tmp_path: Path, line_config, state_dir: Path) -> None:
    """The first thing an operator does on a full disk: delete the images.  The line must not notice.

    Production retention archives holds and defects, not every part, so the archive is idle most of
    the time: one unsure (held, archived) part per 1.2 s here, the others confident passes and
    rejects that are not archived.  The folder goes right after an image was written.
    """
    from tests.conftest import write_grade_images

    images = tmp_path / "images"
    write_grade_images(images, [GRADES[i % len(GRADES)] for i in range(47)])
    Image.fromarray(np.full((48, 64), 128, np.uint8)).save(images / "unsure.png")  # between two grades: hold
    cfg = line_config(images, camera={"view": "top", "source": "replay",
                                      "replay": {"path": str(images), "rate_hz": 40, "loop": True}},
                      store={"retention": {"pass": 0.0, "rework": 0.0, "reject": 0.0, "hold": 1.0,
                                           "min_free_mb": 1}})
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        started = time.monotonic()
        while daemon.archive.written < 2 and time.monotonic() - started < 30:
            await asyncio.sleep(0.01)
        shutil.rmtree(state_dir / "images")
        before = daemon.stats.judged
        with contextlib.suppress(TimeoutError):
            await daemon.wait_for_results(before + 120, timeout=10)
        after = daemon.stats.judged
        archive_back = os.path.isdir(state_dir / "images")
        health = daemon.health()
    finally:
        try:
            await asyncio.wait_for(daemon.stop(), 10)
            stop_hung = False
        except TimeoutError:
            stop_hung = True
            while not daemon._queue.empty():  # cleanup only: stop() waits on a judge task that is gone
                daemon._queue.get_nowait()
            await daemon.stop()
    record("image_folder_removed", judged_after_removal=after - before, archive_folder_back=archive_back,
           archived=health["archive"]["written"], dropped=health["dropped"], stop_hung=stop_hung)
    assert after - before >= 120, (f"the line stopped judging when the image folder was removed "
                                   f"({after - before} parts in 10 s; health: {health['status']}/{health['state']})")
    assert not stop_hung, "Daemon.stop() hung"
