"""The store: durable before publish, exactly once after a crash, queries and filters."""

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from appliance.result import HeadResult, PartResult, new_result_id
from appliance.store import ResultFilter, Store


def result(i: int, disposition: str = "pass", batch: str = "B1") -> PartResult:
    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC) + timedelta(seconds=i)
    return PartResult(
        result_id=new_result_id(), acquired_at=now, decided_at=now + timedelta(milliseconds=8),
        line_id="L", asset_id="A", camera_view="top", batch=batch, part_id=f"P{i}", model_version="m1",
        disposition=disposition, rule="r", status="ok", source_ref=f"/img/{i}.png",
        process_values={"temp_c": 20.0 + i},
        predictions=[HeadResult("grade", "0", 0.9, [0.9, 0.1]), HeadResult("type", "mono", 0.8, [0.8, 0.2])],
        latency={"queue_ms": 0.1, "inference_ms": 7.0, "decide_ms": 0.01, "total_ms": 8.0},
    )


def make_store(tmp_path: Path) -> Store:
    return Store(tmp_path / "r.duckdb", tmp_path / "journal", ingest_interval_s=0.05)


def die(store: Store) -> None:
    """What kill -9 leaves: the journal on disk, no final ingest, no clean close."""
    store._stop.set()
    assert store._thread is not None
    store._thread.join()
    store.journal.close()
    store._con.close()  # type: ignore[union-attr]


async def test_append_query_roundtrip(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.open()
    for i in range(10):
        await store.append(result(i, "reject" if i % 3 == 0 else "pass", batch="B2" if i >= 5 else "B1"))
    store.flush()
    assert [r["seq"] for r in store.query(ResultFilter(limit=3))] == [10, 9, 8]
    rejects = store.query(ResultFilter(disposition="reject"))
    assert {r["part_id"] for r in rejects} == {"P0", "P3", "P6", "P9"}
    assert len(store.query(ResultFilter(batch="B2", disposition="pass"))) == 3
    row = store.get(rejects[0]["result_id"])
    assert row is not None
    assert row["process_values"] == {"temp_c": 29.0}
    assert [p["head"] for p in sorted(row["predictions"], key=lambda p: p["head"])] == ["grade", "type"]
    since = datetime(2026, 11, 23, 12, 0, 7, tzinfo=UTC)
    assert {r["part_id"] for r in store.query(ResultFilter(since=since))} == {"P7", "P8", "P9"}
    assert store.counts() == {"total": 10, "by_disposition": {"pass": 6, "reject": 4}}
    store.close()
    assert not list((tmp_path / "journal").glob("*.jsonl")), "a clean close leaves no journal behind"


async def test_crash_before_ingest_is_recovered_exactly_once(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.ingest_interval_s = 3600  # nothing reaches DuckDB before the "crash"
    store.open()
    ids = []
    for i in range(5):
        r = result(i)
        await store.append(r)
        ids.append(r.result_id)
    store.flush()  # the first five reach DuckDB ...
    for i in range(5, 8):
        r = result(i)
        await store.append(r)  # ... these three are only journaled when the process dies
        ids.append(r.result_id)
    die(store)

    again = make_store(tmp_path)
    again.open()
    assert again.recovered == 3
    assert again.next_seq == 9
    rows = again.query(ResultFilter(limit=100))
    assert sorted(r["result_id"] for r in rows) == sorted(ids)
    assert sorted(r["seq"] for r in rows) == list(range(1, 9))
    again.close()


async def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.open()
    await store.append(result(1))
    die(store)
    segment = sorted((tmp_path / "journal").glob("*.jsonl"))[-1]
    with segment.open("ab") as fh:
        fh.write(b'{"result_id": "torn')  # power loss mid-write: never acknowledged
    again = make_store(tmp_path)
    again.open()
    assert [r["part_id"] for r in again.query(ResultFilter())] == ["P1"]
    again.close()


async def test_group_commit_acknowledges_concurrent_appends(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.open()
    await asyncio.gather(*(store.append(result(i)) for i in range(50)))
    store.flush()
    assert store.counts()["total"] == 50
    store.close()


def test_duckdb_memory_threads_and_spill_are_bounded(tmp_path: Path) -> None:
    """store.duckdb_memory_limit_mb / duckdb_threads / duckdb_max_spill_mb reach the result database
    and the dashboard's in-memory rollup (DuckDB's defaults: 80 % of the host's RAM, every core, 90 %
    of the free disk)."""
    from appliance.analytics import Analytics, Heads

    store = Store(tmp_path / "r.duckdb", tmp_path / "journal", memory_limit_mb=96, threads=1, max_spill_mb=300)
    store.open()
    analytics = Analytics(store, Heads(None, None))
    try:
        settings = ("SELECT current_setting('memory_limit'), current_setting('threads'), "
                    "current_setting('max_temp_directory_size')")
        with store.cursor() as cur:
            assert cur.execute(settings).fetchone() == ("96.0 MiB", 1, "300.0 MiB")
        assert analytics._mem.execute(settings).fetchone() == ("96.0 MiB", 1, "300.0 MiB")
        temp = analytics._mem.execute("SELECT current_setting('temp_directory')").fetchone()
        assert temp == (str(tmp_path / "r.duckdb.rollup.tmp"),), "spills next to the store, not into the cwd"
    finally:
        analytics.close()
        store.close()


async def test_the_json_page_equals_the_records_page(tmp_path: Path) -> None:
    """GET /results renders its page in DuckDB (Store.query_json): it must say exactly what the
    records from Store.query say through the API's model, for every kind of result and filter."""
    import json

    from appliance.api.routes_results import ResultPage

    store = make_store(tmp_path)
    store.open()
    try:
        for i in range(30):
            part = result(i, ("pass", "reject", "hold")[i % 3], batch="B2" if i >= 20 else "B1")
            part.acquired_at = part.acquired_at.replace(microsecond=(0, 250_000, 7)[i % 3])  # with and without
            if i % 5 == 0:
                part.shadow_version = "m2"
                part.shadow_predictions = [HeadResult("grade", "1", 0.6, [0.4, 0.6])]
            if i % 7 == 0:  # an image that failed: no predictions, an error, no process values
                part.status, part.error, part.predictions, part.process_values = "failed", "corrupt PNG", [], {}
            part.latency = {} if i == 4 else part.latency
            await store.append(part)
        store.flush()

        def page(f: ResultFilter) -> dict:
            rows = store.query(f)
            return json.loads(ResultPage.model_validate({"count": len(rows), "results": rows}).model_dump_json())

        for f in (ResultFilter(limit=100), ResultFilter(limit=7, offset=3), ResultFilter(batch="B2"),
                  ResultFilter(disposition="hold", status="failed"), ResultFilter(part_id="nobody")):
            expected, rendered = page(f), json.loads(store.query_json(f))
            for r in expected["results"] + rendered["results"]:
                for key in ("predictions", "shadow_predictions"):
                    r[key].sort(key=lambda p: p["head"])
            assert rendered == expected, f
        assert json.loads(store.query_json(ResultFilter(limit=100)))["count"] == 30
    finally:
        store.close()
