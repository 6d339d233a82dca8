"""A bounded soak: memory, file descriptors and threads of the daemon stay flat, frames are not dropped.

The daemon runs as a child process on a replay line at 50 parts/s with the shipped retention
(a sample of passes, every defect archived), Modbus TCP polled by a PLC every 20 ms, and
``/metrics`` + ``/health`` scraped every second.  A prelude in the child makes its journal segments
small (256 KiB instead of 32 MiB) so that rotation and release happen every few seconds instead of
every ten minutes, and samples DuckDB's own memory once a second into a file.

Every 2 s the test reads VmRSS, the open file descriptors and the threads of the daemon from
/proc, and the journal folder.  After a warm-up, *stable* means:

* RSS, less the memory DuckDB accounts for itself (``duckdb_memory()``, sampled inside the child by
  the same prelude), grows less than ``RSS_GROWTH_MB`` from the first to the last quarter of the run
  (averages of each quarter, so one checkpoint or garbage-collection swing does not decide it).
  DuckDB's own share is a cache of table blocks that grows with the stored data up to its
  ``memory_limit``; :func:`test_the_result_store_caps_its_database_memory` checks that limit;
* open file descriptors never exceed the warm-up value by more than 5, threads by more than 2;
* at most 1 % of the frames after the warm-up are dropped;
* the journal never holds more than 3 segments, and it did rotate (segments were released).

CI: 40 s (10 s warm-up); RELIABILITY_SCALE=full: 30 min (2 min warm-up).
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.brightness_model import GRADES
from tests.conftest import free_port, write_grade_images
from tests.reliability.conftest import (
    HOST,
    DaemonProcess,
    ModbusPoller,
    config_file,
    fd_count,
    record,
    rss_mb,
    sized,
    thread_count,
)

SOAK_S = sized(40, 1800)
WARMUP_S = sized(10, 120)
SAMPLE_S = 2.0
RSS_GROWTH_MB = sized(8.0, 16.0)
SEGMENT_BYTES = 256 * 1024
PRELUDE = """
import os, threading, time
import appliance.journal as journal
import appliance.store as store
journal.Journal.__init__.__defaults__ = ({segment},)  # rotate every few seconds, not every ten minutes
_open = store.Store.open

def _open_and_sample(self):  # instrumentation: DuckDB's own memory, once a second, into a file
    _open(self)

    def sample():
        while self._con is not None:
            try:
                cur = self._cursor()
                try:
                    used = cur.execute("SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory()").fetchone()[0]
                finally:
                    cur.close()
                with open({path!r} + ".tmp", "w") as fh:
                    fh.write(str(used))
                os.replace({path!r} + ".tmp", {path!r})
            except Exception:
                return
            time.sleep(1.0)

    threading.Thread(target=sample, name="test-duckdb-memory", daemon=True).start()

