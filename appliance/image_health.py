"""Image health: notice when the pictures themselves drift (lamp ageing, focus lost, camera knocked).

Each frame is reduced to a 32×32 thumbnail (cheap strided sampling), its mean brightness and a
sharpness figure (variance of the Laplacian).  The first ``baseline_frames`` set the baseline;
afterwards slow moving averages are compared with it.  Brightness off by more than the tolerance,
sharpness below the allowed share, or a thumbnail that no longer correlates with the baseline (the
fixture moved in the picture) raises an alarm — a warning for the PLC and the dashboard, not a
stop: the parts are still judged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from appliance.config import ImageHealthConfig

log = logging.getLogger(__name__)
THUMB = 32
EWMA = 0.05


def _features(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    grey = image if image.ndim == 2 else image[:, :, :3].mean(axis=2)
    h, w = grey.shape
    ys = np.linspace(0, h - 1, THUMB).astype(int)
    xs = np.linspace(0, w - 1, THUMB).astype(int)
    thumb = grey[np.ix_(ys, xs)].astype(np.float32)
    step = max(1, min(h, w) // 128)
    small = grey[::step, ::step].astype(np.float32)
    lap = small[1:-1, 1:-1] * 4 - small[:-2, 1:-1] - small[2:, 1:-1] - small[1:-1, :-2] - small[1:-1, 2:]
    return thumb, float(thumb.mean()), float(lap.var())


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 1e-6 else 1.0


@dataclass(slots=True)
class ImageHealth:
    config: ImageHealthConfig
    seen: int = 0
    alarm: bool = False
    reasons: list[str] = field(default_factory=list)
    _base: list[float] = field(default_factory=lambda: [0.0, 0.0])
    _base_thumb: np.ndarray | None = None
    _now: list[float] = field(default_factory=lambda: [0.0, 0.0])
    _now_thumb: np.ndarray | None = None

    def observe(self, image: np.ndarray) -> None:
        if not self.config.enabled:
            return
        thumb, brightness, sharpness = _features(image)
        self.seen += 1
        n = self.config.baseline_frames
        if self.seen <= n:  # running mean over the baseline frames
            k = 1.0 / self.seen
            self._base = [b + k * (x - b) for b, x in zip(self._base, (brightness, sharpness), strict=True)]
            prev = self._base_thumb
            self._base_thumb = thumb if prev is None else prev + k * (thumb - prev)
            self._now, self._now_thumb = list(self._base), self._base_thumb
            return
        self._now = [c + EWMA * (x - c) for c, x in zip(self._now, (brightness, sharpness), strict=True)]
        assert self._now_thumb is not None
        self._now_thumb = self._now_thumb + EWMA * (thumb - self._now_thumb)
        self._judge()

    def _judge(self) -> None:
        assert self._base_thumb is not None and self._now_thumb is not None
        c = self.config
        reasons = []
        base_b, base_s = self._base
        now_b, now_s = self._now
        if abs(now_b - base_b) > c.brightness_tolerance * max(base_b, 1.0):
            reasons.append(f"brightness {now_b:.0f} vs baseline {base_b:.0f}")
        if base_s > 1e-6 and now_s < c.min_sharpness_share * base_s:
            reasons.append(f"sharpness {now_s:.0f} is below {c.min_sharpness_share:.0%} of "
                           f"baseline {base_s:.0f}")
        corr = _correlation(self._now_thumb, self._base_thumb)
        if corr < c.min_scene_correlation:
            reasons.append(f"scene correlation {corr:.2f} < {c.min_scene_correlation} (camera moved?)")
        if bool(reasons) != self.alarm:
            if reasons:
                log.warning("image health alarm: %s", "; ".join(reasons))
            else:
                log.info("image health back to baseline")
        self.alarm, self.reasons = bool(reasons), reasons

    def summary(self) -> dict[str, object]:
        return {"alarm": self.alarm, "reasons": self.reasons, "frames": self.seen,
                "baseline_ready": self.seen > self.config.baseline_frames,
                "brightness": round(self._now[0], 1), "sharpness": round(self._now[1], 1),
                "baseline": {"brightness": round(self._base[0], 1), "sharpness": round(self._base[1], 1)}}
