"""The result store: the journal for durability, DuckDB for queries.  Only the daemon opens it.

``await store.append(result)`` returns once the result is on disk (journal fsync); the caller
publishes only after that.  A background thread ingests journaled results into DuckDB every
``ingest_interval_s`` in one transaction; queries see results after that delay (or after
:meth:`Store.flush`).  On open, anything journaled but not yet in DuckDB (a crash) is inserted,
exactly once: ``results.result_id`` is the primary key and recovery inserts only unknown ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from appliance.config import DUCKDB_MAX_SPILL_MB, DUCKDB_MEMORY_LIMIT_MB, DUCKDB_THREADS
from appliance.errors import UserError
from appliance.journal import Journal
from appliance.priority import at_background_priority, lower_this_thread
from appliance.result import HeadResult, PartResult, new_result_id

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    result_id      VARCHAR PRIMARY KEY,
    seq            BIGINT NOT NULL,
    acquired_at    TIMESTAMPTZ NOT NULL,
    decided_at     TIMESTAMPTZ NOT NULL,
    line_id        VARCHAR NOT NULL,
    asset_id       VARCHAR NOT NULL,
    camera_view    VARCHAR NOT NULL,
    batch          VARCHAR,
    part_id        VARCHAR,
    process_values JSON,
    model_version  VARCHAR,
    disposition    VARCHAR NOT NULL,
    rule           VARCHAR NOT NULL,
    review         VARCHAR,
    status         VARCHAR NOT NULL,
    error          VARCHAR,
    queue_ms       DOUBLE,
    inference_ms   DOUBLE,
    decide_ms      DOUBLE,
    total_ms       DOUBLE,
    image_ref      VARCHAR,
    source_ref     VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS predictions (
    result_id     VARCHAR NOT NULL,
    model_version VARCHAR NOT NULL,
    role          VARCHAR NOT NULL,   -- 'champion' (published) or 'shadow' (stored, never published)
    head          VARCHAR NOT NULL,
    label         VARCHAR NOT NULL,
    confidence    DOUBLE NOT NULL,
    probs         DOUBLE[] NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    label_id      VARCHAR PRIMARY KEY,
    result_id     VARCHAR NOT NULL,
    head          VARCHAR NOT NULL,
    label         VARCHAR NOT NULL,
    labelled_by   VARCHAR NOT NULL,
    labelled_at   TIMESTAMPTZ NOT NULL,
    verified_by   VARCHAR,            -- second person, when two-person verification is on
    verified_at   TIMESTAMPTZ,
    superseded    BOOLEAN NOT NULL DEFAULT false,
    comment       VARCHAR
);
CREATE TABLE IF NOT EXISTS audit (
    logged_at TIMESTAMPTZ NOT NULL,
    user_name VARCHAR NOT NULL,
    role      VARCHAR NOT NULL,
    action    VARCHAR NOT NULL,
    target    VARCHAR,
    detail    JSON
);
"""

RESULT_COLUMNS = (
    "result_id", "seq", "acquired_at", "decided_at", "line_id", "asset_id", "camera_view", "batch",
    "part_id", "process_values", "model_version", "disposition", "rule", "review", "status", "error",
    "queue_ms", "inference_ms", "decide_ms", "total_ms", "image_ref", "source_ref",
)


def _among(ids: Sequence[str], column: str = "result_id") -> tuple[str, dict[str, Any]]:
    """SQL keeping the rows whose ``column`` is one of ``ids``, and its parameters.

    Result ids are ULIDs, ordered by time as the rows are stored: the range lets DuckDB skip every
    row group outside it by its min/max (4x faster at 10^6 results)."""
    return (f"{column} BETWEEN $first AND $last AND {column} IN (SELECT unnest($ids))",
            {"ids": list(ids), "first": min(ids, default=""), "last": max(ids, default="")})


def _row(r: PartResult) -> dict[str, Any]:
    """A result's columns in the ``results`` table."""
    return {"result_id": r.result_id, "seq": r.seq, "acquired_at": r.acquired_at, "decided_at": r.decided_at,
            "line_id": r.line_id, "asset_id": r.asset_id, "camera_view": r.camera_view, "batch": r.batch,
            "part_id": r.part_id, "process_values": r.process_values, "model_version": r.model_version,
            "disposition": r.disposition, "rule": r.rule, "review": r.review, "status": r.status, "error": r.error,
            "image_ref": r.image_ref, "source_ref": r.source_ref,
            **{stage: r.latency.get(stage) for stage in ("queue_ms", "inference_ms", "decide_ms", "total_ms")}}


