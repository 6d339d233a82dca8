"""The line's threads keep the process's CPU priority; queries, ingest and DuckDB's workers yield."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance.daemon import Daemon
from appliance.priority import BACKGROUND_NICE, background_executor
from appliance.store import Store
from tests.conftest import write_grade_images

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")


def nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def tids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


LINE = nice(threading.get_native_id())
BACKGROUND = min(19, LINE + BACKGROUND_NICE)


def test_background_executor_threads_run_lower_and_leave_the_caller_alone() -> None:
    with background_executor(2) as pool:
        assert pool.submit(lambda: nice(threading.get_native_id())).result() == BACKGROUND
    assert nice(threading.get_native_id()) == LINE


def test_store_ingest_and_duckdb_workers_yield_but_the_journal_does_not(tmp_path: Path) -> None:
    before = tids()
    store = Store(tmp_path / "results.duckdb", tmp_path / "journal")
    store.open()
    try:
        python = {t.name: t.native_id for t in threading.enumerate() if t.native_id is not None}
        deadline = time.monotonic() + 5  # the ingest thread lowers itself as it starts
        while nice(python["store-ingest"]) != BACKGROUND and time.monotonic() < deadline:
            time.sleep(0.01)
        assert nice(python["store-ingest"]) == BACKGROUND
        assert nice(python["journal"]) == LINE  # results are published once journaled: line priority
        duckdb_workers = tids() - before - set(python.values())
        assert duckdb_workers, "DuckDB started no threads of its own"
        assert {nice(t) for t in duckdb_workers} == {BACKGROUND}
    finally:
        store.close()


async def test_api_work_yields_to_the_inference_workers(tmp_path: Path, line_config) -> None:
    """asyncio.to_thread (how API handlers query) runs below the line; inference does not."""
    images = tmp_path / "images"
    write_grade_images(images, ["0", "1"])
    daemon = Daemon(line_config(images))
    await daemon.start()
    try:
        api_side = await asyncio.to_thread(lambda: nice(threading.get_native_id()))
        await daemon.wait_for_results(2, timeout=30)
        inference = {nice(t.native_id) for t in threading.enumerate()
                     if t.name.startswith("inference") and t.native_id is not None}
    finally:
        await daemon.stop()
    assert api_side == BACKGROUND
    assert inference == {LINE}
