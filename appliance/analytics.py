"""Root-cause analytics over the stored results, computed inside the daemon.

The dashboard never opens the database: the API calls :class:`Analytics`, which reads the daemon's
DuckDB through store cursors in worker threads.  Scanning 10^6 raw results (and joining their
predictions) for every chart costs 0.3–2.5 s on a 2-core edge PC, so the aggregate charts read a
**per-minute rollup** instead: one row per (minute, line, asset, camera view, batch, model version,
disposition, defect type, severity) with a part count, kept in a private in-memory DuckDB and
brought up to date incrementally (only results with a higher ``seq``) at most once per
``refresh_s`` before a query.  The first query after a daemon start builds it (≈2 s at 10^6
results).  Correlation with process values and the export read the raw results.
``bench/analytics.py`` times every query at 10^6 results.

Definitions (also in docs/dashboard.md):

* a part is **decided** when its disposition is pass, rework or reject (a hold is undecided);
* a part is **defective** when its disposition is rework or reject; the **defect rate** is
  defective / decided;
* the **defect type** and **severity** are the champion's classes of the type and severity heads
  (:func:`heads_for`);
* the **shift** of a part comes from its local acquisition time: by default three shifts starting
  06:00 ("early"), 14:00 ("late") and 22:00 ("night") in the daemon's time zone (:class:`Shifts`);
* time filters and buckets resolve to whole minutes.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from appliance.spreadsheet import neutralise_formulas

if TYPE_CHECKING:
    from appliance.config import AppConfig
    from appliance.model_package import ModelCard
    from appliance.store import Store

DEFECTIVE = ("rework", "reject")
DECIDED = ("pass", "rework", "reject")
DISPOSITIONS = ("pass", "rework", "reject", "hold")
DIMENSIONS: tuple[str, ...] = ("line_id", "asset_id", "camera_view", "batch", "shift", "model_version")
BUCKETS: dict[str, int] = {"1m": 1, "5m": 5, "15m": 15, "1h": 60, "8h": 480, "1d": 1440}
"""Bucket name → minutes.  8 h buckets start at the first shift start, 1 d at local midnight."""
MAX_POINTS = 120
"""An automatic bucket keeps a chart at or below this many points."""
MAX_GROUPS = 8
"""Trend series beyond this many groups are merged into 'other' (a chart, not a table)."""
CORRELATION_SAMPLE = 50_000
"""Correlation reads at most about this many decided parts, evenly spread over the selection (every
k-th by seq): parsing JSON costs ≈1 µs per value, and 50,000 parts give a coefficient ±0.005."""
SIGMA = 3.0
MINUTE_US = 60_000_000


def cursor(store: Store) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
    """A cursor on the daemon's database, closed afterwards; call from a worker thread."""
    return store.cursor()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _in(values: Sequence[str]) -> str:
    return "(" + ", ".join(_quote(v) for v in values) + ")"


def _rate(defects: int, n: int) -> float | None:
    return round(defects / n, 6) if n else None


