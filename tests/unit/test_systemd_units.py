"""The unit files pass `systemd-analyze verify` and rate an exposure of at most 3.0."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "systemd").glob("*.service"))
ANALYZE = shutil.which("systemd-analyze") or "systemd-analyze (install: scripts/system-deps.sh)"


def test_there_are_three_units() -> None:
    assert {u.name for u in UNITS} == {"appliance.service", "appliance-dashboard.service",
                                       "appliance-retrain.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_verify_is_clean(unit: Path, tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point the copy at this checkout instead of /opt/appliance
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/appliance", str(REPO)))
    done = subprocess.run([ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if unit.name in line and "Unknown" not in line.split(":", 1)[0]]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_exposure_at_most_3(unit: Path) -> None:
    done = subprocess.run([ANALYZE, "security", "--offline=true", str(unit)], capture_output=True, text=True,
                          timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 3.0, done.stdout


def test_daemon_unit_is_notify_with_watchdog_and_limits() -> None:
    text = (REPO / "systemd" / "appliance.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StartLimitBurst=", "StateDirectory=",
                 "ConfigurationDirectory=", "LoadCredential=", "SystemCallFilter=@system-service"):
        assert line in text
    retrain = (REPO / "systemd" / "appliance-retrain.service").read_text()
    assert "Nice=10" in retrain and "IOSchedulingClass=idle" in retrain


def test_daemon_unit_lets_only_this_machine_in_and_the_drop_ins_verify(tmp_path: Path) -> None:
    """IPAddressDeny=any + IPAddressAllow=localhost; the example drop-in and the one
    `appliance systemd-network` prints for a plant config load without a complaint."""
    from typer.testing import CliRunner

    from appliance.cli import app
    from tests.unit.test_config import GOOD

    text = (REPO / "systemd" / "appliance.service").read_text()
    assert "\nIPAddressDeny=any\n" in text and "\nIPAddressAllow=localhost\n" in text
    config = tmp_path / "line.yaml"
    config.write_text(GOOD + "opcua: {enabled: true, host: 0.0.0.0}\n"
                             "modbus: {host: 0.0.0.0, allowed_clients: [127.0.0.1, 10.20.0.15, fd00:1::/64]}\n")
    printed = CliRunner().invoke(app, ["systemd-network", str(config)])
    assert printed.exit_code == 0, printed.output
    assert [line for line in printed.output.splitlines() if not line.startswith("#")] == [
        "[Service]", "IPAddressAllow=10.20.0.15/32", "IPAddressAllow=fd00:1::/64"]
    assert "# opcua.host is 0.0.0.0: add IPAddressAllow= for the OPC UA clients" in printed.output

    unit = tmp_path / "appliance.service"
    unit.write_text(text.replace("/opt/appliance", str(REPO)))
    (tmp_path / "appliance.service.d").mkdir()
    for name, drop_in in (("generated.conf", printed.output),
                          ("example.conf", (REPO / "systemd" / "appliance.service.d" /
                                            "plant-network.conf.example").read_text())):
        (tmp_path / "appliance.service.d" / name).write_text(drop_in)
    done = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and ".conf" not in done.stdout + done.stderr, done.stdout + done.stderr
