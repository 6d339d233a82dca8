"""Hot-swap benchmark: 20 model swaps on a running line; dropped frames and latency during swaps.

The real daemon replays the line at ``--rate`` parts/s with the real model; two registered
versions of it are promoted in turn (gate skipped: this measures the swap itself — load, warm,
switch).  A part counts as "during a swap" when it was acquired while a promote was in progress; "steady"
is every other part after the ``--settle`` start-up (whose warm-up transients and drops are
reported apart).
Writes bench/results/swap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

from appliance.daemon import Daemon
from appliance.model_package import CARD_FILE
from appliance.registry import ModelRegistry
from appliance.result import PartResult
from bench.common import bench_line, line_and_model, line_arguments, machine, percentiles, write_result


def twin_versions(model: Path, models_dir: Path) -> list[str]:
    """The same package registered twice under two versions (a swap still loads and warms it)."""
    registry = ModelRegistry(models_dir)
    versions = []
    for tag in ("a", "b"):
        pkg = models_dir.parent / f"pkg-{tag}"
        shutil.copytree(model, pkg)
        card = json.loads((pkg / CARD_FILE).read_text())
        card["version"] = f"{card['version']}-{tag}"
        (pkg / CARD_FILE).write_text(json.dumps(card))
        versions.append(registry.register(pkg).version)
    registry.set_champion(versions[0])
    return versions


async def run(args: argparse.Namespace) -> dict[str, object]:
    base, model, replay = line_and_model(args)
    assert base.camera.replay is not None
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        state = Path(tmp) / "state"
        versions = twin_versions(model, state / "models")
        cfg = bench_line(base, None, replay, state, args.rate)
        daemon = Daemon(cfg)
        seen: list[tuple[float, float, str]] = []  # acquired (monotonic), stored ms, version

        async def record(result: PartResult) -> None:
            seen.append((time.monotonic() - result.latency["total_ms"] / 1e3,
                         daemon.stats.stored_ms[-1], result.model_version or ""))

        daemon.publishers.append(record)
        await daemon.start()
        windows: list[tuple[float, float]] = []
        dropped_in_swaps = 0
        try:
            await asyncio.sleep(args.settle)
            measured_from, dropped_before = time.monotonic(), daemon.stats.dropped
            for i in range(args.swaps):
                started, dropped_at_start = time.monotonic(), daemon.stats.dropped
                await daemon.promote(versions[(i + 1) % 2], "bench", force=True)
                windows.append((started, time.monotonic()))
                dropped_in_swaps += daemon.stats.dropped - dropped_at_start
                await asyncio.sleep(args.gap)
        finally:
            frames, dropped, judged = daemon.stats.frames, daemon.stats.dropped, daemon.stats.judged
            await daemon.stop()

    def during(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)

    swap_lat = [ms for t, ms, _ in seen if during(t)]
    steady = [ms for t, ms, _ in seen if t >= measured_from and not during(t)]  # start-up excluded
    switches = sum(1 for prev, cur in itertools.pairwise(seen) if prev[2] != cur[2])
    return {
        "benchmark": "swap", "machine": machine(), "model": str(model), "rate_hz": args.rate,
        "swaps": args.swaps, "version_switches_seen_in_results": switches,
        "swap_seconds": percentiles([(b - a) for a, b in windows]),
        "frames": frames, "judged": judged, "dropped": dropped - dropped_before,
        "dropped_during_swaps": dropped_in_swaps, "dropped_during_settle": dropped_before,
        "stored_ms_during_swaps": percentiles(swap_lat), "stored_ms_steady": percentiles(steady),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    line_arguments(parser)
    parser.add_argument("--rate", type=float, default=50.0, help="parts/s while swapping")
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between swaps")
    parser.add_argument("--settle", type=float, default=5.0, help="steady seconds before the first swap")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    write_result("swap", report)
    d, s = report["stored_ms_during_swaps"], report["stored_ms_steady"]
    print(f"{report['swaps']} swaps at {args.rate:.0f} parts/s: {report['dropped']} frames dropped of "
          f"{report['frames']}, {report['version_switches_seen_in_results']} version switches in the results")
    print(f"stored latency during swaps p50 {d['p50']} ms p99 {d['p99']} ms (n={d['n']}); "  # type: ignore[index]
          f"steady p50 {s['p50']} ms p99 {s['p99']} ms (n={s['n']})")  # type: ignore[index]
    print(f"one swap (load + warm + switch) p50 {report['swap_seconds']['p50']} s")  # type: ignore[index]


if __name__ == "__main__":
    main()
