"""Do heavy dashboard queries hurt the line?  Part latency while a DuckDB query keeps both cores
busy, against the same line idle.

The real daemon replays the line at ``--rate`` parts/s with the real model.  First ``--seconds``
of steady running are measured; then a CPU-bound DuckDB aggregate (hashing ``--rows`` numbers,
about as much work as exporting a day of 10^6 results) runs back to back on the daemon's own
store, through ``asyncio.to_thread`` exactly as the API runs dashboard queries, and the next
``--seconds`` are measured.  Such work runs at background priority (appliance.priority), so the
line should barely notice.  Goal: p99 while querying ≤ 1.5 × p99 idle.
Writes bench/results/query_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.daemon import Daemon
from appliance.result import PartResult
from bench.common import bench_line, line_and_model, line_arguments, machine, percentiles, write_result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base, model, replay = line_and_model(args)
    assert base.camera.replay is not None
    with tempfile.TemporaryDirectory(prefix="bench-query-") as tmp:
        cfg = bench_line(base, model, replay, Path(tmp), args.rate)
        daemon = Daemon(cfg)
        phase = {"name": "warm-up"}
        stored: dict[str, list[float]] = {"idle": [], "querying": []}
        query_s: list[float] = []

        async def record(result: PartResult) -> None:
            if phase["name"] in stored:
                stored[phase["name"]].append(daemon.stats.stored_ms[-1])

        def heavy_query() -> None:
            with daemon.store.cursor() as cur:
                cur.execute(f"SELECT sum(hash(i) % 7) FROM range({int(args.rows)}) t(i)").fetchall()

        daemon.publishers.append(record)
        await daemon.start()
        try:
            await asyncio.sleep(3)
            phase["name"] = "idle"
            await asyncio.sleep(args.seconds)
            phase["name"] = "querying"
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                started = time.perf_counter()
                await asyncio.to_thread(heavy_query)
                query_s.append(time.perf_counter() - started)
            phase["name"] = "done"
        finally:
            dropped = daemon.stats.dropped
            await daemon.stop()
    idle, busy = percentiles(stored["idle"]), percentiles(stored["querying"])
    ratio = round(busy["p99"] / idle["p99"], 3) if idle["p99"] and busy["p99"] else None
    return {"benchmark": "query_load", "machine": machine(), "model": str(model), "rate_hz": args.rate,
            "query_rows": args.rows, "queries": len(query_s), "query_seconds": percentiles(query_s),
            "stored_ms_idle": idle, "stored_ms_while_querying": busy, "p99_ratio": ratio,
            "dropped_frames": dropped, "goal": "p99 while querying <= 1.5 x p99 idle",
            "goal_met": ratio is not None and ratio <= 1.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    line_arguments(parser)
    parser.add_argument("--rate", type=float, default=30.0, help="parts/s on the line")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measured phase")
    parser.add_argument("--rows", type=float, default=3e7, help="numbers the query hashes per run")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    write_result("query_load", report)
    i, b = report["stored_ms_idle"], report["stored_ms_while_querying"]
    print(f"idle:      p50 {i['p50']} ms  p99 {i['p99']} ms  (n={i['n']})")
    print(f"querying:  p50 {b['p50']} ms  p99 {b['p99']} ms  (n={b['n']}; {report['queries']} queries of "
          f"p50 {report['query_seconds']['p50']} s)")
    print(f"p99 ratio {report['p99_ratio']} (goal ≤ 1.5), dropped frames {report['dropped_frames']}")


if __name__ == "__main__":
    main()
