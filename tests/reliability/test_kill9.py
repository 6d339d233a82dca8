"""``kill -9`` of the daemon at random points of a replay run: nothing a PLC has seen is ever lost.

The daemon runs as a child process (``python -m appliance run``) on a replay line looping at
50 parts/s with Modbus TCP on a free port.  A PLC-side poller reads the result block (holding
registers 10..35: result_sequence and result_part_id) every 5 ms and keeps every (sequence, part
id) pair it saw.  At a random moment the daemon gets SIGKILL and is started again; some kills
land while it is still starting (recovering the journal of the previous kill).

After every restart, once ``GET /health`` says "running", the results of the killed run are read
through the API and checked: the sequence continues without a gap or a repeat from the run
before, every result id is unique, and every pair the PLC saw is stored under that sequence with
that part id (a lost result would have its sequence number reused by a different part: the
replay starts again at part0000 after a restart, and 97 images make a coincidence unlikely).  At
the end the daemon is stopped cleanly and the DuckDB file is checked as a whole.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from appliance.auth import TokenIssuer, UserStore
from tests.brightness_model import GRADES
from tests.conftest import free_port, write_grade_images
from tests.reliability.conftest import HOST, DaemonProcess, ModbusPoller, config_file, record, sized

KILLS = sized(5, 50)
EARLY_SHARE = 0.2  # share of kills aimed at a daemon that is still starting (journal recovery)
RESTART_LIMIT_S = 30.0

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(sized(420, 3600))]


def _results_between(port: int, headers: dict[str, str], since: datetime, until: datetime) -> list[dict[str, Any]]:
    """Every stored result acquired in [since, until), through the API, oldest first."""
    rows: list[dict[str, Any]] = []
    offset = 0
    while True:
        page = httpx.get(f"http://{HOST}:{port}/api/v1/results", headers=headers, timeout=120, params={
            "since": since.isoformat(), "until": until.isoformat(), "limit": 10_000, "offset": offset}).json()
        rows += page["results"]
        if page["count"] < 10_000:
            break
        offset += 10_000
    return sorted(rows, key=lambda r: r["seq"])


def _check_window(rows: list[dict[str, Any]], first_seq: int, seen: dict[int, str], label: str) -> int:
    """Check one killed run's stored results; returns the last sequence number (first_seq - 1 if none)."""
    seqs = [r["seq"] for r in rows]
    assert seqs == list(range(first_seq, first_seq + len(rows))), (
        f"{label}: sequence is not contiguous from {first_seq}: {seqs[:5]}…{seqs[-5:]}")
    assert len({r["result_id"] for r in rows}) == len(rows), f"{label}: a result id is stored twice"
    by_seq = {r["seq"]: r["part_id"] for r in rows}
    lost = {s: p for s, p in seen.items() if by_seq.get(s) != p}
    lost_list = [(s, p, by_seq.get(s)) for s, p in sorted(lost.items())][:10]
    assert not lost, f"{label}: results the PLC saw are missing or different in the store: {lost_list}"
    return first_seq + len(rows) - 1


def test_kill9_at_random_points_loses_nothing_a_plc_saw(tmp_path: Path, line_config, state_dir: Path,
                                                         daemon_process: list[DaemonProcess]) -> None:
    seed = int(os.environ.get("RELIABILITY_SEED") or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    images = tmp_path / "images"
    write_grade_images(images, [GRADES[i % len(GRADES)] for i in range(97)])
    api_port, modbus_port = free_port(), free_port()
    cfg = line_config(images, api={"host": HOST, "port": api_port},
                      camera={"view": "top", "source": "replay",
                              "replay": {"path": str(images), "rate_hz": 50, "loop": True}},
                      store={"retention": {"pass": 0.0, "rework": 0.0, "reject": 0.0, "hold": 1.0,
                                           "min_free_mb": 0}},
                      modbus={"enabled": True, "host": HOST, "port": modbus_port})
    users = UserStore(state_dir / "users.json")
    users.set("reliability", "operator", "reliability-password-1")
    token, _ = TokenIssuer(state_dir / "api-secret").issue(users.identity("reliability"))
    headers = {"Authorization": f"Bearer {token}"}
    (tmp_path / "logs").mkdir()
    daemon = DaemonProcess(config_file(tmp_path / "run.yaml", cfg), api_port, tmp_path / "logs")
    daemon_process.append(daemon)
    journal = state_dir / "journal"

    restarts: list[float] = []
    first_start = 0.0
    recovered: list[int] = []
    segments_max = 0
    pending: list[tuple[datetime, datetime, dict[int, str], str]] = []  # killed runs not yet checked
    all_seen: dict[int, str] = {}
    next_first = 1
    early = 0
    run_started = datetime.now(UTC)
    seen: dict[int, str] = {}
    was_early = False
    for kill in range(KILLS + 1):
        spawned = datetime.now(UTC)
        if kill:
            pending.append((run_started, spawned, seen, f"run {kill} (killed {'early' if was_early else 'running'})"))
        run_started = spawned
        daemon.spawn()
        poller = ModbusPoller(modbus_port)
        poller.start()
        was_early = kill < KILLS and kill > 0 and rng.random() < EARLY_SHARE
        if was_early:
            time.sleep(rng.uniform(0.2, 4.0))  # wherever start-up is by then: imports, recovery, binding
            early += 1
        else:
            running_s = daemon.wait_running(timeout=120)
            if kill:
                restarts.append(running_s)
                recovered.append(daemon.health()["store"]["recovered"])
            else:
                first_start = running_s
            segments_max = max(segments_max, len(list(journal.glob("journal-*.jsonl"))))
            for since, until, seen_then, label in pending:  # recovery is complete once running
                next_first = _check_window(_results_between(api_port, headers, since, until), next_first,
                                           seen_then, label) + 1
            pending.clear()
            if kill == KILLS:
                break
            time.sleep(rng.uniform(0.3, 2.5))
        daemon.kill9()
        poller.stop()
        seen = poller.seen
        all_seen.update(seen)

    daemon.wait_judged(1)
    poller.stop()
    all_seen.update(poller.seen)
    code = daemon.terminate()
    assert code == 0, daemon.output()[-3000:]
    con = duckdb.connect(str(state_dir / "results.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT seq, result_id, part_id FROM results ORDER BY seq").fetchall()
    finally:
        con.close()
    seqs = [s for s, _, _ in rows]
    by_seq = {s: p for s, _, p in rows}
    figures = record(
        "kill9", seed=seed, kills=KILLS, kills_while_starting=early, first_start_s=round(first_start, 2),
        restarts_to_running=len(restarts),
        restart_s=[round(s, 2) for s in restarts], restart_max_s=round(max(restarts), 2),
        restart_median_s=round(statistics.median(restarts), 2), plc_seen=len(all_seen),
        recovered_from_journal=sum(recovered), recovered_per_restart=recovered, stored=len(rows),
        journal_segments_max=segments_max)
    assert seqs == list(range(1, len(rows) + 1)), "the whole store: no gap, no repeat"
    assert len({rid for _, rid, _ in rows}) == len(rows), "the whole store: every result id once"
    assert all(by_seq.get(s) == p for s, p in all_seen.items()), "every result a PLC saw is stored as seen"
    assert len(all_seen) >= KILLS - early, f"the PLC saw too few results to prove anything: {figures}"
    assert max(restarts) <= RESTART_LIMIT_S, f"a restart took over {RESTART_LIMIT_S} s: {restarts}"
    assert segments_max <= 2, "recovered journal segments are released after recovery"
    assert not list(journal.glob("journal-*.jsonl")), "a clean stop leaves no journal behind"
