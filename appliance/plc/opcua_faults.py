"""OPC UA service faults: counted per status code, logged once while they recur.

asyncua logs every service fault it answers at ERROR ("sending service fault response: …").  A
fault is the client's business, not the appliance's: a NodeId the client got wrong, a session that
expired, a write without the right to write.  A PLC repeating one of them in its cycle would write a
line per cycle into the journal at ERROR.  :class:`ServiceFaults` sits on asyncua's processor
logger and drops them; each status code is a condition of its own (:class:`Persistent`, as on the
other PLC-port conditions): its first fault, and the first again after :data:`QUIET_S` without one,
is logged here as a WARNING that says how to find the rest, the repeats at debug level; every fault
is counted (``appliance_opcua_service_faults_total{status}``).  asyncua's own ERROR line before a
rejected identity token is dropped too: the BadIdentityTokenRejected fault that follows it says the
same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from appliance.plc.log_once import Persistent
from appliance.plc.opcua_transport import QUIET_S

log = logging.getLogger(__name__)

SOURCE = "asyncua.server.uaprocessor"
"""The asyncua logger that reports service faults (asyncua 2.1: ``UaProcessor.process_message``)."""
FAULT = "sending service fault response: %s (%s)"
"""Its message for a fault; the arguments are the status text and the status name."""
SESSION_SOURCE = "asyncua.server.internal_session"
TOKEN_REJECTED = "Rejected active session UserIdentityToken not supported"
"""Logged at ERROR by ``InternalSession.activate_session`` just before a BadIdentityTokenRejected fault."""


class ServiceFaults(logging.Filter):
    """A logging filter for :data:`SOURCE` and :data:`SESSION_SOURCE`: drops the records it reports
    itself; other records pass unchanged."""

    def __init__(self, count: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.count = count
        self.counts: dict[str, int] = {}
        self._conditions: dict[str, Persistent] = {}  # per status name

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == TOKEN_REJECTED:
            return False
        if record.msg != FAULT or not isinstance(record.args, tuple) or len(record.args) != 2:
            return True
        text, status = str(record.args[0]), str(record.args[1])
        self.counts[status] = self.counts.get(status, 0) + 1
        if self.count is not None:
            self.count(status)
        condition = self._conditions.setdefault(status, Persistent(log, quiet_s=QUIET_S))
        condition.fail("OPC UA: answered a client request with %s (%s); further %s faults are logged at debug "
                       "level and counted in appliance_opcua_service_faults_total until %.0f s pass without one",
                       status, text, status, QUIET_S)
        return False

    def install(self) -> None:
        for name in (SOURCE, SESSION_SOURCE):
            logging.getLogger(name).addFilter(self)

    def remove(self) -> None:
        for name in (SOURCE, SESSION_SOURCE):
            logging.getLogger(name).removeFilter(self)
