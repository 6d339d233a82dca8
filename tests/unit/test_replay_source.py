"""The replay camera delivers frames as a camera does: stamped when the pixels are in memory."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from appliance.camera import replay
from appliance.camera.replay import ReplaySource
from appliance.config import ReplayConfig
from tests.conftest import write_grade_images

DECODE_S = 0.05


async def test_a_replayed_frame_counts_as_acquired_once_its_pixels_are_decoded(tmp_path: Path, monkeypatch) -> None:
    """The decode is the simulation's sensor, not the line's latency (a GenICam frame is stamped
    after its buffer arrives); a file that cannot be decoded still becomes one failed frame."""
    write_grade_images(tmp_path, ["0"])
    (tmp_path / "part0001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    real_decode = replay.decode_image

    def slow_decode(data: bytes, name: str = "image") -> np.ndarray:
        time.sleep(DECODE_S)
        return real_decode(data, name)

    monkeypatch.setattr(replay, "decode_image", slow_decode)
    source = ReplaySource(ReplayConfig(path=tmp_path, rate_hz=1000, loop=False), "top")
    await source.open()
    try:
        frames = []
        async for frame in source.frames():
            frames.append((time.perf_counter_ns(), datetime.now(UTC), frame))
    finally:
        await source.close()

    good, bad = (frame for _, _, frame in frames)
    assert good.image is not None and good.error is None and good.encoded
    assert bad.image is None and bad.error and "not a readable image" in bad.error
    for delivered_ns, delivered_at, frame in frames:
        assert 0 <= delivered_ns - frame.acquired_ns < DECODE_S * 1e9 / 2
        assert 0 <= (delivered_at - frame.acquired_at).total_seconds() < DECODE_S / 2