def record_of(r: PartResult) -> dict[str, Any]:
    """A result as the store gives it back (:meth:`Store.get`), from memory: predictions by head name."""
    def heads(version: str | None, predictions: list[HeadResult]) -> list[dict[str, Any]]:
        return [{"head": p.head, "label": p.label, "confidence": p.confidence, "probs": list(p.probs),
                 "model_version": version} for p in sorted(predictions, key=lambda p: p.head)]
    return _row(r) | {"predictions": heads(r.model_version, r.predictions),
                      "shadow_predictions": heads(r.shadow_version, r.shadow_predictions)}


def _iso(column: str) -> str:
    """A UTC timestamp as pydantic writes it: ISO 8601 with 'Z', microseconds only when there are some."""
    utc = f"timezone('UTC', r.{column})"  # whatever the session's time zone
    return (f"CASE WHEN epoch_us(r.{column}) % 1000000 = 0 THEN strftime({utc}, '%Y-%m-%dT%H:%M:%SZ') "
            f"ELSE strftime({utc}, '%Y-%m-%dT%H:%M:%S.%fZ') END")


_JSON_VALUE = {"acquired_at": _iso("acquired_at"), "decided_at": _iso("decided_at"),
               "process_values": "coalesce(r.process_values::JSON, '{}'::JSON)"}
"""Result columns whose JSON is not the column as it is (:meth:`Store.query_json`)."""

