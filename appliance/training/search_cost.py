"""What a candidate recipe will cost before it runs, and what its exported model costs the line.

A short calibration on this machine measures three rates on the user's own images: onnxruntime
seconds per multiply-accumulate of the frozen network (feature extraction, image decoding
included), bs1 milliseconds per multiply-accumulate with the daemon's thread settings (the line's
latency), and torch seconds per multiply-accumulate of a training step of fine-tuned blocks.  A
candidate's cost is then its multiply-accumulates (counted per block of the network at its
resolution) times those rates; the search corrects the rates with what finished candidates took.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from appliance.config import ModelConfig
from appliance.inference import Classifier
from appliance.model_package import INPUT_NAME
from appliance.training.backbone import FEATURES, load_backbone
from appliance.training.data import Layout
from appliance.training.export import export_onnx, session
from appliance.training.features import View, inference_views
from appliance.training.network import build, build_pooled
from appliance.training.recipe import NUM_BLOCKS, TrainRecipe

CALIBRATION_IMAGES = 8
CALIBRATION_SIDE = 160
LATENCY_RUNS = 100
REPEATS = 3
DAEMON_THREADS: int = ModelConfig.model_fields["intra_op_threads"].default
"""The line judges each part on this many onnxruntime threads (``model.intra_op_threads``)."""
CLOCK = time.thread_time if DAEMON_THREADS == 1 else time.perf_counter
"""With one intra-op thread onnxruntime runs a part on the calling thread, so that thread's CPU time
is the part's latency on a core of its own: unlike wall time, it does not grow when other jobs
load the training machine."""
CLOCK_NAME = "thread CPU time" if CLOCK is time.thread_time else "wall time"
MORE_THREADS_GAIN = 1.3
"""All cores train only when a step is this many times faster on them than on one thread."""
EXPORT_S = 4.0
"""Exporting, checking and loading a model package at 224 px, before correction."""

LatencyFn = Callable[[Path, list[np.ndarray]], dict[str, float]]
"""(package, images) → ``p50_ms``, ``p99_ms``, …: how a candidate's latency is measured."""


def block_macs(side: int) -> tuple[list[float], list[int]]:
    """Multiply-accumulates of one image, ``[stem, block 0 … block 15, head conv]``, and the output
    channels of each block."""
    net = load_backbone(side).eval()
    parts = [net._conv_stem, *net._blocks, net._conv_head]
    counts = [0.0] * len(parts)
    hooks = []
    for k, part in enumerate(parts):
        for m in part.modules():
            if isinstance(m, nn.Conv2d):
                def count(mod: nn.Conv2d, _: object, out: torch.Tensor, k: int = k) -> None:
                    kh, kw = mod.kernel_size
                    counts[k] += out.numel() * mod.in_channels / mod.groups * kh * kw
                hooks.append(m.register_forward_hook(count))
    with torch.no_grad():
        net.extract_features(torch.zeros(1, 3, side, side))
    for h in hooks:
        h.remove()
    return counts, [b._block_args.output_filters for b in net._blocks]


