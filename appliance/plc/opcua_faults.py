"""OPC UA service faults: counted per status code, logged once while they recur.

asyncua logs every service fault it answers at ERROR ("sending service fault response: …").  A
fault is the client's business, not the appliance's: a NodeId the client got wrong, a session that
expired, a write without the right to write.  A PLC repeating one of them in its cycle would write a
line per cycle into the journal at ERROR.  :class:`ServiceFaults` sits on asyncua's processor
logger: the first fault of a status code (and the first again after :data:`QUIET_S` without one)
becomes a WARNING that says how to find the rest; the repeats are dropped; every fault is counted
(``appliance_opcua_service_faults_total{status}``).  asyncua's own ERROR line before a rejected identity
token is dropped too: the BadIdentityTokenRejected fault that follows it says the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from appliance.plc.opcua_transport import QUIET_S

SOURCE = "asyncua.server.uaprocessor"
"""The asyncua logger that reports service faults (asyncua 2.1: ``UaProcessor.process_message``)."""
FAULT = "sending service fault response: %s (%s)"
"""Its message for a fault; the arguments are the status text and the status name."""
SESSION_SOURCE = "asyncua.server.internal_session"
TOKEN_REJECTED = "Rejected active session UserIdentityToken not supported"
"""Logged at ERROR by ``InternalSession.activate_session`` just before a BadIdentityTokenRejected fault."""


class ServiceFaults(logging.Filter):
    """A logging filter for :data:`SOURCE` and :data:`SESSION_SOURCE`; other records pass unchanged."""

    def __init__(self, count: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.count, self.clock = count, clock
        self.counts: dict[str, int] = {}
        self._last: dict[str, float] = {}  # status name → time of its latest fault

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == TOKEN_REJECTED:
            return False
        if record.msg != FAULT or not isinstance(record.args, tuple) or len(record.args) != 2:
            return True
        text, status = str(record.args[0]), str(record.args[1])
        self.counts[status] = self.counts.get(status, 0) + 1
        if self.count is not None:
            self.count(status)
        now = self.clock()
        first = now - self._last.get(status, -QUIET_S) >= QUIET_S
        self._last[status] = now
        if not first:
            return False
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        record.msg = ("OPC UA: answered a client request with %s (%s); further %s faults are counted in "
                      "appliance_opcua_service_faults_total and logged again after %.0f s without one")
        record.args = (status, text, status, QUIET_S)
        return True

    def install(self) -> None:
        for name in (SOURCE, SESSION_SOURCE):
            logging.getLogger(name).addFilter(self)

    def remove(self) -> None:
        for name in (SOURCE, SESSION_SOURCE):
            logging.getLogger(name).removeFilter(self)
