"""Do dashboards and API clients hurt the line?  Part latency while a heavy DuckDB query keeps both
cores busy, while the review queue is requested many times a second, and while large pages of
results are pulled, against the same line idle.

The real daemon replays the line at ``--rate`` parts/s with the real model, with ``--waiting``
held parts stored before it starts (a plant with a backlog and a history).  Each phase is
measured for ``--seconds``; the HTTP requests come from another process, as a dashboard's or a
MES's would:

* idle: the line alone;
* querying: a CPU-bound DuckDB aggregate (hashing ``--rows`` numbers, about as much work as
  exporting a day of 10^6 results) runs back to back on the daemon's own store, through
  ``asyncio.to_thread`` exactly as the API runs dashboard queries.  Such work runs at background
  priority (appliance.priority), so the line should barely notice;
* reviewing: ``--review-rate`` requests/s of ``GET /review/queue``, served by the daemon's queue
  (re-ranked at most every ``review.queue_max_age_s``, appliance.active.ReviewQueue);
* reviewing, ranked every time: the same with ``queue_max_age_s`` 0;
* results pages: ``GET /results`` with ``limit`` 1,000 once a second, then 10,000 every 5 s.
  Pages are rendered as JSON by DuckDB (Store.query_json): building a Python object per row holds
  the GIL the inference threads need.

Goal: p99 in every phase but "ranked every time" ≤ 1.5 × p99 idle.  Writes bench/results/query_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import secrets
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from appliance.api.server import API_PREFIX
from appliance.config import AppConfig
from appliance.daemon import Daemon
from appliance.model_package import read_card
from appliance.result import HeadResult, PartResult, new_result_id
from appliance.store import Store
from bench.common import bench_line, line_and_model, line_arguments, machine, percentiles, write_result

PHASES = ("idle", "querying", "reviewing", "reviewing, ranked every time", "results pages of 1,000, 1/s",
          "results pages of 10,000, every 5 s")


async def seed_waiting(cfg: AppConfig, model: Path, count: int) -> None:
    """``count`` held parts waiting for review, appended through the real store before the line
    starts, with random class probabilities over the model's own heads."""
    card = read_card(model)
    rng = np.random.default_rng(0)
    store = Store(cfg.resolve(cfg.store.path), cfg.state_dir / "journal")
    store.open()
    try:
        for i in range(count):
            predictions = []
            for head in card.heads:
                probs = rng.dirichlet(np.ones(len(head.classes)))
                best = int(probs.argmax())
                predictions.append(HeadResult(head.name, head.classes[best], float(probs[best]),
                                              probs.round(4).tolist()))
            now = datetime.now(UTC)
            await store.append(PartResult(
                result_id=new_result_id(), acquired_at=now, decided_at=now, line_id=cfg.line.line_id,
                asset_id=cfg.line.asset_id, camera_view=cfg.camera.view, batch="backlog", part_id=f"B{i}",
                model_version=card.version, disposition="hold", rule="low_confidence", status="ok",
                source_ref="bench:backlog", review="hold", predictions=predictions))
    finally:
        store.close()