def _minute(dt: datetime) -> int:
    """Minutes since the epoch (the rollup's time axis)."""
    return int(dt.timestamp() // 60)


def _at(minute: int) -> datetime:
    return datetime.fromtimestamp(minute * 60, UTC)


# -- what is a type, a severity, a shift ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Heads:
    """Which model heads carry the defect type and the severity, with their class order."""

    type_head: str | None
    severity_head: str | None
    type_classes: tuple[str, ...] = ()
    severity_classes: tuple[str, ...] = ()


def heads_for(config: AppConfig, card: ModelCard | None) -> Heads:
    """``plc.type_head``/``plc.severity_head`` when set; otherwise the first ordinal head is the
    severity and the first other disposition head (then model head) is the type."""
    names = [h.name for h in card.heads] if card else []
    ordinal = [h.name for h in card.heads if h.ordinal] if card else []
    severity = config.plc.severity_head or (ordinal[0] if ordinal else None)
    candidates = [*(config.disposition.heads or []), *names]
    type_head = config.plc.type_head or next((h for h in candidates if h != severity), severity)
    classes = {h.name: tuple(h.classes) for h in card.heads} if card else {}
    return Heads(type_head, severity, classes.get(type_head or "", ()), classes.get(severity or "", ()))


def local_timezone() -> str:
    """The IANA name of this machine's time zone (``TZ``, then /etc/localtime), else UTC."""
    name = os.environ.get("TZ", "").lstrip(":")
    if not name:
        with contextlib.suppress(OSError):
            target = str(Path("/etc/localtime").resolve())
            if "zoneinfo/" in target:
                name = target.split("zoneinfo/", 1)[1]
    if name:
        with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
            ZoneInfo(name)
            return name
    return "UTC"


def _offset(zone: ZoneInfo, minute: int) -> int:
    delta = _at(minute).astimezone(zone).utcoffset()
    return int(delta.total_seconds() // 60) if delta else 0


@dataclass(frozen=True, slots=True)
class Shifts:
    """Shift start times (minutes after local midnight, ascending) and names, in time zone ``tz``."""

    starts: tuple[int, ...] = (6 * 60, 14 * 60, 22 * 60)
    names: tuple[str, ...] = ("early", "late", "night")
    tz: str = field(default_factory=local_timezone)

    @classmethod
    def parse(cls, spec: str | None, tz: str | None) -> Shifts:
        """``"early=06:00,late=14:00,night=22:00"`` (names optional); ValueError says what is wrong."""
        zone = tz or local_timezone()
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone '{zone}' (expected an IANA name, e.g. Europe/Berlin)"
                             ) from exc
        if not spec:
            return cls(tz=zone)
        starts, names = [], []
        for i, part in enumerate(p.strip() for p in spec.split(",")):
            name, _, clock = part.rpartition("=")
            hh, _, mm = clock.partition(":")
            if not (hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60):
                raise ValueError(f"shift '{part}': expected [name=]HH:MM, e.g. early=06:00")
            starts.append(int(hh) * 60 + int(mm))
            names.append(name.strip() or f"shift {i + 1}")
        if starts != sorted(set(starts)):
            raise ValueError("shift start times must be distinct and in ascending order")
        return cls(tuple(starts), tuple(names), zone)

    def local(self, minute: str, lo: int, hi: int) -> str:
        """SQL: the local minute count (epoch minutes + UTC offset) of the epoch-minute expression
        ``minute``, exact for the daylight-saving changes between minutes ``lo`` and ``hi``.

        Integer arithmetic instead of a per-row time-zone conversion: 10x cheaper on 10^6 rows.
        """
        segments = _offset_segments(ZoneInfo(self.tz), lo, hi)
        if len(segments) == 1:
            return f"({minute} + {segments[0][1]})"
        cases = " ".join(f"WHEN {minute} < {start} THEN {off}"
                         for (_, off), (start, _) in itertools.pairwise(segments))
        return f"({minute} + CASE {cases} ELSE {segments[-1][1]} END)"

    def name_sql(self, minute: str, lo: int, hi: int) -> str:
        """SQL: the shift name of epoch-minute expression ``minute``; the last shift runs past midnight."""
        if len(self.starts) == 1:
            return _quote(self.names[0])
        of_day = f"({self.local(minute, lo, hi)} % 1440)"
        last = len(self.starts) - 1
        cases = [f"WHEN {of_day} >= {self.starts[last]} OR {of_day} < {self.starts[0]} "
                 f"THEN {_quote(self.names[last])}"]
        cases += [f"WHEN {of_day} >= {self.starts[i]} THEN {_quote(self.names[i])}"
                  for i in range(last - 1, 0, -1)]
        return f"CASE {' '.join(cases)} ELSE {_quote(self.names[0])} END"

    def filter_sql(self, name: str, minute: str, lo: int, hi: int) -> str:
        """SQL: true when epoch-minute ``minute`` lies in shift ``name`` (a range test, no CASE)."""
        if name not in self.names:
            raise ValueError(f"shift '{name}': expected one of {', '.join(self.names)}")
        if len(self.starts) == 1:
            return "true"
        i = self.names.index(name)
        begin, end = self.starts[i], self.starts[(i + 1) % len(self.starts)]
        of_day = f"({self.local(minute, lo, hi)} % 1440)"
        joint = "AND" if begin < end else "OR"  # the last shift runs past midnight
        return f"({of_day} >= {begin} {joint} {of_day} < {end})"

    def name_of(self, when: datetime) -> str:
        local = when.astimezone(ZoneInfo(self.tz))
        of_day = local.hour * 60 + local.minute
        index = max((i for i, s in enumerate(self.starts) if of_day >= s), default=len(self.starts) - 1)
        return self.names[index]


def _offset_segments(zone: ZoneInfo, lo: int, hi: int) -> list[tuple[int, int]]:
    """[(first minute, UTC offset in minutes)] covering lo..hi: one entry per daylight-saving change."""
    segments = [(lo, _offset(zone, lo))]
    step = 1440
    t = lo
    while t < hi:
        nxt = min(t + step, hi)
        if _offset(zone, nxt) != segments[-1][1]:
            a, b = t, nxt  # the change lies in (a, b]: bisect to the minute
            while b - a > 1:
                mid = (a + b) // 2
                a, b = (mid, b) if _offset(zone, mid) == segments[-1][1] else (a, mid)
            segments.append((b, _offset(zone, b)))
        t = nxt
    return segments


# -- filters -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Filters:
    """What the supervisor narrowed the view to; None means no restriction."""

    since: datetime | None = None
    until: datetime | None = None
    line_id: str | None = None
    asset_id: str | None = None
    camera_view: str | None = None
    batch: str | None = None
    shift: str | None = None
    model_version: str | None = None

    def where(self, minute: str, shifts: Shifts, span: tuple[int, int], alias: str,
              extra: Sequence[str] = ()) -> tuple[str, dict[str, Any]]:
        """``WHERE …`` and its parameters over table ``alias`` whose epoch minute is ``minute``."""
        clauses, params = list(extra), {}
        for column in ("line_id", "asset_id", "camera_view", "batch", "model_version"):
            value = getattr(self, column)
            if value is not None:
                clauses.append(f"{alias}.{column} = ${column}")
                params[column] = value
        if self.since is not None:
            clauses.append(f"{minute} >= $since_m")
            params["since_m"] = _minute(self.since)
        if self.until is not None:
            clauses.append(f"{minute} < $until_m")
            params["until_m"] = _minute(self.until)
        if self.shift is not None:
            clauses.append(shifts.filter_sql(self.shift, minute, *span))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


RAW_MINUTE = f"(epoch_us(r.acquired_at) // {MINUTE_US})"

ROLLUP_SCHEMA = """
CREATE TABLE rollup (
    m BIGINT NOT NULL, line_id VARCHAR, asset_id VARCHAR, camera_view VARCHAR, batch VARCHAR,
    model_version VARCHAR, disposition VARCHAR, type VARCHAR, severity VARCHAR, n BIGINT NOT NULL
)"""
_DECIDED_F = f"f.disposition IN {_in(DECIDED)}"
_DEFECTIVE_F = f"f.disposition IN {_in(DEFECTIVE)}"
_COUNTS = (f"coalesce(sum(f.n) FILTER (WHERE {_DECIDED_F}), 0) AS n, "
           f"coalesce(sum(f.n) FILTER (WHERE {_DEFECTIVE_F}), 0) AS defects")


class Analytics:
    """The dashboard's queries: aggregates from the rollup, the rest from the store's raw results."""

    def __init__(self, store: Store, heads: Heads, refresh_s: float = 1.0) -> None:
        self.store = store
        self.heads = heads
        self.refresh_s = refresh_s
        # bounded like the store's database; spills (if ever) next to it, not into the working folder
        self._mem = store.connect_duckdb(":memory:", store.db_path.with_name(store.db_path.name + ".rollup.tmp"))
        self._mem.execute("SET TimeZone = 'UTC'")
        self._mem.execute(ROLLUP_SCHEMA)
        self._lock = threading.Lock()
        self._last_seq = 0
        self._refreshed_at = -math.inf
        self.build_s: float | None = None
        """Seconds the first (full) build took."""

    def close(self) -> None:
        self._mem.close()

    # -- the rollup ------------------------------------------------------------------------------
    def set_heads(self, heads: Heads) -> None:
        """A model with other type/severity heads now serves: rebuild the rollup on next use."""
        with self._lock:
            if heads != self.heads:
                self.heads = heads
                self._mem.execute("DELETE FROM rollup")
                self._last_seq, self._refreshed_at = 0, -math.inf

    def refresh(self, force: bool = False) -> None:
        """Add the results stored since the last refresh (at most once per ``refresh_s``)."""
        with self._lock:
            if not force and time.monotonic() - self._refreshed_at < self.refresh_s:
                return
            started = time.perf_counter()
            with cursor(self.store) as cur:
                (top_seq,), = cur.execute("SELECT max(seq) FROM results").fetchall()
                top = int(top_seq or 0)
                if top > self._last_seq:
                    new = self._increment(cur, self._last_seq, top)
                    self._mem.register("increment", new)
                    try:
                        self._mem.execute("INSERT INTO rollup SELECT * FROM increment")
                    finally:
                        self._mem.unregister("increment")
            if self._last_seq == 0 and self.build_s is None:
                self.build_s = round(time.perf_counter() - started, 3)
            self._last_seq = max(self._last_seq, top)
            self._refreshed_at = time.monotonic()

    def _increment(self, cur: duckdb.DuckDBPyConnection, after: int, upto: int) -> pa.Table:
        # predictions are found by result id range: ULIDs sort by time, so zone maps skip the
        # old row groups instead of hashing 2x10^6 prediction rows for a few new results
        def head(alias: str, name: str | None) -> str:
            if name is None:
                return f"(SELECT NULL::VARCHAR AS result_id, NULL::VARCHAR AS label) {alias}"
            return (f"(SELECT result_id, label FROM predictions WHERE role = 'champion' AND head = "
                    f"{_quote(name)} AND result_id >= (SELECT min(result_id) FROM new)) {alias}")

        sql = (
            "WITH new AS (SELECT * FROM results WHERE seq > $after AND seq <= $upto) "
            f"SELECT epoch_us(r.acquired_at) // {MINUTE_US} AS m, r.line_id, r.asset_id, r.camera_view, "
            "r.batch, r.model_version, r.disposition, t.label AS type, s.label AS severity, count(*) AS n "
            f"FROM new r LEFT JOIN {head('t', self.heads.type_head)} ON t.result_id = r.result_id "
            f"LEFT JOIN {head('s', self.heads.severity_head)} ON s.result_id = r.result_id GROUP BY ALL")
        return _arrow(cur, sql, {"after": after, "upto": upto})

    def _rollup(self) -> duckdb.DuckDBPyConnection:
        self.refresh()
        return self._mem.cursor()

    def _span(self, mem: duckdb.DuckDBPyConnection, f: Filters) -> tuple[int, int]:
        """The minutes the selection can cover: the filter's window cut to the stored data (so an
        automatic bucket fits the data, not an empty week)."""
        (first, last), = mem.execute("SELECT min(m), max(m) FROM rollup").fetchall()
        if first is None:
            lo = _minute(f.since) if f.since else 0
            return lo, max(lo, _minute(f.until) if f.until else lo)
        lo = max(int(first), _minute(f.since)) if f.since else int(first)
        hi = min(int(last), _minute(f.until)) if f.until else int(last)
        return lo, max(hi, lo)

    def _query(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        mem = self._rollup()
        try:
            return mem.execute(sql, params).fetchall()
        finally:
            mem.close()

    # -- live --------------------------------------------------------------------------------------
    def live(self, minutes: int = 15, now: datetime | None = None) -> dict[str, Any]:
        """Throughput and disposition mix of the last ``minutes``, and what waits for a person."""
        now = now or datetime.now(UTC)
        end = _minute(now)
        rows = self._query("SELECT f.m, f.disposition, sum(f.n) FROM rollup f WHERE f.m > $lo AND f.m <= $hi "
                           "GROUP BY ALL ORDER BY f.m", {"lo": end - minutes, "hi": end})
        per_minute = {m: 0 for m in range(end - minutes + 1, end + 1)}
        mix = dict.fromkeys(DISPOSITIONS, 0)
        for m, disposition, n in rows:
            per_minute[m] += int(n)
            mix[disposition] = mix.get(disposition, 0) + int(n)
        total = sum(mix.values())
        waits = self.store.waiting_for_review()
        return {
            "now": now, "window_minutes": minutes, "parts": total,
            "parts_per_min": _throughput(per_minute, end, now),
            "mix": mix, "defect_rate": _rate(mix["rework"] + mix["reject"],
                                             mix["pass"] + mix["rework"] + mix["reject"]),
            "holds_waiting": waits["hold"], "audits_waiting": waits["audit"],
            "per_minute": [{"t": _at(m), "parts": n} for m, n in per_minute.items()],
        }

    # -- the filter choices ------------------------------------------------------------------------
    def facets(self, shifts: Shifts, batches: int = 200) -> dict[str, Any]:
        """The values each filter can take (newest batches first) and the process values recorded."""
        mem = self._rollup()
        out: dict[str, Any] = {}
        try:
            for column in ("line_id", "asset_id", "camera_view", "model_version"):
                out[column] = [v for (v,) in mem.execute(
                    f"SELECT DISTINCT {column} FROM rollup WHERE {column} IS NOT NULL ORDER BY 1").fetchall()]
            out["batch"] = [b for b, _ in mem.execute(
                "SELECT batch, max(m) AS last FROM rollup WHERE batch IS NOT NULL GROUP BY batch "
                f"ORDER BY last DESC, batch DESC LIMIT {int(batches)}").fetchall()]
            (first, last, total), = mem.execute("SELECT min(m), max(m), sum(n) FROM rollup").fetchall()
        finally:
            mem.close()
        out["first"] = _at(first) if first is not None else None
        out["last"] = _at(last + 1) if last is not None else None
        out["results"] = int(total or 0)
        out["shift"] = list(shifts.names)
        out["shifts"] = [{"name": n, "starts": f"{s // 60:02d}:{s % 60:02d}"}
                         for n, s in zip(shifts.names, shifts.starts, strict=True)]
        out["timezone"] = shifts.tz
        out["process_values"] = self.process_keys()
        out["type_head"], out["severity_head"] = self.heads.type_head, self.heads.severity_head
        out["type_classes"] = list(self.heads.type_classes)
        out["severity_classes"] = list(self.heads.severity_classes)
        return out

    def process_keys(self, sample: int = 2000) -> list[str]:
        """Process-value names in the newest ``sample`` results (a PLC writes the same set each time)."""
        with cursor(self.store) as cur:
            rows = cur.execute(
                "SELECT DISTINCT unnest(json_keys(process_values)) AS k FROM results "
                f"WHERE seq > (SELECT max(seq) FROM results) - {int(sample)} AND process_values IS NOT NULL "
                "ORDER BY k").fetchall()
        return [k for (k,) in rows]

    # -- time buckets ------------------------------------------------------------------------------
    def _bucket(self, bucket: str | None, span: tuple[int, int]) -> str:
        if bucket is not None:
            if bucket not in BUCKETS:
                raise ValueError(f"bucket '{bucket}': expected one of {', '.join(BUCKETS)}")
            return bucket
        minutes = span[1] - span[0] + 1
        return next((name for name, step in BUCKETS.items() if minutes / step <= MAX_POINTS), "1d")

    @staticmethod
    def _bucket_sql(bucket: str, shifts: Shifts, span: tuple[int, int]) -> str:
        step = BUCKETS[bucket]
        if step < 480:
            return f"(f.m // {step} * {step})"
        # local buckets: 8 h ones begin at the first shift start, days at local midnight
        origin = shifts.starts[0] if step == 480 else 0
        local = shifts.local("f.m", *span)
        return f"(f.m - (({local} - {origin}) % {step}))"

    # -- root cause --------------------------------------------------------------------------------
    def pareto(self, f: Filters, shifts: Shifts) -> dict[str, Any]:
        """Defective parts by defect type, most frequent first, with the cumulative share."""
        mem = self._rollup()
        try:
            where, params = f.where("f.m", shifts, self._span(mem, f), "f", [_DEFECTIVE_F])
            rows = mem.execute(f"SELECT coalesce(f.type, '(unknown)') AS label, sum(f.n) AS n FROM rollup f"
                               f"{where} GROUP BY label ORDER BY n DESC, label", params).fetchall()
        finally:
            mem.close()
        total = sum(int(n) for _, n in rows)
        items, running = [], 0
        for label, n in rows:
            running += int(n)
            items.append({"label": label, "n": int(n), "share": _rate(int(n), total),
                          "cumulative": _rate(running, total)})
        return {"type_head": self.heads.type_head, "defective": total, "items": items}

    def severity(self, f: Filters, shifts: Shifts) -> dict[str, Any]:
        """Defective parts by (defect type, severity), severities in the model's class order."""
        mem = self._rollup()
        try:
            where, params = f.where("f.m", shifts, self._span(mem, f), "f", [_DEFECTIVE_F])
            rows = mem.execute(
                "SELECT coalesce(f.type, '(unknown)'), coalesce(f.severity, '(unknown)'), sum(f.n) "
                f"FROM rollup f{where} GROUP BY ALL", params).fetchall()
        finally:
            mem.close()
        order = {c: i for i, c in enumerate(self.heads.severity_classes)}
        rows.sort(key=lambda r: (r[0], order.get(r[1], len(order)), r[1]))
        return {"type_head": self.heads.type_head, "severity_head": self.heads.severity_head,
                "severity_classes": list(self.heads.severity_classes),
                "cells": [{"type": t, "severity": s, "n": int(n)} for t, s, n in rows]}

    def breakdown(self, f: Filters, shifts: Shifts, by: str, limit: int = 50) -> dict[str, Any]:
        """Decided parts, defects and defect rate per value of ``by`` (the biggest groups first)."""
        mem = self._rollup()
        try:
            span = self._span(mem, f)
            dim = self._dimension(by, shifts, span)
            where, params = f.where("f.m", shifts, span, "f")
            rows = mem.execute(
                f"SELECT {dim} AS g, {_COUNTS}, min(f.m), max(f.m) FROM rollup f{where} "
                f"GROUP BY g ORDER BY n DESC, g LIMIT {int(limit)}", params).fetchall()
        finally:
            mem.close()
        return {"by": by, "groups": [
            {"group": g, "n": int(n), "defects": int(d), "rate": _rate(int(d), int(n)),
             "first": _at(lo), "last": _at(hi + 1)} for g, n, d, lo, hi in rows]}

    def trend(self, f: Filters, shifts: Shifts, by: str | None, bucket: str | None = None) -> dict[str, Any]:
        """Defect rate per time bucket, one series per value of ``by`` (None: the whole selection)."""
        mem = self._rollup()
        try:
            span = self._span(mem, f)
            chosen = self._bucket(bucket, span)
            dim = self._dimension(by, shifts, span) if by else "'all'"
            where, params = f.where("f.m", shifts, span, "f")
            rows = mem.execute(
                f"SELECT {self._bucket_sql(chosen, shifts, span)} AS t, {dim} AS g, {_COUNTS} FROM rollup f"
                f"{where} GROUP BY ALL ORDER BY t, g", params).fetchall()
        finally:
            mem.close()
        volume: dict[str, int] = {}
        for _, g, n, _ in rows:
            volume[str(g)] = volume.get(str(g), 0) + int(n)
        keep = set(sorted(volume, key=lambda g: -volume[g])[:MAX_GROUPS])
        merged: dict[tuple[int, str], list[int]] = {}
        for t, g, n, d in rows:
            acc = merged.setdefault((int(t), str(g) if str(g) in keep else "other"), [0, 0])
            acc[0] += int(n)
            acc[1] += int(d)
        return {"by": by, "bucket": chosen, "points": [
            {"t": _at(t), "group": g, "n": n, "defects": d, "rate": _rate(d, n)}
            for (t, g), (n, d) in merged.items()]}

    @staticmethod
    def _dimension(by: str | None, shifts: Shifts, span: tuple[int, int]) -> str:
        if by == "shift":
            return shifts.name_sql("f.m", *span)
        if by in DIMENSIONS:
            return f"coalesce(f.{by}, '(none)')"
        raise ValueError(f"by '{by}': expected one of {', '.join(DIMENSIONS)}")

    # -- control chart -------------------------------------------------------------------------------
    def control(self, f: Filters, shifts: Shifts, bucket: str | None = None,
                min_parts: int = 20) -> dict[str, Any]:
        """A p-chart of the defect rate: centre line p̄ over the window, 3σ limits per subgroup size.

        A subgroup (time bucket) with fewer than ``min_parts`` decided parts is shown but not judged.
        The alarm is on when the newest judged subgroup lies outside its limits (Western Electric
        rule 1); ``run_warning`` when the newest 8 judged subgroups all lie above the centre line.
        """
        series = self.trend(f, shifts, None, bucket)
        n_total = sum(p["n"] for p in series["points"])
        d_total = sum(p["defects"] for p in series["points"])
        centre = d_total / n_total if n_total else None
        points = []
        for p in series["points"]:
            n, d = p["n"], p["defects"]
            point: dict[str, Any] = {"t": p["t"], "n": n, "defects": d, "p": p["rate"], "ucl": None,
                                     "lcl": None, "judged": False, "out": False}
            if centre is not None and n >= min_parts:
                sigma = math.sqrt(centre * (1 - centre) / n)
                point["ucl"] = round(min(1.0, centre + SIGMA * sigma), 6)
                point["lcl"] = round(max(0.0, centre - SIGMA * sigma), 6)
                point["judged"] = True
                point["out"] = bool(d / n > point["ucl"] or d / n < point["lcl"])
            points.append(point)
        judged = [p for p in points if p["judged"]]
        latest = judged[-1] if judged else None
        run = centre is not None and len(judged) >= 8 and all(p["p"] > centre for p in judged[-8:])
        alarm = bool(latest and latest["out"])
        reason = None
        if latest and alarm:
            above = latest["p"] > latest["ucl"]
            limit = latest["ucl"] if above else latest["lcl"]
            reason = (f"defect rate {latest['p']:.1%} in the subgroup from {latest['t']:%Y-%m-%d %H:%M} UTC "
                      f"is {'above the upper' if above else 'below the lower'} control limit ({limit:.1%})")
        elif run:
            reason = "the last 8 subgroups are all above the centre line: the process has shifted"
        return {"bucket": series["bucket"], "centre": None if centre is None else round(centre, 6),
                "sigma": SIGMA, "min_parts": min_parts, "points": points,
                "alarm": {"active": alarm, "run_warning": run, "reason": reason, "latest": latest,
                          "out_of_control": sum(1 for p in points if p["out"])}}

    # -- process values (raw results) ----------------------------------------------------------------
    def correlation(self, f: Filters, shifts: Shifts, bins: int = 10,
                    keys: Sequence[str] | None = None) -> dict[str, Any]:
        """Point-biserial correlation of each process value with "defective", and the defect rate per
        equal-width bin of the value, over an evenly spread sample of the selection's decided parts."""
        names = list(keys) if keys is not None else self.process_keys()
        mem = self._rollup()
        try:
            span = self._span(mem, f)
            where, params = f.where("f.m", shifts, span, "f", [_DECIDED_F])
            (decided,), = mem.execute(f"SELECT coalesce(sum(f.n), 0) FROM rollup f{where}", params).fetchall()
        finally:
            mem.close()
        every = max(1, math.ceil(int(decided) / CORRELATION_SAMPLE))
        if not names or not decided:
            return {"n": 0, "decided": int(decided), "every": every, "variables": []}
        # the same results as the rollup counted (seq bound); "<> 'hold'" (dispositions are
        # pass/rework/reject/hold) is 3x cheaper than IN (…)
        where, params = f.where(RAW_MINUTE, shifts, span, "r", [
            f"r.seq % {every} = 0", f"r.seq <= {self._last_seq}", "r.disposition <> 'hold'",
            "r.process_values IS NOT NULL"])
        paths = "[" + ", ".join(_quote("$." + _json_key(k)) for k in names) + "]"
        sql = (f"SELECT CAST(r.disposition <> 'pass' AS DOUBLE) AS d, list_transform("
               f"json_extract_string(r.process_values, {paths}), lambda x: TRY_CAST(x AS DOUBLE)) AS v "
               f"FROM results r{where}")
        with cursor(self.store) as cur:
            table = _arrow(cur, sql, params)
        defective = table.column("d").to_numpy()
        values = _value_matrix(table.column("v"), len(names))
        variables = []
        for i, name in enumerate(names):
            x = values[:, i]
            ok = np.isfinite(x)
            variables.append({"name": name, **_correlate(x[ok], defective[ok], bins)})
        variables.sort(key=lambda v: -abs(v["r"]) if v["r"] is not None else 0.0)
        return {"n": int(table.num_rows), "decided": int(decided), "every": every, "variables": variables}

    # -- export (raw results) ------------------------------------------------------------------------
    def export(self, f: Filters, shifts: Shifts, fmt: str, rows_per_batch: int = 50_000) -> Iterator[bytes]:
        """The selection as CSV or Parquet bytes, oldest first, one row per part with its defect type
        and severity; streamed batch by batch, so memory stays flat whatever the size.  In CSV (what a
        spreadsheet opens) a text cell that would start a formula gets a leading ``'``; Parquet keeps
        the stored values."""
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"format '{fmt}': expected one of {', '.join(EXPORT_FORMATS)}")
        mem = self._rollup()
        try:
            span = self._span(mem, f)
        finally:
            mem.close()
        where, params = f.where(RAW_MINUTE, shifts, span, "r")
        sql = (
            "SELECT r.result_id, r.seq, r.acquired_at, r.decided_at, r.line_id, r.asset_id, r.camera_view, "
            f"r.batch, {shifts.name_sql(RAW_MINUTE, *span)} AS shift, r.part_id, r.model_version, "
            "r.disposition, r.rule, r.review, r.status, r.error, t.label AS defect_type, "
            "t.confidence AS defect_type_confidence, s.label AS severity, "
            "s.confidence AS severity_confidence, "
            "CAST(r.process_values AS VARCHAR) AS process_values, r.total_ms, r.image_ref FROM results r "
            "LEFT JOIN predictions t ON t.result_id = r.result_id AND t.role = 'champion' AND t.head = $type "
            "LEFT JOIN predictions s ON s.result_id = r.result_id AND s.role = 'champion' AND s.head = $sev"
            f"{where} ORDER BY r.seq")
        params.update(type=self.heads.type_head or "", sev=self.heads.severity_head or "")
        with cursor(self.store) as cur:
            relation = cur.sql(sql, params=params)
            assert relation is not None, "a SELECT always has a result"
            reader = relation.to_arrow_reader(rows_per_batch)
            sink = _Drain()
            if fmt == "csv":
                with pa_csv.CSVWriter(sink, reader.schema) as csv_writer:
                    for batch in reader:
                        csv_writer.write_batch(neutralise_formulas(batch))
                        yield sink.take()
            else:
                with pq.ParquetWriter(sink, reader.schema, compression="zstd") as pq_writer:
                    for batch in reader:
                        pq_writer.write_batch(batch)
                        yield sink.take()
            yield sink.take()


EXPORT_FORMATS = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}