@dataclass(slots=True)
class CostModel:
    """Rates measured by :func:`calibrate`; ``correction`` scales each stage by what runs took."""

    extract_s_per_mac: float
    latency_ms_per_mac: float
    train_s_per_mac: float
    """Fine-tuned blocks: forward, backward and update, per multiply-accumulate of the forward."""
    dense_s_per_mac: float
    """The same for the MLP on pooled vectors."""
    threads: int
    """torch and onnxruntime threads that trained fastest here (see :func:`calibrate`)."""
    channels: list[int]
    calibration_s: float
    correction: dict[str, list[float]] = field(default_factory=lambda: {"features": [], "train": [], "export": []})
    latency_correction: dict[str, list[float]] = field(default_factory=dict)
    """Per method: measured / estimated latency of the candidates measured so far."""
    _macs: dict[int, list[float]] = field(default_factory=dict)

    def macs(self, side: int) -> list[float]:
        if side not in self._macs:
            self._macs[side] = block_macs(side)[0]
        return self._macs[side]

    def _frozen_macs(self, r: TrainRecipe) -> float:
        m = self.macs(r.image_size)
        return sum(m) if r.method == "pooled_features" else sum(m[:1 + r.frozen_blocks])

    def _factor(self, stage: str) -> float:
        seen = self.correction[stage]
        return float(np.clip(np.median(seen), 0.3, 5.0)) if seen else 1.0

    def stages(self, r: TrainRecipe, n_train: int, n_val: int, missing_views: tuple[int, int]) -> dict[str, float]:
        """Estimated seconds per stage (``features`` only for the views not cached yet)."""
        m = self.macs(r.image_size)
        frozen = self._frozen_macs(r)
        new = missing_views[0] * n_train + missing_views[1] * n_val
        features = new * frozen * self.extract_s_per_mac + (EXPORT_S / 2 if new else 0.0)
        batch = min(r.batch_size, n_train)
        steps = max(n_train // batch, math.ceil(r.min_steps / r.epochs)) * r.epochs
        judged = len(inference_views(r))
        if r.method == "pooled_features":
            width = sum(3 * self.channels[b] for b in set(r.pooled_blocks)) + 2 * FEATURES
            dense = width * r.hidden_units + (r.hidden_units or width) * 16
            train = (steps * batch + r.epochs * n_val * judged / 3) * dense * self.dense_s_per_mac
        else:
            top = sum(m[1 + r.frozen_blocks:])
            train = (steps * batch + r.epochs * n_val * judged / 3) * top * self.train_s_per_mac
        # + the latency runs and the scoring pass over the validation images, both on the package
        export = EXPORT_S * (r.image_size / 224) ** 2 + self.latency_ms(r) * (LATENCY_RUNS * REPEATS + n_val) * 1e-3
        return {"features": features * self._factor("features"), "train": train * self._factor("train"),
                "export": export * self._factor("export")}

    def latency_ms(self, r: TrainRecipe) -> float:
        """Estimated bs1 latency of the exported model on the daemon's threads."""
        seen = self.latency_correction.get(r.method)
        return self._plain_latency_ms(r) * (float(np.median(seen)) if seen else 1.0)

    def _plain_latency_ms(self, r: TrainRecipe) -> float:
        return sum(self.macs(r.image_size)) * len(inference_views(r)) * self.latency_ms_per_mac

    def learn_latency(self, r: TrainRecipe, measured_ms: float) -> None:
        """Fold a measured median latency into the estimates for the same method (pooling and the
        trained top cost more than the calibration's plain network)."""
        self.latency_correction.setdefault(r.method, []).append(measured_ms / self._plain_latency_ms(r))

    def learn(self, estimate: dict[str, float], seconds: dict[str, float]) -> None:
        """Fold a finished candidate's real stage seconds into the corrections."""
        for stage, correction in self.correction.items():
            if estimate.get(stage, 0) > 0.5 and stage in seconds:
                correction.append(seconds[stage] / (estimate[stage] / self._factor(stage)))


def calibrate(layout: Layout, load: Callable[[Path], np.ndarray], paths: list[Path],
              side: int = CALIBRATION_SIDE) -> CostModel:
    """Measure the rates on ``CALIBRATION_IMAGES`` of the user's training images at ``side`` px.

    Sets torch's threads (which onnxruntime's extraction follows): all cores only where they train
    clearly faster than one, since OpenMP threads that wait for each other run several times slower
    as soon as other jobs (the line itself, on an appliance) load the cores."""
    started = time.perf_counter()
    macs, channels = block_macs(side)
    threads = _train_rates(layout, side, macs, sorted({1, torch.get_num_threads()}))
    best = max(threads) if threads[max(threads)][0] * MORE_THREADS_GAIN < threads[1][0] else 1
    torch.set_num_threads(best)
    train_s_per_mac, dense_s_per_mac = threads[best]
    frozen = build_pooled(layout, side, [NUM_BLOCKS - 1])
    picked = paths[:: max(1, len(paths) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES]
    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp:
        onnx = Path(tmp) / "trunk.onnx"
        export_onnx(frozen, onnx, layout, side, ["features"])
        sess = session(onnx, best)
        first = load(picked[0])
        sess.run(None, {INPUT_NAME: first[None]})  # warm-up
        t = time.perf_counter()
        images = [im for im in map(load, picked) if im.shape == first.shape]
        sess.run(None, {INPUT_NAME: View(flip_h=True).apply(np.stack(images))})
        extract_s = (time.perf_counter() - t) / len(images)
        one = session(onnx, DAEMON_THREADS)
        times = []
        for _ in range(12):
            t = CLOCK()
            one.run(None, {INPUT_NAME: first[None]})
            times.append(CLOCK() - t)
    return CostModel(extract_s_per_mac=extract_s / sum(macs),
                     latency_ms_per_mac=float(np.median(times[2:])) * 1e3 / sum(macs),
                     train_s_per_mac=train_s_per_mac, dense_s_per_mac=dense_s_per_mac, threads=best,
                     channels=channels, calibration_s=time.perf_counter() - started, _macs={side: macs})


def _train_rates(layout: Layout, side: int, macs: list[float], thread_counts: list[int], frozen_blocks: int = 13,
                 batch: int = 16) -> dict[int, tuple[float, float]]:
    """Seconds per multiply-accumulate of a training step (forward, backward, update) on each of
    ``thread_counts``: of fine-tuned blocks, and of an MLP on pooled vectors."""
    frozen, net = build(layout, side, frozen_blocks, [2], 0.2, 0.2)
    with torch.no_grad():
        one = frozen.trunk(torch.zeros(1, 3, side, side))
    maps = one.repeat(batch, 1, 1, 1) + torch.randn(batch, *one.shape[1:])
    width, hidden = 2 * FEATURES, 512
    mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 2))
    vectors = torch.randn(8 * batch, width)
    out: dict[int, tuple[float, float]] = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        rates = []
        for model, x, per_sample in ((net, maps, sum(macs[1 + frozen_blocks:])), (mlp, vectors, width * hidden)):
            optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
            model.train()
            times = []
            for _ in range(3):
                t = time.perf_counter()
                y = model(x)
                loss = (y[0] if isinstance(y, list) else y).sum()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                times.append(time.perf_counter() - t)
            rates.append(min(times[1:]) / (len(x) * per_sample))
        out[threads] = (rates[0], rates[1])
    return out