store.Store.open = _open_and_sample
"""

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(SOAK_S + 300)]


def _scraper(port: int, stop: threading.Event, counts: dict[str, int]) -> None:
    """Prometheus and a dashboard: /metrics and /health once a second."""
    with httpx.Client(base_url=f"http://{HOST}:{port}/api/v1", timeout=10) as api:
        while not stop.wait(1.0):
            for path in ("/metrics", "/health"):
                try:
                    api.get(path).raise_for_status()
                    counts["ok"] += 1
                except httpx.HTTPError:
                    counts["failed"] += 1


def test_soak_memory_fds_and_journal_stay_flat(tmp_path: Path, line_config, state_dir: Path,
                                               daemon_process: list[DaemonProcess]) -> None:
    images = tmp_path / "images"
    write_grade_images(images, [GRADES[i % len(GRADES)] for i in range(50)])
    api_port, modbus_port = free_port(), free_port()
    cfg = line_config(images, api={"host": HOST, "port": api_port},
                      camera={"view": "top", "source": "replay", "queue_size": 32,
                              "replay": {"path": str(images), "rate_hz": 50, "loop": True}},
                      store={"retention": {"pass": 0.05, "min_free_mb": 0}},
                      modbus={"enabled": True, "host": HOST, "port": modbus_port})
    (tmp_path / "logs").mkdir()
    duckdb_file = tmp_path / "duckdb-memory"
    daemon = DaemonProcess(config_file(tmp_path / "run.yaml", cfg), api_port, tmp_path / "logs",
                           prelude=PRELUDE.format(segment=SEGMENT_BYTES, path=str(duckdb_file)))
    daemon_process.append(daemon)
    daemon.spawn()
    daemon.wait_running(timeout=120)
    plc = ModbusPoller(modbus_port, period_s=0.02)
    plc.start()
    scraped = {"ok": 0, "failed": 0}
    stop = threading.Event()
    scraper = threading.Thread(target=_scraper, args=(api_port, stop, scraped), daemon=True)
    scraper.start()
    journal = state_dir / "journal"
    samples: list[dict[str, float]] = []
    segment_ids: set[str] = set()
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < SOAK_S:
            health = daemon.health(timeout=10)
            segments = list(journal.glob("journal-*.jsonl"))
            segment_ids.update(p.name for p in segments)
            duckdb_mb = int(duckdb_file.read_text()) / 2**20 if duckdb_file.exists() else 0.0
            samples.append({"t": elapsed, "rss": rss_mb(daemon.pid), "duckdb": duckdb_mb, "fds": fd_count(daemon.pid),
                            "threads": thread_count(daemon.pid), "frames": health["frames"],
                            "dropped": health["dropped"], "judged": health["judged"],
                            "segments": len(segments), "journal_kb": sum(p.stat().st_size for p in segments) / 1024})
            time.sleep(SAMPLE_S)
    finally:
        stop.set()
        plc.stop()
        scraper.join(10)
    code = daemon.terminate()

    after = [s for s in samples if s["t"] >= WARMUP_S]
    base = after[0]
    quarter = max(1, len(after) // 4)
    rss_first, rss_last = (statistics.mean(s["rss"] for s in part) for part in (after[:quarter], after[-quarter:]))
    db_first, db_last = (statistics.mean(s["duckdb"] for s in part) for part in (after[:quarter], after[-quarter:]))
    outside_growth = (rss_last - db_last) - (rss_first - db_first)
    frames = after[-1]["frames"] - base["frames"]
    dropped = after[-1]["dropped"] - base["dropped"]
    minutes = (after[-1]["t"] - base["t"]) / 60
    figures = record(
        "soak", seconds=round(samples[-1]["t"]), warmup_s=WARMUP_S, samples=len(samples),
        judged=samples[-1]["judged"], frames_after_warmup=frames, dropped_after_warmup=dropped,
        rate_parts_s=round(frames / (minutes * 60), 1) if minutes else None,
        rss_start_mb=round(samples[0]["rss"], 1), rss_warm_mb=round(base["rss"], 1),
        rss_first_quarter_mb=round(rss_first, 1), rss_last_quarter_mb=round(rss_last, 1),
        rss_growth_mb=round(rss_last - rss_first, 1), rss_max_mb=round(max(s["rss"] for s in after), 1),
        duckdb_first_quarter_mb=round(db_first, 1), duckdb_last_quarter_mb=round(db_last, 1),
        rss_growth_outside_duckdb_mb=round(outside_growth, 1),
        rss_series_mb=[round(s["rss"], 1) for s in samples[:: max(1, len(samples) // 30)]],
        duckdb_series_mb=[round(s["duckdb"], 1) for s in samples[:: max(1, len(samples) // 30)]],
        fds_warm=base["fds"], fds_max=max(s["fds"] for s in after), threads_warm=base["threads"],
        threads_max=max(s["threads"] for s in after), journal_segments_max=max(s["segments"] for s in samples),
        journal_segments_seen=len(segment_ids), journal_kb_max=round(max(s["journal_kb"] for s in samples)),
        plc_polls=plc.polls, plc_errors=plc.errors, scrapes=scraped)
    assert code == 0, daemon.output()[-3000:]
    assert outside_growth < RSS_GROWTH_MB, f"memory grew outside the result database's cache: {figures}"
    assert figures["fds_max"] - base["fds"] <= 5, f"file descriptors grew: {figures}"
    assert figures["threads_max"] - base["threads"] <= 2, f"threads grew: {figures}"
    assert dropped <= 0.01 * frames and frames >= 40 * 60 * minutes, f"frames dropped or too slow: {figures}"
    assert figures["journal_segments_max"] <= 3 and len(segment_ids) >= 3, f"journal not released: {figures}"
    assert plc.errors == 0 and scraped["failed"] == 0, figures
    assert not list(journal.glob("journal-*.jsonl")), "a clean stop leaves no journal behind"


def test_the_result_store_caps_its_database_memory(tmp_path: Path) -> None:
    """DuckDB keeps table blocks cached up to its ``memory_limit`` — 80 % of the host's RAM unless set.

    The 30-minute soak (90,000 results) grew the daemon by 24 MB, most of it DuckDB's cache of the
    results table (BASE_TABLE / IN_MEMORY_TABLE in ``duckdb_memory()``; the Python heap stayed flat
    at 40 MB): on an edge PC that runs for months it would keep growing towards 80 % of the RAM it
    shares with the dashboard and the retraining job.  Expected: a limit set by the appliance
    (a config value), independent of the host; 1 GiB is the generous bound checked here.
    """
    import re

    from appliance.store import Store

    store = Store(tmp_path / "results.duckdb", tmp_path / "journal")
    store.open()
    try:
        cur = store._cursor()
        try:
            limit = str(cur.execute("SELECT current_setting('memory_limit')").fetchone()[0])
        finally:
            cur.close()
    finally:
        store.close()
    number, unit = re.fullmatch(r"([\d.]+) ?([KMGT]?i?B)", limit).groups()  # type: ignore[union-attr]
    size = float(number) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
                            "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]
    record("store_memory_limit", duckdb_memory_limit=limit)
    assert size <= 2**30, f"DuckDB may cache up to {limit} (80 % of this host's RAM): nothing bounds the daemon"