class _Drain(io.RawIOBase):
    """A write-only file whose bytes are handed on (``take``) as soon as a writer produces them."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._chunks.append(chunk)
        return len(chunk)

    def take(self) -> bytes:
        out, self._chunks = b"".join(self._chunks), []
        return out


def _arrow(cur: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any]) -> pa.Table:
    relation = cur.sql(sql, params=params)
    assert relation is not None, "a SELECT always has a result"
    return relation.to_arrow_table()


def _throughput(per_minute: dict[int, int], end: int, now: datetime) -> float:
    """Parts per minute over the complete minutes since the line started in the window (a line
    that started two minutes ago is not averaged with thirteen empty ones); before the first
    complete minute, the current minute's count extrapolated."""
    active = [m for m, n in per_minute.items() if n]
    complete = [per_minute[m] for m in range(min(active), end)] if active else []
    if complete:
        return round(sum(complete) / len(complete), 2)
    elapsed = max(10.0, now.second + now.microsecond / 1e6) / 60
    return round(per_minute.get(end, 0) / elapsed, 2)


def _json_key(key: str) -> str:
    return '"' + key.replace('"', '\\"') + '"'


def _value_matrix(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """DOUBLE[] column (one entry per name) → float matrix, NaN where a value is missing."""
    if len(column) == 0:
        return np.empty((0, width))
    flat = pa.concat_arrays([c.flatten() for c in column.chunks])
    return flat.to_numpy(zero_copy_only=False).astype(float).reshape(-1, width)


def _correlate(x: np.ndarray, d: np.ndarray, bins: int) -> dict[str, Any]:
    n = int(x.size)
    if n < 3 or float(np.ptp(x)) == 0.0:
        return {"n": n, "r": None, "bins": []}
    r = float(np.corrcoef(x, d)[0, 1]) if float(d.std()) > 0 else 0.0
    edges = np.linspace(float(x.min()), float(x.max()), bins + 1)
    index = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    defects = np.bincount(index, weights=d, minlength=bins)
    return {"n": n, "r": None if math.isnan(r) else round(r, 4), "bins": [
        {"lo": float(edges[i]), "hi": float(edges[i + 1]), "n": int(counts[i]), "defects": int(defects[i]),
         "rate": _rate(int(defects[i]), int(counts[i]))} for i in range(bins)]}