def api_requests(url: str, token: str, path: str, params: dict[str, Any], size: str, rate: float,
                 seconds: float) -> tuple[list[float], list[int]]:
    """``rate`` GET requests a second of ``path`` for ``seconds``, from another process (as a
    dashboard or a MES is), each on its own: a slow answer does not hold back the next request.
    Returns each request's seconds and each answer's ``size`` field."""
    async def load() -> tuple[list[float], list[int]]:
        times: list[float] = []
        sizes: list[int] = []
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                                     timeout=60) as api:
            async def one() -> None:
                started = time.perf_counter()
                answer = await api.get(path, params=params)
                answer.raise_for_status()
                times.append(time.perf_counter() - started)
                sizes.append(answer.json()[size])

            requests = []
            for _ in range(int(seconds * rate)):
                requests.append(asyncio.create_task(one()))
                await asyncio.sleep(1 / rate)
            await asyncio.gather(*requests)
        return times, sizes

    return asyncio.run(load())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base, model, replay = line_and_model(args)
    assert base.camera.replay is not None
    with tempfile.TemporaryDirectory(prefix="bench-query-") as tmp:
        cfg = bench_line(base, model, replay, Path(tmp), args.rate)
        await seed_waiting(cfg, model, args.waiting)
        daemon = Daemon(cfg)
        phase = {"name": "warm-up"}
        stored: dict[str, list[float]] = {name: [] for name in PHASES}
        query_s: list[float] = []
        request_s: dict[str, list[float]] = {}
        answer_sizes: dict[str, int] = {}
        rankings: dict[str, int] = {}

        async def record(result: PartResult) -> None:
            if phase["name"] in stored:
                stored[phase["name"]].append(daemon.stats.stored_ms[-1])

        def heavy_query() -> None:
            with daemon.store.cursor() as cur:
                cur.execute(f"SELECT sum(hash(i) % 7) FROM range({int(args.rows)}) t(i)").fetchall()

        async def api_load(name: str, path: str, params: dict[str, Any], size: str, rate: float) -> None:
            before = daemon.review_queue.rankings
            phase["name"] = name
            seconds, sizes = await asyncio.get_running_loop().run_in_executor(
                clients, api_requests, url, token, path, params, size, rate, args.seconds)
            request_s[name] = seconds
            answer_sizes[name] = max(sizes, default=0)
            if path == "/review/queue":
                rankings[name] = daemon.review_queue.rankings - before

        daemon.publishers.append(record)
        # the clients' process runs at the lowest priority: a real dashboard or MES parses its
        # answers on another computer, not on the line's two cores
        clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=os.nice, initargs=(19,))
        await daemon.start()
        try:
            # the dashboards' user: argon2 hashing takes a few hundred ms of CPU, so it is made now,
            # in a worker thread, as the API does
            await asyncio.to_thread(daemon.users.set, "bench", "operator", secrets.token_urlsafe(16))
            bench_user = daemon.users.identity("bench")
            assert bench_user is not None
            token, _ = daemon.tokens.issue(bench_user)
            url = f"http://127.0.0.1:{daemon.api_port}{API_PREFIX}"
            # started (and its imports done) before anything is measured
            await asyncio.get_running_loop().run_in_executor(clients, api_requests, url, token, "/health", {},
                                                             "state", 1.0, 0.0)
            await asyncio.sleep(3)
            phase["name"] = "idle"
            await asyncio.sleep(args.seconds)
            phase["name"] = "querying"
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                started = time.perf_counter()
                await asyncio.to_thread(heavy_query)
                query_s.append(time.perf_counter() - started)
            review = ("/review/queue", {"limit": 50}, "ranked_from", args.review_rate)
            await api_load(PHASES[2], *review)
            daemon.review_queue.max_age_s = 0
            await api_load(PHASES[3], *review)
            await api_load(PHASES[4], "/results", {"limit": 1000}, "count", 1.0)
            await api_load(PHASES[5], "/results", {"limit": 10_000}, "count", 0.2)
            phase["name"] = "done"
        finally:
            dropped = daemon.stats.dropped
            clients.shutdown()
            await daemon.stop()
    latency = {name: percentiles(values) for name, values in stored.items()}
    idle_p99 = latency["idle"]["p99"]
    ratios = {name: round(latency[name]["p99"] / idle_p99, 3) if idle_p99 and latency[name]["p99"] else None
              for name in PHASES[1:]}
    goal = ("querying", "reviewing", PHASES[4], PHASES[5])
    return {"benchmark": "query_load", "machine": machine(), "model": str(model), "rate_hz": args.rate,
            "query_rows": args.rows, "queries": len(query_s), "query_seconds": percentiles(query_s),
            "review_rate_hz": args.review_rate, "stored_before_start": args.waiting,
            "ranked_from": answer_sizes.get("reviewing", 0), "answer_sizes": answer_sizes,
            "request_seconds": {name: percentiles(values) for name, values in request_s.items()},
            "review_rankings": rankings, "stored_ms": latency, "p99_ratio": ratios,
            "dropped_frames": dropped, "goal": "p99 while querying, reviewing and paging <= 1.5 x p99 idle",
            "goal_met": all((ratio := ratios[name]) is not None and ratio <= 1.5 for name in goal)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    line_arguments(parser)
    parser.add_argument("--rate", type=float, default=30.0, help="parts/s on the line")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measured phase")
    parser.add_argument("--rows", type=float, default=3e7, help="numbers the query hashes per run")
    parser.add_argument("--review-rate", type=float, default=8.0, help="review-queue requests/s")
    parser.add_argument("--waiting", type=int, default=10_000,
                        help="held parts stored before the line starts (the queue ranks the newest 1,000)")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    write_result("query_load", report)
    for name, stored in report["stored_ms"].items():
        ratio = report["p99_ratio"].get(name)
        print(f"{name:>29}:  stored p50 {stored['p50']} ms  p99 {stored['p99']} ms  max {stored['max']} ms  "
              f"(n={stored['n']})" + (f"  p99 ×{ratio}" if ratio else ""))
    print(f"{report['queries']} heavy queries of p50 {report['query_seconds']['p50']} s")
    for name, r in report["request_seconds"].items():
        ranked = report["review_rankings"].get(name)
        print(f"{name}: {r['n']} requests, p50 {r['p50']} s, answers of up to {report['answer_sizes'][name]:,}"
              + (f"; ranked {ranked} times" if ranked is not None else ""))
    print(f"goal (querying, reviewing and paging ≤ ×1.5): {'met' if report['goal_met'] else 'NOT met'}; "
          f"dropped frames {report['dropped_frames']}")


if __name__ == "__main__":
    main()
