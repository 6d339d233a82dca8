"""Dashboard analytics benchmark: every query the dashboard runs, at 10^6 stored results
(the review queue included).

Fills a temporary DuckDB file through the real Store schema with ``--results`` realistic results
(one line, two stations, two camera views, batches of 5,000 parts, three process values that drive
the defect rate, two heads: defect_type and an ordinal severity; champion predictions for both and
a shadow model on the newest 10 %), opens it with the real :class:`Store` (so queries use the same
cursors as the daemon), runs each query ``--runs`` times after one warm-up and prints p50/max.
Writes bench/results/analytics.json.  Goal: every dashboard query ≤ 300 ms on the 2-core edge PC.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from appliance import analytics as an
from appliance.active import review_queue
from appliance.store import SCHEMA, Store

RESULTS = Path(__file__).parent / "results"
TYPES = ["none", "crack", "finger_interruption", "scratch", "contamination", "solder_joint"]
SEVERITIES = ["none", "minor", "major", "critical"]
HEADS = an.Heads("defect_type", "severity", tuple(TYPES), tuple(SEVERITIES))
GOAL_MS = 300.0


def ulids(t_ms: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Sortable ULID-shaped ids (48-bit time + 80 random bits, Crockford base32)."""
    alphabet = np.frombuffer(b"0123456789ABCDEFGHJKMNPQRSTVWXYZ", np.uint8)
    out = np.empty((t_ms.size, 26), np.uint8)
    t = t_ms.astype(np.uint64)
    for i in range(10):
        out[:, 9 - i] = alphabet[(t >> np.uint64(5 * i)) & np.uint64(31)]
    out[:, 10:] = alphabet[rng.integers(0, 32, size=(t_ms.size, 16))]
    return out.view("S26").ravel().astype(str).tolist()


