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


def test_flush_returns_only_once_a_flush_already_under_way_has_written(tmp_path: Path) -> None:
    """flush() while the background thread is writing: what was queued before is in the store when it
    returns (a test, or a shutdown, reads the table right after)."""
    import threading

    store = Store(tmp_path / "r.duckdb", tmp_path / "journal")
    store.open()
    writing, release = threading.Event(), threading.Event()
    audit_many = store.audit_many

    def slow_audit_many(rows: list) -> None:  # the store busy with the background flush's rows
        writing.set()
        release.wait(5)
        audit_many(rows)

    store.audit_many = slow_audit_many  # type: ignore[method-assign]
    trail = AuditTrail(store)
    trail.record("op1", "opcua", "opcua.session", "127.0.0.1:5000")
    background = threading.Thread(target=trail.flush)
    background.start()
    assert writing.wait(5)
    caller = threading.Thread(target=trail.flush)
    caller.start()
    caller.join(0.2)
    assert caller.is_alive()  # waits for the flush under way
    release.set()
    caller.join(5)
    background.join(5)
    assert [r["action"] for r in store.audit_log()] == ["opcua.session"]
    store.close()
