"""Pipeline benchmark: frame acquired → stored disposition, per stage, against the bare model.

Measured in one run, on the same images and with the config's inference workers and threads:
  * bare: onnxruntime ``Classifier.classify`` on decoded images in a tight loop, as many calls at
    a time as the daemon has inference workers;
  * paced: the real daemon (replay camera → queue → classifier → disposition → journal fsync)
    at ``--rate`` parts/s; "stored" is acquired → durable, i.e. when a PLC may be told;
  * at the line rate: the daemon at ``--line-rate`` parts/s, a rate it keeps up with, beside the
    bare model fed one image every 1/rate s: the pipeline's own cost when nothing queues;
  * sustained: the same daemon with the camera at ``--sustained-rate`` for ``--seconds``: the parts/s
    judged and the frames dropped;
  * the replay camera's file read + PNG decode, timed alone: a frame counts as acquired once its
    pixels are in memory, as a camera's buffer does, so this is not in the stages above;
  * capacity: the camera at ``--capacity-rate``, faster than the line can judge, so the parts/s
    judged is the most it can do (the replay source decodes PNGs on the same two cores, which a
    real camera does not); once with the config's inference workers and once with 1 worker of
    2 onnxruntime threads, the layout before ``model.inference_workers``.
PLC servers are off here; bench/plc.py measures the path to the PLC.
Writes bench/results/pipeline.json.  Needs a model: run `appliance demo` once, or pass --model.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from appliance.camera.replay import list_images
from appliance.config import AppConfig
from appliance.daemon import Daemon
from appliance.imageio import read_image
from appliance.inference import Classifier
from appliance.result import STAGES, PartResult
from bench.common import bench_line, line_and_model, line_arguments, machine, percentiles, write_result


def bare_model(model: Path, images: list[np.ndarray], n: int, threads: int, workers: int, spin: bool,
               rate: float | None = None) -> dict[str, Any]:
    """onnxruntime alone, ``workers`` calls at a time as the daemon runs it: back to back, or one
    image every 1/``rate`` s as a paced line feeds it.  Latency is one ``classify`` call.

    The two differ on this machine: between paced calls onnxruntime's second thread goes idle and
    wakes too late to share the next run, so a paced call costs about what one thread does.
    """
    clf = Classifier(model, threads, warmup_runs=10, spin_wait=spin)
    times: list[float] = []
    free = threading.Semaphore(workers)

    def one(image: np.ndarray) -> None:
        try:
            t = time.perf_counter_ns()
            clf.classify(image)
            times.append((time.perf_counter_ns() - t) / 1e6)
        finally:
            free.release()

    started = next_at = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for i in range(n):
            if rate:
                next_at += 1 / rate
                time.sleep(max(0.0, next_at - time.perf_counter()))
            free.acquire()
            pool.submit(one, images[i % len(images)])
    return {**percentiles(times), "per_s": round(n / (time.perf_counter() - started), 1)}


def run_fresh(cfg: AppConfig, rate: float, frames: int | None, seconds: float | None) -> dict[str, Any]:
    """``run_line`` in a new, empty state directory."""
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        return asyncio.run(run_line(cfg.model_copy(update={"state_dir": Path(tmp)}), rate, frames, seconds))


async def run_line(cfg: AppConfig, rate: float, frames: int | None, seconds: float | None) -> dict[str, Any]:
    assert cfg.camera.replay is not None
    replay = cfg.camera.replay.model_copy(update={"rate_hz": rate, "loop": True})
    cfg = cfg.model_copy(update={"camera": cfg.camera.model_copy(update={"replay": replay})})
    daemon = Daemon(cfg)
    stages: dict[str, list[float]] = {s: [] for s in STAGES}

    async def record(result: PartResult) -> None:
        for s in STAGES:
            stages[s].append(result.latency[s])

    daemon.publishers.append(record)
    await daemon.start()
    started = time.perf_counter()
    try:
        if frames is not None:
            await daemon.wait_for_results(frames, timeout=frames / rate * 3 + 60)
        else:
            await asyncio.sleep(seconds or 10)
    finally:
        elapsed = time.perf_counter() - started
        judged, dropped, stored = daemon.stats.judged, daemon.stats.dropped, list(daemon.stats.stored_ms)
        await daemon.stop()
    return {
        "rate_hz": rate, "elapsed_s": round(elapsed, 2), "judged": judged, "dropped": dropped,
        "parts_per_s": round(judged / elapsed, 1),
        "stages_ms": {s: percentiles(v) for s, v in stages.items() if v},
        "stored_ms": percentiles(stored),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    line_arguments(parser)
    parser.add_argument("--frames", type=int, default=1500, help="parts in the paced run")
    parser.add_argument("--rate", type=float, default=100.0, help="parts/s in the paced run")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the sustained run")
    parser.add_argument("--sustained-rate", type=float, default=100.0, help="camera rate of the sustained run")
    parser.add_argument("--capacity-rate", type=float, default=200.0,
                        help="camera rate of the capacity runs, above what the line can judge")
    parser.add_argument("--capacity-seconds", type=float, default=10.0, help="length of each capacity run")
    parser.add_argument("--line-rate", type=float, default=30.0,
                        help="parts/s of the run at a rate the line keeps up with (model paced alike)")
    parser.add_argument("--line-frames", type=int, default=600, help="parts in that run")
    args = parser.parse_args()

    base, model, replay_path = line_and_model(args)
    assert base.camera.replay is not None
    paths = [p for p, _ in list_images(base.camera.replay.model_copy(update={"path": replay_path}))][:300]
    images, read_ms = [], []
    for path in paths:  # what the replay camera does before a frame counts as acquired
        t = time.perf_counter_ns()
        images.append(read_image(path))
        read_ms.append((time.perf_counter_ns() - t) / 1e6)

    cfg = bench_line(base, model, replay_path, base.state_dir)  # run_fresh gives each run its own state
    m = cfg.model
    bare = bare_model(model, images, args.frames, m.intra_op_threads, m.inference_workers, m.spin_wait)
    bare_at_line_rate = bare_model(model, images, args.line_frames, m.intra_op_threads,
                                   m.inference_workers, m.spin_wait, args.line_rate)
    one_worker = cfg.model_copy(update={"model": m.model_copy(update={"inference_workers": 1,
                                                                      "intra_op_threads": 2})})
    paced = run_fresh(cfg, args.rate, args.frames, None)
    at_line_rate = run_fresh(cfg, args.line_rate, args.line_frames, None)
    sustained = run_fresh(cfg, args.sustained_rate, None, args.seconds)
    capacity = run_fresh(cfg, args.capacity_rate, None, args.capacity_seconds)
    capacity_one_worker = run_fresh(one_worker, args.capacity_rate, None, args.capacity_seconds)

    stored_p99 = paced["stored_ms"]["p99"]
    report = {
        "benchmark": "pipeline",
        "machine": machine(),
        "model": str(model), "model_version": Classifier(model, warmup_runs=0).version,
        "inference": {"workers": m.inference_workers, "intra_op_threads": m.intra_op_threads},
        "bare_model_ms": bare,
        "replay_read_ms": percentiles(read_ms),
        "paced": paced,
        "sustained": sustained,
        "capacity": capacity,
        "capacity_one_worker_two_threads": capacity_one_worker,
        "ratio_stored_p99_to_bare_p99": round(stored_p99 / bare["p99"], 3),
        "line_rate": {
            "rate_hz": args.line_rate, "bare_model_ms": bare_at_line_rate, "run": at_line_rate,
            "ratio_stored_p99_to_bare_p99": round(at_line_rate["stored_ms"]["p99"] / bare_at_line_rate["p99"], 3),
        },
        "goals": {"pipeline_p99_ms<=10": stored_p99 <= 10, "ratio<=1.5": stored_p99 <= 1.5 * bare["p99"],
                  "sustained>=100/s": args.sustained_rate >= 100 and sustained["dropped"] == 0
                  and sustained["parts_per_s"] >= 0.99 * args.sustained_rate},
    }
    write_result("pipeline", report)
    print(f"bare model        p50 {bare['p50']:.2f} ms  p99 {bare['p99']:.2f} ms  ({bare['per_s']} inferences/s "
          f"with {m.inference_workers} worker(s) of {m.intra_op_threads} thread(s))")
    for stage, s in paced["stages_ms"].items():
        print(f"paced {stage:<12} p50 {s['p50']:.2f} ms  p99 {s['p99']:.2f} ms")
    print(f"paced stored      p50 {paced['stored_ms']['p50']:.2f} ms  p99 {stored_p99:.2f} ms "
          f"({paced['judged']} parts at {args.rate:.0f}/s, {paced['dropped']} dropped)")
    read = report["replay_read_ms"]
    print(f"replay read+decode p50 {read['p50']:.2f} ms  p99 {read['p99']:.2f} ms (before a frame counts as acquired)")
    print(f"ratio stored p99 / bare p99 = {report['ratio_stored_p99_to_bare_p99']}")
    line = report["line_rate"]
    print(f"at {args.line_rate:.0f} parts/s:   bare model paced alike p50 {bare_at_line_rate['p50']:.2f} ms  "
          f"p99 {bare_at_line_rate['p99']:.2f} ms; stored p50 {at_line_rate['stored_ms']['p50']:.2f} ms  "
          f"p99 {at_line_rate['stored_ms']['p99']:.2f} ms ({at_line_rate['dropped']} dropped); "
          f"ratio {line['ratio_stored_p99_to_bare_p99']}")
    print(f"sustained         {sustained['parts_per_s']} parts/s judged with the camera at "
          f"{args.sustained_rate:.0f}/s ({sustained['dropped']} frames dropped by the full queue)")
    print(f"capacity          {capacity['parts_per_s']} parts/s judged with the camera at {args.capacity_rate:.0f}/s; "
          f"{capacity_one_worker['parts_per_s']} parts/s with 1 inference worker of 2 threads")
    print(f"goals: {report['goals']}")


if __name__ == "__main__":
    main()
