"""The audit trail: rows from the line's loop reach the audit table; input writes are counted, not lost."""

from pathlib import Path

from appliance.audit import AuditTrail
from appliance.store import Store


def test_rows_and_coalesced_input_writes_reach_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.duckdb", tmp_path / "journal", ingest_interval_s=0.05)
    store.open()
    trail = AuditTrail(store, flush_s=60)  # only close() flushes here
    trail.start()
    try:
        trail.record("192.0.2.7", "modbus", "line.halt", None, {"unit": 1})
        for i in range(250):
            trail.input_write("modbus", "192.0.2.7", "part_id", f"P{i}")
        trail.input_write("opcua", "op1", "part_id", "X")
    finally:
        trail.close()
    rows = {(r["action"], r["role"]): r for r in store.audit_log()}
    store.close()
    assert rows[("line.halt", "modbus")]["user"] == "192.0.2.7"
    modbus = rows[("plc.input", "modbus")]
    assert modbus["target"] == "part_id" and modbus["detail"] == {"writes": 250, "last": "P249"}
    assert rows[("plc.input", "opcua")]["detail"] == {"writes": 1, "last": "X"}


def test_a_failing_store_keeps_the_rows_for_the_next_flush(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.duckdb", tmp_path / "journal")
    trail = AuditTrail(store)
    trail.record("admin", "admin", "user.set", "bob")
    trail.flush()  # the store is not open: refused, kept
    store.open()
    trail.flush()
    assert [r["target"] for r in store.audit_log()] == ["bob"]
    store.close()
