"""asyncua's service-fault log lines through appliance.plc.opcua_faults.ServiceFaults."""

from __future__ import annotations

import logging

import pytest

from appliance.plc import log_once, opcua_faults
from appliance.plc.opcua_faults import FAULT, SOURCE, ServiceFaults
from appliance.plc.opcua_transport import QUIET_S

REPORTER = opcua_faults.__name__


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def faults(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    clock, counted = Clock(), []
    monkeypatch.setattr(log_once, "clock", clock)
    f = ServiceFaults(counted.append)
    f.install()
    caplog.set_level(logging.DEBUG, logger=SOURCE)
    caplog.set_level(logging.DEBUG, logger=REPORTER)
    yield f, clock, counted, caplog
    f.remove()


def fault(status: str, text: str = "The node id refers to a node that does not exist.") -> None:
    """What asyncua 2.1's UaProcessor logs when it answers with a ServiceFault."""
    logging.getLogger(SOURCE).error(FAULT, text, status)


def test_first_fault_of_a_status_is_a_warning_and_repeats_are_counted_not_logged(faults) -> None:  # type: ignore[no-untyped-def]
    f, clock, counted, caplog = faults
    for _ in range(50):
        fault("BadNodeIdUnknown")
        clock.now += 0.1
    fault("BadSessionIdInvalid", "The session id is not valid.")
    assert not [r for r in caplog.records if r.name == SOURCE], "asyncua's ERROR lines are dropped"
    records = [r for r in caplog.records if r.name == REPORTER and r.levelno >= logging.INFO]
    assert [(r.levelno, r.args[0]) for r in records] == [  # type: ignore[index]
        (logging.WARNING, "BadNodeIdUnknown"), (logging.WARNING, "BadSessionIdInvalid")]
    repeats = [r for r in caplog.records if r.name == REPORTER and r.levelno == logging.DEBUG]
    assert len(repeats) == 49
    assert "does not exist" in records[0].getMessage()
    assert "appliance_opcua_service_faults_total" in records[0].getMessage()
    assert f.counts == {"BadNodeIdUnknown": 50, "BadSessionIdInvalid": 1}
    assert counted.count("BadNodeIdUnknown") == 50 and counted.count("BadSessionIdInvalid") == 1


def test_a_status_is_logged_again_after_a_quiet_spell(faults) -> None:  # type: ignore[no-untyped-def]
    f, clock, _, caplog = faults
    fault("BadNodeIdUnknown")
    clock.now += QUIET_S / 2
    fault("BadNodeIdUnknown")  # still going on: counted only
    clock.now += QUIET_S
    fault("BadNodeIdUnknown")  # quiet for QUIET_S: a new episode
    assert len([r for r in caplog.records if r.name == REPORTER and r.levelno == logging.WARNING]) == 2
    assert f.counts == {"BadNodeIdUnknown": 3}


def test_other_records_pass_unchanged_and_remove_uninstalls(faults) -> None:  # type: ignore[no-untyped-def]
    f, _, counted, caplog = faults
    logging.getLogger(SOURCE).error("something else went wrong: %s", "x")
    f.remove()
    fault("BadNodeIdUnknown")
    records = [r for r in caplog.records if r.name == SOURCE]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.ERROR, "something else went wrong: x"),
        (logging.ERROR, "sending service fault response: The node id refers to a node that does not exist. "
                        "(BadNodeIdUnknown)")]
    assert counted == []
