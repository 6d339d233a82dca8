"""Does retraining hurt the line?  Part latency while a retrain runs, against the same line idle.

The real daemon replays the line at ``--rate`` parts/s with the real model.  First ``--seconds``
of steady running are measured; then the retraining worker is started exactly as the daemon
starts it (``appliance retrain-worker`` at nice 10 and idle I/O priority, on the base dataset
with the default recipe) and the next ``--seconds`` are measured while it trains; then it is
stopped.  Goal: p99 while retraining ≤ 1.5 × p99 idle.  Writes bench/results/retrain_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from appliance.daemon import Daemon
from appliance.result import PartResult
from appliance.retrain import build_training_set, lower_priority
from bench.common import bench_line, line_and_model, line_arguments, machine, percentiles, write_result


async def run(args: argparse.Namespace) -> dict[str, object]:
    base, model, replay = line_and_model(args)
    assert base.camera.replay is not None
    dataset = base.resolve(base.registry.base_dataset or base.camera.replay.path).resolve()
    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as tmp:
        cfg = bench_line(base, model, replay, Path(tmp) / "state", args.rate)
        job = Path(tmp) / "job"
        build_training_set(job, dataset, [], Path(tmp), {})
        (job / "job.json").write_text(json.dumps({"parent_version": None, "recipe": {}}))
        daemon = Daemon(cfg)
        phase = {"name": "warm-up"}
        stored: dict[str, list[float]] = {"idle": [], "retraining": []}

        async def record(result: PartResult) -> None:
            if phase["name"] in stored:
                stored[phase["name"]].append(daemon.stats.stored_ms[-1])

        daemon.publishers.append(record)
        await daemon.start()
        try:
            await asyncio.sleep(3)
            phase["name"] = "idle"
            await asyncio.sleep(args.seconds)
            phase["name"] = "starting"
            with (job / "worker.log").open("wb") as log:
                worker = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "appliance", "retrain-worker", "--job", str(job),
                    stdout=log, stderr=asyncio.subprocess.STDOUT, preexec_fn=lower_priority)
            await asyncio.sleep(args.ramp)  # let it get past start-up into feature extraction
            phase["name"] = "retraining"
            started = time.monotonic()
            await asyncio.sleep(args.seconds)
            still_training = worker.returncode is None
            measured = time.monotonic() - started
            worker_nice = os.getpriority(os.PRIO_PROCESS, worker.pid) if still_training else None
            phase["name"] = "done"
            if worker.returncode is None:
                worker.terminate()
            await worker.wait()
        finally:
            dropped = daemon.stats.dropped
            await daemon.stop()
    idle, busy = percentiles(stored["idle"]), percentiles(stored["retraining"])
    ratio = round(busy["p99"] / idle["p99"], 3) if idle["p99"] and busy["p99"] else None
    return {"benchmark": "retrain_load", "machine": machine(), "model": str(model), "rate_hz": args.rate,
            "stored_ms_idle": idle, "stored_ms_while_retraining": busy, "p99_ratio": ratio,
            "worker_nice": worker_nice, "worker_still_training_when_measured": still_training,
            "measured_seconds": round(measured, 1), "dropped_frames": dropped,
            "goal": "p99 while retraining <= 1.5 x p99 idle", "goal_met": ratio is not None and ratio <= 1.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    line_arguments(parser)
    parser.add_argument("--rate", type=float, default=20.0, help="parts/s on the line")
    parser.add_argument("--seconds", type=float, default=45.0, help="length of each measured phase")
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds for the worker to start up")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    write_result("retrain_load", report)
    i, b = report["stored_ms_idle"], report["stored_ms_while_retraining"]
    print(f"idle:        p50 {i['p50']} ms  p99 {i['p99']} ms  (n={i['n']})")  # type: ignore[index]
    print(f"retraining:  p50 {b['p50']} ms  p99 {b['p99']} ms  (n={b['n']})")  # type: ignore[index]
    print(f"p99 ratio {report['p99_ratio']} (goal ≤ 1.5), worker still training: "
          f"{report['worker_still_training_when_measured']}, dropped frames {report['dropped_frames']}")


if __name__ == "__main__":
    main()