_RESULTS_ARROW = pa.schema([
    ("result_id", pa.string()), ("seq", pa.int64()),
    ("acquired_at", pa.timestamp("us", tz="UTC")), ("decided_at", pa.timestamp("us", tz="UTC")),
    ("line_id", pa.string()), ("asset_id", pa.string()), ("camera_view", pa.string()),
    ("batch", pa.string()), ("part_id", pa.string()), ("process_values", pa.string()),
    ("model_version", pa.string()), ("disposition", pa.string()), ("rule", pa.string()),
    ("review", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("queue_ms", pa.float64()), ("inference_ms", pa.float64()), ("decide_ms", pa.float64()),
    ("total_ms", pa.float64()), ("image_ref", pa.string()), ("source_ref", pa.string()),
])
_PREDICTIONS_ARROW = pa.schema([
    ("result_id", pa.string()), ("model_version", pa.string()), ("role", pa.string()),
    ("head", pa.string()), ("label", pa.string()), ("confidence", pa.float64()),
    ("probs", pa.list_(pa.float64())),
])


@dataclass(slots=True, frozen=True)
class ResultFilter:
    since: datetime | None = None
    until: datetime | None = None
    disposition: str | None = None
    batch: str | None = None
    camera_view: str | None = None
    status: str | None = None
    review: str | None = None
    part_id: str | None = None
    limit: int = 100
    offset: int = 0


class Store:
    def __init__(self, db_path: Path, journal_dir: Path, ingest_interval_s: float = 0.25,
                 memory_limit_mb: int = DUCKDB_MEMORY_LIMIT_MB, threads: int = DUCKDB_THREADS,
                 max_spill_mb: int = DUCKDB_MAX_SPILL_MB) -> None:
        self.db_path = db_path
        self.journal = Journal(journal_dir)
        self.ingest_interval_s = ingest_interval_s
        self.memory_limit_mb = memory_limit_mb
        self.threads = threads
        self.max_spill_mb = max_spill_mb
        self._con: duckdb.DuckDBPyConnection | None = None
        self.label_writes = 0
        """Label writes committed since open: a cached review queue is stale once this moves."""
        self._label_lock = threading.Lock()
        self._pending: list[PartResult] = []
        self._pending_lock = threading.Lock()
        self._ingest_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.next_seq = 1
        self.ingested_seq = 0
        self.recovered = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = self.connect_duckdb(str(self.db_path))
        except duckdb.IOException as exc:
            raise UserError(
                f"{self.db_path}: cannot open the result database ({exc}); is another daemon running?"
            ) from exc
        self._con.execute("SET TimeZone = 'UTC'")
        self._con.execute(SCHEMA)
        self._recover()
        # The first ingests import and plan lazily (about 0.4 s of CPU, much of it holding the GIL):
        # an empty one now keeps that out of the first second of the line.
        self._insert(self._con, [])
        row = self._con.execute("SELECT coalesce(max(seq), 0) FROM results").fetchone()
        self.ingested_seq = int(row[0]) if row else 0
        self.next_seq = self.ingested_seq + 1
        self.journal.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._ingest_loop, name="store-ingest", daemon=True)
        self._thread.start()

    def connect_duckdb(self, database: str, temp_directory: Path | None = None) -> duckdb.DuckDBPyConnection:
        """Open one of the appliance's DuckDB databases: bounded memory, threads and spill (DuckDB's
        defaults, 80 % of the host's RAM, every core and 90 % of the free disk, are not for an edge PC
        shared with inference and the journal), opened at background priority, which DuckDB's worker
        threads inherit from the opening thread (appliance.priority)."""
        config: dict[str, Any] = {"memory_limit": f"{self.memory_limit_mb}MiB", "threads": self.threads,
                                  "max_temp_directory_size": f"{self.max_spill_mb}MiB"}
        if temp_directory is not None:
            config["temp_directory"] = str(temp_directory)
        return at_background_priority(lambda: duckdb.connect(database, config=config))

    def _recover(self) -> None:
        assert self._con is not None
        records = self.journal.recover()
        if records:
            ids = [r["result_id"] for r in records]
            of_journal, params = _among(ids)
            known = {row[0] for row in self._con.execute(f"SELECT result_id FROM results WHERE {of_journal}",
                                                         params).fetchall()}
            missing = [PartResult.from_dict(r) for r in records if r["result_id"] not in known]
            if missing:
                self._insert(self._con, missing)
            self.recovered = len(missing)
            log.info("journal recovery: %d records, %d were not yet in DuckDB", len(records), len(missing))
        self.journal.discard_recovered()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.journal.close()
        self.flush()
        if self._con is not None:
            with self._pending_lock:
                clean = not self._pending
            if clean:
                self.journal.discard_recovered()
            self._con.close()
            self._con = None

    # -- writing ---------------------------------------------------------------------------------
    async def append(self, result: PartResult) -> None:
        """Assign the next sequence number and return once the result is durable."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        result.seq = self.next_seq
        self.next_seq += 1

        def on_disk(error: BaseException | None) -> None:
            if error is None:
                with self._pending_lock:
                    self._pending.append(result)
            loop.call_soon_threadsafe(_settle, done, error)

        self.journal.append(result.to_dict(), on_disk)
        await done

    def _ingest_loop(self) -> None:
        lower_this_thread()  # results are published once journaled; ingest into DuckDB can wait
        while not self._stop.wait(self.ingest_interval_s):
            try:
                self.flush()
            except duckdb.Error:
                log.exception("DuckDB ingest failed; results stay in the journal and are retried")

    def flush(self) -> None:
        """Ingest everything journaled so far into DuckDB now."""
        if self._con is None:
            return
        with self._ingest_lock:
            with self._pending_lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            cur = self._con.cursor()
            try:
                self._insert(cur, batch)
            except duckdb.Error:
                with self._pending_lock:
                    self._pending = batch + self._pending
                raise
            finally:
                cur.close()
            self.ingested_seq = max(self.ingested_seq, batch[-1].seq)
            self.journal.release_sealed(self.ingested_seq)

    @staticmethod
    def _insert(con: duckdb.DuckDBPyConnection, batch: Sequence[PartResult]) -> None:
        rows = []
        preds = []
        for r in batch:
            rows.append(_row(r) | {"process_values": json.dumps(r.process_values)})
            for role, version, heads in (("champion", r.model_version, r.predictions),
                                         ("shadow", r.shadow_version, r.shadow_predictions)):
                for p in heads:
                    preds.append({"result_id": r.result_id, "model_version": version, "role": role,
                                  "head": p.head, "label": p.label, "confidence": p.confidence,
                                  "probs": p.probs})
        results_tbl = pa.Table.from_pylist(rows, schema=_RESULTS_ARROW)
        preds_tbl = pa.Table.from_pylist(preds, schema=_PREDICTIONS_ARROW)
        con.execute("BEGIN TRANSACTION")
        try:
            con.register("new_results", results_tbl)
            con.register("new_predictions", preds_tbl)
            con.execute("INSERT INTO results BY NAME SELECT * FROM new_results")
            con.execute("INSERT INTO predictions BY NAME SELECT * FROM new_predictions")
            con.execute("COMMIT")
        except duckdb.Error:
            con.execute("ROLLBACK")
            raise
        finally:
            con.unregister("new_results")
            con.unregister("new_predictions")

    # -- reading (blocking: call from a worker thread) -------------------------------------------
    def _cursor(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise RuntimeError("store is not open")
        cur = self._con.cursor()
        cur.execute("SET TimeZone = 'UTC'")
        return cur

    @contextlib.contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of its own on the daemon's database (DuckDB cursors are per thread), closed after."""
        cur = self._cursor()
        try:
            yield cur
        finally:
            cur.close()

    def query(self, f: ResultFilter) -> list[dict[str, Any]]:
        sql, params = self._page_sql(f, ", ".join(RESULT_COLUMNS))
        with self.cursor() as cur:
            fetched = cur.execute(sql, params).fetchall()
            rows = [dict(zip(RESULT_COLUMNS, row, strict=True)) for row in fetched]
            self._attach_predictions(cur, rows)
        return rows

    def query_json(self, f: ResultFilter) -> bytes:
        """:meth:`query`'s page as the API's JSON (``{"count": …, "results": […]}``), rendered by
        DuckDB: no Python object per row or prediction.  Building those holds the GIL in long C
        calls that stall the inference threads (10,000 results: about a second)."""
        sql, params = self._page_sql(f, "result_id")
        with self.cursor() as cur:
            ids = cur.sql(sql, params=params).to_arrow_table().column(0).to_pylist()
            if not ids:
                return b'{"count":0,"results":[]}'
            fields = ", ".join(f"'{c}': {_JSON_VALUE.get(c, 'r.' + c)}" for c in RESULT_COLUMNS)
            of_page, params = _among(ids)
            rows = cur.execute(
                "WITH preds AS (SELECT result_id, role, to_json(list({'head': head, 'label': label, "
                "'confidence': confidence, 'probs': probs, 'model_version': model_version} ORDER BY head)) AS items "
                f"FROM predictions WHERE {of_page} GROUP BY ALL) "
                f"SELECT to_json({{{fields}, 'predictions': coalesce(c.items, '[]'::JSON), "
                "'shadow_predictions': coalesce(s.items, '[]'::JSON)}) FROM results r "
                "LEFT JOIN preds c ON c.result_id = r.result_id AND c.role = 'champion' "
                "LEFT JOIN preds s ON s.result_id = r.result_id AND s.role = 'shadow' "
                f"WHERE {_among(ids, 'r.result_id')[0]} ORDER BY r.seq DESC", params).fetchall()
        return b'{"count":%d,"results":[%s]}' % (len(rows), ",".join(row for (row,) in rows).encode())

    def _page_sql(self, f: ResultFilter, columns: str) -> tuple[str, dict[str, Any]]:
        """SQL selecting ``columns`` of the results a filter selects, newest first, and its parameters."""
        where: list[str] = []
        params: dict[str, Any] = {}
        for column, value in (("disposition", f.disposition), ("batch", f.batch),
                              ("camera_view", f.camera_view), ("status", f.status),
                              ("review", f.review), ("part_id", f.part_id)):
            if value is not None:
                where.append(f"{column} = ${column}")
                params[column] = value
        if f.since is not None:
            where.append("acquired_at >= $since")
            params["since"] = f.since
        if f.until is not None:
            where.append("acquired_at < $until")
            params["until"] = f.until
        sql = f"SELECT {columns} FROM results"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY seq DESC LIMIT {int(f.limit)} OFFSET {int(f.offset)}"
        return sql, params

    def get(self, result_id: str) -> dict[str, Any] | None:
        return next(iter(self.results_by_ids([result_id])), None)

    @staticmethod
    def _attach_predictions(cur: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]) -> None:
        by_id = {r["result_id"]: r for r in rows}
        for r in rows:
            r["process_values"] = json.loads(r["process_values"]) if r["process_values"] else {}
            r["predictions"] = []
            r["shadow_predictions"] = []
        if not by_id:
            return
        of_rows, params = _among(list(by_id))
        preds = cur.execute(
            f"SELECT result_id, role, model_version, head, label, confidence, probs FROM predictions WHERE {of_rows} "
            "ORDER BY head", params).fetchall()
        for result_id, role, version, head, label, confidence, probs in preds:
            key = "predictions" if role == "champion" else "shadow_predictions"
            by_id[result_id][key].append(
                {"head": head, "label": label, "confidence": confidence, "probs": probs,
                 "model_version": version}
            )

    def image_refs(self, result_ids: list[str]) -> dict[str, str | None]:
        if not result_ids:
            return {}
        of_ids, params = _among(result_ids)
        with self.cursor() as cur:
            rows = cur.execute(f"SELECT result_id, image_ref FROM results WHERE {of_ids}", params).fetchall()
        return dict(rows)

    def add_predictions(self, rows: list[dict[str, Any]]) -> None:
        """Extra predictions for stored results (the shadow model's); never published."""
        table = pa.Table.from_pylist(rows, schema=_PREDICTIONS_ARROW)
        with self.cursor() as cur:
            cur.register("new_predictions", table)
            cur.execute("INSERT INTO predictions BY NAME SELECT * FROM new_predictions")

    def shadow_agreement(self, version: str) -> dict[str, Any]:
        """How often the shadow model agreed with the champion, per head and per champion class."""
        sql = """
            SELECT c.head, c.label, count(*) AS n, avg(CAST(c.label = s.label AS INTEGER)) AS agree
            FROM predictions c JOIN predictions s ON c.result_id = s.result_id AND c.head = s.head
            WHERE c.role = 'champion' AND s.role = 'shadow' AND s.model_version = ?
            GROUP BY ALL ORDER BY c.head, c.label"""
        with self.cursor() as cur:
            rows = cur.execute(sql, [version]).fetchall()
        heads: dict[str, Any] = {}
        for head, label, n, agree in rows:
            h = heads.setdefault(head, {"n": 0, "agreed": 0.0, "per_class": {}})
            h["n"] += n
            h["agreed"] += agree * n
            h["per_class"][label] = {"n": n, "agreement": round(agree, 4)}
        for h in heads.values():
            h["agreement"] = round(h.pop("agreed") / h["n"], 4) if h["n"] else None
        return {"shadow_version": version, "heads": heads}

    # -- review labels and the audit log (low volume: written straight to DuckDB) -------------
    def add_labels(self, result_id: str, labels: dict[str, str], user: str, comment: str | None,
                   verified: bool) -> list[str]:
        """Store a person's labels for a result; earlier labels of the same heads are superseded.

        ``verified`` is True when no second person is required; otherwise the labels wait for
        :meth:`verify_label` by someone else before they count for training.
        """
        now = datetime.now(UTC)
        ids = []
        cur = self._cursor()
        try:
            cur.execute("BEGIN TRANSACTION")
            for head, label in labels.items():
                cur.execute("UPDATE labels SET superseded = true WHERE result_id = ? AND head = ? "
                            "AND NOT superseded", [result_id, head])
                label_id = new_result_id()
                cur.execute(
                    "INSERT INTO labels (label_id, result_id, head, label, labelled_by, labelled_at, "
                    "verified_by, verified_at, comment) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [label_id, result_id, head, label, user, now, user if verified else None,
                     now if verified else None, comment])
                ids.append(label_id)
            cur.execute("COMMIT")
            with self._label_lock:  # two labels committed at once must count twice
                self.label_writes += 1
        except duckdb.Error:
            cur.execute("ROLLBACK")
            raise
        finally:
            cur.close()
        return ids

    def verify_label(self, label_id: str, user: str) -> dict[str, Any]:
        """Second-person verification; the labeller cannot verify their own label."""
        with self.cursor() as cur:
            row = cur.execute("SELECT labelled_by, verified_by, superseded FROM labels WHERE label_id = ?",
                              [label_id]).fetchone()
            if row is None:
                raise LookupError(f"no label {label_id}")
            labelled_by, verified_by, superseded = row
            if superseded:
                raise ValueError(f"label {label_id} was replaced by a newer label")
            if verified_by is not None:
                raise ValueError(f"label {label_id} is already verified by {verified_by}")
            if labelled_by == user:
                raise PermissionError("a second person must verify this label")
            cur.execute("UPDATE labels SET verified_by = ?, verified_at = ? WHERE label_id = ?",
                        [user, datetime.now(UTC), label_id])
        return self.labels(label_id=label_id)[0]

    def labels(self, *, result_id: str | None = None, label_id: str | None = None,
               verified: bool | None = None, current_only: bool = True, limit: int = 10_000
               ) -> list[dict[str, Any]]:
        where, params = [], []
        if result_id is not None:
            where.append("result_id = ?")
            params.append(result_id)
        if label_id is not None:
            where.append("label_id = ?")
            params.append(label_id)
        if verified is not None:
            where.append("verified_by IS NOT NULL" if verified else "verified_by IS NULL")
        if current_only:
            where.append("NOT superseded")
        sql = "SELECT * FROM labels" + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY labelled_at DESC LIMIT {int(limit)}"
        with self.cursor() as cur:
            cursor = cur.execute(sql, params)
            columns = [d[0] for d in cursor.description]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def audit(self, user: str, role: str, action: str, target: str | None, detail: dict[str, Any]) -> None:
        self.audit_many([(datetime.now(UTC), user, role, action, target, detail)])

    def audit_many(self, rows: Sequence[tuple[datetime, str, str, str, str | None, dict[str, Any]]]) -> None:
        """Append audit rows (logged_at, user, role, action, target, detail) in one transaction."""
        with self.cursor() as cur:
            cur.executemany("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?)",
                            [[at, user, role, action, target, json.dumps(detail, default=str)]
                             for at, user, role, action, target, detail in rows])

    def audit_log(self, limit: int = 500) -> list[dict[str, Any]]:
        with self.cursor() as cur:
            rows = cur.execute("SELECT logged_at, user_name, role, action, target, detail FROM audit "
                               f"ORDER BY logged_at DESC LIMIT {int(limit)}").fetchall()
        return [{"at": at, "user": u, "role": r, "action": a, "target": t, "detail": json.loads(d or "{}")}
                for at, u, r, a, t, d in rows]

    _WAITING = ("r.review IS NOT NULL AND NOT EXISTS "
                "(SELECT 1 FROM labels l WHERE l.result_id = r.result_id AND NOT l.superseded)")
    """Results waiting for review: held or audit-sampled, and nobody has labelled them yet."""

    def review_pool(self, size: int, heads: Sequence[str] | None) -> tuple[pa.Table, pa.Table]:
        """The newest ``size`` results waiting for review (held ones first), as the review queue
        ranks them: Arrow tables, so that no Python object is built per row (building them holds
        the GIL, which the inference threads need).

        ``waiting``: result_id and review, in queue order.  ``predictions``: per waiting result
        with champion predictions of ``heads`` (None: every head), its ``key``
        ('head=label/head=label', heads in name order) and ``probs`` (one list per head, same order).
        """
        with self.cursor() as cur:
            waiting = cur.sql(
                f"SELECT r.result_id, r.review FROM results r WHERE {self._WAITING} "
                f"ORDER BY (r.review = 'hold') DESC, r.seq DESC LIMIT {int(size)}").to_arrow_table()
            of_pool, params = _among(waiting.column("result_id").to_pylist())
            of_heads = ""
            if heads is not None:
                of_heads, params["heads"] = "AND list_contains($heads, head)", list(heads)
            predictions = cur.sql(
                "SELECT result_id, string_agg(head || '=' || label, '/' ORDER BY head) AS key, "
                "list(probs ORDER BY head) AS probs FROM predictions "
                f"WHERE {of_pool} AND role = 'champion' {of_heads} GROUP BY result_id", params=params).to_arrow_table()
        return waiting, predictions

    def results_by_ids(self, result_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Whole records (with predictions) of these results, in the order asked; unknown ids are left out."""
        if not result_ids:
            return []
        of_ids, params = _among(result_ids)
        with self.cursor() as cur:
            rows = [dict(zip(RESULT_COLUMNS, row, strict=True)) for row in cur.execute(
                f"SELECT {', '.join(RESULT_COLUMNS)} FROM results WHERE {of_ids}", params).fetchall()]
            self._attach_predictions(cur, rows)
        by_id = {r["result_id"]: r for r in rows}
        return [by_id[i] for i in result_ids if i in by_id]

    def waiting_for_review(self) -> dict[str, int]:
        """Parts nobody has labelled yet, by why they wait: ``hold`` (the model was unsure or the
        image failed) and ``audit`` (a random sample of decided parts)."""
        with self.cursor() as cur:
            rows = cur.execute(f"SELECT r.review, count(*) FROM results r WHERE {self._WAITING} GROUP BY ALL"
                               ).fetchall()
        return {"hold": 0, "audit": 0} | {review: int(n) for review, n in rows}

    def counts(self) -> dict[str, Any]:
        with self.cursor() as cur:
            total = cur.execute("SELECT count(*) FROM results").fetchone()
            by = cur.execute("SELECT disposition, count(*) FROM results GROUP BY ALL").fetchall()
        return {"total": int(total[0]) if total else 0, "by_disposition": {d: int(n) for d, n in by}}


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)

