"""The analytics API the dashboard's Root cause page is built on: figures, roles, errors, export."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

import duckdb
import httpx
import pyarrow.parquet as pq
import pytest

from appliance import analytics as an
from tests.dashboard.line import BRIGHTNESS, Line

DEFECTIVE = sum(1 for b in BRIGHTNESS if b in (96, 160, 224))
DECIDED = sum(1 for b in BRIGHTNESS if b not in (64, 128, 192))


def test_figures_match_the_line(line: Line) -> None:
    with line.api("operator") as api:
        live = api.get("/analytics/live").json()
        pareto = api.get("/analytics/pareto").json()
        severity = api.get("/analytics/severity").json()
        batches = api.get("/analytics/breakdown", params={"by": "batch"}).json()
        control = api.get("/analytics/control", params={"min_parts": 5}).json()
        corr = api.get("/analytics/correlation").json()
        facets = api.get("/analytics/facets").json()
    assert live["parts"] == len(BRIGHTNESS) and live["holds_waiting"] == len(BRIGHTNESS) - DECIDED
    assert live["defect_rate"] == pytest.approx(DEFECTIVE / DECIDED, abs=1e-6)
    assert pareto["defective"] == DEFECTIVE and pareto["items"][-1]["cumulative"] == 1.0
    assert sum(c["n"] for c in severity["cells"]) == DEFECTIVE
    assert severity["severity_classes"] == ["0", "1/3", "2/3", "1"]
    assert {g["group"] for g in batches["groups"]} == {"B-001", "B-002"}
    assert sum(g["n"] for g in batches["groups"]) == DECIDED
    assert control["centre"] == pytest.approx(DEFECTIVE / DECIDED, abs=1e-6)
    assert control["alarm"]["active"] is False
    assert corr["variables"][0]["name"] == "oven_temp_c" and corr["variables"][0]["r"] > 0.9
    assert facets["process_values"] == ["line_speed_m_min", "oven_temp_c"]
    assert facets["type_head"] == "cell_type" and facets["severity_head"] == "defect_grade"


def test_roles_and_bad_requests(line: Line) -> None:
    with line.api("operator") as api:
        unauthenticated = api.get("/analytics/pareto", headers={"Authorization": ""})
        export = api.get("/analytics/export")
        bad_by = api.get("/analytics/trend", params={"by": "colour"})
        bad_shift = api.get("/analytics/pareto", params={"shifts": "a=06:00,b=05:00"})
        bad_tz = api.get("/analytics/pareto", params={"tz": "Mars/Olympus"})
        unknown_shift = api.get("/analytics/pareto", params={"shift": "weekend"})
        naive = api.get("/analytics/pareto", params={"since": "2026-01-01T00:00:00"})
        backwards = api.get("/analytics/pareto", params={"since": "2026-01-02T00:00:00Z",
                                                         "until": "2026-01-01T00:00:00Z"})
    assert unauthenticated.status_code == 401
    assert export.status_code == 403
    assert bad_by.status_code == 422
    assert bad_shift.status_code == 422 and "ascending" in bad_shift.text
    assert bad_tz.status_code == 422 and "time zone" in bad_tz.text
    assert unknown_shift.status_code == 422 and "early, late, night" in unknown_shift.text
    assert naive.status_code == 422 and "time zone" in naive.text
    assert backwards.status_code == 422


def test_export_csv_and_parquet(line: Line) -> None:
    with line.api("engineer") as api:
        as_csv = api.get("/analytics/export", params={"format": "csv", "batch": "B-002"})
        as_parquet = api.get("/analytics/export", params={"format": "parquet"})
        audit = api.get("/audit").json()["entries"]
    assert as_csv.status_code == 200 and "attachment" in as_csv.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert len(rows) == len(BRIGHTNESS) - 16 and {r["batch"] for r in rows} == {"B-002"}
    assert {"defect_type", "severity", "shift", "process_values"} <= set(rows[0])
    table = pq.read_table(io.BytesIO(as_parquet.content))
    assert table.num_rows == len(BRIGHTNESS)
    assert table.column("seq").to_pylist() == sorted(table.column("seq").to_pylist())
    assert any(e["action"] == "analytics.export" and e["user"] == "erik" for e in audit)


def test_shift_sql_agrees_with_python_across_daylight_saving() -> None:
    """The integer-minute shift test (no per-row time-zone conversion) is exact across a DST change."""
    shifts = an.Shifts.parse("early=06:00,late=14:00,night=22:00", "Europe/Berlin")
    lo = int(datetime(2026, 3, 28, 0, 0, tzinfo=UTC).timestamp() // 60)  # DST starts 2026-03-29
    hi = lo + 3 * 1440
    con = duckdb.connect()
    rows = con.execute(f"SELECT m, {shifts.name_sql('m', lo, hi)}, {shifts.filter_sql('night', 'm', lo, hi)} "
                       f"FROM range({lo}, {hi}, 7) t(m)").fetchall()
    for m, name, night in rows:
        expected = shifts.name_of(datetime.fromtimestamp(m * 60, UTC))
        assert name == expected, (m, name, expected)
        assert night == (expected == "night")


def test_control_chart_raises_the_alarm() -> None:
    """A subgroup far above the centre line is out of control; the alarm names it."""
    points = [{"t": datetime(2026, 1, 1, h, tzinfo=UTC), "n": 100, "defects": 2, "rate": 0.02} for h in range(10)]
    points.append({"t": datetime(2026, 1, 1, 10, tzinfo=UTC), "n": 100, "defects": 30, "rate": 0.3})

    class Fake(an.Analytics):
        def __init__(self) -> None:
            pass

        def trend(self, *args: object, **kwargs: object) -> dict:  # type: ignore[override]
            return {"bucket": "1h", "points": points}

    chart = Fake().control(an.Filters(), an.Shifts(tz="UTC"))
    assert chart["alarm"]["active"] is True and chart["points"][-1]["out"] is True
    assert "above the upper control limit" in chart["alarm"]["reason"]
    assert not any(p["out"] for p in chart["points"][:-1])


def test_export_neutralises_spreadsheet_formulas(line: Line) -> None:
    """A part id a spreadsheet would run (stored before the wire refused such text) is exported as text."""
    formulas = ['=HYPERLINK("http://x","y")', "@SUM(A1)"]
    with line.api("engineer") as api:
        ids = [r["result_id"] for r in api.get("/results", params={"limit": 2}).json()["results"]]
        before = [line.rewrite(rid, part_id=formula) for rid, formula in zip(ids, formulas, strict=True)]
        try:
            as_csv = api.get("/analytics/export", params={"format": "csv"})
            as_parquet = api.get("/analytics/export", params={"format": "parquet"})
        finally:
            for rid, old in zip(ids, before, strict=True):
                line.rewrite(rid, **old)
    rows = {r["result_id"]: r for r in csv.DictReader(io.StringIO(as_csv.text, newline=""))}
    assert [rows[rid]["part_id"] for rid in ids] == ["'" + f for f in formulas]
    assert float(rows[ids[0]]["total_ms"]) > 0 and not rows[ids[0]]["seq"].startswith("'"), "numbers stay numbers"
    table = pq.read_table(io.BytesIO(as_parquet.content))
    stored = dict(zip(table.column("result_id").to_pylist(), table.column("part_id").to_pylist(), strict=True))
    assert [stored[rid] for rid in ids] == formulas, "Parquet is data, not a spreadsheet: values as stored"


def test_api_answers_with_security_headers(line: Line) -> None:
    with line.api("operator") as api:
        answers = [api.get("/health"), api.get("/results", params={"limit": 1}), api.get("/nowhere")]
        docs = httpx.get(f"{line.url}/docs")
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff", answer.url
        assert answer.headers["cache-control"] == "no-store", answer.url
        assert answer.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert answer.headers["x-frame-options"] == "DENY"
    assert docs.status_code == 200 and docs.headers["content-security-policy"] == "frame-ancestors 'none'"
