"""The audit trail of privileged actions from every channel (API, OPC UA, Modbus), off the line's path.

Routes that already run in a worker thread write with :meth:`Store.audit`.  Everything that happens
on the line's event loop — a PLC's halt, reset, trigger-mode change or input write, an OPC UA
session, a login — calls :meth:`AuditTrail.record`, which only appends to a queue; a background
thread writes the queue to the store's ``audit`` table in one transaction every ``flush_s``.

PLC input writes arrive at line rate (a part id per part), so :meth:`AuditTrail.input_write`
coalesces them: one row per channel, writer and input in each flush window, with the number of
writes and the last value written.  Every write is counted; none is logged one row at a time.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from appliance.priority import lower_this_thread

if TYPE_CHECKING:
    from appliance.store import Store

log = logging.getLogger(__name__)

AuditRow = tuple[datetime, str, str, str, str | None, dict[str, Any]]
"""logged_at, user (or PLC peer), role (or channel), action, target, detail."""


@dataclass(slots=True)
class _Writes:
    first_at: datetime
    count: int = 0
    last: Any = None
    detail: dict[str, Any] = field(default_factory=dict)


class AuditTrail:
    """A queue of audit rows written to the store by a background thread; ``record`` never blocks."""

    def __init__(self, store: Store, flush_s: float = 1.0, max_pending: int = 100_000) -> None:
        self.store = store
        self.flush_s = flush_s
        self.dropped = 0
        self._rows: deque[AuditRow] = deque()
        self._max_pending = max_pending
        self._writes: dict[tuple[str, str, str], _Writes] = {}
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # a flush returns once what was queued before it is written
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, user: str, role: str, action: str, target: str | None = None,
               detail: dict[str, Any] | None = None) -> None:
        """Queue one audit row (thread-safe, constant time)."""
        with self._lock:
            if len(self._rows) >= self._max_pending:  # the store is failing: count, never grow without bound
                self.dropped += 1
                return
            self._rows.append((datetime.now(UTC), user, role, action, target, detail or {}))

    def input_write(self, channel: str, who: str, name: str, value: Any) -> None:
        """Count one PLC input write (part id, batch, process values, trigger) by ``who`` over ``channel``."""
        key = (channel, who, name)
        with self._lock:
            writes = self._writes.get(key)
            if writes is None:
                writes = self._writes[key] = _Writes(datetime.now(UTC))
            writes.count += 1
            writes.last = value

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued and stop the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.flush()

    def flush(self) -> None:
        """Write the queued rows now, in one transaction (kept queued if the store refuses them)."""
        with self._flushing:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            rows = list(self._rows)
            self._rows.clear()
            writes, self._writes = self._writes, {}
        rows += [(w.first_at, who, channel, "plc.input", name, {"writes": w.count, "last": w.last})
                 for (channel, who, name), w in writes.items()]
        if not rows:
            return
        try:
            self.store.audit_many(rows)
        except Exception:  # the store is down (disk full, closed): keep the rows for the next try
            log.exception("writing %d audit rows failed; retrying", len(rows))
            with self._lock:
                self._rows.extendleft(reversed(rows[: self._max_pending - len(self._rows)]))

    def _run(self) -> None:
        lower_this_thread()
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self.flush()