def synthesize(n: int, seed: int = 7) -> tuple[pa.Table, pa.Table]:
    """``n`` results at ~4 parts/s ending now, and their predictions."""
    rng = np.random.default_rng(seed)
    end = datetime.now(UTC).replace(microsecond=0)
    start = end - timedelta(seconds=n / 4)
    offsets = np.sort(rng.uniform(0, n / 4, n))
    acquired = np.datetime64(start.replace(tzinfo=None), "us") + (offsets * 1e6).astype("timedelta64[us]")
    t_ms = acquired.astype("datetime64[ms]").astype(np.int64)
    temperature = 180 + 6 * np.sin(np.arange(n) / 40_000) + rng.normal(0, 2.5, n)
    pressure = rng.normal(4.0, 0.3, n)
    speed = rng.normal(1.2, 0.05, n)
    view = rng.choice(["top", "side"], n, p=[0.5, 0.5])
    asset = np.where(rng.random(n) < 0.5, "station-7", "station-8")
    batch_no = np.arange(n) // 5000
    batches = int(batch_no.max()) + 1
    bad_batch = np.isin(batch_no, rng.choice(batches, min(6, max(1, batches // 2)), replace=False))
    hot = np.clip(temperature - 180, 0, None)
    p_defect = 0.03 + 0.012 * hot + 0.05 * bad_batch + 0.01 * (asset == "station-8")
    defective = rng.random(n) < p_defect
    kind = np.where(defective, rng.choice(np.arange(1, len(TYPES)), n, p=[0.45, 0.25, 0.15, 0.1, 0.05]), 0)
    sev = np.where(defective, rng.choice([1, 2, 3], n, p=[0.5, 0.35, 0.15]), 0)
    unsure = rng.random(n) < 0.03
    decided = np.where(~defective, "pass", np.where(sev >= 2, "reject", "rework"))
    disposition = np.where(unsure, "hold", decided)
    audit = (disposition == "pass") & (rng.random(n) < 0.02)
    nothing = np.full(n, None, object)
    review = np.where(disposition == "hold", "hold", np.where(audit, "audit", nothing))
    ids = ulids(t_ms, rng)
    pv = [f'{{"temperature": {a:.2f}, "pressure": {b:.3f}, "line_speed": {c:.3f}}}'
          for a, b, c in zip(temperature, pressure, speed, strict=True)]
    acq = pa.array(acquired, pa.timestamp("us", tz="UTC"))
    inference = rng.gamma(9, 0.8, n)
    results = pa.table({
        "result_id": ids, "seq": np.arange(1, n + 1), "acquired_at": acq,
        "decided_at": pa.array(acquired + (inference * 1000).astype("timedelta64[us]"),
                               pa.timestamp("us", tz="UTC")),
        "line_id": pa.array(["line-1"] * n), "asset_id": asset, "camera_view": view,
        "batch": [f"B-{b:05d}" for b in batch_no], "part_id": [f"P{i:08d}" for i in range(n)],
        "process_values": pv, "model_version": np.where(np.arange(n) < n * 0.6, "20261101-080000-aaaaaa",
                                                        "20261120-080000-bbbbbb"),
        "disposition": disposition,
        "rule": np.where(disposition == "hold", "low_confidence", disposition), "review": review,
        "status": pa.array(["ok"] * n), "error": pa.nulls(n, pa.string()),
        "queue_ms": rng.gamma(2, 0.3, n), "inference_ms": inference, "decide_ms": rng.gamma(2, 0.01, n),
        "total_ms": inference + 1.0, "image_ref": np.where(disposition != "pass", ids, nothing),
        "source_ref": pa.array(["genicam:cam0"] * n),
    })
    conf = np.clip(rng.beta(12, 1.5, n), 0.3, 1.0)

    def probs(index: np.ndarray, k: int) -> list[list[float]]:
        base = np.full((n, k), 0.0)
        base[np.arange(n), index] = conf
        base += ((1 - conf) / k)[:, None]
        return np.round(base / base.sum(1, keepdims=True), 4).tolist()

    rows = []
    shadow = np.flatnonzero(np.arange(n) >= n * 0.9)
    for head, index, classes in (("defect_type", kind, TYPES), ("severity", sev, SEVERITIES)):
        labels = np.asarray(classes)[index]
        champion = pa.table({"result_id": ids, "model_version": results["model_version"],
                             "role": pa.array(["champion"] * n), "head": pa.array([head] * n),
                             "label": labels, "confidence": conf, "probs": probs(index, len(classes))})
        rows.append(champion)
        rows.append(champion.take(shadow).set_column(
            1, "model_version", pa.array(["20261125-080000-cccccc"] * shadow.size)).set_column(
            2, "role", pa.array(["shadow"] * shadow.size)))
    return results, pa.concat_tables(rows)


def fill(db: Path, n: int) -> Store:
    results, predictions = synthesize(n)
    con = duckdb.connect(str(db))
    con.execute("SET TimeZone = 'UTC'")
    con.execute(SCHEMA)
    con.register("new_results", results)
    con.register("new_predictions", predictions)
    con.execute("INSERT INTO results BY NAME SELECT * FROM new_results")
    con.execute("INSERT INTO predictions BY NAME SELECT * FROM new_predictions")
    held = con.execute("SELECT result_id FROM results WHERE review IS NOT NULL ORDER BY seq LIMIT 2000"
                       ).fetchall()
    now = datetime.now(UTC)
    con.executemany("INSERT INTO labels (label_id, result_id, head, label, labelled_by, labelled_at) "
                    "VALUES (?, ?, 'defect_type', 'crack', 'olga', ?)",
                    [[f"L{i:06d}", rid, now] for i, (rid,) in enumerate(held)])
    con.execute("CHECKPOINT")
    con.close()
    store = Store(db, db.parent / "journal")
    store.open()
    return store


def add_parts(store: Store, analytics: an.Analytics, count: int) -> None:
    """Append ``count`` copies of the newest results (new ids and seqs) as the ingest thread would."""
    with an.cursor(store) as cur:
        cur.execute(
            "CREATE OR REPLACE TEMP TABLE fresh AS SELECT results.* REPLACE (result_id || '+' || "
            "CAST(seq + top.n AS VARCHAR) AS result_id, seq + top.n AS seq) FROM results, "
            f"(SELECT max(seq) AS n FROM results) top WHERE seq > top.n - {count}")
        cur.execute("INSERT INTO predictions SELECT f.result_id, p.model_version, p.role, p.head, p.label, "
                    "p.confidence, p.probs FROM fresh f JOIN predictions p ON p.result_id = "
                    "split_part(f.result_id, '+', 1) AND p.role = 'champion'")
        cur.execute("INSERT INTO results SELECT * FROM fresh")


def refresh_after_new_parts(store: Store, analytics: an.Analytics, count: int, runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        add_parts(store, analytics, count)
        t = time.perf_counter()
        analytics.refresh(force=True)
        times.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 1), "max_ms": round(max(times), 1), "runs": runs}


def timed(fn: Callable[[], Any], runs: int) -> dict[str, float]:
    fn()  # warm-up: the first query of a kind also loads the columns it reads
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    arr = np.asarray(times)
    return {"p50_ms": round(float(np.percentile(arr, 50)), 1), "max_ms": round(float(arr.max()), 1),
            "runs": runs}


def queries(analytics: an.Analytics, store: Store, last: datetime) -> dict[str, Callable[[], Any]]:
    shifts = an.Shifts(tz="Europe/Berlin")
    everything = an.Filters()
    day = an.Filters(since=last - timedelta(days=1))
    batch = an.Filters(batch="B-00100")
    night = an.Filters(shift="night", asset_id="station-8")

    def export_day(fmt: str) -> Callable[[], int]:
        return lambda: sum(len(chunk) for chunk in analytics.export(day, shifts, fmt))

    return {
        "live (15 min)": lambda: analytics.live(15, now=last),
        "facets (filter choices)": lambda: analytics.facets(shifts),
        "pareto, all": lambda: analytics.pareto(everything, shifts),
        "pareto, last 24 h": lambda: analytics.pareto(day, shifts),
        "pareto, night shift + asset": lambda: analytics.pareto(night, shifts),
        "severity per type, all": lambda: analytics.severity(everything, shifts),
        "trend by camera view, all": lambda: analytics.trend(everything, shifts, "camera_view"),
        "trend by shift, all": lambda: analytics.trend(everything, shifts, "shift"),
        "trend by batch, last 24 h": lambda: analytics.trend(day, shifts, "batch"),
        "breakdown by batch, all": lambda: analytics.breakdown(everything, shifts, "batch"),
        "breakdown by asset, one batch": lambda: analytics.breakdown(batch, shifts, "asset_id"),
        "control chart (p), auto buckets, all": lambda: analytics.control(everything, shifts),
        "control chart (p), 1 h buckets, 24 h": lambda: analytics.control(day, shifts, "1h"),
        "correlation, all": lambda: analytics.correlation(everything, shifts),
        "correlation, night shift + asset": lambda: analytics.correlation(night, shifts),
        "review queue (rank the newest 1,000 waiting)": lambda: review_queue(store, None, 50),
        "export 24 h as CSV (download, not a dashboard query)": export_day("csv"),
        "export 24 h as Parquet (download, not a dashboard query)": export_day("parquet"),
    }


def line(name: str, t: dict[str, float]) -> None:
    print(f"  {name:<56} p50 {t['p50_ms']:>7.1f} ms   max {t['max_ms']:>7.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--db", type=Path, help="keep the filled database here and reuse it next time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        db = args.db or Path(tmp) / "bench.duckdb"
        if db.exists():
            store = Store(db, Path(tmp) / "journal")
            store.open()
        else:
            store = fill(db, args.results)
        fill_s = time.perf_counter() - t
        try:
            with an.cursor(store) as cur:
                row = cur.execute("SELECT max(acquired_at), (SELECT count(*) FROM predictions) FROM results"
                                  ).fetchone()
            assert row is not None
            last, n_predictions = row
            analytics = an.Analytics(store, HEADS)
            t = time.perf_counter()
            analytics.refresh(force=True)
            build_ms = (time.perf_counter() - t) * 1000
            print(f"  {'rollup: first build after a daemon start':<56} once    {build_ms:>7.1f} ms")
            increment = refresh_after_new_parts(store, analytics, 600, args.runs)
            line("rollup: refresh after 600 new parts (1 min at 10/s)", increment)
            report: dict[str, Any] = {}
            for name, fn in queries(analytics, store, last).items():
                report[name] = timed(fn, args.runs)
                line(name, report[name])
            analytics.close()
        finally:
            store.close()
    dashboard = {k: v for k, v in report.items() if "not a dashboard query" not in k}
    worst = max(v["max_ms"] for v in dashboard.values())
    summary = {
        "results": args.results, "predictions": int(n_predictions), "fill_s": round(fill_s, 1),
        "cpus": os.cpu_count(), "machine": platform.machine(), "duckdb": duckdb.__version__,
        "rollup_build_ms": round(build_ms, 1), "rollup_refresh_600_parts": increment,
        "goal_ms": GOAL_MS, "worst_dashboard_query_max_ms": worst, "goal_met": worst <= GOAL_MS,
        "queries": report,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "analytics.json").write_text(json.dumps(summary, indent=2) + "\n")
    verdict = "met" if worst <= GOAL_MS else "MISSED"
    print(f"{args.results:,} results, {n_predictions:,} predictions (filled in {fill_s:.0f} s); worst "
          f"dashboard query {worst:.0f} ms (goal ≤ {GOAL_MS:.0f} ms: {verdict})")


if __name__ == "__main__":
    main()