def measure_latency(package: Path, images: list[np.ndarray]) -> dict[str, float]:
    """bs1 latency of the package through the line's :class:`Classifier` with the daemon's default
    threads, on ``CLOCK``: p50 and p99 over ``LATENCY_RUNS`` parts (real images).

    A network's work does not depend on the image, so what varies between runs is the machine:
    each part is timed as the fastest of ``REPEATS`` back-to-back runs, so that another job's
    preemption or cache flush does not count against the model.  The unfiltered p99 and the wall
    time are recorded beside it."""
    classifier = Classifier(package, intra_op_threads=DAEMON_THREADS)
    conformed = [classifier.conform(im) for im in images]
    times, walls = np.empty((LATENCY_RUNS, REPEATS)), np.empty((LATENCY_RUNS, REPEATS))
    for i in range(LATENCY_RUNS):
        for k in range(REPEATS):
            t, w = CLOCK(), time.perf_counter()
            classifier.classify(conformed[i % len(conformed)])
            times[i, k], walls[i, k] = (CLOCK() - t) * 1e3, (time.perf_counter() - w) * 1e3
    best = times.min(axis=1)

    def ms(a: np.ndarray, q: int) -> float:
        return round(float(np.percentile(a, q)), 2)

    return {"p50_ms": ms(best, 50), "p99_ms": ms(best, 99), "p99_unfiltered_ms": ms(times, 99),
            "wall_p50_ms": ms(walls, 50), "wall_p99_ms": ms(walls, 99),
            "runs": LATENCY_RUNS, "repeats": REPEATS, "batch": 1, "threads": DAEMON_THREADS}
