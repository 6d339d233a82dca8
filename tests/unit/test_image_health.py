import numpy as np

from appliance.config import ImageHealthConfig
from appliance.image_health import ImageHealth

RNG = np.random.default_rng(1)


def scene(brightness: float = 120, shift: int = 0, blur: bool = False) -> np.ndarray:
    """A fixture with a bright bar and fine texture; parts vary a little from frame to frame."""
    img = np.full((200, 200), brightness, np.float32)
    img[60:140, 40 + shift:80 + shift] += 80
    img += RNG.normal(0, 20, img.shape)
    if blur:
        for _ in range(3):
            shifted = [np.roll(img, d, axis) for d in (1, -1) for axis in (0, 1)]
            img = (img + sum(shifted)) / 5
    return np.clip(img, 0, 255).astype(np.uint8)


def run(health: ImageHealth, frames: int, **kw) -> None:
    for _ in range(frames):
        health.observe(scene(**kw))


def test_steady_line_raises_no_alarm() -> None:
    h = ImageHealth(ImageHealthConfig(baseline_frames=20))
    run(h, 200)
    assert not h.alarm and h.summary()["baseline_ready"]


def test_darker_lamp_raises_and_recovers() -> None:
    h = ImageHealth(ImageHealthConfig(baseline_frames=20))
    run(h, 20)
    run(h, 100, brightness=40)
    assert h.alarm and "brightness" in h.reasons[0]
    run(h, 200)
    assert not h.alarm


def test_lost_focus_and_moved_camera() -> None:
    blurred = ImageHealth(ImageHealthConfig(baseline_frames=20))
    run(blurred, 20)
    run(blurred, 100, blur=True)
    assert blurred.alarm and any("sharpness" in r for r in blurred.reasons)
    moved = ImageHealth(ImageHealthConfig(baseline_frames=20))
    run(moved, 20)
    run(moved, 150, shift=70)
    assert moved.alarm and any("camera moved" in r for r in moved.reasons)
